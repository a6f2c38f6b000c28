//! The client agent's driver: the thin tokio layer around the client's sans-IO parts, the DNS
//! stub (`fz_dns::Stub`) and the tunnels (`fz_tunnel::client::Client`): its command line
//! ([`config`]), the DNS front ([`dns`]: the sockets on the sentinel addresses, the service
//! that feeds the stub, forwarding to upstreams) and the event loop ([`driver`]); and
//! `fz-client sign-in` ([`sign_in`]), which gets the device its token through the browser, the
//! result coming back to a loopback listener or as a deep link ([`deep_link`]), and keeps it
//! in the desktop keyring or a private file ([`token_store`]).
//!
//! It deliberately holds no protocol logic: what a name maps to and what a packet may do are
//! decided in `fz-dns` and `fz-tunnel`.

pub mod config;
pub mod deep_link;
pub mod dns;
pub mod driver;
pub mod sign_in;
pub mod token_store;
