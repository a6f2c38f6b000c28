//! Sign-ins under way: what a client asked for when it opened the account's sign-in page (its
//! nonce, its state and where to send the result), kept from then until the person has proven
//! who they are, for at most [`LIFETIME_SECS`]. Sans-IO: no clock (`now` is Unix seconds
//! passed in), no sockets; ids come from the operating system's generator.
//!
//! Bounded: at most [`MAX_PENDING`] in all and [`MAX_PER_SOURCE`] per source address; a full
//! table first forgets what has expired, then refuses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::credential;
use crate::random;
use crate::sign_in::oidc::OidcAttempt;

/// A sign-in not finished within 15 minutes is forgotten (the code sent by email lives as
/// long).
pub const LIFETIME_SECS: i64 = 15 * 60;

/// Sign-ins under way at once, across accounts: far more than people sign in at one moment,
/// and at about 1 KB each, 10 MB at most.
pub const MAX_PENDING: usize = 10_000;

/// Sign-ins under way at once from one source address (an office behind one NAT starts a few
/// at 9 am; a script starting thousands is refused).
pub const MAX_PER_SOURCE: usize = 64;

/// The deep link a client registers for itself (`fz-client install-url-handler`).
pub use fz_proto::SIGN_IN_DEEP_LINK as DEEP_LINK;

/// The path of a client's loopback listener.
pub const LOOPBACK_PATH: &str = "/callback";

/// The longest `state` a client may send.
pub const MAX_STATE_CHARS: usize = 128;

/// The longest device name kept.
pub const MAX_DEVICE_CHARS: usize = 64;

/// Where the portal sends a finished sign-in: only ever the client's own handler, never a
/// place the request names freely (no open redirect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callback {
    /// The client's listener on a loopback address (RFC 8252, section 7.3), at
    /// [`LOOPBACK_PATH`].
    Loopback { ip: IpAddr, port: u16 },
    /// [`DEEP_LINK`].
    DeepLink,
}

impl Callback {
    /// Reads a `callback` parameter: exactly `http://127.0.0.1:PORT/callback`,
    /// `http://[::1]:PORT/callback` or [`DEEP_LINK`].
    pub fn parse(text: &str) -> Result<Callback, &'static str> {
        const REFUSED: &str = "`callback` must be the client's own handler: \
                               http://127.0.0.1:PORT/callback, http://[::1]:PORT/callback or \
                               fz://handle_client_sign_in_callback";
        if text == DEEP_LINK {
            return Ok(Callback::DeepLink);
        }
        let (ip, rest) = if let Some(rest) = text.strip_prefix("http://127.0.0.1:") {
            (IpAddr::V4(Ipv4Addr::LOCALHOST), rest)
        } else if let Some(rest) = text.strip_prefix("http://[::1]:") {
            (IpAddr::V6(Ipv6Addr::LOCALHOST), rest)
        } else {
            return Err(REFUSED);
        };
        let port = rest.strip_suffix(LOOPBACK_PATH).ok_or(REFUSED)?;
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(REFUSED);
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Callback::Loopback { ip, port }),
            _ => Err(REFUSED),
        }
    }

    /// The URL the result goes to, before its query.
    pub fn url(&self) -> String {
        match self {
            Callback::Loopback {
                ip: IpAddr::V6(ip),
                port,
            } => format!("http://[{ip}]:{port}{LOOPBACK_PATH}"),
            Callback::Loopback { ip, port } => format!("http://{ip}:{port}{LOOPBACK_PATH}"),
            Callback::DeepLink => DEEP_LINK.to_owned(),
        }
    }

    /// The origin a Content-Security-Policy's `form-action` must allow for a form whose answer
    /// redirects here.
    pub fn origin(&self) -> String {
        match self {
            Callback::Loopback {
                ip: IpAddr::V6(ip),
                port,
            } => format!("http://[{ip}]:{port}"),
            Callback::Loopback { ip, port } => format!("http://{ip}:{port}"),
            Callback::DeepLink => "fz:".to_owned(),
        }
    }
}

/// What a client asks for when it opens the sign-in page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    /// 32 random bytes (base64url) the token will be bound to (`credential`).
    pub nonce: String,
    /// The client's own value, handed back untouched so it can tell its answer.
    pub state: String,
    pub callback: Callback,
    /// What the client calls its device: the token's name.
    pub device: String,
}

impl ClientRequest {
    /// Reads the sign-in page's query: `as=client`, `nonce`, `state`, `callback` and
    /// optionally `name`, each at most once; nothing else.
    pub fn from_query(pairs: &[(String, String)]) -> Result<ClientRequest, String> {
        let mut found: HashMap<&str, &str> = HashMap::new();
        for (key, value) in pairs {
            if !matches!(key.as_str(), "as" | "nonce" | "state" | "callback" | "name") {
                return Err(format!("`{}` is not a sign-in parameter", cut(key, 32)));
            }
            if found.insert(key, value).is_some() {
                return Err(format!("`{key}` is given more than once"));
            }
        }
        if found.get("as") != Some(&"client") {
            return Err("`as` must be `client`: sign-ins start from the fz client".to_owned());
        }
        let nonce = found.get("nonce").copied().unwrap_or_default();
        if !credential::is_nonce(nonce) {
            return Err(
                "`nonce` must be 32 random bytes in unpadded base64url (43 characters)".to_owned(),
            );
        }
        let state = found.get("state").copied().unwrap_or_default();
        let state_ok =
            (16..=MAX_STATE_CHARS).contains(&state.len()) && URL_SAFE_NO_PAD.decode(state).is_ok();
        if !state_ok {
            return Err(format!(
                "`state` must be 16 to {MAX_STATE_CHARS} characters of unpadded base64url"
            ));
        }
        let callback = Callback::parse(found.get("callback").copied().unwrap_or_default())?;
        let device: String = found
            .get("name")
            .copied()
            .unwrap_or("device")
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_DEVICE_CHARS)
            .collect();
        Ok(ClientRequest {
            nonce: nonce.to_owned(),
            state: state.to_owned(),
            callback,
            device: if device.trim().is_empty() {
                "device".to_owned()
            } else {
                device
            },
        })
    }
}

/// A sign-in under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub account: String,
    pub request: ClientRequest,
    /// The forms' anti-forgery token: only pages served for this sign-in carry it.
    pub csrf: String,
    /// The address a code was sent to, once asked for.
    pub email: Option<String>,
    /// The sign-in under way at an OpenID Connect provider, once the person was sent there.
    pub oidc: Option<OidcAttempt>,
    pub started_at: i64,
    pub source: Option<IpAddr>,
}

/// Why a sign-in cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many sign-ins are under way from this address; finish one or wait a few minutes")]
    Source,
    #[error("too many sign-ins are under way; try again in a few minutes")]
    Full,
    #[error("the system random number generator failed")]
    Random,
}

/// The sign-ins under way, by id (the value of the browser's sign-in cookie).
#[derive(Debug, Default)]
pub struct PendingSignIns {
    by_id: HashMap<String, Pending>,
}

impl PendingSignIns {
    /// Starts a sign-in and returns its id (32 random bytes, base64url) and anti-forgery
    /// token.
    pub fn start(
        &mut self,
        account: &str,
        request: ClientRequest,
        source: Option<IpAddr>,
        now: i64,
    ) -> Result<(String, String), Refused> {
        if self.by_id.len() >= MAX_PENDING {
            self.forget_expired(now);
            if self.by_id.len() >= MAX_PENDING {
                return Err(Refused::Full);
            }
        }
        if source.is_some() {
            let from_source = self
                .by_id
                .values()
                .filter(|p| p.source == source && !expired(p, now))
                .count();
            if from_source >= MAX_PER_SOURCE {
                return Err(Refused::Source);
            }
        }
        let id = token().ok_or(Refused::Random)?;
        let csrf = token().ok_or(Refused::Random)?;
        self.by_id.insert(
            id.clone(),
            Pending {
                account: account.to_owned(),
                request,
                csrf: csrf.clone(),
                email: None,
                oidc: None,
                started_at: now,
                source,
            },
        );
        Ok((id, csrf))
    }

    /// The sign-in `id` of `account`, unless it expired at `now` (then it is forgotten).
    pub fn get_mut(&mut self, id: &str, account: &str, now: i64) -> Option<&mut Pending> {
        self.lookup(id, account, now).ok()
    }

    /// [`PendingSignIns::get_mut`], saying why there is none, for the log.
    pub fn lookup(&mut self, id: &str, account: &str, now: i64) -> Result<&mut Pending, Missing> {
        if let Some(pending) = self.by_id.get(id)
            && expired(pending, now)
        {
            let missing = if now < pending.started_at {
                Missing::StartedLater
            } else {
                Missing::Expired
            };
            self.by_id.remove(id);
            return Err(missing);
        }
        match self.by_id.get_mut(id) {
            Some(pending) if pending.account == account => Ok(pending),
            Some(_) => Err(Missing::OtherAccount),
            None => Err(Missing::Unknown),
        }
    }

    /// Ends the sign-in `id`: it can be used no more.
    pub fn finish(&mut self, id: &str) -> Option<Pending> {
        self.by_id.remove(id)
    }

    /// Forgets every sign-in that expired at `now`.
    pub fn forget_expired(&mut self, now: i64) {
        self.by_id.retain(|_, p| !expired(p, now));
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Why a sign-in id names no pending sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Never started here, finished, or forgotten.
    Unknown,
    /// Older than [`LIFETIME_SECS`].
    Expired,
    /// Started after `now`: the clock went back.
    StartedLater,
    /// Started for another account.
    OtherAccount,
}

fn expired(pending: &Pending, now: i64) -> bool {
    now.saturating_sub(pending.started_at) >= LIFETIME_SECS || now < pending.started_at
}

/// 32 random bytes in unpadded base64url.
fn token() -> Option<String> {
    random::bytes::<32>()
        .ok()
        .map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
}

fn cut(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn nonce() -> String {
        URL_SAFE_NO_PAD.encode([1u8; 32])
    }

    fn good() -> Vec<(String, String)> {
        query(&[
            ("as", "client"),
            ("nonce", &nonce()),
            ("state", &URL_SAFE_NO_PAD.encode([2u8; 32])),
            ("callback", "http://127.0.0.1:49152/callback"),
            ("name", "alice's laptop"),
        ])
    }

    #[test]
    fn callbacks_are_the_clients_handler_and_nothing_else() {
        assert_eq!(
            Callback::parse("http://127.0.0.1:49152/callback"),
            Ok(Callback::Loopback {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 49152
            })
        );
        assert_eq!(
            Callback::parse("http://[::1]:1/callback").map(|c| c.url()),
            Ok("http://[::1]:1/callback".to_owned())
        );
        assert_eq!(Callback::parse(DEEP_LINK), Ok(Callback::DeepLink));
        for open_redirect in [
            "https://evil.example/callback",
            "http://127.0.0.1.evil.example:80/callback",
            "http://127.0.0.1:80@evil.example/callback",
            "http://127.0.0.1:80/callback/../../elsewhere",
            "http://127.0.0.1:80/callback?x=y",
            "http://127.0.0.1:0/callback",
            "http://127.0.0.1:65536/callback",
            "http://127.0.0.1:+80/callback",
            "http://localhost:80/callback",
            "http://192.168.1.1:80/callback",
            "fz://handle_client_sign_in_callback.evil",
            "//evil.example",
            "",
        ] {
            assert!(Callback::parse(open_redirect).is_err(), "{open_redirect}");
        }
    }

    #[test]
    fn a_client_request_needs_every_part_once() {
        let request = ClientRequest::from_query(&good()).unwrap();
        assert_eq!(request.nonce, nonce());
        assert_eq!(request.device, "alice's laptop");
        let without = |key: &str| {
            good()
                .into_iter()
                .filter(|(k, _)| k != key)
                .collect::<Vec<_>>()
        };
        let mut twice = good();
        twice.push(("state".to_owned(), URL_SAFE_NO_PAD.encode([3u8; 32])));
        let mut unknown = good();
        unknown.push(("redirect_uri".to_owned(), "https://evil.example".to_owned()));
        let cases = [
            (without("as"), "`as` must be `client`"),
            (without("nonce"), "`nonce` must be"),
            (without("state"), "`state` must be"),
            (without("callback"), "`callback` must be"),
            (twice, "`state` is given more than once"),
            (unknown, "`redirect_uri` is not a sign-in parameter"),
        ];
        for (pairs, expected) in cases {
            let error = ClientRequest::from_query(&pairs).unwrap_err();
            assert!(error.starts_with(expected), "{error}");
        }
        assert_eq!(
            ClientRequest::from_query(&without("name")).unwrap().device,
            "device"
        );
    }

    #[test]
    fn a_missing_sign_in_says_why() {
        let mut table = PendingSignIns::default();
        let request = ClientRequest::from_query(&good()).unwrap();
        let (id, _) = table.start("acme", request.clone(), None, 1_000).unwrap();
        assert_eq!(
            table.lookup(&id, "other", 1_000).err(),
            Some(Missing::OtherAccount)
        );
        assert_eq!(
            table.lookup("nope", "acme", 1_000).err(),
            Some(Missing::Unknown)
        );
        assert_eq!(
            table.lookup(&id, "acme", 999).err(),
            Some(Missing::StartedLater)
        );
        assert_eq!(
            table.lookup(&id, "acme", 1_000).err(),
            Some(Missing::Unknown),
            "forgotten"
        );
        let (id, _) = table.start("acme", request, None, 1_000).unwrap();
        assert_eq!(
            table.lookup(&id, "acme", 1_000 + LIFETIME_SECS).err(),
            Some(Missing::Expired)
        );
    }

    #[test]
    fn sign_ins_expire_and_are_bounded_per_source() {
        let mut table = PendingSignIns::default();
        let request = ClientRequest::from_query(&good()).unwrap();
        let source = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        let (id, csrf) = table.start("acme", request.clone(), source, 1_000).unwrap();
        assert_eq!(id.len(), 43);
        assert_ne!(id, csrf);
        assert!(table.get_mut(&id, "other", 1_000).is_none());
        assert!(
            table
                .get_mut(&id, "acme", 1_000 + LIFETIME_SECS - 1)
                .is_some()
        );
        assert!(table.get_mut(&id, "acme", 1_000 + LIFETIME_SECS).is_none());
        assert!(table.is_empty());

        for _ in 0..MAX_PER_SOURCE {
            table.start("acme", request.clone(), source, 2_000).unwrap();
        }
        assert_eq!(
            table.start("acme", request.clone(), source, 2_000),
            Err(Refused::Source)
        );
        let elsewhere = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)));
        let (id, _) = table
            .start("acme", request.clone(), elsewhere, 2_000)
            .unwrap();
        assert!(table.finish(&id).is_some());
        assert!(table.finish(&id).is_none());
        // Expired ones make room again.
        assert!(
            table
                .start("acme", request, source, 2_000 + LIFETIME_SECS)
                .is_ok()
        );
    }
}
