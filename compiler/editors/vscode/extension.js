// The fz policy extension: starts `fzc lsp` for `.fz` files and leaves everything else to it
// (diagnostics, definition, references, hover, completion, formatting; docs/editors.md).
"use strict";

const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const fzc = vscode.workspace.getConfiguration("fz").get("fzcPath", "fzc");
  client = new LanguageClient(
    "fzc",
    "fz policy (fzc lsp)",
    { command: fzc, args: ["lsp"] },
    { documentSelector: [{ scheme: "file", language: "fz" }] },
  );
  context.subscriptions.push(client);
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
