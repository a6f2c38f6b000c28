//! One WireGuard peer: boringtun's `Tunn` behind our own type, so that nothing outside this
//! module names boringtun, and what boringtun answers becomes plain values the caller acts on.
//!
//! boringtun reads the system clock itself for its WireGuard timers (rekey, keepalive,
//! handshake retries, session expiry); everything else in this crate takes time as an
//! argument. Those timers are the only clock this module does not control, and they never
//! decide who may send what: grants do, on the caller's clock.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet as WireMessage, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};

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

/// One WireGuard peer.
pub struct Peer {
    tunnel: Tunn,
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
            tunnel: Tunn::new(
                gatekeeper.keys.secret.clone(),
                X25519Public::from(remote),
                Some(preshared_key),
                None,
                index,
                Some(gatekeeper.limiter.clone()),
            ),
            endpoint: None,
            queued: false,
        }
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
        let result = self.tunnel.decapsulate(Some(from.ip()), datagram, buffer);
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
        match self.tunnel.encapsulate(packet, buffer) {
            TunnResult::WriteToNetwork(bytes) => Action::Send(bytes),
            TunnResult::Err(_) => Action::Refused,
            _ => Action::Nothing,
        }
    }

    /// The next packet queued while a handshake was under way, sealed, if any.
    pub fn next_queued<'a>(&mut self, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
        if !self.queued {
            return None;
        }
        match self.tunnel.decapsulate(None, &[], buffer) {
            TunnResult::WriteToNetwork(bytes) => Some(bytes),
            _ => {
                self.queued = false;
                None
            }
        }
    }

    /// Runs WireGuard's timers: a keepalive or handshake retry to send, if one is due.
    /// A session expired for good is not an error here: the peer stays until its grants end.
    pub fn update_timers<'a>(&mut self, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunnel.update_timers(buffer) {
            TunnResult::WriteToNetwork(bytes) => Some(bytes),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                self.endpoint = None;
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
