//! Token text: what the portal hands out, what an agent presents, and what the store keeps of
//! it. Sans-IO: no clock, no store; the randomness comes from the caller's `random` calls.
//!
//! A token is `nonce ‖ fragment`:
//!
//! - the **fragment** is what the portal hands out:
//!   `fz1.<kind>.<account>.<token id>.<secret>.<mac>`, where `kind` is `client` or `gateway`,
//!   `secret` is 32 random bytes and `mac` an HMAC-SHA256, under the portal's token key, of
//!   the version, kind, account, id and secret (all unpadded base64url where binary). The MAC
//!   lets the portal refuse a forged or edited fragment, or one of the wrong kind for the route
//!   it is shown to, before it touches the store, and binds the label: a client fragment can
//!   never be shown as a gateway's, nor one account's as another's.
//! - the **nonce** (43 characters: 32 random bytes, unpadded base64url) is drawn by the client
//!   that signs in and sent to the portal once, in the request that opens the sign-in page. The
//!   portal hands back only the fragment (through the browser, in the callback URL), so that
//!   URL alone is useless to whoever reads it. Tokens an admin makes (gateways, service
//!   accounts) have no nonce: the fragment is the whole token.
//!
//! The store keeps only [`stored_hash`]`(nonce, fragment, salt)` with a per-token random salt:
//! never the token, the fragment or the nonce. SHA-256 suffices (rather than a slow password
//! hash) because every token holds at least 256 random bits.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::random;

/// The format's version, the fragment's first field.
pub const VERSION: &str = "fz1";

/// A nonce's length: 32 bytes in unpadded base64url.
pub const NONCE_CHARS: usize = 43;

/// The longest token text read at all; anything longer is refused unread.
pub const MAX_TOKEN_BYTES: usize = 512;

/// The salt's length in bytes; the store keeps it, and the hash covers it, in hex.
pub const SALT_BYTES: usize = 16;

/// Domain separation for the stored hash.
const HASH_LABEL: &[u8] = b"fz token hash v1";

/// What a token may be used for: the label inside the fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Client,
    Gateway,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Client => "client",
            Label::Gateway => "gateway",
        }
    }

    fn parse(text: &str) -> Option<Label> {
        match text {
            "client" => Some(Label::Client),
            "gateway" => Some(Label::Gateway),
            _ => None,
        }
    }
}

/// The portal's key for token fragments (HMAC-SHA256). Every portal that accepts a token
/// must hold the key that made it.
pub struct TokenKey(hmac::Key);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<secret>)")
    }
}

/// A fragment just made, with what the store keeps of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// What is handed out (for a token with a nonce, the token less its nonce).
    pub fragment: String,
    /// The random salt, in hex (the hash covers this text).
    pub salt: String,
    /// [`stored_hash`] of the nonce, the fragment and the salt.
    pub hash: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(<secret>)")
    }
}

/// Why a fragment cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// Account slugs and token ids are fields of the fragment: no dots, nothing empty.
    #[error("`{0}` cannot be a field of a token")]
    Field(String),
    /// A nonce must be 32 bytes in unpadded base64url.
    #[error("a sign-in nonce must be 43 characters of unpadded base64url (32 random bytes)")]
    Nonce,
}

impl TokenKey {
    pub fn from_seed(seed: [u8; 32]) -> TokenKey {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, &seed))
    }

    /// Makes a fragment for token `id` of `account`, bound to `nonce` when a client drew one
    /// (see the module's doc).
    pub fn issue(
        &self,
        label: Label,
        account: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<Issued, IssueError> {
        for field in [account, id] {
            if field.is_empty() || !field.bytes().all(is_field_byte) {
                return Err(IssueError::Field(field.to_owned()));
            }
        }
        if let Some(nonce) = nonce
            && !is_nonce(nonce)
        {
            return Err(IssueError::Nonce);
        }
        let secret = URL_SAFE_NO_PAD.encode(random::bytes::<32>().map_err(IssueError::Random)?);
        let mac = self.mac(label, account, id, &secret);
        let fragment = format!(
            "{VERSION}.{}.{account}.{id}.{secret}.{}",
            label.as_str(),
            URL_SAFE_NO_PAD.encode(mac.as_ref())
        );
        let salt = random::hex(&random::bytes::<SALT_BYTES>().map_err(IssueError::Random)?);
        Ok(Issued {
            hash: stored_hash(nonce.unwrap_or(""), &fragment, &salt),
            salt,
            fragment,
        })
    }

    fn mac(&self, label: Label, account: &str, id: &str, secret: &str) -> hmac::Tag {
        // NUL never occurs in a field, so the fields cannot be shifted into each other.
        let mut context = hmac::Context::with_key(&self.0);
        for field in [VERSION, label.as_str(), account, id, secret] {
            context.update(field.as_bytes());
            context.update(&[0]);
        }
        context.sign()
    }

    /// Reads token text as an agent presents it. `None` for anything that is not a token this
    /// key made: too long, malformed, or with a MAC that does not verify.
    pub fn read<'a>(&self, text: &'a str) -> Option<Presented<'a>> {
        if text.len() > MAX_TOKEN_BYTES {
            return None;
        }
        // A nonce is base64url, which has no dot, and the fragment starts with `fz1.`.
        let (nonce, fragment) = if text.starts_with(VERSION) {
            ("", text)
        } else {
            let (nonce, fragment) = text.split_at_checked(NONCE_CHARS)?;
            (is_nonce(nonce) && fragment.starts_with(VERSION)).then_some((nonce, fragment))?
        };
        let mut fields = fragment.split('.');
        let (Some(VERSION), Some(label), Some(account), Some(id), Some(secret), Some(mac), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        let label = Label::parse(label)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let expected = self.mac(label, account, id, secret);
        if !bool::from(expected.as_ref().ct_eq(&mac)) {
            return None;
        }
        Some(Presented {
            nonce,
            fragment,
            label,
            account,
            id,
        })
    }
}

/// A token whose fragment this portal made (its MAC verified). Whether it is live, and whether
/// its nonce is the one it was issued for, only the store can say: see [`Presented::hash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presented<'a> {
    nonce: &'a str,
    fragment: &'a str,
    pub label: Label,
    pub account: &'a str,
    pub id: &'a str,
}

impl Presented<'_> {
    /// The hash the store must hold for this token, given the token's salt (hex).
    pub fn hash(&self, salt: &str) -> String {
        stored_hash(self.nonce, self.fragment, salt)
    }
}

/// What the store keeps of a token: SHA-256 over a label, the nonce (length-prefixed, empty
/// for a token without one), the fragment and the salt's hex, in lowercase hex.
pub fn stored_hash(nonce: &str, fragment: &str, salt: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(HASH_LABEL);
    hasher.update(u32::try_from(nonce.len()).unwrap_or(u32::MAX).to_be_bytes());
    hasher.update(nonce.as_bytes());
    hasher.update(fragment.as_bytes());
    hasher.update(salt.as_bytes());
    random::hex(&hasher.finalize())
}

/// Whether `text` can be a sign-in nonce: exactly 32 bytes in unpadded base64url.
pub fn is_nonce(text: &str) -> bool {
    text.len() == NONCE_CHARS && URL_SAFE_NO_PAD.decode(text).is_ok_and(|b| b.len() == 32)
}

fn is_field_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "acme";
    const ID: &str = "tok_00112233445566778899aabb";

    fn key(seed: u8) -> TokenKey {
        TokenKey::from_seed([seed; 32])
    }

    fn nonce() -> String {
        URL_SAFE_NO_PAD.encode([7u8; 32])
    }

    #[test]
    fn a_fragment_reads_back_with_its_fields_and_its_hash() {
        let key = key(1);
        let issued = key.issue(Label::Client, ACCOUNT, ID, None).unwrap();
        let presented = key.read(&issued.fragment).unwrap();
        assert_eq!(presented.label, Label::Client);
        assert_eq!(presented.account, ACCOUNT);
        assert_eq!(presented.id, ID);
        assert_eq!(presented.hash(&issued.salt), issued.hash);
        assert_eq!(issued.salt.len(), 2 * SALT_BYTES);
        assert!(issued.fragment.starts_with("fz1.client.acme.tok_"));
        assert!(issued.fragment.len() < MAX_TOKEN_BYTES);
    }

    #[test]
    fn a_nonce_bound_token_needs_its_nonce() {
        let key = key(1);
        let nonce = nonce();
        let issued = key.issue(Label::Client, ACCOUNT, ID, Some(&nonce)).unwrap();
        let salt = issued.salt.as_str();
        let whole = format!("{nonce}{}", issued.fragment);
        let with_nonce = key.read(&whole).unwrap();
        // The fragment alone reads (its MAC is good) but hashes to something else: the store
        // finds no match.
        let alone = key.read(&issued.fragment).unwrap();
        assert_eq!(with_nonce.hash(salt), issued.hash);
        assert_ne!(alone.hash(salt), issued.hash);
        let other = format!("{}{}", URL_SAFE_NO_PAD.encode([8u8; 32]), issued.fragment);
        assert_ne!(key.read(&other).unwrap().hash(salt), issued.hash);
    }

    #[test]
    fn forged_edited_relabelled_or_foreign_fragments_do_not_read() {
        let key = key(1);
        let issued = key.issue(Label::Client, ACCOUNT, ID, None).unwrap();
        let fragment = &issued.fragment;
        let relabelled = fragment.replacen(".client.", ".gateway.", 1);
        let other_account = fragment.replacen(".acme.", ".acne.", 1);
        let other_id = fragment.replacen("tok_0", "tok_1", 1);
        let mut last_changed = fragment.clone();
        let last = last_changed.pop().unwrap();
        last_changed.push(if last == 'A' { 'B' } else { 'A' });
        let cases = [
            ("relabelled as a gateway token", relabelled),
            ("moved to another account", other_account),
            ("another token id", other_id),
            ("MAC changed", last_changed),
            ("another portal's key", key_two_fragment()),
            ("a field more", format!("{fragment}.x")),
            ("empty", String::new()),
            ("version only", "fz1.".to_owned()),
            (
                "too long",
                format!("{fragment}{}", "A".repeat(MAX_TOKEN_BYTES)),
            ),
            ("a short nonce", format!("abc{fragment}")),
            ("an old secret", format!("fzt_{}", "A".repeat(43))),
        ];
        for (case, text) in cases {
            assert!(key.read(&text).is_none(), "{case}");
        }
    }

    fn key_two_fragment() -> String {
        key(2)
            .issue(Label::Client, ACCOUNT, ID, None)
            .unwrap()
            .fragment
    }

    #[test]
    fn fields_that_would_break_the_format_are_refused() {
        let key = key(1);
        assert!(matches!(
            key.issue(Label::Client, "a.b", ID, None),
            Err(IssueError::Field(_))
        ));
        assert!(matches!(
            key.issue(Label::Client, ACCOUNT, "", None),
            Err(IssueError::Field(_))
        ));
        assert!(matches!(
            key.issue(Label::Client, ACCOUNT, ID, Some("short")),
            Err(IssueError::Nonce)
        ));
    }

    #[test]
    fn fragments_differ_and_keep_to_base64url() {
        let key = key(1);
        let a = key.issue(Label::Gateway, ACCOUNT, ID, None).unwrap();
        let b = key.issue(Label::Gateway, ACCOUNT, ID, None).unwrap();
        assert_ne!(a.fragment, b.fragment);
        assert_ne!(a.salt, b.salt);
        assert!(a.fragment.bytes().all(|b| is_field_byte(b) || b == b'.'));
        assert!(!format!("{a:?}").contains(&a.fragment));
    }
}
