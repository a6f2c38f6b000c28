//! `fzc lsp`, driven as an editor drives it: a real JSON-RPC session over the process's
//! standard input and output, with `Content-Length` framing. Initialize on a tree (a repository
//! with `policies/`), open a file with an error and get its diagnostics, fix it and see them
//! cleared, then definition, references, hover, completion and formatting, shutdown and exit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use common::tree;
use serde_json::{Value, json};

struct Session {
    child: Child,
    input: ChildStdin,
    messages: Receiver<Value>,
    next_id: u64,
}

impl Session {
    fn start(root: &std::path::Path) -> Session {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fzc"))
            .arg("lsp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fzc lsp starts");
        let input = child.stdin.take().unwrap();
        let output = child.stdout.take().unwrap();
        let (sender, messages) = channel();
        std::thread::spawn(move || {
            let mut output = BufReader::new(output);
            loop {
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if output.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(value) = line.strip_prefix("Content-Length:") {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                output.read_exact(&mut body).unwrap();
                if sender.send(serde_json::from_slice(&body).unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut session = Session {
            child,
            input,
            messages,
            next_id: 0,
        };
        let uri = format!("file://{}", root.display());
        let reply = session.request("initialize", json!({ "rootUri": uri, "capabilities": {} }));
        let capabilities = &reply["result"]["capabilities"];
        for capability in [
            "definitionProvider",
            "referencesProvider",
            "hoverProvider",
            "documentFormattingProvider",
        ] {
            assert_eq!(capabilities[capability], true, "{capability}: {reply}");
        }
        session.notify("initialized", json!({}));
        session
    }

    fn send(&mut self, message: &Value) {
        let body = message.to_string();
        write!(self.input, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        self.input.flush().unwrap();
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({ "jsonrpc": "2.0", "method": method, "params": params }));
    }

    /// Sends a request and returns its response (notifications before it are skipped).
    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }));
        loop {
            let message = self.next();
            if message["id"] == id {
                return message;
            }
        }
    }

    /// The next diagnostics published for `uri`.
    fn diagnostics_for(&mut self, uri: &str) -> Vec<Value> {
        loop {
            let message = self.next();
            if message["method"] == "textDocument/publishDiagnostics"
                && message["params"]["uri"] == uri
            {
                return message["params"]["diagnostics"].as_array().unwrap().clone();
            }
        }
    }

    fn next(&mut self) -> Value {
        self.messages
            .recv_timeout(Duration::from_secs(20))
            .expect("the server answers within 20 s")
    }
}

const DECLARATIONS: &str = "site hq\n\
    resource gitlab { address \"gitlab.company.com\"; site hq; ports tcp/443 }\n\
    group engineering { members \"alice@company.com\" }\n";

fn position(uri: &str, line: u64, character: u64) -> Value {
    json!({ "textDocument": { "uri": uri }, "position": { "line": line, "character": character } })
}

#[test]
fn an_editor_session() {
    let repository = tree(&[
        ("policies/declarations.fz", DECLARATIONS),
        ("policies/rules.fz", "allow engineering -> gitlab as eng\n"),
        ("README.md", "not policy\n"),
    ]);
    let root = repository.path().canonicalize().unwrap();
    let mut session = Session::start(&root);
    let rules = format!("file://{}/policies/rules.fz", root.display());
    let declarations = format!("file://{}/policies/declarations.fz", root.display());

    // An unsaved edit with a misspelt group: its diagnostic, where it is.
    session.notify(
        "textDocument/didOpen",
        json!({ "textDocument": { "uri": rules, "languageId": "fz", "version": 1,
                "text": "allow engineerng   ->  gitlab as eng\n" } }),
    );
    let diagnostics = session.diagnostics_for(&rules);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_eq!(diagnostics[0]["code"], "E004");
    assert_eq!(diagnostics[0]["severity"], 1);
    assert_eq!(
        diagnostics[0]["range"],
        json!({ "start": { "line": 0, "character": 6 }, "end": { "line": 0, "character": 16 } })
    );
    assert!(
        diagnostics[0]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `engineering`?")
    );

    // Formatting the open document: one edit, fzc fmt's layout.
    let reply = session.request(
        "textDocument/formatting",
        json!({ "textDocument": { "uri": rules }, "options": { "tabSize": 2, "insertSpaces": true } }),
    );
    assert_eq!(
        reply["result"][0]["newText"],
        "allow engineerng -> gitlab as eng\n"
    );

    // Fixed: the diagnostics are cleared.
    session.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": rules, "version": 2 },
                "contentChanges": [{ "text": "allow engineering -> gitlab as eng\n" }] }),
    );
    assert_eq!(session.diagnostics_for(&rules), Vec::<Value>::new());

    let reply = session.request("textDocument/definition", position(&rules, 0, 8));
    assert_eq!(reply["result"]["uri"], declarations);
    assert_eq!(
        reply["result"]["range"],
        json!({ "start": { "line": 2, "character": 6 }, "end": { "line": 2, "character": 17 } })
    );

    let reply = session.request(
        "textDocument/references",
        json!({ "textDocument": { "uri": rules }, "position": { "line": 0, "character": 23 },
                "context": { "includeDeclaration": true } }),
    );
    let places: Vec<(String, u64)> = reply["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["uri"].as_str().unwrap().to_owned(),
                l["range"]["start"]["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(places, [(declarations.clone(), 1), (rules.clone(), 0)]);

    let reply = session.request("textDocument/hover", position(&rules, 0, 23));
    let hover = reply["result"]["contents"]["value"].as_str().unwrap();
    assert!(hover.starts_with("**resource `gitlab`**"), "{hover}");
    assert!(
        hover.contains("address `gitlab.company.com`, site `hq`, ports tcp/443"),
        "{hover}"
    );
    assert!(hover.contains("allowed by `eng` (rules.fz:1)"), "{hover}");

    let reply = session.request("textDocument/hover", position(&rules, 0, 8));
    let hover = reply["result"]["contents"]["value"].as_str().unwrap();
    assert!(hover.contains("members: alice@company.com"), "{hover}");

    let reply = session.request("textDocument/completion", position(&rules, 0, 0));
    let labels: Vec<&str> = reply["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["label"].as_str().unwrap())
        .collect();
    for expected in ["engineering", "gitlab", "hq", "allow", "deny", "when"] {
        assert!(labels.contains(&expected), "{expected} not in {labels:?}");
    }

    let reply = session.request("shutdown", Value::Null);
    assert_eq!(reply["result"], Value::Null);
    session.notify("exit", Value::Null);
    let status = session.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn exit_without_shutdown_is_an_error_and_bad_json_is_answered() {
    let repository = tree(&[("rules.fz", "site hq\n")]);
    let root = repository.path().canonicalize().unwrap();
    let mut session = Session::start(&root);
    let garbage = "{not json";
    write!(
        session.input,
        "Content-Length: {}\r\n\r\n{garbage}",
        garbage.len()
    )
    .unwrap();
    session.input.flush().unwrap();
    let reply = session.next();
    assert_eq!(reply["error"]["code"], -32700, "{reply}");
    session.notify("exit", Value::Null);
    assert_eq!(session.child.wait().unwrap().code(), Some(1));
}

/// The VS Code extension (compiler/editors/vscode) is a manifest and a few lines of glue; VS
/// Code itself is not on the test machine. What can drift is checked here: it claims `.fz`
/// files for the language `fz`, its entry point and language configuration exist and parse,
/// and it starts `fzc lsp` for documents of that language.
#[test]
fn the_vs_code_extension_starts_fzc_lsp_for_fz_files() {
    let dir = common::repo().join("compiler/editors/vscode");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    let manifest: Value = serde_json::from_str(&read("package.json")).expect("package.json");
    let language = &manifest["contributes"]["languages"][0];
    assert_eq!(language["id"], "fz");
    assert_eq!(language["extensions"], json!([".fz"]));
    let configuration = language["configuration"].as_str().expect("configuration");
    let configuration: Value =
        serde_json::from_str(&read(configuration)).expect("language configuration");
    assert_eq!(configuration["comments"]["lineComment"], "#");
    assert_eq!(
        manifest["contributes"]["configuration"]["properties"]["fz.fzcPath"]["default"],
        "fzc"
    );
    let main = read(manifest["main"].as_str().expect("main"));
    assert!(
        main.contains(r#"{ command: fzc, args: ["lsp"] }"#),
        "{main}"
    );
    assert!(main.contains(r#"language: "fz""#), "{main}");
    assert!(
        manifest["dependencies"]["vscode-languageclient"].is_string(),
        "{manifest}"
    );
}

/// The tree is checked once the client says it is ready, so its diagnostics are there before
/// any file is opened; opening a file as it is on disk then costs no check (the first edit
/// after it is not kept waiting), and the edit that fixes it clears them.
#[test]
fn the_tree_is_checked_when_the_client_is_ready_and_opening_a_file_unchanged_checks_nothing() {
    let broken = "allow engineerng -> gitlab\n";
    let repository = tree(&[
        ("policies/declarations.fz", DECLARATIONS),
        ("policies/rules.fz", broken),
    ]);
    let root = repository.path().canonicalize().unwrap();
    let mut session = Session::start(&root);
    let rules = format!("file://{}/policies/rules.fz", root.display());
    let diagnostics = session.diagnostics_for(&rules);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_eq!(diagnostics[0]["code"], "E004");

    session.notify(
        "textDocument/didOpen",
        json!({ "textDocument": { "uri": rules, "languageId": "fz", "version": 1, "text": broken } }),
    );
    // Requests are answered in order: whatever the open published comes before this reply.
    session.next_id += 1;
    let id = session.next_id;
    session.send(
        &json!({ "jsonrpc": "2.0", "id": id, "method": "textDocument/completion",
                          "params": position(&rules, 0, 0) }),
    );
    loop {
        let message = session.next();
        assert_ne!(
            message["method"], "textDocument/publishDiagnostics",
            "opening an unchanged file checked the tree again: {message}"
        );
        if message["id"] == id {
            break;
        }
    }

    session.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": rules, "version": 2 },
                "contentChanges": [{ "text": "allow engineering -> gitlab\n" }] }),
    );
    assert_eq!(session.diagnostics_for(&rules), Vec::<Value>::new());
}
