//! Writes the generated benchmark policy tree (see `benches/common/workload.rs`) to a
//! directory, for `benches/compile.sh` and for timing `fzc` by hand:
//!
//! ```text
//! cargo run --release -p fz-compiler --example gen_tree -- [--cedar] DIR [RULES]
//! ```
//!
//! RULES defaults to 100,000 (10,000 resources, 1,000 groups). DIR must not exist yet. With
//! `--cedar` the rules are written as Cedar policies (`rules/SITE.cedar`), the tree the
//! `decide` bench's Cedar-authored group compiles; declarations and tests stay fz.
#![allow(clippy::print_stdout, clippy::print_stderr)]

// The example writes only the tree; the request pool and the Cedar policies that Cedar alone
// evaluates are the `decide` bench's.
#[allow(dead_code)]
#[path = "../benches/common/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use workload::{RulesIn, Workload};

const USAGE: &str = "usage: gen_tree [--cedar] DIR [RULES]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1).peekable();
    let rules_in = if args.next_if(|arg| arg == "--cedar").is_some() {
        RulesIn::Cedar
    } else {
        RulesIn::Fz
    };
    let dir = PathBuf::from(args.next().context("no DIR given")?);
    let rules = match args.next() {
        None => 100_000,
        Some(text) => text
            .to_str()
            .and_then(|t| t.replace('_', "").parse().ok())
            .context("RULES is not a number")?,
    };
    if args.next().is_some() {
        bail!("too many arguments");
    }
    if dir.exists() {
        bail!("`{}` exists already", dir.display());
    }
    let files = Workload::generate(rules).tree(rules_in);
    for (path, text) in &files {
        write(&dir.join(path), text)?;
    }
    println!(
        "wrote {} files, {rules} rules in {}, to {}",
        files.len(),
        rules_in.name(),
        dir.display()
    );
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create `{}`", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write `{}`", path.display()))
}
