//! Name resolution for DNS resources, with the host's own resolver configuration.
//!
//! The gateway resolves a DNS resource's name where the resource lives, with the DNS servers
//! the gateway's host uses (`/etc/resolv.conf`, and `/etc/hosts`), so split-horizon names
//! resolve as they would for any program there. The core asks for a name; the driver calls
//! [`Resolver::resolve`] and hands the answer back as data.
//!
//! A lookup has a budget, [`LOOKUP_BUDGET`], whatever `/etc/resolv.conf` says: each query
//! waits [`QUERY_TIMEOUT`] across the servers and is tried [`QUERY_ATTEMPTS`] times, and the
//! lookup as a whole is cut at the budget. The gateway acknowledges a DNS grant only once its
//! name resolved, so the budget must sit well inside the portal's acknowledgement timeout
//! (`fz_proto::DEFAULT_ACK_TIMEOUT_MS`): a name under a lame delegation then costs its own
//! request a prompt refusal, never the gateway its place in service. The name is resolved as
//! the absolute name it is (no search domains): the policy granted that name, not that name
//! under a search domain, and one name costs one lookup.
//!
//! hickory-resolver does the work and stays behind this module: callers see [`IpAddr`]s and a
//! [`LookupFailure`], never hickory's types. Plain DNS over UDP and TCP only: no DNSSEC, no
//! DNS over TLS or HTTPS, since the host's resolver is what we mean to follow.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use crate::PlatformError;

/// How long one query waits for an answer, across the servers (hickory's `timeout`). A site's
/// resolver answers in milliseconds; one still working on a cold name gets a second try.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How many times a query is sent before the lookup fails (hickory's `attempts` counts the
/// tries after the first).
pub const QUERY_ATTEMPTS: usize = 2;
/// The most a lookup takes: its queries' time and some slack for a round of servers that
/// started just before the timeout. A lookup still going then fails ("no answer within").
pub const LOOKUP_BUDGET: Duration = Duration::from_millis(2_500);

/// What a name resolved to, and for how long the answer holds (the smallest TTL of its
/// records, as the resolver's cache counts it down).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub ips: Vec<IpAddr>,
    pub ttl: Duration,
}

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
    /// Its timings are ours ([`QUERY_TIMEOUT`], [`QUERY_ATTEMPTS`]), not the file's: a
    /// `timeout:30` there must not hold a grant past the portal's patience.
    pub fn from_system_conf() -> Result<Self, PlatformError> {
        let inner = TokioResolver::builder_tokio()
            .and_then(|mut builder| {
                within_budget(builder.options_mut());
                builder.build()
            })
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
        within_budget(&mut options);
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

    /// The IPv4 and IPv6 addresses of `name` (an absolute name, with or without the final
    /// dot): A and AAAA are asked together, IPv4 addresses come first, and a name with only one
    /// family is fine. Each family's lookup is cut at [`LOOKUP_BUDGET`].
    ///
    /// When one family fails (say, its query timed out) but the other answered, the answer is
    /// returned. `NoSuchName` needs both to say so (NXDOMAIN from either is enough, since it is
    /// about the name, not a family); `Failed` when neither answered and either failed.
    pub async fn resolve(&self, name: &str) -> Result<Addresses, LookupFailure> {
        let absolute = if name.ends_with('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        };
        let absolute = absolute.as_str();
        let family = |record_type| async move {
            match tokio::time::timeout(LOOKUP_BUDGET, self.inner.lookup(absolute, record_type))
                .await
            {
                Ok(lookup) => addresses(lookup),
                Err(_) => Err(LookupFailure::Failed(format!(
                    "no answer within {} ms",
                    LOOKUP_BUDGET.as_millis()
                ))),
            }
        };
        let (v4, v6) = tokio::join!(family(RecordType::A), family(RecordType::AAAA));
        let answer = combine(v4, v6);
        match &answer {
            Ok(found) => tracing::debug!(name, count = found.ips.len(), "resolved"),
            Err(failure) => tracing::debug!(name, %failure, "not resolved"),
        }
        answer
    }

    /// How long a lookup may take at most.
    pub fn budget(&self) -> Duration {
        LOOKUP_BUDGET
    }

    /// How long one query waits and how many times it is sent, as configured.
    pub fn query_timings(&self) -> (Duration, usize) {
        let options = self.inner.options();
        (options.timeout, options.attempts.saturating_add(1))
    }
}

/// Our timings over whatever the configuration said.
fn within_budget(options: &mut ResolverOpts) {
    options.timeout = QUERY_TIMEOUT;
    options.attempts = QUERY_ATTEMPTS.saturating_sub(1);
}

/// One family's answer: its addresses and how long they hold, or why there are none.
fn addresses(
    lookup: Result<hickory_resolver::lookup::Lookup, NetError>,
) -> Result<Family, LookupFailure> {
    match lookup {
        // The answer section may also hold the CNAME chain that led here; keep addresses.
        Ok(lookup) => Ok(Family {
            ips: lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect(),
            ttl: lookup
                .valid_until()
                .saturating_duration_since(Instant::now()),
        }),
        Err(error) if error.is_nx_domain() => Err(LookupFailure::NoSuchName),
        // NOERROR with no records of this type: the name exists, this family is just empty.
        Err(error) if error.is_no_records_found() => Ok(Family::default()),
        Err(error) => Err(LookupFailure::Failed(error.to_string())),
    }
}

/// One family's addresses and how long they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Family {
    ips: Vec<IpAddr>,
    ttl: Duration,
}

fn combine(
    v4: Result<Family, LookupFailure>,
    v6: Result<Family, LookupFailure>,
) -> Result<Addresses, LookupFailure> {
    // The answer holds as long as its shortest-lived family with addresses.
    let holding = |families: &[&Family]| {
        families
            .iter()
            .filter(|f| !f.ips.is_empty())
            .map(|f| f.ttl)
            .min()
            .unwrap_or_default()
    };
    match (v4, v6) {
        (Ok(v4), Ok(v6)) => {
            let ttl = holding(&[&v4, &v6]);
            let mut ips = v4.ips;
            ips.extend(v6.ips);
            if ips.is_empty() {
                return Err(LookupFailure::NoSuchName);
            }
            Ok(Addresses { ips, ttl })
        }
        (Ok(found), Err(failure)) | (Err(failure), Ok(found)) => {
            if found.ips.is_empty() {
                return Err(failure);
            }
            Ok(Addresses {
                ttl: found.ttl,
                ips: found.ips,
            })
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

    fn ips(list: &[&str], ttl: u64) -> Result<Family, LookupFailure> {
        Ok(Family {
            ips: list.iter().map(|ip| ip.parse().unwrap()).collect(),
            ttl: Duration::from_secs(ttl),
        })
    }

    fn found(list: &[&str], ttl: u64) -> Result<Addresses, LookupFailure> {
        ips(list, ttl).map(|f| Addresses {
            ips: f.ips,
            ttl: f.ttl,
        })
    }

    fn failed<T>() -> Result<T, LookupFailure> {
        Err(LookupFailure::Failed("request timed out".into()))
    }

    fn nx<T>() -> Result<T, LookupFailure> {
        Err(LookupFailure::NoSuchName)
    }

    #[test]
    fn both_families_combine_into_one_answer() {
        for (v4, v6, want) in [
            (
                ips(&["192.0.2.1"], 60),
                ips(&["2001:db8::1"], 30),
                found(&["192.0.2.1", "2001:db8::1"], 30),
            ),
            // An empty family's TTL (its negative answer's) says nothing of the addresses.
            (
                ips(&["192.0.2.1"], 60),
                ips(&[], 5),
                found(&["192.0.2.1"], 60),
            ),
            (
                ips(&[], 5),
                ips(&["2001:db8::1"], 40),
                found(&["2001:db8::1"], 40),
            ),
            (ips(&[], 5), ips(&[], 5), nx()),
            (nx(), nx(), nx()),
            (nx(), ips(&[], 5), nx()),
            (nx(), failed(), nx()),
            (failed(), nx(), nx()),
            (ips(&["192.0.2.1"], 60), failed(), found(&["192.0.2.1"], 60)),
            (
                failed(),
                ips(&["2001:db8::1"], 60),
                found(&["2001:db8::1"], 60),
            ),
            (ips(&[], 5), failed(), failed()),
            (failed(), failed(), failed()),
        ] {
            let case = format!("{v4:?} + {v6:?}");
            assert_eq!(combine(v4, v6), want, "{case}");
        }
    }

    /// Whatever `/etc/resolv.conf` says, a lookup's queries fit its budget, and the budget
    /// sits well inside the time the portal gives a gateway to answer a grant (the gateway
    /// answers a DNS grant only once its name resolved).
    #[tokio::test]
    async fn lookups_are_bounded_well_inside_the_portals_patience() {
        let ack_timeout = Duration::from_millis(fz_proto::DEFAULT_ACK_TIMEOUT_MS);
        for resolver in [
            Resolver::from_system_conf().unwrap(),
            Resolver::with_nameserver("192.0.2.53:53".parse().unwrap()).unwrap(),
        ] {
            let (timeout, sends) = resolver.query_timings();
            assert_eq!((timeout, sends), (QUERY_TIMEOUT, QUERY_ATTEMPTS));
            let queries = timeout * u32::try_from(sends).unwrap();
            assert!(queries < resolver.budget(), "{queries:?}");
            // At least a second for the answer to reach the portal and the grant to be
            // installed, however slow the name.
            assert!(resolver.budget() + Duration::from_secs(1) < ack_timeout);
        }
    }
}
