//! The gateway agent's driver: the thin tokio layer around the gateway's sans-IO core
//! (`fz_tunnel::gateway::Gateway`). It reads its command line ([`config`]), runs one event loop
//! over the UDP socket, the TUN device, the portal link and the resolver ([`driver`]), and
//! serves Prometheus metrics ([`metrics`]). The host's side (TUN, nftables, resolver) is
//! `fz-host`'s; the portal link is `fz-link`'s.
//!
//! It deliberately holds no protocol logic: no WireGuard, no grant checks, no packet filter and
//! no NAT of mapped addresses. Those live in `fz-tunnel`, where they are tested without IO.

pub mod config;
pub mod driver;
pub mod metrics;
