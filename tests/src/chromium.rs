//! A real browser for the tests: Debian's Chromium, headless, driven over the Chrome DevTools
//! Protocol (a WebSocket of JSON commands, replies and events; no crate needed beyond the one
//! WebSocket client the workspace has). It opens pages, fills and sends forms as a person
//! would, reads the page, and takes screenshots.
//!
//! Started with a fresh profile and with its background traffic off (this machine's network is
//! closed, and Chromium would otherwise keep trying Google's hosts); stopped when dropped.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where Debian puts it.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long a page may take to do what a test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// A headless Chromium with one page open.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Chromium {
    /// Starts Chromium and opens a blank page; `Err` says why it cannot run here (the test
    /// then skips loudly).
    pub async fn start() -> Result<Chromium, String> {
        if !Path::new(CHROMIUM).exists() {
            return Err(format!("{CHROMIUM} is missing: apt install chromium"));
        }
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--window-size=1000,760",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {CHROMIUM}: {e}"))?;
        // It says where its DevTools listen on stderr: `DevTools listening on ws://...`.
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (found, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = found.send(url.trim().to_owned());
                    sent = true;
                }
            }
        });
        let browser_url = lines
            .recv_timeout(PATIENCE)
            .map_err(|_| "Chromium did not say where its DevTools listen".to_owned())?;
        let (socket, _) = tokio_tungstenite::connect_async(browser_url.as_str())
            .await
            .map_err(|e| format!("cannot reach Chromium's DevTools: {e}"))?;
        let mut chromium = Chromium {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = chromium
            .command("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or("no target id")?
            .to_owned();
        let attached = chromium
            .command(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        chromium.session = attached["sessionId"]
            .as_str()
            .ok_or("no session id")?
            .to_owned();
        chromium.command("Page.enable", json!({})).await?;
        Ok(chromium)
    }

    /// Sends a command (to the page once attached) and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| format!("{method}: no answer from Chromium"))?;
            let Some(Ok(Message::Text(text))) = frame else {
                match frame {
                    Some(Ok(_)) => continue,
                    _ => return Err(format!("{method}: Chromium closed its DevTools")),
                }
            };
            let reply: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            // Events (no id) and replies to nothing of ours are passed over.
            if reply["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(error) = reply.get("error") {
                return Err(format!("{method}: {error}"));
            }
            return Ok(reply["result"].clone());
        }
    }

    /// Opens `url` in the page.
    pub async fn open(&mut self, url: &str) -> Result<(), String> {
        let result = self.command("Page.navigate", json!({ "url": url })).await?;
        match result.get("errorText").and_then(Value::as_str) {
            Some(error) if !error.is_empty() => Err(format!("{url}: {error}")),
            _ => Ok(()),
        }
    }

    /// Evaluates JavaScript in the page and returns its value.
    pub async fn evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until the page's text contains `text` (polling, with a deadline); returns the
    /// page's address then.
    pub async fn wait_for_text(&mut self, text: &str) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let check = format!(
            "document.readyState === 'complete' && document.body !== null && \
             document.body.innerText.includes({})",
            json!(text)
        );
        loop {
            // Between pages the context is gone for a moment: that is "not yet".
            if self.evaluate(&check).await.ok() == Some(Value::Bool(true)) {
                let url = self.evaluate("location.href").await?;
                return Ok(url.as_str().unwrap_or_default().to_owned());
            }
            if tokio::time::Instant::now() >= deadline {
                let body = self
                    .evaluate("document.body ? document.body.innerText : ''")
                    .await
                    .unwrap_or_default();
                return Err(format!(
                    "the page never said {text:?}; it says {body} ({})",
                    self.whereabouts().await
                ));
            }
            // A poll interval: the page changes on its own (a form's answer, a redirect).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the page is and which cookies the browser holds (names, domains, paths and
    /// expiry, not values): what a failed wait needs to tell a lost sign-in from a slow one.
    async fn whereabouts(&mut self) -> String {
        let url = self.evaluate("location.href").await.unwrap_or_default();
        let cookies = self
            .command("Storage.getCookies", json!({}))
            .await
            .map(|result| {
                result["cookies"]
                    .as_array()
                    .map(|all| {
                        all.iter()
                            .map(|c| {
                                let text = |key: &str| c[key].as_str().unwrap_or("?").to_owned();
                                format!(
                                    "{} for {}{} until {}",
                                    text("name"),
                                    text("domain"),
                                    text("path"),
                                    c["expires"]
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_else(|error| format!("unknown: {error}"));
        format!("at {url}; cookies: [{cookies}]")
    }

    /// Types `value` into the field `selector`, as keystrokes would (focus, then insert).
    pub async fn type_into(&mut self, selector: &str, value: &str) -> Result<(), String> {
        let focused = self
            .evaluate(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; \
                 e.focus(); e.value = ''; return true; }})()",
                json!(selector)
            ))
            .await?;
        if focused != Value::Bool(true) {
            return Err(format!("no field {selector}"));
        }
        self.command("Input.insertText", json!({ "text": value }))
            .await
            .map(drop)
    }

    /// Clicks the element `selector` (a form's button), as a person's click would.
    pub async fn click(&mut self, selector: &str) -> Result<(), String> {
        let clicked = self
            .evaluate(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; \
                 e.click(); return true; }})()",
                json!(selector)
            ))
            .await?;
        if clicked == Value::Bool(true) {
            Ok(())
        } else {
            Err(format!("nothing to click at {selector}"))
        }
    }

    /// Saves a screenshot of the page as PNG.
    pub async fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let shot = self
            .command("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
