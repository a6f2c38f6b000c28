//! Helpers shared by the integration tests: run `fzc` as a user would, in a directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly
#![allow(dead_code)] // each test file uses its own subset

pub mod random_tree;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the workspace directory).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What a run of `fzc` printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `fzc` with `args` in `dir`.
pub fn fzc(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_fzc"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("fzc runs");
    Run {
        code: output.status.code().expect("fzc exits with a code"),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// A temporary policy tree made of `(relative path, text)` files.
pub fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    dir
}

/// A tree's meaning with the rules' provenance left out: per resource, its allow and deny
/// rules, each by name (or `<derived>`), subjects and conditions; and everything else of the
/// table as it is.
pub fn meaning(table: &fz_compiler::Table) -> String {
    let rule = |index: &u32| {
        let rule = &table.rules[*index as usize];
        let id = if rule.id.contains('#') {
            "<derived>"
        } else {
            rule.id.as_str()
        };
        let groups: Vec<&str> = rule
            .groups
            .iter()
            .map(|g| table.groups[*g as usize].id.as_str())
            .collect();
        let users: Vec<&str> = rule
            .users
            .iter()
            .map(|u| table.users[*u as usize].email.as_str())
            .collect();
        format!("{id} {groups:?} {users:?} {:?}", rule.conditions)
    };
    let mut out = format!("{:?}\n{:?}\n{:?}\n", table.sites, table.groups, table.users);
    for resource in &table.resources {
        let mut allow: Vec<String> = resource.allow.iter().map(rule).collect();
        let mut deny: Vec<String> = resource.deny.iter().map(rule).collect();
        allow.sort();
        deny.sort();
        out += &format!(
            "{} {:?} allow {allow:#?} deny {deny:#?}\n",
            resource.id, resource.address
        );
    }
    out
}
