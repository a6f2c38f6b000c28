//! `fzc fmt`: rewrite `.fz` files in the canonical layout ([`fz_lang::format_file`]), or with
//! `--check` only name those that are not in it. `.cedar` files are left to Cedar's tools.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fz_lang::{FileId, SourceFile, Sources};

use crate::render::Renderer;

/// What formatting the given paths found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Files rewritten, or with `--check` those that would be.
    pub changed: Vec<PathBuf>,
    /// Files left alone because they do not parse.
    pub unparsed: usize,
}

/// Formats every `.fz` file below each of `paths` (a directory, recursively, or a file),
/// writing each changed file atomically unless `check`. Prints each changed file's path on
/// standard output, and the syntax errors of files that do not parse on standard error.
pub fn run(paths: &[PathBuf], check: bool) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    for path in paths {
        for file in fz_files(path)? {
            let original = std::fs::read(&file)
                .with_context(|| format!("cannot read `{}`", file.display()))?;
            let Ok(text) = String::from_utf8(original.clone()) else {
                anyhow::bail!("`{}` is not UTF-8 text", file.display());
            };
            match fz_lang::format_file(FileId(0), &text) {
                Ok(formatted) if formatted.as_bytes() == original => {}
                Ok(formatted) => {
                    if !check {
                        crate::write_atomically(&file, formatted.as_bytes())?;
                    }
                    println!("{}", file.display());
                    outcome.changed.push(file);
                }
                Err(errors) => {
                    let shown = file.display().to_string();
                    let sources = Sources::new(vec![SourceFile::new(shown, text)]);
                    let renderer = Renderer {
                        sources: &sources,
                        root: "",
                    };
                    for error in &errors {
                        eprintln!("{}", renderer.human(error));
                    }
                    eprintln!(
                        "error: `{}` does not parse; it was not formatted",
                        file.display()
                    );
                    outcome.unparsed += 1;
                }
            }
        }
    }
    Ok(outcome)
}

/// The `.fz` files a path names: itself, or every one below it, sorted.
fn fz_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let sources = fz_compiler::load_tree(path)?;
    let mut files: Vec<PathBuf> = sources
        .iter()
        .filter(|(_, file)| file.path.ends_with(".fz"))
        .map(|(_, file)| path.join(&file.path))
        .collect();
    files.sort();
    Ok(files)
}
