//! The names a gateway resolves for DNS grants: which are being resolved and for which grants,
//! what was found (a bounded cache), and how many resolutions one client and everyone may have
//! in flight. Part of the gateway's core ([`crate::gateway::Gateway`] drives it): no IO, and
//! time comes in as `now`.
//!
//! A DNS grant is acknowledged only once its name resolved, and the name is the client's
//! choice (any name under a wildcard the policy opens). So a name that resolves slowly, or
//! never, must cost only the request that asked for it: a resolution that has not answered by
//! [`RESOLVE_DEADLINE`] fails, and its grants are refused with that reason, well inside the
//! portal's acknowledgement timeout, so the portal never takes a live gateway for a dead one.
//! What a name resolved to is remembered ([`Found`], for its TTL up to [`MAX_TTL`]; no such
//! name and failures briefly), so asking again costs no lookup; a client may have at most
//! [`MAX_RESOLVING_PER_CLIENT`] resolutions of its own in flight, and the gateway at most
//! [`MAX_RESOLVING`], so no client can keep the resolver busy for everyone.
//!
//! INVARIANT: every resolution in flight ends by its deadline: its grants are answered
//! (installed or refused), and a late answer changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use fz_proto::{DEFAULT_ACK_TIMEOUT_MS, SignedGrant};

/// How long a resolution may take before its grants are refused. The driver's resolver gives
/// up before (`fz_host::resolve::LOOKUP_BUDGET`, 2.5 s), so this is the bound that holds
/// whatever the driver does; it leaves the portal's default acknowledgement timeout (5 s) two
/// seconds for the answer to travel and the grant to be installed.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(3);

// The refusal reaches the portal before it gives up on the grant, with time to spare.
const _: () = assert!(RESOLVE_DEADLINE.as_millis() + 1_000 < DEFAULT_ACK_TIMEOUT_MS as u128);

/// Resolutions in flight at once, for all clients: past it, a grant whose name must be
/// resolved is refused at once. Each costs a task and a few queries in the driver.
pub const MAX_RESOLVING: usize = 256;

/// Resolutions one client may have started and not seen answered. A page that names a
/// handful of hosts under a wildcard fits; one client asking for names that never resolve
/// holds at most this share of [`MAX_RESOLVING`] (joining a resolution already in flight, or
/// a name already known, costs nothing).
pub const MAX_RESOLVING_PER_CLIENT: usize = 8;

/// Names remembered at once. When full, the answer that expires soonest makes room (failures
/// and missing names before addresses, as they are kept the shortest).
pub const MAX_CACHED: usize = 4_096;

/// The longest an answer with addresses is remembered, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(300);

/// How long "no such name" is remembered (the resolver gives no negative TTL here).
pub const NO_SUCH_NAME_TTL: Duration = Duration::from_secs(10);

/// How long a failed resolution (no answer in time, SERVFAIL) is remembered: a name under a
/// lame delegation is not tried again for every request that names it.
pub const FAILURE_TTL: Duration = Duration::from_secs(5);

/// Addresses kept of each family for a name: the NAT takes turns among them, and a
/// remembered answer stays small however many records the name has.
pub const MAX_ADDRESSES_PER_FAMILY: usize = 16;

/// What the gateway's resolver found for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The name's addresses (possibly none of a family), and how long the answer holds.
    Addresses {
        addresses: Vec<IpAddr>,
        ttl: Duration,
    },
    NoSuchName,
    /// The resolver failed (timeout, server failure): the grants waiting for it are refused.
    Failed(String),
}

/// What a grant waiting for a name is settled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    Addresses(Vec<IpAddr>),
    NoSuchName,
    Failed(String),
}

/// What to do with a DNS grant whose name was asked for.
#[derive(Debug)]
pub(crate) enum Asked {
    /// The name's answer is known: settle the grant with it now.
    Known(Box<SignedGrant>, Found),
    /// The name is being resolved already (for this grant or another): the grant waits.
    Waiting,
    /// Resolve the name; the grant waits for the answer.
    Resolve,
    /// Too many resolutions in flight: refuse the grant, for this reason.
    Refused(String),
}

/// Resolutions in flight and names remembered.
#[derive(Debug, Default)]
pub(crate) struct Resolutions {
    in_flight: HashMap<String, InFlight>,
    cache: HashMap<String, Cached>,
    /// The cache by expiry, so that the entry to make room with is found without a scan.
    expiring: BTreeSet<(Instant, String)>,
}

#[derive(Debug)]
struct InFlight {
    /// The client whose grant started it: the resolution counts against it until it ends,
    /// even if that grant is revoked meanwhile (the lookup goes on in the driver).
    client: String,
    deadline: Instant,
    waiting: Vec<SignedGrant>,
}

#[derive(Debug)]
struct Cached {
    found: Found,
    until: Instant,
}

/// The form a name is resolved and remembered in: lower case, without the final dot, so that
/// spellings of one name share one resolution and one answer.
pub fn key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl Resolutions {
    /// A verified DNS grant for `name` (a [`key`]).
    pub(crate) fn ask(&mut self, name: &str, signed: SignedGrant, now: Instant) -> Asked {
        if let Some(found) = self.known(name, now) {
            return Asked::Known(Box::new(signed), found);
        }
        if let Some(flight) = self.in_flight.get_mut(name) {
            if !flight.waiting.iter().any(|g| g.grant.id == signed.grant.id) {
                flight.waiting.push(signed);
            }
            return Asked::Waiting;
        }
        if self.in_flight.len() >= MAX_RESOLVING {
            return Asked::Refused(format!(
                "the gateway is resolving {MAX_RESOLVING} names already; ask again shortly"
            ));
        }
        let client = &signed.grant.client.id;
        let own = self
            .in_flight
            .values()
            .filter(|f| f.client == *client)
            .count();
        if own >= MAX_RESOLVING_PER_CLIENT {
            return Asked::Refused(format!(
                "this client has {MAX_RESOLVING_PER_CLIENT} names resolving already; ask again once they are answered"
            ));
        }
        self.in_flight.insert(
            name.to_owned(),
            InFlight {
                client: client.clone(),
                deadline: now + RESOLVE_DEADLINE,
                waiting: vec![signed],
            },
        );
        Asked::Resolve
    }

    /// The resolver's answer for `name`: remembered, and returned with the grants that
    /// waited for it. An answer for a name not in flight (late, or never asked for) changes
    /// nothing.
    pub(crate) fn answered(
        &mut self,
        name: &str,
        answer: Resolved,
        now: Instant,
    ) -> Option<(Found, Vec<SignedGrant>)> {
        let flight = self.in_flight.remove(name)?;
        let (found, ttl) = match answer {
            Resolved::Addresses { addresses, ttl } => {
                (Found::Addresses(bounded(addresses)), ttl.min(MAX_TTL))
            }
            Resolved::NoSuchName => (Found::NoSuchName, NO_SUCH_NAME_TTL),
            Resolved::Failed(error) => (Found::Failed(error), FAILURE_TTL),
        };
        self.remember(name, found.clone(), ttl, now);
        Some((found, flight.waiting))
    }

    /// Resolutions past their deadline, each with the failure it ends with (remembered like
    /// any other) and the grants that waited.
    pub(crate) fn overdue(&mut self, now: Instant) -> Vec<(String, Found, Vec<SignedGrant>)> {
        let names: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now >= f.deadline)
            .map(|(name, _)| name.clone())
            .collect();
        let failed = Found::Failed(format!("no answer within {} s", RESOLVE_DEADLINE.as_secs()));
        let mut overdue = Vec::with_capacity(names.len());
        for name in names {
            if let Some(flight) = self.in_flight.remove(&name) {
                self.remember(&name, failed.clone(), FAILURE_TTL, now);
                overdue.push((name, failed.clone(), flight.waiting));
            }
        }
        overdue
    }

    /// The earliest deadline of a resolution in flight.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.in_flight.values().map(|f| f.deadline).min()
    }

    /// Keeps only the waiting grants `keep` says still count. Resolutions stay in flight
    /// without grants: the lookup goes on, its answer is still worth remembering, and it
    /// still counts against the client that started it.
    pub(crate) fn retain_waiting(&mut self, keep: impl Fn(&SignedGrant) -> bool) {
        for flight in self.in_flight.values_mut() {
            flight.waiting.retain(&keep);
        }
    }

    /// Resolutions in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Names remembered (some perhaps expired, until room is needed).
    pub(crate) fn cached(&self) -> usize {
        self.cache.len()
    }

    /// What is known of `name` at `now`; an expired answer is forgotten.
    fn known(&mut self, name: &str, now: Instant) -> Option<Found> {
        let cached = self.cache.get(name)?;
        if now < cached.until {
            return Some(cached.found.clone());
        }
        self.forget(name);
        None
    }

    fn remember(&mut self, name: &str, found: Found, ttl: Duration, now: Instant) {
        self.forget(name);
        if ttl.is_zero() {
            return;
        }
        // Room: first what has expired, then what expires soonest.
        while let Some((until, _)) = self.expiring.first()
            && (*until <= now || self.cache.len() >= MAX_CACHED)
        {
            if let Some((_, oldest)) = self.expiring.pop_first() {
                self.cache.remove(&oldest);
            }
        }
        let until = now + ttl;
        self.expiring.insert((until, name.to_owned()));
        self.cache.insert(name.to_owned(), Cached { found, until });
    }

    fn forget(&mut self, name: &str) {
        if let Some(cached) = self.cache.remove(name) {
            self.expiring.remove(&(cached.until, name.to_owned()));
        }
    }
}

/// At most [`MAX_ADDRESSES_PER_FAMILY`] addresses of each family, in the order given.
fn bounded(addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    let (mut v4, mut v6) = (0, 0);
    addresses
        .into_iter()
        .filter(|ip| {
            let count = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            *count += 1;
            *count <= MAX_ADDRESSES_PER_FAMILY
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_keyed_in_one_spelling() {
        for (name, want) in [
            ("GitLab.Company.com.", "gitlab.company.com"),
            ("gitlab.company.com", "gitlab.company.com"),
            (".", ""),
        ] {
            assert_eq!(key(name), want, "{name}");
        }
    }

    #[test]
    fn each_family_keeps_its_first_addresses() {
        let many: Vec<IpAddr> = (0..40u8)
            .map(|i| IpAddr::from([10, 0, 0, i]))
            .chain((0..3u16).map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i])))
            .collect();
        let kept = bounded(many.clone());
        assert_eq!(kept.len(), MAX_ADDRESSES_PER_FAMILY + 3);
        assert_eq!(
            kept[..MAX_ADDRESSES_PER_FAMILY],
            many[..MAX_ADDRESSES_PER_FAMILY]
        );
        assert_eq!(kept[MAX_ADDRESSES_PER_FAMILY..], many[40..]);
    }

    #[test]
    fn the_cache_stays_bounded_and_makes_room_with_what_expires_soonest() {
        let mut resolutions = Resolutions::default();
        let now = Instant::now();
        resolutions.remember(
            "long.example",
            Found::Addresses(vec![IpAddr::from([10, 0, 0, 1])]),
            MAX_TTL,
            now,
        );
        for i in 0..MAX_CACHED + 10 {
            resolutions.remember(
                &format!("n{i}.example"),
                Found::Failed("x".into()),
                FAILURE_TTL + Duration::from_millis(i as u64),
                now,
            );
        }
        assert_eq!(resolutions.cached(), MAX_CACHED);
        assert_eq!(resolutions.expiring.len(), MAX_CACHED);
        assert!(resolutions.known("long.example", now).is_some());
        assert!(resolutions.known("n0.example", now).is_none());
        let last = format!("n{}.example", MAX_CACHED + 9);
        assert!(resolutions.known(&last, now).is_some());
        // Expired answers are forgotten.
        assert!(resolutions.known(&last, now + MAX_TTL).is_none());
        assert!(resolutions.known("long.example", now + MAX_TTL).is_none());
        // A TTL of zero is not remembered at all.
        resolutions.remember("zero.example", Found::NoSuchName, Duration::ZERO, now);
        assert!(resolutions.known("zero.example", now).is_none());
    }
}
