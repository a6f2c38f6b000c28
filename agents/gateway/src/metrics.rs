//! Prometheus metrics: the event loop publishes a [`Snapshot`] of the core's counters after
//! every change to grants, peers or the portal link and once a second for the packet counters;
//! `GET /metrics` renders the latest one, through a prometheus-client collector, as
//! OpenMetrics text.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use fz_tunnel::Drop;
use fz_tunnel::gateway::Gateway;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// The counters and gauges as the event loop saw them last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub dropped: Vec<(Drop, u64)>,
    pub peers: usize,
    pub active_peers: usize,
    pub grants: usize,
    pub nat_flows: usize,
    pub handshakes: u64,
    pub cookie_replies: u64,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub packets_from_clients: u64,
    pub packets_to_clients: u64,
    pub portal_connected: bool,
    /// Each client with a path, and the relay it goes through (`None`: direct).
    pub paths: Vec<(String, Option<IpAddr>)>,
    pub bytes_direct: u64,
    pub bytes_relayed: u64,
}

impl Snapshot {
    pub fn of(gateway: &Gateway, portal_connected: bool) -> Snapshot {
        let metrics = gateway.metrics();
        Snapshot {
            dropped: Drop::ALL
                .iter()
                .map(|reason| (*reason, metrics.dropped(*reason)))
                .collect(),
            peers: gateway.peer_count(),
            active_peers: gateway.active_peer_count(),
            grants: gateway.grant_count(),
            nat_flows: gateway.nat_flows(),
            handshakes: metrics.handshakes,
            cookie_replies: metrics.cookie_replies,
            bytes_from_clients: metrics.bytes_from_clients,
            bytes_to_clients: metrics.bytes_to_clients,
            packets_from_clients: metrics.packets_from_clients,
            packets_to_clients: metrics.packets_to_clients,
            portal_connected,
            paths: gateway.paths(),
            bytes_direct: metrics.bytes_direct,
            bytes_relayed: metrics.bytes_relayed,
        }
    }

    /// Every metric of the snapshot, in the registry's encoder: its counters and gauges as
    /// constants (the event loop keeps the counts; a scrape only reads them).
    fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        counters(
            encoder,
            "dropped_packets",
            "Packets and datagrams dropped, by reason",
            self.dropped
                .iter()
                .map(|(reason, count)| (vec![("reason", reason.as_str().to_owned())], *count)),
        )?;
        let gauges: [(&str, &str, usize); 4] = [
            (
                "peers",
                "WireGuard peers (clients with a grant)",
                self.peers,
            ),
            (
                "peers_active",
                "Peers holding WireGuard state (a session or a handshake); the rest are idle",
                self.active_peers,
            ),
            ("grants", "Grants in force", self.grants),
            ("nat_flows", "NAT flows to DNS resources", self.nat_flows),
        ];
        for (name, help, value) in gauges {
            gauge(encoder, name, help, [(Vec::new(), whole(value))])?;
        }
        let totals: [(&str, &str, u64); 6] = [
            ("handshakes", "Handshakes answered", self.handshakes),
            (
                "cookie_replies",
                "Cookie replies sent under a handshake flood, to keys with or without a grant",
                self.cookie_replies,
            ),
            (
                "bytes_from_clients",
                "IP bytes from clients to the site",
                self.bytes_from_clients,
            ),
            (
                "bytes_to_clients",
                "IP bytes from the site to clients",
                self.bytes_to_clients,
            ),
            (
                "packets_from_clients",
                "IP packets from clients to the site",
                self.packets_from_clients,
            ),
            (
                "packets_to_clients",
                "IP packets from the site to clients",
                self.packets_to_clients,
            ),
        ];
        for (name, help, value) in totals {
            counters(encoder, name, help, [(Vec::new(), value)])?;
        }
        gauge(
            encoder,
            "portal_connected",
            "1 while the portal connection is up",
            [(Vec::new(), i64::from(self.portal_connected))],
        )?;
        self.encode_paths(encoder)
    }

    /// How clients' datagrams travel: per client, by kind, and the share of bytes that went
    /// directly.
    fn encode_paths(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let relayed = self.paths.iter().filter(|(_, r)| r.is_some()).count();
        let path = |kind: &str| vec![("path", kind.to_owned())];
        gauge(
            encoder,
            "clients",
            "Clients with a path, by how their datagrams travel",
            [
                (path("direct"), whole(self.paths.len() - relayed)),
                (path("relayed"), whole(relayed)),
            ],
        )?;
        gauge(
            encoder,
            "client_path",
            "The path of each client's datagrams, and the relay",
            self.paths.iter().map(|(client, relay)| {
                let mut labels = vec![("client", client.clone())];
                match relay {
                    Some(relay) => {
                        labels.push(("path", "relayed".to_owned()));
                        labels.push(("relay", relay.to_string()));
                    }
                    None => labels.push(("path", "direct".to_owned())),
                }
                (labels, 1)
            }),
        )?;
        counters(
            encoder,
            "wireguard_bytes",
            "WireGuard bytes to and from clients, by path",
            [
                (path("direct"), self.bytes_direct),
                (path("relayed"), self.bytes_relayed),
            ],
        )?;
        let total = self.bytes_direct + self.bytes_relayed;
        let share = if total == 0 {
            0.0
        } else {
            self.bytes_direct as f64 / total as f64
        };
        let ratio = ConstGauge::new(share);
        let metric = encoder.encode_descriptor(
            "direct_bytes_ratio",
            "The share of WireGuard bytes that went directly",
            None,
            ratio.metric_type(),
        )?;
        ratio.encode(metric)
    }
}

/// Labels of one sample, as (name, value) pairs; none for a metric without labels.
type Labels = Vec<(&'static str, String)>;

fn whole(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A counter family: `fz_gateway_<name>_total` with a sample per label set.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        MetricType::Counter,
        samples,
        ConstCounter::new,
    )
}

/// A gauge family: `fz_gateway_<name>` with a sample per label set.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, i64)>,
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        MetricType::Gauge,
        samples,
        ConstGauge::new,
    )
}

/// A family of `kind` with a sample per label set, each made by `metric` from its value; a
/// family without labels has one sample, written as `name value`.
fn family<V, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, V)>,
    metric: impl Fn(V) -> M,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            return metric(value).encode(family);
        }
        metric(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The latest snapshot, read at each scrape.
#[derive(Debug)]
struct Latest(watch::Receiver<Snapshot>);

impl Collector for Latest {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = self.0.borrow().clone();
        snapshot.encode(&mut encoder)
    }
}

/// The registry of the gateway's metrics (prefix `fz_gateway`), read from `snapshots`.
fn registry(snapshots: watch::Receiver<Snapshot>) -> Registry {
    let mut registry = Registry::with_prefix("fz_gateway");
    registry.register_collector(Box::new(Latest(snapshots)));
    registry
}

/// The OpenMetrics text exposition of `registry`.
fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// Serves `GET /metrics` on `address` until the process ends.
pub async fn serve(
    address: SocketAddr,
    snapshots: watch::Receiver<Snapshot>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry(snapshots)));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&registry),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_reason_and_gauge() {
        let snapshot = Snapshot {
            dropped: vec![(Drop::UnknownKey, 3), (Drop::PortNotGranted, 0)],
            peers: 2,
            active_peers: 1,
            cookie_replies: 4,
            portal_connected: true,
            ..Snapshot::default()
        };
        let (_publisher, snapshots) = watch::channel(snapshot);
        let text = render(&registry(snapshots));
        for line in [
            "fz_gateway_dropped_packets_total{reason=\"unknown_key\"} 3",
            "fz_gateway_dropped_packets_total{reason=\"port_not_granted\"} 0",
            "fz_gateway_peers 2",
            "fz_gateway_peers_active 1",
            "fz_gateway_portal_connected 1",
            "# TYPE fz_gateway_handshakes counter",
            "fz_gateway_cookie_replies_total 4",
            "# TYPE fz_gateway_cookie_replies counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn renders_each_clients_path_and_the_direct_share() {
        let snapshot = Snapshot {
            paths: vec![
                ("cli_a".to_owned(), None),
                ("cli_b".to_owned(), Some("198.18.0.3".parse().unwrap())),
            ],
            bytes_direct: 300,
            bytes_relayed: 100,
            ..Snapshot::default()
        };
        let (_publisher, snapshots) = watch::channel(snapshot);
        let text = render(&registry(snapshots));
        for line in [
            "fz_gateway_clients{path=\"direct\"} 1",
            "fz_gateway_clients{path=\"relayed\"} 1",
            "fz_gateway_client_path{client=\"cli_a\",path=\"direct\"} 1",
            "fz_gateway_client_path{client=\"cli_b\",path=\"relayed\",relay=\"198.18.0.3\"} 1",
            "fz_gateway_wireguard_bytes_total{path=\"relayed\"} 100",
            "fz_gateway_direct_bytes_ratio 0.75",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
