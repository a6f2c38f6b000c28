//! The agents' data plane, without IO: the state machines of the gateway ([`gateway`]) and
//! of the client's tunnels ([`client`]), and their parts: reading the headers a filter needs
//! ([`packet`]), the per-grant filter ([`filter`]) and a client's grants filed by destination
//! (`grants`, so the gateway's per-packet cost does not grow with them), the NAT from a DNS
//! resource's mapped addresses to what its name resolved to ([`nat`]), the names the gateway
//! resolves for DNS grants, with their deadline, cache and bounds ([`resolution`]), WireGuard
//! peers over boringtun
//! ([`peer`], the only module that names boringtun), and the ICMP error a client writes back
//! when policy refuses a packet ([`icmp`]).
//!
//! No sockets, no threads, and no clock of its own: drivers hand in bytes and time and act on
//! what comes back, so every decision here is testable with plain values (boringtun keeps
//! its own clock for WireGuard's timers; see [`peer`]).
//!
//! **Invariant:** default deny. A packet passes only when it parses, comes from the grant's
//! client tunnel address, goes to an address the grant names, and its protocol and port are
//! inside the grant's filter; every other packet is dropped with a [`filter::Drop`] reason
//! that the driver counts.

pub mod client;
pub mod filter;
pub mod gateway;
mod grants;
pub mod ice;
pub mod icmp;
pub mod nat;
pub mod packet;
pub mod peer;
pub mod resolution;

pub use filter::Drop;

use std::borrow::Cow;
use std::net::SocketAddr;

/// What a core gives back for one datagram or packet: at most one thing for the driver to
/// write, in the driver's buffer where it can be.
#[derive(Debug)]
pub enum Output<'a> {
    /// Write this IP packet to the TUN device.
    Tun(&'a [u8]),
    /// Send this datagram from the WireGuard port: the caller's buffer, or (through a relay)
    /// the datagram wrapped for it.
    Network(SocketAddr, Cow<'a, [u8]>),
}

impl Output<'_> {
    /// A datagram the core queued, as an output to route.
    pub(crate) fn queued(transmit: peer::Transmit) -> Output<'static> {
        Output::Network(transmit.destination, Cow::Owned(transmit.payload))
    }

    /// The datagram to queue again once routed; `None` for a packet.
    pub(crate) fn into_transmit(self) -> Option<peer::Transmit> {
        match self {
            Output::Network(destination, payload) => Some(peer::Transmit {
                destination,
                payload: payload.into_owned(),
            }),
            Output::Tun(_) => None,
        }
    }
}
