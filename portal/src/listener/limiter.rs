//! How many connections the portal holds, without IO: [`Limiter`] counts connections that have
//! not said `hello` as an agent yet (per source and in total) and agents' connections, and
//! decides which new connection is admitted, which is refused and which idle one is closed to
//! make room. [`Caps::for_descriptors`] sizes the caps from the open files limit.
//!
//! A connection is *unauthenticated* from accept until its agent's `hello` (its token was
//! checked at the upgrade, before that); plain HTTP requests (`/healthz`) stay unauthenticated.
//! It is *idle* while no request of it is in flight: before its first request head is complete,
//! between keep-alive requests, during a TLS handshake. Idle unauthenticated connections are
//! what a flood is made of, and what [`Limiter::open`] closes, oldest first, when the
//! unauthenticated cap is reached (as nginx drains idle keep-alive connections when it runs out
//! of connections): a newcomer always gets in while some connection holds a place doing nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};

use crate::config::ConnectionLimits;

/// Part of the open files limit kept for the process itself (the store and its WAL, policy
/// files, watchers, the listener, logs): an eighth, and at least this many.
pub const PROCESS_RESERVE_MIN: u64 = 64;

/// The default unauthenticated cap is a quarter of all connections, at most this many: each
/// holds a task and its buffers for up to `hello_timeout`, and more than this many connections
/// in a handshake at once is an attack, not a reconnection storm.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 4096;

/// The default per-source cap is a quarter of the unauthenticated cap, at most this many: the
/// handshakes in flight at once behind one NAT address. Past it the agents back off and retry.
pub const DEFAULT_MAX_PER_SOURCE: usize = 64;

/// How many connections of each kind may be open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Connections that have not said `hello` as an agent, from all sources together.
    pub unauthenticated: usize,
    /// Connections that have not said `hello`, from one [`Source`].
    pub per_source: usize,
    /// Agents' connections after `hello`.
    pub agents: usize,
}

impl Caps {
    /// Every connection the portal may hold at once.
    pub fn total(&self) -> usize {
        self.unauthenticated.saturating_add(self.agents)
    }

    /// The caps for a process that may hold `limit` open files: the configured ones where given,
    /// lowered to fit, and otherwise derived from the limit. An eighth of the limit (at least
    /// [`PROCESS_RESERVE_MIN`]) stays with the process; of the rest, a quarter (at most
    /// [`DEFAULT_MAX_UNAUTHENTICATED`]) may be unauthenticated and the remainder is the agents',
    /// so a flood of handshakes never takes the descriptors of connected agents, nor they the
    /// room new agents need to say hello. Returns the caps and what was lowered, for the log.
    pub fn for_descriptors(limit: u64, configured: &ConnectionLimits) -> (Caps, Vec<String>) {
        let reserve = (limit / 8).max(PROCESS_RESERVE_MIN);
        let budget = usize::try_from(limit.saturating_sub(reserve))
            .unwrap_or(usize::MAX)
            .max(2);
        let mut lowered = Vec::new();
        let total = match configured.max_connections {
            Some(total) if total > budget => {
                lowered.push(format!(
                    "`max_connections = {total}` needs more than the open files limit ({limit}) \
                     leaves; using {budget}"
                ));
                budget
            }
            Some(total) => total.max(2),
            None => budget,
        };
        let unauthenticated = match configured.max_unauthenticated_connections {
            Some(unauthenticated) if unauthenticated >= total => {
                let fitted = (total / 4).max(1);
                lowered.push(format!(
                    "`max_unauthenticated_connections = {unauthenticated}` leaves no room for \
                     agents among {total} connections; using {fitted}"
                ));
                fitted
            }
            Some(unauthenticated) => unauthenticated.max(1),
            None => (total / 4).clamp(1, DEFAULT_MAX_UNAUTHENTICATED),
        };
        let per_source = match configured.max_unauthenticated_per_source {
            Some(per_source) if per_source > unauthenticated => {
                lowered.push(format!(
                    "`max_unauthenticated_per_source = {per_source}` is more than the \
                     {unauthenticated} unauthenticated connections allowed; using {unauthenticated}"
                ));
                unauthenticated
            }
            Some(per_source) => per_source.max(1),
            None => (unauthenticated / 4).clamp(1, DEFAULT_MAX_PER_SOURCE),
        };
        let caps = Caps {
            unauthenticated,
            per_source,
            agents: total - unauthenticated,
        };
        (caps, lowered)
    }
}

/// Where a connection comes from, as the per-source cap counts it: an IPv4 address, or the /64
/// of an IPv6 address (one host commonly holds a whole /64). An IPv4-mapped IPv6 address is
/// its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6(Ipv6Addr::from(
                    u128::from(v6) & !(u128::from(u64::MAX)),
                ))),
            },
        }
    }
}

/// One connection's number, in the order they were admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(u64);

/// Why a connection is turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds [`Caps::per_source`] unauthenticated connections.
    PerSource,
    /// [`Caps::unauthenticated`] connections are unauthenticated and none of them is idle.
    Full,
    /// [`Caps::agents`] agents are connected.
    Agents,
    /// It was closed to make room (see [`Limiter::open`]) and holds no place any more.
    Evicted,
}

/// A connection admitted by [`Limiter::open`], and the idle one it displaced, which the
/// caller closes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: ConnectionId,
    pub evict: Option<ConnectionId>,
}

/// What the limiter holds now and what it has refused since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub unauthenticated: usize,
    pub agents: usize,
    pub refused_per_source: u64,
    pub refused_full: u64,
    pub refused_agents: u64,
    pub evicted: u64,
}

/// The connections the portal holds, counted against [`Caps`].
///
/// Inputs: [`open`](Self::open) at accept, [`attribute`](Self::attribute) when a trusted proxy
/// names the client, [`busy`](Self::busy)/[`idle`](Self::idle) around each request,
/// [`authenticate`](Self::authenticate) at the agent's hello, [`close`](Self::close) when the
/// connection ends. Unknown ids are ignored, so a connection evicted meanwhile costs nothing.
///
/// INVARIANT: `unauthenticated <= caps.unauthenticated`, each source's count `<=
/// caps.per_source`, `agents <= caps.agents`, and `idle` holds exactly the unauthenticated
/// connections with no request in flight.
#[derive(Debug)]
pub struct Limiter {
    caps: Caps,
    next: u64,
    connections: HashMap<ConnectionId, Entry>,
    /// Evictable connections, oldest first.
    idle: BTreeSet<ConnectionId>,
    sources: HashMap<Source, usize>,
    stats: Stats,
}

#[derive(Debug)]
struct Entry {
    /// `None` until a connection from a trusted proxy is attributed to its client.
    source: Option<Source>,
    /// Requests in flight (an upgraded connection waiting for its hello counts as one).
    busy: u32,
    authenticated: bool,
}

impl Limiter {
    pub fn new(caps: Caps) -> Limiter {
        Limiter {
            caps,
            next: 0,
            connections: HashMap::new(),
            idle: BTreeSet::new(),
            sources: HashMap::new(),
            stats: Stats::default(),
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A new connection from `source` (`None` for a trusted proxy, which speaks for many
    /// clients: only the total counts until [`attribute`](Self::attribute)). Past the
    /// per-source cap it is refused; past the unauthenticated cap the oldest idle connection
    /// makes room for it, and without one it is refused.
    pub fn open(&mut self, source: Option<Source>) -> Result<Admitted, Refusal> {
        if let Some(source) = source
            && self.sources.get(&source).copied().unwrap_or(0) >= self.caps.per_source
        {
            self.stats.refused_per_source += 1;
            return Err(Refusal::PerSource);
        }
        let mut evict = None;
        if self.stats.unauthenticated >= self.caps.unauthenticated {
            let Some(oldest) = self.idle.first().copied() else {
                self.stats.refused_full += 1;
                return Err(Refusal::Full);
            };
            self.close(oldest);
            self.stats.evicted += 1;
            evict = Some(oldest);
        }
        let id = ConnectionId(self.next);
        self.next += 1;
        self.connections.insert(
            id,
            Entry {
                source,
                busy: 0,
                authenticated: false,
            },
        );
        self.idle.insert(id);
        if let Some(source) = source {
            *self.sources.entry(source).or_insert(0) += 1;
        }
        self.stats.unauthenticated += 1;
        Ok(Admitted { id, evict })
    }

    /// The client a trusted proxy's connection speaks for, once its request says so; counted
    /// against the per-source cap from now on. A connection counted already stays as it is.
    pub fn attribute(&mut self, id: ConnectionId, source: Source) -> Result<(), Refusal> {
        let Some(entry) = self.connections.get_mut(&id) else {
            return Err(Refusal::Evicted);
        };
        if entry.source.is_some() || entry.authenticated {
            return Ok(());
        }
        let count = self.sources.entry(source).or_insert(0);
        if *count >= self.caps.per_source {
            self.stats.refused_per_source += 1;
            return Err(Refusal::PerSource);
        }
        *count += 1;
        entry.source = Some(source);
        Ok(())
    }

    /// A request of the connection is in flight: it is not idle until the matching
    /// [`idle`](Self::idle).
    pub fn busy(&mut self, id: ConnectionId) {
        if let Some(entry) = self.connections.get_mut(&id) {
            entry.busy += 1;
            self.idle.remove(&id);
        }
    }

    pub fn idle(&mut self, id: ConnectionId) {
        if let Some(entry) = self.connections.get_mut(&id) {
            entry.busy = entry.busy.saturating_sub(1);
            if entry.busy == 0 && !entry.authenticated {
                self.idle.insert(id);
            }
        }
    }

    /// The connection's agent said hello: it leaves the unauthenticated counts (its own and
    /// its source's) for the agents', if there is room there.
    pub fn authenticate(&mut self, id: ConnectionId) -> Result<(), Refusal> {
        let Some(entry) = self.connections.get_mut(&id) else {
            return Err(Refusal::Evicted);
        };
        if entry.authenticated {
            return Ok(());
        }
        if self.stats.agents >= self.caps.agents {
            self.stats.refused_agents += 1;
            return Err(Refusal::Agents);
        }
        entry.authenticated = true;
        let source = entry.source.take();
        self.idle.remove(&id);
        self.release_source(source);
        self.stats.unauthenticated -= 1;
        self.stats.agents += 1;
        Ok(())
    }

    /// The connection is gone; whatever it held is free.
    pub fn close(&mut self, id: ConnectionId) {
        let Some(entry) = self.connections.remove(&id) else {
            return;
        };
        if entry.authenticated {
            self.stats.agents -= 1;
        } else {
            self.idle.remove(&id);
            self.release_source(entry.source);
            self.stats.unauthenticated -= 1;
        }
    }

    fn release_source(&mut self, source: Option<Source>) {
        let Some(source) = source else {
            return;
        };
        if let Some(count) = self.sources.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.sources.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script`, one step a line (`STEP => EXPECTED`), against a limiter with `caps`
    /// (unauthenticated, per source, agents), and checks each step's outcome and the
    /// invariants after it. Connections are named by their admission number; sources by an
    /// address, or `proxy` for a trusted proxy's connection.
    ///
    /// Steps: `open SOURCE` (`admit N`, `admit N evict M`, `refuse per-source`, `refuse
    /// full`), `attribute N SOURCE`, `busy N`, `idle N`, `hello N` (`ok`, `refuse agents`,
    /// `refuse evicted`), `close N`, `stats` (`U unauthenticated, A agents`).
    fn check(caps: (usize, usize, usize), script: &str) {
        let (unauthenticated, per_source, agents) = caps;
        let mut limiter = Limiter::new(Caps {
            unauthenticated,
            per_source,
            agents,
        });
        let source = |text: &str| match text {
            "proxy" => None,
            ip => Some(Source::of(ip.parse().expect("an address"))),
        };
        let id = |text: &str| ConnectionId(text.parse().expect("a connection number"));
        let outcome = |result: Result<(), Refusal>| match result {
            Ok(()) => "ok".to_owned(),
            Err(refusal) => refused(refusal),
        };
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (step, expected) = line.split_once(" => ").expect("`STEP => EXPECTED`");
            let words: Vec<&str> = step.split_whitespace().collect();
            let got = match words.as_slice() {
                ["open", from] => match limiter.open(source(from)) {
                    Ok(Admitted { id, evict: None }) => format!("admit {}", id.0),
                    Ok(Admitted {
                        id,
                        evict: Some(old),
                    }) => format!("admit {} evict {}", id.0, old.0),
                    Err(refusal) => refused(refusal),
                },
                ["attribute", n, from] => outcome(
                    limiter.attribute(id(n), source(from).expect("an address to attribute")),
                ),
                ["busy", n] => {
                    limiter.busy(id(n));
                    "ok".to_owned()
                }
                ["idle", n] => {
                    limiter.idle(id(n));
                    "ok".to_owned()
                }
                ["hello", n] => outcome(limiter.authenticate(id(n))),
                ["close", n] => {
                    limiter.close(id(n));
                    "ok".to_owned()
                }
                ["stats"] => {
                    let stats = limiter.stats();
                    format!(
                        "{} unauthenticated, {} agents",
                        stats.unauthenticated, stats.agents
                    )
                }
                _ => panic!("unknown step `{step}`"),
            };
            assert_eq!(got, expected, "step `{step}`");
            invariants(&limiter);
        }
    }

    fn refused(refusal: Refusal) -> String {
        let reason = match refusal {
            Refusal::PerSource => "per-source",
            Refusal::Full => "full",
            Refusal::Agents => "agents",
            Refusal::Evicted => "evicted",
        };
        format!("refuse {reason}")
    }

    fn invariants(limiter: &Limiter) {
        let caps = limiter.caps;
        let stats = limiter.stats;
        let unauthenticated: Vec<_> = limiter
            .connections
            .iter()
            .filter(|(_, e)| !e.authenticated)
            .collect();
        assert_eq!(stats.unauthenticated, unauthenticated.len());
        assert_eq!(
            stats.agents,
            limiter.connections.len() - unauthenticated.len()
        );
        assert!(stats.unauthenticated <= caps.unauthenticated);
        assert!(stats.agents <= caps.agents);
        let idle: BTreeSet<ConnectionId> = unauthenticated
            .iter()
            .filter(|(_, e)| e.busy == 0)
            .map(|(id, _)| **id)
            .collect();
        assert_eq!(limiter.idle, idle);
        let mut sources: HashMap<Source, usize> = HashMap::new();
        for (_, entry) in &unauthenticated {
            if let Some(source) = entry.source {
                *sources.entry(source).or_insert(0) += 1;
            }
        }
        assert_eq!(limiter.sources, sources);
        assert!(sources.values().all(|n| *n <= caps.per_source));
    }

    #[test]
    fn a_source_past_its_cap_is_refused_and_others_get_in() {
        check(
            (10, 2, 10),
            "
            open 192.0.2.1 => admit 0
            open 192.0.2.1 => admit 1
            open 192.0.2.1 => refuse per-source
            open 192.0.2.2 => admit 2
            close 0 => ok
            open 192.0.2.1 => admit 3
            open 192.0.2.1 => refuse per-source
            stats => 3 unauthenticated, 0 agents
            ",
        );
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_64() {
        check(
            (10, 2, 10),
            "
            open 2001:db8:0:1::1 => admit 0
            open 2001:db8:0:1:ffff::2 => admit 1
            open 2001:db8:0:1::3 => refuse per-source
            open 2001:db8:0:2::1 => admit 2
            open ::ffff:192.0.2.1 => admit 3
            open 192.0.2.1 => admit 4
            open 192.0.2.1 => refuse per-source
            ",
        );
    }

    #[test]
    fn when_full_the_oldest_idle_connection_makes_room() {
        check(
            (3, 3, 10),
            "
            open 192.0.2.1 => admit 0
            open 192.0.2.2 => admit 1
            open 192.0.2.3 => admit 2
            open 192.0.2.4 => admit 3 evict 0
            busy 1 => ok
            open 192.0.2.5 => admit 4 evict 2
            busy 3 => ok
            busy 4 => ok
            open 192.0.2.6 => refuse full
            idle 4 => ok
            open 192.0.2.6 => admit 5 evict 4
            close 0 => ok
            stats => 3 unauthenticated, 0 agents
            ",
        );
    }

    #[test]
    fn an_evicted_source_frees_its_share() {
        check(
            (2, 2, 10),
            "
            open 192.0.2.1 => admit 0
            open 192.0.2.1 => admit 1
            open 192.0.2.2 => admit 2 evict 0
            open 192.0.2.1 => admit 3 evict 1
            open 192.0.2.1 => admit 4 evict 2
            open 192.0.2.1 => refuse per-source
            ",
        );
    }

    #[test]
    fn hello_moves_a_connection_to_the_agents_while_they_have_room() {
        check(
            (2, 1, 1),
            "
            open 192.0.2.1 => admit 0
            busy 0 => ok
            hello 0 => ok
            idle 0 => ok
            stats => 0 unauthenticated, 1 agents
            open 192.0.2.1 => admit 1
            open 192.0.2.2 => admit 2
            busy 1 => ok
            hello 1 => refuse agents
            open 192.0.2.3 => admit 3 evict 2
            busy 3 => ok
            open 192.0.2.4 => refuse full
            close 0 => ok
            hello 1 => ok
            hello 1 => ok
            stats => 1 unauthenticated, 1 agents
            hello 2 => refuse evicted
            close 1 => ok
            close 1 => ok
            stats => 1 unauthenticated, 0 agents
            ",
        );
    }

    #[test]
    fn a_proxy_connection_counts_for_its_client_once_named() {
        check(
            (4, 1, 4),
            "
            open proxy => admit 0
            open proxy => admit 1
            open proxy => admit 2
            attribute 0 192.0.2.1 => ok
            attribute 0 192.0.2.9 => ok
            attribute 1 192.0.2.1 => refuse per-source
            attribute 2 192.0.2.2 => ok
            open 192.0.2.1 => refuse per-source
            hello 0 => ok
            open 192.0.2.1 => admit 3
            attribute 3 192.0.2.7 => ok
            attribute 9 192.0.2.7 => refuse evicted
            stats => 3 unauthenticated, 1 agents
            ",
        );
    }

    /// (open files limit, configured `max_connections`, `max_unauthenticated_connections`,
    /// `max_unauthenticated_per_source`) → (unauthenticated, per source, agents), lowered.
    #[test]
    fn caps_follow_the_open_files_limit() {
        type Case = (
            (u64, Option<usize>, Option<usize>, Option<usize>),
            (usize, usize, usize),
            usize,
        );
        let cases: [Case; 8] = [
            // 256: 64 kept, 192 left; a quarter unauthenticated, a quarter of that per source.
            ((256, None, None, None), (48, 12, 144), 0),
            ((1024, None, None, None), (224, 56, 672), 0),
            ((524_288, None, None, None), (4096, 64, 454_656), 0),
            ((64, None, None, None), (1, 1, 1), 0),
            ((256, Some(100), None, None), (25, 6, 75), 0),
            ((256, Some(1000), Some(10), Some(20)), (10, 10, 182), 2),
            ((256, None, Some(192), None), (48, 12, 144), 1),
            ((1024, None, Some(500), Some(400)), (500, 400, 396), 0),
        ];
        for ((limit, total, unauthenticated, per_source), expected, lowered) in cases {
            let configured = ConnectionLimits {
                max_connections: total,
                max_unauthenticated_connections: unauthenticated,
                max_unauthenticated_per_source: per_source,
                ..ConnectionLimits::default()
            };
            let (caps, notes) = Caps::for_descriptors(limit, &configured);
            assert_eq!(
                (caps.unauthenticated, caps.per_source, caps.agents),
                expected,
                "limit {limit}, configured {configured:?}"
            );
            assert_eq!(notes.len(), lowered, "{notes:?}");
        }
        // No limit at all (RLIM_INFINITY): the defaults' ceilings still hold.
        let (caps, _) = Caps::for_descriptors(u64::MAX, &ConnectionLimits::default());
        assert_eq!((caps.unauthenticated, caps.per_source), (4096, 64));
    }
}
