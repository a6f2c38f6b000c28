//! The gateway's command line, checked into a [`Config`] before anything starts: flags (or
//! their environment variables), then the secret files, whose permissions must keep them
//! secret.

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use clap::Parser;
use fz_proto::PortalPublicKey;

use fz_host::tun::DEFAULT_MTU;
use fz_link::PortalConfig;

/// The fz gateway: enforces grants from the portal for one site.
#[derive(Debug, Parser)]
#[command(name = "fz-gateway", version)]
pub struct Args {
    /// The portal, as `ws://host:port` or `wss://host:port`.
    #[arg(long, env = "FZ_PORTAL_URL")]
    pub portal_url: String,
    /// The account (its slug) the gateway belongs to.
    #[arg(long, env = "FZ_ACCOUNT")]
    pub account: String,
    /// A file holding the gateway token (from `fz-portal token create --gateway`); it must
    /// not be readable by group or others. `FZ_GATEWAY_TOKEN` may carry the token instead.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The portal's grant-signing public key (base64), pinned: grants signed with any other
    /// key are refused.
    #[arg(long, env = "FZ_PORTAL_KEY")]
    pub portal_key: String,
    /// Extra CA certificates (PEM) to trust for a `wss://` portal, beside the system's.
    #[arg(long)]
    pub portal_ca: Option<PathBuf>,
    /// Where WireGuard listens.
    #[arg(long, default_value = "0.0.0.0:51820")]
    pub listen: SocketAddr,
    /// An address clients reach this gateway at (repeat for several); by default the listen
    /// address, when it names one.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<SocketAddr>,
    /// The TUN device's name.
    #[arg(long, default_value = "fz-gw0")]
    pub tun: String,
    /// The TUN device's MTU: 1420 fits WireGuard inside a 1500-byte path.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    pub mtu: u16,
    /// The gateway's WireGuard private key; created (mode 0600) when missing.
    #[arg(long, default_value = "/var/lib/fz-gateway/private.key")]
    pub key_file: PathBuf,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

/// Everything the gateway needs, checked.
#[derive(Debug)]
pub struct Config {
    pub portal: PortalConfig,
    pub portal_key: PortalPublicKey,
    pub listen: SocketAddr,
    pub endpoints: Vec<SocketAddr>,
    pub tun: String,
    pub mtu: u16,
    pub private_key: [u8; 32],
    pub metrics: Option<SocketAddr>,
}

/// Why the gateway cannot start with what it was given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("`--portal-key`: {0}")]
    PortalKey(String),
    #[error("no gateway token: give `--token-file` or set `FZ_GATEWAY_TOKEN`")]
    NoToken,
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`{path}` is readable by group or others (mode {mode:o}); it holds a secret: `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("`{path}` is empty")]
    Empty { path: PathBuf },
    #[error("`{path}` does not hold a 32-byte key (64 hex digits)")]
    BadKey { path: PathBuf },
    #[error("cannot create `{path}`: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`--listen {0}` names no address clients could reach: say where they reach this gateway with `--endpoint ADDR:PORT`"
    )]
    NoEndpoint(SocketAddr),
    #[error(
        "the MTU {0} is outside 1280..=1500 (IPv6 needs 1280; the tunnel carries at most 1500)"
    )]
    Mtu(u16),
}

impl Args {
    /// Checks the flags and reads the secrets. `env_token` is `FZ_GATEWAY_TOKEN`.
    pub fn resolve(self, env_token: Option<String>) -> Result<Config, ConfigError> {
        let portal_key: PortalPublicKey = self
            .portal_key
            .parse()
            .map_err(|e: fz_proto::KeyError| ConfigError::PortalKey(e.to_string()))?;
        let token = match (&self.token_file, env_token) {
            (Some(path), _) => read_secret(path)?,
            (None, Some(token)) if !token.trim().is_empty() => token.trim().to_owned(),
            (None, _) => return Err(ConfigError::NoToken),
        };
        if !(1280..=1500).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        let endpoints = if !self.endpoints.is_empty() {
            self.endpoints
        } else if self.listen.ip().is_unspecified() {
            return Err(ConfigError::NoEndpoint(self.listen));
        } else {
            vec![self.listen]
        };
        let private_key = private_key(&self.key_file)?;
        Ok(Config {
            portal: PortalConfig {
                url: self.portal_url,
                account: self.account,
                token,
                ca_file: self.portal_ca,
            },
            portal_key,
            listen: self.listen,
            endpoints,
            tun: self.tun,
            mtu: self.mtu,
            private_key,
            metrics: self.metrics,
        })
    }
}

/// A secret file's trimmed contents, if only its owner can read it.
fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_error)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let text = fs::read_to_string(path).map_err(read_error)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ConfigError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(text.to_owned())
}

/// The WireGuard private key in `path` (hex), made and written first when the file does not
/// exist, so the gateway keeps its key (and the grants that name it) across restarts.
fn private_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    if !path.exists() {
        let create_error = |source| ConfigError::Create {
            path: path.to_owned(),
            source,
        };
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| create_error(std::io::Error::other(e)))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(create_error)?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_error)?;
        file.write_all(format!("{}\n", hex(&key)).as_bytes())
            .map_err(create_error)?;
        tracing::info!(path = %path.display(), "made a new WireGuard key");
        return Ok(key);
    }
    let text = read_secret(path)?;
    parse_hex(&text).ok_or_else(|| ConfigError::BadKey {
        path: path.to_owned(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let portal_key = fz_proto::PortalSigningKey::from_seed([1; 32])
            .public_key()
            .to_string();
        let mut argv = vec![
            "fz-gateway",
            "--portal-url",
            "ws://127.0.0.1:8080",
            "--account",
            "acme",
            "--portal-key",
            &portal_key,
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("state/private.key");
        let key = key_file.to_str().unwrap();
        let first = args(&["--listen", "10.0.0.1:51820", "--key-file", key])
            .resolve(Some("secret".into()))
            .unwrap();
        let mode = fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = args(&["--listen", "10.0.0.1:51820", "--key-file", key])
            .resolve(Some("secret".into()))
            .unwrap();
        assert_eq!(first.private_key, second.private_key);
        assert_eq!(second.endpoints, ["10.0.0.1:51820".parse().unwrap()]);
        assert_eq!(second.portal.token, "secret");
    }

    #[test]
    fn bad_configurations_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = secret_file(dir.path(), "key", &"ab".repeat(32), 0o600);
        let key = key.to_str().unwrap();
        let open_token = secret_file(dir.path(), "open", "t", 0o644);
        let short_key = secret_file(dir.path(), "short", "abcd", 0o600);
        let empty = secret_file(dir.path(), "empty", "\n", 0o600);
        let cases: Vec<(Vec<&str>, Option<&str>, String)> = vec![
            (
                vec!["--key-file", key],
                Some("t"),
                "`--listen 0.0.0.0:51820` names no address clients could reach".into(),
            ),
            (
                vec!["--key-file", key, "--endpoint", "1.2.3.4:5"],
                None,
                "no gateway token: give `--token-file` or set `FZ_GATEWAY_TOKEN`".into(),
            ),
            (
                vec![
                    "--endpoint",
                    "1.2.3.4:5",
                    "--key-file",
                    key,
                    "--token-file",
                    open_token.to_str().unwrap(),
                ],
                None,
                format!(
                    "`{}` is readable by group or others (mode 644)",
                    open_token.display()
                ),
            ),
            (
                vec![
                    "--endpoint",
                    "1.2.3.4:5",
                    "--key-file",
                    key,
                    "--token-file",
                    empty.to_str().unwrap(),
                ],
                None,
                format!("`{}` is empty", empty.display()),
            ),
            (
                vec![
                    "--endpoint",
                    "1.2.3.4:5",
                    "--key-file",
                    short_key.to_str().unwrap(),
                ],
                Some("t"),
                format!("`{}` does not hold a 32-byte key", short_key.display()),
            ),
            (
                vec![
                    "--endpoint",
                    "1.2.3.4:5",
                    "--key-file",
                    key,
                    "--mtu",
                    "9000",
                ],
                Some("t"),
                "the MTU 9000 is outside 1280..=1500".into(),
            ),
        ];
        for (extra, token, expected) in cases {
            let error = args(&extra)
                .resolve(token.map(str::to_owned))
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(&expected), "{extra:?}: {error}");
        }
        let mut bad_key = args(&["--endpoint", "1.2.3.4:5", "--key-file", key]);
        bad_key.portal_key = "not base64!".into();
        let error = bad_key.resolve(Some("t".into())).unwrap_err().to_string();
        assert!(error.starts_with("`--portal-key`: "), "{error}");
    }
}
