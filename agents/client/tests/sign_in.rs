//! `fz-client sign-in` against a real `fz-portal serve`: the client prints the sign-in URL and
//! listens on loopback; a browser (the test's minimal one) signs in with an email code read from
//! the portal's mail folder and follows the portal's last redirect to the client's listener;
//! the client stores `nonce ‖ fragment`, which opens the portal's client socket, while the
//! fragment the browser saw does not; `fz-client sign-out` revokes it and closes that socket. And the client's side of the attacks: an answer with
//! another state, or for another account, stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use fz_e2e::local::LocalPortal;
use fz_host::testing::agents::{TestClient, key};
use fz_host::testing::browser::{Browser, Page};

/// `fz-client sign-in` for account `acme` of `portal`, its token going to `token_file`; returns
/// the process and the sign-in URL it printed.
fn sign_in(portal: &LocalPortal, token_file: &Path) -> (Child, String) {
    sign_in_with(portal, token_file, &[], None)
}

/// [`sign_in`] with more arguments, and `XDG_RUNTIME_DIR` set to `runtime` when given.
fn sign_in_with(
    portal: &LocalPortal,
    token_file: &Path,
    extra: &[&str],
    runtime: Option<&Path>,
) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fz-client"));
    if let Some(runtime) = runtime {
        command.env("XDG_RUNTIME_DIR", runtime);
    }
    let mut child = command
        .arg("sign-in")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme", "--no-browser", "--timeout-secs", "60"])
        .arg("--token-file")
        .arg(token_file)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let url = printed_link(&mut stdout, portal);
    // The rest of its output is read at its end.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (child, url)
}

/// The sign-in link (path and query) a client printed for `portal`.
fn printed_link(stdout: &mut BufReader<ChildStdout>, portal: &LocalPortal) -> String {
    loop {
        let mut line = String::new();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "no URL printed");
        if let Some(url) = line
            .trim()
            .strip_prefix(&format!("http://{}", portal.address))
        {
            return url.to_owned();
        }
    }
}

/// Signs in through the pages as a person would, up to the portal's last redirect.
async fn through_the_pages(portal: &LocalPortal, browser: &mut Browser, link: &str) -> String {
    let started = browser.get(link).await;
    assert_eq!(started.status, 303, "{started:?}");
    let page = browser.get("/acme").await;
    let sent = browser
        .post(
            "/acme/sign-in/email",
            &[("csrf", &page.csrf()), ("email", "alice@acme.example")],
        )
        .await;
    assert_eq!(sent.status, 303);
    let code_page = browser.get("/acme/sign-in/email").await;
    let code = portal.mailed_code(1).await;
    let done = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &code)],
        )
        .await;
    assert_eq!(done.status, 303, "{done:?}");
    done.location().to_owned()
}

fn stderr_of(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_client_signs_in_through_the_browser_and_its_token_opens_the_portal() {
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("fz/token");
    let (client, link) = sign_in(&portal, &token_file);
    let mut browser = Browser::new(portal.address);
    let callback = through_the_pages(&portal, &mut browser, &link).await;
    assert!(callback.starts_with("http://127.0.0.1:"), "{callback}");

    // The browser follows the redirect to the client's listener, which says it is done.
    let answered: Page = browser.visit(&callback).await;
    assert_eq!(answered.status, 200, "{answered:?}");
    assert!(
        answered
            .body
            .contains("You are signed in to acme as alice@acme.example")
    );
    let (succeeded, stderr) = stderr_of(client);
    assert!(succeeded, "{stderr}");

    // The token is nonce ‖ fragment, readable by its owner alone.
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(token_file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let query = callback.split_once('?').unwrap().1;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
    let fragment = &pairs.iter().find(|(k, _)| k == "fragment").unwrap().1;
    assert_eq!(token.len(), 43 + fragment.len());
    assert!(token.ends_with(fragment.as_str()));

    // It opens the client socket; the fragment the browser saw does not.
    let pinned = portal.pinned();
    let connected = TestClient::connect(portal.address, pinned, "acme", &token, key(1)).await;
    let mut live = connected.unwrap_or_else(|e| panic!("{e:?}"));
    let refused = TestClient::connect(portal.address, pinned, "acme", fragment, key(2)).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(401));

    // Signing out revokes it at the portal, which closes the live connection at once, and
    // deletes the file.
    let signed_out = Command::new(env!("CARGO_BIN_EXE_fz-client"))
        .arg("sign-out")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(signed_out.status.success(), "{signed_out:?}");
    assert!(
        String::from_utf8_lossy(&signed_out.stdout).contains("the portal revoked"),
        "{signed_out:?}"
    );
    assert!(!token_file.exists());
    assert!(
        live.next().await.is_none(),
        "the signed-out client is still connected"
    );
    let refused = TestClient::connect(portal.address, pinned, "acme", &token, key(1)).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(401));

    // The listener took one answer and is gone: a replayed callback finds nobody.
    let port: u16 = callback
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}

/// The `callback` and `state` of a sign-in URL the client printed.
fn callback_and_state(link: &str) -> (String, String) {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(link.split_once('?').unwrap().1).unwrap();
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).unwrap().1.clone();
    (get("callback"), get("state"))
}

#[tokio::test]
async fn an_answer_with_another_state_or_account_stores_nothing() {
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let (first, first_link) = sign_in(&portal, &dir.path().join("first"));
    let (second, second_link) = sign_in(&portal, &dir.path().join("second"));
    let (first_callback, _) = callback_and_state(&first_link);
    let (second_callback, second_state) = callback_and_state(&second_link);
    let answer = |account: &str, state: &str| {
        serde_urlencoded::to_string([
            ("account", account),
            ("fragment", "fz1.client.acme.tok_0.secret.mac"),
            ("state", state),
            ("user", "mallory@acme.example"),
        ])
        .unwrap()
    };
    let mut browser = Browser::new(portal.address);

    // An answer made for another sign-in (an attacker's own, say, planted on this client).
    let refused = browser
        .visit(&format!(
            "{first_callback}?{}",
            answer("acme", &second_state)
        ))
        .await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("another `state`"), "{}", refused.body);
    let (succeeded, stderr) = stderr_of(first);
    assert!(!succeeded);
    assert!(stderr.contains("nothing was stored"), "{stderr}");

    // The right state, for another account.
    let refused = browser
        .visit(&format!(
            "{second_callback}?{}",
            answer("globex", &second_state)
        ))
        .await;
    assert_eq!(refused.status, 400);
    let (succeeded, stderr) = stderr_of(second);
    assert!(!succeeded);
    assert!(
        stderr.contains("for account `globex`, not `acme`"),
        "{stderr}"
    );

    assert!(!dir.path().join("first").exists());
    assert!(!dir.path().join("second").exists());
}

#[tokio::test]
async fn the_deep_link_hands_the_answer_to_the_waiting_sign_in_over_a_private_socket() {
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let token_file = dir.path().join("token");
    let (child, link) = sign_in_with(
        &portal,
        &token_file,
        &["--callback", "deep-link"],
        Some(&runtime),
    );
    let (callback, _) = callback_and_state(&link);
    assert_eq!(callback, "fz://handle_client_sign_in_callback");
    let socket = runtime.join("fz-client/sign-in.sock");
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    let mut browser = Browser::new(portal.address);
    let deep_link = through_the_pages(&portal, &mut browser, &link).await;
    assert!(
        deep_link.starts_with("fz://handle_client_sign_in_callback?account=acme&fragment="),
        "{deep_link}"
    );
    let handle = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_fz-client"))
            .env("XDG_RUNTIME_DIR", &runtime)
            .args(["handle-url", url])
            .output()
            .unwrap()
    };
    // A link that is not a sign-in's is not even handed over.
    let foreign = handle("fz://something_else?x=1");
    assert!(!foreign.status.success());
    // The right one is taken, acknowledged, and ends the wait.
    let handed = handle(&deep_link);
    assert!(handed.status.success(), "{handed:?}");
    assert!(String::from_utf8_lossy(&handed.stdout).contains("the sign-in took the link"));
    let (succeeded, stderr) = stderr_of(child);
    assert!(succeeded, "{stderr}");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        token.trim().ends_with(
            deep_link
                .split("fragment=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap()
        )
    );
    assert!(!socket.exists(), "the socket outlived the sign-in");
    // Nobody waits now: handing over again says so.
    let late = handle(&deep_link);
    assert!(!late.status.success());
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("no `fz-client sign-in` is waiting"),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_deep_link_with_another_state_is_refused_to_the_handler_and_stores_nothing() {
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let (child, _) = sign_in_with(
        &portal,
        &dir.path().join("token"),
        &["--callback", "deep-link"],
        Some(&runtime),
    );
    let forged = "fz://handle_client_sign_in_callback?account=acme&fragment=fz1.client.acme.tok_0.s.m&state=not-this-one&user=mallory%40acme.example";
    let handed = Command::new(env!("CARGO_BIN_EXE_fz-client"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["handle-url", forged])
        .output()
        .unwrap();
    assert!(!handed.status.success());
    assert!(
        String::from_utf8_lossy(&handed.stderr).contains("another `state`"),
        "{handed:?}"
    );
    let (succeeded, stderr) = stderr_of(child);
    assert!(!succeeded);
    assert!(stderr.contains("nothing was stored"), "{stderr}");
    assert!(!dir.path().join("token").exists());
}

#[test]
fn install_url_handler_writes_a_desktop_entry_for_fz_links() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fz-client"))
        .arg("install-url-handler")
        .env("XDG_DATA_HOME", dir.path())
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let entry = std::fs::read_to_string(dir.path().join("applications/fz-client.desktop")).unwrap();
    assert!(entry.contains("MimeType=x-scheme-handler/fz;"), "{entry}");
    assert!(
        entry.contains(&format!(
            "Exec=\"{}\" handle-url %u",
            env!("CARGO_BIN_EXE_fz-client")
        )),
        "{entry}"
    );
}

#[tokio::test]
async fn a_client_started_without_a_token_signs_in_first() {
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fz-client"))
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args([
            "--account",
            "acme",
            "--portal-key",
            &portal.pinned().to_string(),
        ])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--key-file")
        .arg(dir.path().join("key"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--resolv-conf")
        .arg(dir.path().join("resolv.conf"))
        .env("PATH", "/nonexistent") // no xdg-open: it says to open the URL by hand
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let link = printed_link(&mut stdout, &portal);
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let mut browser = Browser::new(portal.address);
    let callback = through_the_pages(&portal, &mut browser, &link).await;
    assert_eq!(browser.visit(&callback).await.status, 200);
    // The token is written before the client goes on to start (which needs root for its TUN
    // device: whether it gets that far does not matter here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !token_file.exists() {
        assert!(std::time::Instant::now() < deadline, "no token written");
        // A poll interval: the client writes the file on its own time.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_token_in_the_environment_is_used_instead_of_signing_in() {
    let dir = tempfile::tempdir().unwrap();
    let run = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_fz-client"))
            .args(["--portal-url", "ws://127.0.0.1:9", "--account", "acme"])
            .args(["--portal-key", "not-a-key", "--token-file"])
            .arg(dir.path().join("missing-token"))
            .env("FZ_TOKEN", token)
            .env("PATH", "/nonexistent")
            .output()
            .unwrap()
    };
    // With the token given, the missing file starts no sign-in: the client goes straight on
    // to its configuration, and stops at the bad key.
    let out = run("fz1.client.acme.tok_0.secret.mac");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("`--portal-key`"), "{printed}");
    assert!(!printed.contains("Sign in to"), "{printed}");
    let out = run("");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is FZ_TOKEN set to nothing?"));
}

/// `fz-client` with `args` in an environment of `home` alone: no D-Bus session unless
/// `session` (a shell command line to run it in: `dbus-run-session -- sh -c …`).
fn isolated(home: &Path, runtime: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fz-client"));
    command
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("PATH", "/nonexistent");
    command
}

#[tokio::test]
async fn without_a_keyring_the_token_goes_to_the_default_file_and_says_so() {
    let portal = LocalPortal::start("");
    let home = tempfile::tempdir().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let mut child = isolated(home.path(), runtime.path())
        .arg("sign-in")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme", "--no-browser"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let link = printed_link(&mut stdout, &portal);
    let mut browser = Browser::new(portal.address);
    let callback = through_the_pages(&portal, &mut browser, &link).await;
    assert_eq!(browser.visit(&callback).await.status, 200);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let file = home.path().join(".config/fz/token");
    assert!(
        rest.contains(&format!(
            "The token is in {} (readable by you alone)",
            file.display()
        )),
        "{rest}"
    );
    assert!(rest.contains("(No desktop keyring answered:"), "{rest}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Sign-out finds it there too, and deletes it.
    let out = isolated(home.path(), runtime.path())
        .arg("sign-out")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!file.exists());
}

#[tokio::test]
async fn with_a_desktop_keyring_the_token_lives_there_and_sign_out_deletes_it() {
    let test = "sign_in::with_a_desktop_keyring_the_token_lives_there_and_sign_out_deletes_it";
    let present = ["/usr/bin/dbus-run-session", "/usr/bin/gnome-keyring-daemon"]
        .iter()
        .all(|program| Path::new(program).exists());
    if !present {
        fz_host::testing::skip_needing(
            test,
            "gnome-keyring",
            "a Secret Service is needed: apt install dbus gnome-keyring",
        );
        return;
    }
    let _ = std::fs::remove_file(fz_host::testing::marker(test));
    let portal = LocalPortal::start("");
    let home = tempfile::tempdir().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let portal_url = format!("ws://{}", portal.address);
    // One D-Bus session with an unlocked keyring (gnome-keyring's, the Secret Service), in
    // which the client signs in, then signs out.
    let script = "printf test-password | gnome-keyring-daemon --unlock --components=secrets \
                  >/dev/null && \"$0\" sign-in --portal-url \"$1\" --account acme --no-browser \
                  && \"$0\" sign-out --portal-url \"$1\" --account acme";
    let mut session = Command::new("/usr/bin/dbus-run-session")
        .args([
            "--",
            "sh",
            "-c",
            script,
            env!("CARGO_BIN_EXE_fz-client"),
            &portal_url,
        ])
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(session.stdout.take().unwrap());
    let link = printed_link(&mut stdout, &portal);
    let mut browser = Browser::new(portal.address);
    let callback = through_the_pages(&portal, &mut browser, &link).await;
    assert_eq!(browser.visit(&callback).await.status, 200);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = session.wait().unwrap();
    assert!(status.success(), "{rest}");
    assert!(
        rest.contains("The token is in the desktop keyring (Secret Service: service `fz-client`"),
        "{rest}"
    );
    // The sign-out read it from the keyring (the portal took it: it revoked it) and deleted it.
    assert!(
        rest.contains("the portal revoked this device's token"),
        "{rest}"
    );
    assert!(
        rest.contains("Deleted it from the desktop keyring"),
        "{rest}"
    );
    assert!(
        !home.path().join(".config/fz/token").exists(),
        "a file was written too"
    );
    let tokens = portal.admin(&["token", "list", "--account", "acme"]);
    assert!(tokens.contains("revoked"), "{tokens}");
}
