//! A real portal for integration tests: `RunningPortal` on a loopback socket, its own data
//! dir and policy trees in a temporary directory, and a clock the test can move.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeZone as _, Utc};
use fz_portal::broker::Clock;
use fz_portal::config::Config;
use fz_portal::server::RunningPortal;
use fz_portal::store::{Store, TokenKind};
use fz_proto::PortalPublicKey;

use fz_host::testing::agents::{TestClient, TestGateway, key};

pub struct TestPortal {
    pub dir: tempfile::TempDir,
    pub running: Option<RunningPortal>,
    pub config: Config,
    /// Seconds the test clock is ahead of the system clock.
    offset: Arc<AtomicI64>,
}

impl TestPortal {
    /// A portal with accounts `acme` and `globex`, each on its own tree holding `policy`,
    /// and `extra` configuration lines (top-level keys) before the accounts.
    pub async fn start(policy: &str, extra: &str) -> TestPortal {
        TestPortal::start_with_accounts(policy, extra, "").await
    }

    /// [`TestPortal::start`], with `settings` configuration lines (keys of `[[accounts]]`,
    /// such as limits) in both accounts.
    pub async fn start_with_accounts(policy: &str, extra: &str, settings: &str) -> TestPortal {
        let dir = tempfile::tempdir().expect("a temporary directory");
        for account in ["acme", "globex"] {
            std::fs::create_dir_all(dir.path().join(account)).expect("a policy dir");
            std::fs::write(dir.path().join(account).join("access.fz"), policy)
                .expect("a policy file");
        }
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}\n\
             [[accounts]]\nslug = \"acme\"\npolicy = \"acme\"\n{settings}\n\n\
             [[accounts]]\nslug = \"globex\"\npolicy = \"globex\"\n{settings}\n"
        );
        let config = Config::parse(&text, dir.path()).expect("a valid configuration");
        let offset = Arc::new(AtomicI64::new(0));
        let mut portal = TestPortal {
            dir,
            running: None,
            config,
            offset,
        };
        portal.restart().await;
        portal
    }

    /// Stops the portal if it runs, and starts it again on the same data dir.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("a clean stop");
        }
        let offset = self.offset.clone();
        let clock: Clock =
            Arc::new(move || Utc::now() + chrono::Duration::seconds(offset.load(Ordering::SeqCst)));
        self.running = Some(
            RunningPortal::start(&self.config, clock)
                .await
                .expect("the portal starts"),
        );
    }

    pub fn running(&self) -> &RunningPortal {
        self.running.as_ref().expect("the portal runs")
    }

    pub fn address(&self) -> SocketAddr {
        self.running().address
    }

    pub fn pinned(&self) -> PortalPublicKey {
        self.running().public_key
    }

    pub fn store(&self) -> &Store {
        self.running().broker.store()
    }

    /// What the portal's clock says.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(self.offset.load(Ordering::SeqCst))
    }

    /// Seconds the portal's clock is ahead of the system clock.
    pub fn clock_offset(&self) -> i64 {
        self.offset.load(Ordering::SeqCst)
    }

    /// Sets the portal's clock to `at` (to the second).
    pub fn set_clock(&self, at: DateTime<Utc>) {
        self.offset
            .store(at.timestamp() - Utc::now().timestamp(), Ordering::SeqCst);
    }

    pub fn policy_file(&self, account: &str) -> PathBuf {
        self.dir.path().join(account).join("access.fz")
    }

    /// Replaces an account's policy file (the watcher reloads it).
    pub fn write_policy(&self, account: &str, policy: &str) {
        write_atomically(&self.policy_file(account), policy);
    }

    /// A client token's secret for `user`.
    pub async fn client_token(&self, account: &str, user: &str) -> (String, String) {
        let now = self.now().timestamp();
        let token = self
            .store()
            .create_token(
                account,
                TokenKind::Client {
                    user: user.to_owned(),
                    provider: Some("okta".to_owned()),
                },
                "laptop",
                now + 86_400,
                now,
            )
            .await
            .expect("a client token");
        (token.id, token.secret)
    }

    pub async fn gateway_token(&self, account: &str, site: &str) -> (String, String) {
        let now = self.now().timestamp();
        let token = self
            .store()
            .create_token(
                account,
                TokenKind::Gateway {
                    site: site.to_owned(),
                },
                "gw",
                now + 86_400,
                now,
            )
            .await
            .expect("a gateway token");
        (token.id, token.secret)
    }

    /// A connected client of `user` with WireGuard key `seed`.
    pub async fn client(&self, account: &str, user: &str, seed: u8) -> TestClient {
        let (_, secret) = self.client_token(account, user).await;
        TestClient::connect(self.address(), self.pinned(), account, &secret, key(seed))
            .await
            .expect("the client connects")
    }

    /// A connected gateway in `site` with WireGuard key `seed`, not yet serving.
    pub async fn gateway(&self, account: &str, site: &str, seed: u8) -> TestGateway {
        let (_, secret) = self.gateway_token(account, site).await;
        TestGateway::connect(self.address(), self.pinned(), account, &secret, key(seed))
            .await
            .expect("the gateway connects")
    }
}

/// Writes through a temporary file and a rename, as editors and `git checkout` do, so the
/// watcher never reads half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("a temporary file");
    std::fs::rename(&temporary, path).expect("a rename");
}

/// Today at `hh:mm:ss` UTC.
pub fn today_at(hour: u32, minute: u32, second: u32) -> DateTime<Utc> {
    let today = Utc::now().date_naive();
    Utc.from_utc_datetime(
        &today
            .and_hms_opt(hour, minute, second)
            .expect("a time of day"),
    )
}
