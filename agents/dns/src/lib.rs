//! The client's DNS stub, without IO: what it answers, what it forwards, and when it asks the
//! portal for access. The driver owns the sockets (UDP and TCP on the sentinel addresses), the
//! upstream exchanges and the portal connection.
//!
//! - The system's resolvers are replaced by sentinel addresses, one pair (IPv4 from
//!   100.100.111.0/24, IPv6 from fd00:2021:1111:8000:100:100:111:0/120) per original upstream.
//! - A query for a name no DNS resource matches is forwarded to its sentinel's upstream
//!   unchanged, and the upstream's answer goes back unchanged (id, flags, truncation).
//! - A name a DNS resource matches (the most specific pattern wins, as `fz-address` decides)
//!   gets mapped addresses ([`mapped`]) and an [`Event::RequestAccess`]; its A and AAAA
//!   queries are answered when the portal answers: the mapped addresses of the families the
//!   gateway found, NXDOMAIN if the name does not exist, an empty answer (and
//!   [`Event::Denied`] for the log) if policy says no. Later queries are answered from memory
//!   with a short TTL. Its other queries (HTTPS, SVCB, MX, ...) get an empty answer and never
//!   leave the machine.
//! - PTR queries for mapped addresses answer the name, queries of other types about them an
//!   empty answer (NXDOMAIN for an address nobody was given); nothing under the mapped ranges
//!   is ever forwarded, whatever its type.
//! - Unreadable queries get FORMERR when they carry an id, and silence otherwise; nothing
//!   panics.
//!
//! hickory-proto reads and writes messages here and appears in no public type.

pub mod mapped;
mod stub;

pub use stub::{
    ASK_TIMEOUT, DENIAL_MEMORY, Event, Handled, MAX_UPSTREAMS, MAX_WAITING, QueryId, Sentinel,
    Stub, TTL_SECS,
};
