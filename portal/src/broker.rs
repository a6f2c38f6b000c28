//! The broker: what happens between an agent's message and the answer. It authorises
//! connection requests against the account's loaded policy, picks a gateway, mints and signs
//! grants, waits for the gateway's acknowledgement, records every decision in the flow log,
//! and withdraws grants when the policy, a token or the clock says they no longer hold.
//!
//! The WebSocket handlers (`agents`) only read and write frames; every decision is made here.
//! State of live connections is in [`Registry`]; what must survive a restart goes through the
//! group-committing [`Writer`] into the store before anyone is told.
//!
//! **Invariant:** default deny. A grant is pushed only after an allow decision with the
//! account's current table; a grant is withdrawn (gateway and client told, store updated)
//! as soon as a decision with the current table, clock and tokens no longer allows it.
//!
//! **Invariant:** accounts are isolated: a session, gateway or grant is only ever matched with
//! others of its own account, and acknowledgements count only from the gateway the grant went
//! to.
//!
//! **Invariant:** a gateway leaves service only when its connection closes or it misses its
//! heartbeats. A grant it does not answer in time fails that request (and is revoked, so a late
//! install does not linger): for a DNS resource the gateway answers only once the client's name
//! resolved, and a name that never resolves must not take a live gateway out of service.
//!
//! **Invariant:** what one client costs is bounded. Its requests pass a token bucket before
//! anything is decided or stored (`requests_per_second`, `request_burst`); a request for what a
//! grant in force already covers gets that grant again instead of a new one (requests for the
//! same thing that arrive together take turns, so they end with one grant); it holds at most
//! `max_grants_per_client` grants; identical denials within a minute are one flow row with a
//! count; and every string it sends is cut before it is stored or echoed.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fz_compiler::DecisionTable;
use fz_proto::{
    ClientReady, DnsMapping, Grant, PortalSigningKey, PortalToClient, PortalToGateway,
    PresharedKey, PublicKey, Relay, Resolution, ResourceView, SignedGrant, UnixTime, encode,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::admission::{self, Admission, MAX_LOGGED_NAME};
use crate::config::AccountConfig;
use crate::geo::CountryDb;
use crate::limits::{Occurrence, Rate, RateLimiter, Repeats};
use crate::metrics::{Metrics, Outcome};
use crate::policy::PolicyEngine;
use crate::random;
use crate::registry::{
    ClientEntry, ClientSession, ConnectionPath, GatewayEntry, LiveGrant, Registry, deletions,
};
use crate::relay::Relays;
use crate::store::{
    self, ClusterEventKind, Decision as FlowDecision, GrantRecord, NewFlow, Store, TokenRecord,
    Write,
};
use crate::writer::Writer;

mod replicas;

use replicas::{Candidates, Elsewhere, Route};

/// The clock the broker reads; tests move it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// How many messages may wait for a slow agent. Past it, [`Link::send`] gives up on the
/// connection and [`Link::send_waiting`] waits for room (for a while).
const LINK_CAPACITY: usize = 1024;

/// The way to an agent's connection: messages to send, and a signal to close it.
#[derive(Debug, Clone)]
pub struct Link {
    messages: mpsc::Sender<String>,
    close: Arc<Notify>,
}

/// The connection's side of a [`Link`].
#[derive(Debug)]
pub struct LinkReceiver {
    pub messages: mpsc::Receiver<String>,
    pub close: Arc<Notify>,
}

impl Link {
    pub fn new() -> (Link, LinkReceiver) {
        let (messages, receiver) = mpsc::channel(LINK_CAPACITY);
        let close = Arc::new(Notify::new());
        (
            Link {
                messages,
                close: close.clone(),
            },
            LinkReceiver {
                messages: receiver,
                close,
            },
        )
    }

    /// Queues a message; an agent that lets [`LINK_CAPACITY`] messages pile up is closed.
    /// For answers and errors, which an agent that does not read can go without.
    pub fn send<T: Serialize>(&self, message: &T) {
        if self.messages.try_send(encode(message)).is_err() {
            self.close();
        }
    }

    /// Queues a message that must not be lost (a revocation), waiting up to `patience` for
    /// room: a busy agent slows the sender down instead of being dropped. An agent still full
    /// after that is closed, which loses nothing either: a gateway that connects again is told
    /// what is in force (`ready`), and drops the rest. False if it did not go.
    pub async fn send_waiting<T: Serialize>(&self, message: &T, patience: Duration) -> bool {
        match tokio::time::timeout(patience, self.messages.send(encode(message))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    ?patience,
                    "an agent took no message for too long; closing its connection"
                );
                self.close();
                false
            }
        }
    }

    pub fn close(&self) {
        self.close.notify_one();
    }
}

/// An account the portal serves.
#[derive(Debug)]
pub struct Account {
    pub settings: AccountConfig,
    pub policy: Arc<PolicyEngine>,
}

/// Timings of the agents' protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat_interval: Duration,
    pub ack_timeout: Duration,
}

impl Timings {
    /// Three heartbeats missed and a gateway is out.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(3)
    }
}

/// What a grant needs to be decided again and sent again after a restart.
#[derive(Debug, Serialize, Deserialize)]
struct GrantDetail<'a> {
    signed: Cow<'a, SignedGrant>,
    /// The session, in grants stored before sessions were stored once for all the grants
    /// that name them (`GrantRecord::session`); never written now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<Cow<'a, ClientSession>>,
    /// What the gateway said the name resolved to, to hand the grant out again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resolved: Option<Resolution>,
}

/// A gateway's answer to a grant: installed (with what a DNS resource's name resolved to),
/// or refused and why.
type AckOutcome = Result<Option<Resolution>, String>;

/// A grant sent to a gateway (here or through another replica), waiting for its answer.
#[derive(Debug)]
struct PendingAck {
    gateway_id: String,
    answer: oneshot::Sender<Result<Option<Resolution>, GatewayAnswer>>,
}

pub struct Broker {
    store: Store,
    /// This process among the replicas on one database: the origin of the cluster events it
    /// writes, so that it skips its own.
    replica: String,
    writer: Writer,
    key: PortalSigningKey,
    accounts: HashMap<String, Account>,
    geo: Option<CountryDb>,
    timings: Timings,
    clock: Clock,
    relays: Relays,
    registry: Mutex<Registry<Link>>,
    pending: Mutex<HashMap<String, PendingAck>>,
    /// Each client's request bucket, by (account, client id).
    limiter: Mutex<RateLimiter<(String, String)>>,
    /// Denials recorded in the last minute, to count identical ones on their row.
    repeats: Mutex<Repeats>,
    /// What clients are being granted right now (see [`Broker::turn`]).
    deciding: Mutex<HashMap<Asked, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("accounts", &self.accounts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a connection could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no account `{0}` on this portal")]
    NoAccount(String),
    #[error("{0}")]
    Refused(String),
    #[error("the portal cannot serve this right now; try again")]
    Unavailable,
}

/// The parts a broker is made of.
#[allow(missing_debug_implementations)] // the clock is a closure
pub struct BrokerParts {
    pub store: Store,
    pub writer: Writer,
    pub key: PortalSigningKey,
    pub accounts: Vec<Account>,
    pub geo: Option<CountryDb>,
    pub timings: Timings,
    pub clock: Clock,
    pub relays: Relays,
}

impl Broker {
    /// A broker over these parts, with the grants the store holds from before a restart back
    /// in force.
    pub async fn start(parts: BrokerParts) -> Result<Arc<Broker>, store::StoreError> {
        let now = unix(parts.clock.as_ref()());
        // Grants that expired while the portal was down are nobody's business any more; the
        // sweeper only ever sees grants in force.
        let expired = parts.store.delete_expired_grants(now_i64(now)).await?;
        if expired > 0 {
            tracing::info!(
                expired,
                "grants that expired while the portal was down deleted"
            );
        }
        let mut registry = Registry::default();
        let mut sessions = RestoredSessions::new();
        for account in &parts.accounts {
            let policy = account.policy.current();
            let stored = parts
                .store
                .active_grants(&account.settings.slug, now_i64(now));
            for grant in stored
                .await?
                .iter()
                .filter_map(|r| restored(r, &policy.table, &mut sessions))
            {
                registry.grant_added(grant);
            }
        }
        let metrics = Metrics::new(parts.writer.commits());
        Ok(Arc::new(Broker {
            replica: parts.store.replica().to_owned(),
            store: parts.store,
            writer: parts.writer,
            key: parts.key,
            accounts: parts
                .accounts
                .into_iter()
                .map(|a| (a.settings.slug.clone(), a))
                .collect(),
            geo: parts.geo,
            timings: parts.timings,
            clock: parts.clock,
            relays: parts.relays,
            registry: Mutex::new(registry),
            pending: Mutex::new(HashMap::new()),
            limiter: Mutex::new(RateLimiter::default()),
            repeats: Mutex::new(Repeats::default()),
            deciding: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Clients and gateways connected now.
    pub fn agents_connected(&self) -> (usize, usize) {
        let registry = self.registry();
        (
            registry.client_links().count(),
            registry.gateway_links().count(),
        )
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    pub fn account(&self, slug: &str) -> Result<&Account, BrokerError> {
        self.accounts
            .get(slug)
            .ok_or_else(|| BrokerError::NoAccount(slug.to_owned()))
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.as_ref()()
    }

    fn registry(&self) -> MutexGuard<'_, Registry<Link>> {
        // A panic while holding the lock cannot leave the registry half-changed in a way that
        // matters more than stopping service would: keep serving.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<String, PendingAck>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limiter(&self) -> MutexGuard<'_, RateLimiter<(String, String)>> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn repeats(&self) -> MutexGuard<'_, Repeats> {
        self.repeats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deciding(&self) -> MutexGuard<'_, HashMap<Asked, Arc<tokio::sync::Mutex<()>>>> {
        self.deciding.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no other request of the client for the same thing is between the look for
    /// a grant to hand out again and its own grant in force: requests that arrive together
    /// take turns, so the first makes the grant and the others find it, instead of each
    /// making its own. Requests for different things go side by side. The turn ends when the
    /// returned value is dropped.
    async fn turn(&self, asked: Asked) -> Turn<'_> {
        let lock = self.deciding().entry(asked.clone()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Turn {
            broker: self,
            asked,
            lock,
            guard: Some(guard),
        }
    }

    /// The token behind a bearer secret, if it is live and belongs to `account`. Another
    /// account's token is treated exactly like a wrong one.
    ///
    /// The secret is checked even for an account this portal does not serve, so that a
    /// wrong token costs the same whether the account exists or not (`Store::authenticate`
    /// does the same for tokens): the timing of a refusal names no account.
    pub async fn authenticate(
        &self,
        account: &str,
        secret: &str,
    ) -> Result<Option<TokenRecord>, BrokerError> {
        let known = self.account(account);
        let token = self
            .store
            .authenticate(secret, now_i64(unix(self.now())))
            .await
            .map_err(|error| {
                tracing::error!(error = %error, "token lookup failed");
                BrokerError::Unavailable
            })?;
        known?;
        Ok(token.filter(|t| t.account == account))
    }

    // ---- clients ----

    /// A client said hello: register its device, start its session, and say what it may ask
    /// for.
    pub async fn client_hello(
        &self,
        token: &TokenRecord,
        public_key: PublicKey,
        endpoints: Vec<std::net::SocketAddr>,
        source: Option<std::net::IpAddr>,
        link: Link,
    ) -> Result<(Arc<ClientSession>, u64, ClientReady), BrokerError> {
        let account = self.account(&token.account)?;
        check_endpoints(&endpoints)?;
        let store::TokenKind::Client { user, provider } = &token.kind else {
            return Err(BrokerError::Refused(
                "this is not a client token".to_owned(),
            ));
        };
        let now = unix(self.now());
        let (client, announced) = self
            .store
            .connect_client(
                &token.account,
                &token.id,
                &public_key.to_string(),
                now_i64(now),
            )
            .await
            .map_err(refusal)?;
        let Some(index) = client.tunnel_index else {
            return Err(BrokerError::Unavailable);
        };
        // Grants name the device's key; a device that comes back with another key cannot use
        // them, and nobody else may.
        let stale: Vec<String> = self
            .registry()
            .client_grants(&token.account, &client.id)
            .filter(|g| g.signed.grant.client.public_key != public_key)
            .map(|g| g.id.clone())
            .collect();
        self.withdraw(&stale, |_| "the device's WireGuard key changed".to_owned())
            .await;
        let (tunnel_ipv4, tunnel_ipv6) = store::tunnel_addresses(index);
        let idp_groups = self
            .store
            .memberships(&token.account, user)
            .await
            .map_err(refusal)?
            .into_iter()
            .map(|g| (g.provider, g.group))
            .collect();
        let session = Arc::new(ClientSession {
            account: token.account.clone(),
            client_id: client.id.clone(),
            token_id: token.id.clone(),
            token_expires_at: u64::try_from(token.expires_at).unwrap_or(0),
            user: user.clone(),
            provider: provider.clone(),
            idp_groups,
            source,
            country: source.and_then(|ip| self.geo.as_ref()?.country(ip)),
            peer: fz_proto::ClientPeer {
                id: client.id.clone(),
                public_key,
                tunnel_ipv4,
                tunnel_ipv6,
                endpoints,
            },
        });
        let policy = account.policy.current();
        let resources = account_resources(&policy.table);
        let connection = {
            let mut registry = self.registry();
            let connection = registry.connection();
            let replaced = registry.client_connected(ClientEntry {
                session: session.clone(),
                connection,
                announced,
                link,
                gateway_by_site: HashMap::new(),
            });
            if let Some(old) = replaced {
                old.close();
            }
            connection
        };
        let ready = ClientReady {
            client_id: client.id,
            tunnel_ipv4,
            tunnel_ipv6,
            resources,
            more: false,
        };
        Ok((session, connection, ready))
    }

    pub fn client_closed(&self, client_id: &str, connection: u64) {
        self.registry().client_gone(client_id, connection);
    }

    /// Decides a connection request and answers it: a signed grant the gateway has
    /// acknowledged (or one in force that already covers the request), or a rejection that
    /// says what failed. Either way the flow log has it, except for requests past the client's
    /// rate, which are refused before anything is decided or stored.
    pub async fn request_access(
        &self,
        session: &Arc<ClientSession>,
        resource: &str,
        dns: Option<DnsMapping>,
        avoid: &[String],
    ) -> PortalToClient {
        let started = Instant::now();
        let answer = match self.take_request(session) {
            Ok(()) => self.authorise(session, resource, dns, avoid).await,
            Err(reason) => Err(reason),
        };
        let outcome = match answer {
            Ok(_) => Outcome::Granted,
            Err(_) => Outcome::Rejected,
        };
        self.metrics.request_answered(outcome, started.elapsed());
        match answer {
            Ok((signed, resolved)) => PortalToClient::Granted {
                grant: Box::new(signed),
                resolved,
            },
            Err(reason) => PortalToClient::Rejected {
                resource: self.echoed_id(&session.account, resource),
                reason,
            },
        }
    }

    /// Takes one request from the client's bucket, or says when to ask again.
    fn take_request(&self, session: &ClientSession) -> Result<(), String> {
        let Ok(account) = self.account(&session.account) else {
            return Ok(());
        };
        let rate = Rate {
            per_second: account.settings.requests_per_second,
            burst: account.settings.request_burst,
        };
        let key = (session.account.clone(), session.client_id.clone());
        self.limiter()
            .take(key, rate, Instant::now())
            .map_err(|wait| {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                format!("too many requests, try again in {} s", seconds.max(1))
            })
    }

    /// The resource id a rejection names: whole if it is one of the account's resources (the
    /// client matches the answer to its request by it), else cut as the flow log cuts it, so
    /// that nobody can make the portal send back what they sent, at any length.
    fn echoed_id(&self, account: &str, resource: &str) -> String {
        let known = self
            .account(account)
            .is_ok_and(|a| a.policy.current().table.resource_index(resource).is_some());
        if known {
            resource.to_owned()
        } else {
            logged_id(resource)
        }
    }

    async fn authorise(
        &self,
        session: &Arc<ClientSession>,
        resource_id: &str,
        dns: Option<DnsMapping>,
        avoid: &[String],
    ) -> Result<(SignedGrant, Option<Resolution>), String> {
        let account = self.account(&session.account).map_err(|e| e.to_string())?;
        let at = self.now();
        let policy = account.policy.current();
        let table = &policy.table;
        // The verified mark changes from the admin command line, so it is read fresh, but only
        // when a rule on the resource asks for it: most requests never touch the store here.
        // It counts only for the key it was given for, which must be this session's.
        let verified = if mentions_verified(table, resource_id) {
            self.store
                .client(&session.account, &session.client_id)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "client lookup failed");
                    BrokerError::Unavailable.to_string()
                })?
                .is_some_and(|c| c.verified_for(&session.peer.public_key))
        } else {
            false
        };
        let admitted = admission::admit(table, session, resource_id, dns, verified, at);
        let logged_name = match &admitted {
            Admission::Granted { resource, .. } => resource.dns.as_ref(),
            Admission::Denied { dns, .. } | Admission::Refused { dns, .. } => dns.as_ref(),
        }
        .map(|d| cut(&d.name, MAX_LOGGED_NAME));
        let flow = |decision: FlowDecision, rule: Option<String>, reason: String| NewFlow {
            account: session.account.clone(),
            time: now_i64(unix(at)),
            user: session.user.clone(),
            client_id: session.client_id.clone(),
            resource_id: logged_id(resource_id),
            name: logged_name.clone(),
            decision,
            rule_id: rule,
            bundle_hash: policy.bundle_hash.clone(),
            reason,
            grant_id: None,
        };
        // A denial names the rule only when a deny rule made it (a guardrail); every other
        // denial (no rule, no gateway, a bad request) says why in its reason alone. One that
        // repeats a denial of the last minute counts on its row.
        let deny_with = |rule: Option<String>, reason: String| async move {
            let reason = cut(&reason, MAX_REASON);
            let denial = flow(FlowDecision::Deny, rule, reason.clone());
            let recorded = {
                // Noted and queued under one lock, so that a repeat is never committed before
                // the row it counts on.
                let mut repeats = self.repeats();
                let write = match repeats.note(&denial) {
                    Occurrence::First => Write::Flow(denial),
                    Occurrence::Again { first } => Write::DenialRepeated {
                        at: denial.time,
                        flow: NewFlow {
                            time: first,
                            ..denial
                        },
                    },
                };
                self.writer.submit(vec![write])
            };
            if let Err(error) = recorded.await {
                tracing::error!(error = %error, "cannot record a flow");
            }
            Err(reason)
        };
        let deny = |reason: String| deny_with(None, reason);
        let (decision, granted, site) = match admitted {
            Admission::Granted {
                decision,
                resource,
                site,
            } => (decision, resource, site),
            Admission::Denied {
                reason, guardrail, ..
            } => return deny_with(guardrail, reason).await,
            Admission::Refused { reason, .. } => return deny(reason).await,
        };
        let rule = decision
            .rules
            .first()
            .and_then(|r| table.table().rules.get(*r as usize))
            .map(|r| r.id.clone())
            .unwrap_or_default();
        let now = unix(at);
        let mut expires_at = now
            .saturating_add(account.settings.max_grant_lifetime_secs)
            .min(session.token_expires_at);
        if let Some(until) = table.allowed_until(&decision, at) {
            expires_at = expires_at.min(unix(until));
        }
        if expires_at <= now {
            return deny("the rule's time window closes now".to_owned()).await;
        }
        // Gateways the client could not reach count as tried (a bounded number of them: the
        // list comes from the client).
        let mut tried: HashSet<String> = avoid.iter().take(MAX_AVOIDED).cloned().collect();
        let avoided = tried.len();
        let _turn = self
            .turn((
                session.account.clone(),
                session.client_id.clone(),
                granted.id.clone(),
                granted
                    .dns
                    .as_ref()
                    .map(|d| (d.name.clone(), d.mapped.clone())),
            ))
            .await;
        // A grant through a gateway on another replica may be handed out again while that
        // gateway is in service there; the store says so, asked only for a client that holds
        // such a grant in the site. A store no other replica shares has no such gateway, and
        // the walk over the client's grants is skipped.
        let holds_remote = self.store.shared() && {
            let registry = self.registry();
            registry
                .grant_of_client(&session.account, &session.client_id, |g| {
                    g.site == site && registry.gateway(&g.gateway_id).is_none()
                })
                .is_some()
        };
        let elsewhere: HashSet<String> = if holds_remote {
            let gateways = self.gateways_elsewhere(&session.account, &site).await;
            gateways.into_iter().map(|(peer, _)| peer.id).collect()
        } else {
            HashSet::new()
        };
        let again = Again {
            granted: &granted,
            site: &site,
            rule: &rule,
            bundle_hash: &policy.bundle_hash,
            expires_at,
            now,
            avoid: &tried,
            elsewhere: &elsewhere,
        };
        if let Some(grant) = self.grant_to_hand_out_again(session, &again) {
            let reused = Write::GrantReused {
                account: session.account.clone(),
                grant_id: grant.id.clone(),
                at: now_i64(now),
            };
            if let Err(error) = self.writer.submit(vec![reused]).await {
                tracing::error!(error = %error, "cannot record a flow");
            }
            return Ok((SignedGrant::clone(&grant.signed), grant.resolved));
        }
        let limit = account.settings.max_grants_per_client;
        let Some(_making) = GrantSlot::new(self, session, limit) else {
            return deny(format!(
                "this client holds {limit} grants, the most the account allows at once \
                 (`max_grants_per_client`); ask again when one ends"
            ))
            .await;
        };
        // Gateways that let this request's grant go unanswered (they stay in service).
        let mut silent: Vec<String> = Vec::new();
        // How far the client's `avoid` was relaxed: 0 not at all, 1 to the gateway it left
        // last, 2 to nothing.
        let mut relaxed = 0;
        loop {
            // A gateway connected here first; one on another replica when none here will do.
            let here = {
                let registry = self.registry();
                registry
                    .select_gateway(&session.account, &site, &session.client_id, &tried, |n| {
                        random::index(n).unwrap_or(0)
                    })
                    .map(|g| (g.peer.clone(), Route::Here(g.link.clone())))
            };
            let gateway = match here {
                Some(here) => Some(here),
                None => {
                    self.gateway_elsewhere(&session.account, &site, &tried)
                        .await
                }
            };
            let Some((gateway, route)) = gateway else {
                // Every healthy gateway of the site is one the client left lately. It names
                // them oldest first: one left a while ago may well be back (restarted), while
                // the one left last is the likeliest still gone, so the others are tried
                // again first. When that one is all the site has, it is tried too: the
                // client may have lost only its path to it (a relay restarted, its NAT
                // changed), and a gateway that is really gone fails the request by not
                // acknowledging the grant.
                let only_avoided_left = silent.is_empty()
                    && avoided > 0
                    && match relaxed {
                        0 => tried.len() == avoided,
                        1 => tried.len() == 1,
                        _ => false,
                    };
                if only_avoided_left {
                    if relaxed == 0 && avoided > 1 {
                        relaxed = 1;
                        tried = avoid[..avoid.len().min(MAX_AVOIDED)]
                            .last()
                            .into_iter()
                            .cloned()
                            .collect();
                    } else {
                        relaxed = 2;
                        tried = HashSet::new();
                    }
                    continue;
                }
                let reason = if !silent.is_empty() {
                    format!(
                        "no gateway in site `{site}` answered in time: {} did not acknowledge the grant within {} ms",
                        silent
                            .iter()
                            .map(|g| format!("`{g}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        self.timings.ack_timeout.as_millis()
                    )
                } else if tried.is_empty() {
                    format!("no healthy gateway in site `{site}`")
                } else {
                    format!("no gateway in site `{site}` acknowledged the grant")
                };
                return deny(reason).await;
            };
            tried.insert(gateway.id.clone());
            let fresh =
                PresharedKey(random::bytes().map_err(|_| BrokerError::Unavailable.to_string())?);
            // Held for the pair until this attempt ends, whichever way it ends, so that other
            // grants made meanwhile for the same pair carry the same key.
            let reservation = PairReservation::new(self, &session.client_id, &gateway.id, fresh);
            let preshared_key = reservation.key.clone();
            let grant = Grant {
                id: random::ordered_id("gr").map_err(|_| BrokerError::Unavailable.to_string())?,
                account: session.account.clone(),
                client: session.peer.clone(),
                gateway: gateway.clone(),
                preshared_key,
                resource: granted.clone(),
                rule: rule.clone(),
                bundle_hash: policy.bundle_hash.clone(),
                issued_at: now,
                expires_at,
            };
            let signed = grant.sign(&self.key);
            let answer = match &route {
                Route::Here(link) => self.push_to_gateway(&gateway.id, link, &signed).await,
                Route::Replica(replica) => self.offer_to_replica(replica, &signed, session).await,
            };
            let resolved = match answer {
                Ok(resolved) => resolved,
                Err(GatewayAnswer::Refused(reason)) => {
                    let reason = cut(&reason, MAX_REASON);
                    tracing::warn!(gateway = %gateway.id, grant = %signed.grant.id, %reason, "gateway refused a grant");
                    return deny(format!(
                        "gateway `{}` refused the grant: {reason}",
                        gateway.id
                    ))
                    .await;
                }
                Err(GatewayAnswer::Silent) => {
                    // The request fails, not the gateway: it heartbeats, and for a DNS resource
                    // its answer waits on a name the client chose. Another gateway of the site
                    // would wait on the same name, so only an IP resource's request tries one.
                    tracing::warn!(gateway = %gateway.id, grant = %signed.grant.id, "gateway did not answer a grant in time; the request fails, the gateway stays in service");
                    if let Some(dns) = &granted.dns {
                        return deny(format!(
                            "gateway `{}` did not answer within {} ms: `{}` could not be resolved in time; ask again later",
                            gateway.id,
                            self.timings.ack_timeout.as_millis(),
                            cut(&dns.name, MAX_LOGGED_NAME)
                        ))
                        .await;
                    }
                    silent.push(gateway.id.clone());
                    continue;
                }
                Err(GatewayAnswer::Gone) => continue,
            };
            let detail = GrantDetail {
                signed: Cow::Borrowed(&signed),
                session: None,
                resolved,
            };
            let (session_id, session_json) = stored_session(session);
            let record = GrantRecord {
                id: signed.grant.id.clone(),
                account: session.account.clone(),
                client_id: session.client_id.clone(),
                gateway_id: gateway.id.clone(),
                resource_id: resource_id.to_owned(),
                rule_id: rule.clone(),
                bundle_hash: policy.bundle_hash.clone(),
                issued_at: now_i64(now),
                expires_at: now_i64(expires_at),
                detail: serde_json::to_string(&detail).ok(),
                session_id,
                session: session_json,
            };
            let reason = table.rule_notes(&decision.rules).join("; ");
            let mut writes = vec![
                Write::InsertGrant(record),
                Write::Flow(NewFlow {
                    grant_id: Some(signed.grant.id.clone()),
                    ..flow(FlowDecision::Allow, Some(rule.clone()), reason)
                }),
            ];
            // A pair already connected (the grant adds a resource to it) travels as before.
            let known_path = self.registry().pair_path(&session.client_id, &gateway.id);
            if let Some(path) = known_path {
                writes.push(Write::FlowPath {
                    account: session.account.clone(),
                    grant_id: signed.grant.id.clone(),
                    path: path.kind,
                    relay: path.relay,
                });
            }
            if let Err(error) = self.writer.submit(writes).await {
                // The gateway holds a grant the store does not: take it back.
                tracing::error!(error = %error, "cannot store a grant; withdrawing it");
                match &route {
                    Route::Here(link) => {
                        let revoke = PortalToGateway::Revoke {
                            grant_id: signed.grant.id.clone(),
                        };
                        link.send_waiting(&revoke, self.timings.heartbeat_timeout())
                            .await;
                    }
                    Route::Replica(_) => {
                        self.take_back_elsewhere(&signed, "the portal could not store it")
                            .await;
                    }
                }
                return Err(BrokerError::Unavailable.to_string());
            }
            let grant_id = signed.grant.id.clone();
            self.registry().grant_added(live_grant(
                &signed,
                session.clone(),
                site.clone(),
                resolved,
            ));
            // While this request was deciding, its session may have ended (token revoked,
            // connection closed) or the policy may have changed: the sweeps that handle those
            // could not see a grant not yet in force. Look again now that it is.
            let ended = !self
                .registry()
                .client(&session.client_id)
                .is_some_and(|c| Arc::ptr_eq(&c.session, session));
            if ended {
                self.withdraw(&[grant_id], |_| "the client's session ended".to_owned())
                    .await;
                return Err("the client's session ended".to_owned());
            }
            if account.policy.current().bundle_hash != policy.bundle_hash
                && self.revalidate_where(|g| g.id == grant_id).await > 0
            {
                return Err("the policy changed while deciding; ask again".to_owned());
            }
            return Ok((signed, resolved));
        }
    }

    /// Sends a grant to a gateway and waits for its answer. A grant not answered in time is
    /// revoked at once: the revocation follows the grant on the same connection, so a gateway
    /// that installs it late removes it right after, and one still resolving its name drops it.
    async fn push_to_gateway(
        &self,
        gateway_id: &str,
        link: &Link,
        signed: &SignedGrant,
    ) -> Result<Option<Resolution>, GatewayAnswer> {
        let (answer, answered) = oneshot::channel();
        self.pending().insert(
            signed.grant.id.clone(),
            PendingAck {
                gateway_id: gateway_id.to_owned(),
                answer,
            },
        );
        // A gateway busy with a burst (a mass withdrawal, say) slows this request down rather
        // than being dropped; one that takes nothing for the whole ack timeout is closed.
        let started = tokio::time::Instant::now();
        let grant = PortalToGateway::Grant {
            grant: Box::new(signed.clone()),
        };
        if !link.send_waiting(&grant, self.timings.ack_timeout).await {
            self.pending().remove(&signed.grant.id);
            return Err(GatewayAnswer::Gone);
        }
        let left = self.timings.ack_timeout.saturating_sub(started.elapsed());
        let outcome = tokio::time::timeout(left, answered).await;
        self.pending().remove(&signed.grant.id);
        match outcome {
            Ok(Ok(answer)) => answer,
            // The gateway's connection closed and dropped the sender; when it comes back, its
            // `ready` does not list the grant, so it drops whatever it made of it.
            Ok(Err(_)) => Err(GatewayAnswer::Gone),
            Err(_) => {
                // The revocation must not be lost, and it follows the grant on the same
                // connection, so a late install is undone; it is sent in the background so
                // that the client hears at once.
                let revoke = PortalToGateway::Revoke {
                    grant_id: signed.grant.id.clone(),
                };
                let (link, patience) = (link.clone(), self.timings.heartbeat_timeout());
                tokio::spawn(async move { link.send_waiting(&revoke, patience).await });
                Err(GatewayAnswer::Silent)
            }
        }
    }

    // ---- gateways ----

    /// A gateway said hello: register it in its token's site and put it in service. Returns
    /// its id, connection number, the `ready` to send, and the grants in force it holds, to
    /// send after `ready`.
    pub async fn gateway_hello(
        &self,
        token: &TokenRecord,
        public_key: PublicKey,
        endpoints: Vec<std::net::SocketAddr>,
        link: Link,
    ) -> Result<(String, u64, PortalToGateway, Vec<Arc<SignedGrant>>), BrokerError> {
        self.account(&token.account)?;
        check_endpoints(&endpoints)?;
        let store::TokenKind::Gateway { site } = &token.kind else {
            return Err(BrokerError::Refused(
                "this is not a gateway token".to_owned(),
            ));
        };
        let now = now_i64(unix(self.now()));
        let texts: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        let (record, announced) = self
            .store
            .connect_gateway(
                &token.account,
                &token.id,
                &public_key.to_string(),
                &texts,
                now,
            )
            .await
            .map_err(refusal)?;
        let connection = {
            let mut registry = self.registry();
            let connection = registry.connection();
            let replaced = registry.gateway_connected(GatewayEntry {
                account: token.account.clone(),
                site: site.clone(),
                token_id: token.id.clone(),
                peer: fz_proto::GatewayPeer {
                    id: record.id.clone(),
                    public_key,
                    endpoints,
                },
                connection,
                announced,
                link,
            });
            if let Some(old) = replaced {
                old.close();
            }
            connection
        };
        tracing::info!(account = %token.account, gateway = %record.id, %site, "gateway in service");
        // A gateway that comes back (its connection dropped, the portal restarted, or it
        // moved here from another replica) gets the grants it holds again, as the store has
        // them, so both sides agree on what is in force. Grants another replica made join this
        // one's registry: from now on it decides them again and withdraws them from the
        // gateway it serves.
        let stored = self
            .store
            .active_grants_of_gateway(&token.account, &record.id, now)
            .await
            .map_err(refusal)?;
        {
            let policy = self.account(&token.account)?.policy.current();
            let mut registry = self.registry();
            let known: HashSet<String> = registry
                .grants_where(|g| g.gateway_id == record.id)
                .into_iter()
                .collect();
            let missing = stored.iter().filter(|r| !known.contains(&r.id));
            let mut sessions = RestoredSessions::new();
            for grant in missing.filter_map(|r| restored(r, &policy.table, &mut sessions)) {
                registry.grant_added(grant);
            }
        }
        let held = self.registry().grants_where(|g| g.gateway_id == record.id);
        let resend: Vec<Arc<SignedGrant>> = {
            let registry = self.registry();
            registry
                .grants()
                .into_iter()
                .filter(|g| held.contains(&g.id))
                .map(|g| g.signed.clone())
                .collect()
        };
        let ready = PortalToGateway::Ready {
            gateway_id: record.id.clone(),
            heartbeat_interval_ms: u64::try_from(self.timings.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
            grants: resend.iter().map(|g| g.grant.id.clone()).collect(),
        };
        Ok((record.id, connection, ready, resend))
    }

    /// A heartbeat: the gateway is alive. Its time is queued for the store when this is
    /// called; the future is ready once it is committed (or failed, which it logs).
    pub fn gateway_heartbeat(
        &self,
        account: &str,
        gateway_id: &str,
    ) -> impl Future<Output = ()> + Send + use<> {
        let now = now_i64(unix(self.now()));
        // A heartbeat from a connection the registry has replaced or dropped records the
        // time, not a connection.
        let connected = self.registry().gateway(gateway_id).is_some();
        let seen = Write::GatewaySeen {
            account: account.to_owned(),
            gateway_id: gateway_id.to_owned(),
            connected,
            at: now,
        };
        let committed = self.writer.submit(vec![seen]);
        let gateway_id = gateway_id.to_owned();
        async move {
            if let Err(error) = committed.await {
                tracing::warn!(error = %error, gateway = %gateway_id, "cannot record a heartbeat");
            }
        }
    }

    /// A gateway's answer to a grant. Answers about grants sent to another gateway are
    /// ignored, and so is an answer that comes after the request gave up on it (the grant was
    /// revoked then).
    pub fn gateway_answered(&self, gateway_id: &str, grant_id: &str, outcome: AckOutcome) {
        let mut pending = self.pending();
        if pending
            .get(grant_id)
            .is_some_and(|p| p.gateway_id == gateway_id)
            && let Some(p) = pending.remove(grant_id)
        {
            let _ = p.answer.send(outcome.map_err(GatewayAnswer::Refused));
        }
    }

    /// A gateway's connection closed (or missed its heartbeats): out of service at once.
    pub async fn gateway_closed(&self, account: &str, gateway_id: &str, connection: u64) {
        if !self.registry().gateway_gone(gateway_id, connection) {
            return;
        }
        // Grants waiting for it will not be acknowledged: let their requests try another.
        self.pending().retain(|_, p| p.gateway_id != gateway_id);
        self.tell_gateway_down(account, gateway_id);
        // Marked disconnected and, for replicas whose clients hold its grants, announced in
        // the same transaction: a replica that reads the notice reads the mark with it (or a
        // newer connection's), so it can tell whether the gateway came back meanwhile.
        let at = now_i64(unix(self.now()));
        let mut writes = vec![Write::GatewaySeen {
            account: account.to_owned(),
            gateway_id: gateway_id.to_owned(),
            connected: false,
            at,
        }];
        if self.store.shared() {
            writes.push(Write::Announce {
                account: account.to_owned(),
                kind: ClusterEventKind::GatewayDown,
                subject: gateway_id.to_owned(),
                detail: String::new(),
                at,
            });
        }
        if let Err(error) = self.writer.submit(writes).await {
            tracing::warn!(error = %error, gateway = %gateway_id, "cannot record gateway health");
        }
        tracing::info!(%account, gateway = %gateway_id, "gateway out of service");
    }

    /// Tells the clients connected here that hold grants of `gateway_id` (of `account`) that
    /// it is out of service, so that one that hears nothing from it either leaves it in
    /// seconds; its grants stay, as its tunnels may outlive its connection to us.
    fn tell_gateway_down(&self, account: &str, gateway_id: &str) {
        let clients: Vec<Link> = {
            let registry = self.registry();
            let holding: HashSet<String> = registry
                .grants()
                .iter()
                .filter(|g| g.gateway_id == gateway_id && g.account == account)
                .map(|g| g.client_id.clone())
                .collect();
            holding
                .iter()
                .filter_map(|client| registry.client(client))
                .map(|client| client.link.clone())
                .collect()
        };
        for link in clients {
            link.send(&PortalToClient::GatewayDown {
                gateway_id: gateway_id.to_owned(),
            });
        }
    }

    // ---- withdrawing grants ----

    /// Decides every grant in force again with the current tables and clock, and withdraws
    /// the ones that no longer hold (expired, denied, or their resource changed). Returns how
    /// many were withdrawn.
    pub async fn revalidate(&self) -> usize {
        self.revalidate_where(|_| true).await
    }

    /// [`Broker::revalidate`] for the grants of these clients only.
    pub async fn revalidate_clients(&self, clients: &HashSet<String>) -> usize {
        if clients.is_empty() {
            return 0;
        }
        self.revalidate_where(|g| clients.contains(&g.client_id))
            .await
    }

    async fn revalidate_where(&self, select: impl Fn(&LiveGrant) -> bool) -> usize {
        let at = self.now();
        let now = unix(at);
        let tables: HashMap<&str, _> = self
            .accounts
            .iter()
            .map(|(slug, a)| (slug.as_str(), a.policy.current()))
            .collect();
        // Devices an admin marked verified, now, with the keys the marks were given for:
        // unmarking one, or its key changing, withdraws what needed the mark. Without them (the
        // store failing), only expiry is checked this time.
        let verified = match self.store.verified_keys().await {
            Ok(verified) => Some(verified),
            Err(error) => {
                tracing::warn!(error = %error, "cannot read verified devices; checking expiry only");
                None
            }
        };
        // Decide on a snapshot: requests keep flowing while thousands of grants are decided.
        let grants = self.registry().grants();
        let mut reasons: HashMap<String, String> = HashMap::new();
        for grant in grants.iter().filter(|g| select(g)) {
            let reason = if grant.expires_at <= now {
                Some("the grant expired".to_owned())
            } else {
                let table = tables.get(grant.account.as_str());
                table.zip(verified.as_ref()).and_then(|(policy, verified)| {
                    let verified = verified
                        .get(&grant.client_id)
                        .is_some_and(|key| *key == grant.signed.grant.client.public_key);
                    still_allowed(&policy.table, grant, verified, at).err()
                })
            };
            if let Some(reason) = reason {
                reasons.insert(grant.id.clone(), reason);
            }
        }
        let ids: Vec<String> = reasons.keys().cloned().collect();
        self.withdraw(&ids, |id| {
            reasons
                .get(id)
                .cloned()
                .unwrap_or_else(|| "the policy no longer allows it".to_owned())
        })
        .await
    }

    /// An identity provider signed `user` of `account` in again and named the groups they are
    /// in now. Memberships from that provider it no longer names stop counting at once: every
    /// grant of the user's live sessions that held one is decided again without it (and
    /// withdrawn unless something else allows it; those kept are held for the session without
    /// it from now on), and every live connection of the user that counted one is closed, so
    /// that its next hello reads the new groups. Memberships it adds count from the user's next connection.
    /// Returns how many grants were withdrawn.
    pub async fn idp_groups_changed(
        &self,
        account: &str,
        user: &str,
        provider: &str,
        groups: &[String],
    ) -> usize {
        let lost = |session: &ClientSession| {
            session
                .idp_groups
                .iter()
                .any(|(p, g)| p == provider && !groups.contains(g))
        };
        let affected: Vec<Arc<LiveGrant>> = self
            .registry()
            .grants()
            .into_iter()
            .filter(|g| g.account == account && g.session.user == user && lost(&g.session))
            .collect();
        let at = self.now();
        let table = self.accounts.get(account).map(|a| a.policy.current());
        let verified = self.store.verified_keys().await.ok();
        let mut withdraw = Vec::new();
        {
            let mut registry = self.registry();
            for grant in &affected {
                let mut session = (*grant.session).clone();
                session
                    .idp_groups
                    .retain(|(p, g)| p != provider || groups.contains(g));
                let reduced = LiveGrant {
                    session: Arc::new(session),
                    ..(**grant).clone()
                };
                let still = match (&table, &verified) {
                    (Some(policy), Some(verified)) => {
                        let verified = verified
                            .get(&grant.client_id)
                            .is_some_and(|key| *key == grant.signed.grant.client.public_key);
                        still_allowed(&policy.table, &reduced, verified, at).is_ok()
                    }
                    // Without the policy or the verified marks it cannot be decided: not kept.
                    _ => false,
                };
                if still {
                    registry.reassign(reduced);
                } else {
                    withdraw.push(grant.id.clone());
                }
            }
            // Every live session of the user that counted a lost group, with grants or not.
            for link in
                registry.clients_where(|s| s.account == account && s.user == user && lost(s))
            {
                link.close();
            }
        }
        let provider = provider.to_owned();
        self.withdraw(&withdraw, |_| {
            format!(
                "the identity provider `{provider}` no longer puts the user in a group it needed"
            )
        })
        .await
    }

    /// Withdraws the grants whose expiry has come. Cheap: it visits only those.
    pub async fn expire(&self) -> usize {
        let now = unix(self.now());
        let ids = self.registry().expired(now);
        self.withdraw(&ids, |_| "the grant expired".to_owned())
            .await
    }

    /// What the broker's clock says: the minute it reads is when time windows open and close.
    pub fn clock(&self) -> DateTime<Utc> {
        self.now()
    }

    /// The relays an agent (by its client or gateway id) may use, with credentials minted for
    /// it now; `None` when the portal has no relays.
    pub fn relay_credentials(&self, agent: &str) -> Option<Vec<Relay>> {
        if self.relays.is_empty() {
            return None;
        }
        Some(self.relays.credentials_for(agent, unix(self.now())))
    }

    /// Sends every connected agent new relay credentials before those it holds lapse.
    pub fn refresh_relay_credentials(&self) {
        let registry = self.registry();
        for (id, link) in registry.client_links() {
            if let Some(relays) = self.relay_credentials(id) {
                link.send(&PortalToClient::Relays { relays });
            }
        }
        for (id, link) in registry.gateway_links() {
            if let Some(relays) = self.relay_credentials(id) {
                link.send(&PortalToGateway::Relays { relays });
            }
        }
    }

    /// A client's ICE candidates for a gateway: forwarded only while a grant between the two
    /// is in force or being made, so candidates never reach anyone who may not connect; and
    /// only as fast as the client's requests (its bucket), so no client can flood a gateway.
    pub fn client_candidates(
        &self,
        session: &ClientSession,
        gateway_id: &str,
        candidates: Vec<String>,
    ) -> Result<(), String> {
        check_candidates(&candidates)?;
        self.take_request(session)?;
        let not_yours = || {
            format!(
                "no grant through gateway `{}`: its candidates are not yours to send",
                logged_id(gateway_id)
            )
        };
        let registry = self.registry();
        // A pair is only ever made for a grant of the client's own account.
        if registry.pair_key(&session.client_id, gateway_id).is_none() {
            return Err(not_yours());
        }
        match registry
            .gateway(gateway_id)
            .filter(|g| g.account == session.account)
        {
            Some(gateway) => gateway.link.send(&PortalToGateway::Candidates {
                client_id: session.client_id.clone(),
                candidates,
            }),
            None => {
                let from = Candidates::Client {
                    client_id: session.client_id.clone(),
                    candidates,
                };
                if !self.candidates_elsewhere(&session.account, gateway_id, from) {
                    return Err(not_yours());
                }
            }
        }
        Ok(())
    }

    /// A gateway's ICE candidates for a client, forwarded as a client's are: only while a
    /// grant between the two is in force or being made.
    pub fn gateway_candidates(
        &self,
        account: &str,
        gateway_id: &str,
        client_id: &str,
        candidates: Vec<String>,
    ) -> Result<(), String> {
        check_candidates(&candidates)?;
        let no_grant = || format!("no grant for client `{}`", logged_id(client_id));
        let registry = self.registry();
        // The gateway's own pairs: a pair is only ever made for a grant of its account.
        if registry.pair_key(client_id, gateway_id).is_none() {
            return Err(no_grant());
        }
        match registry
            .client(client_id)
            .filter(|c| c.session.account == account)
        {
            Some(client) => client.link.send(&PortalToClient::Candidates {
                gateway_id: gateway_id.to_owned(),
                candidates,
            }),
            None => {
                let from = Candidates::Gateway {
                    gateway_id: gateway_id.to_owned(),
                    candidates,
                };
                if !self.candidates_elsewhere(account, client_id, from) {
                    return Err(no_grant());
                }
            }
        }
        Ok(())
    }

    /// A gateway says how a client's datagrams reach it now: the flows of the grants in force
    /// between them record it. Ignored for a client the gateway holds no grant of (its last
    /// grant may have just ended). A gateway that says it over and over only slows itself:
    /// its connection waits for each write.
    pub async fn gateway_path(
        &self,
        account: &str,
        gateway_id: &str,
        client_id: &str,
        path: ConnectionPath,
    ) {
        let grants = self
            .registry()
            .set_pair_path(account, client_id, gateway_id, path);
        let writes: Vec<Write> = grants
            .into_iter()
            .map(|grant_id| Write::FlowPath {
                account: account.to_owned(),
                grant_id,
                path: path.kind,
                relay: path.relay,
            })
            .collect();
        if !writes.is_empty()
            && let Err(error) = self.writer.submit(writes).await
        {
            tracing::warn!(error = %error, gateway = %gateway_id, "cannot record a connection's path");
        }
    }

    /// How often [`Broker::refresh_relay_credentials`] must run; `None` without relays.
    pub fn relay_refresh_interval(&self) -> Option<Duration> {
        (!self.relays.is_empty()).then(|| self.relays.refresh_interval())
    }

    /// A client signs out: its token is revoked, then its connections closed and its grants
    /// withdrawn, as the sweeper would on seeing the revocation, only at once.
    pub async fn sign_out(&self, token: &TokenRecord) -> Result<(), BrokerError> {
        let now = now_i64(unix(self.now()));
        self.store
            .revoke_token(&token.account, &token.id, now)
            .await
            .map_err(|error| {
                tracing::error!(error = %error, "cannot revoke a token at sign-out");
                BrokerError::Unavailable
            })?;
        self.tokens_revoked(&HashSet::from([token.id.clone()]))
            .await;
        tracing::info!(account = %token.account, token = %token.id, "signed out");
        Ok(())
    }

    /// Closes the connections of these tokens and withdraws their grants.
    pub async fn tokens_revoked(&self, tokens: &HashSet<String>) -> usize {
        if tokens.is_empty() {
            return 0;
        }
        let ids = {
            let registry = self.registry();
            for link in registry.links_of_tokens(tokens) {
                link.close();
            }
            registry.grants_where(|g| tokens.contains(&g.session.token_id))
        };
        self.withdraw(&ids, |_| "the token was revoked".to_owned())
            .await
    }

    /// Closes the sessions of clients whose token expired.
    pub fn close_expired_sessions(&self) {
        let now = unix(self.now());
        for link in self.registry().clients_expired(now) {
            link.close();
        }
    }

    /// Takes grants out of force, out of the store, and tells their gateways and clients.
    ///
    /// Each gateway hears of its grants in as few messages as fit (`revoke` for one,
    /// `revoke_many` with up to [`PortalToGateway::MAX_REVOKED`] ids), so withdrawing
    /// thousands at once costs its link a few messages. Revocations are never dropped for lack
    /// of room on a link: sending waits for room (each link apart, all at once), for as long
    /// as the portal waits for a silent gateway; a link still full then is closed, and a
    /// gateway that connects again is told what is in force. This returns once the gateways
    /// have their revocations queued; clients get theirs in the background.
    async fn withdraw(&self, ids: &[String], reason: impl Fn(&str) -> String) -> usize {
        if ids.is_empty() {
            return 0;
        }
        // Out of force first (no new decision can lean on them), then out of the store, then
        // the agents are told: whoever hears of a revocation can rely on the store having it.
        // Agents connected to other replicas are told by those, through an event committed
        // with the deletions.
        let withdrawn: Vec<Arc<LiveGrant>> = self.registry().withdraw(ids);
        let mut to_gateways: HashMap<String, (Link, Vec<String>)> = HashMap::new();
        let mut to_clients: HashMap<String, (Link, Vec<PortalToClient>)> = HashMap::new();
        let mut elsewhere = Elsewhere::default();
        {
            let registry = self.registry();
            for grant in &withdrawn {
                let why = reason(&grant.id);
                tracing::info!(account = %grant.account, grant = %grant.id, client = %grant.client_id, reason = %why, "grant withdrawn");
                let gateway = registry.gateway(&grant.gateway_id);
                let client = registry.client(&grant.client_id);
                if (gateway.is_none() || client.is_none()) && self.store.shared() {
                    elsewhere.add(grant, why.clone());
                }
                if let Some(gateway) = gateway {
                    to_gateways
                        .entry(grant.gateway_id.clone())
                        .or_insert_with(|| (gateway.link.clone(), Vec::new()))
                        .1
                        .push(grant.id.clone());
                }
                if let Some(client) = client {
                    to_clients
                        .entry(grant.client_id.clone())
                        .or_insert_with(|| (client.link.clone(), Vec::new()))
                        .1
                        .push(PortalToClient::Revoked {
                            grant_id: grant.id.clone(),
                            reason: why,
                        });
                }
            }
        }
        let mut writes = deletions(&withdrawn);
        writes.extend(elsewhere.announcements(now_i64(unix(self.now()))));
        if let Err(error) = self.writer.submit(writes).await {
            tracing::error!(error = %error, "cannot delete withdrawn grants from the store");
        }
        self.tell(to_gateways, to_clients).await;
        withdrawn.len()
    }

    /// Sends withdrawals to the gateways and clients connected here: see [`Broker::withdraw`].
    async fn tell(
        &self,
        to_gateways: HashMap<String, (Link, Vec<String>)>,
        to_clients: HashMap<String, (Link, Vec<PortalToClient>)>,
    ) {
        let patience = self.timings.heartbeat_timeout();
        let mut sending = tokio::task::JoinSet::new();
        for (link, ids) in to_gateways.into_values() {
            sending.spawn(async move {
                for batch in ids.chunks(PortalToGateway::MAX_REVOKED) {
                    let message = match batch {
                        [grant_id] => PortalToGateway::Revoke {
                            grant_id: grant_id.clone(),
                        },
                        _ => PortalToGateway::RevokeMany {
                            grant_ids: batch.to_vec(),
                        },
                    };
                    if !link.send_waiting(&message, patience).await {
                        break;
                    }
                }
            });
        }
        // Clients are told without waiting for them: their gateways enforce the withdrawal,
        // and a client that reads nothing must not hold up the sweeper.
        for (link, messages) in to_clients.into_values() {
            tokio::spawn(async move {
                for message in messages {
                    if !link.send_waiting(&message, patience).await {
                        break;
                    }
                }
            });
        }
        while sending.join_next().await.is_some() {}
    }

    /// Deletes the flows each account keeps no longer (`flow_retention_days`, by the time of
    /// their last occurrence), in batches of [`PRUNE_BATCH`], at most [`PRUNE_BUDGET`] rows an
    /// account a call, so that pruning a large backlog never holds the store for long. Returns
    /// how many went, and whether some account had more to go (call again soon).
    pub async fn prune_flows(&self) -> (u64, bool) {
        let now = now_i64(unix(self.now()));
        let mut pruned = 0;
        let mut more = false;
        for account in self.accounts.values() {
            let slug = &account.settings.slug;
            let retention = i64::from(account.settings.flow_retention_days) * 86_400;
            let before = now.saturating_sub(retention);
            let mut budget = PRUNE_BUDGET;
            loop {
                match self.store.prune_flows(slug, before, PRUNE_BATCH).await {
                    Ok(n) => {
                        pruned += n;
                        budget = budget.saturating_sub(n);
                        if n < u64::from(PRUNE_BATCH) {
                            break;
                        }
                        if budget == 0 {
                            more = true;
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(account = %slug, error = %error, "cannot prune old flows");
                        break;
                    }
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "flows older than their account's retention deleted");
        }
        (pruned, more)
    }

    /// Forgets what the limits no longer need: request buckets full again, denials whose
    /// minute has passed.
    pub fn forget_idle(&self) {
        self.limiter().forget_idle(Instant::now());
        self.repeats().forget_before(now_i64(unix(self.now())));
    }

    /// A grant in force that a request decided now (`again`) may get instead of a new one.
    ///
    /// Handing a grant out again must never give what a new decision would not: the request
    /// was decided in full just now (policy, conditions, the verified mark), and the grant
    /// must say exactly what a new grant would: the same session (the same device, key,
    /// token, user, groups and context, so a client that reconnected unchanged counts), the
    /// same resource as the table now describes it (address, ports, carve-outs, and for a DNS
    /// resource the same name and mapped addresses), the same site, rule and policy; its
    /// gateway must be in service and not one the client asked to avoid; and it must expire no
    /// later than a new grant would, and not within a minute unless a new one would too (the
    /// client would only have to ask again). A DNS grant also needs what its name resolved
    /// to, to tell the client. Of several, one through the gateway the client uses in the
    /// site (where a new grant would go) comes first. A gateway on another replica counts as
    /// in service when the store says it is (`again.elsewhere`).
    fn grant_to_hand_out_again(
        &self,
        session: &Arc<ClientSession>,
        again: &Again<'_>,
    ) -> Option<Arc<LiveGrant>> {
        let soon = again.now.saturating_add(REUSE_MIN_LEFT_SECS);
        let registry = self.registry();
        // The cheap tests first: most of a client's grants are for other resources, and its
        // grants usually share the session's `Arc`.
        let usable = |g: &LiveGrant| {
            let grant = &g.signed.grant;
            g.resource_id == again.granted.id
                && (Arc::ptr_eq(&g.session, session) || *g.session == **session)
                && grant.resource == *again.granted
                && g.site == again.site
                && grant.rule == again.rule
                && grant.bundle_hash == again.bundle_hash
                && g.expires_at <= again.expires_at
                && g.expires_at >= again.expires_at.min(soon)
                && g.expires_at > again.now
                && (grant.resource.dns.is_none() || g.resolved.is_some())
                && !again.avoid.contains(&g.gateway_id)
                && (registry
                    .gateway(&g.gateway_id)
                    .is_some_and(|gw| gw.account == session.account)
                    || again.elsewhere.contains(&g.gateway_id))
        };
        // Through the gateway the client uses in the site, if it holds one there, as a new
        // grant would go; else through any.
        let sticky = registry
            .client(&session.client_id)
            .filter(|c| c.session.account == session.account)
            .and_then(|c| c.gateway_by_site.get(again.site));
        // One visit of the client's grants: the first usable one through that gateway, else
        // the first usable one.
        let mut through_another = None;
        for grant in registry.client_grants(&session.account, &session.client_id) {
            if usable(grant) {
                if sticky.is_none_or(|gateway| grant.gateway_id == *gateway) {
                    return Some(grant.clone());
                }
                through_another.get_or_insert_with(|| grant.clone());
            }
        }
        through_another
    }

    /// Closes every agent connection (the portal is stopping).
    /// Every connected agent's link, clients and gateways.
    pub fn agent_links(&self) -> Vec<Link> {
        self.registry().links().into_iter().cloned().collect()
    }

    pub fn close_all(&self) {
        for link in self.registry().links() {
            link.close();
        }
    }

    /// How many grants are in force (for health and tests).
    pub fn grants_in_force(&self) -> usize {
        self.registry().grant_count()
    }
}

/// Why a grant sent to a gateway is not in force: it refused it (and why), it did not answer
/// in time, or its connection went away first.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GatewayAnswer {
    Refused(String),
    Silent,
    Gone,
}

/// Whether a grant in force still holds under `table` at `at`: the same decision inputs give
/// allow, and a grant made now would say what this one says (address, ports, carve-outs and,
/// for a name, the resource serving it; a narrower resource declared since takes addresses
/// or the name away), at the same site.
fn still_allowed(
    table: &DecisionTable,
    grant: &LiveGrant,
    verified: bool,
    at: DateTime<Utc>,
) -> Result<(), String> {
    let granted = &grant.signed.grant.resource;
    let dns = granted.dns.clone();
    match admission::admit(table, &grant.session, &grant.resource_id, dns, verified, at) {
        Admission::Denied { decision, .. } => Err(format!(
            "the policy no longer allows it: {}",
            decision.reason.describe()
        )),
        Admission::Refused { reason, .. } => Err(reason),
        Admission::Granted { resource, site, .. } => {
            let same = site == grant.site
                && resource.address == granted.address
                && resource.filter == granted.filter
                && resource.except == granted.except;
            if same {
                Ok(())
            } else {
                Err("the resource's address, ports, site or carve-outs changed".to_owned())
            }
        }
    }
}

/// Whether a rule on the resource has a `client verified` condition: only then does the mark
/// change the decision.
fn mentions_verified(table: &DecisionTable, resource: &str) -> bool {
    let table_ref = table.table();
    table
        .resource_index(resource)
        .and_then(|i| table_ref.resources.get(i as usize))
        .is_some_and(|r| {
            r.allow.iter().chain(&r.deny).any(|rule| {
                table_ref.rules.get(*rule as usize).is_some_and(|rule| {
                    rule.conditions
                        .iter()
                        .any(|c| matches!(c, fz_compiler::condition::Condition::ClientVerified))
                })
            })
        })
}

/// Every resource of the account, as its clients see them. A client routes and resolves all of
/// them into fz and asks for each, rather than only for those some rule allows its user: so a
/// name or address the policy refuses never leaves the machine on the open network (an internal
/// name asked of a public resolver, say), every refusal is decided and recorded here with its
/// reason, and a rule added later works without the client reconnecting. The cost is that a
/// signed-in user of the account learns the resources' addresses, which the account's own
/// DNS and routing would tell them too.
fn account_resources(table: &DecisionTable) -> Vec<ResourceView> {
    table
        .table()
        .resources
        .iter()
        .map(|r| ResourceView {
            id: r.id.clone(),
            address: r.address.to_string(),
        })
        .collect()
}

/// A pair key reserved in the registry for one attempt at a grant; dropping it ends the
/// reservation (see `Registry::reserve_pair_key`).
struct PairReservation<'a> {
    broker: &'a Broker,
    client_id: String,
    gateway_id: String,
    key: PresharedKey,
}

impl<'a> PairReservation<'a> {
    fn new(
        broker: &'a Broker,
        client_id: &str,
        gateway_id: &str,
        fresh: PresharedKey,
    ) -> PairReservation<'a> {
        let key = broker
            .registry()
            .reserve_pair_key(client_id, gateway_id, fresh);
        PairReservation {
            broker,
            client_id: client_id.to_owned(),
            gateway_id: gateway_id.to_owned(),
            key,
        }
    }
}

impl Drop for PairReservation<'_> {
    fn drop(&mut self) {
        self.broker
            .registry()
            .release_reservation(&self.client_id, &self.gateway_id);
    }
}

/// What a request was just decided to get, to compare with the grants in force.
struct Again<'a> {
    granted: &'a fz_proto::GrantedResource,
    site: &'a str,
    rule: &'a str,
    bundle_hash: &'a str,
    /// When a new grant would expire.
    expires_at: UnixTime,
    now: UnixTime,
    avoid: &'a HashSet<String>,
    /// Gateways of the site in service on other replicas.
    elsewhere: &'a HashSet<String>,
}

/// What a client asked for: account, client id, resource id, and a DNS resource's name and
/// mapped addresses.
type Asked = (
    String,
    String,
    String,
    Option<(String, Vec<std::net::IpAddr>)>,
);

/// A request's turn at what it asked for (see [`Broker::turn`]).
struct Turn<'a> {
    broker: &'a Broker,
    asked: Asked,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Under the map's lock, where every waiter took its copy: the map's and this one left
        // means nobody waits, and the entry goes.
        let mut deciding = self.broker.deciding();
        if Arc::strong_count(&self.lock) <= 2 {
            deciding.remove(&self.asked);
        }
    }
}

/// A grant handed out again must have at least this long left, unless a new one would not.
const REUSE_MIN_LEFT_SECS: u64 = 60;

/// Flows deleted by one statement when pruning, and at most by one call per account.
const PRUNE_BATCH: u32 = 1_000;
const PRUNE_BUDGET: u64 = 10_000;

/// A grant being made for a client, counted against its limit until it is in force or has
/// failed (see `Registry::making_grant`).
struct GrantSlot<'a> {
    broker: &'a Broker,
    account: String,
    client_id: String,
}

impl<'a> GrantSlot<'a> {
    fn new(broker: &'a Broker, session: &ClientSession, limit: usize) -> Option<GrantSlot<'a>> {
        broker
            .registry()
            .making_grant(&session.account, &session.client_id, limit)
            .then(|| GrantSlot {
                broker,
                account: session.account.clone(),
                client_id: session.client_id.clone(),
            })
    }
}

impl Drop for GrantSlot<'_> {
    fn drop(&mut self) {
        self.broker
            .registry()
            .grant_made(&self.account, &self.client_id);
    }
}

/// How a grant's session is stored (`GrantRecord::session`): its id, a hash of its JSON, so
/// that the grants of one session name one row, and the JSON.
fn stored_session(session: &ClientSession) -> (Option<String>, Option<String>) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let Ok(json) = serde_json::to_string(session) else {
        return (None, None);
    };
    let digest = sha2::Sha256::digest(json.as_bytes());
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18]);
    (Some(format!("ses_{id}")), Some(json))
}

/// The sessions of grants restored together, by id: their grants share one `Arc`.
type RestoredSessions = HashMap<String, Arc<ClientSession>>;

/// A stored grant in force again, as the registry keeps it; `None` (logged) for one stored
/// without its detail or its session, which runs to its expiry undecided.
fn restored(
    record: &GrantRecord,
    table: &DecisionTable,
    sessions: &mut RestoredSessions,
) -> Option<LiveGrant> {
    let detail = record
        .detail
        .as_deref()
        .and_then(|d| serde_json::from_str::<GrantDetail>(d).ok());
    let inline = detail.as_ref().and_then(|d| d.session.as_ref());
    let session = match inline {
        Some(inline) => Some(Arc::new(inline.clone().into_owned())),
        None => stored_once(record, sessions),
    };
    let (Some(detail), Some(session)) = (detail, session) else {
        tracing::warn!(grant = %record.id, "a stored grant lacks its detail or its session; it runs to its expiry undecided");
        return None;
    };
    // A resource gone from the policy leaves no site: the first sweep withdraws it.
    let site = table
        .resource_index(&record.resource_id)
        .and_then(|r| admission::site_of(table, r));
    Some(live_grant(
        &detail.signed,
        session,
        site.unwrap_or_default(),
        detail.resolved,
    ))
}

/// The session a stored grant names (`GrantRecord::session`), shared with the grants restored
/// beside it.
fn stored_once(
    record: &GrantRecord,
    sessions: &mut RestoredSessions,
) -> Option<Arc<ClientSession>> {
    let (id, json) = (record.session_id.as_ref()?, record.session.as_ref()?);
    if let Some(shared) = sessions.get(id) {
        return Some(shared.clone());
    }
    let session = Arc::new(serde_json::from_str::<ClientSession>(json).ok()?);
    sessions.insert(id.clone(), session.clone());
    Some(session)
}

fn live_grant(
    signed: &SignedGrant,
    session: Arc<ClientSession>,
    site: String,
    resolved: Option<Resolution>,
) -> LiveGrant {
    let grant = &signed.grant;
    LiveGrant {
        resolved,
        site,
        id: grant.id.clone(),
        account: grant.account.clone(),
        client_id: grant.client.id.clone(),
        gateway_id: grant.gateway.id.clone(),
        resource_id: grant.resource.id.clone(),
        expires_at: grant.expires_at,
        session,
        signed: Arc::new(signed.clone()),
    }
}

/// Candidate endpoints an agent may report: each one goes into every grant it is part of.
pub const MAX_ENDPOINTS: usize = 16;

/// The most gateways a request may ask to avoid; the rest of its list is ignored.
const MAX_AVOIDED: usize = 16;

fn check_endpoints(endpoints: &[std::net::SocketAddr]) -> Result<(), BrokerError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(BrokerError::Refused(format!(
            "at most {MAX_ENDPOINTS} endpoints, not {}",
            endpoints.len()
        )));
    }
    Ok(())
}

/// The longest resource id the flow log keeps whole. Ids in policies are short; a request for
/// a longer one is denied as unknown, and its id is cut so the log cannot be made to grow by
/// the size of a message per request.
const MAX_LOGGED_ID: usize = 128;

/// The longest reason the flow log and a rejection carry whole: reasons quote what agents sent
/// (a DNS name, a gateway's refusal), which is theirs to make long.
const MAX_REASON: usize = 1024;

fn logged_id(resource: &str) -> String {
    cut(resource, MAX_LOGGED_ID)
}

/// `text` up to `max` characters, with `…` where it was cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", text.get(..end).unwrap_or_default()),
    }
}

/// Maps a store error on connection start to what the agent is told.
fn refusal(error: store::StoreError) -> BrokerError {
    match error {
        store::StoreError::NotFound(_)
        | store::StoreError::Conflict { .. }
        | store::StoreError::Invalid(_) => BrokerError::Refused(error.to_string()),
        other => {
            tracing::error!(error = %other, "store failed while an agent connected");
            BrokerError::Unavailable
        }
    }
}

fn unix(at: DateTime<Utc>) -> UnixTime {
    u64::try_from(at.timestamp()).unwrap_or(0)
}

fn now_i64(now: UnixTime) -> i64 {
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// Candidates within the protocol's bounds, or why not.
fn check_candidates(candidates: &[String]) -> Result<(), String> {
    if candidates.len() > fz_proto::MAX_CANDIDATES {
        return Err(format!(
            "{} candidates in one message; at most {}",
            candidates.len(),
            fz_proto::MAX_CANDIDATES
        ));
    }
    if candidates
        .iter()
        .any(|c| c.len() > fz_proto::MAX_CANDIDATE_LENGTH)
    {
        return Err(format!(
            "a candidate longer than {} characters",
            fz_proto::MAX_CANDIDATE_LENGTH
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::{session, signed};

    fn record(
        id: &str,
        detail: &GrantDetail<'_>,
        stored: (Option<String>, Option<String>),
    ) -> GrantRecord {
        GrantRecord {
            id: id.to_owned(),
            account: "acme".to_owned(),
            client_id: "c".to_owned(),
            gateway_id: "gw".to_owned(),
            resource_id: "db".to_owned(),
            rule_id: "r".to_owned(),
            bundle_hash: "h".to_owned(),
            issued_at: 0,
            expires_at: 100,
            detail: serde_json::to_string(detail).ok(),
            session_id: stored.0,
            session: stored.1,
        }
    }

    /// Grants stored with their session inside `detail` (before sessions were stored once)
    /// and grants naming a stored session are both restored; the grants of one stored session
    /// share it; a grant whose session is in neither place is not restored.
    #[test]
    fn grants_are_restored_with_their_session_inline_or_stored_once() {
        let table = DecisionTable::new(fz_compiler::table::Table::default());
        let alice = session("acme", "c");
        let (first, second, old) = (signed("g1", 100), signed("g2", 100), signed("g0", 100));
        let detail = |signed| GrantDetail {
            signed: Cow::Owned(signed),
            session: None,
            resolved: None,
        };
        let inline = GrantDetail {
            session: Some(Cow::Borrowed(alice.as_ref())),
            ..detail(old)
        };
        let mut sessions = RestoredSessions::new();

        let before = restored(&record("g0", &inline, (None, None)), &table, &mut sessions);
        assert_eq!(before.map(|g| g.session), Some(alice.clone()));

        let stored = stored_session(&alice);
        let one = restored(
            &record("g1", &detail(first), stored.clone()),
            &table,
            &mut sessions,
        )
        .expect("restored");
        let two = restored(
            &record("g2", &detail(second.clone()), stored),
            &table,
            &mut sessions,
        )
        .expect("restored");
        assert_eq!(one.session, alice);
        assert!(
            Arc::ptr_eq(&one.session, &two.session),
            "one session, shared"
        );

        let lost = restored(
            &record("g3", &detail(second), (None, None)),
            &table,
            &mut sessions,
        );
        assert_eq!(lost, None);
    }
}
