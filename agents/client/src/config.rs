//! The client's command line, checked into a [`Config`] before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use fz_host::secrets::{SecretError, load_or_create_key, read_secret};
use fz_host::tun::DEFAULT_MTU;
use fz_link::{PortalArgs, PortalConfig};
use fz_proto::PortalPublicKey;

/// The fz client: reaches the resources policy allows through fz's gateways, and leaves all
/// other traffic alone.
#[derive(Debug, Parser)]
#[command(name = "fz-client", version)]
pub struct Args {
    #[command(flatten)]
    pub portal: PortalArgs,
    /// A file holding the client token (`fz-client sign-in` writes it; a service account's is
    /// from `fz-portal token create --client`); it must not be readable by group or others.
    /// When it does not exist yet, the client signs in first and writes it. Default:
    /// `$XDG_CONFIG_HOME/fz/token`, or `~/.config/fz/token`. A token in the environment
    /// variable `FZ_TOKEN` (taken out of the environment at start, so nothing the client
    /// starts inherits it) is used instead.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The local UDP address WireGuard sends from.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// The TUN device's name.
    #[arg(long, default_value = "fz-client0")]
    pub tun: String,
    /// The TUN device's MTU: 1420 fits WireGuard inside a 1500-byte path.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    pub mtu: u16,
    /// The device's WireGuard private key; created (mode 0600) when missing.
    #[arg(long, default_value = "/var/lib/fz-client/private.key")]
    pub key_file: PathBuf,
    /// The resolver configuration to point at the DNS stub (and restore at exit).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Where the client keeps the original resolver configuration while it runs.
    #[arg(long, default_value = "/var/lib/fz-client")]
    pub state_dir: PathBuf,
    /// Ask for the account's `internet` resource as soon as the portal lists it, and while
    /// policy grants it, send everything no other resource covers through its gateway (and
    /// DNS for names no resource matches too). The host's own routes come back the moment the
    /// grant is refused or revoked.
    #[arg(long, env = "FZ_FULL_TUNNEL")]
    pub full_tunnel: bool,
}

/// Everything the client needs, checked.
#[derive(Debug)]
pub struct Config {
    pub portal: PortalConfig,
    pub portal_key: PortalPublicKey,
    pub listen: SocketAddr,
    pub tun: String,
    pub mtu: u16,
    pub private_key: [u8; 32],
    pub resolv_conf: PathBuf,
    pub resolv_backup: PathBuf,
    pub full_tunnel: bool,
}

/// Why the client cannot start with what it was given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    PortalKey(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(
        "the MTU {0} is outside 1280..=1500 (IPv6 needs 1280; the tunnel carries at most 1500)"
    )]
    Mtu(u16),
    #[error("no `--token-file` and neither XDG_CONFIG_HOME nor HOME is set to find the default")]
    NoTokenFile,
    #[error("the token given is empty (is FZ_TOKEN set to nothing?)")]
    EmptyTokenVariable,
}

/// The environment variable a headless machine may pass the token in.
pub const TOKEN_VARIABLE: &str = "FZ_TOKEN";

impl Args {
    /// The token file: `--token-file`, or sign-in's default place.
    pub fn token_file(&self) -> Result<PathBuf, ConfigError> {
        match &self.token_file {
            Some(path) => Ok(path.clone()),
            None => crate::sign_in::default_token_file().map_err(|_| ConfigError::NoTokenFile),
        }
    }

    /// The checked configuration, with `token` (from the environment or where sign-in stored
    /// it) or else the one in the token file.
    pub fn resolve(self, token: Option<String>) -> Result<Config, ConfigError> {
        let token = match token {
            Some(token) if !token.trim().is_empty() => token.trim().to_owned(),
            Some(_) => return Err(ConfigError::EmptyTokenVariable),
            None => read_secret(&self.token_file()?)?,
        };
        if !(1280..=1500).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        // Everything that can be checked is, before the key file is made.
        let (portal, portal_key) = self.portal.resolve(token).map_err(ConfigError::PortalKey)?;
        let private_key = load_or_create_key(&self.key_file)?;
        Ok(Config {
            portal,
            portal_key,
            listen: self.listen,
            tun: self.tun,
            mtu: self.mtu,
            private_key,
            resolv_backup: self.state_dir.join("resolv.conf.original"),
            resolv_conf: self.resolv_conf,
            full_tunnel: self.full_tunnel,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        fs::write(&token, "fzt_secret\n").unwrap();
        fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
        let portal_key = fz_proto::PortalSigningKey::from_seed([1; 32])
            .public_key()
            .to_string();
        let key_file = dir.path().join("key");
        let argv = [
            "fz-client",
            "--portal-url",
            "ws://127.0.0.1:8080",
            "--account",
            "acme",
            "--portal-key",
            &portal_key,
            "--token-file",
            token.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ];
        let error = Args::try_parse_from(argv)
            .unwrap()
            .resolve(None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is readable by group or others (mode 644)"),
            "{error}"
        );
        assert!(
            !key_file.exists(),
            "nothing made before the token is checked"
        );
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
        let config = Args::try_parse_from(argv).unwrap().resolve(None).unwrap();
        assert_eq!(config.portal.token, "fzt_secret");
        assert_eq!(config.portal.account, "acme");
        // A token from the environment wins over the file; an empty one is refused.
        let config = Args::try_parse_from(argv)
            .unwrap()
            .resolve(Some(" fz1.client.from-the-environment \n".to_owned()))
            .unwrap();
        assert_eq!(config.portal.token, "fz1.client.from-the-environment");
        let error = Args::try_parse_from(argv)
            .unwrap()
            .resolve(Some(String::new()))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the token given is empty (is FZ_TOKEN set to nothing?)"
        );
    }
}
