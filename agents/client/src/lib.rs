//! The client agent's driver: the thin tokio layer around the client's sans-IO parts, the DNS
//! stub (`fz_dns::Stub`) and the tunnels (`fz_tunnel::client::Client`). So far it has the DNS
//! front ([`dns`]): the sockets on the sentinel addresses, the service that feeds the stub,
//! and forwarding to upstreams. The TUN device, the tunnels' event loop and the `fz-client`
//! binary come next.
//!
//! It deliberately holds no protocol logic: what a name maps to and what a packet may do are
//! decided in `fz-dns` and `fz-tunnel`.

pub mod dns;
