//! Secrets an agent keeps in files: its token and its WireGuard private key. A file that group
//! or others could read is refused: the secret in it may already be out.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read `{path}`: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "`{path}` is readable by group or others (mode {mode:o}); it holds a secret: `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("`{path}` is empty")]
    Empty { path: PathBuf },
    #[error("`{path}` does not hold a 32-byte key (64 hex digits)")]
    BadKey { path: PathBuf },
    #[error("cannot create `{path}`: {error}")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A secret file's trimmed contents, if only its owner can read it.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let read_error = |source| SecretError::Read {
        path: path.to_owned(),
        error: source,
    };
    let mode = fs::metadata(path).map_err(read_error)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let text = fs::read_to_string(path).map_err(read_error)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(text.to_owned())
}

/// The WireGuard private key in `path` (hex), made and written first when the file does not
/// exist, so the agent keeps its key (and the grants that name it) across restarts.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], SecretError> {
    if !path.exists() {
        let create_error = |source| SecretError::Create {
            path: path.to_owned(),
            error: source,
        };
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| create_error(std::io::Error::other(e.to_string())))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(create_error)?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_error)?;
        file.write_all(format!("{}\n", hex(&key)).as_bytes())
            .map_err(create_error)?;
        tracing::info!(path = %path.display(), "made a new WireGuard key");
        return Ok(key);
    }
    let text = read_secret(path)?;
    parse_hex(&text).ok_or_else(|| SecretError::BadKey {
        path: path.to_owned(),
    })
}

/// Writes `secret` (and a newline) to `path`, readable by its owner alone: to a new file
/// beside it (0600), synced, then renamed over `path`, so a crash leaves the old secret or the
/// new one, never half of one. A missing parent directory is made (0700).
pub fn write_secret(path: &Path, secret: &str) -> Result<(), SecretError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let create_error = |source| SecretError::Create {
        path: path.to_owned(),
        error: source,
    };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(create_error)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = parent.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(create_error)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create_error)?;
    fs::rename(&temporary, path).map_err(create_error)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}
