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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fz_compiler::DecisionTable;
use fz_proto::{
    ClientReady, DnsMapping, Grant, PortalSigningKey, PortalToClient, PortalToGateway,
    PresharedKey, PublicKey, Resolution, ResourceView, SignedGrant, UnixTime, encode,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::admission::{self, Admission, MAX_LOGGED_NAME};
use crate::config::AccountConfig;
use crate::geo::CountryDb;
use crate::policy::PolicyEngine;
use crate::random;
use crate::registry::{ClientEntry, ClientSession, GatewayEntry, LiveGrant, Registry, deletions};
use crate::store::{
    self, Decision as FlowDecision, GrantRecord, NewFlow, Store, TokenRecord, Write,
};
use crate::writer::Writer;

/// The clock the broker reads; tests move it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// How many messages may wait for a slow agent before the portal gives up on its connection.
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
    pub fn send<T: Serialize>(&self, message: &T) {
        if self.messages.try_send(encode(message)).is_err() {
            self.close();
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
    session: Cow<'a, ClientSession>,
}

/// A gateway's answer to a grant: installed (with what a DNS resource's name resolved to),
/// or refused and why.
type AckOutcome = Result<Option<Resolution>, String>;

#[derive(Debug)]
struct PendingAck {
    gateway_id: String,
    answer: oneshot::Sender<AckOutcome>,
}

pub struct Broker {
    store: Store,
    writer: Writer,
    key: PortalSigningKey,
    accounts: HashMap<String, Account>,
    geo: Option<CountryDb>,
    timings: Timings,
    clock: Clock,
    registry: Mutex<Registry<Link>>,
    pending: Mutex<HashMap<String, PendingAck>>,
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
        for account in &parts.accounts {
            let slug = &account.settings.slug;
            let policy = account.policy.current();
            for record in parts.store.active_grants(slug, now_i64(now)).await? {
                let detail = record
                    .detail
                    .as_deref()
                    .and_then(|d| serde_json::from_str::<GrantDetail>(d).ok());
                let Some(detail) = detail else {
                    tracing::warn!(grant = %record.id, "a stored grant lacks its detail; it runs to its expiry undecided");
                    continue;
                };
                let site = policy
                    .table
                    .resource_index(&record.resource_id)
                    .and_then(|r| admission::site_of(&policy.table, r));
                // A resource gone from the policy leaves no site: the first sweep withdraws it.
                registry.grant_added(live_grant(
                    &detail.signed,
                    Arc::new(detail.session.into_owned()),
                    site.unwrap_or_default(),
                ));
            }
        }
        Ok(Arc::new(Broker {
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
            registry: Mutex::new(registry),
            pending: Mutex::new(HashMap::new()),
        }))
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    pub fn store(&self) -> &Store {
        &self.store
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
    ) -> Result<(Arc<ClientSession>, u64, PortalToClient), BrokerError> {
        let account = self.account(&token.account)?;
        check_endpoints(&endpoints)?;
        let store::TokenKind::Client { user, provider } = &token.kind else {
            return Err(BrokerError::Refused(
                "this is not a client token".to_owned(),
            ));
        };
        let now = unix(self.now());
        let client = self
            .store
            .register_client(
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
        let stale = self.registry().grants_where(|g| {
            g.account == token.account
                && g.client_id == client.id
                && g.signed.grant.client.public_key != public_key
        });
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
                link,
                gateway_by_site: HashMap::new(),
            });
            if let Some(old) = replaced {
                old.close();
            }
            connection
        };
        let ready = PortalToClient::Ready(Box::new(ClientReady {
            client_id: client.id,
            tunnel_ipv4,
            tunnel_ipv6,
            resources,
        }));
        Ok((session, connection, ready))
    }

    pub fn client_closed(&self, client_id: &str, connection: u64) {
        self.registry().client_gone(client_id, connection);
    }

    /// Decides a connection request and answers it: a signed grant the gateway has
    /// acknowledged, or a rejection that says what failed. Either way the flow log has it.
    pub async fn request_access(
        &self,
        session: &Arc<ClientSession>,
        resource: &str,
        dns: Option<DnsMapping>,
        avoid: &[String],
    ) -> PortalToClient {
        match self.authorise(session, resource, dns, avoid).await {
            Ok((signed, resolved)) => PortalToClient::Granted {
                grant: Box::new(signed),
                resolved,
            },
            Err(reason) => PortalToClient::Rejected {
                resource: resource.to_owned(),
                reason,
            },
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
        };
        // A denial names the rule only when a deny rule made it (a guardrail); every other
        // denial (no rule, no gateway, a bad request) says why in its reason alone.
        let deny_with = |rule: Option<String>, reason: String| async move {
            let reason = cut(&reason, MAX_REASON);
            let write = Write::Flow(flow(FlowDecision::Deny, rule, reason.clone()));
            if let Err(error) = self.writer.submit(vec![write]).await {
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
        // Gateways that let this request's grant go unanswered (they stay in service).
        let mut silent: Vec<String> = Vec::new();
        loop {
            let gateway = {
                let registry = self.registry();
                registry
                    .select_gateway(&session.account, &site, &session.client_id, &tried, |n| {
                        random::index(n).unwrap_or(0)
                    })
                    .map(|g| (g.peer.clone(), g.link.clone()))
            };
            let Some((gateway, link)) = gateway else {
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
                } else if tried.len() == avoided && avoided > 0 {
                    format!(
                        "no healthy gateway in site `{site}` besides those the client could not reach"
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
                id: random::id("gr").map_err(|_| BrokerError::Unavailable.to_string())?,
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
            let resolved = match self.push_to_gateway(&gateway.id, &link, &signed).await {
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
                session: Cow::Borrowed(session.as_ref()),
            };
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
            };
            let reason = table.rule_notes(&decision.rules).join("; ");
            let writes = vec![
                Write::InsertGrant(record),
                Write::Flow(flow(FlowDecision::Allow, Some(rule.clone()), reason)),
            ];
            if let Err(error) = self.writer.submit(writes).await {
                // The gateway holds a grant the store does not: take it back.
                tracing::error!(error = %error, "cannot store a grant; withdrawing it");
                link.send(&PortalToGateway::Revoke {
                    grant_id: signed.grant.id.clone(),
                });
                return Err(BrokerError::Unavailable.to_string());
            }
            let grant_id = signed.grant.id.clone();
            self.registry()
                .grant_added(live_grant(&signed, session.clone(), site.clone()));
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
        link.send(&PortalToGateway::Grant {
            grant: Box::new(signed.clone()),
        });
        let outcome = tokio::time::timeout(self.timings.ack_timeout, answered).await;
        self.pending().remove(&signed.grant.id);
        match outcome {
            Ok(Ok(Ok(resolved))) => Ok(resolved),
            Ok(Ok(Err(reason))) => Err(GatewayAnswer::Refused(reason)),
            // The gateway's connection closed and dropped the sender; when it comes back, its
            // `ready` does not list the grant, so it drops whatever it made of it.
            Ok(Err(_)) => Err(GatewayAnswer::Gone),
            Err(_) => {
                link.send(&PortalToGateway::Revoke {
                    grant_id: signed.grant.id.clone(),
                });
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
        let record = self
            .store
            .register_gateway(
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
                healthy: true,
                connection,
                link,
            });
            if let Some(old) = replaced {
                old.close();
            }
            connection
        };
        tracing::info!(account = %token.account, gateway = %record.id, %site, "gateway in service");
        // A gateway that comes back (its connection dropped, or the portal restarted) gets the
        // grants it holds again, so both sides agree on what is in force.
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

    /// A heartbeat: the gateway is alive.
    pub async fn gateway_heartbeat(&self, account: &str, gateway_id: &str) {
        let now = now_i64(unix(self.now()));
        // The registry says whether it is in service; the heartbeat says it is alive.
        let healthy = self
            .registry()
            .gateway(gateway_id)
            .is_some_and(|g| g.healthy);
        let seen = Write::GatewaySeen {
            account: account.to_owned(),
            gateway_id: gateway_id.to_owned(),
            connected: healthy,
            at: now,
        };
        if let Err(error) = self.writer.submit(vec![seen]).await {
            tracing::warn!(error = %error, gateway = %gateway_id, "cannot record a heartbeat");
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
            let _ = p.answer.send(outcome);
        }
    }

    /// A gateway's connection closed (or missed its heartbeats): out of service at once.
    pub async fn gateway_closed(&self, account: &str, gateway_id: &str, connection: u64) {
        if !self.registry().gateway_gone(gateway_id, connection) {
            return;
        }
        // Grants waiting for it will not be acknowledged: let their requests try another.
        self.pending().retain(|_, p| p.gateway_id != gateway_id);
        // Its clients hear of it, so that one that hears nothing from it either leaves it
        // in seconds; its grants stay, as its tunnels may outlive its connection to us.
        let clients: Vec<Link> = {
            let registry = self.registry();
            let holding: HashSet<String> = registry
                .grants()
                .iter()
                .filter(|g| g.gateway_id == gateway_id)
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
        self.record_health(account, gateway_id, false).await;
        tracing::info!(%account, gateway = %gateway_id, "gateway out of service");
    }

    async fn record_health(&self, account: &str, gateway_id: &str, healthy: bool) {
        let now = now_i64(unix(self.now()));
        if let Err(error) = self
            .store
            .set_gateway_connected(account, gateway_id, healthy, now)
            .await
        {
            tracing::warn!(error = %error, gateway = %gateway_id, "cannot record gateway health");
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

    async fn withdraw(&self, ids: &[String], reason: impl Fn(&str) -> String) -> usize {
        if ids.is_empty() {
            return 0;
        }
        // Out of force first (no new decision can lean on them), then out of the store, then
        // the agents are told: whoever hears of a revocation can rely on the store having it.
        let withdrawn: Vec<Arc<LiveGrant>> = self.registry().withdraw(ids);
        let writes = deletions(&withdrawn);
        if let Err(error) = self.writer.submit(writes).await {
            tracing::error!(error = %error, "cannot delete withdrawn grants from the store");
        }
        let registry = self.registry();
        for grant in &withdrawn {
            let why = reason(&grant.id);
            tracing::info!(account = %grant.account, grant = %grant.id, client = %grant.client_id, reason = %why, "grant withdrawn");
            if let Some(gateway) = registry.gateway(&grant.gateway_id) {
                gateway.link.send(&PortalToGateway::Revoke {
                    grant_id: grant.id.clone(),
                });
            }
            if let Some(client) = registry.client(&grant.client_id) {
                client.link.send(&PortalToClient::Revoked {
                    grant_id: grant.id.clone(),
                    reason: why,
                });
            }
        }
        withdrawn.len()
    }

    /// Closes every agent connection (the portal is stopping).
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

fn live_grant(signed: &SignedGrant, session: Arc<ClientSession>, site: String) -> LiveGrant {
    let grant = &signed.grant;
    LiveGrant {
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
