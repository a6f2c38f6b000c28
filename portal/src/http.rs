//! HTTP: the router the portal serves and its shared state. `GET /healthz` here; the agents'
//! WebSockets in `agents`; the accounts' sign-in pages in `sign_in`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::Serialize;

use crate::agents;
use crate::broker::Broker;
use crate::config::TrustedProxy;
use crate::sign_in::{self, SignIn};

/// The largest sign-in form accepted: an address or a code, and the CSRF token.
const MAX_FORM_BYTES: usize = 4096;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub trusted_proxy: Option<TrustedProxy>,
    pub sign_in: Arc<SignIn>,
}

/// The portal's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/{account}/{agent}", get(agents::connect))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            agents::require_token,
        ))
        .route(
            "/api/{account}/sign-out",
            axum::routing::post(agents::sign_out),
        )
        .route("/healthz", get(healthz))
        .route("/{account}", get(sign_in::start_page))
        .route(
            "/{account}/sign-in/email",
            get(sign_in::code_page).post(sign_in::email_requested),
        )
        .route(
            "/{account}/sign-in/email/code",
            axum::routing::post(sign_in::code_entered),
        )
        .route(
            "/{account}/sign-in/oidc/{provider}",
            get(sign_in::oidc_start),
        )
        .route(
            "/{account}/sign-in/oidc/{provider}/callback",
            get(sign_in::oidc_callback),
        )
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
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
