//! The gateway's command line, checked into a [`Config`] before anything starts: flags (or
//! their environment variables), then the secret files, whose permissions must keep them
//! secret.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use fz_host::secrets::{SecretError, load_or_create_key, read_secret};
use fz_host::tun::DEFAULT_MTU;
use fz_link::{PortalArgs, PortalConfig};
use fz_proto::PortalPublicKey;

/// The fz gateway: enforces grants from the portal for one site.
#[derive(Debug, Parser)]
#[command(name = "fz-gateway", version)]
pub struct Args {
    #[command(flatten)]
    pub portal: PortalArgs,
    /// A file holding the gateway token (from `fz-portal token create --gateway`); it must
    /// not be readable by group or others. `FZ_GATEWAY_TOKEN` may carry the token instead.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
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
    #[error("{0}")]
    PortalKey(String),
    #[error("no gateway token: give `--token-file` or set `FZ_GATEWAY_TOKEN`")]
    NoToken,
    #[error(transparent)]
    Secret(#[from] SecretError),
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
        // Everything that can be checked is, before the key file is made.
        let (portal, portal_key) = self.portal.resolve(token).map_err(ConfigError::PortalKey)?;
        let private_key = load_or_create_key(&self.key_file)?;
        Ok(Config {
            portal,
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

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
    fn the_portals_replicas_come_comma_separated_or_flag_by_flag() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("private.key");
        let key = key_file.to_str().unwrap();
        let common = ["--listen", "10.0.0.1:51820", "--key-file", key];
        let listed = [
            &common[..],
            &["--portal-url", "wss://p2.acme.example,wss://p3:8443"],
        ];
        let repeated = [&common[..], &["--portal-url", "wss://p2.acme.example"]];
        let repeated = [&repeated.concat()[..], &["--portal-url", "wss://p3:8443"]];
        for extra in [listed.concat(), repeated.concat()] {
            let config = args(&extra).resolve(Some("secret".into())).unwrap();
            assert_eq!(
                config.portal.urls,
                [
                    "ws://127.0.0.1:8080",
                    "wss://p2.acme.example",
                    "wss://p3:8443"
                ]
            );
        }
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
        bad_key.portal.portal_key = "not base64!".into();
        let error = bad_key.resolve(Some("t".into())).unwrap_err().to_string();
        assert!(error.starts_with("`--portal-key`: "), "{error}");
    }
}
