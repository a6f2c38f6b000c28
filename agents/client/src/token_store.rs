//! Where a device keeps its token: the desktop's keyring (the Secret Service, over D-Bus, through
//! `keyring-core` and its zbus store) when one answers, else a file only its owner can read.
//! `fz-client sign-in` stores there, the client and `sign-out` read and delete there, and each
//! says which place it used. A `--token-file` given on the command line means that file alone
//! (headless machines, services).
//!
//! Every call here may wait on D-Bus: call it off an async runtime's threads.

use std::fmt;
use std::path::{Path, PathBuf};

use fz_host::secrets::{SecretError, read_secret, write_secret};
use keyring_core::api::CredentialStoreApi as _;

/// The keyring's service name for fz tokens.
pub const SERVICE: &str = "fz-client";

/// Where a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The desktop keyring, under [`SERVICE`] and this user name.
    Keyring(String),
    File(PathBuf),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Keyring(name) => write!(
                f,
                "the desktop keyring (Secret Service: service `{SERVICE}`, user `{name}`)"
            ),
            Place::File(path) => write!(f, "{} (readable by you alone)", path.display()),
        }
    }
}

/// The keyring's user name for the token of `account` at `portal` (an `http(s)://` base).
pub fn entry_name(portal: &str, account: &str) -> String {
    format!("{account}@{portal}")
}

fn entry(name: &str) -> Result<keyring_core::Entry, keyring_core::Error> {
    zbus_secret_service_keyring_store::Store::new()?.build(SERVICE, name, None)
}

/// Stores `token`: in the keyring under `name` unless `file_only`, else (or when no keyring
/// answers) in `file`. Returns where, and why not the keyring when it was asked and refused.
pub fn store(
    name: &str,
    token: &str,
    file: &Path,
    file_only: bool,
) -> Result<(Place, Option<String>), SecretError> {
    if !file_only {
        match entry(name).and_then(|entry| entry.set_password(token)) {
            Ok(()) => return Ok((Place::Keyring(name.to_owned()), None)),
            Err(error) => {
                write_secret(file, token)?;
                return Ok((Place::File(file.to_owned()), Some(error.to_string())));
            }
        }
    }
    write_secret(file, token)?;
    Ok((Place::File(file.to_owned()), None))
}

/// The token stored for `name` in the keyring (unless `file_only`), else the one in `file`;
/// `None` when there is none in either.
pub fn load(
    name: &str,
    file: &Path,
    file_only: bool,
) -> Result<Option<(String, Place)>, SecretError> {
    if !file_only
        && let Ok(token) = entry(name).and_then(|entry| entry.get_password())
        && !token.trim().is_empty()
    {
        return Ok(Some((
            token.trim().to_owned(),
            Place::Keyring(name.to_owned()),
        )));
    }
    if !file.exists() {
        return Ok(None);
    }
    Ok(Some((read_secret(file)?, Place::File(file.to_owned()))))
}

/// Deletes the token at `place`.
pub fn delete(place: &Place) -> Result<(), String> {
    match place {
        Place::Keyring(name) => entry(name)
            .and_then(|entry| entry.delete_credential())
            .map_err(|e| e.to_string()),
        Place::File(path) => std::fs::remove_file(path).map_err(|e| e.to_string()),
    }
}
