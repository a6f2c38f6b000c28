//! Keys as the protocol carries them: 32-byte values written in base64 (WireGuard's own
//! notation), and the portal's Ed25519 signing key and its pinned public half.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a key text is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key is 32 bytes in base64 (44 characters); got `{0}`")]
    Encoding(String),
    #[error("`{0}` is not a valid Ed25519 public key")]
    NotOnCurve(String),
}

fn decode_32(text: &str) -> Result<[u8; 32], KeyError> {
    STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| KeyError::Encoding(text.chars().take(60).collect()))
}

/// A WireGuard public key (X25519), base64 as `wg` writes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// A WireGuard preshared key: secret, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

macro_rules! base64_key {
    ($name:ident) => {
        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(text: &str) -> Result<Self, KeyError> {
                decode_32(text).map($name)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&STANDARD.encode(self.0))
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

base64_key!(PublicKey);
base64_key!(PresharedKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<secret>)")
    }
}

/// The portal's signing key. Made from 32 secret bytes the caller draws from a CSPRNG (this
/// crate takes randomness as input, never reads it).
pub struct PortalSigningKey(SigningKey);

impl PortalSigningKey {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        PortalSigningKey(SigningKey::from_bytes(&seed))
    }

    /// The public half, which agents pin.
    pub fn public_key(&self) -> PortalPublicKey {
        PortalPublicKey(self.0.verifying_key())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for PortalSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortalSigningKey(public {})", self.public_key())
    }
}

/// The portal's Ed25519 public key as agents pin it (base64).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PortalPublicKey(pub(crate) VerifyingKey);

impl FromStr for PortalPublicKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_32(text)?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotOnCurve(text.to_owned()))?;
        // A key of small order verifies no strict signature: pinning one is a mistake.
        if key.is_weak() {
            return Err(KeyError::NotOnCurve(text.to_owned()));
        }
        Ok(PortalPublicKey(key))
    }
}

impl fmt::Display for PortalPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PortalPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortalPublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_base64_and_bad_text_is_refused() {
        let key = PublicKey([7; 32]);
        assert_eq!(key.to_string().parse::<PublicKey>(), Ok(key));
        for bad in [
            "",
            "abc",
            "AAAA",
            &STANDARD.encode([0u8; 31]),
            &STANDARD.encode([0u8; 33]),
        ] {
            assert!(
                matches!(bad.parse::<PublicKey>(), Err(KeyError::Encoding(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(
            format!("{:?}", PresharedKey([9; 32])),
            "PresharedKey(<secret>)"
        );
        let signing = PortalSigningKey::from_seed([1; 32]);
        assert!(!format!("{signing:?}").contains(&STANDARD.encode([1u8; 32])));
    }

    #[test]
    fn the_pinned_key_parses_back() {
        let public = PortalSigningKey::from_seed([3; 32]).public_key();
        assert_eq!(public.to_string().parse::<PortalPublicKey>(), Ok(public));
    }

    #[test]
    fn a_weak_portal_key_cannot_be_pinned() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = STANDARD.encode(identity);
        assert_eq!(
            weak.parse::<PortalPublicKey>().unwrap_err().to_string(),
            format!("`{weak}` is not a valid Ed25519 public key")
        );
    }
}
