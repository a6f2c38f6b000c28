//! The identity provider the sign-in tests run: `tests/idp/provider.mjs` (the npm package
//! `oidc-provider`, pinned by `tests/idp/package-lock.json`, installed by `.ci/run` with
//! `npm ci`) under Node, on a loopback port, with one OAuth client and the users of a file the
//! test can rewrite (their groups, say) between sign-ins. Stopped when dropped.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The provider's folder in the repository.
pub fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("idp")
}

#[derive(Debug)]
pub struct TestIdp {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`.
    pub issuer: String,
}

/// The OAuth client the portal is to the provider.
pub const CLIENT_ID: &str = "fz-portal";
pub const CLIENT_SECRET: &str = "test-client-secret";

impl TestIdp {
    /// Starts the provider on 127.0.0.1 with the users `users` (JSON: id → claims) for a
    /// portal whose callback is `redirect_uri`; `Err` says why it cannot run here (the test
    /// then skips loudly).
    pub fn start(redirect_uri: &str, users: &serde_json::Value) -> Result<TestIdp, String> {
        TestIdp::start_on("127.0.0.1", None, redirect_uri, users)
    }

    /// [`TestIdp::start`] on `host`, over https with `tls` (a certificate and its key, PEM)
    /// when given. Started on a thread inside a network namespace (`Netns::run`), it runs in
    /// that namespace.
    pub fn start_on(
        host: &str,
        tls: Option<(&str, &str)>,
        redirect_uri: &str,
        users: &serde_json::Value,
    ) -> Result<TestIdp, String> {
        if !folder().join("node_modules/oidc-provider").exists() {
            return Err(format!(
                "oidc-provider is not installed: npm ci --prefix {}",
                folder().display()
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let idp = |path: &str| dir.path().join(path);
        std::fs::write(idp("users.json"), users.to_string()).map_err(|e| e.to_string())?;
        let tls = match tls {
            Some((cert, key)) => {
                std::fs::write(idp("cert.pem"), cert).map_err(|e| e.to_string())?;
                std::fs::write(idp("key.pem"), key).map_err(|e| e.to_string())?;
                serde_json::json!({ "cert": idp("cert.pem"), "key": idp("key.pem") })
            }
            None => serde_json::Value::Null,
        };
        let settings = serde_json::json!({
            "host": host,
            "port": 0,
            "tls": tls,
            "clients": [{
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [redirect_uri],
            }],
            "users_file": idp("users.json"),
        });
        std::fs::write(idp("settings.json"), settings.to_string()).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(idp("provider.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new("node")
            .arg(folder().join("provider.mjs"))
            .arg(idp("settings.json"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run node: {e}"))?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        // Whatever it prints later is read and dropped: a closed pipe would kill it.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let issuer = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("the provider did not start: {line:?}"))?
            .to_owned();
        Ok(TestIdp { child, dir, issuer })
    }

    /// What the provider logged (its warnings and errors), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("provider.log")).unwrap_or_default()
    }

    /// Replaces the users (the next sign-in reads them).
    pub fn set_users(&self, users: &serde_json::Value) {
        std::fs::write(self.dir.path().join("users.json"), users.to_string()).unwrap();
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
