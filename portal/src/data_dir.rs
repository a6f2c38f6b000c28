//! The portal's data directory: what it holds, and who may read it.
//!
//! Everything the portal writes lives here: the store (`portal.sqlite3` and the `-wal`, `-shm`
//! and `-journal` files SQLite keeps beside it) and the signing key (`portal-signing.key`).
//! The store holds what must not leak: the preshared keys of the grants in force, the flow
//! log, who is in which group. So the directory is the portal's user's alone: made 0700, every
//! file in it 0600, and [`prepare`] refuses a directory or one of those files that group or
//! others may use, saying which path, its mode and the `chmod` that fixes it. Every entry that
//! opens the data directory (the store, the signing key; so `serve` and every admin command)
//! calls it first.
//!
//! What it does not do: it sets no umask (the binary does; a library must not change its
//! process's), and it does not look at files it does not know, which are not the portal's.

use std::fs::{DirBuilder, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The mode of the data directory.
pub const DIR_MODE: u32 = 0o700;

/// The mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// The files the portal keeps in the data directory: the store, what SQLite keeps beside it,
/// and the keys with the temporary files they are written through.
pub const FILES: [&str; 8] = [
    crate::store::DATABASE_FILE,
    "portal.sqlite3-wal",
    "portal.sqlite3-shm",
    "portal.sqlite3-journal",
    crate::keys::FILE,
    crate::keys::TEMPORARY_FILE,
    crate::keys::TOKEN_KEY_FILE,
    crate::keys::TOKEN_KEY_TEMPORARY_FILE,
];

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create the data directory `{}`", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot read or write `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An admin command found no data directory, key or store: only `serve` and `init` make
    /// them, so that a mistyped `data_dir` or `--config` never starts a second portal's worth
    /// of keys nobody pins.
    #[error(
        "`{}` does not exist: `fz-portal init` (or `fz-portal serve`) makes the portal's data \
         directory, keys and store; is `data_dir` in the config the portal serves with?",
        .0.display()
    )]
    Missing(PathBuf),
    /// Group or others may read, write or enter it.
    #[error(
        "`{path}` is open to group or others (mode {mode:04o}); the portal keeps secrets \
         there: run `chmod {wanted:o} {path}`",
        path = .path.display()
    )]
    Exposed {
        path: PathBuf,
        mode: u32,
        /// The mode it should have.
        wanted: u32,
    },
}

/// Whether an entry may make what it finds missing in the data directory: `serve` and `init`
/// may; the admin commands (and `public-key`) only use what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Creation {
    Allowed,
    Refused,
}

/// Makes the data directory (mode 0700, and 0700 for each parent it has to make) if it is
/// missing and `creation` allows; refuses it, or any of the portal's [`FILES`] in it, when
/// group or others may use it.
pub fn prepare(data_dir: &Path, creation: Creation) -> Result<(), DataDirError> {
    match std::fs::metadata(data_dir) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(DataDirError::NotADirectory(data_dir.to_owned()));
        }
        Ok(metadata) => check_mode(data_dir, metadata.permissions().mode(), DIR_MODE)?,
        Err(error) if error.kind() == ErrorKind::NotFound && creation == Creation::Refused => {
            return Err(DataDirError::Missing(data_dir.to_owned()));
        }
        Err(error) if error.kind() == ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(data_dir)
            .map_err(|source| DataDirError::Create {
                path: data_dir.to_owned(),
                source,
            })?,
        Err(source) => {
            return Err(DataDirError::Io {
                path: data_dir.to_owned(),
                source,
            });
        }
    }
    for name in FILES {
        check_file(&data_dir.join(name))?;
    }
    Ok(())
}

/// Refuses `path` if it exists and group or others may use it.
pub fn check_file(path: &Path) -> Result<(), DataDirError> {
    match std::fs::metadata(path) {
        Ok(metadata) => check_mode(path, metadata.permissions().mode(), FILE_MODE),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataDirError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates `path` empty with mode 0600 unless it exists. For files another library creates
/// (SQLite's database): made here first, it has the mode whatever the umask, and SQLite gives
/// its `-wal`, `-shm` and `-journal` files the database file's mode.
pub fn create_private_file(path: &Path) -> Result<(), DataDirError> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(DataDirError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn check_mode(path: &Path, mode: u32, wanted: u32) -> Result<(), DataDirError> {
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::Exposed {
            path: path.to_owned(),
            mode,
            wanted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_missing_directory_is_made_private_with_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("var").join("data");
        prepare(&data, Creation::Allowed).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&dir.path().join("var")), 0o700);
        create_private_file(&data.join("f")).unwrap();
        assert_eq!(mode(&data.join("f")), 0o600);
        prepare(&data, Creation::Allowed).unwrap();
    }

    #[test]
    fn an_open_directory_or_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        prepare(&data, Creation::Allowed).unwrap();
        for wide in [0o755, 0o750, 0o701] {
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(wide)).unwrap();
            let error = prepare(&data, Creation::Allowed).unwrap_err().to_string();
            let path = data.display();
            assert!(error.contains(&format!("`{path}`")), "{error}");
            assert!(error.contains(&format!("mode {wide:04o}")), "{error}");
            assert!(error.contains(&format!("`chmod 700 {path}`")), "{error}");
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        for name in FILES {
            let file = data.join(name);
            std::fs::write(&file, b"").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
            let error = prepare(&data, Creation::Allowed).unwrap_err().to_string();
            assert!(
                error.contains(&format!("`chmod 600 {}`", file.display())),
                "{error}"
            );
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        prepare(&data, Creation::Allowed).unwrap();
        // Files that are not the portal's are not its business.
        std::fs::write(data.join("notes.txt"), b"").unwrap();
        std::fs::set_permissions(
            data.join("notes.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        prepare(&data, Creation::Allowed).unwrap();
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            prepare(&file, Creation::Allowed),
            Err(DataDirError::NotADirectory(_))
        ));
    }
}
