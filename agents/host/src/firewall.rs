//! The gateway's masquerade: nftables rules so that client traffic the core writes into the
//! TUN device leaves for resources with the gateway's own address, and their replies come back.
//!
//! Everything lives in one table of our own, `inet fz_gateway_<tun>` ([`table_name`]), so we
//! never edit anyone else's rules and removing ours is one `delete table`. The table is
//! written with `nft -f -` as one script, which nftables applies as one transaction: either
//! all of it is in force or none. A table of the same name left by a crashed run is replaced
//! in that same transaction.
//!
//! The table's forward chain accepts traffic from the TUN device, and toward it only what
//! belongs to a connection a client opened; its policy is accept, so it never drops anybody
//! else's traffic. An accept in our table cannot overrule a drop in
//! another table (nftables runs every base chain on a hook): a host whose own forward policy is
//! drop (Docker, ufw, firewalld) must allow the TUN device there too.

use crate::tun::{CLIENT_TUNNEL_V4, CLIENT_TUNNEL_V6, validate_name};
use crate::{PlatformError, run_tool};

/// The nftables table of the gateway on `tun_name`, as long as it is in force.
///
/// Dropping it removes the table (errors are logged, since `Drop` cannot return them); call
/// [`Masquerade::remove`] to see them.
#[derive(Debug)]
pub struct Masquerade {
    table: String,
    removed: bool,
}

impl Masquerade {
    /// Installs the table for the TUN device `tun_name`, replacing a stale one of the same name.
    ///
    /// The device need not exist yet: rules match interfaces by name. Runs `nft`, which blocks
    /// the calling thread briefly; run it at start, not on a busy runtime thread.
    pub fn install(tun_name: &str) -> Result<Self, PlatformError> {
        validate_name(tun_name)?;
        let table = table_name(tun_name);
        run_nft(&ruleset(&table, tun_name))?;
        tracing::info!(table = %table, tun = tun_name, "nftables masquerade installed");
        Ok(Self {
            table,
            removed: false,
        })
    }

    /// The table's name, e.g. `fz_gateway_fz_gw0`, in family `inet`.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Deletes the table. Deleting a table that is already gone is not an error.
    pub fn remove(mut self) -> Result<(), PlatformError> {
        self.removed = true;
        delete_table(&self.table)
    }
}

impl Drop for Masquerade {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = delete_table(&self.table) {
            tracing::warn!(table = %self.table, %error, "could not remove the nftables masquerade");
        }
    }
}

/// The table for the TUN device `tun_name`: `fz_gateway_` and the name with every character
/// but letters, digits and `_` turned into `_`, so that it is a plain nftables identifier
/// whatever the device is called, e.g. `fz-gw0` → `fz_gateway_fz_gw0`.
pub fn table_name(tun_name: &str) -> String {
    let sanitised: String = tun_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("fz_gateway_{sanitised}")
}

/// Where the kernel keeps IPv4 forwarding on or off, for the caller's network namespace.
pub const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Where the kernel keeps IPv6 forwarding on or off for all devices.
pub const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Turns on IPv4 and IPv6 forwarding for the whole host (or network namespace).
///
/// Forwarding is left on when the gateway stops: other things on the host (containers, other
/// VPNs, a router's own job) may rely on it, and turning it off under them would cut them off.
/// A kernel without IPv6 (no `/proc/sys/net/ipv6`) only gets IPv4 forwarding, with a warning.
pub fn enable_forwarding() -> Result<(), PlatformError> {
    write_sysctl(IPV4_FORWARD)?;
    match write_sysctl(IPV6_FORWARD) {
        Err(PlatformError::Forwarding { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            tracing::warn!(
                path = IPV6_FORWARD,
                "no IPv6 in this kernel; IPv6 is not forwarded"
            );
            Ok(())
        }
        other => other,
    }
}

fn write_sysctl(path: &'static str) -> Result<(), PlatformError> {
    std::fs::write(path, "1\n").map_err(|source| PlatformError::Forwarding {
        path,
        error: source,
    })?;
    tracing::debug!(path, "forwarding on");
    Ok(())
}

/// The whole table. It first makes sure a table of that name exists and deletes it, so that a
/// stale table from a crashed run goes in the same transaction as the new one comes.
///
/// Masquerade only what came in from the TUN device with a client tunnel source and leaves by
/// another device: that is client traffic to a resource. Anything else the host forwards is not
/// ours to rewrite.
///
/// Toward the TUN device, only packets of connections a client opened pass (`ct state
/// established,related`: replies, and ICMP errors about them): a host at the site cannot open
/// a connection to a client. The gateway core then checks each reply against the grants.
fn ruleset(table: &str, tun: &str) -> String {
    format!(
        "table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"{tun}\" accept
        oifname \"{tun}\" ct state established,related accept
        oifname \"{tun}\" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        iifname \"{tun}\" oifname != \"{tun}\" ip saddr {v4} masquerade
        iifname \"{tun}\" oifname != \"{tun}\" ip6 saddr {v6} masquerade
    }}
}}
",
        v4 = CLIENT_TUNNEL_V4,
        v6 = CLIENT_TUNNEL_V6,
    )
}

/// Declaring the table before deleting it makes the delete succeed when there is none, with
/// the nftables of Debian 12 too (`destroy table` needs nft 1.0.8).
fn delete_table(table: &str) -> Result<(), PlatformError> {
    run_nft(&format!(
        "table inet {table} {{}}\ndelete table inet {table}\n"
    ))?;
    tracing::info!(table, "nftables masquerade removed");
    Ok(())
}

fn run_nft(script: &str) -> Result<(), PlatformError> {
    run_tool("nft", "nftables", &["-f", "-"], Some(script))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for (tun, table) in [
            ("fz-gw0", "fz_gateway_fz_gw0"),
            ("fzgw", "fz_gateway_fzgw"),
            ("fz.gw_1", "fz_gateway_fz_gw_1"),
        ] {
            assert_eq!(table_name(tun), table, "{tun}");
        }
    }

    #[test]
    fn the_ruleset_replaces_a_stale_table_and_masquerades_clients_only() {
        let script = ruleset("fz_gateway_fz_gw0", "fz-gw0");
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        assert_eq!(lines[0], "table inet fz_gateway_fz_gw0 {}");
        assert_eq!(lines[1], "delete table inet fz_gateway_fz_gw0");
        for rule in [
            "iifname \"fz-gw0\" accept",
            "oifname \"fz-gw0\" ct state established,related accept",
            "oifname \"fz-gw0\" drop",
            "iifname \"fz-gw0\" oifname != \"fz-gw0\" ip saddr 100.64.0.0/11 masquerade",
            "iifname \"fz-gw0\" oifname != \"fz-gw0\" ip6 saddr fd00:2021:1111::/107 masquerade",
        ] {
            assert!(lines.contains(&rule), "missing {rule:?} in\n{script}");
        }
    }

    #[test]
    fn install_refuses_names_that_could_change_the_script() {
        let error = Masquerade::install("x\" accept").unwrap_err();
        assert!(
            matches!(error, PlatformError::InvalidName { .. }),
            "{error}"
        );
    }
}
