//! Pointing the host's resolver at the client's DNS stub, and back.
//!
//! The client reads the `nameserver`s of `/etc/resolv.conf` (they become the stub's
//! upstreams), keeps a copy of the file, and writes it again with the sentinel addresses as
//! its nameservers (search domains and options kept). At exit it writes the copy back. If the
//! client died before it could, the copy is still there at the next start, which restores it
//! first: a crash never leaves the host without its resolvers.
//!
//! The file is rewritten in place, not replaced, so that a symlink (systemd-resolved) or a
//! bind mount (`ip netns exec`) over it stays what it is.

use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Why the resolver could not be switched or restored.
#[derive(Debug, thiserror::Error)]
pub enum ResolvError {
    #[error("cannot read `{path}`: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write `{path}`: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("`{0}` names no nameserver the stub could pass other names to")]
    NoNameserver(PathBuf),
}

/// The resolver switched to the stub; [`ResolverSwitch::restore`] (or dropping it) puts the
/// original back.
#[derive(Debug)]
pub struct ResolverSwitch {
    file: PathBuf,
    backup: PathBuf,
    restored: bool,
}

/// Restores a copy a crash left behind, then reads the upstreams of `file`.
pub fn upstreams(file: &Path, backup: &Path) -> Result<Vec<SocketAddr>, ResolvError> {
    if backup.exists() {
        tracing::warn!(backup = %backup.display(), "the resolver configuration was not restored last time; restoring it now");
        restore(file, backup)?;
    }
    let upstreams: Vec<SocketAddr> = read(file)?
        .lines()
        .filter_map(nameserver)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if upstreams.is_empty() {
        return Err(ResolvError::NoNameserver(file.to_owned()));
    }
    Ok(upstreams)
}

impl ResolverSwitch {
    /// Keeps a copy of `file` in `backup` and writes `file` with `sentinels` as its
    /// nameservers, keeping its other lines. Call [`upstreams`] first: it restores what a
    /// crash left behind.
    pub fn install(
        file: &Path,
        backup: &Path,
        sentinels: &[IpAddr],
    ) -> Result<ResolverSwitch, ResolvError> {
        let original = read(file)?;
        if let Some(parent) = backup.parent() {
            fs::create_dir_all(parent).map_err(|source| ResolvError::Write {
                path: parent.to_owned(),
                error: source,
            })?;
        }
        write(backup, &original)?;
        let mut text = format!(
            "# Written by fz-client, which answers DNS for this host; the original is in {} and comes back when fz-client stops.\n",
            backup.display()
        );
        for sentinel in sentinels {
            text.push_str(&format!("nameserver {sentinel}\n"));
        }
        for line in original.lines().filter(|l| nameserver(l).is_none()) {
            if !line.trim_start().starts_with('#') && !line.trim().is_empty() {
                text.push_str(line);
                text.push('\n');
            }
        }
        write(file, &text)?;
        Ok(ResolverSwitch {
            file: file.to_owned(),
            backup: backup.to_owned(),
            restored: false,
        })
    }

    /// Writes the original back and removes the copy.
    pub fn restore(mut self) -> Result<(), ResolvError> {
        self.restored = true;
        restore(&self.file, &self.backup)
    }
}

impl Drop for ResolverSwitch {
    fn drop(&mut self) {
        if !self.restored
            && let Err(error) = restore(&self.file, &self.backup)
        {
            tracing::error!(%error, "cannot restore the resolver configuration");
        }
    }
}

/// The address of a `nameserver` line.
fn nameserver(line: &str) -> Option<IpAddr> {
    let mut words = line.split_whitespace();
    if words.next() != Some("nameserver") {
        return None;
    }
    // A scoped IPv6 address (`fe80::1%eth0`) keeps its address; the scope is the kernel's.
    words.next()?.split('%').next()?.parse().ok()
}

fn restore(file: &Path, backup: &Path) -> Result<(), ResolvError> {
    let original = read(backup)?;
    write(file, &original)?;
    fs::remove_file(backup).map_err(|source| ResolvError::Write {
        path: backup.to_owned(),
        error: source,
    })
}

fn read(path: &Path) -> Result<String, ResolvError> {
    fs::read_to_string(path).map_err(|source| ResolvError::Read {
        path: path.to_owned(),
        error: source,
    })
}

/// Writes in place (truncate, write, sync), following symlinks and keeping bind mounts.
fn write(path: &Path, text: &str) -> Result<(), ResolvError> {
    let error = |source| ResolvError::Write {
        path: path.to_owned(),
        error: source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "# from DHCP\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch corp.example\noptions edns0\n";

    fn sentinels(upstreams: &[SocketAddr]) -> Vec<IpAddr> {
        (1..=upstreams.len())
            .map(|i| format!("100.100.111.{i}").parse().unwrap())
            .collect()
    }

    fn switch(file: &Path, backup: &Path) -> (ResolverSwitch, Vec<SocketAddr>) {
        let found = upstreams(file, backup).unwrap();
        let switch = ResolverSwitch::install(file, backup, &sentinels(&found)).unwrap();
        (switch, found)
    }

    #[test]
    fn the_stub_takes_over_and_the_original_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        // The state directory need not exist yet.
        let backup = dir.path().join("state/resolv.conf.fz-client");
        fs::write(&file, ORIGINAL).unwrap();
        let (switch, found) = switch(&file, &backup);
        assert_eq!(
            found,
            [
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        let switched = fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = switched.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "nameserver 100.100.111.1",
                "nameserver 100.100.111.2",
                "search corp.example",
                "options edns0"
            ]
        );
        switch.restore().unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), ORIGINAL);
        assert!(!backup.exists());
    }

    #[test]
    fn a_copy_left_by_a_crash_is_restored_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        let backup = dir.path().join("resolv.conf.fz-client");
        fs::write(&file, ORIGINAL).unwrap();
        let (first, _) = switch(&file, &backup);
        // The process dies: no restore, no drop.
        std::mem::forget(first);
        assert!(fs::read_to_string(&file).unwrap().contains("100.100.111.1"));
        let (switch, found) = switch(&file, &backup);
        assert_eq!(found.len(), 2, "the real upstreams, not the sentinels");
        drop(switch);
        assert_eq!(fs::read_to_string(&file).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_file_without_nameservers_is_an_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        let backup = dir.path().join("resolv.conf.fz-client");
        fs::write(&file, "search corp.example\n").unwrap();
        let error = upstreams(&file, &backup).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "`{}` names no nameserver the stub could pass other names to",
                file.display()
            )
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), "search corp.example\n");
        assert!(!backup.exists());
    }
}
