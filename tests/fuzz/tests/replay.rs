//! Every committed input through its target, without instrumentation (a plain `cargo test`
//! here): the seed corpus (`corpus/TARGET/`) and the inputs that once crashed a target
//! (`regressions/TARGET/`). The inputs of open bugs (`regressions/open/`) are left out until
//! their fix; `regressions/README.md` lists them. `run.sh` replays the same inputs in the
//! instrumented build before it fuzzes.
#![allow(clippy::expect_used)] // a test that cannot read its inputs fails loudly

use std::fs;
use std::path::{Path, PathBuf};

use fz_fuzz::fixtures::{self, GATEWAY_ID};
use fz_proto::{Identity, SignedGrant};

fn here() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly in `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut failed = Vec::new();
    for (name, target) in fz_fuzz::TARGETS {
        let corpus = inputs(&here().join("corpus").join(name));
        assert!(!corpus.is_empty(), "target `{name}` has no seed corpus");
        let regressions = inputs(&here().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let bytes = fs::read(path).expect("a committed input");
            if std::panic::catch_unwind(|| target(&bytes)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
}

/// The signed seeds are worth something only while they verify: a change of the canonical
/// encoding (or of the fixed keys) needs them written again (`cargo run --example seeds`).
#[test]
fn the_signed_seeds_still_verify() {
    let me = Identity::Gateway {
        id: GATEWAY_ID.to_owned(),
        public_key: fixtures::gateway_key(),
    };
    let signed: Vec<PathBuf> = inputs(&here().join("corpus/grant"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("signed-"))
        })
        .collect();
    assert!(!signed.is_empty());
    for path in signed {
        let grant: SignedGrant =
            serde_json::from_slice(&fs::read(&path).expect("a seed")).expect("a signed grant");
        let verified = grant.verify(&fixtures::portal_key(), &me, fixtures::START_UNIX + 10);
        assert!(
            verified.is_ok(),
            "{}: {verified:?}; run `cargo run --example seeds` in tests/fuzz",
            path.display()
        );
    }
}

/// `run.sh`, the binaries and the library name the same targets.
#[test]
fn every_target_is_built_and_run() {
    let names: Vec<&str> = fz_fuzz::TARGETS.iter().map(|(name, _)| *name).collect();
    let script = fs::read_to_string(here().join("run.sh")).expect("run.sh");
    let listed = script
        .lines()
        .find_map(|line| line.strip_prefix("all=("))
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("run.sh's list of targets");
    assert_eq!(listed.split(' ').collect::<Vec<_>>(), names, "run.sh");
    for name in names {
        let binary = here().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(binary.is_file(), "no fuzz_targets/{name}.rs");
    }
}
