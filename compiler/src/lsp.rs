//! The language server's core (`fzc lsp`), without IO: JSON-RPC messages in, messages out.
//! The driver (`fzc`'s `lsp` command) frames them on standard input and output and reads the
//! tree from disk once, at `initialize`.
//!
//! It holds the policy tree as files (read from disk) under the editor's open documents (their
//! unsaved text wins), and after every change checks the whole tree as `fzc check` does and
//! publishes each file's diagnostics. Names are global to a tree and a word outside strings
//! and comments that equals a declared name refers to it, so definitions and references are
//! found from the declarations and the words of each file ([`fz_lang::words`]); hover reads
//! the decision table of the last check that compiled.
//!
//! Positions are LSP's: zero-based lines, and characters counted in UTF-16 code units.

use std::collections::{BTreeMap, BTreeSet};

use fz_lang::ast::Statement;
use fz_lang::{Diagnostic, FileId, Severity, SourceFile, Sources};
use serde_json::{Value, json};

use crate::resolve::Kind;
use crate::table::Table;

/// Keywords offered by completion, beside the tree's names.
const KEYWORDS: [&str; 22] = [
    "site",
    "resource",
    "group",
    "allow",
    "deny",
    "user",
    "when",
    "and",
    "as",
    "test",
    "given",
    "expect",
    "assert",
    "never",
    "only",
    "address",
    "ports",
    "members",
    "idp",
    "description",
    "internet",
    "everyone",
];

/// A declared name: what it is and where.
#[derive(Clone, Debug)]
struct Declaration {
    kind: Kind,
    file: String,
    start: usize,
    end: usize,
}

/// LSP's `CompletionItemKind` for a name: Module, Class, Interface (the closest for each).
fn completion_kind(kind: Kind) -> u8 {
    match kind {
        Kind::Site => 9,
        Kind::Resource => 7,
        Kind::Group => 8,
    }
}

/// The server's state: the tree and what the last check found.
#[derive(Debug, Default)]
pub struct Server {
    /// `file://` URI of the tree's directory, ending in `/`.
    root: String,
    /// The tree's `.fz` and `.cedar` files as read from disk, by path in the tree.
    disk: BTreeMap<String, String>,
    /// Open documents' text, by path in the tree.
    open: BTreeMap<String, String>,
    /// Files whose last published diagnostics were not empty.
    published: BTreeSet<String>,
    /// The tree's declarations, worked out when a request needs them and forgotten at the next
    /// change (an edit's diagnostics do not wait for them).
    declarations: Option<BTreeMap<String, Declaration>>,
    /// Syntax trees of the files as last checked: an edit parses only the file it changed.
    parsed: crate::ParseCache,
    table: Option<Table>,
    /// The tree as it is now has been checked and its diagnostics published: opening a file
    /// unchanged, or an edit that changes nothing, needs no check.
    checked: bool,
    shut_down: bool,
}

impl Server {
    /// A server for the tree at `root` (a `file://` URI of its directory), whose files on disk
    /// are `files` (path in the tree, text).
    pub fn new(root: &str, files: Vec<(String, String)>) -> Server {
        let root = if root.ends_with('/') {
            root.to_owned()
        } else {
            format!("{root}/")
        };
        Server {
            root,
            disk: files.into_iter().collect(),
            ..Server::default()
        }
    }

    /// Whether `exit` came after `shutdown` (the process should then exit with 0).
    pub fn shut_down(&self) -> bool {
        self.shut_down
    }

    /// Handles one message; returns the messages to send, in order.
    pub fn handle(&mut self, message: &Value) -> Vec<Value> {
        let method = message["method"].as_str().unwrap_or_default();
        let params = &message["params"];
        let id = message.get("id").cloned();
        let result = match method {
            "initialize" => Some(Ok(capabilities())),
            "shutdown" => {
                self.shut_down = true;
                Some(Ok(Value::Null))
            }
            // The client is ready: the whole tree's diagnostics, before any file is opened,
            // so that opening one (unchanged) costs nothing.
            "initialized" => return self.check_if_changed(),
            "textDocument/didOpen" => {
                let document = &params["textDocument"];
                self.set_text(document["uri"].as_str(), document["text"].as_str());
                return self.check_if_changed();
            }
            "textDocument/didChange" => {
                // Full synchronisation: the last change is the whole text.
                let text = params["contentChanges"]
                    .as_array()
                    .and_then(|changes| changes.last())
                    .and_then(|change| change["text"].as_str());
                self.set_text(params["textDocument"]["uri"].as_str(), text);
                return self.check_if_changed();
            }
            "textDocument/didClose" => {
                if let Some(path) = self.path(params["textDocument"]["uri"].as_str())
                    && let Some(text) = self.open.remove(&path)
                    && self.disk.get(&path) != Some(&text)
                {
                    self.checked = false;
                }
                return self.check_if_changed();
            }
            "textDocument/definition" => Some(Ok(self.definition(params))),
            "textDocument/references" => Some(Ok(self.references(params))),
            "textDocument/hover" => Some(Ok(self.hover(params))),
            "textDocument/completion" => Some(Ok(self.completion())),
            "textDocument/formatting" => Some(Ok(self.formatting(params))),
            _ if id.is_some() => Some(Err(format!("`{method}` is not supported"))),
            // Notifications this server has no use for (`initialized`, `exit`, ...).
            _ => None,
        };
        match (id, result) {
            (Some(id), Some(Ok(result))) => {
                vec![json!({ "jsonrpc": "2.0", "id": id, "result": result })]
            }
            (Some(id), Some(Err(message))) => vec![json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": { "code": -32601, "message": message },
            })],
            _ => Vec::new(),
        }
    }

    /// The path in the tree of a document URI, if the document is in the tree and a policy
    /// file.
    fn path(&self, uri: Option<&str>) -> Option<String> {
        // Compared decoded: editors differ in which characters they percent-encode.
        let path = percent_decode(uri?)
            .strip_prefix(&percent_decode(&self.root))?
            .to_owned();
        (path.ends_with(".fz") || path.ends_with(".cedar")).then_some(path)
    }

    fn uri(&self, path: &str) -> String {
        format!("{}{}", self.root, percent_encode(path))
    }

    fn set_text(&mut self, uri: Option<&str>, text: Option<&str>) {
        if let (Some(path), Some(text)) = (self.path(uri), text) {
            let current = self.open.get(&path).or_else(|| self.disk.get(&path));
            if current.map(String::as_str) != Some(text) {
                self.checked = false;
            }
            self.open.insert(path, text.to_owned());
        }
    }

    fn check_if_changed(&mut self) -> Vec<Value> {
        if self.checked {
            Vec::new()
        } else {
            self.check()
        }
    }

    /// The tree as the editor sees it: files on disk, with open documents' text instead.
    fn sources(&self) -> Sources {
        let mut files: BTreeMap<&String, &String> = self.disk.iter().collect();
        files.extend(self.open.iter());
        Sources::new(
            files
                .into_iter()
                .map(|(path, text)| SourceFile::new(path.clone(), text.clone()))
                .collect(),
        )
    }

    fn text(&self, path: &str) -> Option<String> {
        self.sources()
            .iter()
            .find(|(_, file)| file.path == path)
            .map(|(_, file)| file.text.clone())
    }

    /// Checks the tree, remembers its declarations and table, and publishes every file's
    /// diagnostics (an empty list for a file that had some and has none now).
    fn check(&mut self) -> Vec<Value> {
        self.checked = true;
        let sources = self.sources();
        self.declarations = None;
        let mut checked = crate::check_incrementally(sources, &mut self.parsed);
        if let Some(table) = checked.table.take() {
            self.table = Some(table);
        }
        let mut by_file: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for diagnostic in &checked.diagnostics {
            let Some(file) = checked.sources.get(diagnostic.loc.file) else {
                continue;
            };
            by_file
                .entry(file.path.clone())
                .or_default()
                .push(lsp_diagnostic(file, diagnostic));
        }
        let mut messages = Vec::new();
        let stale: Vec<String> = self
            .published
            .iter()
            .filter(|path| !by_file.contains_key(*path))
            .cloned()
            .collect();
        for path in stale {
            by_file.insert(path, Vec::new());
        }
        self.published.clear();
        for (path, diagnostics) in by_file {
            if !diagnostics.is_empty() {
                self.published.insert(path.clone());
            }
            messages.push(json!({
                "jsonrpc": "2.0",
                "method": "textDocument/publishDiagnostics",
                "params": { "uri": self.uri(&path), "diagnostics": diagnostics },
            }));
        }
        messages
    }

    /// The name under the cursor of a `textDocument/...Position` request, with its file's text.
    fn name_at(&self, params: &Value) -> Option<(String, String)> {
        let path = self.path(params["textDocument"]["uri"].as_str())?;
        let text = self.text(&path)?;
        let offset = offset(&text, &params["position"])?;
        let name = fz_lang::words(&text)
            .into_iter()
            .find(|(at, word)| (*at..=at + word.len()).contains(&offset))
            .map(|(_, word)| word.to_owned())?;
        Some((name, text))
    }

    fn location(&self, path: &str, text: &str, start: usize, end: usize) -> Value {
        json!({
            "uri": self.uri(path),
            "range": { "start": position(text, start), "end": position(text, end) },
        })
    }

    fn declarations(&mut self) -> &BTreeMap<String, Declaration> {
        let sources = self.sources();
        self.declarations
            .get_or_insert_with(|| declarations(&sources))
    }

    fn definition(&mut self, params: &Value) -> Value {
        let Some((name, _)) = self.name_at(params) else {
            return Value::Null;
        };
        let Some(declaration) = self.declarations().get(&name).cloned() else {
            return Value::Null;
        };
        let text = self.text(&declaration.file).unwrap_or_default();
        self.location(&declaration.file, &text, declaration.start, declaration.end)
    }

    /// Every word equal to the name, in every file of the tree (the declaration too).
    fn references(&mut self, params: &Value) -> Value {
        let Some((name, _)) = self.name_at(params) else {
            return json!([]);
        };
        if !self.declarations().contains_key(&name) {
            return json!([]);
        }
        let mut locations = Vec::new();
        for (_, file) in self.sources().iter() {
            if !file.path.ends_with(".fz") {
                continue;
            }
            for (at, word) in fz_lang::words(&file.text) {
                if word == name {
                    locations.push(self.location(&file.path, &file.text, at, at + word.len()));
                }
            }
        }
        Value::Array(locations)
    }

    fn hover(&mut self, params: &Value) -> Value {
        let Some((name, _)) = self.name_at(params) else {
            return Value::Null;
        };
        let Some(kind) = self.declarations().get(&name).map(|d| d.kind) else {
            return Value::Null;
        };
        let mut text = format!("**{} `{name}`**", kind.as_str());
        if let Some(table) = &self.table {
            text += &describe(table, kind, &name);
        }
        json!({ "contents": { "kind": "markdown", "value": text } })
    }

    fn completion(&mut self) -> Value {
        let names = self.declarations().iter().map(|(name, declaration)| {
            json!({
                "label": name,
                "kind": completion_kind(declaration.kind),
                "detail": declaration.kind.as_str(),
            })
        });
        // 14: `CompletionItemKind.Keyword`.
        let keywords = KEYWORDS
            .iter()
            .map(|keyword| json!({ "label": keyword, "kind": 14 }));
        Value::Array(names.chain(keywords).collect())
    }

    /// The whole document in `fzc fmt`'s layout, as one edit; none when it is already in it or
    /// does not parse.
    fn formatting(&self, params: &Value) -> Value {
        let Some(path) = self.path(params["textDocument"]["uri"].as_str()) else {
            return json!([]);
        };
        let Some(text) = self.text(&path).filter(|_| path.ends_with(".fz")) else {
            return json!([]);
        };
        match fz_lang::format_file(FileId(0), &text) {
            Ok(formatted) if formatted != text => json!([{
                "range": { "start": position(&text, 0), "end": position(&text, text.len()) },
                "newText": formatted,
            }]),
            _ => json!([]),
        }
    }
}

fn capabilities() -> Value {
    json!({
        "capabilities": {
            // 1: full text on every change.
            "textDocumentSync": 1,
            "definitionProvider": true,
            "referencesProvider": true,
            "hoverProvider": true,
            "completionProvider": {},
            "documentFormattingProvider": true,
        },
        "serverInfo": { "name": "fzc", "version": env!("CARGO_PKG_VERSION") },
    })
}

/// Where each site, resource and group of the tree is declared (its name).
fn declarations(sources: &Sources) -> BTreeMap<String, Declaration> {
    let mut found = BTreeMap::new();
    for (id, file) in sources.iter() {
        if !file.path.ends_with(".fz") {
            continue;
        }
        let (ast, _) = fz_lang::parse_file(id, &file.text);
        for statement in &ast.statements {
            let (kind, name) = match statement {
                Statement::Site(site) => (Kind::Site, &site.node.name),
                Statement::Resource(resource) => (Kind::Resource, &resource.node.name),
                Statement::Group(group) => (Kind::Group, &group.node.name),
                _ => continue,
            };
            found
                .entry(name.node.clone())
                .or_insert_with(|| Declaration {
                    kind,
                    file: file.path.clone(),
                    start: name.loc.span.start as usize,
                    end: name.loc.span.end as usize,
                });
        }
    }
    found
}

/// What hover says of a name, from the decision table.
fn describe(table: &Table, kind: Kind, name: &str) -> String {
    let rule = |index: &u32| {
        table
            .rules
            .get(*index as usize)
            .map(|r| format!("`{}` ({})", r.id, r.origin))
            .unwrap_or_default()
    };
    match kind {
        Kind::Resource => {
            let Some(resource) = table.resources.iter().find(|r| r.id == name) else {
                return String::new();
            };
            let site = table
                .sites
                .get(resource.site as usize)
                .map_or("", |s| s.id.as_str());
            let ports = match &resource.ports {
                None => "all traffic".to_owned(),
                Some(ports) => ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let address = match serde_json::to_value(&resource.address) {
                Ok(Value::String(text)) => text,
                Ok(other) => other.to_string(),
                Err(_) => String::new(),
            };
            let list = |rules: &[u32]| {
                if rules.is_empty() {
                    "none".to_owned()
                } else {
                    rules.iter().map(rule).collect::<Vec<_>>().join(", ")
                }
            };
            format!(
                "\n\naddress `{address}`, site `{site}`, ports {ports}\n\nallowed by {}\n\ndenied by {}",
                list(&resource.allow),
                list(&resource.deny)
            )
        }
        Kind::Group => {
            let Some(group) = table.groups.iter().find(|g| g.id == name) else {
                return String::new();
            };
            let members = if group.members.is_empty() {
                "no static members".to_owned()
            } else {
                group.members.join(", ")
            };
            let idp: Vec<String> = group
                .idp
                .iter()
                .map(|b| format!("`{}` group \"{}\"", b.provider, b.group))
                .collect();
            let synced = if idp.is_empty() {
                "no identity-provider group (static only)".to_owned()
            } else {
                format!("synced from {}", idp.join(", "))
            };
            format!("\n\nmembers: {members}\n\n{synced}")
        }
        Kind::Site => {
            let Some(site) = table.sites.iter().find(|s| s.id == name) else {
                return String::new();
            };
            let resources: Vec<&str> = site
                .resources
                .iter()
                .filter_map(|r| table.resources.get(*r as usize))
                .map(|r| r.id.as_str())
                .collect();
            format!("\n\nresources: {}", resources.join(", "))
        }
    }
}

fn lsp_diagnostic(file: &SourceFile, diagnostic: &Diagnostic) -> Value {
    let start = diagnostic.loc.span.start as usize;
    let end = (diagnostic.loc.span.end as usize).max(start);
    let mut message = diagnostic.message.clone();
    for note in &diagnostic.notes {
        message += &format!("\nnote: {note}");
    }
    if let Some(help) = &diagnostic.help {
        message += &format!("\nhelp: {help}");
    }
    json!({
        "range": { "start": position(&file.text, start), "end": position(&file.text, end) },
        // 1: Error, 2: Warning.
        "severity": if diagnostic.severity == Severity::Error { 1 } else { 2 },
        "code": diagnostic.code.as_str(),
        "source": "fzc",
        "message": message,
    })
}

/// LSP position (zero-based line, UTF-16 character) of a byte offset.
fn position(text: &str, offset: usize) -> Value {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let character: usize = before
        .get(line_start..)
        .unwrap_or("")
        .chars()
        .map(char::len_utf16)
        .sum();
    json!({ "line": line, "character": character })
}

/// The byte offset of an LSP position, if the text has that line.
fn offset(text: &str, position: &Value) -> Option<usize> {
    let line = usize::try_from(position["line"].as_u64()?).ok()?;
    let character = usize::try_from(position["character"].as_u64()?).ok()?;
    let line_start = if line == 0 {
        0
    } else {
        text.match_indices('\n').nth(line - 1)?.0 + 1
    };
    let line_text = text[line_start..].split('\n').next().unwrap_or("");
    let mut units = 0;
    for (at, c) in line_text.char_indices() {
        if units >= character {
            return Some(line_start + at);
        }
        units += c.len_utf16();
    }
    Some(line_start + line_text.len())
}

/// `%20` and the like back into text; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (b'%', Some(value)) => {
                out.push(value);
                i += 3;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

/// A path as a URI path: what is not unreserved or `/` percent-encoded.
fn percent_encode(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `file://` URI of a directory, for [`Server::new`].
pub fn directory_uri(path: &std::path::Path) -> String {
    format!("file://{}/", percent_encode(&path.display().to_string()))
}

/// The directory of a `file://` URI.
pub fn uri_directory(uri: &str) -> Option<std::path::PathBuf> {
    uri.strip_prefix("file://")
        .map(|path| std::path::PathBuf::from(percent_decode(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: [(&str, &str); 2] = [
        (
            "declarations.fz",
            "site hq\nresource gitlab { address \"gitlab.company.com\"; site hq; ports tcp/443 }\n\
             group engineering { members \"alice@company.com\" }\n",
        ),
        ("rules.fz", "allow engineering -> gitlab as eng\n"),
    ];

    fn server() -> Server {
        let files = TREE
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect();
        let mut server = Server::new("file:///tree", files);
        server.handle(&json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {} }));
        server
    }

    fn at(line: u64, character: u64) -> Value {
        json!({ "textDocument": { "uri": "file:///tree/rules.fz" }, "position": { "line": line, "character": character } })
    }

    #[test]
    fn an_edit_publishes_diagnostics_and_a_fix_clears_them() {
        let mut server = server();
        let open = |text: &str| {
            json!({ "jsonrpc": "2.0", "method": "textDocument/didChange", "params": {
                "textDocument": { "uri": "file:///tree/rules.fz", "version": 2 },
                "contentChanges": [{ "text": text }],
            }})
        };
        let sent = server.handle(&open("allow engineerng -> gitlab as eng\n"));
        let published: Vec<&Value> = sent
            .iter()
            .filter(|m| m["params"]["uri"] == "file:///tree/rules.fz")
            .collect();
        assert_eq!(published.len(), 1, "{sent:#?}");
        let diagnostic = &published[0]["params"]["diagnostics"][0];
        assert_eq!(diagnostic["code"], "E004");
        assert_eq!(
            diagnostic["range"],
            json!({ "start": { "line": 0, "character": 6 }, "end": { "line": 0, "character": 16 } })
        );

        let sent = server.handle(&open("allow engineering -> gitlab as eng\n"));
        let cleared = sent
            .iter()
            .find(|m| m["params"]["uri"] == "file:///tree/rules.fz")
            .unwrap();
        assert_eq!(cleared["params"]["diagnostics"], json!([]));
    }

    #[test]
    fn definition_references_hover_and_completion() {
        let mut server = server();
        server.handle(
            &json!({ "jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {
            "textDocument": { "uri": "file:///tree/rules.fz", "text": TREE[1].1 } } }),
        );
        let request = |method: &str, params: Value| json!({ "jsonrpc": "2.0", "id": 7, "method": method, "params": params });
        let reply = server.handle(&request("textDocument/definition", at(0, 24)));
        assert_eq!(reply[0]["result"]["uri"], "file:///tree/declarations.fz");
        assert_eq!(
            reply[0]["result"]["range"]["start"],
            json!({ "line": 1, "character": 9 })
        );

        let reply = server.handle(&request("textDocument/references", at(0, 8)));
        let files: Vec<&str> = reply[0]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["uri"].as_str().unwrap())
            .collect();
        assert_eq!(
            files,
            ["file:///tree/declarations.fz", "file:///tree/rules.fz"]
        );

        let reply = server.handle(&request("textDocument/hover", at(0, 22)));
        let hover = reply[0]["result"]["contents"]["value"].as_str().unwrap();
        assert!(hover.contains("address `gitlab.company.com`"), "{hover}");
        assert!(hover.contains("allowed by `eng` (rules.fz:1)"), "{hover}");

        let reply = server.handle(&request("textDocument/completion", Value::Null));
        let labels: Vec<&str> = reply[0]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["label"].as_str().unwrap())
            .collect();
        assert!(
            labels.contains(&"engineering") && labels.contains(&"allow"),
            "{labels:?}"
        );

        let reply = server.handle(&request("textDocument/unknown", Value::Null));
        assert_eq!(reply[0]["error"]["code"], -32601);
    }

    #[test]
    fn positions_count_utf16_units() {
        let text = "# é😀\nsite hq";
        assert_eq!(
            position(text, text.len()),
            json!({ "line": 1, "character": 7 })
        );
        // `😀` is two UTF-16 units and four bytes.
        assert_eq!(
            offset(text, &json!({ "line": 0, "character": 5 })),
            Some(text.find('\n').unwrap())
        );
        assert_eq!(
            position(text, text.find('\n').unwrap()),
            json!({ "line": 0, "character": 5 })
        );
        assert_eq!(offset(text, &json!({ "line": 9, "character": 0 })), None);
    }
}
