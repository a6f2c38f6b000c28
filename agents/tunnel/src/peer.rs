//! One WireGuard peer: boringtun's `Tunn` behind our own type, so that nothing outside this
//! module names boringtun, and what boringtun answers becomes plain values the caller acts on.
//!
//! boringtun reads the system clock itself for its WireGuard timers (rekey, keepalive,
//! handshake retries, session expiry); everything else in this crate takes time as an
//! argument. Those timers are the only clock this module does not control, and they never
//! decide who may send what: grants do, on the caller's clock.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet as WireMessage, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_proto::UnixTime;

/// A gateway's or client's own WireGuard key pair.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    public: X25519Public,
}

impl KeyPair {
    pub fn from_secret(secret: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(secret);
        let public = X25519Public::from(&secret);
        KeyPair { secret, public }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

/// Why a datagram was not taken before reaching a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a WireGuard message.
    NotWireGuard,
    /// A handshake whose MAC1 is wrong: the sender does not know our public key.
    BadMac,
    /// A handshake that does not decrypt with our key.
    Undecryptable,
}

/// What the port's gatekeeper says of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screened {
    /// A handshake initiation from this static key.
    Initiation {
        initiator: [u8; 32],
    },
    /// A message for the peer with this index.
    ForPeer(u32),
    /// Under load: send the cookie reply written to the first `n` bytes of the scratch
    /// buffer back, and do nothing else (WireGuard's DoS defence).
    Cookie(usize),
    Rejected(Rejected),
}

/// The checks every datagram passes before a peer sees it: shape, MAC1 and handshake
/// rate limiting (shared by all peers of one key), and the initiator's key.
pub struct Gatekeeper {
    keys: KeyPair,
    limiter: Arc<RateLimiter>,
}

/// Handshakes per second before the gatekeeper asks initiators for cookies. Each handshake
/// passes the limiter twice (here and inside the peer), so this is twice the real budget.
const HANDSHAKES_PER_SECOND: u64 = 2 * 1000;

impl Gatekeeper {
    pub fn new(keys: KeyPair) -> Gatekeeper {
        let limiter = Arc::new(RateLimiter::new(&keys.public, HANDSHAKES_PER_SECOND));
        Gatekeeper { keys, limiter }
    }

    pub fn keys(&self) -> &KeyPair {
        &self.keys
    }

    /// Resets the handshake count; call about once a second.
    pub fn reset_rate(&self) {
        self.limiter.reset_count();
    }

    /// Screens a datagram from `from`. `scratch` holds a cookie reply if one is due.
    pub fn screen(&self, from: IpAddr, datagram: &[u8], scratch: &mut [u8]) -> Screened {
        let Ok(message) = Tunn::parse_incoming_packet(datagram) else {
            return Screened::Rejected(Rejected::NotWireGuard);
        };
        match message {
            WireMessage::HandshakeInit(_) => {}
            WireMessage::HandshakeResponse(r) => return Screened::ForPeer(r.receiver_idx >> 8),
            WireMessage::PacketCookieReply(c) => return Screened::ForPeer(c.receiver_idx >> 8),
            WireMessage::PacketData(d) => return Screened::ForPeer(d.receiver_idx >> 8),
        }
        match self.limiter.verify_packet(Some(from), datagram, scratch) {
            Ok(WireMessage::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.keys.secret, &self.keys.public, &init) {
                    Ok(half) => Screened::Initiation {
                        initiator: half.peer_static_public,
                    },
                    Err(_) => Screened::Rejected(Rejected::Undecryptable),
                }
            }
            Ok(_) => Screened::Rejected(Rejected::NotWireGuard),
            Err(TunnResult::WriteToNetwork(cookie)) => Screened::Cookie(cookie.len()),
            Err(_) => Screened::Rejected(Rejected::BadMac),
        }
    }
}

impl fmt::Debug for Gatekeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gatekeeper")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// What a peer made of a datagram or a packet. Slices point into the caller's buffer.
#[derive(Debug)]
pub enum Action<'a> {
    /// Nothing to do (a keepalive, a cookie taken in).
    Nothing,
    /// Send this datagram to the peer's endpoint.
    Send(&'a [u8]),
    /// This IP packet came out of the tunnel.
    Received(&'a mut [u8]),
    /// WireGuard refused it.
    Refused,
}

/// The first byte of a WireGuard handshake initiation (message type 1).
const HANDSHAKE_INITIATION: u8 = 1;

/// Whether a datagram boringtun wrote is a cookie reply (WireGuard message type 3): what the
/// gatekeeper, or a peer's own pass through the shared rate limiter, answers a handshake
/// instead of a handshake response when the port is under load.
pub(crate) fn is_cookie_reply(datagram: &[u8]) -> bool {
    datagram.get(..4) == Some(&[3, 0, 0, 0][..])
}

/// One WireGuard peer.
///
/// boringtun's `Tunn` keeps its eight session slots inline, each with a replay window: about
/// 11 KiB whether a session is up or not. A gateway holds a peer for every client with a
/// grant, most of them idle, so the `Tunn` is made when the first datagram or packet needs it
/// and dropped once its sessions have expired for good (WireGuard's 540 s without a
/// handshake); an idle peer then costs what its grants cost. Nothing is lost with it: a
/// session that expired must be made anew by a handshake anyway.
pub struct Peer {
    tunnel: Option<Box<Tunn>>,
    /// What the `Tunn` is made from.
    secret: StaticSecret,
    remote: X25519Public,
    preshared_key: [u8; 32],
    index: u32,
    limiter: Arc<RateLimiter>,
    /// Where the peer last sent an authenticated message from (WireGuard roaming).
    endpoint: Option<SocketAddr>,
    /// Whether queued packets wait to go out since a handshake completed.
    queued: bool,
}

impl Peer {
    /// A peer that speaks to `remote` with `preshared_key`; `index` (24 bits) names its
    /// sessions in data messages.
    pub fn new(
        gatekeeper: &Gatekeeper,
        remote: [u8; 32],
        preshared_key: [u8; 32],
        index: u32,
    ) -> Peer {
        Peer {
            tunnel: None,
            secret: gatekeeper.keys.secret.clone(),
            remote: X25519Public::from(remote),
            preshared_key,
            index,
            limiter: gatekeeper.limiter.clone(),
            endpoint: None,
            queued: false,
        }
    }

    /// The `Tunn`, made now if there is none.
    fn tunnel(&mut self) -> &mut Tunn {
        let Peer {
            tunnel,
            secret,
            remote,
            preshared_key,
            index,
            limiter,
            ..
        } = self;
        tunnel.get_or_insert_with(|| {
            Box::new(Tunn::new(
                secret.clone(),
                *remote,
                Some(*preshared_key),
                None,
                *index,
                Some(limiter.clone()),
            ))
        })
    }

    /// Whether the peer holds WireGuard state now (a session, or a handshake under way).
    pub fn is_active(&self) -> bool {
        self.tunnel.is_some()
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// Takes a datagram the gatekeeper let through.
    pub fn decapsulate<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        buffer: &'a mut [u8],
    ) -> Action<'a> {
        // Only a handshake initiation may start WireGuard state; anything else for a peer
        // without it belongs to no session (and would otherwise make one anyone can fill).
        if self.tunnel.is_none() && datagram.first() != Some(&HANDSHAKE_INITIATION) {
            return Action::Refused;
        }
        let result = self.tunnel().decapsulate(Some(from.ip()), datagram, buffer);
        match result {
            TunnResult::Done => {
                self.endpoint = Some(from);
                Action::Nothing
            }
            TunnResult::WriteToNetwork(bytes) => {
                // A handshake answered or completed: packets queued meanwhile may go now.
                self.endpoint = Some(from);
                self.queued = true;
                Action::Send(bytes)
            }
            TunnResult::WriteToTunnelV4(bytes, _) | TunnResult::WriteToTunnelV6(bytes, _) => {
                self.endpoint = Some(from);
                Action::Received(bytes)
            }
            TunnResult::Err(_) => Action::Refused,
        }
    }

    /// Puts an IP packet into the tunnel. Without a session, boringtun queues the packet and
    /// starts a handshake (a `Send` of the initiation).
    pub fn encapsulate<'a>(&mut self, packet: &[u8], buffer: &'a mut [u8]) -> Action<'a> {
        match self.tunnel().encapsulate(packet, buffer) {
            TunnResult::WriteToNetwork(bytes) => Action::Send(bytes),
            TunnResult::Err(_) => Action::Refused,
            _ => Action::Nothing,
        }
    }

    /// A handshake initiation to send now, unless a session is up: when the path to the
    /// peer changed before the first handshake could get through, the next try need not
    /// wait for WireGuard's retry timer.
    pub fn initiate<'a>(&mut self, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
        let tunnel = self.tunnel();
        if tunnel.time_since_last_handshake().is_some() {
            return None;
        }
        match tunnel.format_handshake_initiation(buffer, true) {
            TunnResult::WriteToNetwork(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The next packet queued while a handshake was under way, sealed, if any.
    pub fn next_queued<'a>(&mut self, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
        if !self.queued {
            return None;
        }
        let tunnel = self.tunnel.as_mut()?;
        match tunnel.decapsulate(None, &[], buffer) {
            TunnResult::WriteToNetwork(bytes) => Some(bytes),
            _ => {
                self.queued = false;
                None
            }
        }
    }

    /// Runs WireGuard's timers: a keepalive or handshake retry to send, if one is due.
    /// A session expired for good is not an error here: the peer stays until its grants end,
    /// without its `Tunn` until it is needed again.
    pub fn update_timers<'a>(&mut self, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
        let tunnel = self.tunnel.as_mut()?;
        match tunnel.update_timers(buffer) {
            TunnResult::WriteToNetwork(bytes) => Some(bytes),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                self.endpoint = None;
                self.tunnel = None;
                None
            }
            _ => None,
        }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A datagram to send that was not the direct answer to an input: the traversal's own type,
/// so that what it sends and what WireGuard sends leave the same way.
pub use fz_traversal::Transmit;

/// Hands out peer indices: 24 bits, since boringtun keeps the low 8 bits of a session index
/// for itself; from a seed, skipping those in use.
#[derive(Debug)]
pub(crate) struct Indices {
    next: u32,
}

const INDEX_MASK: u32 = (1 << 24) - 1;

impl Indices {
    pub(crate) fn new(seed: u32) -> Indices {
        Indices {
            next: seed & INDEX_MASK,
        }
    }

    pub(crate) fn fresh(&mut self, taken: impl Fn(u32) -> bool) -> u32 {
        loop {
            self.next = (self.next + 1) & INDEX_MASK;
            if !taken(self.next) {
                return self.next;
            }
        }
    }
}

/// The caller's clock (`Instant`s handed in), and the wall clock read once against it at
/// start, for grant times.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    started: Instant,
    started_unix_ms: u64,
}

impl Clock {
    pub(crate) fn new(now: Instant, unix_ms: u64) -> Clock {
        Clock {
            started: now,
            started_unix_ms: unix_ms,
        }
    }

    /// Milliseconds since start.
    pub(crate) fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn unix(&self, now: Instant) -> UnixTime {
        self.started_unix_ms.saturating_add(self.millis(now)) / 1000
    }
}

/// Peers that completed a handshake and may hold packets queued while it was under way.
#[derive(Debug, Default)]
pub(crate) struct Flushing(Vec<u32>);

impl Flushing {
    pub(crate) fn mark(&mut self, index: u32) {
        if !self.0.contains(&index) {
            self.0.push(index);
        }
    }

    /// The next queued packet of a marked peer, sealed; `parts` finds a holder's peer and
    /// where to send.
    pub(crate) fn next<T, S: BuildHasher>(
        &mut self,
        holders: &mut HashMap<u32, T, S>,
        parts: fn(&mut T) -> (&mut Peer, Option<SocketAddr>),
    ) -> Option<Transmit> {
        let mut buffer = [0u8; crate::gateway::MAX_DATAGRAM];
        while let Some(index) = self.0.last().copied() {
            let queued = holders.get_mut(&index).and_then(|holder| {
                let (peer, destination) = parts(holder);
                let destination = destination?;
                let bytes = peer.next_queued(&mut buffer)?;
                Some(Transmit {
                    destination,
                    payload: bytes.to_vec(),
                })
            });
            match queued {
                Some(transmit) => return Some(transmit),
                None => {
                    self.0.pop();
                }
            }
        }
        None
    }
}
