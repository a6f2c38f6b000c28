//! HTTP: the router the portal serves and its shared state. `GET /healthz` here; the agents'
//! WebSockets in `agents`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::Serialize;

use crate::agents;
use crate::broker::Broker;
use crate::config::TrustedProxy;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub trusted_proxy: Option<TrustedProxy>,
}

/// The portal's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/{account}/{agent}", get(agents::connect))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            agents::require_token,
        ))
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
    let mut accounts: Vec<AccountHealth> = state
        .broker
        .accounts()
        .map(|a| AccountHealth {
            slug: a.settings.slug.clone(),
            bundle_hash: a.policy.current().bundle_hash.clone(),
        })
        .collect();
    accounts.sort_by(|a, b| a.slug.cmp(&b.slug));
    Json(Health {
        status: "ok",
        accounts,
    })
}
