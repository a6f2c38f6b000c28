//! The account's sign-in page and the email one-time code, over a real socket against a
//! running portal, as a browser drives them and as an attacker would: every defence of
//! `sign_in` is a test here that fails when the defence goes, and checks that no token was
//! left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fz_host::testing::browser::{Browser, Page};
use fz_portal::store::TokenKind;
use support::portal::TestPortal;

const POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
group engineering { members "alice@acme.example" }
allow engineering -> gitlab as eng-git
"#;

const ALICE: &str = "alice@acme.example";

/// What a client draws and sends: a nonce and a state, 32 random-looking bytes each.
struct Client {
    nonce: String,
    state: String,
    callback: String,
}

impl Client {
    fn new(seed: u8) -> Client {
        Client {
            nonce: URL_SAFE_NO_PAD.encode([seed; 32]),
            state: URL_SAFE_NO_PAD.encode([seed.wrapping_add(100); 32]),
            callback: "http://127.0.0.1:49152/callback".to_owned(),
        }
    }

    fn link(&self, account: &str) -> String {
        let query = serde_urlencoded::to_string([
            ("as", "client"),
            ("nonce", &self.nonce),
            ("state", &self.state),
            ("callback", &self.callback),
            ("name", "alice's laptop"),
        ])
        .unwrap();
        format!("/{account}?{query}")
    }
}

fn mail_dir(portal: &TestPortal) -> PathBuf {
    portal.config.data_dir.join("mail")
}

/// The messages written so far, in the order sent (a message being written has a hidden name
/// until it is whole).
fn mails(portal: &TestPortal) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(mail_dir(portal))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|e| e == "eml"));
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

/// Waits (polling, with a deadline) until `count` mails were written, and returns the last
/// one's code. The mail goes out after the answer, on its own task.
async fn code_in_mail(portal: &TestPortal, count: usize) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mails = mails(portal);
        if mails.len() >= count {
            let mail = mails.last().unwrap();
            let line = mail
                .lines()
                .map(str::trim)
                .find(|l| l.len() == 9 && l.as_bytes()[4] == b'-')
                .unwrap_or_else(|| panic!("no code in {mail}"));
            return line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mail after 20 s ({} so far)",
            mails.len()
        );
        // A poll interval, not a synchronisation: the mail is written on its own task.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the client's link and the methods page; returns the page.
async fn open(browser: &mut Browser, client: &Client, account: &str) -> Page {
    let started = browser.get(&client.link(account)).await;
    assert_eq!(started.status, 303, "{started:?}");
    assert_eq!(started.location(), format!("/{account}"));
    let cookie = started.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(cookie.contains(&format!("Path=/{account}")), "{cookie}");
    let page = browser.get(&format!("/{account}")).await;
    assert_eq!(page.status, 200, "{page:?}");
    page
}

/// Asks for a code for `email`; returns the code page.
async fn ask_code(browser: &mut Browser, page: &Page, email: &str) -> Page {
    let sent = browser
        .post(
            "/acme/sign-in/email",
            &[("csrf", &page.csrf()), ("email", email)],
        )
        .await;
    assert_eq!(sent.status, 303, "{sent:?}");
    assert_eq!(sent.location(), "/acme/sign-in/email");
    let code_page = browser.get("/acme/sign-in/email").await;
    assert_eq!(code_page.status, 200, "{code_page:?}");
    code_page
}

async fn token_count(portal: &TestPortal) -> usize {
    portal.store().list_tokens("acme").await.unwrap().len()
}

/// The query of a callback `Location`, as pairs.
fn callback_query(location: &str, client: &Client) -> Vec<(String, String)> {
    let query = location
        .strip_prefix(&format!("{}?", client.callback))
        .unwrap_or_else(|| panic!("not the client's callback: {location}"));
    serde_urlencoded::from_str(query).unwrap()
}

#[tokio::test]
async fn an_email_code_sign_in_gives_a_token_that_works_only_with_the_clients_nonce() {
    let portal = TestPortal::start(POLICY, "").await;
    let client = Client::new(1);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;
    assert!(page.body.contains("alice&#39;s laptop"), "{}", page.body);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));

    let code_page = ask_code(&mut browser, &page, "  Alice@ACME.example ").await;
    assert!(code_page.body.contains(ALICE), "{}", code_page.body);
    // The code page's form may redirect to the client's listener, and nowhere else.
    let csp = code_page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("form-action 'self' http://127.0.0.1:49152;"),
        "{csp}"
    );
    let code = code_in_mail(&portal, 1).await;
    let mail = mails(&portal).pop().unwrap();
    assert!(mail.contains(&format!("To: {ALICE}")), "{mail}");

    let before = portal.now().timestamp();
    let done = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &code.to_lowercase())],
        )
        .await;
    assert_eq!(done.status, 303, "{done:?}");
    let query = callback_query(done.location(), &client);
    let keys: Vec<&str> = query.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["account", "fragment", "state", "user"]);
    assert_eq!(query[0].1, "acme");
    assert_eq!(query[2].1, client.state);
    assert_eq!(query[3].1, ALICE);
    let fragment = &query[1].1;
    assert!(fragment.starts_with("fz1.client.acme.tok_"), "{fragment}");
    // The cookie is gone: the sign-in is over.
    assert!(browser.cookies.is_empty(), "{:?}", browser.cookies);

    let store = portal.store();
    let now = portal.now().timestamp();
    let token = store
        .authenticate(&format!("{}{fragment}", client.nonce), now)
        .await
        .unwrap()
        .expect("nonce ‖ fragment is a live token");
    assert_eq!(
        token.kind,
        TokenKind::Client {
            user: ALICE.to_owned(),
            provider: Some("email".to_owned()),
        }
    );
    assert!(token.signed_in);
    assert_eq!(token.name, "alice's laptop");
    // A week from when the code was taken (the clock may tick between that and `now`).
    let issued = token.expires_at - 7 * 24 * 3600;
    assert!(
        (before..=now).contains(&issued),
        "{before} <= {issued} <= {now}"
    );
    // The callback URL alone is useless: the fragment without the nonce, or with another.
    assert!(store.authenticate(fragment, now).await.unwrap().is_none());
    let other = Client::new(2);
    assert!(
        store
            .authenticate(&format!("{}{fragment}", other.nonce), now)
            .await
            .unwrap()
            .is_none()
    );

    // The code worked once: the same code again, in a new sign-in, is refused.
    let mut again = Browser::new(portal.address());
    let page = open(&mut again, &Client::new(3), "acme").await;
    let code_page = ask_code(&mut again, &page, ALICE).await;
    let replayed = again
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &code)],
        )
        .await;
    assert_eq!(replayed.status, 401, "{replayed:?}");
    assert_eq!(token_count(&portal).await, 1);
}

#[tokio::test]
async fn wrong_expired_and_replaced_codes_are_refused_and_leave_no_token() {
    let portal = TestPortal::start(POLICY, "").await;
    let client = Client::new(1);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;
    let code_page = ask_code(&mut browser, &page, ALICE).await;
    let code = code_in_mail(&portal, 1).await;
    let csrf = code_page.csrf();
    let wrong = if code.starts_with('A') {
        "BBBB-BBBB"
    } else {
        "AAAA-AAAA"
    };

    // Three wrong tries spend the code: the fourth, though right, finds none waiting.
    for attempt in 1..=3 {
        let refused = browser
            .post(
                "/acme/sign-in/email/code",
                &[("csrf", &csrf), ("code", wrong)],
            )
            .await;
        assert_eq!(refused.status, 401, "attempt {attempt}");
        assert!(
            refused.body.contains("That code is not right."),
            "{}",
            refused.body
        );
    }
    let fourth = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &csrf), ("code", &code)],
        )
        .await;
    assert_eq!(fourth.status, 401);
    assert!(
        fourth.body.contains("No code is waiting"),
        "{}",
        fourth.body
    );

    // A new code voids the old one.
    let page = browser.get("/acme").await;
    let code_page = ask_code(&mut browser, &page, ALICE).await;
    let first = code_in_mail(&portal, 2).await;
    let page = browser.get("/acme").await;
    let code_page_again = ask_code(&mut browser, &page, ALICE).await;
    let second = code_in_mail(&portal, 3).await;
    assert_ne!(first, second);
    let old = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &first)],
        )
        .await;
    assert_eq!(old.status, 401, "the older code still worked");

    // Fifteen minutes on, the sign-in and its code have expired: the right code is refused.
    // (`spend_email_code_try` refuses an expired code on its own: portal/tests/store.rs.)
    portal.set_clock(portal.now() + chrono::Duration::seconds(15 * 60));
    let late = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page_again.csrf()), ("code", &second)],
        )
        .await;
    assert_eq!(late.status, 400, "{late:?}");
    assert!(
        late.body.contains("This sign-in has ended"),
        "{}",
        late.body
    );
    assert_eq!(token_count(&portal).await, 0);
}

#[tokio::test]
async fn forged_forms_and_links_are_refused_and_leave_no_token() {
    let portal = TestPortal::start(POLICY, "").await;
    let client = Client::new(1);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;

    // A form posted from elsewhere: without the CSRF token, or with another.
    for fields in [
        vec![("email", ALICE)],
        vec![("csrf", "forged"), ("email", ALICE)],
    ] {
        let refused = browser.post("/acme/sign-in/email", &fields).await;
        assert_eq!(refused.status, 403, "{refused:?}");
        assert!(refused.body.contains("not sent by the sign-in page"));
    }
    // Without the sign-in's cookie (another browser), even with the right token.
    let mut stranger = Browser::new(portal.address());
    let refused = stranger
        .post(
            "/acme/sign-in/email",
            &[("csrf", &page.csrf()), ("email", ALICE)],
        )
        .await;
    assert_eq!(refused.status, 400);
    // The sign-in of one account is not another's.
    let refused = browser
        .post(
            "/globex/sign-in/email",
            &[("csrf", &page.csrf()), ("email", ALICE)],
        )
        .await;
    assert_eq!(refused.status, 400);

    // Links that would send the result anywhere but the client's own handler.
    let mut evil = Client::new(4);
    for callback in [
        "https://evil.example/callback",
        "http://127.0.0.1:49152@evil.example/callback",
        "http://localhost:49152/callback",
    ] {
        evil.callback = callback.to_owned();
        let refused = stranger.get(&evil.link("acme")).await;
        assert_eq!(refused.status, 400, "{callback}");
        assert!(
            refused.body.contains("`callback` must be the client"),
            "{}",
            refused.body
        );
    }
    let extra = format!(
        "{}&redirect_uri=https%3A%2F%2Fevil.example",
        Client::new(5).link("acme")
    );
    let refused = stranger.get(&extra).await;
    assert_eq!(refused.status, 400);
    let twice = format!("{}&state=second", Client::new(6).link("acme"));
    assert_eq!(stranger.get(&twice).await.status, 400);
    assert!(stranger.cookies.is_empty());
    assert_eq!(token_count(&portal).await, 0);
    assert!(mails(&portal).is_empty());
}

#[tokio::test]
async fn an_unknown_address_gets_the_same_answer_and_no_mail_and_codes_are_rate_limited() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &Client::new(1), "acme").await;
    let known = ask_code(&mut browser, &page, ALICE).await;
    code_in_mail(&portal, 1).await;

    let mut other = Browser::new(portal.address());
    let page = open(&mut other, &Client::new(2), "acme").await;
    let unknown = ask_code(&mut other, &page, "mallory@acme.example").await;
    // The same page, but for the address and the form's token.
    assert_eq!(
        known.body.replace(ALICE, "X").replace(&known.csrf(), "T"),
        unknown
            .body
            .replace("mallory@acme.example", "X")
            .replace(&unknown.csrf(), "T")
    );
    // Any code for it is refused as none waiting.
    let refused = other
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &unknown.csrf()), ("code", "ABCD-EFGH")],
        )
        .await;
    assert_eq!(refused.status, 401);

    // Three codes per address in five minutes, whether the account knows it or not.
    for address in [ALICE, "mallory@acme.example"] {
        // One code went to each above.
        for _ in 1..3 {
            let page = other.get("/acme").await;
            ask_code(&mut other, &page, address).await;
        }
        let page = other.get("/acme").await;
        let limited = other
            .post(
                "/acme/sign-in/email",
                &[("csrf", &page.csrf()), ("email", address)],
            )
            .await;
        assert_eq!(limited.status, 429, "{address}");
        assert!(
            limited
                .body
                .contains("Too many codes were sent to that address")
        );
    }
    // Only the known address got mail: the first code and two more.
    code_in_mail(&portal, 3).await;
    assert!(
        mails(&portal)
            .iter()
            .all(|m| m.contains(&format!("To: {ALICE}")))
    );
    assert_eq!(token_count(&portal).await, 0);
}

#[tokio::test]
async fn a_page_opened_without_a_client_says_how_to_start_and_unknown_accounts_are_404() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut browser = Browser::new(portal.address());
    let page = browser.get("/acme").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("fz-client sign-in --portal-url ws://"),
        "{}",
        page.body
    );
    assert!(browser.cookies.is_empty());
    assert_eq!(browser.get("/nope").await.status, 404);
}

/// A real SMTP server (Python's aiosmtpd, Debian's `python3-aiosmtpd`) on a loopback port,
/// keeping what it receives in a maildir; stopped when dropped.
struct SmtpServer {
    child: std::process::Child,
    port: u16,
    maildir: tempfile::TempDir,
}

impl SmtpServer {
    /// Starts one, or says why it cannot (the test then skips loudly).
    async fn start() -> Result<SmtpServer, String> {
        let python = "/usr/bin/python3";
        let present = std::process::Command::new(python)
            .args(["-c", "import aiosmtpd"])
            .output()
            .is_ok_and(|out| out.status.success());
        if !present {
            return Err("Python's aiosmtpd is not installed: apt install python3-aiosmtpd".into());
        }
        let maildir = tempfile::tempdir().unwrap();
        // A free port: taken from the kernel, then handed over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("box"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start aiosmtpd: {e}"))?;
        let server = SmtpServer {
            child,
            port,
            maildir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "aiosmtpd did not listen"
            );
            // A poll interval: aiosmtpd says nothing when it is ready.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// The messages received so far, whole.
    fn received(&self) -> Vec<String> {
        std::fs::read_dir(self.maildir.path().join("box").join("new"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_code_goes_out_through_a_real_smtp_server() {
    let test = "sign_in::the_code_goes_out_through_a_real_smtp_server";
    let smtp = match SmtpServer::start().await {
        Ok(smtp) => smtp,
        Err(why) => {
            fz_host::testing::skip_needing(test, "python3-aiosmtpd", &why);
            return;
        }
    };
    let _ = std::fs::remove_file(fz_host::testing::marker(test));
    let portal = TestPortal::start(
        POLICY,
        &format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"fz <fz@acme.example>\"\n",
            smtp.port
        ),
    )
    .await;
    let client = Client::new(1);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;
    let code_page = ask_code(&mut browser, &page, ALICE).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let message = loop {
        if let Some(message) = smtp.received().pop() {
            break message;
        }
        assert!(tokio::time::Instant::now() < deadline, "no mail arrived");
        // A poll interval, not a synchronisation: the mail goes out on its own task.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(message.contains(&format!("To: {ALICE}")), "{message}");
    assert!(message.contains("From: fz <fz@acme.example>"), "{message}");
    let code = message
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 9 && l.as_bytes()[4] == b'-')
        .unwrap_or_else(|| panic!("no code in {message}"));
    // Nothing was written to the data dir: the server had it.
    assert!(mails(&portal).is_empty());
    let done = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", code)],
        )
        .await;
    assert_eq!(done.status, 303, "{done:?}");
    let query = callback_query(done.location(), &client);
    let fragment = &query[1].1;
    let now = portal.now().timestamp();
    assert!(
        portal
            .store()
            .authenticate(&format!("{}{fragment}", client.nonce), now)
            .await
            .unwrap()
            .is_some()
    );
}

/// Signs `ALICE` in by email code in a new browser; returns `nonce ‖ fragment`.
async fn signed_in_token(portal: &TestPortal, seed: u8, mails_before: usize) -> String {
    let client = Client::new(seed);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;
    let code_page = ask_code(&mut browser, &page, ALICE).await;
    let code = code_in_mail(portal, mails_before + 1).await;
    let done = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &code)],
        )
        .await;
    assert_eq!(done.status, 303, "{done:?}");
    let query = callback_query(done.location(), &client);
    format!("{}{}", client.nonce, query[1].1)
}

#[tokio::test]
async fn disabling_a_user_disconnects_their_devices_and_refuses_their_sign_ins() {
    use fz_host::testing::agents::{TestClient, key};
    let portal = TestPortal::start(POLICY, "").await;
    let token = signed_in_token(&portal, 1, 0).await;
    let mut live = TestClient::connect(portal.address(), portal.pinned(), "acme", &token, key(1))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));

    // A code asked for before the user is disabled...
    let client = Client::new(2);
    let mut browser = Browser::new(portal.address());
    let page = open(&mut browser, &client, "acme").await;
    let code_page = ask_code(&mut browser, &page, ALICE).await;
    let code = code_in_mail(&portal, 2).await;

    let now = portal.now().timestamp();
    assert_eq!(
        portal
            .store()
            .disable_user("acme", ALICE, now)
            .await
            .unwrap(),
        1
    );
    // The sweeper sees the revocation and closes the device's connection.
    assert!(
        live.next().await.is_none(),
        "the disabled user's device is still connected"
    );
    let refused =
        TestClient::connect(portal.address(), portal.pinned(), "acme", &token, key(1)).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(401));

    // ...does not sign them in.
    let done = browser
        .post(
            "/acme/sign-in/email/code",
            &[("csrf", &code_page.csrf()), ("code", &code)],
        )
        .await;
    assert_eq!(done.status, 403, "{done:?}");
    assert!(
        done.body.contains("has disabled your user"),
        "{}",
        done.body
    );
    let live_tokens = |tokens: Vec<fz_portal::store::TokenRecord>| {
        tokens.iter().filter(|t| t.revoked_at.is_none()).count()
    };
    assert_eq!(
        live_tokens(portal.store().list_tokens("acme").await.unwrap()),
        0
    );

    // Enabled again, they sign in again.
    portal.store().enable_user("acme", ALICE).await.unwrap();
    signed_in_token(&portal, 3, 2).await;
    assert_eq!(
        live_tokens(portal.store().list_tokens("acme").await.unwrap()),
        1
    );
}
