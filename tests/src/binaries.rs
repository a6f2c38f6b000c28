//! The binaries under test: in `<target>/<profile>/`, beside the demo or above the running
//! test, where `cargo build` or `cargo test --workspace` has built them. Run alone (`cargo test -p fz-e2e`), cargo builds
//! only this package, so a missing binary is built here once, in the same profile and target
//! directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

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
    if !path.exists() {
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
