//! `fzc lsp`: the language server over standard input and output. This is the driver only:
//! JSON-RPC framing (`Content-Length` headers), reading the tree once at `initialize`, and
//! exiting; every message is handled by [`fz_compiler::lsp::Server`].

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use fz_compiler::lsp::{Server, directory_uri, uri_directory};
use serde_json::{Value, json};

/// The largest message accepted: a policy file sent whole on every change is far smaller.
const MAX_MESSAGE: usize = 64 << 20;

/// Serves until `exit` or the end of input; the process's exit code (0 after `shutdown`).
pub fn serve() -> anyhow::Result<u8> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut output = stdout.lock();
    let mut server: Option<Server> = None;
    loop {
        let message = match read_message(&mut input)? {
            Frame::Message(message) => message,
            Frame::End => return Ok(1),
            Frame::Unreadable(why) => {
                write_message(
                    &mut output,
                    &json!({ "jsonrpc": "2.0", "id": null, "error": { "code": -32700, "message": why } }),
                )?;
                continue;
            }
        };
        let method = message["method"].as_str().unwrap_or_default();
        if method == "exit" {
            return Ok(if server.as_ref().is_some_and(Server::shut_down) {
                0
            } else {
                1
            });
        }
        let server = server.get_or_insert_with(|| open_tree(&message["params"]));
        for reply in server.handle(&message) {
            write_message(&mut output, &reply)?;
        }
    }
}

/// The server for the workspace `initialize` names: its `policies/` directory when it has
/// one (a repository that keeps its tree there), else the workspace itself.
fn open_tree(params: &Value) -> Server {
    let root = params["rootUri"]
        .as_str()
        .or_else(|| params["workspaceFolders"][0]["uri"].as_str())
        .and_then(uri_directory)
        .or_else(|| params["rootPath"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let tree = if root.join("policies").is_dir() {
        root.join("policies")
    } else {
        root
    };
    Server::new(&directory_uri(&tree), files(&tree))
}

/// The tree's files; none when it cannot be read (open documents are still checked).
fn files(tree: &Path) -> Vec<(String, String)> {
    match fz_compiler::load_tree(tree) {
        Ok(sources) => sources
            .iter()
            .map(|(_, file)| (file.path.clone(), file.text.clone()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

enum Frame {
    Message(Value),
    Unreadable(String),
    End,
}

fn read_message(input: &mut impl BufRead) -> anyhow::Result<Frame> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(Frame::End);
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let Some(length) = length.filter(|l| *l <= MAX_MESSAGE) else {
        anyhow::bail!("a message without a valid Content-Length (at most {MAX_MESSAGE} bytes)");
    };
    let mut body = vec![0; length];
    input.read_exact(&mut body)?;
    Ok(match serde_json::from_slice(&body) {
        Ok(message) => Frame::Message(message),
        Err(error) => Frame::Unreadable(format!("not JSON: {error}")),
    })
}

fn write_message(output: &mut impl Write, message: &Value) -> anyhow::Result<()> {
    let body = serde_json::to_string(message)?;
    write!(output, "Content-Length: {}\r\n\r\n{body}", body.len())?;
    output.flush()?;
    Ok(())
}
