//! fz end to end: the whole system as a user meets it, with the real binaries (`fz-portal`,
//! three `fz-gateway`s, `fz-client`) in network namespaces joined by veth pairs, real servers
//! behind the gateways (an HTTPS server with two virtual hosts, TCP services, dnsmasq as the
//! authoritative DNS server for `company.com`), and real `dig` and `curl` in the client's
//! namespace.
//!
//! - [`world`]: the topology, built once and torn down on drop (also when a scenario fails),
//!   and what the scenarios do in it: edit the policy tree, ask names, fetch pages, read the
//!   gateways' metrics and the portal's records, stop and start processes.
//! - [`servers`]: the servers at the sites, on the harness's tokio runtime.
//! - [`rogue`]: a client that speaks the protocol with a key of its own and sends packets built
//!   by hand through its own tunnel: what an attacker holding a user's token can do.
//! - [`nat`]: NAT routers (easy and hard) between hosts and the wan.
//! - [`relay`]: coturn as the world's TURN relay, and a TURN client that tries credentials on it.
//! - [`replicas`]: three portal replicas on one PostgreSQL, for the scenario of a replica lost.
//! - [`report`]: `target/e2e-report.json` and the summary the scenarios leave.
//! - [`binaries`]: where the binaries under test are, built when missing.
//! - [`local`]: a portal process on loopback, [`chromium`]: a real headless browser driven over
//!   the DevTools protocol, and [`idp`]: a real OpenID Connect provider, for the sign-in tests
//!   (no root needed: `tests/browser.rs`).
//!
//! The scenarios themselves are in `tests/e2e.rs`. Everything here needs root (namespaces,
//! TUN devices, nftables); without it the scenarios skip loudly and leave the marker `.ci/run`
//! fails on.

// A harness: a failure to set up is a failed run, so it panics with the cause.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod binaries;
pub mod chromium;
pub mod idp;
pub mod local;
pub mod nat;
pub mod relay;
pub mod replicas;
pub mod report;
pub mod rogue;
pub mod servers;
pub mod world;
