//! The client's full tunnel, for a grant of an `internet` resource: every packet the host's
//! own routes would send to its default route goes into the TUN device instead, while the
//! agent's own traffic (to the portal, relays and gateways) and the local networks stay
//! outside, so the tunnel can never carry itself.
//!
//! It is policy routing, as `wg-quick` does it, for IPv4 and IPv6:
//!
//! ```text
//! ip rule  add priority 32758 fwmark MARK table main               # the agent's own sockets
//! ip rule  add priority 32759 to <resolver> table TABLE            # DNS: through the tunnel
//! ip rule  add priority 32760 table main suppress_prefixlength 0   # routes more specific than
//!                                                                  # a default (the local
//!                                                                  # networks, the resources)
//!                                                                  # win
//! ip rule  add priority 32761 not fwmark MARK table TABLE          # the rest, unless marked
//! ip route add default dev <tun> src <tunnel address> table TABLE  # ... goes into the tunnel
//! ```
//!
//! The agent marks its own sockets with [`MARK`] ([`mark`]), so they keep the host's routes.
//! The resolvers the client's DNS stub forwards to go through the tunnel even when they sit on
//! a local network, so that names no resource matches are not asked in the clear where the
//! laptop happens to be; the caller passes only resolvers the `internet` grant can reach.
//! Nothing in the host's main table changes, so removing the two rules and the table
//! ([`FullTunnel::remove`], also on drop) gives the host back exactly its routes; a client
//! that crashed leaves the rules, which the next start removes ([`FullTunnel::clear`]) before
//! it installs anything.

use std::net::IpAddr;
use std::os::fd::AsFd;

use crate::tun::Tun;
use crate::{PlatformError, run_tool};

/// The firewall mark on the agent's own sockets: their packets skip the tunnel's table.
pub const MARK: u32 = 0x0f2c_0001;

/// The routing table that holds the tunnel's default routes.
const TABLE: &str = "51820";

/// The rules' priorities: before the main table's (32766), in the order above.
const MARKED_PRIORITY: &str = "32758";
const RESOLVER_PRIORITY: &str = "32759";
const SUPPRESS_PRIORITY: &str = "32760";
const TUNNEL_PRIORITY: &str = "32761";

const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

/// `mark` written in the form `ip rule` takes.
fn mark_text() -> String {
    format!("{MARK:#x}")
}

/// Marks `socket` with [`MARK`], so that what it sends keeps the host's own routes while a
/// full tunnel is up. Needs `CAP_NET_ADMIN`, which the agent has for its TUN device.
pub fn mark(socket: &impl AsFd) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::Mark, &MARK).map_err(std::io::Error::from)
}

/// The full tunnel, installed. Dropping it removes it.
#[derive(Debug)]
pub struct FullTunnel {
    removed: bool,
}

impl FullTunnel {
    /// Sends everything without a more specific route, and everything to `resolvers`, into
    /// `tun`, from the tunnel addresses `v4` and `v6`. Whatever an earlier run left is removed
    /// first; if a step fails, what the earlier steps installed is removed again before the
    /// error is returned.
    pub fn install(
        tun: &Tun,
        v4: IpAddr,
        v6: IpAddr,
        resolvers: &[IpAddr],
    ) -> Result<FullTunnel, PlatformError> {
        Self::clear();
        // Answers to the marked sockets come in on the host's own interfaces; with strict
        // reverse-path filtering the kernel checks where it would route their source, and
        // without the mark that is the tunnel: they would be dropped. `wg-quick` does this too.
        std::fs::write(SRC_VALID_MARK, "1").map_err(|error| PlatformError::Sysctl {
            path: SRC_VALID_MARK,
            error,
        })?;
        let installed = FullTunnel { removed: false };
        let mark = mark_text();
        // The routes first: a rule that points at an empty table would send nothing anywhere.
        for (family, default, source) in [("-4", "0.0.0.0/0", v4), ("-6", "::/0", v6)] {
            let source = source.to_string();
            run_tool(
                "ip",
                "iproute2",
                &[
                    family,
                    "route",
                    "replace",
                    default,
                    "dev",
                    tun.name(),
                    "src",
                    &source,
                    "table",
                    TABLE,
                ],
                None,
            )?;
        }
        let rule = |family: &str, priority: &str, selector: &[&str], table: &str| {
            let mut args = vec![family, "rule", "add", "priority", priority];
            args.extend_from_slice(selector);
            args.extend_from_slice(&["table", table]);
            run_tool("ip", "iproute2", &args, None)
        };
        for family in ["-4", "-6"] {
            rule(family, MARKED_PRIORITY, &["fwmark", &mark], "main")?;
        }
        for resolver in resolvers {
            let family = if resolver.is_ipv4() { "-4" } else { "-6" };
            rule(
                family,
                RESOLVER_PRIORITY,
                &["to", &resolver.to_string()],
                TABLE,
            )?;
        }
        for family in ["-4", "-6"] {
            rule(
                family,
                SUPPRESS_PRIORITY,
                &["suppress_prefixlength", "0"],
                "main",
            )?;
            rule(family, TUNNEL_PRIORITY, &["not", "fwmark", &mark], TABLE)?;
        }
        tracing::info!(
            tun = tun.name(),
            "full tunnel up: the default routes go into the tunnel"
        );
        Ok(installed)
    }

    /// Gives the host back its own routes now.
    pub fn remove(mut self) {
        self.removed = true;
        Self::clear();
        tracing::info!("full tunnel down: the host's own routes again");
    }

    /// Removes the rules and the table, whoever installed them; what is not there is not an
    /// error. Rules go first, so that no packet meets a rule whose table is already empty.
    pub fn clear() {
        for family in ["-4", "-6"] {
            for priority in [
                TUNNEL_PRIORITY,
                SUPPRESS_PRIORITY,
                RESOLVER_PRIORITY,
                MARKED_PRIORITY,
            ] {
                // `ip rule del` removes one rule per call; a crashed run may have left several.
                while run_tool(
                    "ip",
                    "iproute2",
                    &[family, "rule", "del", "priority", priority],
                    None,
                )
                .is_ok()
                {}
            }
            let _ = run_tool(
                "ip",
                "iproute2",
                &[family, "route", "flush", "table", TABLE],
                None,
            );
        }
    }
}

impl Drop for FullTunnel {
    fn drop(&mut self) {
        if !self.removed {
            Self::clear();
        }
    }
}
