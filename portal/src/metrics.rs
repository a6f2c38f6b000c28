//! The portal's Prometheus metrics, on the prometheus-client crate, served at
//! `http://<metrics_listen>/metrics` (a listener of its own, off by default: counts of agents
//! and decisions are nobody's business on the public port).
//!
//! Events are counted where they happen ([`Metrics::request_answered`], called by the broker
//! for every resource request); what is a state rather than an event (agents connected,
//! grants in force, reload failures, how fast the database answers) is read from the broker
//! when a scrape comes ([`Metrics::render`]). The writer times each commit of the store
//! itself, into a histogram registered here.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::broker::Broker;

/// How a resource request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// A signed grant went to the client.
    Granted,
    /// Denied by policy, refused (no gateway, too many requests, ...): the client was told why.
    Rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum AgentKind {
    Client,
    Gateway,
}

/// Label values in lower case, as Prometheus labels are written.
impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Outcome::Granted => "granted",
            Outcome::Rejected => "rejected",
        })
    }
}

impl EncodeLabelValue for AgentKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            AgentKind::Client => "client",
            AgentKind::Gateway => "gateway",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    kind: AgentKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

/// The registry and the metrics in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    request_seconds: Family<OutcomeLabels, Histogram>,
    agents: Family<AgentLabels, Gauge>,
    grants: Gauge,
    reload_failures: Family<AccountLabels, Counter>,
    database_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The histogram of the store's commits of the writer's batches ([`crate::writer::Writer`]
/// observes it; [`Metrics::new`] registers it): from 0.1 ms to about 3 s, a disk sync each.
pub fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

impl Metrics {
    /// The registry, with the writer's commit histogram (`commits`, made by
    /// [`commit_histogram`]) in it.
    pub fn new(commits: Histogram) -> Self {
        let mut registry = Registry::with_prefix("fz_portal");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Resource requests answered, by outcome (granted, or rejected with a reason)",
            requests.clone(),
        );
        // From 0.5 ms to about 8 s: a decision alone is microseconds, a grant waits for the
        // gateway's acknowledgement and the durable write.
        let request_seconds = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        });
        registry.register(
            "request_seconds",
            "Time from a resource request to its answer (decision, gateway acknowledgement, durable write), by outcome",
            request_seconds.clone(),
        );
        let agents = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "agents_connected",
            "Agents connected now, by kind",
            agents.clone(),
        );
        let grants = Gauge::default();
        registry.register("grants_in_force", "Grants in force now", grants.clone());
        let reload_failures = Family::<AccountLabels, Counter>::default();
        registry.register(
            "policy_reload_failures",
            "Policy reloads that failed and kept the last good table, by account",
            reload_failures.clone(),
        );
        let database_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "database_ping_seconds",
            "How long the database took to answer a trivial query at the last scrape",
            database_seconds.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "How long the store took to commit each batch of grants, flows and withdrawals (the durable write every grant's answer waits for)",
            commits,
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            agents,
            grants,
            reload_failures,
            database_seconds,
        }
    }

    /// Counts a resource request and how long its answer took.
    pub fn request_answered(&self, outcome: Outcome, took: Duration) {
        let labels = OutcomeLabels { outcome };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The text exposition, with the states read from `broker` now.
    pub async fn render(&self, broker: &Broker) -> String {
        let (clients, gateways) = broker.agents_connected();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.agents
            .get_or_create(&AgentLabels {
                kind: AgentKind::Client,
            })
            .set(count(clients));
        self.agents
            .get_or_create(&AgentLabels {
                kind: AgentKind::Gateway,
            })
            .set(count(gateways));
        self.grants.set(count(broker.grants_in_force()));
        for account in broker.accounts() {
            let failed = account.policy.reload_status().borrow().failed;
            let counter = self.reload_failures.get_or_create(&AccountLabels {
                account: account.settings.slug.clone(),
            });
            // The engine keeps the count; the counter follows it (it only grows).
            counter.inc_by(failed.saturating_sub(counter.get()));
        }
        let started = std::time::Instant::now();
        let answered = broker.store().ping().await.is_ok();
        self.database_seconds.set(if answered {
            started.elapsed().as_secs_f64()
        } else {
            f64::NAN
        });
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// `GET /metrics`, for the metrics listener.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(broker)
}

async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let text = broker.metrics().render(&broker).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
