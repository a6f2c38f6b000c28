//! The portal's configuration: a TOML file, or the embedded defaults when none is given.
//!
//! ```toml
//! listen = "127.0.0.1:8080"        # where HTTP and the agents' WebSockets are served
//! data_dir = "data"                # the SQLite store and the portal's signing key
//! database_url = "postgres://fz@db.internal/fz" # keep the store in PostgreSQL instead of
//!                                  # `<data_dir>/portal.sqlite3`: what replicas share (a
//!                                  # password may be in the URL, or in ~/.pgpass or
//!                                  # PGPASSWORD; TLS: `?sslmode=verify-full`,
//!                                  # `&sslrootcert=FILE` for a private CA)
//! signing_key_file = "/etc/fz/portal-signing.key" # the keys replicas share, made once by
//! token_key_file = "/etc/fz/token.key"            # `fz-portal init` and copied (0600);
//!                                  # never made when named. Default: in `data_dir`
//! allow_plain_http = false         # plain HTTP beyond loopback needs this set
//! tls_cert = "portal.crt"          # PEM certificate chain; with `tls_key`, serve HTTPS (rustls)
//! tls_key = "portal.key"           # PEM private key (PKCS#8, PKCS#1 or SEC1)
//! geoip_country_db = "GeoLite2-Country.mmdb"  # MaxMind-format database for `country` rules
//! public_url = "https://portal.example.com" # how browsers reach the portal (OIDC redirects);
//!                                  # default: http(s)://<listen>
//! trusted_proxy_header = "x-forwarded-for"    # take the client address from this header...
//! trusted_proxies = ["127.0.0.1/32", "::1/128"] # ...only when the peer is one of these
//! gateway_heartbeat_interval_ms = 5000 # gateways heartbeat this often; 3 missed: unhealthy
//! gateway_ack_timeout_ms = 5000    # a gateway that does not answer a grant in time fails that
//!                                  # request (the next gateway is tried for IP resources); it
//!                                  # stays in service while it heartbeats
//! drain_period_ms = 30000          # at SIGTERM, after it stops accepting, the portal closes
//!                                  # its agents' connections a batch at a time over this
//!                                  # long, so that they come back to the other replicas
//!                                  # spread out, not at once (default 0: all at once)
//!
//! # Connections: every one is unauthenticated until its agent's `hello`. The three caps
//! # default to shares of the open files limit at start (raised to the hard limit first).
//! tls_handshake_timeout_ms = 5000  # the TLS handshake must be done by then
//! header_read_timeout_ms = 5000    # each request head must arrive whole within this, counted
//!                                  # from when the portal starts waiting for it: so also the
//!                                  # longest a keep-alive connection idles between requests
//! hello_timeout_ms = 10000         # from accept to the agent's `hello`; a connection that is
//!                                  # no agent by then is closed (a request in flight finishes)
//! max_connections = 20000          # all of them; default: the open files limit less an
//!                                  # eighth of it (at least 64) kept for the portal itself
//! max_unauthenticated_connections = 4096 # default: a quarter of `max_connections`, at most
//!                                  # 4096; agents get the rest. When it is reached, the
//!                                  # oldest idle one is closed for a newcomer (the newcomer
//!                                  # is, if none is idle)
//! max_unauthenticated_per_source = 64 # per IPv4 address or IPv6 /64, the client's when a
//!                                  # trusted proxy names it; past it a connection is closed
//!                                  # at once. Default: a quarter of the above, at most 64
//!
//! relay_credential_lifetime_secs = 43200 # TURN credentials minted for an agent last this
//!                                  # (12 h); agents get new ones every half of it
//!
//! [[relays]]                       # TURN servers agents may relay through (any number):
//!                                  # coturn with `use-auth-secret`, sharing a secret with us
//! address = "203.0.113.5:3478"     # where agents reach it (UDP)
//! secret_file = "relay-secret"     # its `static-auth-secret`, alone in a file
//!
//! [[accounts]]
//! slug = "acme"
//! policy = "policies"              # a policy tree, or a bundle written by `fzc compile`
//! max_grant_lifetime_secs = 28800  # a grant never outlives this (8 h)
//! token_lifetime_secs = 604800     # tokens expire after this (7 days)
//! max_grants_per_client = 256      # grants one client device may hold in force at once
//! requests_per_second = 10         # connection requests a client may make, on average...
//! request_burst = 100              # ...and at once (a token bucket; denials count too)
//! flow_retention_days = 90         # flows older than this are deleted
//!
//! [accounts.email]                 # sign-in with a one-time code sent by email (on by default)
//! enabled = true
//! token_lifetime_secs = 604800     # a client token from an email sign-in lasts this (7 days)
//!
//! [[accounts.oidc]]                # sign-in with an OpenID Connect provider (any number)
//! id = "okta"                      # what policies call it: `provider okta`, `idp okta "SRE"`
//! name = "Okta"                    # shown on its button (default: the id)
//! issuer = "https://acme.okta.com" # discovery at <issuer>/.well-known/openid-configuration
//! client_id = "0oa1b2c3"
//! client_secret_file = "okta-secret" # the client secret, alone in a file
//! scopes = ["openid", "email", "profile", "groups"] # default: openid, email, profile
//! groups_claim = "groups"          # the claim (ID token, else UserInfo) listing the user's groups
//! token_lifetime_secs = 604800     # a client token from this provider lasts this (7 days)
//! ca_file = "idp-ca.pem"           # extra CA certificates (PEM) to trust for it
//!
//! [smtp]                           # where sign-in codes are mailed; without this section they
//!                                  # are written to `<data_dir>/mail/` and the portal logs where
//! host = "smtp.example.com"
//! port = 587
//! security = "starttls"            # "starttls", "tls" (port 465), or "none" (loopback only)
//! from = "fz <fz@example.com>"
//! username = "fz"                  # with `password_file`, log in
//! password_file = "smtp-password"
//! ```
//! Relative paths are read against the configuration file's directory (the working directory
//! for the defaults). Every problem is reported with what was wrong and where, before the
//! portal starts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fz_compiler::address::Network;

use crate::keys::KeyFiles;
use crate::store::Database;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the store keeps its rows: the SQLite file in `data_dir`, or PostgreSQL.
    pub database: Database,
    /// Key files shared with other replicas, instead of the data dir's.
    pub key_files: KeyFiles,
    pub allow_plain_http: bool,
    /// Serve HTTPS with these files; plain HTTP without.
    pub tls: Option<TlsFiles>,
    pub geoip_country_db: Option<PathBuf>,
    /// Where Prometheus metrics are served (`/metrics`); none by default.
    pub metrics_listen: Option<SocketAddr>,
    pub trusted_proxy: Option<TrustedProxy>,
    pub gateway_heartbeat_interval: Duration,
    pub gateway_ack_timeout: Duration,
    /// At a stop, how long the agents' connections take to close, a batch at a time.
    pub drain_period: Duration,
    pub connections: ConnectionLimits,
    /// Where sign-in codes are mailed; `None`: written under the data dir.
    pub smtp: Option<SmtpConfig>,
    /// How browsers reach the portal, without a trailing slash: identity providers send people
    /// back to `<public_url>/<account>/sign-in/oidc/<provider>/callback`. `None`: the scheme
    /// and the address the portal listens on.
    pub public_url: Option<String>,
    pub relays: Vec<RelayConfig>,
    pub relay_credential_lifetime: Duration,
    pub accounts: Vec<AccountConfig>,
}

/// A TURN relay (`[[relays]]`): where agents reach it and the file holding the secret it
/// shares with the portal (`crate::relay`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub address: SocketAddr,
    pub secret_file: PathBuf,
}

/// An SMTP server to send mail through.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    #[serde(default)]
    pub security: SmtpSecurity,
    /// The sender, as `Name <address>` or an address.
    pub from: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

fn default_smtp_port() -> u16 {
    587
}

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain, then STARTTLS, which must succeed before anything is sent.
    #[default]
    StartTls,
    /// TLS from the start (submissions, port 465).
    Tls,
    /// None at all: only for a server on loopback.
    None,
}

/// Sign-in with a one-time code sent by email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailSignIn {
    pub enabled: bool,
    /// The lifetime of a client token made at such a sign-in.
    pub token_lifetime_secs: u64,
}

impl Default for EmailSignIn {
    fn default() -> Self {
        EmailSignIn {
            enabled: true,
            token_lifetime_secs: DEFAULT_TOKEN_LIFETIME_SECS,
        }
    }
}

/// An OpenID Connect provider people of an account sign in with.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's id: what a policy's `provider` condition and `idp` lines name.
    pub id: String,
    /// Shown on the sign-in page; the id when not given.
    pub name: Option<String>,
    pub issuer: String,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The claim that lists the user's groups; `None`: the provider brings no groups.
    pub groups_claim: Option<String>,
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime_secs: u64,
    /// Extra CA certificates (PEM) to trust for this provider, beside the system's: a provider
    /// behind a private CA.
    pub ca_file: Option<PathBuf>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(str::to_owned).to_vec()
}

fn default_token_lifetime() -> u64 {
    DEFAULT_TOKEN_LIFETIME_SECS
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailSignInFile {
    enabled: Option<bool>,
    token_lifetime_secs: Option<u64>,
}

/// How long a connection may take to become an agent, and how many may be open. The caps left
/// `None` are derived from the open files limit at start (`listener::Caps::for_descriptors`),
/// and configured ones are lowered to fit it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub tls_handshake_timeout: Duration,
    /// hyper's header read timeout: it runs whenever hyper waits for a request head, so it
    /// bounds an idle keep-alive connection too.
    pub header_read_timeout: Duration,
    /// From accept to the agent's `hello` (TLS, the upgrade request and the hello together).
    pub hello_timeout: Duration,
    pub max_connections: Option<usize>,
    pub max_unauthenticated_connections: Option<usize>,
    pub max_unauthenticated_per_source: Option<usize>,
}

/// A TLS handshake takes a few round trips: 5 s is ample on any link a person would use.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// A request head is one write from any real client: 5 s (nginx waits 60 s, and that is what
/// slowloris feeds on).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// TLS, the upgrade and the hello are about five round trips and a token lookup: 10 s leaves
/// room for a slow satellite link and a busy portal.
pub const DEFAULT_HELLO_TIMEOUT_MS: u64 = 10_000;

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            tls_handshake_timeout: Duration::from_millis(DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS),
            header_read_timeout: Duration::from_millis(DEFAULT_HEADER_READ_TIMEOUT_MS),
            hello_timeout: Duration::from_millis(DEFAULT_HELLO_TIMEOUT_MS),
            max_connections: None,
            max_unauthenticated_connections: None,
            max_unauthenticated_per_source: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A reverse proxy in front of the portal that reports the client's address in a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedProxy {
    /// Lowercase header name, e.g. `x-forwarded-for`.
    pub header: String,
    /// Peers whose header is believed; anyone else's is ignored.
    pub peers: Vec<Network>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountConfig {
    pub slug: String,
    /// A policy tree directory or a bundle file.
    pub policy: PathBuf,
    pub max_grant_lifetime_secs: u64,
    pub token_lifetime_secs: u64,
    /// Grants one client may hold in force at once; a request past it is refused.
    pub max_grants_per_client: usize,
    /// Connection requests a client may make: this many a second on average, up to
    /// `request_burst` at once. Requests past it are refused before anything is decided.
    pub requests_per_second: u32,
    pub request_burst: u32,
    /// Flows are kept this long (by the time of their last occurrence), then deleted.
    pub flow_retention_days: u32,
    pub email: EmailSignIn,
    pub oidc: Vec<OidcConfig>,
}

/// Paths the portal serves at its root, which no account slug may take.
pub const RESERVED_SLUGS: [&str; 2] = ["api", "healthz"];

/// Grants live at most 8 hours unless an account says otherwise.
pub const DEFAULT_MAX_GRANT_LIFETIME_SECS: u64 = 8 * 3600;
/// Tokens expire after 7 days unless an account says otherwise.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// A client holds at most 256 grants at once unless an account says otherwise. A grant is
/// one resource (for a DNS resource, one name) through one gateway, and a request for what a
/// grant in force already covers gets that grant again; so 256 is a device using 256 distinct
/// resources or names within one grant lifetime, far beyond what a person does, while it keeps
/// what one client costs a gateway and the portal's memory small.
pub const DEFAULT_MAX_GRANTS_PER_CLIENT: usize = 256;
/// A client asks for a resource when it first uses it (its tunnel and DNS stub keep the grant
/// for its life): a failover or a page full of names makes a burst of tens, and the steady
/// rate is far below one a second. 100 at once and 10 a second on average let those through
/// and keep a client that asks in a loop to 10 decisions (and at most 10 flow rows) a second.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 10;
pub const DEFAULT_REQUEST_BURST: u32 = 100;
/// Flows are kept 90 days unless an account says otherwise: a quarter, long enough for most
/// audits, and what the issue of the flow log filling the disk asked for.
pub const DEFAULT_FLOW_RETENTION_DAYS: u32 = 90;
/// Gateways heartbeat every 5 s unless configured otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// A gateway has 5 s to acknowledge a grant unless configured otherwise.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = fz_proto::DEFAULT_ACK_TIMEOUT_MS;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The file's shape; validated into [`Config`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    signing_key_file: Option<PathBuf>,
    token_key_file: Option<PathBuf>,
    #[serde(default)]
    allow_plain_http: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    geoip_country_db: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    trusted_proxy_header: Option<String>,
    trusted_proxies: Option<Vec<Network>>,
    gateway_heartbeat_interval_ms: Option<u64>,
    gateway_ack_timeout_ms: Option<u64>,
    drain_period_ms: Option<u64>,
    tls_handshake_timeout_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    hello_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    max_unauthenticated_connections: Option<usize>,
    max_unauthenticated_per_source: Option<usize>,
    smtp: Option<SmtpConfig>,
    public_url: Option<String>,
    #[serde(default)]
    relays: Vec<RelayConfig>,
    relay_credential_lifetime_secs: Option<u64>,
    #[serde(default)]
    accounts: Vec<AccountFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    slug: String,
    policy: PathBuf,
    max_grant_lifetime_secs: Option<u64>,
    token_lifetime_secs: Option<u64>,
    max_grants_per_client: Option<usize>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
    flow_retention_days: Option<u32>,
    email: Option<EmailSignInFile>,
    #[serde(default)]
    oidc: Vec<OidcConfig>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// The embedded defaults: loopback, `data/`, one account `default` on `policies/`.
    pub fn defaults() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            database: Database::Sqlite,
            key_files: KeyFiles::default(),
            allow_plain_http: false,
            tls: None,
            geoip_country_db: None,
            metrics_listen: None,
            trusted_proxy: None,
            gateway_heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS),
            gateway_ack_timeout: Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS),
            drain_period: Duration::ZERO,
            connections: ConnectionLimits::default(),
            smtp: None,
            public_url: None,
            relays: Vec::new(),
            relay_credential_lifetime: Duration::from_secs(
                crate::relay::DEFAULT_CREDENTIAL_LIFETIME_SECS,
            ),
            accounts: vec![AccountConfig {
                slug: "default".to_owned(),
                policy: PathBuf::from("policies"),
                max_grant_lifetime_secs: DEFAULT_MAX_GRANT_LIFETIME_SECS,
                token_lifetime_secs: DEFAULT_TOKEN_LIFETIME_SECS,
                max_grants_per_client: DEFAULT_MAX_GRANTS_PER_CLIENT,
                requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
                request_burst: DEFAULT_REQUEST_BURST,
                flow_retention_days: DEFAULT_FLOW_RETENTION_DAYS,
                email: EmailSignIn::default(),
                oidc: Vec::new(),
            }],
        }
    }

    /// Parses configuration text; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let defaults = Config::defaults();
        let resolve = |path: PathBuf| {
            if path.is_absolute() {
                path
            } else {
                base.join(path)
            }
        };
        let tls = match (file.tls_cert, file.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: resolve(cert),
                key: resolve(key),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "`tls_cert` and `tls_key` go together: give both, or neither for plain HTTP"
                        .to_owned(),
                ));
            }
        };
        let trusted_proxy = match (file.trusted_proxy_header, file.trusted_proxies) {
            (Some(header), peers) => Some(TrustedProxy {
                header: header.to_ascii_lowercase(),
                peers: peers.unwrap_or_else(|| {
                    vec![
                        Network::host(IpAddr::from([127, 0, 0, 1])),
                        Network::host(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
                    ]
                }),
            }),
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "`trusted_proxies` needs `trusted_proxy_header`: the header the proxies set"
                        .to_owned(),
                ));
            }
            (None, None) => None,
        };
        let database = match file.database_url {
            None => Database::Sqlite,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres(url)
            }
            Some(_) => {
                return Err(ConfigError::Invalid(
                    "`database_url` must be a PostgreSQL URL (`postgres://…`); leave it out for \
                     the SQLite file in `data_dir`"
                        .to_owned(),
                ));
            }
        };
        let millis =
            |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let config = Config {
            listen: file.listen.unwrap_or(defaults.listen),
            data_dir: resolve(file.data_dir.unwrap_or(defaults.data_dir)),
            database,
            key_files: KeyFiles {
                signing: file.signing_key_file.map(&resolve),
                token: file.token_key_file.map(&resolve),
            },
            allow_plain_http: file.allow_plain_http,
            tls,
            geoip_country_db: file.geoip_country_db.map(resolve),
            metrics_listen: file.metrics_listen,
            trusted_proxy,
            gateway_heartbeat_interval: millis(
                file.gateway_heartbeat_interval_ms,
                defaults.gateway_heartbeat_interval,
            ),
            gateway_ack_timeout: millis(file.gateway_ack_timeout_ms, defaults.gateway_ack_timeout),
            drain_period: millis(file.drain_period_ms, defaults.drain_period),
            connections: ConnectionLimits {
                tls_handshake_timeout: millis(
                    file.tls_handshake_timeout_ms,
                    defaults.connections.tls_handshake_timeout,
                ),
                header_read_timeout: millis(
                    file.header_read_timeout_ms,
                    defaults.connections.header_read_timeout,
                ),
                hello_timeout: millis(file.hello_timeout_ms, defaults.connections.hello_timeout),
                max_connections: file.max_connections,
                max_unauthenticated_connections: file.max_unauthenticated_connections,
                max_unauthenticated_per_source: file.max_unauthenticated_per_source,
            },
            smtp: file.smtp.map(|smtp| SmtpConfig {
                password_file: smtp.password_file.map(resolve),
                ..smtp
            }),
            public_url: file
                .public_url
                .map(|url| url.trim_end_matches('/').to_owned()),
            relays: file
                .relays
                .into_iter()
                .map(|relay| RelayConfig {
                    secret_file: resolve(relay.secret_file),
                    ..relay
                })
                .collect(),
            relay_credential_lifetime: file
                .relay_credential_lifetime_secs
                .map_or(defaults.relay_credential_lifetime, Duration::from_secs),
            accounts: file
                .accounts
                .into_iter()
                .map(|a| AccountConfig {
                    slug: a.slug,
                    policy: resolve(a.policy),
                    max_grant_lifetime_secs: a
                        .max_grant_lifetime_secs
                        .unwrap_or(DEFAULT_MAX_GRANT_LIFETIME_SECS),
                    token_lifetime_secs: a
                        .token_lifetime_secs
                        .unwrap_or(DEFAULT_TOKEN_LIFETIME_SECS),
                    max_grants_per_client: a
                        .max_grants_per_client
                        .unwrap_or(DEFAULT_MAX_GRANTS_PER_CLIENT),
                    requests_per_second: a
                        .requests_per_second
                        .unwrap_or(DEFAULT_REQUESTS_PER_SECOND),
                    request_burst: a.request_burst.unwrap_or(DEFAULT_REQUEST_BURST),
                    flow_retention_days: a
                        .flow_retention_days
                        .unwrap_or(DEFAULT_FLOW_RETENTION_DAYS),
                    email: a
                        .email
                        .map_or_else(EmailSignIn::default, |email| EmailSignIn {
                            enabled: email.enabled.unwrap_or(true),
                            token_lifetime_secs: email
                                .token_lifetime_secs
                                .unwrap_or(DEFAULT_TOKEN_LIFETIME_SECS),
                        }),
                    oidc: a
                        .oidc
                        .into_iter()
                        .map(|oidc| OidcConfig {
                            client_secret_file: resolve(oidc.client_secret_file),
                            ca_file: oidc.ca_file.map(resolve),
                            ..oidc
                        })
                        .collect(),
                })
                .collect(),
        };
        config.validate()?;
        Ok(config)
    }

    /// What the portal refuses to start with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if !self.listen.ip().is_loopback() && !self.allow_plain_http && self.tls.is_none() {
            return invalid(format!(
                "`listen = \"{}\"` serves plain HTTP beyond loopback; give `tls_cert` and `tls_key`, \
                 listen on 127.0.0.1 behind a TLS proxy, or set `allow_plain_http = true` to accept it",
                self.listen
            ));
        }
        if self.gateway_heartbeat_interval.is_zero() || self.gateway_ack_timeout.is_zero() {
            return invalid(
                "`gateway_heartbeat_interval_ms` and `gateway_ack_timeout_ms` must be at least 1"
                    .to_owned(),
            );
        }
        let limits = &self.connections;
        if limits.tls_handshake_timeout.is_zero()
            || limits.header_read_timeout.is_zero()
            || limits.hello_timeout.is_zero()
        {
            return invalid(
                "`tls_handshake_timeout_ms`, `header_read_timeout_ms` and `hello_timeout_ms` must \
                 be at least 1"
                    .to_owned(),
            );
        }
        if limits.max_connections.is_some_and(|n| n < 2) {
            return invalid(
                "`max_connections` must be at least 2: one connection saying hello, one agent"
                    .to_owned(),
            );
        }
        if limits.max_unauthenticated_connections == Some(0)
            || limits.max_unauthenticated_per_source == Some(0)
        {
            return invalid(
                "`max_unauthenticated_connections` and `max_unauthenticated_per_source` must be \
                 at least 1"
                    .to_owned(),
            );
        }
        if let (Some(total), Some(unauthenticated)) = (
            limits.max_connections,
            limits.max_unauthenticated_connections,
        ) && unauthenticated >= total
        {
            return invalid(format!(
                "`max_unauthenticated_connections = {unauthenticated}` leaves no room for agents \
                 within `max_connections = {total}`"
            ));
        }
        if let (Some(unauthenticated), Some(per_source)) = (
            limits.max_unauthenticated_connections,
            limits.max_unauthenticated_per_source,
        ) && per_source > unauthenticated
        {
            return invalid(format!(
                "`max_unauthenticated_per_source = {per_source}` is more than \
                 `max_unauthenticated_connections = {unauthenticated}`"
            ));
        }
        if let Some(proxy) = &self.trusted_proxy
            && axum::http::HeaderName::from_bytes(proxy.header.as_bytes()).is_err()
        {
            return invalid(format!(
                "`trusted_proxy_header = \"{}\"` is not a header name",
                proxy.header
            ));
        }
        if let Some(smtp) = &self.smtp {
            if smtp.security == SmtpSecurity::None && !is_loopback_host(&smtp.host) {
                return invalid(format!(
                    "`[smtp] security = \"none\"` would send sign-in codes in the clear to `{}`; \
                     use \"starttls\" or \"tls\" (\"none\" is for a server on loopback)",
                    smtp.host
                ));
            }
            if smtp.username.is_some() != smtp.password_file.is_some() {
                return invalid(
                    "`[smtp]` `username` and `password_file` go together: give both, or neither"
                        .to_owned(),
                );
            }
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid(format!(
                "`public_url = \"{url}\"` must be an http:// or https:// URL"
            ));
        }
        // Agents need their credentials to outlive a refresh (half the lifetime) by far.
        if self.relay_credential_lifetime < Duration::from_secs(600) {
            return invalid(format!(
                "`relay_credential_lifetime_secs = {}` is too short: at least 600",
                self.relay_credential_lifetime.as_secs()
            ));
        }
        let mut relays = std::collections::BTreeSet::new();
        for relay in &self.relays {
            if relay.address.ip().is_unspecified() || relay.address.port() == 0 {
                return invalid(format!(
                    "relay `{}`: agents need an address and port to reach it",
                    relay.address
                ));
            }
            if !relays.insert(relay.address) {
                return invalid(format!("relay `{}` is configured twice", relay.address));
            }
        }
        if self.accounts.is_empty() {
            return invalid("no `[[accounts]]`: the portal serves at least one account".to_owned());
        }
        let mut seen = std::collections::BTreeSet::new();
        for account in &self.accounts {
            let slug = &account.slug;
            let valid = !slug.is_empty()
                && slug.len() <= 63
                && slug
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !slug.starts_with('-');
            if !valid {
                return invalid(format!(
                    "account slug `{slug}` must be lowercase letters, digits and `-`"
                ));
            }
            // The sign-in page is `/{slug}`: a slug may not be one of the portal's own paths.
            if RESERVED_SLUGS.contains(&slug.as_str()) {
                return invalid(format!(
                    "account slug `{slug}` is one of the portal's own paths ({})",
                    RESERVED_SLUGS.join(", ")
                ));
            }
            if !seen.insert(slug) {
                return invalid(format!("account `{slug}` is configured twice"));
            }
            let mut providers = std::collections::BTreeSet::new();
            for oidc in &account.oidc {
                let id = &oidc.id;
                let valid = !id.is_empty()
                    && id.len() <= 63
                    && id
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !valid || id == "email" {
                    return invalid(format!(
                        "account `{slug}`: OIDC provider id `{id}` must be lowercase letters, \
                         digits and `-`, and not `email` (the email code's)"
                    ));
                }
                if !providers.insert(id) {
                    return invalid(format!(
                        "account `{slug}`: OIDC provider `{id}` is configured twice"
                    ));
                }
                let secure = oidc.issuer.starts_with("https://")
                    || oidc
                        .issuer
                        .strip_prefix("http://")
                        .map(|rest| rest.split(['/', ':']).next().unwrap_or(rest))
                        .is_some_and(is_loopback_host);
                if !secure {
                    return invalid(format!(
                        "account `{slug}`: OIDC provider `{id}`: `issuer = \"{}\"` must be an \
                         https:// URL (http:// only on loopback)",
                        oidc.issuer
                    ));
                }
                if !oidc.scopes.iter().any(|s| s == "openid") {
                    return invalid(format!(
                        "account `{slug}`: OIDC provider `{id}`: `scopes` must include `openid`"
                    ));
                }
                if oidc.token_lifetime_secs == 0 {
                    return invalid(format!(
                        "account `{slug}`: OIDC provider `{id}`: lifetimes must be at least \
                         one second"
                    ));
                }
            }
            if account.max_grant_lifetime_secs == 0
                || account.token_lifetime_secs == 0
                || account.email.token_lifetime_secs == 0
            {
                return invalid(format!(
                    "account `{slug}`: lifetimes must be at least one second"
                ));
            }
            if account.max_grants_per_client == 0
                || account.requests_per_second == 0
                || account.request_burst == 0
                || account.flow_retention_days == 0
            {
                return invalid(format!(
                    "account `{slug}`: `max_grants_per_client`, `requests_per_second`, \
                     `request_burst` and `flow_retention_days` must be at least 1"
                ));
            }
        }
        Ok(())
    }

    pub fn account(&self, slug: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.slug == slug)
    }
}

/// `localhost` or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/fz")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file_and_its_defaults() {
        let config = parse(
            "listen = \"127.0.0.1:9000\"\n[[accounts]]\nslug = \"acme\"\npolicy = \"trees/acme\"\ntoken_lifetime_secs = 60\n",
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.data_dir, Path::new("/etc/fz/data"));
        let account = config.account("acme").unwrap();
        assert_eq!(account.policy, Path::new("/etc/fz/trees/acme"));
        assert_eq!(account.token_lifetime_secs, 60);
        assert_eq!(
            account.max_grant_lifetime_secs,
            DEFAULT_MAX_GRANT_LIFETIME_SECS
        );
        assert_eq!(
            (
                account.max_grants_per_client,
                account.requests_per_second,
                account.request_burst,
                account.flow_retention_days
            ),
            (256, 10, 100, 90)
        );
        assert_eq!(
            Config::defaults().validate().map_err(|e| e.to_string()),
            Ok(())
        );
    }

    #[test]
    fn smtp_and_email_sign_in_settings() {
        let account = "[[accounts]]\nslug = \"acme\"\npolicy = \"p\"\n";
        let config = parse(&format!(
            "[smtp]\nhost = \"smtp.example.com\"\nfrom = \"fz <fz@example.com>\"\n\
             username = \"fz\"\npassword_file = \"smtp-password\"\n{account}\
             [accounts.email]\ntoken_lifetime_secs = 3600\n"
        ))
        .unwrap();
        let smtp = config.smtp.unwrap();
        assert_eq!((smtp.port, smtp.security), (587, SmtpSecurity::StartTls));
        assert_eq!(
            smtp.password_file.as_deref(),
            Some(Path::new("/etc/fz/smtp-password"))
        );
        let email = &config.accounts[0].email;
        assert!(email.enabled);
        assert_eq!(email.token_lifetime_secs, 3600);
        assert_eq!(Config::defaults().smtp, None);
        assert!(Config::defaults().accounts[0].email.enabled);

        let cases = [
            (
                "[smtp]\nhost = \"smtp.example.com\"\nsecurity = \"none\"\nfrom = \"a@b\"\n",
                "would send sign-in codes in the clear",
            ),
            (
                "[smtp]\nhost = \"smtp.example.com\"\nfrom = \"a@b\"\nusername = \"fz\"\n",
                "`username` and `password_file` go together",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(&format!("{text}{account}")).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let loopback = "[smtp]\nhost = \"127.0.0.1\"\nsecurity = \"none\"\nfrom = \"a@b\"\n";
        assert!(parse(&format!("{loopback}{account}")).is_ok());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let account = "[[accounts]]\nslug = \"acme\"\npolicy = \"p\"\n";
        let cases = [
            (
                format!("listen = \"0.0.0.0:80\"\n{account}"),
                "serves plain HTTP beyond loopback",
            ),
            (
                "listen = \"nowhere\"\n".to_owned(),
                "invalid socket address",
            ),
            ("".to_owned(), "no `[[accounts]]`"),
            (
                format!("{account}{account}"),
                "account `acme` is configured twice",
            ),
            (
                "[[accounts]]\nslug = \"Acme\"\npolicy = \"p\"\n".to_owned(),
                "account slug `Acme` must be",
            ),
            (
                format!("{account}colour = \"blue\"\n"),
                "unknown field `colour`",
            ),
            (
                format!("{account}token_lifetime_secs = 0\n"),
                "lifetimes must be at least one second",
            ),
            (
                format!("tls_cert = \"c.pem\"\n{account}"),
                "`tls_cert` and `tls_key` go together",
            ),
            (
                format!("relay_credential_lifetime_secs = 60\n{account}"),
                "`relay_credential_lifetime_secs = 60` is too short",
            ),
            (
                format!("[[relays]]\naddress = \"0.0.0.0:3478\"\nsecret_file = \"s\"\n{account}"),
                "relay `0.0.0.0:3478`: agents need an address",
            ),
            (
                format!(
                    "[[relays]]\naddress = \"203.0.113.5:3478\"\nsecret_file = \"s\"\n\
                     [[relays]]\naddress = \"203.0.113.5:3478\"\nsecret_file = \"t\"\n{account}"
                ),
                "relay `203.0.113.5:3478` is configured twice",
            ),
            (
                format!("[[relays]]\naddress = \"203.0.113.5:3478\"\n{account}"),
                "missing field `secret_file`",
            ),
            (
                format!("trusted_proxies = [\"10.0.0.0/8\"]\n{account}"),
                "`trusted_proxies` needs `trusted_proxy_header`",
            ),
            (
                format!("trusted_proxy_header = \"x forwarded\"\n{account}"),
                "is not a header name",
            ),
            (
                format!("trusted_proxies = [\"10.0.0.0/33\"]\n{account}"),
                "10.0.0.0/33",
            ),
            (
                format!("gateway_ack_timeout_ms = 0\n{account}"),
                "must be at least 1",
            ),
            (
                format!("hello_timeout_ms = 0\n{account}"),
                "`hello_timeout_ms` must be at least 1",
            ),
            (
                format!("max_connections = 1\n{account}"),
                "`max_connections` must be at least 2",
            ),
            (
                format!("max_unauthenticated_per_source = 0\n{account}"),
                "`max_unauthenticated_per_source` must be at least 1",
            ),
            (
                format!("max_connections = 100\nmax_unauthenticated_connections = 100\n{account}"),
                "leaves no room for agents",
            ),
            (
                format!(
                    "max_unauthenticated_connections = 10\n\
                     max_unauthenticated_per_source = 11\n{account}"
                ),
                "`max_unauthenticated_per_source = 11` is more than",
            ),
            (
                format!("max_connections = -1\n{account}"),
                "max_connections",
            ),
            (
                format!("{account}max_grants_per_client = 0\n"),
                "account `acme`: `max_grants_per_client`, `requests_per_second`",
            ),
            (
                format!("{account}flow_retention_days = 0\n"),
                "must be at least 1",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let open = parse(&format!(
            "listen = \"0.0.0.0:80\"\nallow_plain_http = true\n{account}"
        ));
        assert!(open.is_ok(), "{open:?}");
        let tls = parse(&format!(
            "listen = \"0.0.0.0:443\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n{account}"
        ))
        .unwrap();
        assert_eq!(
            tls.tls,
            Some(TlsFiles {
                cert: PathBuf::from("/etc/fz/c.pem"),
                key: PathBuf::from("/etc/fz/k.pem"),
            })
        );
        let relayed = parse(&format!(
            "relay_credential_lifetime_secs = 3600\n[[relays]]\naddress = \"203.0.113.5:3478\"\n\
             secret_file = \"relay-secret\"\n{account}"
        ))
        .unwrap();
        assert_eq!(
            relayed.relays,
            vec![RelayConfig {
                address: "203.0.113.5:3478".parse().unwrap(),
                secret_file: PathBuf::from("/etc/fz/relay-secret"),
            }]
        );
        assert_eq!(relayed.relay_credential_lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn the_store_is_sqlite_unless_a_postgres_url_is_given_which_debug_never_shows() {
        let account = "[[accounts]]\nslug = \"acme\"\npolicy = \"p\"\n";
        assert_eq!(parse(account).unwrap().database, Database::Sqlite);
        let url = "postgres://fz:hunter2@db.internal:5433/fz";
        let config = parse(&format!("database_url = \"{url}\"\n{account}")).unwrap();
        assert_eq!(config.database, Database::Postgres(url.to_owned()));
        assert!(!format!("{config:?}").contains("hunter2"));
        let error = parse(&format!("database_url = \"sqlite://x\"\n{account}")).unwrap_err();
        assert!(
            error.to_string().contains("must be a PostgreSQL URL"),
            "{error}"
        );
    }

    #[test]
    fn proxies_and_agent_timings() {
        let config = parse(
            "trusted_proxy_header = \"X-Forwarded-For\"\ngateway_heartbeat_interval_ms = 100\n\
             [[accounts]]\nslug = \"acme\"\npolicy = \"p\"\n",
        )
        .unwrap();
        let proxy = config.trusted_proxy.unwrap();
        assert_eq!(proxy.header, "x-forwarded-for");
        assert!(
            proxy
                .peers
                .iter()
                .any(|p| p.contains([127, 0, 0, 1].into()))
        );
        assert!(!proxy.peers.iter().any(|p| p.contains([10, 0, 0, 1].into())));
        assert_eq!(
            config.gateway_heartbeat_interval,
            Duration::from_millis(100)
        );
        assert_eq!(
            config.gateway_ack_timeout,
            Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS)
        );
    }

    #[test]
    fn connection_limits_and_their_defaults() {
        let account = "[[accounts]]\nslug = \"acme\"\npolicy = \"p\"\n";
        assert_eq!(
            parse(account).unwrap().connections,
            ConnectionLimits::default()
        );
        let config = parse(&format!(
            "tls_handshake_timeout_ms = 1000\nheader_read_timeout_ms = 2000\n\
             hello_timeout_ms = 3000\nmax_connections = 500\n\
             max_unauthenticated_connections = 100\nmax_unauthenticated_per_source = 8\n{account}"
        ))
        .unwrap();
        assert_eq!(
            config.connections,
            ConnectionLimits {
                tls_handshake_timeout: Duration::from_secs(1),
                header_read_timeout: Duration::from_secs(2),
                hello_timeout: Duration::from_secs(3),
                max_connections: Some(500),
                max_unauthenticated_connections: Some(100),
                max_unauthenticated_per_source: Some(8),
            }
        );
    }
}
