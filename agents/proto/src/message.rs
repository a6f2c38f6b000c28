//! Control messages over the WebSocket between the portal and each agent: JSON objects with
//! a protocol version `v` and a `type`, at most [`MAX_MESSAGE_BYTES`] long.
//!
//! Decoding checks the size first, then the version, then the shape, so an oversized or
//! newer-version message gets its own clear error instead of a parse failure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::grant::{DnsMapping, SignedGrant, UnixTime};
use crate::key::PublicKey;

/// The protocol version this build speaks. Peers refuse messages of a newer version, so the
/// portal and its agents are upgraded together: an agent of an older version refuses the
/// portal's messages (it gets no `ready`, so no grants: it fails closed) rather than miss
/// some of them.
///
/// Version 2 added [`PortalToGateway::RevokeMany`]; version 3 the relays
/// ([`PortalToClient::Relays`], [`PortalToGateway::Relays`]) and ICE candidates (`candidates`
/// both ways, forwarded by the portal between a client and a gateway while a grant between
/// them is in force); version 4 the gateway's [`GatewayMessage::Path`] of each client;
/// version 5 a client's `ready` in pages ([`ClientReady::more`], [`PortalToClient::Resources`]).
pub const PROTOCOL_VERSION: u32 = 5;

/// How long the portal waits for a gateway's answer to a grant (`ack` or `refused`) unless
/// its configuration says otherwise. A gateway answers well inside it, also when a DNS
/// resource's name does not resolve: its resolver's budget is smaller (`fz_tunnel::gateway`).
/// A gateway that misses it fails that request only; it leaves service only when it misses
/// its heartbeats or its connection closes.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 5_000;

/// The most ICE candidates one `candidates` message carries, and the longest candidate line:
/// an agent has a host, a server-reflexive and a relayed candidate per relay and family.
pub const MAX_CANDIDATES: usize = 16;
pub const MAX_CANDIDATE_LENGTH: usize = 256;

/// The largest message either side accepts. A grant is well under 2 KiB; the largest message
/// is the client's resource list.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Client to portal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message: the device's WireGuard key and its candidate endpoints.
    Hello {
        public_key: PublicKey,
        endpoints: Vec<SocketAddr>,
    },
    /// Asks for a grant to a resource, by id; for a DNS resource, with the name the client
    /// resolved and the mapped addresses its DNS stub handed out for it; after a failover,
    /// with the gateways to avoid.
    RequestAccess {
        resource: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dns: Option<DnsMapping>,
        /// Gateways the client stopped hearing from, the one left last at the end: the portal
        /// picks another of the site (or, when they are all the site has, one of the older).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        avoid: Vec<String>,
    },
    /// ICE candidates of this client for a gateway it holds a grant through (at most
    /// [`MAX_CANDIDATES`] lines of at most [`MAX_CANDIDATE_LENGTH`] characters).
    Candidates {
        gateway_id: String,
        candidates: Vec<String>,
    },
}

/// Portal to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PortalToClient {
    /// Answer to `hello`: who the client is and the resources it may ask for (the first page
    /// of them, when `more` says pages follow).
    Ready(Box<ClientReady>),
    /// The next page of the resources of the `ready` just sent; `more` says whether another
    /// follows. Sent only between a `ready` with `more` and the page without.
    Resources {
        resources: Vec<ResourceView>,
        more: bool,
    },
    Granted {
        grant: Box<SignedGrant>,
        /// For a DNS resource: what the gateway found when it resolved the name, so the
        /// client's DNS stub answers with the families that exist, or NXDOMAIN.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolved: Option<Resolution>,
    },
    /// A request was denied; `reason` says what failed (no rule, which condition).
    Rejected { resource: String, reason: String },
    /// A grant no longer holds (policy change, token revoked, window closed).
    Revoked { grant_id: String, reason: String },
    /// A gateway the client holds grants through lost its connection to the portal. Its
    /// tunnels may still work (only the control connection may have broken), so the client
    /// does not drop it for this alone; it only gives it less time to answer.
    GatewayDown { gateway_id: String },
    /// The relays the client may use from now on, replacing those it was told before: sent
    /// after `ready` and again before the credentials lapse.
    Relays { relays: Vec<Relay> },
    /// ICE candidates of a gateway the client holds a grant through.
    Candidates {
        gateway_id: String,
        candidates: Vec<String>,
    },
    /// A message the portal could not take; the connection stays open.
    Error { message: String },
}

/// A TURN relay an agent may allocate on, with credentials the portal minted for that agent
/// alone in the TURN REST scheme (user name `expiry:agent`, password the base64 of an
/// HMAC-SHA1 of it under the relay's shared secret): the relay checks them without asking
/// anyone, and the agent never holds the secret. They stop working at `expires_at`; the portal
/// sends new ones well before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    pub address: SocketAddr,
    pub username: String,
    pub password: String,
    pub expires_at: UnixTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientReady {
    pub client_id: String,
    pub tunnel_ipv4: Ipv4Addr,
    pub tunnel_ipv6: Ipv6Addr,
    pub resources: Vec<ResourceView>,
    /// More resources follow in `resources` messages. The portal sends a long list in pages
    /// of at most [`RESOURCE_PAGE_BYTES`], because a WebSocket connection keeps a send buffer
    /// the size of the largest frame it ever sent, for as long as it is open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// About the most bytes of resources one page of a `ready` carries (one resource more when a
/// single one is larger).
pub const RESOURCE_PAGE_BYTES: usize = 2048;

impl ClientReady {
    /// The messages that say `self`: a `ready` with as many resources as fit in
    /// [`RESOURCE_PAGE_BYTES`], then `resources` pages, each `more` but the last.
    pub fn into_pages(mut self) -> Vec<PortalToClient> {
        let resources = std::mem::take(&mut self.resources);
        let mut pages: Vec<Vec<ResourceView>> = Vec::new();
        let mut bytes = 0;
        for resource in resources {
            // The JSON of one resource: its two strings and about 30 bytes around them.
            let size = resource.id.len() + resource.address.len() + 30;
            match pages.last_mut() {
                Some(page) if bytes + size <= RESOURCE_PAGE_BYTES => {
                    bytes += size;
                    page.push(resource);
                }
                _ => {
                    bytes = size;
                    pages.push(vec![resource]);
                }
            }
        }
        let count = pages.len();
        let mut pages = pages.into_iter();
        self.resources = pages.next().unwrap_or_default();
        self.more = count > 1;
        let mut messages = vec![PortalToClient::Ready(Box::new(self))];
        messages.extend(
            pages
                .enumerate()
                .map(|(i, resources)| PortalToClient::Resources {
                    resources,
                    more: i + 2 < count,
                }),
        );
        messages
    }

    /// Takes `message`, the next page of this `ready`, while [`ClientReady::more`] says one is
    /// to come; gives it back when it is not a page.
    pub fn take_page(&mut self, message: PortalToClient) -> Result<(), PortalToClient> {
        match message {
            PortalToClient::Resources { resources, more } if self.more => {
                self.resources.extend(resources);
                self.more = more;
                Ok(())
            }
            other => Err(other),
        }
    }
}

/// What a client knows of a resource before it asks for it: enough for its DNS stub and its
/// routes to send the first packet's way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceView {
    pub id: String,
    pub address: String,
}

/// What a gateway found when it resolved a DNS resource's name with its own resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Resolution {
    /// The name exists; which families it has addresses of (possibly neither: NOERROR with
    /// no records).
    Exists { ipv4: bool, ipv6: bool },
    /// NXDOMAIN.
    NoSuchName,
}

/// Gateway to portal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GatewayMessage {
    Hello {
        public_key: PublicKey,
        endpoints: Vec<SocketAddr>,
    },
    Heartbeat,
    /// The gateway verified and installed a grant; for a DNS resource, with what its name
    /// resolved to.
    Ack {
        grant_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolved: Option<Resolution>,
    },
    /// The gateway refused a grant, and why.
    Refused {
        grant_id: String,
        reason: String,
    },
    /// ICE candidates of this gateway for a client it holds a grant of (bounded as the
    /// client's).
    Candidates {
        client_id: String,
        candidates: Vec<String>,
    },
    /// How a client's datagrams reach this gateway now (said each time ICE picks a path):
    /// the portal's flow log records it on the pair's grants.
    Path {
        client_id: String,
        path: PathKind,
        /// The relay the path goes through, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay: Option<IpAddr>,
    },
}

/// Whether a connection goes from one agent's socket to the other's, or through a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    Relayed,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relayed => "relayed",
        }
    }
}

/// Portal to gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PortalToGateway {
    /// Answer to `hello`: the gateway's id, how often it must heartbeat (three missed
    /// heartbeats and the portal takes it out of service), and the ids of the grants in force
    /// for it. A gateway that comes back drops every grant it holds that is not in `grants`;
    /// the portal sends those that are again after `ready`.
    Ready {
        gateway_id: String,
        heartbeat_interval_ms: u64,
        #[serde(default)]
        grants: Vec<String>,
    },
    Grant {
        grant: Box<SignedGrant>,
    },
    Revoke {
        grant_id: String,
    },
    /// Several grants revoked at once (a policy change, a token revoked, a mass expiry), in
    /// one message instead of one each, so that a mass withdrawal costs a gateway's link a few
    /// messages. The portal sends at most [`PortalToGateway::MAX_REVOKED`] ids in one; the
    /// size limit of every message bounds what a gateway decodes.
    RevokeMany {
        grant_ids: Vec<String>,
    },
    /// The relays the gateway may use from now on, as [`PortalToClient::Relays`].
    Relays {
        relays: Vec<Relay>,
    },
    /// ICE candidates of a client the gateway holds a grant of.
    Candidates {
        client_id: String,
        candidates: Vec<String>,
    },
    Error {
        message: String,
    },
}

impl PortalToGateway {
    /// The most grant ids the portal puts in one [`PortalToGateway::RevokeMany`]. A grant id
    /// is 35 characters (`gr_` and 32 hex digits), so 2,048 of them make about 78 KiB, under a
    /// third of [`MAX_MESSAGE_BYTES`].
    pub const MAX_REVOKED: usize = 2048;
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("the message is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "the message is protocol version {found}; this build speaks version {PROTOCOL_VERSION}"
    )]
    NewerVersion { found: u32 },
    #[error("the message is malformed: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct Outgoing<'a, T> {
    v: u32,
    #[serde(flatten)]
    message: &'a T,
}

#[derive(Deserialize)]
struct Incoming<T> {
    #[serde(rename = "v")]
    _version: u32,
    #[serde(flatten)]
    message: T,
}

#[derive(Deserialize)]
struct Version {
    v: u32,
}

/// The message as sent: JSON with `v` and `type`.
pub fn encode<T: Serialize>(message: &T) -> String {
    // Serialising these types cannot fail: every field is a string, number, list or struct.
    serde_json::to_string(&Outgoing {
        v: PROTOCOL_VERSION,
        message,
    })
    .unwrap_or_default()
}

/// Reads a message: size, then version, then shape.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let version: Version = serde_json::from_slice(bytes)
        .map_err(|e| ProtoError::Malformed(format!("no protocol version `v`: {e}")))?;
    match version.v {
        0 => {
            return Err(ProtoError::Malformed(
                "protocol version 0 does not exist".to_owned(),
            ));
        }
        v if v > PROTOCOL_VERSION => return Err(ProtoError::NewerVersion { found: v }),
        _ => {}
    }
    serde_json::from_slice::<Incoming<T>>(bytes)
        .map(|m| m.message)
        .map_err(|e| ProtoError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let messages = [
            ClientMessage::Hello {
                public_key: PublicKey([1; 32]),
                endpoints: vec!["198.51.100.7:51820".parse().unwrap()],
            },
            ClientMessage::RequestAccess {
                resource: "gitlab".into(),
                dns: None,
                avoid: vec![],
            },
            ClientMessage::RequestAccess {
                resource: "gitlab".into(),
                dns: Some(DnsMapping {
                    name: "gitlab.acme.example".into(),
                    mapped: vec!["100.96.0.1".parse().unwrap()],
                }),
                avoid: vec!["gw-1".into()],
            },
        ];
        for message in messages {
            let text = encode(&message);
            assert!(text.starts_with("{\"v\":5,\"type\":"), "{text}");
            assert_eq!(decode::<ClientMessage>(text.as_bytes()), Ok(message));
        }
        let gateway = [
            GatewayMessage::Heartbeat,
            GatewayMessage::Ack {
                grant_id: "g-1".into(),
                resolved: None,
            },
            GatewayMessage::Ack {
                grant_id: "g-2".into(),
                resolved: Some(Resolution::Exists {
                    ipv4: true,
                    ipv6: false,
                }),
            },
            GatewayMessage::Ack {
                grant_id: "g-3".into(),
                resolved: Some(Resolution::NoSuchName),
            },
        ];
        for message in gateway {
            assert_eq!(
                decode::<GatewayMessage>(encode(&message).as_bytes()),
                Ok(message)
            );
        }
    }

    #[test]
    fn revocations_come_one_or_many_and_older_versions_still_read() {
        let messages = [
            PortalToGateway::Revoke {
                grant_id: "gr_1".into(),
            },
            PortalToGateway::RevokeMany {
                grant_ids: vec!["gr_1".into(), "gr_2".into()],
            },
        ];
        for message in messages {
            assert_eq!(
                decode::<PortalToGateway>(encode(&message).as_bytes()),
                Ok(message)
            );
        }
        assert_eq!(
            encode(&PortalToGateway::RevokeMany {
                grant_ids: vec!["gr_1".into()]
            }),
            r#"{"v":5,"type":"revoke_many","grant_ids":["gr_1"]}"#
        );
        // A gateway's word on a client's path, as the portal reads it.
        assert_eq!(
            decode::<GatewayMessage>(
                br#"{"v":5,"type":"path","client_id":"cli_1","path":"relayed","relay":"198.51.100.9"}"#
            ),
            Ok(GatewayMessage::Path {
                client_id: "cli_1".into(),
                path: PathKind::Relayed,
                relay: Some("198.51.100.9".parse().unwrap()),
            })
        );
        // A message of version 1 means what it meant.
        assert_eq!(
            decode::<PortalToGateway>(br#"{"v":1,"type":"revoke","grant_id":"gr_1"}"#),
            Ok(PortalToGateway::Revoke {
                grant_id: "gr_1".into()
            })
        );
        // The largest batch the portal sends fits a message with room to spare.
        let batch = PortalToGateway::RevokeMany {
            grant_ids: vec![format!("gr_{}", "0".repeat(32)); PortalToGateway::MAX_REVOKED],
        };
        assert!(encode(&batch).len() < MAX_MESSAGE_BYTES / 3);
    }

    fn ready_with(count: usize) -> ClientReady {
        ClientReady {
            client_id: "cli_1".into(),
            tunnel_ipv4: "100.64.0.1".parse().unwrap(),
            tunnel_ipv6: "fd00::1".parse().unwrap(),
            resources: (0..count)
                .map(|i| ResourceView {
                    id: format!("resource-{i}"),
                    address: format!("service-{i}.internal.acme.example"),
                })
                .collect(),
            more: false,
        }
    }

    #[test]
    fn a_long_ready_goes_in_small_pages_and_comes_back_whole() {
        let whole = ready_with(500);
        let pages = whole.clone().into_pages();
        assert!(pages.len() > 10, "{} pages", pages.len());
        let mut frames = pages.iter().map(encode);
        let mut assembled = match decode(frames.next().unwrap().as_bytes()) {
            Ok(PortalToClient::Ready(ready)) => *ready,
            other => panic!("the first page is the ready: {other:?}"),
        };
        assert!(assembled.more);
        for (i, frame) in frames.enumerate() {
            // Each frame is about a page: what the connection's send buffer keeps.
            assert!(frame.len() < RESOURCE_PAGE_BYTES + 128, "{}", frame.len());
            let page = decode::<PortalToClient>(frame.as_bytes()).unwrap();
            let last = i + 2 == pages.len();
            assert!(matches!(&page, PortalToClient::Resources { more, .. } if *more != last));
            assembled.take_page(page).unwrap();
        }
        assert_eq!(
            assembled, whole,
            "every resource, in order, and no more to come"
        );
        // A page when none is to come, or another message in their place, is given back.
        let page = PortalToClient::Resources {
            resources: vec![],
            more: false,
        };
        assert_eq!(assembled.take_page(page.clone()), Err(page));
        let mut waiting = ready_with(500).into_pages().remove(0);
        let PortalToClient::Ready(waiting) = &mut waiting else {
            unreachable!()
        };
        let other = PortalToClient::GatewayDown {
            gateway_id: "gw".into(),
        };
        assert_eq!(waiting.take_page(other.clone()), Err(other));
    }

    #[test]
    fn a_short_ready_is_one_message_without_more() {
        let pages = ready_with(3).into_pages();
        assert_eq!(pages.len(), 1);
        let text = encode(&pages[0]);
        assert!(!text.contains("more"), "{text}");
        assert_eq!(
            decode::<PortalToClient>(text.as_bytes()),
            Ok(PortalToClient::Ready(Box::new(ready_with(3))))
        );
        let empty = ready_with(0).into_pages();
        assert_eq!(empty, [PortalToClient::Ready(Box::new(ready_with(0)))]);
    }

    #[test]
    fn bad_messages_get_clear_errors() {
        let oversized = format!(
            r#"{{"v":1,"type":"request_access","resource":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        let cases: [(&str, &str); 8] = [
            (
                &oversized,
                "the message is 262189 bytes; the limit is 262144",
            ),
            (
                r#"{"v":6,"type":"request_access","resource":"x"}"#,
                "the message is protocol version 6; this build speaks version 5",
            ),
            (
                r#"{"type":"request_access","resource":"x"}"#,
                "the message is malformed: no protocol version `v`",
            ),
            (
                r#"{"v":0,"type":"heartbeat"}"#,
                "the message is malformed: protocol version 0 does not exist",
            ),
            (
                r#"{"v":1,"type":"launch_missiles"}"#,
                "the message is malformed: unknown variant `launch_missiles`",
            ),
            (
                r#"{"v":1,"type":"request_access"}"#,
                "the message is malformed: missing field `resource`",
            ),
            (
                r#"{"v":1,"type":"request_access","resource":"x","admin":true}"#,
                "the message is malformed: unknown field `admin`",
            ),
            (
                "\u{0}\u{1}garbage",
                "the message is malformed: no protocol version `v`",
            ),
        ];
        for (input, expected) in cases {
            let error = decode::<ClientMessage>(input.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(expected), "{input:.80}: {error}");
        }
    }
}
