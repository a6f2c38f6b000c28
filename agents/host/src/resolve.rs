//! Name resolution for DNS resources, with the host's own resolver configuration.
//!
//! The gateway resolves a DNS resource's name where the resource lives, with the DNS servers
//! the gateway's host uses (`/etc/resolv.conf`, and `/etc/hosts`), so split-horizon names
//! resolve as they would for any program there. The core asks for a name; the driver calls
//! [`Resolver::resolve`] and hands the answer back as data.
//!
//! hickory-resolver does the work and stays behind this module: callers see [`IpAddr`]s and a
//! [`LookupFailure`], never hickory's types. Plain DNS over UDP and TCP only: no DNSSEC, no
//! DNS over TLS or HTTPS, since the host's resolver is what we mean to follow.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use crate::PlatformError;

/// Why a name gave no addresses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupFailure {
    /// The name does not exist (NXDOMAIN), or exists with neither an A nor an AAAA record.
    /// An answer, not a fault: the core tells the client there is nothing to reach.
    #[error("no such name")]
    NoSuchName,
    /// No answer could be had: a timeout, SERVFAIL, a refusal, a broken reply. Trying again
    /// later may work.
    #[error("lookup failed: {0}")]
    Failed(String),
}

/// Resolves names to IPv4 and IPv6 addresses. Cheap to clone; clones share one cache.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver with the host's configuration: the nameservers, search domains and options
    /// of `/etc/resolv.conf`, and `/etc/hosts`.
    pub fn from_system_conf() -> Result<Self, PlatformError> {
        let inner = TokioResolver::builder_tokio()
            .and_then(|builder| builder.build())
            .map_err(|error| PlatformError::ResolverConfig(error.to_string()))?;
        Ok(Self { inner })
    }

    /// A resolver that asks only `nameserver` (over UDP, and TCP for long answers), with no
    /// search domains and without `/etc/hosts`.
    pub fn with_nameserver(nameserver: SocketAddr) -> Result<Self, PlatformError> {
        let connection = |mut config: ConnectionConfig| {
            config.port = nameserver.port();
            config
        };
        let server = NameServerConfig::new(
            nameserver.ip(),
            true,
            vec![
                connection(ConnectionConfig::udp()),
                connection(ConnectionConfig::tcp()),
            ],
        );
        let mut options = ResolverOpts::default();
        options.use_hosts_file = ResolveHosts::Never;
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![server]),
            TokioRuntimeProvider::default(),
        );
        *builder.options_mut() = options;
        let inner = builder
            .build()
            .map_err(|error| PlatformError::ResolverConfig(error.to_string()))?;
        Ok(Self { inner })
    }

    /// The IPv4 and IPv6 addresses of `name`: A and AAAA are asked together, IPv4 addresses
    /// come first, and a name with only one family is fine.
    ///
    /// When one family fails (say, its query timed out) but the other answered, the answer is
    /// returned. `NoSuchName` needs both to say so (NXDOMAIN from either is enough, since it is
    /// about the name, not a family); `Failed` when neither answered and either failed.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, LookupFailure> {
        let (v4, v6) = tokio::join!(
            self.inner.lookup(name, RecordType::A),
            self.inner.lookup(name, RecordType::AAAA),
        );
        let answer = combine(addresses(v4), addresses(v6));
        match &answer {
            Ok(ips) => tracing::debug!(name, count = ips.len(), "resolved"),
            Err(failure) => tracing::debug!(name, %failure, "not resolved"),
        }
        answer
    }
}

/// One family's answer: its addresses, or why there are none.
fn addresses(
    lookup: Result<hickory_resolver::lookup::Lookup, NetError>,
) -> Result<Vec<IpAddr>, LookupFailure> {
    match lookup {
        // The answer section may also hold the CNAME chain that led here; keep addresses.
        Ok(lookup) => Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect()),
        Err(error) if error.is_nx_domain() => Err(LookupFailure::NoSuchName),
        // NOERROR with no records of this type: the name exists, this family is just empty.
        Err(error) if error.is_no_records_found() => Ok(Vec::new()),
        Err(error) => Err(LookupFailure::Failed(error.to_string())),
    }
}

fn combine(
    v4: Result<Vec<IpAddr>, LookupFailure>,
    v6: Result<Vec<IpAddr>, LookupFailure>,
) -> Result<Vec<IpAddr>, LookupFailure> {
    match (v4, v6) {
        (Ok(mut v4), Ok(v6)) => {
            v4.extend(v6);
            if v4.is_empty() {
                return Err(LookupFailure::NoSuchName);
            }
            Ok(v4)
        }
        (Ok(ips), Err(failure)) | (Err(failure), Ok(ips)) => {
            if ips.is_empty() {
                return Err(failure);
            }
            Ok(ips)
        }
        (Err(LookupFailure::NoSuchName), _) | (_, Err(LookupFailure::NoSuchName)) => {
            Err(LookupFailure::NoSuchName)
        }
        (Err(failure), Err(_)) => Err(failure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Result<Vec<IpAddr>, LookupFailure> {
        Ok(list.iter().map(|ip| ip.parse().unwrap()).collect())
    }

    fn failed() -> Result<Vec<IpAddr>, LookupFailure> {
        Err(LookupFailure::Failed("request timed out".into()))
    }

    const NX: Result<Vec<IpAddr>, LookupFailure> = Err(LookupFailure::NoSuchName);

    #[test]
    fn both_families_combine_into_one_answer() {
        for (v4, v6, want) in [
            (
                ips(&["192.0.2.1"]),
                ips(&["2001:db8::1"]),
                ips(&["192.0.2.1", "2001:db8::1"]),
            ),
            (ips(&["192.0.2.1"]), ips(&[]), ips(&["192.0.2.1"])),
            (ips(&[]), ips(&["2001:db8::1"]), ips(&["2001:db8::1"])),
            (ips(&[]), ips(&[]), NX),
            (NX, NX, NX),
            (NX, ips(&[]), NX),
            (NX, failed(), NX),
            (failed(), NX, NX),
            (ips(&["192.0.2.1"]), failed(), ips(&["192.0.2.1"])),
            (failed(), ips(&["2001:db8::1"]), ips(&["2001:db8::1"])),
            (ips(&[]), failed(), failed()),
            (failed(), failed(), failed()),
        ] {
            let case = format!("{v4:?} + {v6:?}");
            assert_eq!(combine(v4, v6), want, "{case}");
        }
    }
}
