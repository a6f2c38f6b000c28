//! `fz-client sign-in`: the client's half of the design's sign-in sequence.
//!
//! The client draws a random 32-byte `state` and `nonce` (kept in memory only), opens the
//! account's sign-in page in the browser with both and its callback, and waits for the portal's
//! final redirect on a loopback listener (RFC 8252, section 7.3: `127.0.0.1`, an ephemeral port,
//! exactly one callback, a deadline). The callback must carry `account`, `fragment`, `state` and
//! `user`, each exactly once; `state` must be the one drawn (compared in constant time) and
//! `account` the one asked for. Only then is the token, `nonce ‖ fragment`, stored (0600). The
//! portal never saw the token whole: whoever reads the callback URL holds a fragment that is
//! useless without the nonce.
//!
//! [`Attempt`] is the sans-IO core (drawing, the URL, reading the callback); [`run`] is the
//! driver (the listener, the browser, the file). `fz-client sign-out` ([`sign_out`]) ends the
//! token at the portal and deletes it here.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fz_host::secrets::SecretError;

use crate::deep_link::{DEEP_LINK, DeepLinkError, Waiter};
use crate::token_store;
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The keys of the portal's callback, each exactly once.
pub const CALLBACK_KEYS: [&str; 4] = ["account", "fragment", "state", "user"];

/// How long a sign-in waits for its answer unless told otherwise: time to read a mail.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// The path the loopback listener answers.
pub const CALLBACK_PATH: &str = "/callback";

/// The longest request head the listener reads.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long one connection to the listener may take to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Sign in to an account of a portal through the browser, and keep the token this device gets.
#[derive(Debug, clap::Parser)]
#[command(name = "fz-client sign-in")]
pub struct SignInArgs {
    /// The portal, as the agents reach it (`ws://host:port`, `wss://host:port`) or as a
    /// browser does (`http://host:port`, `https://host:port`).
    #[arg(long, visible_alias = "portal", env = "FZ_PORTAL_URL")]
    pub portal_url: String,
    /// The account (its slug).
    #[arg(long, env = "FZ_ACCOUNT")]
    pub account: String,
    /// Keep the token in this file (mode 0600; the directory is made 0700) and nowhere else.
    /// Without it, the token goes to the desktop keyring (the Secret Service), or, when none
    /// answers, to `$XDG_CONFIG_HOME/fz/token` (or `~/.config/fz/token`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Only print the sign-in URL; do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// How long to wait for the sign-in to finish, in seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,
    /// How the browser hands the result back: to a listener on 127.0.0.1 (RFC 8252), or as
    /// the deep link `fz://handle_client_sign_in_callback`, which the desktop opens with
    /// `fz-client handle-url` once `fz-client install-url-handler` registered it.
    #[arg(long, value_enum, default_value_t = CallbackKind::Loopback)]
    pub callback: CallbackKind,
}

/// Where the portal sends a finished sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CallbackKind {
    Loopback,
    DeepLink,
}

/// Sign out: the portal revokes this device's token (closing its connections and withdrawing
/// its grants at once), and the token file is deleted.
#[derive(Debug, clap::Parser)]
#[command(name = "fz-client sign-out")]
pub struct SignOutArgs {
    /// The portal, as the agents reach it (`ws://host:port` or `wss://host:port`); each of its
    /// replicas, comma-separated, as the client is given them.
    #[arg(
        long,
        visible_alias = "portal",
        env = "FZ_PORTAL_URL",
        value_delimiter = ',',
        required = true
    )]
    pub portal_url: Vec<String>,
    /// The account (its slug).
    #[arg(long, env = "FZ_ACCOUNT")]
    pub account: String,
    /// The token file `sign-in` wrote, if it was given one. Without it, the token is looked
    /// for in the desktop keyring, then at `$XDG_CONFIG_HOME/fz/token` (or
    /// `~/.config/fz/token`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for a `wss://` portal, beside the system's.
    #[arg(long)]
    pub portal_ca: Option<PathBuf>,
}

/// Why a sign-in did not end with a stored token, or a sign-out with the token revoked and
/// deleted.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("`--portal-url {0}` must start with ws://, wss://, http:// or https://")]
    PortalUrl(String),
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("cannot listen for the portal's answer on 127.0.0.1: {0}")]
    Listen(std::io::Error),
    #[error("no sign-in finished within {0} s; run `fz-client sign-in` again")]
    Timeout(u64),
    #[error("the sign-in's answer is not valid: {0}; nothing was stored")]
    Callback(String),
    #[error(
        "the sign-in's answer carries another `state` than this sign-in drew: it was not made \
         for this sign-in (an old or forged link); nothing was stored"
    )]
    State,
    #[error("the sign-in's answer is for account `{got}`, not `{expected}`; nothing was stored")]
    Account { expected: String, got: String },
    #[error("cannot store the token: {0}")]
    Store(#[from] SecretError),
    #[error("cannot write to the terminal: {0}")]
    Output(std::io::Error),
    #[error("no token file given and neither XDG_CONFIG_HOME nor HOME is set: give `--token-file`")]
    NoHome,
    #[error("the portal did not revoke the token, which stays in {place}: {cause}")]
    SignOut {
        place: token_store::Place,
        cause: fz_link::LinkError,
    },
    #[error("no token to sign out with: none in the desktop keyring, nor at {0}")]
    NotSignedIn(token_store::Place),
    #[error("the token was revoked, but it cannot be deleted from {place}: {cause}")]
    Delete {
        place: token_store::Place,
        cause: String,
    },
    #[error(transparent)]
    DeepLink(#[from] DeepLinkError),
}

/// Signs out: the portal revokes the token, then the file is deleted. A token the portal
/// refuses already (revoked, expired) is deleted too; one it could not be asked about is kept.
pub async fn sign_out(args: SignOutArgs, out: &mut impl Write) -> Result<(), SignInError> {
    let file_only = args.token_file.is_some();
    let file = match args.token_file {
        Some(path) => path,
        None => default_token_file()?,
    };
    let name = token_entry(&args.portal_url, &args.account)?;
    let loaded = {
        let (name, file) = (name.clone(), file.clone());
        tokio::task::spawn_blocking(move || token_store::load(&name, &file, file_only))
            .await
            .map_err(|e| SignInError::Output(std::io::Error::other(e)))??
    };
    let Some((token, place)) = loaded else {
        return Err(SignInError::NotSignedIn(token_store::Place::File(file)));
    };
    let config = fz_link::PortalConfig {
        urls: args.portal_url,
        account: args.account.clone(),
        token,
        ca_file: args.portal_ca,
        socket_mark: None,
    };
    let said = match fz_link::sign_out(&config).await {
        Ok(()) => format!(
            "Signed out of {}: the portal revoked this device's token.",
            args.account
        ),
        Err(fz_link::LinkError::Answered { status: 401, .. }) => format!(
            "The portal no longer takes this token (revoked or expired); signed out of {}.",
            args.account
        ),
        Err(cause) => return Err(SignInError::SignOut { place, cause }),
    };
    let deleted = {
        let place = place.clone();
        tokio::task::spawn_blocking(move || token_store::delete(&place))
            .await
            .map_err(|e| SignInError::Output(std::io::Error::other(e)))?
    };
    deleted.map_err(|cause| SignInError::Delete {
        place: place.clone(),
        cause,
    })?;
    writeln!(out, "{said} Deleted it from {place}.").map_err(SignInError::Output)
}

/// What a finished sign-in gives.
pub struct SignedIn {
    /// `nonce ‖ fragment`: the device's token.
    pub token: String,
    /// Who signed in, as the portal says.
    pub user: String,
}

impl std::fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn")
            .field("token", &"<secret>")
            .field("user", &self.user)
            .finish()
    }
}

/// One sign-in: the nonce and state it drew, for the account it asks.
pub struct Attempt {
    nonce: String,
    state: String,
    account: String,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Attempt {
    /// Draws a nonce and a state, 32 random bytes each.
    pub fn new(account: &str) -> Result<Attempt, SignInError> {
        let draw = || {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(SignInError::Random)?;
            Ok::<_, SignInError>(URL_SAFE_NO_PAD.encode(bytes))
        };
        Ok(Attempt {
            nonce: draw()?,
            state: draw()?,
            account: account.to_owned(),
        })
    }

    /// The account's sign-in page on `portal` (an `http(s)://host:port` base), with this
    /// attempt's nonce and state, where the answer goes, and the device's name.
    pub fn url(&self, portal: &str, callback: &str, device: &str) -> String {
        let query = serde_urlencoded::to_string([
            ("as", "client"),
            ("nonce", self.nonce.as_str()),
            ("state", self.state.as_str()),
            ("callback", callback),
            ("name", device),
        ])
        .unwrap_or_default();
        format!("{portal}/{}?{query}", self.account)
    }

    /// Reads the portal's answer (the callback's query). Each key of [`CALLBACK_KEYS`] must be
    /// there exactly once and nothing else; the state must be this attempt's, the account the
    /// one asked for, and the fragment shaped as the portal makes them.
    pub fn finish(&self, query: &str) -> Result<SignedIn, SignInError> {
        let bad = |why: &str| SignInError::Callback(why.to_owned());
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| bad("its query cannot be read"))?;
        let mut found: [Option<&str>; 4] = [None; 4];
        for (key, value) in &pairs {
            let Some(slot) = CALLBACK_KEYS.iter().position(|k| k == key) else {
                return Err(bad(&format!(
                    "it has `{}`, which the portal never sends",
                    key.chars().take(32).collect::<String>()
                )));
            };
            if found[slot].replace(value).is_some() {
                return Err(bad(&format!("it has `{key}` more than once")));
            }
        }
        let [Some(account), Some(fragment), Some(state), Some(user)] = found else {
            return Err(bad(
                "it lacks one of `account`, `fragment`, `state` and `user`",
            ));
        };
        if !bool::from(state.as_bytes().ct_eq(self.state.as_bytes())) {
            return Err(SignInError::State);
        }
        if account != self.account {
            return Err(SignInError::Account {
                expected: self.account.clone(),
                got: account.chars().take(64).collect(),
            });
        }
        let shaped = fragment.starts_with("fz1.client.")
            && fragment.len() <= 512
            && fragment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !shaped {
            return Err(bad("its fragment is not a client token's"));
        }
        Ok(SignedIn {
            token: format!("{}{fragment}", self.nonce),
            user: user.chars().take(254).collect(),
        })
    }
}

/// The keyring entry of the token for `account` at a portal of these URLs: named by the first,
/// so a client given several replicas signs in at the first (see the client's `sign_in_first`)
/// and finds the token under the same name whichever replica it then connects to.
pub fn token_entry(portal_urls: &[String], account: &str) -> Result<String, SignInError> {
    let first = portal_urls
        .first()
        .ok_or_else(|| SignInError::PortalUrl(String::new()))?;
    Ok(token_store::entry_name(&portal_http_url(first)?, account))
}

/// The portal's address as a browser reaches it: `ws` becomes `http`, `wss` `https`.
pub fn portal_http_url(portal_url: &str) -> Result<String, SignInError> {
    let base = portal_url.trim_end_matches('/');
    for (from, to) in [
        ("wss://", "https://"),
        ("ws://", "http://"),
        ("https://", "https://"),
        ("http://", "http://"),
    ] {
        if let Some(rest) = base.strip_prefix(from)
            && !rest.is_empty()
        {
            return Ok(format!("{to}{rest}"));
        }
    }
    Err(SignInError::PortalUrl(portal_url.to_owned()))
}

/// The target of a request head's first line (`GET /callback?… HTTP/1.1`), if it is a GET.
pub fn request_target(head: &[u8]) -> Option<&str> {
    let line = head.split(|b| *b == b'\r' || *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(target), Some(version), None) if version.starts_with("HTTP/1.") => {
            Some(target)
        }
        _ => None,
    }
}

/// The token file's default place: `$XDG_CONFIG_HOME/fz/token`, else `~/.config/fz/token`.
pub fn default_token_file() -> Result<PathBuf, SignInError> {
    if let Some(config) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(config).join("fz").join("token"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".config").join("fz").join("token"))
        .ok_or(SignInError::NoHome)
}

/// Runs a sign-in to its end: says what to open on `out`, waits for the answer, stores the
/// token.
pub async fn run(args: SignInArgs, out: &mut impl Write) -> Result<SignedIn, SignInError> {
    let portal = portal_http_url(&args.portal_url)?;
    let file_only = args.token_file.is_some();
    let token_file = match args.token_file {
        Some(path) => path,
        None => default_token_file()?,
    };
    let attempt = Attempt::new(&args.account)?;
    let (waiting, callback) = match args.callback {
        CallbackKind::Loopback => {
            let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .await
                .map_err(SignInError::Listen)?;
            let port = listener.local_addr().map_err(SignInError::Listen)?.port();
            (
                Waiting::Loopback(listener),
                format!("http://127.0.0.1:{port}{CALLBACK_PATH}"),
            )
        }
        CallbackKind::DeepLink => (
            Waiting::DeepLink(Waiter::bind().await?),
            DEEP_LINK.to_owned(),
        ),
    };
    let url = attempt.url(&portal, &callback, &device_name());
    let say =
        |out: &mut dyn Write, text: &str| writeln!(out, "{text}").map_err(SignInError::Output);
    say(
        out,
        &format!(
            "Sign in to {} in your browser:\n\n    {url}\n",
            args.account
        ),
    )?;
    if !args.no_browser && !open_browser(&url) {
        say(
            out,
            "No browser could be opened here: open the address above in one.",
        )?;
    }
    say(
        out,
        &format!(
            "Waiting for the sign-in to finish (at most {} s)...",
            args.timeout_secs
        ),
    )?;
    out.flush().map_err(SignInError::Output)?;
    let answered = async {
        match &waiting {
            Waiting::Loopback(listener) => answer(listener, &attempt).await,
            Waiting::DeepLink(waiter) => waiter.take(|query| attempt.finish(query)).await,
        }
    };
    let signed_in = tokio::time::timeout(Duration::from_secs(args.timeout_secs), answered)
        .await
        .map_err(|_| SignInError::Timeout(args.timeout_secs))??;
    drop(waiting);
    let name = token_store::entry_name(&portal, &args.account);
    let stored = {
        let token = signed_in.token.clone();
        tokio::task::spawn_blocking(move || {
            token_store::store(&name, &token, &token_file, file_only)
        })
        .await
        .map_err(|e| SignInError::Output(std::io::Error::other(e)))??
    };
    let (place, no_keyring) = stored;
    say(
        out,
        &format!(
            "Signed in to {} as {}. The token is in {place}.",
            args.account, signed_in.user
        ),
    )?;
    if let Some(why) = no_keyring {
        say(out, &format!("(No desktop keyring answered: {why}.)"))?;
    }
    Ok(signed_in)
}

/// What a sign-in waits on for its answer.
enum Waiting {
    Loopback(TcpListener),
    DeepLink(Waiter),
}

/// Waits for the one callback: other paths (a browser's favicon) get a 404 and the wait goes
/// on; the first request for [`CALLBACK_PATH`] ends it, answered with a page that says how it
/// went.
async fn answer(listener: &TcpListener, attempt: &Attempt) -> Result<SignedIn, SignInError> {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(Some(target)) = tokio::time::timeout(HEAD_TIMEOUT, read_target(&mut stream)).await
        else {
            continue;
        };
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        if path != CALLBACK_PATH {
            respond(
                &mut stream,
                "404 Not Found",
                "Not here",
                "This is fz-client's sign-in listener.",
            )
            .await;
            continue;
        }
        let result = attempt.finish(query);
        match &result {
            Ok(signed_in) => {
                respond(
                    &mut stream,
                    "200 OK",
                    "Signed in",
                    &format!(
                        "You are signed in to {} as {}. You can close this tab.",
                        attempt.account, signed_in.user
                    ),
                )
                .await;
            }
            Err(error) => {
                respond(
                    &mut stream,
                    "400 Bad Request",
                    "Sign-in refused",
                    &error.to_string(),
                )
                .await;
            }
        }
        return result;
    }
}

/// Reads a request head (up to [`MAX_HEAD_BYTES`]) and returns its target.
async fn read_target(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await.ok()?;
        if read == 0 || head.len() + read > MAX_HEAD_BYTES {
            return None;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    request_target(&head).map(str::to_owned)
}

async fn respond(stream: &mut TcpStream, status: &str, title: &str, text: &str) {
    let escape = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fz: {title}</title>\
         </head><body style=\"font:16px system-ui,sans-serif;max-width:32rem;margin:4rem auto\">\
         <h1>{title}</h1><p>{}</p></body></html>",
        escape(text)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Asks the desktop to open `url` (`xdg-open`); false when there is none to ask.
fn open_browser(url: &str) -> bool {
    std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

/// The device's name for the portal: the host name.
fn device_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "device".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_query(attempt: &Attempt, extra: &[(&str, &str)]) -> String {
        let mut pairs = vec![
            ("account", "acme"),
            ("fragment", "fz1.client.acme.tok_1.secret.mac"),
            ("state", attempt.state.as_str()),
            ("user", "alice@acme.example"),
        ];
        pairs.extend_from_slice(extra);
        serde_urlencoded::to_string(pairs).unwrap()
    }

    #[test]
    fn the_url_carries_what_the_portal_needs() {
        let attempt = Attempt::new("acme").unwrap();
        let url = attempt.url(
            "http://127.0.0.1:8080",
            "http://127.0.0.1:5000/callback",
            "laptop",
        );
        let (base, query) = url.split_once('?').unwrap();
        assert_eq!(base, "http://127.0.0.1:8080/acme");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["as", "nonce", "state", "callback", "name"]);
        assert_eq!(pairs[1].1.len(), 43);
        assert_eq!(pairs[2].1.len(), 43);
        assert_ne!(pairs[1].1, pairs[2].1);
    }

    #[test]
    fn a_right_answer_gives_nonce_and_fragment() {
        let attempt = Attempt::new("acme").unwrap();
        let signed_in = attempt.finish(&answer_query(&attempt, &[])).unwrap();
        assert_eq!(
            signed_in.token,
            format!("{}fz1.client.acme.tok_1.secret.mac", attempt.nonce)
        );
        assert_eq!(signed_in.user, "alice@acme.example");
        assert!(!format!("{signed_in:?}").contains("fz1.client"));
    }

    #[test]
    fn wrong_answers_are_refused() {
        let attempt = Attempt::new("acme").unwrap();
        let other = Attempt::new("acme").unwrap();
        let cases: Vec<(String, &str)> = vec![
            (answer_query(&other, &[]), "another `state`"),
            (
                answer_query(&attempt, &[("state", "x")]),
                "`state` more than once",
            ),
            (
                answer_query(&attempt, &[("redirect", "x")]),
                "`redirect`, which",
            ),
            (
                answer_query(&attempt, &[]).replace("account=acme", "account=globex"),
                "for account `globex`",
            ),
            (
                answer_query(&attempt, &[]).replace("fz1.client.", "fz1.gateway."),
                "not a client token's",
            ),
            (
                serde_urlencoded::to_string([
                    ("account", "acme"),
                    ("state", attempt.state.as_str()),
                ])
                .unwrap(),
                "lacks one of",
            ),
        ];
        for (query, expected) in cases {
            let error = attempt.finish(&query).unwrap_err().to_string();
            assert!(error.contains(expected), "{query}: {error}");
        }
    }

    #[test]
    fn portal_urls_and_request_heads() {
        assert_eq!(
            portal_http_url("ws://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            portal_http_url("wss://portal.example").unwrap(),
            "https://portal.example"
        );
        assert!(portal_http_url("ftp://x").is_err());
        assert!(portal_http_url("ws://").is_err());
        assert_eq!(
            request_target(b"GET /callback?a=b HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/callback?a=b")
        );
        assert_eq!(request_target(b"POST /callback HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_target(b"GET /a b HTTP/1.1\r\n\r\n"), None);
    }
}
