//! The scenarios' report: one entry per scenario, the figures measured on the way, written as
//! `target/e2e-report.json` and printed as a summary.
//!
//! ```json
//! {"scenarios": [{"name": "...", "status": "pass", "detail": "..."}],
//!  "figures": {"failover_seconds": 10.5, "connection_setup_ms": 41, "tunnel_throughput_ratio": 0.6,
//!              "idp_group_removed_seconds": 0.5, "token_revoked_seconds": 1.2,
//!              "nat_setup_direct_ms": 40, "nat_setup_relayed_ms": 60, "nat_direct_share": 0.78,
//!              "replica_rehome_seconds": 0.4, "cross_replica_grant_p99_ms": 90, ...}}
//! ```
//!
//! A figure no scenario measured (its scenario failed first) is `null`.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenarios: Vec<Scenario>,
    pub figures: Figures,
}

#[derive(Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub status: Status,
    /// What was seen: the measurement on a pass, the failure's message on a fail.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
}

#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// From the kill of the gateway in use to the first answer through the other one.
    pub failover_seconds: Option<f64>,
    /// The same from a hung gateway (SIGSTOP: nobody tells), and from a gateway killed and
    /// started again at once (through either gateway).
    pub failover_hung_seconds: Option<f64>,
    pub failover_restart_seconds: Option<f64>,
    /// From an application's first DNS query for a resource name to the first byte of the
    /// resource's answer (curl's `time_starttransfer`, DNS included).
    pub connection_setup_ms: Option<f64>,
    /// One TCP stream through the tunnel over the same transfer without fz, in the same
    /// topology.
    pub tunnel_throughput_ratio: Option<f64>,
    /// From a sign-in at which the identity provider no longer names a group to the first
    /// refusal of a resource only that group was allowed.
    pub idp_group_removed_seconds: Option<f64>,
    /// From `fz-portal token revoke` to the first refusal of the device's resource.
    pub token_revoked_seconds: Option<f64>,
    /// The NAT matrix: the slowest first connection (from the client's first SYN to the
    /// resource's greeting, the grant, ICE and the handshake included) of the cells whose path
    /// ended direct, and of those through the relay.
    pub nat_setup_direct_ms: Option<f64>,
    pub nat_setup_relayed_ms: Option<f64>,
    /// The share of the NAT matrix's cells whose path ended direct.
    pub nat_direct_share: Option<f64>,
    /// One TCP stream through a tunnel only the relay carries (both NATs hard), over one
    /// through a tunnel that goes directly (no NAT), in the same world.
    pub relay_throughput_ratio: Option<f64>,
    /// From the relay's restart to the first answer again on a connection only it carries.
    pub relay_restart_seconds: Option<f64>,
    /// From a client's move to another address to the first answer again through a gateway
    /// behind NAT.
    pub roaming_seconds: Option<f64>,
    /// Three portal replicas: from the `kill -9` of the replica holding a gateway's connection
    /// to the gateway in service on another.
    pub replica_rehome_seconds: Option<f64>,
    /// From a client's request to its grant (p99 of a probe's), through a replica the gateway
    /// is not connected to, and through the one it is.
    pub cross_replica_grant_p99_ms: Option<f64>,
    pub same_replica_grant_p99_ms: Option<f64>,
    /// Three portal replicas: from `token revoke` on one to the device's tunnel refused through
    /// a gateway on whichever replica holds it (the goal is 2 s), and how much of that the
    /// admin command itself took.
    pub replica_token_revoked_seconds: Option<f64>,
    pub replica_revoke_command_seconds: Option<f64>,
}

impl Report {
    /// Whether every scenario passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.scenarios.is_empty()
            && self
                .scenarios
                .iter()
                .all(|scenario| scenario.status == Status::Pass)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }

    /// The summary a person reads: a line per scenario, then the figures.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        for scenario in &self.scenarios {
            let status = match scenario.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
            };
            let detail = scenario.detail.lines().next().unwrap_or_default();
            text += &format!("{status}  {:<34} {detail}\n", scenario.name);
        }
        let figure = |value: Option<f64>, unit: &str| match value {
            Some(value) => format!("{value:.2}{unit}"),
            None => "not measured".to_owned(),
        };
        text += &format!(
            "figures: failover {} (hung {}, restarted {}), connection setup {}, tunnel throughput {} of direct, access \
             lost {} after an identity provider dropped the group and {} after a token \
             revocation; through NATs: setup {} direct, {} relayed, {} of cells direct, back \
             {} after a relay restart, {} after a client moved; relayed tunnel {} of direct; \
             portal replicas: a gateway re-homed {} after its replica's kill, grants p99 {} across \
             replicas, {} on the gateway's own, a token revoked on one refused after {} (the \
             command took {})\n",
            figure(self.figures.failover_seconds, " s"),
            figure(self.figures.failover_hung_seconds, " s"),
            figure(self.figures.failover_restart_seconds, " s"),
            figure(self.figures.connection_setup_ms, " ms"),
            figure(self.figures.tunnel_throughput_ratio, "x"),
            figure(self.figures.idp_group_removed_seconds, " s"),
            figure(self.figures.token_revoked_seconds, " s"),
            figure(self.figures.nat_setup_direct_ms, " ms"),
            figure(self.figures.nat_setup_relayed_ms, " ms"),
            figure(self.figures.nat_direct_share, ""),
            figure(self.figures.relay_restart_seconds, " s"),
            figure(self.figures.roaming_seconds, " s"),
            figure(self.figures.relay_throughput_ratio, "x"),
            figure(self.figures.replica_rehome_seconds, " s"),
            figure(self.figures.cross_replica_grant_p99_ms, " ms"),
            figure(self.figures.same_replica_grant_p99_ms, " ms"),
            figure(self.figures.replica_token_revoked_seconds, " s"),
            figure(self.figures.replica_revoke_command_seconds, " s"),
        );
        text
    }
}
