//! What the root tests (`root.rs`, `netns.rs`) share: skipping loudly without root, running
//! iproute2's `ip` and nftables' `nft`, and waiting with a deadline; and for the tests that run
//! the agents' binaries in network namespaces, the namespaces ([`netns`]), the processes
//! ([`process`]), the servers and probes ([`net`]), the gateway's metrics ([`metrics`]) and
//! IP packets built by hand with their checksums ([`packet`]), and a PostgreSQL server
//! ([`postgres`]). Test agents that speak the
//! portal's WebSocket protocol ([`agents`]) and a minimal browser for the sign-in pages
//! ([`browser`]) serve the portal's tests and the end-to-end harness alike.
//!
//! Without root a test prints `SKIPPED (needs root): <test> — <why>` and leaves a marker in
//! `<target>/fz-root-skips/<test>`; `.ci/run` fails when any marker is there, so a CI that means
//! to run these tests can see they did not.

// Helpers for tests: a failure to set up is a failed test, so it panics with the cause.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agents;
pub mod browser;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod packet;
pub mod postgres;
pub mod process;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::tun::Cidr;

/// How long anything that should happen may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Why this process cannot run root tests, if it cannot.
pub fn not_root() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    match std::fs::metadata("/proc/self") {
        Ok(meta) if meta.uid() == 0 => None,
        Ok(meta) => Some(format!("running as uid {}, not root", meta.uid())),
        Err(error) => Some(format!("cannot tell who we are from /proc/self: {error}")),
    }
}

/// `true` when `test` may run as root; otherwise the skip is reported and marked. A marker
/// left by an earlier run without root is removed, since this run does not skip.
pub fn may_run_as_root(test: &str) -> bool {
    if let Some(why) = not_root() {
        skip(test, &why);
        return false;
    }
    let _ = std::fs::remove_file(marker(test));
    true
}

/// Makes the world of `test` with `setup` and runs `body` in it. Without root, or when `setup`
/// cannot make it here (it says why: no network namespaces in this container, say), the test
/// is skipped loudly instead.
pub fn run_as_root<W>(
    test: &str,
    setup: impl FnOnce() -> Result<W, String>,
    body: impl FnOnce(&mut W),
) {
    if !may_run_as_root(test) {
        return;
    }
    match setup() {
        Ok(mut world) => body(&mut world),
        Err(why) => skip(test, &why),
    }
}

/// Reports and marks a skipped root test.
pub fn skip(test: &str, why: &str) {
    skip_needing(test, "root", why);
}

/// Reports and marks a test skipped for want of `need` (root, or a program `.ci/run` installs
/// as root), so that `.ci/run` fails on it just the same.
pub fn skip_needing(test: &str, need: &str, why: &str) {
    // Straight to the process's stderr, past libtest's capture, so a passing run shows it too.
    let _ = writeln!(std::io::stderr(), "SKIPPED (needs {need}): {test} — {why}");
    let marker = marker(test);
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(marker, format!("{why}\n")).unwrap();
}

/// Where the skip marker of `test` goes.
pub fn marker(test: &str) -> PathBuf {
    target_dir().join("fz-root-skips").join(test)
}

/// `CARGO_TARGET_DIR` when set (relative to the workspace root, as cargo reads it from there
/// in this workspace), else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// `address/len`, which must be valid.
pub fn cidr(text: &str) -> Cidr {
    let (address, len) = text.split_once('/').unwrap();
    Cidr::new(address.parse().unwrap(), len.parse().unwrap()).unwrap()
}

/// `ip args…`
pub fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// `nft args…`
pub fn nft(args: &[&str]) -> Result<String, String> {
    run("nft", args)
}

/// Runs `program args…` and gives its standard output, or its standard error when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `{program}`: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Waits until `probe` gives something, failing after `patience`. Between tries `alive(what)`
/// runs, to fail at once when a process the test needs has exited.
pub fn wait_for<T>(
    what: &str,
    patience: Duration,
    alive: impl FnMut(&str),
    probe: impl FnMut() -> Option<T>,
) -> T {
    wait_for_or(what, patience, alive, probe)
        .unwrap_or_else(|| panic!("waited {patience:?} for {what}"))
}

/// [`wait_for`], giving `None` after `patience` instead of failing.
pub fn wait_for_or<T>(
    what: &str,
    patience: Duration,
    mut alive: impl FnMut(&str),
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        alive(what);
        if Instant::now() >= deadline {
            return None;
        }
        // A poll interval, not a synchronisation: the condition is checked again.
        std::thread::sleep(Duration::from_millis(20));
    }
}
