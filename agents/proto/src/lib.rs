//! What the fz portal and its agents (client, gateway) say to each other: the versioned
//! control messages they exchange over a WebSocket, and the `Grant` the portal signs for each
//! allowed connection, with the verification every agent runs against the portal key it pins.
//!
//! It does no IO, holds no clock and draws no randomness: time comes in as Unix seconds, keys
//! and preshared keys as bytes the caller generated. Transport, TLS and retries belong to the
//! drivers.
//!
//! Entry points: [`Grant::sign`] and [`SignedGrant::verify`]; [`encode`] and [`decode`] with
//! the message enums [`ClientMessage`], [`PortalToClient`], [`GatewayMessage`],
//! [`PortalToGateway`].

mod grant;
mod key;
mod message;

/// Where the portal sends a finished client sign-in when the client asked for the deep link
/// instead of its loopback listener: the one address both sides must agree on.
pub const SIGN_IN_DEEP_LINK: &str = "fz://handle_client_sign_in_callback";

pub use grant::{
    CLOCK_SKEW, ClientPeer, DnsMapping, GatewayPeer, Grant, GrantError, GrantedResource, Identity,
    SignedGrant, UnixTime, is_mapped_address,
};
pub use key::{KeyError, PortalPublicKey, PortalSigningKey, PresharedKey, PublicKey};
pub use message::{
    ClientMessage, ClientReady, DEFAULT_ACK_TIMEOUT_MS, GatewayMessage, MAX_CANDIDATE_LENGTH,
    MAX_CANDIDATES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, PathKind, PortalToClient, PortalToGateway,
    ProtoError, RESOURCE_PAGE_BYTES, Relay, Resolution, ResourceView, decode, encode,
};
