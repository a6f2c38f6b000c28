//! The binaries under test: in `<target>/<profile>/`, beside the demo or above the running
//! test, where `cargo build` or `cargo test --workspace` has built them. Run alone (`cargo test
//! -p fz-e2e`), cargo builds only this package, so a missing binary is built here once, in the
//! same profile and target directory; and so is one older than a source file of the workspace
//! when cargo runs the test, since a stale binary would test yesterday's code without a word.
//! (`cargo` decides what to rebuild; a fresh binary is left alone, so `cargo test --workspace`
//! on a clean build never builds twice.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

/// The binaries the world runs, and the policy checker the demo shows.
const BINARIES: [&str; 4] = ["fz-portal", "fz-gateway", "fz-client", "fzc"];

/// The path of `name` (one of the workspace's binaries), built first if it is missing.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    // A test runs from <target>/<profile>/deps/, the demo from <target>/<profile>/.
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe
        .parent()
        .expect("the program runs from a directory")
        .to_owned();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    let run_by_cargo = std::env::var_os("CARGO").is_some();
    if !path.exists() || (run_by_cargo && older_than_sources(&path)) {
        if let Err(why) = BUILT.get_or_init(|| build(&dir)) {
            panic!("cannot build {BINARIES:?}: {why}");
        }
        assert!(
            path.exists(),
            "cargo built {BINARIES:?}, but {} is still missing",
            path.display()
        );
    }
    path
}

/// `cargo build --bin …` for [`BINARIES`] in the profile and target directory of `dir`
/// (`<target>/<profile>`).
fn build(dir: &Path) -> Result<(), String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(&workspace).arg("build");
    // What cargo set for this test, not for the build: build scripts that read such a variable
    // (ring's reads CARGO_MANIFEST_DIR) would run again and rebuild half the tree, here and at
    // the next ordinary build.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "OUT_DIR"
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    for name in BINARIES {
        command.args(["--bin", name]);
    }
    match dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
        None => return Err(format!("no profile in {}", dir.display())),
    }
    if let Some(target) = dir.parent() {
        command.env("CARGO_TARGET_DIR", target);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run cargo: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Whether a source file of the workspace (Rust, manifests, the lock file, migrations,
/// grammars) changed after `binary` was built.
fn older_than_sources(binary: &Path) -> bool {
    static NEWEST: OnceLock<Option<SystemTime>> = OnceLock::new();
    let newest = NEWEST.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        newest_source(&workspace)
    });
    let built = std::fs::metadata(binary)
        .and_then(|meta| meta.modified())
        .ok();
    match (built, newest) {
        (Some(built), Some(newest)) => built < *newest,
        _ => true,
    }
}

/// The newest modification time among the sources under `dir`, leaving out build output and
/// hidden directories.
fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let time = if kind.is_dir() {
            if name.starts_with('.') || name == "target" {
                continue;
            }
            newest_source(&path)
        } else if ["rs", "toml", "lock", "sql", "pest"]
            .iter()
            .any(|extension| path.extension().is_some_and(|e| e == *extension))
        {
            entry.metadata().and_then(|meta| meta.modified()).ok()
        } else {
            None
        };
        newest = newest.max(time);
    }
    newest
}
