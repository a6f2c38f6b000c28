//! Prometheus metrics: the event loop publishes a [`Snapshot`] of the core's counters after
//! every change to grants, peers or the portal link and once a second for the packet counters;
//! `GET /metrics` renders the latest one as text.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use fz_tunnel::Drop;
use fz_tunnel::gateway::Gateway;
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

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fz_gateway_dropped_packets_total Packets and datagrams dropped, by reason.\n\
             # TYPE fz_gateway_dropped_packets_total counter"
        );
        for (reason, count) in &self.dropped {
            let _ = writeln!(
                out,
                "fz_gateway_dropped_packets_total{{reason=\"{}\"}} {count}",
                reason.as_str()
            );
        }
        let families: [(&str, &str, &str, String); 11] = [
            (
                "peers",
                "gauge",
                "WireGuard peers (clients with a grant).",
                self.peers.to_string(),
            ),
            (
                "peers_active",
                "gauge",
                "Peers holding WireGuard state (a session or a handshake); the rest are idle.",
                self.active_peers.to_string(),
            ),
            (
                "grants",
                "gauge",
                "Grants in force.",
                self.grants.to_string(),
            ),
            (
                "nat_flows",
                "gauge",
                "NAT flows to DNS resources.",
                self.nat_flows.to_string(),
            ),
            (
                "handshakes_total",
                "counter",
                "Handshakes answered.",
                self.handshakes.to_string(),
            ),
            (
                "cookie_replies_total",
                "counter",
                "Cookie replies sent under a handshake flood, to keys with or without a grant.",
                self.cookie_replies.to_string(),
            ),
            (
                "bytes_from_clients_total",
                "counter",
                "IP bytes from clients to the site.",
                self.bytes_from_clients.to_string(),
            ),
            (
                "bytes_to_clients_total",
                "counter",
                "IP bytes from the site to clients.",
                self.bytes_to_clients.to_string(),
            ),
            (
                "packets_from_clients_total",
                "counter",
                "IP packets from clients to the site.",
                self.packets_from_clients.to_string(),
            ),
            (
                "packets_to_clients_total",
                "counter",
                "IP packets from the site to clients.",
                self.packets_to_clients.to_string(),
            ),
            (
                "portal_connected",
                "gauge",
                "1 while the portal connection is up.",
                u8::from(self.portal_connected).to_string(),
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(
                out,
                "# HELP fz_gateway_{name} {help}\n# TYPE fz_gateway_{name} {kind}\nfz_gateway_{name} {value}"
            );
        }
        self.render_paths(&mut out);
        out
    }

    /// How clients' datagrams travel: per client, by kind, and the share of bytes that went
    /// directly.
    fn render_paths(&self, out: &mut String) {
        let relayed = self.paths.iter().filter(|(_, r)| r.is_some()).count();
        let _ = writeln!(
            out,
            "# HELP fz_gateway_clients Clients with a path, by how their datagrams travel.\n\
             # TYPE fz_gateway_clients gauge\n\
             fz_gateway_clients{{path=\"direct\"}} {}\n\
             fz_gateway_clients{{path=\"relayed\"}} {relayed}",
            self.paths.len() - relayed
        );
        let _ = writeln!(
            out,
            "# HELP fz_gateway_client_path The path of each client's datagrams, and the relay.\n\
             # TYPE fz_gateway_client_path gauge"
        );
        for (client, relay) in &self.paths {
            let _ = match relay {
                Some(relay) => writeln!(
                    out,
                    "fz_gateway_client_path{{client=\"{client}\",path=\"relayed\",relay=\"{relay}\"}} 1"
                ),
                None => writeln!(
                    out,
                    "fz_gateway_client_path{{client=\"{client}\",path=\"direct\"}} 1"
                ),
            };
        }
        let total = self.bytes_direct + self.bytes_relayed;
        let share = if total == 0 {
            0.0
        } else {
            self.bytes_direct as f64 / total as f64
        };
        let _ = writeln!(
            out,
            "# HELP fz_gateway_wireguard_bytes_total WireGuard bytes to and from clients, by path.\n\
             # TYPE fz_gateway_wireguard_bytes_total counter\n\
             fz_gateway_wireguard_bytes_total{{path=\"direct\"}} {}\n\
             fz_gateway_wireguard_bytes_total{{path=\"relayed\"}} {}\n\
             # HELP fz_gateway_direct_bytes_ratio The share of WireGuard bytes that went directly.\n\
             # TYPE fz_gateway_direct_bytes_ratio gauge\n\
             fz_gateway_direct_bytes_ratio {share}",
            self.bytes_direct, self.bytes_relayed
        );
    }
}

/// Serves `GET /metrics` on `address` until the process ends.
pub async fn serve(
    address: SocketAddr,
    snapshots: watch::Receiver<Snapshot>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(snapshots);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

async fn metrics(State(snapshots): State<watch::Receiver<Snapshot>>) -> impl IntoResponse {
    let text = snapshots.borrow().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
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
        let text = snapshot.render();
        for line in [
            "fz_gateway_dropped_packets_total{reason=\"unknown_key\"} 3",
            "fz_gateway_dropped_packets_total{reason=\"port_not_granted\"} 0",
            "fz_gateway_peers 2",
            "fz_gateway_peers_active 1",
            "fz_gateway_portal_connected 1",
            "# TYPE fz_gateway_handshakes_total counter",
            "fz_gateway_cookie_replies_total 4",
            "# TYPE fz_gateway_cookie_replies_total counter",
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
        let text = snapshot.render();
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
