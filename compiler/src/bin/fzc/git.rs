//! A policy tree as of a git revision, read through git itself (`ls-tree`, then one
//! `cat-file --batch` for every file), so that `fzc diff --git main HEAD policies/` needs no
//! checkout. Files are named relative to the tree's directory, as `load_tree` names them from
//! disk, so rule ids derived from paths are the same either way.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use fz_lang::{SourceFile, Sources};

/// The `.fz` and `.cedar` files below `dir` (relative to the working directory, inside a git
/// repository) in `revision`. A directory the revision lacks is an empty tree.
pub fn tree_at(revision: &str, dir: &Path) -> anyhow::Result<Sources> {
    let top = PathBuf::from(git(None, &["rev-parse", "--show-toplevel"])?.trim_end());
    let commit = format!("{revision}^{{commit}}");
    git(Some(&top), &["rev-parse", "--verify", "--quiet", &commit])
        .with_context(|| format!("`{revision}` is not a revision of the repository"))?;
    let prefix = prefix_in(&top, dir)?;
    let mut args = vec!["ls-tree", "-r", "-z", "--full-tree", revision];
    if !prefix.is_empty() {
        args.extend(["--", &prefix]);
    }
    let listing = git(Some(&top), &args)?;
    let mut wanted: Vec<(String, String)> = Vec::new();
    for entry in listing.split('\0').filter(|e| !e.is_empty()) {
        let (meta, path) = entry
            .split_once('\t')
            .with_context(|| format!("unexpected `git ls-tree` line `{entry}`"))?;
        let relative = if prefix.is_empty() {
            path
        } else {
            match path.strip_prefix(&prefix).and_then(|p| p.strip_prefix('/')) {
                Some(relative) => relative,
                None => continue,
            }
        };
        if !(relative.ends_with(".fz") || relative.ends_with(".cedar")) {
            continue;
        }
        let mut fields = meta.split(' ');
        let (mode, kind, object) = (fields.next(), fields.next(), fields.next());
        match (mode, kind, object) {
            (Some("120000"), _, _) => bail!(
                "`{path}` is a symbolic link in {revision}; `fzc diff --git` reads policy files only"
            ),
            (_, Some("blob"), Some(object)) => {
                wanted.push((object.to_owned(), relative.to_owned()));
            }
            _ => {}
        }
    }
    let texts = blobs(&top, wanted.iter().map(|(object, _)| object.as_str()))?;
    let mut files = Vec::with_capacity(wanted.len());
    for ((_, name), bytes) in wanted.into_iter().zip(texts) {
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("`{name}` in {revision} is not UTF-8 text"))?;
        files.push(SourceFile::new(name, text));
    }
    Ok(Sources::new(files))
}

/// `dir` as a path from the repository's top, with `/` separators ("" for the top itself).
fn prefix_in(top: &Path, dir: &Path) -> anyhow::Result<String> {
    let absolute = if dir.is_absolute() {
        dir.to_owned()
    } else {
        std::env::current_dir()
            .context("cannot read the working directory")?
            .join(dir)
    };
    // Lexically: the directory may not exist in the working tree, only in the revision.
    let mut parts: Vec<String> = Vec::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    let top_parts: Vec<String> = std::fs::canonicalize(top)
        .unwrap_or_else(|_| top.to_owned())
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match parts.strip_prefix(top_parts.as_slice()) {
        Some(inside) => Ok(inside.join("/")),
        None => bail!(
            "`{}` is outside the git repository at `{}`",
            dir.display(),
            top.display()
        ),
    }
}

/// Runs git and returns its standard output; its standard error is the error.
fn git(dir: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new("git");
    if let Some(dir) = dir {
        command.arg("-C").arg(dir);
    }
    let output = command
        .args(args)
        .output()
        .context("cannot run `git`; is it installed?")?;
    if !output.status.success() {
        bail!(
            "`git {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("git printed something other than UTF-8")
}

/// The contents of blobs, in order, from one `git cat-file --batch`.
fn blobs<'a>(top: &Path, objects: impl Iterator<Item = &'a str>) -> anyhow::Result<Vec<Vec<u8>>> {
    let request: String = objects.map(|o| format!("{o}\n")).collect();
    let count = request.lines().count();
    let mut child = Command::new("git")
        .arg("-C")
        .arg(top)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run `git cat-file`")?;
    let mut stdin = child.stdin.take().context("no pipe to `git cat-file`")?;
    // Written from another thread: git answers while it reads, and a full pipe either way
    // would block both.
    let writer = std::thread::spawn(move || stdin.write_all(request.as_bytes()));
    let mut reader = BufReader::new(child.stdout.take().context("no pipe from `git cat-file`")?);
    let mut contents = Vec::with_capacity(count);
    for _ in 0..count {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let size: usize = header
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected `git cat-file` header `{}`", header.trim_end()))?;
        let mut body = vec![0; size + 1];
        reader.read_exact(&mut body)?;
        body.pop();
        contents.push(body);
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to `git cat-file` failed"))??;
    child.wait()?;
    Ok(contents)
}
