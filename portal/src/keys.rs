//! The portal's keys, each made once from the OS's CSPRNG and kept in the data dir, readable by
//! the portal's user alone: the Ed25519 signing key for grants (agents pin its public half) and
//! the token key that authenticates token fragments (`credential`).
//!
//! Replicas of one portal must hold the same keys (a grant signed by another key is refused by
//! every agent; a token made under another token key authenticates nowhere else), so the
//! configuration may name each key's file instead ([`KeyFiles`]): such a file is only ever
//! read, and a missing one is an error, never a new key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use fz_proto::PortalSigningKey;

use crate::credential::TokenKey;

use crate::data_dir::{self, Creation, DataDirError};

/// The key's file in the data dir.
pub const FILE: &str = "portal-signing.key";

/// The file a new key is written to before it is renamed to [`FILE`].
pub const TEMPORARY_FILE: &str = ".portal-signing.key.tmp";

/// The token key's file in the data dir.
pub const TOKEN_KEY_FILE: &str = "token.key";

/// The file a new token key is written to before it is renamed to [`TOKEN_KEY_FILE`].
pub const TOKEN_KEY_TEMPORARY_FILE: &str = ".token.key.tmp";

/// Key files the configuration names (`signing_key_file`, `token_key_file`); a key without one
/// is kept in the data dir.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFiles {
    pub signing: Option<PathBuf>,
    pub token: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a key (32 bytes)")]
    Damaged(PathBuf),
    #[error(
        "`{0}`, which the configuration names, does not exist: a configured key is never made; \
         copy it from where `fz-portal init` made it"
    )]
    ConfiguredMissing(PathBuf),
    /// The data dir cannot be made, or it (or a file in it, the key included) is open to
    /// group or others.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("the system's random source failed: {0}")]
    Random(getrandom::Error),
}

/// Loads the signing key from the file `files` names, or else from `data_dir`, making one
/// there the first time when `creation` allows (and the data dir, mode 0700, if it is
/// missing); otherwise a missing key is an error that says how to make one. A data dir or key
/// file open to group or others is refused.
pub fn load(
    data_dir: &Path,
    files: &KeyFiles,
    creation: Creation,
) -> Result<PortalSigningKey, KeyFileError> {
    seed(
        data_dir,
        files.signing.as_deref(),
        FILE,
        TEMPORARY_FILE,
        creation,
    )
    .map(PortalSigningKey::from_seed)
}

/// Loads the token key as [`load`] does the signing key.
pub fn load_token_key(
    data_dir: &Path,
    files: &KeyFiles,
    creation: Creation,
) -> Result<TokenKey, KeyFileError> {
    let configured = files.token.as_deref();
    seed(
        data_dir,
        configured,
        TOKEN_KEY_FILE,
        TOKEN_KEY_TEMPORARY_FILE,
        creation,
    )
    .map(TokenKey::from_seed)
}

/// The 32 bytes kept in `configured`, or else in `file` in the data dir, made there (through
/// `temporary`) the first time if `creation` allows.
fn seed(
    data_dir: &Path,
    configured: Option<&Path>,
    file: &str,
    temporary: &str,
    creation: Creation,
) -> Result<[u8; 32], KeyFileError> {
    if let Some(path) = configured {
        data_dir::check_file(path)?;
        return match std::fs::read(path) {
            Ok(bytes) => {
                <[u8; 32]>::try_from(bytes).map_err(|_| KeyFileError::Damaged(path.to_owned()))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(KeyFileError::ConfiguredMissing(path.to_owned()))
            }
            Err(source) => Err(KeyFileError::Io {
                path: path.to_owned(),
                source,
            }),
        };
    }
    data_dir::prepare(data_dir, creation)?;
    let path = data_dir.join(file);
    let io = |source| KeyFileError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes).map_err(|_| KeyFileError::Damaged(path.clone())),
        Err(error)
            if error.kind() == std::io::ErrorKind::NotFound && creation == Creation::Refused =>
        {
            Err(KeyFileError::DataDir(DataDirError::Missing(path)))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(KeyFileError::Random)?;
            // Write beside it and rename: a crash never leaves a half key behind.
            let temporary = data_dir.join(temporary);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(io)?;
            file.write_all(&seed)
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            std::fs::rename(&temporary, &path).map_err(io)?;
            Ok(seed)
        }
        Err(error) => Err(io(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn made_once_kept_private_and_the_same_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = load(&data, &KeyFiles::default(), Creation::Allowed)
            .unwrap()
            .public_key();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data.join(FILE)), 0o600);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(
            load(&data, &KeyFiles::default(), Creation::Allowed)
                .unwrap()
                .public_key(),
            first
        );
    }

    #[test]
    fn a_damaged_or_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        load(&data, &KeyFiles::default(), Creation::Allowed).unwrap();
        let path = data.join(FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(&data, &KeyFiles::default(), Creation::Allowed),
            Err(KeyFileError::DataDir(DataDirError::Exposed {
                mode: 0o644,
                ..
            }))
        ));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load(&data, &KeyFiles::default(), Creation::Allowed),
            Err(KeyFileError::Damaged(_))
        ));
    }

    #[test]
    fn a_configured_key_is_read_never_made_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        let key = load(&made, &KeyFiles::default(), Creation::Allowed).unwrap();
        let replica = dir.path().join("replica");
        let shared = KeyFiles {
            signing: Some(made.join(FILE)),
            token: Some(dir.path().join("absent.key")),
        };
        let loaded = load(&replica, &shared, Creation::Allowed).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        assert!(
            !replica.join(FILE).exists(),
            "a key was made beside the configured one"
        );
        let missing = load_token_key(&replica, &shared, Creation::Allowed).unwrap_err();
        assert!(
            matches!(missing, KeyFileError::ConfiguredMissing(_)),
            "{missing}"
        );
        assert!(!dir.path().join("absent.key").exists());
        assert!(!replica.join(TOKEN_KEY_FILE).exists());
        std::fs::set_permissions(made.join(FILE), std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load(&replica, &shared, Creation::Allowed),
            Err(KeyFileError::DataDir(DataDirError::Exposed { .. }))
        ));
    }
}
