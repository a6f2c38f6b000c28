//! The broker's side of the replicas on one database: applying what the others said
//! ([`Broker::cluster_events`]), and saying what they must act on, for agents whose
//! connections are elsewhere.
//!
//! A client and its gateway may be connected to different replicas. The replica holding the
//! client decides its grants, as it would alone; what must reach the other agent travels as a
//! cluster event, written with the writer's batch (so in the transaction of the change it tells
//! of) and read by every replica, which acts only for the connections it holds:
//! - a grant for a gateway on another replica is *offered* to it; the replica holding the
//!   gateway sends it, waits for the gateway as for its own grants, keeps the grant in its own
//!   registry once installed (it decides it again and withdraws it from the gateway, as it would
//!   a grant of a gateway that re-homed there), and *answers*;
//! - a withdrawal of grants whose gateway or client is connected elsewhere is announced; the
//!   replicas holding those connections tell them and drop their own copies;
//! - ICE candidates go to the peer's replica the same way;
//! - a gateway's lost connection is announced, for the clients of its grants elsewhere.
//!
//! Nothing here writes what it reads back: an event read twice sends a message twice, which
//! agents ignore (a revocation of a grant they do not hold, candidates they already tried).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fz_proto::{GatewayPeer, PortalToClient, PortalToGateway, PublicKey, Resolution, SignedGrant};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    Broker, GatewayAnswer, Link, LiveGrant, PairReservation, PendingAck, live_grant, now_i64, unix,
};
use crate::random;
use crate::registry::ClientSession;
use crate::store::{self, ClusterEventKind, Write};

/// How much longer than the gateway's own ack timeout a replica waits for an answer from
/// another: the time an event takes to be read there and the answer back here, when the
/// notification is lost and the readers' one-second tick carries them.
const RELAY_MARGIN: Duration = Duration::from_secs(2);

/// The most withdrawn grants one event names.
const WITHDRAWN_PER_EVENT: usize = 256;

/// Where a chosen gateway's connection is.
#[derive(Debug, Clone)]
pub(super) enum Route {
    /// On this replica.
    Here(Link),
    /// On the replica of this id.
    Replica(String),
}

/// A grant offered to the replica holding its gateway (`grant-offered`).
#[derive(Serialize, Deserialize)]
struct Offer<'a> {
    /// The replica the store named as the gateway's: it answers even when it no longer holds
    /// the gateway, so that the request tries another at once.
    replica: Cow<'a, str>,
    signed: Cow<'a, SignedGrant>,
    session: Cow<'a, ClientSession>,
}

/// The gateway's answer to an offered grant (`grant-answered`).
#[derive(Serialize, Deserialize)]
struct Answer {
    gateway_id: String,
    outcome: Result<Option<Resolution>, GatewayAnswer>,
}

/// One grant of a `grants-withdrawn` event.
#[derive(Serialize, Deserialize)]
struct Withdrawn {
    grant_id: String,
    client_id: String,
    gateway_id: String,
    reason: String,
}

/// ICE candidates for an agent on another replica (`candidates`), from its peer.
#[derive(Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub(super) enum Candidates {
    Client {
        client_id: String,
        candidates: Vec<String>,
    },
    Gateway {
        gateway_id: String,
        candidates: Vec<String>,
    },
}

/// What [`Broker::withdraw`] tells agents on other replicas, as the writes that say it.
#[derive(Default)]
pub(super) struct Elsewhere {
    account_grants: HashMap<String, Vec<Withdrawn>>,
}

impl Elsewhere {
    /// `grant`, withdrawn for `reason`, has its client or gateway on another replica.
    pub(super) fn add(&mut self, grant: &LiveGrant, reason: String) {
        self.account_grants
            .entry(grant.account.clone())
            .or_default()
            .push(Withdrawn {
                grant_id: grant.id.clone(),
                client_id: grant.client_id.clone(),
                gateway_id: grant.gateway_id.clone(),
                reason,
            });
    }

    /// The events that say it, at `at`.
    pub(super) fn announcements(self, at: i64) -> Vec<Write> {
        let mut writes = Vec::new();
        for (account, grants) in self.account_grants {
            for chunk in grants.chunks(WITHDRAWN_PER_EVENT) {
                if let Ok(detail) = serde_json::to_string(chunk) {
                    writes.push(Write::Announce {
                        account: account.clone(),
                        kind: ClusterEventKind::GrantsWithdrawn,
                        subject: String::new(),
                        detail,
                        at,
                    });
                }
            }
        }
        writes
    }
}

impl Broker {
    /// What other replicas said (cluster events, oldest first): a session of a client of ours
    /// that started after ours, elsewhere, ends ours (one live session per device); a user's
    /// groups named anew by a sign-in elsewhere have their grants here decided again; grants,
    /// their answers, withdrawals and candidates for agents connected here reach them, and so
    /// does the loss of a gateway whose grants clients here hold. Events of this replica's own
    /// are skipped (it acted when it wrote them); an event read twice changes nothing the
    /// second time.
    ///
    /// Returns how many of `events` were applied, in order: fewer than all when the store
    /// could not be read for one, which is then to be given again (with those after it).
    pub async fn cluster_events(self: &Arc<Self>, events: &[store::ClusterEvent]) -> usize {
        for (applied, event) in events.iter().enumerate() {
            if event.origin == self.replica {
                continue;
            }
            match event.kind {
                ClusterEventKind::ClientConnected => self.session_moved(event),
                ClusterEventKind::GatewayConnected => self.gateway_moved(event),
                ClusterEventKind::MembershipsChanged => {
                    let Some(provider) = &event.detail else {
                        continue;
                    };
                    let groups: Vec<String> = match self
                        .store
                        .memberships(&event.account, &event.subject)
                        .await
                    {
                        Ok(memberships) => memberships
                            .into_iter()
                            .filter(|m| &m.provider == provider)
                            .map(|m| m.group)
                            .collect(),
                        Err(error) => {
                            tracing::warn!(%error, user = %event.subject, "cannot read the groups a sign-in elsewhere named; trying again");
                            return applied;
                        }
                    };
                    self.idp_groups_changed(&event.account, &event.subject, provider, &groups)
                        .await;
                }
                ClusterEventKind::GrantOffered => self.offered(event),
                ClusterEventKind::GrantAnswered => self.answered_elsewhere(event),
                ClusterEventKind::GrantsWithdrawn => self.withdrawn_elsewhere(event).await,
                ClusterEventKind::Candidates => self.candidates_from_elsewhere(event),
                ClusterEventKind::GatewayDown => {
                    if !self.gateway_down_elsewhere(event).await {
                        return applied;
                    }
                }
            }
        }
        events.len()
    }

    /// Gateway `event.subject` connected elsewhere after it connected here: our connection of
    /// it is stale (a replica learns of a dead TCP connection only from missed heartbeats), so
    /// it is dropped and closed. Nothing is written: the store's `connected` is the new
    /// replica's to keep, and the gateway's clients here are not told it is down, since it
    /// is not and their tunnels to it run on.
    fn gateway_moved(&self, event: &store::ClusterEvent) {
        let connection = {
            let mut registry = self.registry();
            let older = registry
                .gateway(&event.subject)
                .filter(|entry| entry.account == event.account && entry.announced < event.id);
            let Some(older) = older else {
                return;
            };
            let connection = older.connection;
            older.link.close();
            registry.gateway_gone(&event.subject, connection);
            connection
        };
        // Grants waiting for its acknowledgement here will not get it: their requests fail
        // over as for a gateway that went away.
        self.pending().retain(|_, p| p.gateway_id != event.subject);
        tracing::info!(
            account = %event.account,
            gateway = %event.subject,
            connection,
            replica = %event.origin,
            "gateway connection dropped: the gateway connected to another replica"
        );
    }

    /// A session of `event.subject` started elsewhere after ours: ours ends.
    fn session_moved(&self, event: &store::ClusterEvent) {
        let mut registry = self.registry();
        let older = registry
            .client(&event.subject)
            .filter(|entry| entry.session.account == event.account && entry.announced < event.id);
        let Some(older) = older else {
            return;
        };
        let connection = older.connection;
        older.link.close();
        registry.client_gone(&event.subject, connection);
        tracing::info!(
            account = %event.account,
            client = %event.subject,
            replica = %event.origin,
            "client session closed: the device connected to another replica"
        );
    }

    // ---- choosing a gateway on another replica ----

    /// A gateway of `site` connected to another replica and heard from within a heartbeat
    /// timeout, not one of `tried`, picked at random: for a request this replica holds no
    /// gateway for. `None` when there is none (or the store cannot say).
    pub(super) async fn gateway_elsewhere(
        &self,
        account: &str,
        site: &str,
        tried: &HashSet<String>,
    ) -> Option<(GatewayPeer, Route)> {
        let usable: Vec<(GatewayPeer, Route)> = self
            .gateways_elsewhere(account, site)
            .await
            .into_iter()
            .filter(|(peer, _)| !tried.contains(&peer.id))
            .collect();
        let index = random::index(usable.len()).ok()?;
        usable.into_iter().nth(index)
    }

    /// The gateways of `site` other replicas hold and have heard from within a heartbeat
    /// timeout, with the way to each; none when the store cannot say.
    pub(super) async fn gateways_elsewhere(
        &self,
        account: &str,
        site: &str,
    ) -> Vec<(GatewayPeer, Route)> {
        let timeout = i64::try_from(self.timings.heartbeat_timeout().as_secs()).unwrap_or(i64::MAX);
        let heard_since = now_i64(unix(self.now())).saturating_sub(timeout);
        let found = match self
            .store
            .gateways_elsewhere(account, site, heard_since)
            .await
        {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "cannot read the gateways of other replicas");
                return Vec::new();
            }
        };
        found
            .into_iter()
            .filter_map(|g| {
                let public_key: PublicKey = g.public_key.parse().ok()?;
                let endpoints = g.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
                let peer = GatewayPeer {
                    id: g.id,
                    public_key,
                    endpoints,
                };
                Some((peer, Route::Replica(g.replica?)))
            })
            .collect()
    }

    // ---- a grant through another replica ----

    /// Offers a grant to the replica holding its gateway and waits for the gateway's answer,
    /// as [`Broker::push_to_gateway`] does for a gateway here. An offer nobody answers in time
    /// is withdrawn, so that a late install is undone.
    pub(super) async fn offer_to_replica(
        &self,
        replica: &str,
        signed: &SignedGrant,
        session: &ClientSession,
    ) -> Result<Option<Resolution>, GatewayAnswer> {
        let grant = &signed.grant;
        let offer = Offer {
            replica: Cow::Borrowed(replica),
            signed: Cow::Borrowed(signed),
            session: Cow::Borrowed(session),
        };
        let Ok(detail) = serde_json::to_string(&offer) else {
            return Err(GatewayAnswer::Gone);
        };
        let (answer, answered) = oneshot::channel();
        self.pending().insert(
            grant.id.clone(),
            PendingAck {
                gateway_id: grant.gateway.id.clone(),
                answer,
            },
        );
        let at = now_i64(unix(self.now()));
        let offered = Write::Announce {
            account: grant.account.clone(),
            kind: ClusterEventKind::GrantOffered,
            subject: grant.gateway.id.clone(),
            detail,
            at,
        };
        if let Err(error) = self.writer.submit(vec![offered]).await {
            tracing::error!(%error, "cannot offer a grant to another replica");
            self.pending().remove(&grant.id);
            return Err(GatewayAnswer::Gone);
        }
        let patience = self.timings.ack_timeout + RELAY_MARGIN;
        let outcome = tokio::time::timeout(patience, answered).await;
        self.pending().remove(&grant.id);
        match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(GatewayAnswer::Gone),
            Err(_) => {
                self.take_back_elsewhere(signed, "the gateway did not answer in time")
                    .await;
                Err(GatewayAnswer::Silent)
            }
        }
    }

    /// Withdraws, at its gateway on another replica, a grant that is in force nowhere here.
    pub(super) async fn take_back_elsewhere(&self, signed: &SignedGrant, reason: &str) {
        let grant = &signed.grant;
        let withdrawn = [Withdrawn {
            grant_id: grant.id.clone(),
            client_id: grant.client.id.clone(),
            gateway_id: grant.gateway.id.clone(),
            reason: reason.to_owned(),
        }];
        let Ok(detail) = serde_json::to_string(&withdrawn) else {
            return;
        };
        let announce = Write::Announce {
            account: grant.account.clone(),
            kind: ClusterEventKind::GrantsWithdrawn,
            subject: String::new(),
            detail,
            at: now_i64(unix(self.now())),
        };
        if let Err(error) = self.writer.submit(vec![announce]).await {
            tracing::error!(%error, grant = %grant.id, "cannot withdraw a grant from another replica's gateway");
        }
    }

    /// Another replica offers a grant for a gateway: sent to the gateway if it is connected
    /// here (its grant names the key of this connection), answered `Gone` by the replica the
    /// offer names when it is not, ignored by the rest.
    fn offered(self: &Arc<Self>, event: &store::ClusterEvent) {
        let Some(offer) = parse::<Offer>(event) else {
            return;
        };
        let grant = &offer.signed.grant;
        if grant.gateway.id != event.subject || grant.account != event.account {
            tracing::warn!(grant = %grant.id, "an offered grant names another gateway or account than its event; ignored");
            return;
        }
        let here = self
            .registry()
            .gateway(&event.subject)
            .filter(|g| g.account == event.account && g.peer.public_key == grant.gateway.public_key)
            .map(|g| (g.link.clone(), g.site.clone()));
        let broker = self.clone();
        match here {
            Some((link, site)) => {
                let signed = offer.signed.into_owned();
                let session = Arc::new(offer.session.into_owned());
                tokio::spawn(async move { broker.relay(link, site, signed, session).await });
            }
            None if offer.replica == *self.replica => {
                let (account, grant_id) = (grant.account.clone(), grant.id.clone());
                let gateway_id = grant.gateway.id.clone();
                tokio::spawn(async move {
                    let outcome = Err(GatewayAnswer::Gone);
                    broker.answer(account, grant_id, gateway_id, outcome).await;
                });
            }
            None => {}
        }
    }

    /// Sends an offered grant to its gateway here and answers with what the gateway said.
    /// While it is being made the pair is reserved here, so that the gateway's candidates
    /// reach the client; once installed, the grant is in force here too.
    async fn relay(
        self: Arc<Self>,
        link: Link,
        site: String,
        signed: SignedGrant,
        session: Arc<ClientSession>,
    ) {
        let grant = &signed.grant;
        let key = grant.preshared_key.clone();
        let reservation = PairReservation::new(&self, &grant.client.id, &grant.gateway.id, key);
        let outcome = self
            .push_to_gateway(&grant.gateway.id, &link, &signed)
            .await;
        if let Ok(resolved) = &outcome {
            self.registry()
                .grant_added(live_grant(&signed, session, site, *resolved));
        }
        drop(reservation);
        let (account, grant_id) = (grant.account.clone(), grant.id.clone());
        self.answer(account, grant_id, grant.gateway.id.clone(), outcome)
            .await;
    }

    async fn answer(
        &self,
        account: String,
        grant_id: String,
        gateway_id: String,
        outcome: Result<Option<Resolution>, GatewayAnswer>,
    ) {
        let Ok(detail) = serde_json::to_string(&Answer {
            gateway_id,
            outcome,
        }) else {
            return;
        };
        let answered = Write::Announce {
            account,
            kind: ClusterEventKind::GrantAnswered,
            subject: grant_id,
            detail,
            at: now_i64(unix(self.now())),
        };
        if let Err(error) = self.writer.submit(vec![answered]).await {
            tracing::error!(%error, "cannot answer another replica's grant");
        }
    }

    /// A gateway on another replica answered a grant offered from here.
    fn answered_elsewhere(&self, event: &store::ClusterEvent) {
        let Some(answer) = parse::<Answer>(event) else {
            return;
        };
        let mut pending = self.pending();
        if pending
            .get(&event.subject)
            .is_some_and(|p| p.gateway_id == answer.gateway_id)
            && let Some(p) = pending.remove(&event.subject)
        {
            let _ = p.answer.send(answer.outcome);
        }
    }

    /// Grants another replica withdrew: out of force here too, and the agents connected here
    /// that hold them are told.
    async fn withdrawn_elsewhere(&self, event: &store::ClusterEvent) {
        let Some(withdrawn) = parse::<Vec<Withdrawn>>(event) else {
            return;
        };
        let ids: Vec<String> = withdrawn.iter().map(|w| w.grant_id.clone()).collect();
        let mut to_gateways: HashMap<String, (Link, Vec<String>)> = HashMap::new();
        let mut to_clients: HashMap<String, (Link, Vec<PortalToClient>)> = HashMap::new();
        {
            let mut registry = self.registry();
            registry.withdraw(&ids);
            for grant in withdrawn {
                if let Some(gateway) = registry
                    .gateway(&grant.gateway_id)
                    .filter(|g| g.account == event.account)
                {
                    to_gateways
                        .entry(grant.gateway_id.clone())
                        .or_insert_with(|| (gateway.link.clone(), Vec::new()))
                        .1
                        .push(grant.grant_id.clone());
                }
                if let Some(client) = registry
                    .client(&grant.client_id)
                    .filter(|c| c.session.account == event.account)
                {
                    to_clients
                        .entry(grant.client_id.clone())
                        .or_insert_with(|| (client.link.clone(), Vec::new()))
                        .1
                        .push(PortalToClient::Revoked {
                            grant_id: grant.grant_id,
                            reason: grant.reason,
                        });
                }
            }
        }
        self.tell(to_gateways, to_clients).await;
    }

    /// Gateway `event.subject` lost its connection to another replica: the clients here that
    /// hold its grants are told, as that replica told its own, unless the gateway is
    /// connected again (here, or anywhere by the store's mark, which the event's replica wrote
    /// with it and a newer connection overwrites). False when the store could not be read:
    /// the event is to be given again.
    async fn gateway_down_elsewhere(&self, event: &store::ClusterEvent) -> bool {
        let here = self
            .registry()
            .gateway(&event.subject)
            .is_some_and(|gateway| gateway.account == event.account);
        if here {
            return true;
        }
        match self.store.gateway(&event.account, &event.subject).await {
            Ok(Some(gateway)) if gateway.connected => {}
            Ok(_) => self.tell_gateway_down(&event.account, &event.subject),
            Err(error) => {
                tracing::warn!(%error, gateway = %event.subject, "cannot read whether a gateway lost elsewhere is back; trying again");
                return false;
            }
        }
        true
    }

    // ---- candidates ----

    /// Sends candidates to an agent on another replica. False on a store no other replica
    /// shares: the agent is connected nowhere then.
    pub(super) fn candidates_elsewhere(
        &self,
        account: &str,
        to: &str,
        candidates: Candidates,
    ) -> bool {
        if !self.store.shared() {
            return false;
        }
        let Ok(detail) = serde_json::to_string(&candidates) else {
            return false;
        };
        let sent = self.writer.submit(vec![Write::Announce {
            account: account.to_owned(),
            kind: ClusterEventKind::Candidates,
            subject: to.to_owned(),
            detail,
            at: now_i64(unix(self.now())),
        }]);
        tokio::spawn(async move {
            if let Err(error) = sent.await {
                tracing::warn!(%error, "cannot send candidates to another replica");
            }
        });
        true
    }

    /// Candidates from an agent on another replica (which checked that a grant joins the two)
    /// for an agent connected here.
    fn candidates_from_elsewhere(&self, event: &store::ClusterEvent) {
        let Some(candidates) = parse::<Candidates>(event) else {
            return;
        };
        let registry = self.registry();
        match candidates {
            Candidates::Client {
                client_id,
                candidates,
            } => {
                if let Some(gateway) = registry
                    .gateway(&event.subject)
                    .filter(|g| g.account == event.account)
                {
                    gateway.link.send(&PortalToGateway::Candidates {
                        client_id,
                        candidates,
                    });
                }
            }
            Candidates::Gateway {
                gateway_id,
                candidates,
            } => {
                if let Some(client) = registry
                    .client(&event.subject)
                    .filter(|c| c.session.account == event.account)
                {
                    client.link.send(&PortalToClient::Candidates {
                        gateway_id,
                        candidates,
                    });
                }
            }
        }
    }
}

/// The detail of a cluster event as its kind says; `None` (logged) when it does not parse.
fn parse<'a, T: Deserialize<'a>>(event: &'a store::ClusterEvent) -> Option<T> {
    let parsed = event
        .detail
        .as_deref()
        .map(serde_json::from_str::<T>)
        .transpose();
    match parsed {
        Ok(Some(value)) => Some(value),
        Ok(None) | Err(_) => {
            tracing::warn!(event = event.id, kind = ?event.kind, "a cluster event's detail does not parse; ignored");
            None
        }
    }
}
