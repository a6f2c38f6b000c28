//! TURN relays and the credentials the portal mints for them.
//!
//! A relay is a TURN server (coturn with `use-auth-secret`) that shares one secret with the
//! portal. For each agent the portal mints credentials in the TURN REST scheme: the user name
//! is `expiry:agent-id`, the password the base64 of HMAC-SHA1 of that name under the secret.
//! The relay checks them on every request without asking anyone (the MAC, then the expiry in
//! the name), so the agents never hold the secret and a credential stops working by itself.
//! The portal sends an agent its credentials after `ready` and new ones every half lifetime,
//! so what an agent holds is always good for at least half the lifetime.
//!
//! No IO but reading the secret files at start; time is an argument.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use fz_proto::{Relay, UnixTime};
use ring::hmac;

use crate::config::RelayConfig;

/// How long minted TURN credentials last unless the configuration says otherwise: long enough
/// that a relayed connection never depends on the portal for hours, short enough that a
/// device cut off (token revoked, portal gone) loses the relays within the day.
pub const DEFAULT_CREDENTIAL_LIFETIME_SECS: u64 = 12 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay {address}: cannot read its secret file `{path}`: {source}")]
    Secret {
        address: SocketAddr,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("relay {address}: its secret file `{path}` is empty")]
    EmptySecret { address: SocketAddr, path: PathBuf },
}

/// The relays of the configuration, each with its shared secret.
pub struct Relays {
    relays: Vec<(SocketAddr, hmac::Key)>,
    lifetime: Duration,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys stay out of logs.
        let addresses: Vec<&SocketAddr> = self.relays.iter().map(|(a, _)| a).collect();
        f.debug_struct("Relays")
            .field("relays", &addresses)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Relays {
    /// Reads every relay's secret (the file's text without surrounding whitespace).
    pub fn load(configs: &[RelayConfig], lifetime: Duration) -> Result<Relays, RelayError> {
        let mut relays = Vec::with_capacity(configs.len());
        for config in configs {
            let secret = read_secret(config.address, &config.secret_file)?;
            relays.push((config.address, secret));
        }
        Ok(Relays { relays, lifetime })
    }

    /// No relays: agents reach each other on their own endpoints only.
    pub fn none() -> Relays {
        Relays {
            relays: Vec::new(),
            lifetime: Duration::from_secs(DEFAULT_CREDENTIAL_LIFETIME_SECS),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }

    /// How often connected agents get new credentials: half their lifetime.
    pub fn refresh_interval(&self) -> Duration {
        self.lifetime / 2
    }

    /// Credentials for `agent` (a client's or gateway's id) on every relay, valid from `now`
    /// for the lifetime.
    pub fn credentials_for(&self, agent: &str, now: UnixTime) -> Vec<Relay> {
        let expires_at = now.saturating_add(self.lifetime.as_secs());
        let username = format!("{expires_at}:{agent}");
        self.relays
            .iter()
            .map(|(address, key)| Relay {
                address: *address,
                password: base64::engine::general_purpose::STANDARD
                    .encode(hmac::sign(key, username.as_bytes())),
                username: username.clone(),
                expires_at,
            })
            .collect()
    }
}

fn read_secret(address: SocketAddr, path: &Path) -> Result<hmac::Key, RelayError> {
    let text = std::fs::read_to_string(path).map_err(|source| RelayError::Secret {
        address,
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(RelayError::EmptySecret {
            address,
            path: path.to_owned(),
        });
    }
    // SHA-1 because the TURN REST scheme (and coturn) use it; as an HMAC it is still sound.
    Ok(hmac::Key::new(
        hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        secret.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(secret: &str, lifetime_secs: u64) -> (Relays, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        let config = RelayConfig {
            address: "203.0.113.5:3478".parse().unwrap(),
            secret_file: path,
        };
        let relays = Relays::load(&[config], Duration::from_secs(lifetime_secs)).unwrap();
        (relays, dir)
    }

    #[test]
    fn credentials_follow_the_turn_rest_scheme() {
        let (relays, _dir) = relays("north-relay-secret", 3600);
        let minted = relays.credentials_for("c_0123", 1_767_222_000);
        // The password is base64(HMAC-SHA1(secret, "expiry:agent")), as Python's hmac
        // module computes it for the same inputs; the file's newline is not part of it.
        assert_eq!(
            minted,
            vec![Relay {
                address: "203.0.113.5:3478".parse().unwrap(),
                username: "1767225600:c_0123".to_owned(),
                password: "XnzxMFAgapM7TG8OH1YMvVoMBHc=".to_owned(),
                expires_at: 1_767_225_600,
            }]
        );
        assert_eq!(relays.refresh_interval(), Duration::from_secs(1800));
    }

    #[test]
    fn each_agent_gets_its_own_password() {
        let (relays, _dir) = relays("north-relay-secret", 3600);
        let one = relays.credentials_for("c_1", 100);
        let other = relays.credentials_for("c_2", 100);
        assert_ne!(one[0].password, other[0].password);
    }

    #[test]
    fn a_missing_or_empty_secret_is_refused_naming_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let missing = dir.path().join("missing");
        for (path, expected) in [(&empty, "is empty"), (&missing, "cannot read")] {
            let config = RelayConfig {
                address: "203.0.113.5:3478".parse().unwrap(),
                secret_file: path.clone(),
            };
            let error = Relays::load(&[config], Duration::from_secs(60))
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("relay 203.0.113.5:3478"), "{error}");
            assert!(error.contains(expected), "{error}");
        }
    }
}
