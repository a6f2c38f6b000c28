//! A running portal: everything `fz-portal serve` starts, in the order it needs them, as one
//! value the binary and the integration tests both use.
//!
//! Started here: the store (gateways all marked disconnected: no connection survives a
//! restart), the signing key, each account's policy engine with its file watcher, the
//! group-committing writer, the broker with the grants the store holds, a task per account
//! that decides every grant again when its policy changes, the sweeper (expired grants,
//! revoked tokens, closed time windows, once a second; the store's checkpoint, flows past
//! their retention, expired sign-ins, codes and written mail, each minute), on SQLite the
//! store's log folded into its file each second, the sign-in pages' state and mailer, reloads
//! on SIGHUP, the reader of the other replicas' events (`cluster`), and the listener (HTTP,
//! or HTTPS when configured) with its connection caps sized from the open files limit.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fz_proto::PortalPublicKey;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::broker::{Account, Broker, BrokerParts, Clock, Timings};
use crate::config::Config;
use crate::data_dir::Creation;
use crate::geo::CountryDb;
use crate::http::{AppState, router};
use crate::listener::{Caps, Connections, Settings};
use crate::mail::Mailer;
use crate::policy::{PolicyEngine, Watcher};
use crate::relay::Relays;
use crate::sign_in::SignIn;
use crate::store::{Database, Store};
use crate::writer::Writer;

/// How often the sweeper runs. Grants expire and tokens are revoked at second granularity.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How far back the sweeper looks for revoked tokens: revocations are idempotent, so
/// looking at some twice costs nothing, and a clock step between the admin command and the
/// portal cannot hide one.
const REVOCATION_LOOKBACK_SECS: i64 = 120;

/// A portal serving on its socket.
#[allow(missing_debug_implementations)] // tasks and watchers have nothing to show
pub struct RunningPortal {
    pub address: SocketAddr,
    /// Where `/metrics` is served, when `metrics_listen` is set.
    pub metrics_address: Option<SocketAddr>,
    /// How long [`RunningPortal::stop`] takes to close the agents' connections.
    drain_period: Duration,
    pub public_key: PortalPublicKey,
    pub broker: Arc<Broker>,
    /// The listener's connections: caps, counts and refusals.
    pub connections: Connections,
    stop: oneshot::Sender<()>,
    server: JoinHandle<anyhow::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
    _watchers: Vec<Watcher>,
}

impl RunningPortal {
    /// Starts every part of the portal and serves on `config.listen`.
    pub async fn start(config: &Config, clock: Clock) -> anyhow::Result<RunningPortal> {
        let store = Store::open_in(
            &config.data_dir,
            &config.database,
            &config.key_files,
            Creation::Allowed,
        )
        .await?;
        let timings = Timings {
            heartbeat_interval: config.gateway_heartbeat_interval,
            ack_timeout: config.gateway_ack_timeout,
        };
        // On SQLite this process is the only one serving, and holds no connection yet; on a
        // shared database, gateways not heard from for a heartbeat timeout are on no replica.
        let shared = matches!(config.database, Database::Postgres(_));
        let silent_since = if shared {
            lost_gateways_before(&timings, clock())
        } else {
            i64::MAX
        };
        store.mark_lost_gateways_disconnected(silent_since).await?;
        if shared {
            tracing::info!(
                replica = store.replica(),
                "serving as one replica of a shared store"
            );
        }
        let key = crate::keys::load(&config.data_dir, &config.key_files, Creation::Allowed)?;
        let public_key = key.public_key();
        let geo = match &config.geoip_country_db {
            Some(path) => Some(CountryDb::open(path)?),
            None => None,
        };
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::load(files)?),
            None => None,
        };
        let mut accounts = Vec::new();
        let mut watchers = Vec::new();
        for settings in &config.accounts {
            store.ensure_account(&settings.slug).await?;
            let policy =
                Arc::new(PolicyEngine::open(&settings.policy).with_context(|| {
                    format!("account `{}`: cannot load its policy", settings.slug)
                })?);
            watchers.push(policy.watch()?);
            tracing::info!(account = %settings.slug, bundle = %policy.current().bundle_hash, "policy loaded");
            accounts.push(Account {
                settings: settings.clone(),
                policy,
            });
        }
        let relays = Relays::load(&config.relays, config.relay_credential_lifetime)?;
        let writer = Writer::start(store.clone());
        let broker = Broker::start(BrokerParts {
            store: store.clone(),
            writer,
            key,
            accounts,
            geo,
            timings,
            clock,
            relays,
        })
        .await?;

        let mut tasks = Vec::new();
        for account in broker.accounts() {
            let mut changes = account.policy.subscribe();
            let broker = broker.clone();
            tasks.push(tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let withdrawn = broker.revalidate().await;
                    tracing::info!(withdrawn, "policy changed; grants decided again");
                }
            }));
        }
        // Bound now, so that the address people are sent back to is known (a configured
        // port 0 is the kernel's pick); served below.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{}://{address}", RunningPortal::scheme(config)));
        let mailer = Mailer::new(config.smtp.as_ref(), &config.data_dir)?;
        let sign_in = Arc::new(
            SignIn::new(mailer, tls.is_some())
                .with_providers(config, public_url)
                .context("cannot set up the identity providers")?,
        );
        if let Some(interval) = broker.relay_refresh_interval() {
            tasks.push(tokio::spawn(refresh_relay_credentials(
                broker.clone(),
                interval,
            )));
        }
        tasks.push(tokio::spawn(sweep(
            broker.clone(),
            store.clone(),
            sign_in.clone(),
            shared,
        )));
        if !shared {
            tasks.push(tokio::spawn(fold_log(store.clone())));
        }
        tasks.push(tokio::spawn(crate::cluster::follow(
            broker.clone(),
            store.clone(),
            config.database.clone(),
        )));
        // Listening starts here, before the portal says it is up, so a SIGHUP sent after that
        // never meets the default action (termination).
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => tasks.push(tokio::spawn(reload_on_hangup(broker.clone(), hangups))),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reloads on request are off")
            }
        }

        let metrics_address = match config.metrics_listen {
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {listen}"))?;
                let address = listener.local_addr()?;
                let app = crate::metrics::router(broker.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(error) = axum::serve(listener, app).await {
                        tracing::error!(%error, "the metrics listener failed");
                    }
                }));
                Some(address)
            }
            None => None,
        };
        let app = router(Arc::new(AppState {
            broker: broker.clone(),
            trusted_proxy: config.trusted_proxy.clone(),
            sign_in: sign_in.clone(),
        }));
        let connections = Connections::new(connection_caps(config));
        let settings = Settings {
            tls,
            limits: config.connections.clone(),
            trusted_proxies: config
                .trusted_proxy
                .as_ref()
                .map(|proxy| proxy.peers.clone())
                .unwrap_or_default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let served = crate::listener::serve(listener, app, settings, connections.clone(), shutdown);
        let server = tokio::spawn(async move {
            served.await?;
            Ok(())
        });
        Ok(RunningPortal {
            address,
            metrics_address,
            drain_period: config.drain_period,
            public_key,
            broker,
            connections,
            stop,
            server,
            tasks,
            _watchers: watchers,
        })
    }

    /// Whether it serves HTTPS.
    pub fn scheme(config: &Config) -> &'static str {
        if config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Stops accepting, closes the agents' connections (spread over the drain period: see
    /// [`drain`]), lets open requests finish, and closes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        // Upgraded WebSockets live outside the HTTP server's shutdown: close them here.
        drain(&self.broker, self.drain_period).await;
        self.broker.close_all();
        let served = self.server.await;
        for task in &self.tasks {
            task.abort();
        }
        // Its gateways' connections are gone whether or not each handler recorded it yet.
        if let Err(error) = self.broker.store().release_gateways().await {
            tracing::warn!(%error, "cannot mark this replica's gateways disconnected");
        }
        self.broker.store().close().await;
        served.context("the server task failed")?
    }
}

/// The most batches a second [`drain`] closes.
const DRAIN_BATCHES_PER_SECOND: u128 = 10;

/// Closes every agent's connection a batch at a time, the batches spread evenly over `period`
/// (at most ten a second), so that agents leaving a replica that stops come back to the
/// others spread out rather than all at once; with no period, all at once.
async fn drain(broker: &Broker, period: Duration) {
    let links = broker.agent_links();
    if period.is_zero() || links.is_empty() {
        return;
    }
    let most = usize::try_from(period.as_millis() * DRAIN_BATCHES_PER_SECOND / 1000)
        .unwrap_or(usize::MAX)
        .max(1);
    let size = links.len().div_ceil(links.len().min(most));
    let batches = links.len().div_ceil(size);
    let pause = period / u32::try_from(batches).unwrap_or(u32::MAX);
    tracing::info!(
        agents = links.len(),
        batches,
        period_ms = period.as_millis() as u64,
        "draining: closing the agents' connections a batch at a time"
    );
    for (n, batch) in links.chunks(size).enumerate() {
        if n > 0 {
            tokio::time::sleep(pause).await;
        }
        for link in batch {
            link.close();
        }
    }
}

/// The caps for the open files limit this process has now (the binary raised it to the hard
/// limit before), logged with it.
fn connection_caps(config: &Config) -> Caps {
    let limit = match crate::listener::open_files_limit() {
        Ok((soft, _hard)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open files limit; assuming 1024");
            1024
        }
    };
    let (caps, lowered) = Caps::for_descriptors(limit, &config.connections);
    for note in lowered {
        tracing::warn!("{note}");
    }
    tracing::info!(
        open_files = limit,
        max_connections = caps.total(),
        max_unauthenticated = caps.unauthenticated,
        max_unauthenticated_per_source = caps.per_source,
        max_agents = caps.agents,
        "connection caps"
    );
    caps
}

/// `kill -HUP` asks for every account's policy to be loaded again now (the file watcher
/// does it on change anyway; this is for trees on file systems that do not report changes,
/// and for operators who want to be sure). A failure keeps the last good table.
async fn reload_on_hangup(broker: Arc<Broker>, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        for account in broker.accounts() {
            let policy = account.policy.clone();
            let slug = account.settings.slug.clone();
            match tokio::task::spawn_blocking(move || policy.reload()).await {
                Ok(Ok(outcome)) => tracing::info!(
                    account = %slug,
                    hash = %outcome.hash,
                    changed = outcome.changed,
                    "policy reloaded on request"
                ),
                Ok(Err(error)) => tracing::warn!(
                    account = %slug,
                    error = %error,
                    "policy reload on request failed; the last good table stays"
                ),
                Err(error) => {
                    tracing::error!(account = %slug, error = %error, "policy reload crashed")
                }
            }
        }
    }
}

/// Every half lifetime of the relay credentials, every connected agent gets new ones (those
/// it got at `hello` are fresh, so the first tick, which is at once, is skipped).
async fn refresh_relay_credentials(broker: Arc<Broker>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        broker.refresh_relay_credentials();
    }
}

/// Once a second, on SQLite, folds the store's log into its file (the writer leaves it to
/// this: `Store::fold_log`). A task of its own, not the sweeper's: the fold waits for readers
/// to leave the log, and revocations must not wait with it.
async fn fold_log(store: Store) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = store.fold_log().await {
            tracing::warn!(error = %error, "cannot fold the store's log into its file");
        }
    }
}

/// When a gateway must have been heard from last, at `now`, to count as on a live replica.
fn lost_gateways_before(timings: &Timings, now: chrono::DateTime<chrono::Utc>) -> i64 {
    let silent = i64::try_from(timings.heartbeat_timeout().as_secs()).unwrap_or(i64::MAX);
    now.timestamp().saturating_sub(silent)
}

/// Once a second: withdraw expired grants, close sessions whose token expired, and withdraw
/// everything of tokens an admin revoked. Every grant is decided again when the clock enters a
/// new minute (time windows open and close on minutes, so a deny window that opens ends the
/// grants it covers), and a device's grants when its verified mark changes. Each new minute
/// the store's log is checkpointed too, so deleted grants leave the files within a minute; and
/// the flows past their account's retention are deleted, in bounded batches, going on at the
/// next ticks while a backlog remains.
///
/// `shared`: the store is a database other replicas use too, whose gateways' marks are left
/// connected when a replica dies without stopping.
async fn sweep(broker: Arc<Broker>, store: Store, sign_in: Arc<SignIn>, shared: bool) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick decides everything again: grants restored from the store were decided
    // by a portal that may have run another policy.
    let mut minute = i64::MIN;
    let mut verified_seen = 0;
    // The first look goes back to the beginning: grants restored from the store may belong to
    // tokens revoked while the portal was down. Later looks go back a little, and act only on
    // tokens not acted on already.
    let mut since = i64::MIN;
    let mut handled: HashSet<String> = HashSet::new();
    let mut prune = false;
    loop {
        ticks.tick().await;
        broker.forget_idle();
        let now = chrono::Utc::now().timestamp();
        match store.tokens_revoked_since(since).await {
            Ok(revoked) => {
                let revoked: HashSet<String> = revoked.into_iter().collect();
                let new: HashSet<String> = revoked.difference(&handled).cloned().collect();
                broker.tokens_revoked(&new).await;
                handled = revoked;
                since = now - REVOCATION_LOOKBACK_SECS;
            }
            Err(error) => tracing::warn!(error = %error, "cannot read revoked tokens"),
        }
        broker.close_expired_sessions();
        broker.expire().await;
        let this_minute = broker.clock().timestamp().div_euclid(60);
        if this_minute != minute {
            minute = this_minute;
            broker.revalidate().await;
            // The write-ahead log keeps what was deleted (withdrawn grants with their
            // preshared keys) until a checkpoint: one a minute bounds how long.
            match store.checkpoint().await {
                Ok(true) => {}
                Ok(false) => tracing::debug!("store checkpoint put off: a reader was in the way"),
                Err(error) => tracing::warn!(error = %error, "store checkpoint failed"),
            }
            prune = true;
            if shared {
                let silent_since = lost_gateways_before(&broker.timings(), broker.clock());
                if let Err(error) = store.mark_lost_gateways_disconnected(silent_since).await {
                    tracing::warn!(%error, "cannot mark the gateways of lost replicas disconnected");
                }
            }
            sign_in.forget_expired();
            if let Err(error) = store
                .prune_sign_ins(now, crate::sign_in::pending::LIFETIME_SECS)
                .await
            {
                tracing::warn!(error = %error, "cannot delete expired sign-ins");
            }
            // Sessions are stored once for the grants that name them: once those are gone
            // (withdrawn, expired), so is the session.
            if let Err(error) = store.delete_unused_sessions().await {
                tracing::warn!(error = %error, "cannot delete the sessions of ended grants");
            }
            if let Err(error) = store.prune_email_codes(now).await {
                tracing::warn!(error = %error, "cannot delete expired sign-in codes");
            }
            let window = crate::sign_in::SEND_LIMIT.window_secs;
            if let Err(error) = store.prune_code_sends(now - window).await {
                tracing::warn!(error = %error, "cannot delete the counts of codes sent");
            }
        }
        if prune {
            prune = broker.prune_flows().await.1;
        }
        match store.verified_changes_since(verified_seen).await {
            Ok((changed, latest)) => {
                verified_seen = latest;
                broker
                    .revalidate_clients(&changed.into_iter().collect())
                    .await;
            }
            Err(error) => tracing::warn!(error = %error, "cannot read verified marks"),
        }
    }
}
