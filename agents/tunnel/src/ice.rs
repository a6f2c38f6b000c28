//! What the tunnel cores need of ICE beyond `fz-traversal`: each client–gateway pair's ICE
//! credentials, drawn from the pair's preshared key.
//!
//! The portal keeps one preshared key per pair while grants between them are in force and
//! puts it in every grant it signs for the pair, so both sides hold it and nobody else does.
//! Drawing the ICE user name fragments and passwords from it (SHA-256 with a label per side
//! and field) gives both sides the same four values without another message, new ones with
//! every new pair, and a gateway answers checks only with the password of a pair a grant
//! named.

use fz_traversal::Credentials;
use ring::digest::{SHA256, digest};

/// The client's and the gateway's ICE credentials for a pair with this preshared key.
pub fn pair_credentials(preshared_key: &[u8; 32]) -> (Credentials, Credentials) {
    let draw = |label: &str, length: usize| {
        let mut input = Vec::with_capacity(label.len() + 32);
        input.extend_from_slice(label.as_bytes());
        input.extend_from_slice(preshared_key);
        let hash = digest(&SHA256, &input);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        hex[..length].to_owned()
    };
    // ICE asks for at least 24 random bits in a user name fragment and 128 in a password:
    // 8 and 32 hex digits.
    (
        Credentials {
            ufrag: draw("fz ice client ufrag", 8),
            password: draw("fz ice client password", 32),
        },
        Credentials {
            ufrag: draw("fz ice gateway ufrag", 8),
            password: draw("fz ice gateway password", 32),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_and_pair_has_its_own_credentials() {
        let (client, gateway) = pair_credentials(&[7; 32]);
        assert_ne!(client, gateway);
        assert_eq!((client.ufrag.len(), client.password.len()), (8, 32));
        let (other_client, _) = pair_credentials(&[8; 32]);
        assert_ne!(client, other_client);
        // The same key gives the same credentials on both sides.
        assert_eq!(pair_credentials(&[7; 32]), (client, gateway));
    }
}
