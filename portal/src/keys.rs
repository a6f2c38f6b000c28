//! The portal's Ed25519 signing key: made once from the OS's CSPRNG and kept in the data dir,
//! readable by the portal's user alone. Agents pin its public half.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use fz_proto::PortalSigningKey;

const FILE: &str = "portal-signing.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a signing key (32 bytes)")]
    Damaged(PathBuf),
    #[error("`{path}` is readable by others (mode {mode:o}); run `chmod 600` on it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the system's random source failed: {0}")]
    Random(getrandom::Error),
}

/// Loads the signing key from `data_dir`, making one the first time.
pub fn load_or_create(data_dir: &Path) -> Result<PortalSigningKey, KeyFileError> {
    let path = data_dir.join(FILE);
    let io = |source| KeyFileError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(|source| KeyFileError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed { path, mode });
            }
            let seed =
                <[u8; 32]>::try_from(bytes).map_err(|_| KeyFileError::Damaged(path.clone()))?;
            Ok(PortalSigningKey::from_seed(seed))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(KeyFileError::Random)?;
            // Write beside it and rename: a crash never leaves a half key behind.
            let temporary = data_dir.join(format!(".{FILE}.tmp"));
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
    use super::*;

    #[test]
    fn made_once_kept_private_and_the_same_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap().public_key();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap().public_key(), first);
    }

    #[test]
    fn a_damaged_or_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyFileError::Exposed { mode: 0o644, .. })
        ));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyFileError::Damaged(_))
        ));
    }
}
