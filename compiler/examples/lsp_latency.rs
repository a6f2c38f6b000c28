//! How long `fzc lsp` takes to answer an edit with diagnostics, measured as an editor sees it:
//! a scripted JSON-RPC session over the server's standard input and output. For
//! `benches/tooling.sh`; run by hand:
//!
//! ```text
//! cargo run --release -p fz-compiler --example lsp_latency -- FZC TREE FILE [EDITS]
//! ```
//!
//! FZC is the `fzc` binary, TREE the tree's directory (the workspace the editor opens), FILE a
//! `.fz` file in it (relative to TREE). The file is opened, then changed EDITS times (default
//! 20), alternately adding a rule that names an unknown group (which the server must report)
//! and taking it away again (which it must clear): each edit is timed from sending the change
//! to receiving that file's diagnostics. Prints each kind's minimum, median and maximum.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lsp_latency: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [fzc, tree, file, rest @ ..] = args.as_slice() else {
        bail!("usage: lsp_latency FZC TREE FILE [EDITS]");
    };
    let edits: usize = rest.first().map_or(Ok(20), |n| n.parse())?;
    let tree = std::path::Path::new(tree).canonicalize()?;
    let original =
        std::fs::read_to_string(tree.join(file)).with_context(|| format!("cannot read {file}"))?;
    let uri = format!("file://{}/{file}", tree.display());

    let mut child = Command::new(fzc)
        .arg("lsp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {fzc}"))?;
    let mut input = child.stdin.take().context("no stdin")?;
    let mut output = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut send = |message: Value| -> anyhow::Result<()> {
        let body = message.to_string();
        write!(input, "Content-Length: {}\r\n\r\n{body}", body.len())?;
        Ok(input.flush()?)
    };

    let started = Instant::now();
    send(json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": { "rootUri": format!("file://{}", tree.display()), "capabilities": {} } }))?;
    while read(&mut output)?.get("id") != Some(&json!(1)) {}
    println!(
        "initialize: {:.1} ms (reads the tree from disk)",
        ms(started.elapsed())
    );
    // Ready: the server checks the whole tree now. A request after it is answered once that
    // check is done, so the edits below are timed from a server at rest, as in an editor
    // where the tree was opened a moment before the first keystroke.
    let checked = Instant::now();
    send(json!({ "jsonrpc": "2.0", "method": "initialized", "params": {} }))?;
    send(
        json!({ "jsonrpc": "2.0", "id": 2, "method": "textDocument/completion",
                 "params": { "textDocument": { "uri": uri }, "position": { "line": 0, "character": 0 } } }),
    )?;
    while read(&mut output)?.get("id") != Some(&json!(2)) {}
    println!("initial check of the tree: {:.1} ms", ms(checked.elapsed()));
    send(json!({ "jsonrpc": "2.0", "method": "textDocument/didOpen",
                 "params": { "textDocument": { "uri": uri, "languageId": "fz", "version": 0, "text": original } } }))?;

    let broken = format!("{original}\nallow no-such-group-for-lsp-latency -> no-such-resource\n");
    let (mut reported, mut cleared) = (Vec::new(), Vec::new());
    for edit in 0..edits {
        let introduces = edit % 2 == 0;
        let text = if introduces { &broken } else { &original };
        let sent = Instant::now();
        send(
            json!({ "jsonrpc": "2.0", "method": "textDocument/didChange",
                     "params": { "textDocument": { "uri": uri, "version": edit + 1 },
                                 "contentChanges": [{ "text": text }] } }),
        )?;
        loop {
            let message = read(&mut output)?;
            if message["method"] == "textDocument/publishDiagnostics"
                && message["params"]["uri"] == uri
            {
                let found = message["params"]["diagnostics"]
                    .as_array()
                    .is_some_and(|d| !d.is_empty());
                if found != introduces {
                    bail!("edit {edit}: diagnostics {message} were not what the edit asks for");
                }
                break;
            }
        }
        let took = sent.elapsed();
        if introduces {
            reported.push(took);
        } else {
            cleared.push(took);
        }
    }
    send(json!({ "jsonrpc": "2.0", "id": 3, "method": "shutdown", "params": null }))?;
    send(json!({ "jsonrpc": "2.0", "method": "exit", "params": null }))?;
    child.wait()?;

    for (what, times) in [("error reported", reported), ("error cleared", cleared)] {
        let mut times = times;
        times.sort();
        let (Some(first), Some(last)) = (times.first(), times.last()) else {
            continue;
        };
        println!(
            "{what}: {} edits, min {:.1} ms, median {:.1} ms, max {:.1} ms",
            times.len(),
            ms(*first),
            ms(times[times.len() / 2]),
            ms(*last)
        );
    }
    Ok(())
}

fn read(output: &mut impl BufRead) -> anyhow::Result<Value> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if output.read_line(&mut line)? == 0 {
            bail!("the server closed its output");
        }
        if line.trim().is_empty() {
            break;
        }
        if let Some(value) = line.strip_prefix("Content-Length:") {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    output.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
