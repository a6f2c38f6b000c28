//! The portal's Ed25519 signing key: made once from the OS's CSPRNG and kept in the data dir,
//! readable by the portal's user alone. Agents pin its public half.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use fz_proto::PortalSigningKey;

use crate::data_dir::{self, DataDirError};

/// The key's file in the data dir.
pub const FILE: &str = "portal-signing.key";

/// The file a new key is written to before it is renamed to [`FILE`].
pub const TEMPORARY_FILE: &str = ".portal-signing.key.tmp";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a signing key (32 bytes)")]
    Damaged(PathBuf),
    /// The data dir cannot be made, or it (or a file in it, the key included) is open to
    /// group or others.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("the system's random source failed: {0}")]
    Random(getrandom::Error),
}

/// Loads the signing key from `data_dir`, making one the first time (and the data dir, mode
/// 0700, if it is missing). A data dir or key file open to group or others is refused.
pub fn load_or_create(data_dir: &Path) -> Result<PortalSigningKey, KeyFileError> {
    let path = data_dir.join(FILE);
    let io = |source| KeyFileError::Io {
        path: path.clone(),
        source,
    };
    data_dir::prepare(data_dir)?;
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed =
                <[u8; 32]>::try_from(bytes).map_err(|_| KeyFileError::Damaged(path.clone()))?;
            Ok(PortalSigningKey::from_seed(seed))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(KeyFileError::Random)?;
            // Write beside it and rename: a crash never leaves a half key behind.
            let temporary = data_dir.join(TEMPORARY_FILE);
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
            Ok(PortalSigningKey::from_seed(seed))
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
        let first = load_or_create(&data).unwrap().public_key();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data.join(FILE)), 0o600);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(load_or_create(&data).unwrap().public_key(), first);
    }

    #[test]
    fn a_damaged_or_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        load_or_create(&data).unwrap();
        let path = data.join(FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&data),
            Err(KeyFileError::DataDir(DataDirError::Exposed {
                mode: 0o644,
                ..
            }))
        ));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&data),
            Err(KeyFileError::Damaged(_))
        ));
    }
}
