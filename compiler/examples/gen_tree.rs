//! Writes the generated benchmark policy tree (see `benches/common/workload.rs`) to a
//! directory, for `benches/compile.sh` and for timing `fzc` by hand:
//!
//! ```text
//! cargo run --release -p fz-compiler --example gen_tree -- DIR [RULES]
//! ```
//!
//! RULES defaults to 100,000 (10,000 resources, 1,000 groups). DIR must not exist yet.
#![allow(clippy::print_stdout, clippy::print_stderr)]

// The example writes only the fz tree; the Cedar rendering and the request pool are the
// `decide` bench's.
#[allow(dead_code)]
#[path = "../benches/common/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: gen_tree DIR [RULES]";

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
    let mut args = std::env::args_os().skip(1);
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
    let files = workload::Workload::generate(rules).fz_files();
    for (path, text) in &files {
        write(&dir.join(path), text)?;
    }
    println!(
        "wrote {} files, {rules} rules, to {}",
        files.len(),
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
