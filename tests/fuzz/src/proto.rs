//! The `proto_decode` target: bytes off the WebSocket as each of the four control messages,
//! both directions between the portal and each agent.
//!
//! Oracles: decoding gives a message or an error, never a panic; an oversized message is
//! refused for its size before anything is read; a message that decodes encodes to what
//! decodes to the same message (what one side reads, it can say again unchanged); a grant
//! inside one is verified as its recipient would.

use std::fmt::Debug;

use fz_proto::{
    ClientMessage, GatewayMessage, Identity, MAX_MESSAGE_BYTES, PortalToClient, PortalToGateway,
    ProtoError, decode, encode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fixtures::{self, GATEWAY_ID};

pub fn proto_decode(data: &[u8]) {
    round_trip::<ClientMessage>(data);
    round_trip::<GatewayMessage>(data);
    if let Some(PortalToClient::Granted { grant, .. }) = round_trip::<PortalToClient>(data) {
        for device in fixtures::devices() {
            let me = Identity::Client {
                id: device.id.clone(),
                public_key: device.public_key(),
            };
            let _ = grant.verify(&fixtures::portal_key(), &me, fixtures::START_UNIX);
        }
    }
    if let Some(PortalToGateway::Grant { grant }) = round_trip::<PortalToGateway>(data) {
        let me = Identity::Gateway {
            id: GATEWAY_ID.to_owned(),
            public_key: fixtures::gateway_key(),
        };
        let _ = grant.verify(&fixtures::portal_key(), &me, fixtures::START_UNIX);
    }
}

fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let decoded = decode::<T>(data);
    if data.len() > MAX_MESSAGE_BYTES {
        assert!(
            matches!(decoded, Err(ProtoError::TooLarge { .. })),
            "an oversized message: {decoded:?}"
        );
    }
    let message = decoded.ok()?;
    let text = encode(&message);
    assert_eq!(
        decode::<T>(text.as_bytes()).as_ref(),
        Ok(&message),
        "{text}"
    );
    Some(message)
}
