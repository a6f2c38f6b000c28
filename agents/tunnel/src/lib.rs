//! The agents' data plane, without IO: what a gateway (and later the client) does to each IP
//! packet. So far: reading the headers a filter needs ([`packet`]) and the per-grant filter
//! ([`filter`]) that decides whether a packet from a client's tunnel may go on, and the NAT
//! ([`nat`]) from a DNS resource's mapped addresses to what its name resolved to. WireGuard
//! peers over boringtun come next, in this crate.
//!
//! No sockets, no clock, no threads: drivers hand in bytes and time and act on what comes
//! back, so every decision here is testable with plain values.
//!
//! **Invariant:** default deny. A packet passes only when it parses, comes from the grant's
//! client tunnel address, goes to an address the grant names, and its protocol and port are
//! inside the grant's filter; every other packet is dropped with a [`filter::Drop`] reason
//! that the driver counts.

pub mod filter;
pub mod gateway;
pub mod nat;
pub mod packet;
pub mod peer;

pub use filter::Drop;
