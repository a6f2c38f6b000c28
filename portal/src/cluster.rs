//! What the replicas on one database tell each other: the cluster events the store keeps
//! (`cluster_events`, written in the transaction of the change they tell of), read by every
//! replica in order from where it started and applied by its broker
//! ([`Broker::cluster_events`]). They say that a client's session started on some replica, so
//! an older one of the same device, anywhere, ends; that a gateway connected to some replica,
//! so a stale connection of it elsewhere is dropped; that an identity provider named a user's
//! groups anew at a sign-in, so that user's grants are decided again wherever their devices
//! are connected; and they carry grants, their answers, withdrawals and ICE candidates between
//! a client and a gateway connected to different replicas (`broker/replicas.rs`).
//!
//! On PostgreSQL a `LISTEN` on the store's channel wakes the reader as soon as an event
//! commits; a tick each second reads anyway, so a notification missed while the listening
//! connection was down delays an event by a second at most and loses none. On SQLite (one
//! serving process) the tick alone reads, and finds nothing.
//!
//! Events older than [`RETENTION_SECS`] are deleted: a replica cut off from its database for
//! longer is not serving anyone anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;

use crate::broker::Broker;
use crate::store::{CLUSTER_CHANNEL, Database, Store};

/// How often the events are read without a notification.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Events read in one query.
const PAGE: u32 = 1_000;

/// How long events are kept.
pub const RETENTION_SECS: i64 = 24 * 3600;

/// How often old events are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Reads and applies the other replicas' events, from the newest there is when it starts,
/// for as long as the portal runs.
pub async fn follow(broker: Arc<Broker>, store: Store, database: Database) {
    let mut position = loop {
        match store.latest_cluster_event().await {
            Ok(position) => break position,
            Err(error) => {
                tracing::warn!(%error, "cannot read the cluster's events; trying again");
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    };
    let mut listener = match &database {
        Database::Postgres(url) => listen(url).await,
        Database::Sqlite => None,
    };
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = Instant::now();
    loop {
        match listener.as_mut() {
            Some(notifications) => tokio::select! {
                _ = ticks.tick() => {}
                heard = notifications.recv() => if let Err(error) = heard {
                    // sqlx connects it again at the next `recv`; until then the tick reads.
                    tracing::debug!(%error, "the cluster's notifications were interrupted");
                    ticks.tick().await;
                },
            },
            None => {
                ticks.tick().await;
            }
        }
        position = read(&broker, &store, position).await;
        if pruned.elapsed() >= PRUNE_INTERVAL {
            pruned = Instant::now();
            let before = broker.clock().timestamp() - RETENTION_SECS;
            if let Err(error) = store.prune_cluster_events(before).await {
                tracing::warn!(%error, "cannot delete old cluster events");
            }
        }
    }
}

/// A connection that hears the store's notifications, or `None` (the tick reads alone).
async fn listen(url: &str) -> Option<PgListener> {
    let listening = async {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CLUSTER_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listening.await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for the cluster's events; reading them each second");
            None
        }
    }
}

/// Applies the events after `position`, page by page; returns the new position.
async fn read(broker: &Arc<Broker>, store: &Store, mut position: i64) -> i64 {
    loop {
        match store.cluster_events_after(position, PAGE).await {
            Ok(events) => {
                let applied = broker.cluster_events(&events).await;
                if let Some(last) = applied.checked_sub(1).and_then(|i| events.get(i)) {
                    position = last.id;
                }
                // Done, or one could not be applied now: the next tick reads it again.
                if applied < events.len() || events.len() < PAGE as usize {
                    return position;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the cluster's events");
                return position;
            }
        }
    }
}
