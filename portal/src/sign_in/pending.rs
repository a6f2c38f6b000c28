//! Sign-ins under way: what a client asked for when it opened the account's sign-in page (its
//! nonce, its state and where to send the result), kept from then until the person has proven
//! who they are, for at most [`LIFETIME_SECS`]. The store keeps them (`sign_ins`), so that any
//! replica can take a sign-in's next step; this module decides what a kept one means. Sans-IO:
//! no clock (`now` is Unix seconds passed in), no sockets; ids come from the operating
//! system's generator.
//!
//! A sign-in is found by the hash of its cookie ([`id_hash`]), and the values a browser must
//! present besides it (the CSRF token, the OpenID Connect state, nonce and PKCE verifier) are
//! [`derived`] from the cookie at each step, never stored: a copy of the store cannot act for
//! a browser. Bounded: at most [`MAX_PENDING`] under way in all and [`MAX_PER_SOURCE`] per
//! source address ([`admit`]); the sweeper deletes expired ones.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use sha2::{Digest as _, Sha256};

use crate::credential;
use crate::random;
use crate::store::{SignInRecord, SignInsUnderWay};

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
    pub request: ClientRequest,
    /// The forms' anti-forgery token: only pages served for this sign-in carry it.
    pub csrf: String,
    /// The address a code was sent to, once asked for.
    pub email: Option<String>,
}

impl Pending {
    /// What the store keeps of a sign-in `account` starts at `now` for `request`.
    pub fn record(
        account: &str,
        request: &ClientRequest,
        source: Option<IpAddr>,
        now: i64,
    ) -> SignInRecord {
        SignInRecord {
            account: account.to_owned(),
            nonce: request.nonce.clone(),
            state: request.state.clone(),
            callback: request.callback.url(),
            device: request.device.clone(),
            email: None,
            started_at: now,
            source: source.map(|ip| ip.to_string()),
        }
    }

    /// The sign-in of `account` whose cookie is `id`, from what the store keeps under its
    /// hash, unless there is none, it expired at `now`, or it is another account's.
    pub fn read(
        id: &str,
        record: Option<SignInRecord>,
        account: &str,
        now: i64,
    ) -> Result<Pending, Missing> {
        let record = record.ok_or(Missing::Unknown)?;
        if now < record.started_at {
            return Err(Missing::StartedLater);
        }
        if now.saturating_sub(record.started_at) >= LIFETIME_SECS {
            return Err(Missing::Expired);
        }
        if record.account != account {
            return Err(Missing::OtherAccount);
        }
        // Only this module writes the record, from a request it read: one it cannot read
        // again is damaged, and names no sign-in.
        let callback = Callback::parse(&record.callback).map_err(|_| Missing::Unknown)?;
        Ok(Pending {
            request: ClientRequest {
                nonce: record.nonce,
                state: record.state,
                callback,
                device: record.device,
            },
            csrf: derived(id, "csrf", 0),
            email: record.email,
        })
    }
}

/// Whether one more sign-in may start, with these under way.
pub fn admit(under_way: SignInsUnderWay) -> Result<(), Refused> {
    if under_way.in_all >= MAX_PENDING as u64 {
        return Err(Refused::Full);
    }
    if under_way.from_source >= MAX_PER_SOURCE as u64 {
        return Err(Refused::Source);
    }
    Ok(())
}

/// Why a sign-in cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many sign-ins are under way from this address; finish one or wait a few minutes")]
    Source,
    #[error("too many sign-ins are under way; try again in a few minutes")]
    Full,
}

/// Why a sign-in id names no pending sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Never started, finished, or forgotten.
    Unknown,
    /// Older than [`LIFETIME_SECS`].
    Expired,
    /// Started after `now`: the clock went back.
    StartedLater,
    /// Started for another account.
    OtherAccount,
}

/// A new sign-in's id: the value of the browser's sign-in cookie, 32 random bytes in
/// unpadded base64url; `None` if the operating system's generator failed.
pub fn new_id() -> Option<String> {
    random::bytes::<32>()
        .ok()
        .map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
}

/// What the store finds sign-in `id` by: its SHA-256, in hex, so that a copy of the store
/// holds no cookie a browser could present.
pub fn id_hash(id: &str) -> String {
    random::hex(&Sha256::digest(id.as_bytes()))
}

/// A value only the holder of cookie `id` can compute, for one `purpose` (and trip `number`
/// to a provider): SHA-256 over both, in unpadded base64url (43 characters). It is computed
/// again at each step instead of stored, and tells nothing of `id` or of the values for
/// other purposes.
pub fn derived(id: &str, purpose: &str, number: i64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"fz sign-in\0");
    hasher.update(purpose.as_bytes());
    hasher.update([0]);
    hasher.update(number.to_be_bytes());
    hasher.update(id.as_bytes());
    URL_SAFE_NO_PAD.encode(hasher.finalize())
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
        let request = ClientRequest::from_query(&good()).unwrap();
        let record = || Some(Pending::record("acme", &request, None, 1_000));
        let id = new_id().unwrap();
        let read = |record, account, now| Pending::read(&id, record, account, now).err();
        assert_eq!(read(None, "acme", 1_000), Some(Missing::Unknown));
        assert_eq!(read(record(), "other", 1_000), Some(Missing::OtherAccount));
        assert_eq!(read(record(), "acme", 999), Some(Missing::StartedLater));
        assert_eq!(
            read(record(), "acme", 1_000 + LIFETIME_SECS),
            Some(Missing::Expired)
        );
        assert_eq!(read(record(), "acme", 1_000 + LIFETIME_SECS - 1), None);
        let mut damaged = record().unwrap();
        damaged.callback = "https://evil.example/callback".to_owned();
        assert_eq!(read(Some(damaged), "acme", 1_000), Some(Missing::Unknown));
    }

    #[test]
    fn a_kept_sign_in_reads_back_as_it_started() {
        let request = ClientRequest::from_query(&good()).unwrap();
        let source = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        let id = new_id().unwrap();
        let mut record = Pending::record("acme", &request, source, 1_000);
        // What the store counts per source address.
        assert_eq!(record.source.as_deref(), Some("192.0.2.1"));
        record.email = Some("alice@acme.example".to_owned());
        let pending = Pending::read(&id, Some(record), "acme", 1_000).unwrap();
        assert_eq!(pending.request, request);
        assert_eq!(pending.email.as_deref(), Some("alice@acme.example"));
        assert_eq!(pending.csrf, derived(&id, "csrf", 0));
    }

    #[test]
    fn derived_values_belong_to_one_cookie_and_one_purpose() {
        let id = new_id().unwrap();
        let other = new_id().unwrap();
        assert_eq!(id.len(), 43);
        assert_ne!(id, other);
        assert_eq!(id_hash(&id).len(), 64);
        assert_ne!(id_hash(&id), id_hash(&other));
        let values = [
            derived(&id, "csrf", 0),
            derived(&other, "csrf", 0),
            derived(&id, "oidc-state", 1),
            derived(&id, "oidc-state", 2),
            derived(&id, "oidc-nonce", 1),
        ];
        for (i, a) in values.iter().enumerate() {
            assert_eq!(a.len(), 43);
            assert_ne!(a, &id);
            assert!(!id_hash(&id).contains(a.as_str()));
            for b in &values[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(derived(&id, "csrf", 0), derived(&id, "csrf", 0));
    }

    #[test]
    fn sign_ins_are_bounded_in_all_and_per_source() {
        let under_way = |in_all: usize, from_source: usize| SignInsUnderWay {
            in_all: in_all as u64,
            from_source: from_source as u64,
        };
        assert_eq!(admit(under_way(0, 0)), Ok(()));
        assert_eq!(
            admit(under_way(MAX_PENDING - 1, MAX_PER_SOURCE - 1)),
            Ok(())
        );
        assert_eq!(admit(under_way(10, MAX_PER_SOURCE)), Err(Refused::Source));
        assert_eq!(admit(under_way(MAX_PENDING, 0)), Err(Refused::Full));
    }
}
