//! HTTP: the router the portal serves and its shared state. `GET /healthz` here; the agents'
//! WebSockets in `agents`; the accounts' sign-in pages in `sign_in`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
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
    /// `ok`; `degraded` while an account's last policy reload failed (the portal serves on its
    /// last good table); `unavailable` when the database does not answer (with status 503,
    /// so a load balancer sends agents to another replica).
    status: &'static str,
    database: DatabaseHealth,
    accounts: Vec<AccountHealth>,
}

#[derive(Serialize)]
struct DatabaseHealth {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct AccountHealth {
    slug: String,
    bundle_hash: String,
    policy: PolicyHealth,
}

#[derive(Serialize)]
struct PolicyHealth {
    /// `ok`, or `reload_failed` while the latest reload failed.
    status: &'static str,
    reloads_failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// How long `/healthz` waits for the database before it calls it unavailable: a probe must
/// answer within its own timeout, typically a few seconds.
const DATABASE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Liveness: whether the database answers, and per account the policy it runs on and whether
/// its latest reload failed.
async fn healthz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Health>) {
    let database = match tokio::time::timeout(DATABASE_PATIENCE, state.broker.store().ping()).await
    {
        Ok(Ok(())) => DatabaseHealth {
            status: "ok",
            error: None,
        },
        Ok(Err(error)) => DatabaseHealth {
            status: "unavailable",
            error: Some(error_chain(&error)),
        },
        Err(_) => DatabaseHealth {
            status: "unavailable",
            error: Some(format!(
                "no answer within {} s",
                DATABASE_PATIENCE.as_secs()
            )),
        },
    };
    let mut accounts: Vec<AccountHealth> = state
        .broker
        .accounts()
        .map(|a| {
            let reloads = a.policy.reload_status().borrow().clone();
            AccountHealth {
                slug: a.settings.slug.clone(),
                bundle_hash: a.policy.current().bundle_hash.clone(),
                policy: PolicyHealth {
                    status: if reloads.last_error.is_some() {
                        "reload_failed"
                    } else {
                        "ok"
                    },
                    reloads_failed: reloads.failed,
                    error: reloads.last_error,
                },
            }
        })
        .collect();
    accounts.sort_by(|a, b| a.slug.cmp(&b.slug));
    let (code, status) = if database.error.is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    } else if accounts.iter().any(|a| a.policy.error.is_some()) {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    (
        code,
        Json(Health {
            status,
            database,
            accounts,
        }),
    )
}

/// An error and its causes, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}
