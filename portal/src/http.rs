//! HTTP: the router the binary serves and its shared state. Handlers are added one module per
//! resource as the portal grows (the agents' WebSockets next).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub accounts: Vec<AccountState>,
}

#[derive(Debug)]
pub struct AccountState {
    pub slug: String,
    pub policy: Arc<crate::policy::PolicyEngine>,
}

/// The portal's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(state)
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    accounts: Vec<AccountHealth>,
}

#[derive(Serialize)]
struct AccountHealth {
    slug: String,
    bundle_hash: String,
}

/// Liveness and the policy each account runs on.
async fn healthz(State(state): State<Arc<AppState>>) -> Json<Health> {
    let accounts = state
        .accounts
        .iter()
        .map(|a| AccountHealth {
            slug: a.slug.clone(),
            bundle_hash: a.policy.current().bundle_hash.clone(),
        })
        .collect();
    Json(Health {
        status: "ok",
        accounts,
    })
}
