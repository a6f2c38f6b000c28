//! One-time sign-in codes: drawn, shown, read back from what a person typed, hashed and
//! checked. Sans-IO but for the operating system's random numbers.
//!
//! A code is 8 characters from an alphabet without look-alikes (no `0`/`O`, `1`/`I`/`L`): 31
//! symbols, so about 39.6 bits, of which a guesser gets 3 tries before the code is void. It is
//! shown as `ABCD-EFGH`; case, spaces and dashes in what is typed do not matter.
//!
//! Codes are stored as argon2id PHC strings (the crate's defaults: 19 MiB, 2 passes), so a
//! copy of the store does not give live codes away in their 15 minutes. Hashing and checking
//! cost tens of milliseconds: callers run them off the async threads.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};

use crate::random;

/// The symbols a code is made of.
pub const ALPHABET: &[u8; 31] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

/// How many symbols a code has.
pub const LENGTH: usize = 8;

/// A code the operating system's generator could not draw, or argon2 could not hash.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("cannot hash the code: {0}")]
    Hash(argon2::password_hash::Error),
}

/// Draws a code (uniformly: each symbol by rejection sampling).
pub fn generate() -> Result<String, CodeError> {
    (0..LENGTH)
        .map(|_| {
            random::index(ALPHABET.len())
                .map(|i| char::from(ALPHABET[i]))
                .map_err(CodeError::Random)
        })
        .collect()
}

/// The code as a person reads it: `ABCD-EFGH`.
pub fn display(code: &str) -> String {
    let (head, tail) = code.split_at(code.len().min(LENGTH / 2));
    format!("{head}-{tail}")
}

/// What a person typed, as a code, if it can be one: spaces and dashes dropped, letters made
/// upper case, then exactly [`LENGTH`] symbols of the [`ALPHABET`].
pub fn normalise(typed: &str) -> Option<String> {
    if typed.len() > 64 {
        return None;
    }
    let code: String = typed
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == LENGTH && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// The argon2id PHC string of `code`, with a fresh random salt.
pub fn hash(code: &str) -> Result<String, CodeError> {
    let salt = random::bytes::<16>().map_err(CodeError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(CodeError::Hash)?;
    Argon2::default()
        .hash_password(code.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(CodeError::Hash)
}

/// Whether `code` is the one `hash` was made of (argon2 compares in constant time). A hash
/// that cannot be read matches nothing.
pub fn verify(hash: &str, code: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(code.as_bytes(), &hash)
            .is_ok()
    })
}

/// A hash of no code anyone holds, to check against when no code waits, so that the answer
/// takes as long as when one does.
pub fn dummy_hash() -> &'static str {
    static DUMMY: LazyLock<String> = LazyLock::new(|| {
        // Sixteen zero bytes: a valid salt, so this never falls back to the empty string
        // (which would match nothing too, only faster).
        SaltString::from_b64("AAAAAAAAAAAAAAAAAAAAAA")
            .and_then(|salt| {
                Argon2::default()
                    .hash_password(b"no code is this", &salt)
                    .map(|hash| hash.to_string())
            })
            .unwrap_or_default()
    });
    &DUMMY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_the_alphabet_and_read_back_however_they_are_typed() {
        let code = generate().unwrap();
        assert_eq!(code.len(), LENGTH);
        assert!(code.bytes().all(|b| ALPHABET.contains(&b)));
        let shown = display(&code);
        assert_eq!(shown.len(), LENGTH + 1);
        assert_eq!(normalise(&shown).as_deref(), Some(code.as_str()));
        let typed = format!(" {} ", shown.to_lowercase().replace('-', " - "));
        assert_eq!(normalise(&typed).as_deref(), Some(code.as_str()));
        for bad in [
            "",
            "ABCD-EFG",
            "ABCD-EFGHJ",
            "ABCD-EFG0",
            "ABCD-EFGI",
            "ABCDÉFGH",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
        assert!(ALPHABET.iter().all(|b| !b"01OIL".contains(b)));
    }

    #[test]
    fn a_hash_matches_its_code_only() {
        let hash = hash("ABCDEFGH").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify(&hash, "ABCDEFGH"));
        assert!(!verify(&hash, "ABCDEFGJ"));
        assert!(!verify("not a hash", "ABCDEFGH"));
        assert!(!verify(dummy_hash(), "ABCDEFGH"));
        assert!(dummy_hash().starts_with("$argon2id$"));
    }
}
