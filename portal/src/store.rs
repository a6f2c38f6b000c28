//! The portal's state store: accounts, users and the groups identity providers say they are in,
//! client and gateway tokens, registered clients and gateways, active grants and the flow log,
//! kept in one SQLite file (`portal.sqlite3`) in the data dir, the embedded default, or in a
//! PostgreSQL database ([`Database`]), through sqlx's any-driver: one text of each query serves
//! both (placeholders `$N`, flags as 0/1 integers), and the dialects differ only in how a store
//! is opened, how a write transaction begins and what a checkpoint does. Each backend's schema
//! is in `portal/migrations/<backend>/`, embedded and applied by [`Store::open_in`].
//!
//! What it does not do: it never reads the clock (every method that needs the time takes `now`,
//! Unix seconds), decides nothing about policy, signs no grant, pushes nothing, and keeps no
//! token: a token's fragment is handed out once by [`Store::create_token`] (or
//! [`Store::create_signed_in_token`]) and only a salted hash of it, with the client's nonce,
//! is stored (`credential`; the token key that authenticates fragments is read from the data
//! dir). Health of gateways beyond the `connected` flag and `last_seen` time is
//! the portal's business.
//!
//! The one secret it keeps is each grant in force's client–gateway preshared key, inside the
//! grant's `detail` (the signed grant, which covers the key, so that a portal that restarts
//! can send a reconnecting gateway the very grant its client holds). It lives as long as the
//! grant's row: the row is deleted when the grant is withdrawn or expires, `secure_delete`
//! overwrites the deleted bytes in the database file, and [`Store::checkpoint`] empties the
//! write-ahead log that still holds them (the portal runs it every minute, and at stop). The
//! files are the portal user's alone (`data_dir`).
//!
//! Entry types: [`Store`] (open it with [`Store::open`]) and [`StoreError`]; the records it
//! stores and returns are [`TokenRecord`], [`ClientRecord`], [`GatewayRecord`],
//! [`GrantRecord`] and [`FlowRecord`] (written as a [`NewFlow`], counted again with
//! [`Write::DenialRepeated`] and [`Write::GrantReused`], queried with a [`FlowFilter`], deleted
//! by age with [`Store::prune_flows`]).
//!
//! **Architecture Invariant:** accounts are isolated. Every row belongs to an account, every
//! method takes the account slug and filters by it, and every reference between rows carries
//! the account (composite foreign keys), so nothing of one account is visible or usable through
//! another. The one method without an account, [`Store::authenticate`], finds the account from
//! the secret.
//!
//! **Architecture Invariant:** a restart loses nothing and a crash leaves a consistent store:
//! WAL journal with `synchronous = FULL`, and every write of more than one statement runs in
//! one `BEGIN IMMEDIATE` transaction (immediate so that two writers queue on the busy timeout
//! instead of failing on a lock upgrade). On PostgreSQL such a transaction takes one advisory
//! lock first (`POSTGRES_WRITE_LOCK`), so writers of every replica take turns as SQLite's
//! do. Within one process, writers take turns first come
//! first served (`Store`'s `writes`), so that the busy handler's sleep-and-retry never starves
//! one of them.
//!
//! **API Boundary:** error messages name the entity, never SQL, so [`StoreError`]'s `Display`
//! may be shown to HTTP clients for [`StoreError::NotFound`], [`StoreError::Conflict`] and
//! [`StoreError::Invalid`]; the other variants carry their cause as `source()` for logs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fz_proto::PathKind;
use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{
    Any, AnyConnection, AnyPool, ConnectOptions as _, Executor as _, FromRow as _, Transaction,
};
use subtle::ConstantTimeEq as _;

use crate::credential::{self, IssueError, Label, TokenKey};
use crate::data_dir::{self, Creation, DataDirError};
use crate::keys::{self, KeyFileError, KeyFiles};
use crate::random;

/// The database file's name inside the data dir.
pub const DATABASE_FILE: &str = "portal.sqlite3";

/// Client tunnel addresses come from 100.64.0.0/11: 2^21 addresses, less the network's first
/// and last.
pub const MAX_TUNNEL_INDEX: u32 = (1 << 21) - 2;

/// A client's tunnel addresses, from its index: 100.64.0.0/11 and fd00:2021:1111::/107.
pub fn tunnel_addresses(index: u32) -> (Ipv4Addr, Ipv6Addr) {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + index);
    let v6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, 0)) + u128::from(index),
    );
    (v4, v6)
}

/// Rows per multi-row statement in [`Store::apply`]: 12 columns each stays far below SQLite's
/// limit of 32,766 bound parameters.
pub const ROWS_PER_STATEMENT: usize = 500;

/// Connections per store: one for transactions ([`Store`]'s `transactions`) and the rest for
/// reads and single-statement writes. SQLite has one writer at a time and a few connections
/// let reads run beside it; on PostgreSQL it is what one replica may take of the server's
/// `max_connections` (with one more that listens: `cluster`), so that many replicas, each
/// reconnecting its agents at once, stay within the server's budget.
pub const MAX_CONNECTIONS: u32 = 8;

/// How long a query waits for a free connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Each backend's schema: the same tables, columns and constraints (the store's queries are
/// one text for both), written in each one's dialect.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// What every SQLite connection is set to (see the module doc for why), with
/// [`SQLITE_BUSY_TIMEOUT`]. `secure_delete`: deleted rows are overwritten with zeros, not left
/// in free space, so a withdrawn grant's preshared key does not stay in the file (the log keeps
/// it until the next checkpoint: see [`Store::checkpoint`]).
const SQLITE_SETTINGS: &str = "PRAGMA foreign_keys = ON;
     PRAGMA journal_mode = WAL;
     PRAGMA synchronous = FULL;
     PRAGMA secure_delete = ON;";

/// How long a writer waits for one in another process (an admin command) before giving up.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000;";

/// How long the fold's restarting checkpoint ([`Store::fold_log`]) waits, instead: it holds
/// off this process's writer for as long as it waits (for the writer's commit, then for
/// readers to leave the log), and one reader slow to leave must not stall every grant for
/// 10 s. A restart that runs out of patience is simply tried again at the next fold. The
/// checkpoint that empties the log ([`Store::checkpoint`]) waits as long as any writer: what
/// it removes from the files (withdrawn grants' keys) must not be put off by a busy moment.
const SQLITE_CHECKPOINT_PATIENCE: &str = "PRAGMA busy_timeout = 50;";

/// How long [`Store::checkpoint`] goes on trying while another checkpoint is in its way, and
/// how often it tries.
const CHECKPOINT_PATIENCE: Duration = Duration::from_secs(10);
const CHECKPOINT_RETRY: Duration = Duration::from_millis(10);

/// What the transactions' connection adds on SQLite: it never copies the log into the database
/// file itself. SQLite's default does it in the commit that takes the log past 1,000 pages, so
/// that commit, and every answer waiting on its batch, waits for the copy and the file's sync;
/// [`Store::fold_log`] does it beside the writer instead.
const SQLITE_WRITER_SETTINGS: &str = "PRAGMA wal_autocheckpoint = 0;";

/// The PostgreSQL advisory lock every write transaction takes first: writers of all replicas
/// take turns, as SQLite's do, so that a transaction that reads before it writes (the next
/// tunnel index, the next verified-mark number) sees every write committed before it.
const POSTGRES_WRITE_LOCK: i64 = 0x667a_7374_6f72_6521;

/// Where the store keeps its rows.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// One SQLite file in the data dir ([`DATABASE_FILE`]): the embedded default.
    Sqlite,
    /// A PostgreSQL database (a `postgres://` URL), which any number of portal replicas share.
    Postgres(String),
}

impl fmt::Debug for Database {
    /// Never the URL: it may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Database::Sqlite => "Sqlite",
            Database::Postgres(_) => "Postgres(..)",
        })
    }
}

/// Which dialect a store's database speaks, where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The portal's state: a handle on a pool of connections to one SQLite file or one PostgreSQL
/// database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// For reads and single-statement writes.
    pool: AnyPool,
    /// One connection, for the writes of more than one statement ([`Store::begin_write`]):
    /// the writer's batches, which take their turn one after another anyway, never wait for
    /// a connection behind the reads of a busy portal.
    transactions: AnyPool,
    backend: Backend,
    /// This process among those on one database: the origin of the cluster events it writes.
    replica: Arc<str>,
    /// Whose turn it is to write. SQLite takes one writer at a time, and its busy handler
    /// makes the others sleep and retry, which starves a lone write (a client's hello) behind
    /// a steady stream of batches; writers of this process queue here instead, first come
    /// first served, and meet the busy handler only against other processes (admin commands).
    writes: Arc<tokio::sync::Mutex<()>>,
    /// How many secrets [`Store::authenticate`] checked (see [`Store::token_checks`]).
    token_checks: Arc<AtomicU64>,
    /// Makes and reads token fragments (`credential`).
    token_key: Arc<TokenKey>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data dir could not be created, or it (or a file of the portal's in it) is open to
    /// group or others.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The database file could not be opened or created.
    #[error("cannot open the store `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// The PostgreSQL database could not be reached, or refused us.
    #[error("cannot connect to the store's PostgreSQL database `{server}`")]
    Connect {
        /// Host, port and database, without user or password.
        server: String,
        #[source]
        source: sqlx::Error,
    },
    /// The PostgreSQL database has no store yet, and this command may not make one.
    #[error(
        "the PostgreSQL database `{0}` holds no fz store: `fz-portal init` (or `fz-portal serve`) makes it"
    )]
    Uninitialized(String),
    /// The schema could not be brought up to date (or the file is from a newer portal).
    #[error("cannot bring the store's schema up to date")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed for a reason other than the ones below (IO, a busy database, a row the
    /// store cannot read). The cause is in `source()`, for logs only.
    #[error("a store query failed")]
    Query(#[from] sqlx::Error),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// The token key cannot be read or made.
    #[error(transparent)]
    TokenKey(#[from] KeyFileError),
    /// The entity does not exist in this account.
    #[error("{0} not found")]
    NotFound(Entity),
    /// The entity exists but is in a state that forbids the operation.
    #[error("{entity} {reason}")]
    Conflict {
        entity: Entity,
        /// Says what is wrong, as a phrase that follows the entity's name.
        reason: &'static str,
    },
    /// An argument is not acceptable (names what).
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// The kinds of thing the store keeps, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Account,
    User,
    Token,
    Client,
    Gateway,
    Grant,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Account => "account",
            Entity::User => "user",
            Entity::Token => "token",
            Entity::Client => "client",
            Entity::Gateway => "gateway",
            Entity::Grant => "grant",
        })
    }
}

/// What a token may be used for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenKind {
    /// Registers and connects one client device, for one user (email, stored lowercase).
    Client {
        user: String,
        /// The identity provider that signed the user in; `None` for a token an admin minted.
        provider: Option<String>,
    },
    /// Registers and connects one gateway, in this site.
    Gateway { site: String },
}

/// A token just created: the only time its secret exists outside the holder.
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken {
    pub id: String,
    /// What is handed out: the fragment (`credential`), which for a token an admin made is the
    /// whole token and for one made at a sign-in is the token less the client's nonce.
    pub secret: String,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .field("secret", &"<secret>")
            .finish()
    }
}

/// A token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub id: String,
    pub account: String,
    #[serde(flatten)]
    pub kind: TokenKind,
    pub name: String,
    pub created_at: i64,
    /// The token is refused from this time on.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// When it became usable; `None` for a token made inactive whose maker never activated
    /// it (see [`Store::create_inactive_token`]), which is refused everywhere.
    pub activated_at: Option<i64>,
    /// Made at the user's own sign-in ([`Store::create_signed_in_token`]); `false` for a token
    /// an admin made (a gateway's, or a service account's client token).
    pub signed_in: bool,
    /// For a token made at an OpenID Connect sign-in: the person as the provider names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// What a token made at a sign-in is bound to and speaks for, beyond its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedIn<'a> {
    /// The nonce the client drew (`credential`): only `nonce ‖ fragment` is accepted.
    pub nonce: &'a str,
    /// The person as an OpenID Connect provider names them: (issuer, subject).
    pub identity: Option<(&'a str, &'a str)>,
}

/// A registered client device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientRecord {
    pub id: String,
    pub account: String,
    pub token_id: String,
    /// The name of the token it registered with.
    pub name: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// An admin marked this device verified and it still holds the key the mark was given
    /// for (`verified_key` is `public_key`).
    pub verified: bool,
    /// The key the admin's mark was given for, if the client is marked: a client that
    /// registers with another key keeps the mark but is not verified until it comes back with
    /// this one.
    pub verified_key: Option<String>,
    pub created_at: i64,
    /// The client's place in the tunnel network (see [`tunnel_addresses`]); `None` for a
    /// client that has not connected since the store learnt tunnel addresses.
    pub tunnel_index: Option<u32>,
    /// When it last said hello (Unix seconds); `None` if not since the store kept this.
    pub last_connected_at: Option<i64>,
}

impl ClientRecord {
    /// Whether a request or grant made for the device with `key` may count on the verified
    /// mark: the client is verified and `key` is its current key (the one the mark was given
    /// for), not a key it held before or another machine's.
    pub fn verified_for(&self, key: &fz_proto::PublicKey) -> bool {
        self.verified && self.public_key == key.to_string()
    }
}

/// A registered gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayRecord {
    pub id: String,
    pub account: String,
    /// The site of the token it registered with.
    pub site: String,
    pub token_id: String,
    /// The name of the token it registered with.
    pub name: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Socket addresses the gateway reported, as text.
    pub endpoints: Vec<String>,
    pub created_at: i64,
    /// When the portal last heard from it (registration or `set_gateway_connected(.., true, ..)`).
    pub last_seen: i64,
    pub connected: bool,
    /// The replica ([`Store::replica`]) whose connection it is on, or was on last.
    pub replica: Option<String>,
}

/// One write of a batch (see [`Store::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    InsertGrant(GrantRecord),
    DeleteGrant {
        account: String,
        grant_id: String,
    },
    Flow(NewFlow),
    /// A grant handed out again: one more occurrence of the allow flow that made it (the row
    /// of `account` naming `grant_id`: only the flow that made a grant names it), the last at
    /// `at`.
    GrantReused {
        account: String,
        grant_id: String,
        at: i64,
    },
    /// A denial identical to one recorded before: one more occurrence of `flow`'s row (the
    /// row `flow` was written as: same account, time, client, resource, name, decision and
    /// reason), the last at `at`.
    DenialRepeated {
        flow: NewFlow,
        at: i64,
    },
    /// How the connection of a grant's pair travels now (`path` and the relay, if any), on the
    /// allow row that made the grant (the only row of `account` that names `grant_id`, found
    /// through `flows_by_grant`, as [`Write::GrantReused`] finds it).
    FlowPath {
        account: String,
        grant_id: String,
        path: PathKind,
        relay: Option<IpAddr>,
    },
    /// As [`Store::set_gateway_connected`].
    GatewaySeen {
        account: String,
        gateway_id: String,
        connected: bool,
        at: i64,
    },
    /// A cluster event for the other replicas, committed with the writes of its batch (after
    /// them: an event about a grant is read only once the grant's rows are there).
    Announce {
        account: String,
        kind: ClusterEventKind,
        subject: String,
        detail: String,
        at: i64,
    },
}

/// A sign-in under way as the store keeps it: what the client asked for, and how far the
/// person got (`sign_in::pending` makes sense of it).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SignInRecord {
    pub account: String,
    pub nonce: String,
    pub state: String,
    /// The client's handler, as its URL.
    pub callback: String,
    pub device: String,
    /// The address a code was asked for.
    pub email: Option<String>,
    pub started_at: i64,
    /// The address the first page was asked from.
    pub source: Option<String>,
}

/// How many codes one address may be sent ([`Store::count_code_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimit {
    pub per_window: u32,
    pub window_secs: i64,
    /// The most sends counted at once, across addresses and accounts.
    pub max_counted: u64,
}

/// How many sign-ins are under way when one more starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignInsUnderWay {
    pub in_all: u64,
    /// From the new one's source address (0 when it has none).
    pub from_source: u64,
}

/// A group an identity provider says a user is in, under the provider's name for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct IdpGroup {
    pub provider: String,
    #[sqlx(rename = "group_name")]
    pub group: String,
}

/// A grant the portal signed and has not withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct GrantRecord {
    pub id: String,
    pub account: String,
    pub client_id: String,
    pub gateway_id: String,
    pub resource_id: String,
    pub rule_id: String,
    pub bundle_hash: String,
    pub issued_at: i64,
    pub expires_at: i64,
    /// What the portal needs to decide the grant again and send it again (JSON); the store
    /// keeps it without reading it.
    pub detail: Option<String>,
    /// The session the grant was decided for, named by an id its maker chose (the same for
    /// the same session) and stored once for every grant that names it (`client_sessions`).
    /// Written when both are given; `None` for grants whose `detail` holds their session.
    pub session_id: Option<String>,
    /// The session's JSON, read back with the grant.
    pub session: Option<String>,
}

/// The columns of a [`GrantRecord`], read from `grants g` joined to its session `s`.
const GRANT_COLUMNS: &str = "g.id, g.account, g.client_id, g.gateway_id, g.resource_id, \
     g.rule_id, g.bundle_hash, g.issued_at, g.expires_at, g.detail, g.session_id, \
     s.detail AS session";
/// Grants with their sessions: `FROM` this, in a [`GRANT_COLUMNS`] query.
const GRANTS_WITH_SESSIONS: &str =
    "grants g LEFT JOIN client_sessions s ON s.account = g.account AND s.id = g.session_id";

/// The PostgreSQL channel a cluster event's write notifies (a hint: readers read the table).
pub const CLUSTER_CHANNEL: &str = "fz_cluster_events";

/// What one portal replica told the others (`cluster_events`), in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// Its number: later events have larger ones.
    pub id: i64,
    pub account: String,
    pub kind: ClusterEventKind,
    /// Who it is about: a client's or gateway's id, a user's address.
    pub subject: String,
    /// What more its kind says (`MembershipsChanged`: the identity provider).
    pub detail: Option<String>,
    /// The replica that wrote it.
    pub origin: String,
    pub time: i64,
}

/// What a cluster event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterEventKind {
    /// A session of client `subject` started on replica `origin`: an older one elsewhere ends.
    ClientConnected,
    /// Identity provider `detail` named the groups of user `subject` anew: their grants are
    /// decided again wherever their devices are.
    MembershipsChanged,
    /// Gateway `subject` connected to replica `origin`: an older connection of it elsewhere
    /// (one its replica has not seen end yet) is dropped there.
    GatewayConnected,
    /// A grant for gateway `subject`, decided on replica `origin` (`detail`: what the broker
    /// needs to send it): the replica holding the gateway's connection sends it there and
    /// answers with [`ClusterEventKind::GrantAnswered`].
    GrantOffered,
    /// The gateway's answer to grant `subject` (`detail`), for the replica that offered it.
    GrantAnswered,
    /// Grants taken out of force on replica `origin` (`detail`: which, whose, and why): the
    /// replicas holding their clients' or gateways' connections tell those agents.
    GrantsWithdrawn,
    /// ICE candidates (`detail`) for agent `subject` from its peer on replica `origin`.
    Candidates,
    /// Gateway `subject`'s connection to replica `origin` ended (the store's mark written in
    /// the same transaction): replicas whose clients hold its grants tell them, unless it is
    /// connected again by the time they read it.
    GatewayDown,
}

impl ClusterEventKind {
    fn as_str(self) -> &'static str {
        match self {
            ClusterEventKind::ClientConnected => "client-connected",
            ClusterEventKind::MembershipsChanged => "memberships-changed",
            ClusterEventKind::GatewayConnected => "gateway-connected",
            ClusterEventKind::GrantOffered => "grant-offered",
            ClusterEventKind::GrantAnswered => "grant-answered",
            ClusterEventKind::GrantsWithdrawn => "grants-withdrawn",
            ClusterEventKind::Candidates => "candidates",
            ClusterEventKind::GatewayDown => "gateway-down",
        }
    }

    fn parse(text: &str) -> Option<ClusterEventKind> {
        match text {
            "client-connected" => Some(ClusterEventKind::ClientConnected),
            "memberships-changed" => Some(ClusterEventKind::MembershipsChanged),
            "gateway-connected" => Some(ClusterEventKind::GatewayConnected),
            "grant-offered" => Some(ClusterEventKind::GrantOffered),
            "grant-answered" => Some(ClusterEventKind::GrantAnswered),
            "grants-withdrawn" => Some(ClusterEventKind::GrantsWithdrawn),
            "candidates" => Some(ClusterEventKind::Candidates),
            "gateway-down" => Some(ClusterEventKind::GatewayDown),
            _ => None,
        }
    }
}

/// What the policy decided for a connection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    /// How the flow log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

// Stored as its text (`decision` is checked to be one of the two in both schemas).
impl sqlx::Type<Any> for Decision {
    fn type_info() -> sqlx::any::AnyTypeInfo {
        <str as sqlx::Type<Any>>::type_info()
    }
}

impl<'q> sqlx::Encode<'q, Any> for Decision {
    fn encode_by_ref(
        &self,
        buffer: &mut <Any as sqlx::Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<'q, Any>>::encode_by_ref(&self.as_str(), buffer)
    }
}

impl<'r> sqlx::Decode<'r, Any> for Decision {
    fn decode(value: sqlx::any::AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match <&str as sqlx::Decode<'r, Any>>::decode(value)? {
            "allow" => Ok(Decision::Allow),
            "deny" => Ok(Decision::Deny),
            other => Err(format!("`{other}` is no decision").into()),
        }
    }
}

/// A flow to record: one decision on one connection request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NewFlow {
    pub account: String,
    pub time: i64,
    /// The user's email (stored lowercase).
    pub user: String,
    pub client_id: String,
    pub resource_id: String,
    /// For a DNS resource, the name the client asked for.
    pub name: Option<String>,
    pub decision: Decision,
    /// The rule that allowed (or explicitly denied); `None` when no rule matched.
    pub rule_id: Option<String>,
    pub bundle_hash: String,
    pub reason: String,
    /// The grant an allow made.
    pub grant_id: Option<String>,
}

/// A recorded flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct FlowRecord {
    /// Increases with every flow recorded; ties on `time` are ordered by it.
    pub id: i64,
    pub account: String,
    pub time: i64,
    #[sqlx(rename = "user_email")]
    pub user: String,
    pub client_id: String,
    pub resource_id: String,
    pub name: Option<String>,
    pub decision: Decision,
    pub rule_id: Option<String>,
    pub bundle_hash: String,
    pub reason: String,
    /// How many times it happened, from `time` to `last_time`: identical denials close
    /// together, and a grant handed out again, count on one row.
    pub count: i64,
    pub last_time: i64,
    /// The grant an allow made.
    pub grant_id: Option<String>,
    /// How the grant's connection traveled, as its gateway last said: `direct` or `relayed`
    /// (through `relay`). `None` for denials, and until the gateway says.
    pub path: Option<String>,
    pub relay: Option<String>,
}

/// Which flows [`Store::flows`] returns: those of `account` that match every filter given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub account: String,
    /// The user's email (case-insensitive).
    pub user: Option<String>,
    pub resource: Option<String>,
    pub decision: Option<Decision>,
    /// Only flows that happened at or after this time (whose last occurrence did).
    pub since: Option<i64>,
    /// At most this many (the newest); all when `None`.
    pub limit: Option<u32>,
}

impl Store {
    /// Opens (creating if missing) the store in `data_dir`, which is created too (mode 0700)
    /// if missing, and applies any migration not yet applied. A data dir, database file or
    /// SQLite file beside it that group or others may use is refused (`data_dir::prepare`);
    /// the database file is made 0600, and SQLite gives the files it keeps beside it the same
    /// mode.
    ///
    /// With [`Creation::Refused`] (the admin commands) nothing is made: a data dir, database
    /// file or token key that is not there is an error saying how to make them.
    pub async fn open(data_dir: &Path, creation: Creation) -> Result<Store, StoreError> {
        Store::open_in(data_dir, &Database::Sqlite, &KeyFiles::default(), creation).await
    }

    /// Opens the store in `database`, as [`Store::open`] does, with the token key `keys` name
    /// (or the data dir's). The data dir holds, for [`Database::Sqlite`], the database file. A PostgreSQL database gets the
    /// store's schema (or the migrations it lacks) unless `creation` is
    /// [`Creation::Refused`] and it has none yet; replicas that start together take turns at
    /// it (sqlx's migration lock).
    pub async fn open_in(
        data_dir: &Path,
        database: &Database,
        keys: &KeyFiles,
        creation: Creation,
    ) -> Result<Store, StoreError> {
        // A few metadata calls, once per start or admin command: not worth a blocking task.
        data_dir::prepare(data_dir, creation)?;
        sqlx::any::install_default_drivers();
        let ((pool, transactions), backend) = match database {
            Database::Sqlite => (open_sqlite(data_dir, creation).await?, Backend::Sqlite),
            Database::Postgres(url) => (open_postgres(url, creation).await?, Backend::Postgres),
        };
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        let token_key = keys::load_token_key(data_dir, keys, creation)?;
        Ok(Store {
            pool,
            transactions,
            backend,
            replica: random_id("rep")?.into(),
            writes: Arc::default(),
            token_checks: Arc::default(),
            token_key: Arc::new(token_key),
        })
    }

    /// This process's name among the replicas on its database (random, made at open): the
    /// origin of the cluster events it writes.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether other replicas may share this store (PostgreSQL): on SQLite one process
    /// serves the file, and events meant for agents on other replicas have no reader.
    pub fn shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Whether the database answers a trivial query (`/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Folds the write-ahead log into the database file and empties the log, so that what was
    /// deleted before it (a withdrawn grant with its preshared key) is in neither file any
    /// more: `secure_delete` has zeroed it in the database's pages, and the log, which still
    /// held the pages as they were, is cut to nothing. Returns whether it completed: a reader
    /// in the way for longer than the busy timeout leaves the log for the next time.
    ///
    /// Another connection's checkpoint (the fold's, each second, perhaps still running on its
    /// connection's thread after its task was stopped) holds SQLite's checkpointer lock, and a
    /// truncating checkpoint that meets it is refused at once, without the busy handler's
    /// wait. So a refusal is tried again, every `CHECKPOINT_RETRY`, until
    /// `CHECKPOINT_PATIENCE` has passed: a fold is over in well under that.
    ///
    /// PostgreSQL keeps no such file of ours (its own log and dead rows are the server's,
    /// reclaimed by its vacuum), so there it does nothing and returns true.
    pub async fn checkpoint(&self) -> Result<bool, StoreError> {
        if self.backend == Backend::Postgres {
            return Ok(true);
        }
        let deadline = tokio::time::Instant::now() + CHECKPOINT_PATIENCE;
        loop {
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&self.pool)
                .await?;
            if busy == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(CHECKPOINT_RETRY).await;
        }
    }

    /// The fold's second step: a restarting checkpoint on a connection whose busy handler
    /// gives up after [`SQLITE_CHECKPOINT_PATIENCE`]. The connection gets its usual patience
    /// back, or leaves the pool.
    async fn restart_log(&self) -> Result<(), StoreError> {
        let mut connection = self.pool.acquire().await?;
        connection.execute(SQLITE_CHECKPOINT_PATIENCE).await?;
        let restarted = connection.execute("PRAGMA wal_checkpoint(RESTART)").await;
        if let Err(error) = connection.execute(SQLITE_BUSY_TIMEOUT).await {
            drop(connection.detach());
            return Err(error.into());
        }
        restarted?;
        Ok(())
    }

    /// Copies what the write-ahead log holds into the database file and has the log start over
    /// from its beginning, holding up the writer as little as it can: the transactions'
    /// connection leaves this to a task of the server's, once a second, so that no commit
    /// waits for the bulk of it (`SQLITE_WRITER_SETTINGS`). First a passive checkpoint on a
    /// reading connection copies what the log holds now, beside the writer. Then a restarting
    /// one copies what was committed meanwhile, with the writer held off for that short tail,
    /// and waits for readers to leave the log (for at most [`SQLITE_CHECKPOINT_PATIENCE`]), so
    /// that the next commit writes from the log's beginning again. Without the second step a
    /// writer that never pauses never finds the log wholly copied and appends to it until the
    /// minute's [`Store::checkpoint`]: hundreds of megabytes under load, each write into new
    /// space in the file, which the kernel allocates and zero-fills first. So the log file
    /// stays at about a second of writes. PostgreSQL: nothing.
    pub async fn fold_log(&self) -> Result<(), StoreError> {
        if self.backend == Backend::Sqlite {
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&self.pool)
                .await?;
            if busy == 0 {
                self.restart_log().await?;
            }
        }
        Ok(())
    }

    /// Folds the write-ahead log into the database file, then closes the connections. Not
    /// needed for durability (every committed write already is durable, and dropping the store
    /// is safe), but it leaves one self-contained file behind. A failed checkpoint is logged
    /// and changes nothing else: the log is replayed at the next open.
    ///
    /// The checkpoint comes first because sqlx's `Pool::close` can return while a connection
    /// that was being handed back is still closing (launchbadge/sqlx#3217), so the last close,
    /// which would otherwise do it, may happen later or, racing another, not at all.
    pub async fn close(&self) {
        match self.checkpoint().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("store: final checkpoint did not complete"),
            Err(error) => tracing::warn!(%error, "store: final checkpoint failed"),
        }
        self.transactions.close().await;
        self.pool.close().await;
    }

    /// Creates the account if it does not exist yet.
    pub async fn ensure_account(&self, slug: &str) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query("INSERT INTO accounts (slug) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(slug)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                on_constraint(e, |kind| match kind {
                    ErrorKind::CheckViolation => Some(StoreError::Invalid("account slug")),
                    _ => None,
                })
            })?;
        Ok(())
    }

    // ---- tokens ----

    /// Creates a token, live at once, and returns its id and secret (a fragment with no nonce:
    /// `credential`). Only a salted hash of it is stored, so it cannot be shown again.
    /// `expires_at` must be after `now`.
    pub async fn create_token(
        &self,
        account: &str,
        kind: TokenKind,
        name: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<NewToken, StoreError> {
        let times = Lifetime {
            now,
            expires_at,
            activated_at: Some(now),
        };
        self.insert_token(account, kind, name, times, None).await
    }

    /// Creates a token, live at once, for a client that signed in and drew `signed_in.nonce`:
    /// the returned secret is the fragment to hand back, and only `nonce ‖ fragment` is
    /// accepted.
    pub async fn create_signed_in_token(
        &self,
        account: &str,
        kind: TokenKind,
        name: &str,
        (expires_at, now): (i64, i64),
        signed_in: SignedIn<'_>,
    ) -> Result<NewToken, StoreError> {
        let times = Lifetime {
            now,
            expires_at,
            activated_at: Some(now),
        };
        self.insert_token(account, kind, name, times, Some(signed_in))
            .await
    }

    /// Creates a token as [`Store::create_token`] does, but inactive: it is refused everywhere
    /// until [`Store::activate_token`]. For whoever hands the secret on: store it inactive,
    /// hand the secret on, then activate it, and a crash in between leaves a token nobody can
    /// use rather than a live one nobody holds.
    pub async fn create_inactive_token(
        &self,
        account: &str,
        kind: TokenKind,
        name: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<NewToken, StoreError> {
        let times = Lifetime {
            now,
            expires_at,
            activated_at: None,
        };
        self.insert_token(account, kind, name, times, None).await
    }

    /// Activates a token of `account` made with [`Store::create_inactive_token`] (a token
    /// active already keeps its activation time). A revoked token stays refused.
    pub async fn activate_token(
        &self,
        account: &str,
        token_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let revoked: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE tokens SET activated_at = coalesce(activated_at, $3)
             WHERE account = $1 AND id = $2 RETURNING revoked_at",
        )
        .bind(account)
        .bind(token_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        match revoked {
            None => Err(StoreError::NotFound(Entity::Token)),
            Some(Some(_)) => Err(StoreError::Conflict {
                entity: Entity::Token,
                reason: "is revoked",
            }),
            Some(None) => Ok(()),
        }
    }

    async fn insert_token(
        &self,
        account: &str,
        kind: TokenKind,
        name: &str,
        Lifetime {
            now,
            expires_at,
            activated_at,
        }: Lifetime,
        signed_in: Option<SignedIn<'_>>,
    ) -> Result<NewToken, StoreError> {
        let nonce = signed_in.map(|s| s.nonce);
        let (issuer, subject) = signed_in.and_then(|s| s.identity).unzip();
        if expires_at <= now {
            return Err(StoreError::Invalid(
                "token expiry: it must be in the future",
            ));
        }
        let id = random_id("tok")?;
        let label = match kind {
            TokenKind::Client { .. } => Label::Client,
            TokenKind::Gateway { .. } => Label::Gateway,
        };
        let issued =
            self.token_key
                .issue(label, account, &id, nonce)
                .map_err(|error| match error {
                    IssueError::Random(error) => StoreError::Random(error),
                    IssueError::Field(_) => StoreError::Invalid("account slug"),
                    IssueError::Nonce => StoreError::Invalid("sign-in nonce"),
                })?;
        let (_turn, mut tx) = self.begin_write().await?;
        let (kind_text, site, user, provider) = match &kind {
            TokenKind::Client { user, provider } => {
                let user = user.to_lowercase();
                if user.is_empty() {
                    return Err(StoreError::Invalid("email"));
                }
                if provider.as_deref() == Some("") {
                    return Err(StoreError::Invalid("identity provider"));
                }
                insert_user(&mut tx, account, &user).await?;
                ("client", None, Some(user), provider.as_deref())
            }
            TokenKind::Gateway { site } => ("gateway", Some(site.as_str()), None, None),
        };
        sqlx::query(
            "INSERT INTO tokens (id, account, kind, name, site, secret_hash, created_at, expires_at,
                                 user_email, provider, activated_at, salt, made_by, issuer,
                                 subject)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(account)
        .bind(kind_text)
        .bind(name)
        .bind(site)
        .bind(&issued.hash)
        .bind(now)
        .bind(expires_at)
        .bind(user)
        .bind(provider)
        .bind(activated_at)
        .bind(&issued.salt)
        .bind(if nonce.is_some() { "sign-in" } else { "admin" })
        .bind(issuer)
        .bind(subject)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::ForeignKeyViolation => Some(StoreError::NotFound(Entity::Account)),
                _ => None,
            })
        })?;
        tx.commit().await?;
        Ok(NewToken {
            id,
            secret: issued.fragment,
        })
    }

    /// Revokes a token of `account` (a second revocation keeps the first time). Grants made
    /// for it are not touched: withdrawing them is the caller's job.
    pub async fn revoke_token(
        &self,
        account: &str,
        token_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = coalesce(revoked_at, $3) WHERE account = $1 AND id = $2",
        )
        .bind(account)
        .bind(token_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Token));
        }
        Ok(())
    }

    /// The token whose text this is (`nonce ‖ fragment`, or the fragment alone for a token an
    /// admin made), if it is active and neither revoked nor expired at `now`.
    ///
    /// INVARIANT: every text costs the same work, whatever its shape and whether a token has
    /// it: looked up by the account and id its fragment names (a dummy pair when the fragment's
    /// MAC does not verify), hashed with the stored salt (or a dummy one), and compared in
    /// constant time with the stored hash (or a dummy one). Only then are the results read. So
    /// how long a refusal takes says nothing about which tokens exist (and the broker does the
    /// same work for an account that does not exist, so nor about which accounts do).
    pub async fn authenticate(
        &self,
        text: &str,
        now: i64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let presented = self.token_key.read(text);
        let (account, id) = presented.map_or(("", DUMMY_ID), |p| (p.account, p.id));
        let row: Option<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, secret_hash, salt FROM tokens WHERE account = $1 AND id = $2"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let salt = row
            .as_ref()
            .and_then(|r| r.salt.as_deref())
            .unwrap_or(DUMMY_SALT);
        let hash = match &presented {
            Some(presented) => presented.hash(salt),
            None => credential::stored_hash("", text, salt),
        };
        let stored = row.as_ref().map_or(DUMMY_HASH, |r| r.secret_hash.as_str());
        let matches: bool = stored.as_bytes().ct_eq(hash.as_bytes()).into();
        self.token_checks.fetch_add(1, Ordering::Relaxed);
        let (Some(row), Some(presented)) = (row, presented) else {
            return Ok(None);
        };
        if !matches || row.kind != presented.label.as_str() {
            return Ok(None);
        }
        let record = row.into_record()?;
        if record.activated_at.is_none() || record.revoked_at.is_some() || record.expires_at <= now
        {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// How many secrets [`Store::authenticate`] has checked (hashed, looked up and compared)
    /// through this store and its clones: one per call, whatever the secret.
    pub fn token_checks(&self) -> u64 {
        self.token_checks.load(Ordering::Relaxed)
    }

    /// Ids of the tokens of every account revoked at or after `since`: what a running portal
    /// polls to close their connections and withdraw their grants.
    pub async fn tokens_revoked_since(&self, since: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM tokens WHERE revoked_at >= $1 ORDER BY revoked_at")
                .bind(since)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Every token of `account`, revoked and expired ones included, oldest first.
    pub async fn list_tokens(&self, account: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, secret_hash, salt FROM tokens WHERE account = $1
             ORDER BY created_at, rowid"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TokenRow::into_record).collect()
    }

    // ---- clients ----

    /// Registers the client that holds `token_id` (a client token of `account`, valid at
    /// `now`) with its WireGuard public key. One client per token: registering again with the
    /// same token keeps the client's id, name and verified mark and replaces the key. The mark
    /// belongs to the key it was given for, so a client with a new key is not verified, and
    /// one that comes back with the marked key is verified again; either way a marked
    /// client's key change counts as a change of its mark for [`Store::verified_changes_since`].
    pub async fn register_client(
        &self,
        account: &str,
        token_id: &str,
        public_key: &str,
        now: i64,
    ) -> Result<ClientRecord, StoreError> {
        self.register_client_announcing(account, token_id, public_key, now, false)
            .await
            .map(|(client, _)| client)
    }

    /// Registers the client as [`Store::register_client`] does, for a session of it starting
    /// on this replica, and in the same transaction tells the other replicas
    /// ([`ClusterEventKind::ClientConnected`]); returns the client and the event's number.
    pub async fn connect_client(
        &self,
        account: &str,
        token_id: &str,
        public_key: &str,
        now: i64,
    ) -> Result<(ClientRecord, i64), StoreError> {
        let (client, event) = self
            .register_client_announcing(account, token_id, public_key, now, true)
            .await?;
        Ok((client, event.unwrap_or(0)))
    }

    async fn register_client_announcing(
        &self,
        account: &str,
        token_id: &str,
        public_key: &str,
        now: i64,
        announce: bool,
    ) -> Result<(ClientRecord, Option<i64>), StoreError> {
        let public_key = canonical_key(public_key)?;
        let id = random_id("cli")?;
        let (_turn, mut tx) = self.begin_write().await?;
        let token = usable_token(&mut tx, account, token_id, now).await?;
        if token.kind != "client" {
            return Err(StoreError::Conflict {
                entity: Entity::Token,
                reason: "is not a client token",
            });
        }
        let last: Option<i64> =
            sqlx::query_scalar("SELECT max(tunnel_index) FROM clients WHERE account = $1")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?;
        let next = last.unwrap_or(0) + 1;
        if next > i64::from(MAX_TUNNEL_INDEX) {
            return Err(StoreError::Conflict {
                entity: Entity::Account,
                reason: "has no tunnel address left for another client",
            });
        }
        let client: ClientRow = sqlx::query_as(&format!(
            "INSERT INTO clients (id, account, token_id, name, public_key, created_at,
                                  tunnel_index, last_connected_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6)
             ON CONFLICT (token_id) DO UPDATE SET
                 public_key = excluded.public_key,
                 last_connected_at = excluded.last_connected_at,
                 tunnel_index = coalesce(clients.tunnel_index, excluded.tunnel_index),
                 verified_seq = CASE
                     WHEN clients.verified_key IS NOT NULL
                          AND clients.public_key <> excluded.public_key
                     THEN (SELECT max(verified_seq) FROM clients) + 1
                     ELSE clients.verified_seq
                 END
             RETURNING {CLIENT_COLUMNS}"
        ))
        .bind(&id)
        .bind(account)
        .bind(token_id)
        .bind(&token.name)
        .bind(&public_key)
        .bind(now)
        .bind(next)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| on_constraint(e, key_taken(Entity::Client)))?;
        let event = if announce {
            let connected = ClusterEventKind::ClientConnected;
            let subject = (client.id.as_str(), None);
            Some(
                self.announce(&mut tx, account, connected, subject, now)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Ok((client.into_record()?, event))
    }

    // ---- what replicas tell each other ----

    /// Writes a cluster event in `tx` (the transaction of the change it tells of) and, on
    /// PostgreSQL, wakes the other replicas' readers when it commits; returns its number.
    /// The event is about `subject`, with `detail` when its kind needs more; its origin is
    /// this store's [`Store::replica`].
    async fn announce(
        &self,
        tx: &mut Transaction<'static, Any>,
        account: &str,
        kind: ClusterEventKind,
        about: (&str, Option<&str>),
        now: i64,
    ) -> Result<i64, StoreError> {
        let id = self.insert_event(tx, account, kind, about, now).await?;
        self.notify(tx).await?;
        Ok(id)
    }

    /// Writes a cluster event in `tx`, without waking anyone ([`Store::notify`] does).
    async fn insert_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        account: &str,
        kind: ClusterEventKind,
        (subject, detail): (&str, Option<&str>),
        now: i64,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO cluster_events (account, kind, subject, detail, origin, time)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(account)
        .bind(kind.as_str())
        .bind(subject)
        .bind(detail)
        .bind(self.replica.as_ref())
        .bind(now)
        .fetch_one(&mut **tx)
        .await?)
    }

    /// On PostgreSQL, wakes the other replicas' readers when `tx` commits (once however many
    /// events it wrote: the readers read the table, not the notification).
    async fn notify(&self, tx: &mut Transaction<'static, Any>) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query(&format!("NOTIFY {CLUSTER_CHANNEL}"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The number of the newest cluster event (0 when there is none): where a replica that
    /// starts begins to read.
    pub async fn latest_cluster_event(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM cluster_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Up to `limit` cluster events after number `after`, oldest first.
    pub async fn cluster_events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ClusterEvent>, StoreError> {
        let rows: Vec<ClusterEventRow> = sqlx::query_as(
            "SELECT id, account, kind, subject, detail, origin, time FROM cluster_events
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let kind = ClusterEventKind::parse(&row.kind)
                    .ok_or_else(|| corrupt("a cluster event of an unknown kind"))?;
                Ok(ClusterEvent {
                    id: row.id,
                    account: row.account,
                    kind,
                    subject: row.subject,
                    detail: row.detail,
                    origin: row.origin,
                    time: row.time,
                })
            })
            .collect()
    }

    /// Deletes the cluster events written before `before`; returns how many.
    pub async fn prune_cluster_events(&self, before: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM cluster_events WHERE time < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The clients of every account whose verified mark changed after change number `seen`,
    /// and the latest change number (pass it next time). A marked client that registers with
    /// another key counts as changed: whether it is verified changed with its key.
    pub async fn verified_changes_since(
        &self,
        seen: i64,
    ) -> Result<(Vec<String>, i64), StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, verified_seq FROM clients WHERE verified_seq > $1 ORDER BY verified_seq",
        )
        .bind(seen)
        .fetch_all(&self.pool)
        .await?;
        let latest = rows.last().map_or(seen, |(_, seq)| *seq);
        Ok((rows.into_iter().map(|(id, _)| id).collect(), latest))
    }

    /// The verified clients of every account (those that hold the key their mark was given
    /// for), each with that key: a grant counts as made for a verified device only when it
    /// names this key.
    pub async fn verified_keys(
        &self,
    ) -> Result<std::collections::HashMap<String, fz_proto::PublicKey>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, public_key FROM clients WHERE verified = 1")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(id, key)| {
                let key = fz_proto::PublicKey::from_str(&key)
                    .map_err(|_| corrupt("a client's public key is not a key"))?;
                Ok((id, key))
            })
            .collect()
    }

    /// Marks a client of `account` verified, for the key it holds now, or takes the mark
    /// away; returns the client as it is after the change.
    pub async fn set_client_verified(
        &self,
        account: &str,
        client_id: &str,
        verified: bool,
    ) -> Result<ClientRecord, StoreError> {
        // A transaction, though one statement: the next change number is read from what the
        // writers before committed, and on PostgreSQL only the write lock orders them.
        let (_turn, mut tx) = self.begin_write().await?;
        let row: Option<ClientRow> = sqlx::query_as(&format!(
            "UPDATE clients
             SET verified_key = CASE WHEN $3 = 1 THEN public_key END,
                 verified_seq = (SELECT max(verified_seq) FROM clients) + 1
             WHERE account = $1 AND id = $2
             RETURNING {CLIENT_COLUMNS}"
        ))
        .bind(account)
        .bind(client_id)
        .bind(i64::from(verified))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(Entity::Client));
        };
        row.into_record()
    }

    /// A client of `account`.
    pub async fn client(
        &self,
        account: &str,
        client_id: &str,
    ) -> Result<Option<ClientRecord>, StoreError> {
        let row: Option<ClientRow> = sqlx::query_as(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE account = $1 AND id = $2"
        ))
        .bind(account)
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ClientRow::into_record).transpose()
    }

    /// Every client of `account`, oldest first.
    pub async fn list_clients(&self, account: &str) -> Result<Vec<ClientRecord>, StoreError> {
        let rows: Vec<ClientRow> = sqlx::query_as(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE account = $1 ORDER BY created_at, rowid"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ClientRow::into_record).collect()
    }

    // ---- gateways ----

    /// Registers the gateway that holds `token_id` (a gateway token of `account`, valid at
    /// `now`) in the token's site, with its public key and endpoints (socket addresses). It
    /// registers over a live connection, so it is marked connected and seen at `now`. One
    /// gateway per token: registering again keeps the id and replaces key and endpoints.
    pub async fn register_gateway(
        &self,
        account: &str,
        token_id: &str,
        public_key: &str,
        endpoints: &[String],
        now: i64,
    ) -> Result<GatewayRecord, StoreError> {
        let gateway = (public_key, endpoints);
        self.register_gateway_announcing(account, token_id, gateway, now, false)
            .await
            .map(|(gateway, _)| gateway)
    }

    /// Registers the gateway as [`Store::register_gateway`] does, for a connection of it on
    /// this replica, and in the same transaction tells the other replicas
    /// ([`ClusterEventKind::GatewayConnected`]); returns the gateway and the event's number.
    pub async fn connect_gateway(
        &self,
        account: &str,
        token_id: &str,
        public_key: &str,
        endpoints: &[String],
        now: i64,
    ) -> Result<(GatewayRecord, i64), StoreError> {
        let gateway = (public_key, endpoints);
        let (gateway, event) = self
            .register_gateway_announcing(account, token_id, gateway, now, true)
            .await?;
        Ok((gateway, event.unwrap_or(0)))
    }

    async fn register_gateway_announcing(
        &self,
        account: &str,
        token_id: &str,
        (public_key, endpoints): (&str, &[String]),
        now: i64,
        announce: bool,
    ) -> Result<(GatewayRecord, Option<i64>), StoreError> {
        let public_key = canonical_key(public_key)?;
        if endpoints.iter().any(|e| e.parse::<SocketAddr>().is_err()) {
            return Err(StoreError::Invalid("endpoint: it must be a socket address"));
        }
        let endpoints_json = serde_json::to_string(endpoints)
            .map_err(|e| StoreError::Query(sqlx::Error::Encode(Box::new(e))))?;
        let id = random_id("gw")?;
        let (_turn, mut tx) = self.begin_write().await?;
        let token = usable_token(&mut tx, account, token_id, now).await?;
        let Some(site) = token.site.filter(|_| token.kind == "gateway") else {
            return Err(StoreError::Conflict {
                entity: Entity::Token,
                reason: "is not a gateway token",
            });
        };
        let row: GatewayRow = sqlx::query_as(&format!(
            "INSERT INTO gateways
                 (id, account, site, token_id, name, public_key, endpoints, created_at, last_seen,
                  connected, replica)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, 1, $9)
             ON CONFLICT (token_id) DO UPDATE SET
                 public_key = excluded.public_key,
                 endpoints = excluded.endpoints,
                 last_seen = excluded.last_seen,
                 connected = 1,
                 replica = excluded.replica
             RETURNING {GATEWAY_COLUMNS}"
        ))
        .bind(&id)
        .bind(account)
        .bind(&site)
        .bind(token_id)
        .bind(&token.name)
        .bind(&public_key)
        .bind(&endpoints_json)
        .bind(now)
        .bind(self.replica.as_ref())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| on_constraint(e, key_taken(Entity::Gateway)))?;
        let event = if announce {
            let connected = ClusterEventKind::GatewayConnected;
            let subject = (row.id.as_str(), None);
            Some(
                self.announce(&mut tx, account, connected, subject, now)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Ok((row.into_record()?, event))
    }

    /// Records that a gateway of `account` is connected to this replica (or sent it a
    /// heartbeat: `last_seen` becomes `now`), or that its connection to this replica ended
    /// (`last_seen` is left at the last time it was heard). An end is recorded only while the
    /// gateway is this replica's: one that connected to another replica meanwhile stays
    /// connected.
    pub async fn set_gateway_connected(
        &self,
        account: &str,
        gateway_id: &str,
        connected: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut conn = self.pool.acquire().await?;
        let seen = GatewaySeen {
            account,
            gateway_id,
            connected,
            now,
            replica: &self.replica,
        };
        set_gateway_connected(&mut conn, seen).await
    }

    /// Marks disconnected the gateways marked connected but not heard from since
    /// `silent_since`, and returns how many: a live replica writes each of its gateways'
    /// heartbeats, so these are on no live replica (one killed, or the process before this one).
    pub async fn mark_lost_gateways_disconnected(
        &self,
        silent_since: i64,
    ) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done =
            sqlx::query("UPDATE gateways SET connected = 0 WHERE connected = 1 AND last_seen < $1")
                .bind(silent_since)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// Marks disconnected the gateways whose connections are this replica's, which is
    /// stopping; returns how many.
    pub async fn release_gateways(&self) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done =
            sqlx::query("UPDATE gateways SET connected = 0 WHERE connected = 1 AND replica = $1")
                .bind(self.replica.as_ref())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// The gateways of `account` in `site` connected to other replicas and heard from since
    /// `heard_since`: where a grant goes when this replica holds no gateway of the site.
    pub async fn gateways_elsewhere(
        &self,
        account: &str,
        site: &str,
        heard_since: i64,
    ) -> Result<Vec<GatewayRecord>, StoreError> {
        let rows: Vec<GatewayRow> = sqlx::query_as(&format!(
            "SELECT {GATEWAY_COLUMNS} FROM gateways
             WHERE account = $1 AND site = $2 AND connected = 1 AND last_seen >= $3
               AND replica IS NOT NULL AND replica <> $4
             ORDER BY id"
        ))
        .bind(account)
        .bind(site)
        .bind(heard_since)
        .bind(self.replica.as_ref())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(GatewayRow::into_record).collect()
    }

    /// A gateway of `account`.
    pub async fn gateway(
        &self,
        account: &str,
        gateway_id: &str,
    ) -> Result<Option<GatewayRecord>, StoreError> {
        let row: Option<GatewayRow> = sqlx::query_as(&format!(
            "SELECT {GATEWAY_COLUMNS} FROM gateways WHERE account = $1 AND id = $2"
        ))
        .bind(account)
        .bind(gateway_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(GatewayRow::into_record).transpose()
    }

    /// Every gateway of `account`, by site, then name, then id.
    pub async fn list_gateways(&self, account: &str) -> Result<Vec<GatewayRecord>, StoreError> {
        let rows: Vec<GatewayRow> = sqlx::query_as(&format!(
            "SELECT {GATEWAY_COLUMNS} FROM gateways WHERE account = $1 ORDER BY site, name, id"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(GatewayRow::into_record).collect()
    }

    // ---- group memberships ----

    /// Records that the person `identity` (issuer, subject) of OpenID Connect provider
    /// `provider` signed in to `account` at `now` with the verified address `email`
    /// (lowercase), and, when the provider named them, replaces their groups from it. One
    /// transaction: a refusal leaves everything as it was.
    ///
    /// The first subject to bring an address holds it: another subject of the same issuer
    /// bringing it is refused; the same subject bringing a new address moves to it.
    pub async fn record_identity(
        &self,
        account: &str,
        provider: &str,
        (issuer, subject): (&str, &str),
        email: &str,
        groups: Option<&[String]>,
        now: i64,
    ) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        insert_user(&mut tx, account, email).await?;
        sqlx::query(
            "INSERT INTO identities (account, provider, issuer, subject, email, first_seen,
                                     last_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (account, issuer, subject) DO UPDATE SET
                 email = excluded.email, provider = excluded.provider, last_seen = excluded.last_seen",
        )
        .bind(account)
        .bind(provider)
        .bind(issuer)
        .bind(subject)
        .bind(email)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::UniqueViolation => Some(StoreError::Conflict {
                    entity: Entity::Account,
                    reason: "has this address bound to another person of this identity provider",
                }),
                ErrorKind::CheckViolation => Some(StoreError::Invalid("identity")),
                _ => None,
            })
        })?;
        if let Some(groups) = groups {
            replace_memberships(&mut tx, account, email, provider, groups).await?;
            let changed = ClusterEventKind::MembershipsChanged;
            self.announce(&mut tx, account, changed, (email, Some(provider)), now)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the groups `provider` says the user `email` (case-insensitive) of `account` is
    /// in, leaving what other providers said alone. One transaction: on any error (an empty
    /// group name, say) the previous groups stay.
    pub async fn set_memberships(
        &self,
        account: &str,
        email: &str,
        provider: &str,
        groups: &[String],
    ) -> Result<(), StoreError> {
        let email = email.to_lowercase();
        if email.is_empty() {
            return Err(StoreError::Invalid("email"));
        }
        if provider.is_empty() {
            return Err(StoreError::Invalid("identity provider"));
        }
        let (_turn, mut tx) = self.begin_write().await?;
        insert_user(&mut tx, account, &email).await?;
        replace_memberships(&mut tx, account, &email, provider, groups).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The groups of user `email` (case-insensitive) of `account`, from every provider, sorted
    /// by provider, then group.
    pub async fn memberships(
        &self,
        account: &str,
        email: &str,
    ) -> Result<Vec<IdpGroup>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT provider, group_name FROM group_memberships
             WHERE account = $1 AND email = $2 ORDER BY provider, group_name",
        )
        .bind(account)
        .bind(email.to_lowercase())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every identity-provider group membership of `account`'s users: (email, group).
    pub async fn all_memberships(
        &self,
        account: &str,
    ) -> Result<Vec<(String, IdpGroup)>, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT email, provider, group_name FROM group_memberships
             WHERE account = $1 ORDER BY email, provider, group_name",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(email, provider, group)| (email, IdpGroup { provider, group }))
            .collect())
    }

    /// Whether `account` knows user `email` (lowercase): a token was made for them, or an
    /// identity provider signed them in.
    pub async fn knows_user(&self, account: &str, email: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM users WHERE account = $1 AND email = $2")
                .bind(account)
                .bind(email)
                .fetch_one(&self.pool)
                .await
                .map(|n: i64| n > 0)?,
        )
    }

    /// Disables user `email` of `account` (a second time keeps the first time): every client
    /// token of theirs is revoked, in the same transaction, and no sign-in makes them another
    /// until [`Store::enable_user`]. Returns how many tokens were revoked now.
    pub async fn disable_user(
        &self,
        account: &str,
        email: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let email = email.to_lowercase();
        let (_turn, mut tx) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE users SET disabled_at = coalesce(disabled_at, $3)
             WHERE account = $1 AND email = $2",
        )
        .bind(account)
        .bind(&email)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::User));
        }
        let revoked = sqlx::query(
            "UPDATE tokens SET revoked_at = $3
             WHERE account = $1 AND user_email = $2 AND kind = 'client' AND revoked_at IS NULL",
        )
        .bind(account)
        .bind(&email)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(revoked.rows_affected())
    }

    /// Enables user `email` of `account` again: they may sign in. Tokens revoked when they were
    /// disabled stay revoked.
    pub async fn enable_user(&self, account: &str, email: &str) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let done =
            sqlx::query("UPDATE users SET disabled_at = NULL WHERE account = $1 AND email = $2")
                .bind(account)
                .bind(email.to_lowercase())
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::User));
        }
        Ok(())
    }

    /// The users of `account` an admin disabled, with when, by address.
    pub async fn disabled_users(&self, account: &str) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT email, disabled_at FROM users
             WHERE account = $1 AND disabled_at IS NOT NULL ORDER BY email",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Whether user `email` of `account` is disabled.
    pub async fn is_disabled(&self, account: &str, email: &str) -> Result<bool, StoreError> {
        let disabled: Option<Option<i64>> =
            sqlx::query_scalar("SELECT disabled_at FROM users WHERE account = $1 AND email = $2")
                .bind(account)
                .bind(email.to_lowercase())
                .fetch_optional(&self.pool)
                .await?;
        Ok(disabled.flatten().is_some())
    }

    // ---- email sign-in codes ----

    /// Keeps the hash of a code just sent to `email` (lowercase) of `account`, valid until
    /// `expires_at` for `attempts` tries. It replaces any code waiting for that address, so
    /// the older one stops working. The user is recorded if new.
    pub async fn put_email_code(
        &self,
        account: &str,
        email: &str,
        code_hash: &str,
        (now, expires_at): (i64, i64),
        attempts: u32,
    ) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        insert_user(&mut tx, account, email).await?;
        sqlx::query(
            "INSERT INTO email_codes (account, email, code_hash, created_at, expires_at,
                                      attempts_left)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (account, email) DO UPDATE SET
                 code_hash = excluded.code_hash, created_at = excluded.created_at,
                 expires_at = excluded.expires_at, attempts_left = excluded.attempts_left",
        )
        .bind(account)
        .bind(email)
        .bind(code_hash)
        .bind(now)
        .bind(expires_at)
        .bind(i64::from(attempts))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::CheckViolation => Some(StoreError::Invalid("email or code")),
                _ => None,
            })
        })?;
        tx.commit().await?;
        Ok(())
    }

    /// Spends one try at the code waiting for `email` of `account` and returns its hash to
    /// check the try against, or `None` when no code waits (none was sent, it expired at
    /// `now`, was used, or its tries are spent). The try is spent in the statement that reads
    /// the hash, so tries made at once cannot spend more than there are.
    pub async fn spend_email_code_try(
        &self,
        account: &str,
        email: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let _turn = self.write_turn().await;
        Ok(sqlx::query_scalar(
            "UPDATE email_codes SET attempts_left = attempts_left - 1
             WHERE account = $1 AND email = $2 AND attempts_left > 0 AND expires_at > $3
             RETURNING code_hash",
        )
        .bind(account)
        .bind(email)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Uses up the code with this hash waiting for `email` of `account`: true for exactly one
    /// caller, false when it was used, replaced or deleted meanwhile.
    pub async fn use_email_code(
        &self,
        account: &str,
        email: &str,
        code_hash: &str,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query(
            "DELETE FROM email_codes WHERE account = $1 AND email = $2 AND code_hash = $3",
        )
        .bind(account)
        .bind(email)
        .bind(code_hash)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Counts a code sent to `email` of `account` at `now`, unless `limit.per_window` were
    /// counted in the `limit.window_secs` before (on whichever replica); then returns how many
    /// seconds until the oldest of them leaves the window. Refused for a whole window too when
    /// the store counts `limit.max_counted` sends in all, so the table stays bounded whatever
    /// addresses are asked for. Counting and inserting are one write transaction, so replicas
    /// cannot pass the limit together.
    pub async fn count_code_send(
        &self,
        account: &str,
        email: &str,
        now: i64,
        limit: SendLimit,
    ) -> Result<Result<(), i64>, StoreError> {
        let window_start = now.saturating_sub(limit.window_secs);
        let (_turn, mut tx) = self.begin_write().await?;
        sqlx::query(
            "DELETE FROM email_code_sends WHERE account = $1 AND email = $2 AND sent_at <= $3",
        )
        .bind(account)
        .bind(email)
        .bind(window_start)
        .execute(&mut *tx)
        .await?;
        let (sent, oldest): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(min(sent_at), 0) FROM email_code_sends
             WHERE account = $1 AND email = $2",
        )
        .bind(account)
        .bind(email)
        .fetch_one(&mut *tx)
        .await?;
        if sent >= i64::from(limit.per_window) {
            let wait = oldest.saturating_add(limit.window_secs).saturating_sub(now);
            return Ok(Err(wait.max(1)));
        }
        let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM email_code_sends")
            .fetch_one(&mut *tx)
            .await?;
        if counted.unsigned_abs() >= limit.max_counted {
            return Ok(Err(limit.window_secs));
        }
        sqlx::query("INSERT INTO email_code_sends (account, email, sent_at) VALUES ($1, $2, $3)")
            .bind(account)
            .bind(email)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Deletes the counted sends at or before `before`, of every address; returns how many.
    pub async fn prune_code_sends(&self, before: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM email_code_sends WHERE sent_at <= $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes every code that expired at or before `now`; returns how many.
    pub async fn prune_email_codes(&self, now: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM email_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    // ---- sign-ins under way ----

    /// Starts a sign-in, found later by `id_hash` (the SHA-256 of its cookie), if `admit`
    /// accepts the sign-ins already under way: those that started within `lifetime_secs` of
    /// `sign_in.started_at`, in all and from the same source. Counting and inserting are one
    /// write transaction, so concurrent starts on any replica cannot pass the bounds together.
    pub async fn start_sign_in<E>(
        &self,
        id_hash: &str,
        sign_in: &SignInRecord,
        lifetime_secs: i64,
        admit: impl FnOnce(SignInsUnderWay) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let now = sign_in.started_at;
        let since = now.saturating_sub(lifetime_secs);
        let (_turn, mut tx) = self.begin_write().await?;
        let in_all: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sign_ins WHERE started_at > $1 AND started_at <= $2",
        )
        .bind(since)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let from_source: i64 = match &sign_in.source {
            Some(source) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM sign_ins
                     WHERE source = $1 AND started_at > $2 AND started_at <= $3",
                )
                .bind(source)
                .bind(since)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
            }
            None => 0,
        };
        let under_way = SignInsUnderWay {
            in_all: in_all.unsigned_abs(),
            from_source: from_source.unsigned_abs(),
        };
        if let Err(refused) = admit(under_way) {
            return Ok(Err(refused));
        }
        sqlx::query(
            "INSERT INTO sign_ins (id_hash, account, nonce, state, callback, device, started_at,
                                   source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id_hash)
        .bind(&sign_in.account)
        .bind(&sign_in.nonce)
        .bind(&sign_in.state)
        .bind(&sign_in.callback)
        .bind(&sign_in.device)
        .bind(now)
        .bind(&sign_in.source)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::ForeignKeyViolation => Some(StoreError::NotFound(Entity::Account)),
                ErrorKind::UniqueViolation | ErrorKind::CheckViolation => {
                    Some(StoreError::Invalid("sign-in id"))
                }
                _ => None,
            })
        })?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// The sign-in whose cookie hashes to `id_hash`, expired or not (the caller tells).
    pub async fn sign_in(&self, id_hash: &str) -> Result<Option<SignInRecord>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT account, nonce, state, callback, device, email, started_at, source
             FROM sign_ins WHERE id_hash = $1",
        )
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records the address sign-in `id_hash` of `account` asked a code for; false if there is
    /// no such sign-in (it ended meanwhile).
    pub async fn set_sign_in_email(
        &self,
        account: &str,
        id_hash: &str,
        email: &str,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let done =
            sqlx::query("UPDATE sign_ins SET email = $1 WHERE id_hash = $2 AND account = $3")
                .bind(email)
                .bind(id_hash)
                .bind(account)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Opens a new trip of sign-in `id_hash` of `account` to `provider`, replacing any trip
    /// before it, and returns its number; `None` if there is no such sign-in.
    pub async fn open_oidc_attempt(
        &self,
        account: &str,
        id_hash: &str,
        provider: &str,
    ) -> Result<Option<i64>, StoreError> {
        let _turn = self.write_turn().await;
        Ok(sqlx::query_scalar(
            "UPDATE sign_ins
             SET oidc_provider = $1, oidc_attempt = oidc_attempt + 1, oidc_open = 1
             WHERE id_hash = $2 AND account = $3
             RETURNING oidc_attempt",
        )
        .bind(provider)
        .bind(id_hash)
        .bind(account)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Takes the open trip of sign-in `id_hash` of `account` to a provider: its provider and
    /// number, for exactly one caller (a second answer, a replay, finds none).
    pub async fn take_oidc_attempt(
        &self,
        account: &str,
        id_hash: &str,
    ) -> Result<Option<(String, i64)>, StoreError> {
        let _turn = self.write_turn().await;
        let taken: Option<(Option<String>, i64)> = sqlx::query_as(
            "UPDATE sign_ins SET oidc_open = 0
             WHERE id_hash = $1 AND account = $2 AND oidc_open = 1
             RETURNING oidc_provider, oidc_attempt",
        )
        .bind(id_hash)
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(taken.and_then(|(provider, attempt)| Some((provider?, attempt))))
    }

    /// Ends sign-in `id_hash`: true for exactly one caller.
    pub async fn end_sign_in(&self, id_hash: &str) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM sign_ins WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes every sign-in that did not start within `lifetime_secs` before `now` (or
    /// started after it: the clock went back); returns how many.
    pub async fn prune_sign_ins(&self, now: i64, lifetime_secs: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM sign_ins WHERE started_at <= $1 OR started_at > $2")
            .bind(now.saturating_sub(lifetime_secs))
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    // ---- grants ----

    /// Stores a grant. Its client and gateway must belong to its account.
    pub async fn insert_grant(&self, grant: &GrantRecord) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        if let Err(error) = insert_grants(&mut tx, self.backend, &[grant]).await {
            tx.rollback().await?;
            return Err(self.grant_refusal(error, &[grant]).await);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Applies writes in one transaction, all or none: one disk sync for many, which is how
    /// a busy portal keeps up (see `writer`).
    ///
    /// Writes of a kind go in as few statements as SQLite takes (a statement per kind and
    /// [`ROWS_PER_STATEMENT`] rows): grants first, then deletions, so a grant inserted and
    /// withdrawn in one batch is gone. A single grant insert reports which side is missing, as
    /// [`Store::insert_grant`] does; a larger batch that fails reports only that it failed.
    pub async fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut grants = Vec::new();
        let mut deletions = Vec::new();
        let mut flows = Vec::new();
        // One more occurrence of a row, many times over in a busy batch: counted per row.
        let mut again: std::collections::HashMap<Again<'_>, (i64, i64)> =
            std::collections::HashMap::new();
        let mut seen = Vec::new();
        let mut paths = Vec::new();
        let mut events = Vec::new();
        for write in writes {
            match write {
                Write::InsertGrant(grant) => grants.push(grant),
                Write::DeleteGrant { account, grant_id } => deletions.push((account, grant_id)),
                Write::Flow(flow) => flows.push(flow),
                Write::GrantReused {
                    account,
                    grant_id,
                    at,
                } => count(&mut again, Again::Grant(account, grant_id), *at),
                Write::DenialRepeated { flow, at } => count(&mut again, Again::Denial(flow), *at),
                Write::GatewaySeen {
                    account,
                    gateway_id,
                    connected,
                    at,
                } => seen.push((account, gateway_id, *connected, *at)),
                Write::FlowPath {
                    account,
                    grant_id,
                    path,
                    relay,
                } => paths.push((account, grant_id, *path, *relay)),
                Write::Announce {
                    account,
                    kind,
                    subject,
                    detail,
                    at,
                } => events.push((account, *kind, subject, detail, *at)),
            }
        }
        let (_turn, mut tx) = self.begin_write_planned(Planning::Cached).await?;
        if let Err(error) = insert_grants(&mut tx, self.backend, &grants).await {
            // Asked outside the transaction, which PostgreSQL refuses to use after an error.
            tx.rollback().await?;
            return Err(self.grant_refusal(error, &grants).await);
        }
        for chunk in deletions.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM grants WHERE (account, id) IN ({})",
                self.backend.placeholder_rows(chunk.len(), 2)
            );
            let mut delete = planned_each_time(sqlx::query(&sql), self.backend);
            for (account, id) in chunk {
                delete = delete.bind(*account).bind(*id);
            }
            delete.execute(&mut *tx).await?;
        }
        for chunk in flows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "{INSERT_FLOWS} {}",
                self.backend
                    .placeholder_rows(chunk.len(), FLOW_INSERT_ARITY)
            );
            let mut insert = sqlx::query(&sql);
            for flow in chunk {
                insert = bind_flow(insert, flow);
            }
            insert.execute(&mut *tx).await.map_err(|e| {
                on_constraint(e, |kind| match kind {
                    ErrorKind::ForeignKeyViolation => Some(StoreError::NotFound(Entity::Account)),
                    _ => None,
                })
            })?;
        }
        let mut reused = Vec::new();
        for (row, (n, at)) in again {
            match row {
                Again::Grant(account, grant_id) => reused.push((account, grant_id, n, at)),
                Again::Denial(flow) => {
                    count_denial_again(&mut tx, self.backend, flow, n, at).await?
                }
            }
        }
        for chunk in reused.chunks(ROWS_PER_STATEMENT) {
            count_grants_again(&mut tx, self.backend, chunk).await?;
        }
        for (account, gateway_id, connected, at) in seen {
            let seen = GatewaySeen {
                account,
                gateway_id,
                connected,
                now: at,
                replica: &self.replica,
            };
            set_gateway_connected(&mut tx, seen).await?;
        }
        // After the inserts: a grant's path may come in the batch that records the grant.
        for (account, grant_id, path, relay) in paths {
            planned_each_time(
                sqlx::query(
                    "UPDATE flows SET path = $3, relay = $4 WHERE account = $1 AND grant_id = $2",
                ),
                self.backend,
            )
            .bind(account)
            .bind(grant_id)
            .bind(path.as_str())
            .bind(relay.map(|r| r.to_string()))
            .execute(&mut *tx)
            .await?;
        }
        for &(account, kind, subject, detail, at) in &events {
            self.insert_event(&mut tx, account, kind, (subject, Some(detail)), at)
                .await?;
        }
        if !events.is_empty() {
            self.notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes up to `limit` flows of `account` that last happened before `before` (the
    /// oldest first), and returns how many. The caller deletes in such batches until fewer
    /// come back, so that no one transaction holds the store for long.
    pub async fn prune_flows(
        &self,
        account: &str,
        before: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query(
            "DELETE FROM flows WHERE id IN (
                 SELECT id FROM flows
                 WHERE account = $1 AND time < $2 AND last_time < $2
                 ORDER BY time, id LIMIT $3)",
        )
        .bind(account)
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes a grant of `account`; false if there was none (it may have expired and been
    /// swept already).
    pub async fn delete_grant(&self, account: &str, grant_id: &str) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM grants WHERE account = $1 AND id = $2")
            .bind(account)
            .bind(grant_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes grants of `account` in one transaction (for a reload that revokes many), and
    /// returns how many there were.
    pub async fn delete_grants(
        &self,
        account: &str,
        grant_ids: &[String],
    ) -> Result<u64, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let mut deleted = 0;
        for id in grant_ids {
            deleted += sqlx::query("DELETE FROM grants WHERE account = $1 AND id = $2")
                .bind(account)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// The grants of `account` not expired at `now` (a grant expires at `expires_at`), oldest
    /// first.
    pub async fn active_grants(
        &self,
        account: &str,
        now: i64,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {GRANT_COLUMNS} FROM {GRANTS_WITH_SESSIONS}
             WHERE g.account = $1 AND g.expires_at > $2 ORDER BY g.issued_at, g.rowid"
        ))
        .bind(account)
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The grants of `account` through gateway `gateway_id` not expired at `now`, oldest
    /// first: what a gateway that connects is told it holds, whichever replica made them.
    pub async fn active_grants_of_gateway(
        &self,
        account: &str,
        gateway_id: &str,
        now: i64,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {GRANT_COLUMNS} FROM {GRANTS_WITH_SESSIONS}
             WHERE g.account = $1 AND g.gateway_id = $2 AND g.expires_at > $3
             ORDER BY g.issued_at, g.rowid"
        ))
        .bind(account)
        .bind(gateway_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes the grants of every account expired at `now`, and returns how many.
    pub async fn delete_expired_grants(&self, now: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM grants WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes the sessions no grant names any more (their grants were withdrawn or expired),
    /// and returns how many. In a write transaction, so that it comes wholly before or after
    /// a batch that inserts a grant with its session, on this replica or another.
    pub async fn delete_unused_sessions(&self) -> Result<u64, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let done = sqlx::query(
            "DELETE FROM client_sessions WHERE NOT EXISTS (
                 SELECT 1 FROM grants g
                 WHERE g.account = client_sessions.account
                   AND g.client_id = client_sessions.client_id
                   AND g.session_id = client_sessions.id)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    // ---- flows ----

    /// Appends a flow to the log.
    pub async fn record_flow(&self, flow: &NewFlow) -> Result<FlowRecord, StoreError> {
        let _turn = self.write_turn().await;
        let mut conn = self.pool.acquire().await?;
        insert_flow(&mut conn, self.backend, flow).await
    }

    /// Appends several flows in one transaction (one disk sync for all: what a busy portal
    /// wants), all or none.
    pub async fn record_flows(&self, flows: &[NewFlow]) -> Result<Vec<FlowRecord>, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let mut recorded = Vec::with_capacity(flows.len());
        for flow in flows {
            recorded.push(insert_flow(&mut tx, self.backend, flow).await?);
        }
        tx.commit().await?;
        Ok(recorded)
    }

    /// The flows that match `filter`, newest first.
    pub async fn flows(&self, filter: &FlowFilter) -> Result<Vec<FlowRecord>, StoreError> {
        let limit = filter.limit.map_or(i64::MAX, i64::from);
        Ok(sqlx::query_as(&format!(
            "SELECT {FLOW_COLUMNS}
             FROM flows
             WHERE account = $1
               AND ($2 IS NULL OR user_email = $2)
               AND ($3 IS NULL OR resource_id = $3)
               AND ($4 IS NULL OR decision = $4)
               AND ($5 IS NULL OR last_time >= $5)
             ORDER BY time DESC, id DESC
             LIMIT $6"
        ))
        .bind(&filter.account)
        .bind(filter.user.as_deref().map(str::to_lowercase))
        .bind(filter.resource.as_deref())
        .bind(filter.decision)
        .bind(filter.since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Why [`insert_grants`] refused `grants`: for a single grant, what is wrong with it (it
    /// exists, it expires before it is issued, which side is missing); for several, only that
    /// the batch failed.
    async fn grant_refusal(&self, error: sqlx::Error, grants: &[&GrantRecord]) -> StoreError {
        let [grant] = grants else {
            return StoreError::Query(error);
        };
        match error.as_database_error().map(|e| e.kind()) {
            Some(ErrorKind::UniqueViolation) => StoreError::Conflict {
                entity: Entity::Grant,
                reason: "already exists",
            },
            Some(ErrorKind::CheckViolation) => {
                StoreError::Invalid("grant expiry: it is before its issue time")
            }
            // The composite foreign keys refused it: say which side is missing.
            Some(ErrorKind::ForeignKeyViolation) => {
                let client: Result<Option<i64>, _> =
                    sqlx::query_scalar("SELECT 1 FROM clients WHERE account = $1 AND id = $2")
                        .bind(&grant.account)
                        .bind(&grant.client_id)
                        .fetch_optional(&self.pool)
                        .await;
                match client {
                    Ok(None) => StoreError::NotFound(Entity::Client),
                    Ok(Some(_)) => StoreError::NotFound(Entity::Gateway),
                    Err(error) => StoreError::Query(error),
                }
            }
            _ => StoreError::Query(error),
        }
    }

    /// A write transaction, and this process's turn to write, which the caller holds until
    /// the transaction is over.
    async fn begin_write(&self) -> Result<(WriteTurn, Transaction<'static, Any>), StoreError> {
        self.begin_write_planned(Planning::EachTime).await
    }

    /// [`Store::begin_write`], with its statements planned as `planning` says.
    async fn begin_write_planned(
        &self,
        planning: Planning,
    ) -> Result<(WriteTurn, Transaction<'static, Any>), StoreError> {
        let turn = self.write_turn().await;
        let tx = match self.backend {
            Backend::Sqlite => self.transactions.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.transactions.begin().await?;
                // The setting rides on the lock's round trip, and ends with the transaction.
                let lock = match planning {
                    Planning::EachTime => "SELECT pg_advisory_xact_lock($1)",
                    Planning::Cached => {
                        "SELECT pg_advisory_xact_lock($1), \
                         set_config('plan_cache_mode', 'auto', true)"
                    }
                };
                sqlx::query(lock)
                    .bind(POSTGRES_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        Ok((turn, tx))
    }

    /// This process's turn to write, for a write of one statement.
    async fn write_turn(&self) -> WriteTurn {
        self.writes.clone().lock_owned().await
    }
}

/// When a token is made, until when it may be used, and when it became usable (`None`:
/// made inactive).
struct Lifetime {
    now: i64,
    expires_at: i64,
    activated_at: Option<i64>,
}

/// A writer's turn (see [`Store`]'s `writes`): the next writer of this process waits until
/// it is dropped.
type WriteTurn = tokio::sync::OwnedMutexGuard<()>;

/// How PostgreSQL plans the statements of a write transaction (`plan_cache_mode`).
#[derive(Debug, Clone, Copy)]
enum Planning {
    /// Each statement planned for its parameters and its tables' sizes as they are now: the
    /// setting of the transactions' connection (see `open_postgres`).
    EachTime,
    /// Plans PostgreSQL has cached may be used again: for the group commit, whose inserts run
    /// a foreign-key check for every row, each an internal query that planning each time made
    /// over a quarter of the database's CPU under the load bench. The statements of such a
    /// transaction that find rows in the tables that grow under load (grants, flows) are sent
    /// through [`planned_each_time`]; the rest, which reuse their plans, insert or look up one
    /// row by its key (the inserts' checks, a gateway's row).
    Cached,
}

/// A statement of the any-driver, with its arguments.
type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

/// `query`, planned by PostgreSQL for its parameters and its tables' current sizes every
/// time it runs, whatever `plan_cache_mode` says: sent unprepared, since PostgreSQL plans
/// an unnamed statement afresh each time it is bound. A plan cached while a table was small
/// scans it whole once it has grown. SQLite's plans do not depend on sizes, so there it
/// stays prepared.
fn planned_each_time(query: AnyQuery<'_>, backend: Backend) -> AnyQuery<'_> {
    query.persistent(backend == Backend::Sqlite)
}

const TOKEN_COLUMNS: &str = "id, account, kind, name, site, user_email, provider, created_at, \
                             expires_at, revoked_at, activated_at, CASE WHEN made_by = 'sign-in' THEN 1 ELSE 0 END AS signed_in, \
                             issuer, subject";

/// What [`Store::authenticate`] compares a token's hash with when no token has it: the shape
/// of a stored hash, and no token's (that would take a SHA-256 preimage of zeros).
const DUMMY_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The salt [`Store::authenticate`] hashes with when no token has the text's id.
const DUMMY_SALT: &str = "00000000000000000000000000000000";
/// The token id [`Store::authenticate`] looks up for text that is no token of this portal's:
/// not the shape of any id the store makes, so the lookup finds nothing, at the usual cost.
const DUMMY_ID: &str = "tok_-";
const CLIENT_COLUMNS: &str = "id, account, token_id, name, public_key, verified, verified_key, created_at, tunnel_index, \
     last_connected_at";
const FLOW_COLUMNS: &str = "id, account, time, user_email, client_id, resource_id, name, \
                            decision, rule_id, bundle_hash, reason, count, last_time, grant_id, \
                            path, relay";
const GATEWAY_COLUMNS: &str = "id, account, site, token_id, name, public_key, endpoints, \
                               created_at, last_seen, connected, replica";

// Rows as the store reads them. Flags are integers, 0 or 1, in both dialects (SQLite has no
// booleans, and one text of each query serves both), made `bool` in the records.

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: String,
    account: String,
    kind: String,
    name: String,
    site: Option<String>,
    user_email: Option<String>,
    provider: Option<String>,
    created_at: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
    activated_at: Option<i64>,
    signed_in: i64,
    issuer: Option<String>,
    subject: Option<String>,
    secret_hash: String,
    /// `NULL` for tokens made before tokens were salted: they were all revoked then.
    salt: Option<String>,
}

impl TokenRow {
    fn into_record(self) -> Result<TokenRecord, StoreError> {
        let kind = match (self.kind.as_str(), self.site, self.user_email) {
            ("client", None, Some(user)) => TokenKind::Client {
                user,
                provider: self.provider,
            },
            ("gateway", Some(site), None) => TokenKind::Gateway { site },
            _ => return Err(corrupt("a token's kind, site and user disagree")),
        };
        Ok(TokenRecord {
            id: self.id,
            account: self.account,
            kind,
            name: self.name,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            activated_at: self.activated_at,
            signed_in: self.signed_in != 0,
            issuer: self.issuer,
            subject: self.subject,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ClientRow {
    id: String,
    account: String,
    token_id: String,
    name: String,
    public_key: String,
    verified: i64,
    verified_key: Option<String>,
    created_at: i64,
    tunnel_index: Option<i64>,
    last_connected_at: Option<i64>,
}

impl ClientRow {
    fn into_record(self) -> Result<ClientRecord, StoreError> {
        let tunnel_index = self
            .tunnel_index
            .map(|i| u32::try_from(i).map_err(|_| corrupt("a client's tunnel index is too large")))
            .transpose()?;
        Ok(ClientRecord {
            id: self.id,
            account: self.account,
            token_id: self.token_id,
            name: self.name,
            public_key: self.public_key,
            verified: self.verified != 0,
            verified_key: self.verified_key,
            created_at: self.created_at,
            tunnel_index,
            last_connected_at: self.last_connected_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct GatewayRow {
    id: String,
    account: String,
    site: String,
    token_id: String,
    name: String,
    public_key: String,
    endpoints: String,
    created_at: i64,
    last_seen: i64,
    connected: i64,
    replica: Option<String>,
}

impl GatewayRow {
    fn into_record(self) -> Result<GatewayRecord, StoreError> {
        let endpoints = serde_json::from_str(&self.endpoints)
            .map_err(|_| corrupt("a gateway's endpoints are not a list of strings"))?;
        Ok(GatewayRecord {
            id: self.id,
            account: self.account,
            site: self.site,
            token_id: self.token_id,
            name: self.name,
            public_key: self.public_key,
            endpoints,
            created_at: self.created_at,
            last_seen: self.last_seen,
            connected: self.connected != 0,
            replica: self.replica,
        })
    }
}

/// Adds a user to an account unless it is there already.
/// Replaces the groups `provider` says user `email` of `account` is in, inside `tx`.
async fn replace_memberships(
    tx: &mut Transaction<'static, Any>,
    account: &str,
    email: &str,
    provider: &str,
    groups: &[String],
) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM group_memberships WHERE account = $1 AND email = $2 AND provider = $3",
    )
    .bind(account)
    .bind(email)
    .bind(provider)
    .execute(&mut **tx)
    .await?;
    for group in groups {
        sqlx::query(
            "INSERT INTO group_memberships (account, email, provider, group_name)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(account)
        .bind(email)
        .bind(provider)
        .bind(group)
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::CheckViolation => Some(StoreError::Invalid("group name")),
                _ => None,
            })
        })?;
    }
    Ok(())
}

async fn insert_user(
    tx: &mut Transaction<'static, Any>,
    account: &str,
    email: &str,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO users (account, email) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(account)
        .bind(email)
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::ForeignKeyViolation => Some(StoreError::NotFound(Entity::Account)),
                _ => None,
            })
        })?;
    Ok(())
}

/// A cluster event as stored (see [`ClusterEvent`]).
#[derive(sqlx::FromRow)]
struct ClusterEventRow {
    id: i64,
    account: String,
    kind: String,
    subject: String,
    detail: Option<String>,
    origin: String,
    time: i64,
}

/// What [`usable_token`] needs of a token.
#[derive(sqlx::FromRow)]
struct TokenUse {
    kind: String,
    name: String,
    site: Option<String>,
    expires_at: i64,
    revoked_at: Option<i64>,
    activated_at: Option<i64>,
}

/// The token `token_id` of `account`, if it is active and neither revoked nor expired at
/// `now`.
async fn usable_token(
    tx: &mut Transaction<'static, Any>,
    account: &str,
    token_id: &str,
    now: i64,
) -> Result<TokenUse, StoreError> {
    let token: Option<TokenUse> = sqlx::query_as(
        "SELECT kind, name, site, expires_at, revoked_at, activated_at FROM tokens
         WHERE account = $1 AND id = $2",
    )
    .bind(account)
    .bind(token_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(token) = token else {
        return Err(StoreError::NotFound(Entity::Token));
    };
    if token.revoked_at.is_some() {
        return Err(StoreError::Conflict {
            entity: Entity::Token,
            reason: "is revoked",
        });
    }
    if token.activated_at.is_none() {
        return Err(StoreError::Conflict {
            entity: Entity::Token,
            reason: "was never activated",
        });
    }
    if token.expires_at <= now {
        return Err(StoreError::Conflict {
            entity: Entity::Token,
            reason: "has expired",
        });
    }
    Ok(token)
}

/// What [`Store::set_gateway_connected`] records.
struct GatewaySeen<'a> {
    account: &'a str,
    gateway_id: &'a str,
    connected: bool,
    now: i64,
    /// The replica recording it.
    replica: &'a str,
}

async fn set_gateway_connected(
    conn: &mut AnyConnection,
    seen: GatewaySeen<'_>,
) -> Result<(), StoreError> {
    let done = if seen.connected {
        sqlx::query(
            "UPDATE gateways SET connected = 1, last_seen = $3, replica = $4
             WHERE account = $1 AND id = $2",
        )
        .bind(seen.account)
        .bind(seen.gateway_id)
        .bind(seen.now)
        .bind(seen.replica)
        .execute(&mut *conn)
        .await?
    } else {
        // The gateway's connection to another replica is not this one's to end; a row left
        // by a portal from before replicas were recorded is.
        sqlx::query(
            "UPDATE gateways SET connected = 0
             WHERE account = $1 AND id = $2 AND (replica = $3 OR replica IS NULL)",
        )
        .bind(seen.account)
        .bind(seen.gateway_id)
        .bind(seen.replica)
        .execute(&mut *conn)
        .await?
    };
    if done.rows_affected() == 0 {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM gateways WHERE account = $1 AND id = $2")
                .bind(seen.account)
                .bind(seen.gateway_id)
                .fetch_optional(&mut *conn)
                .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(Entity::Gateway));
        }
    }
    Ok(())
}

/// Inserts grants and, first, the sessions they name (each once, and not again if it is
/// stored already), [`ROWS_PER_STATEMENT`] to a statement ([`Store::grant_refusal`] says why
/// they were refused). The caller's transaction makes it all or nothing.
async fn insert_grants(
    conn: &mut AnyConnection,
    backend: Backend,
    grants: &[&GrantRecord],
) -> Result<(), sqlx::Error> {
    let mut sessions: Vec<(&str, &str, &str, &str)> = Vec::new();
    let mut named = std::collections::HashSet::new();
    for grant in grants {
        if let (Some(id), Some(detail)) = (&grant.session_id, &grant.session)
            && named.insert((grant.account.as_str(), id.as_str()))
        {
            sessions.push((&grant.account, id, &grant.client_id, detail));
        }
    }
    for chunk in sessions.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO client_sessions (account, id, client_id, detail) VALUES {}
             ON CONFLICT DO NOTHING",
            backend.placeholder_rows(chunk.len(), 4)
        );
        let mut insert = sqlx::query(&sql);
        for &(account, id, client_id, detail) in chunk {
            insert = insert.bind(account).bind(id).bind(client_id).bind(detail);
        }
        insert.execute(&mut *conn).await?;
    }
    for chunk in grants.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO grants (id, account, client_id, gateway_id, resource_id, rule_id,
                                 bundle_hash, issued_at, expires_at, detail, session_id)
             VALUES {}",
            backend.placeholder_rows(chunk.len(), 11)
        );
        let mut insert = sqlx::query(&sql);
        for grant in chunk {
            insert = insert
                .bind(&grant.id)
                .bind(&grant.account)
                .bind(&grant.client_id)
                .bind(&grant.gateway_id)
                .bind(&grant.resource_id)
                .bind(&grant.rule_id)
                .bind(&grant.bundle_hash)
                .bind(grant.issued_at)
                .bind(grant.expires_at)
                .bind(grant.detail.as_deref())
                .bind(grant.session_id.as_deref());
        }
        insert.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_flow(
    conn: &mut AnyConnection,
    backend: Backend,
    flow: &NewFlow,
) -> Result<FlowRecord, StoreError> {
    let sql = format!(
        "{INSERT_FLOWS} {} RETURNING {FLOW_COLUMNS}",
        backend.placeholder_rows(1, FLOW_INSERT_ARITY)
    );
    let row = bind_flow(sqlx::query(&sql), flow)
        .fetch_one(conn)
        .await
        .map_err(|e| {
            on_constraint(e, |kind| match kind {
                ErrorKind::ForeignKeyViolation => Some(StoreError::NotFound(Entity::Account)),
                _ => None,
            })
        })?;
    Ok(FlowRecord::from_row(&row)?)
}

/// The start of a flow row's insert, the values of its [`FLOW_INSERT_ARITY`] columns to
/// follow, bound by [`bind_flow`]; a new row's last occurrence is its first.
const INSERT_FLOWS: &str = "INSERT INTO flows (account, time, user_email, client_id, resource_id, \
                            name, decision, rule_id, bundle_hash, reason, last_time, grant_id) \
                            VALUES";
const FLOW_INSERT_ARITY: usize = 12;

/// Binds a new flow's values, in [`INSERT_FLOWS`]'s order.
fn bind_flow<'q>(query: AnyQuery<'q>, flow: &'q NewFlow) -> AnyQuery<'q> {
    query
        .bind(&flow.account)
        .bind(flow.time)
        .bind(flow.user.to_lowercase())
        .bind(&flow.client_id)
        .bind(&flow.resource_id)
        .bind(flow.name.as_deref())
        .bind(flow.decision)
        .bind(flow.rule_id.as_deref())
        .bind(&flow.bundle_hash)
        .bind(&flow.reason)
        .bind(flow.time)
        .bind(flow.grant_id.as_deref())
}

/// A row that happened again (see [`Write::GrantReused`], [`Write::DenialRepeated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Again<'a> {
    /// Account, grant id.
    Grant(&'a str, &'a str),
    Denial(&'a NewFlow),
}

/// Notes one more occurrence of `row` at `at` among those of a batch.
fn count<'a>(
    again: &mut std::collections::HashMap<Again<'a>, (i64, i64)>,
    row: Again<'a>,
    at: i64,
) {
    let (n, last) = again.entry(row).or_insert((0, at));
    *n += 1;
    *last = (*last).max(at);
}

/// Adds occurrences to the allow rows of reused grants: for each (account, grant id, `n`,
/// `at`), `n` more, the last at `at`, in one statement (found through `flows_by_grant`). A row
/// that is not there (pruned, or its insert failed) is left so: occurrences are counted, never
/// made up into rows.
///
/// The row is matched by grant alone, not also by its time: with the time in the join,
/// PostgreSQL, whose statistics lag a flow log that grows by thousands of rows a second, took
/// `flows_by_account_time` for as selective and scanned every row of each grant's second
/// (measured under the load bench: 40 to 80 ms for a batch's 70 reused grants).
async fn count_grants_again(
    conn: &mut AnyConnection,
    backend: Backend,
    rows: &[(&str, &str, i64, i64)],
) -> Result<(), StoreError> {
    // `VALUES` names its columns column1, column2, … in both dialects.
    let sql = format!(
        "UPDATE flows SET count = flows.count + v.column3,
                          last_time = CASE WHEN flows.last_time > v.column4
                                           THEN flows.last_time ELSE v.column4 END
         FROM (VALUES {}) AS v
         WHERE flows.account = v.column1 AND flows.grant_id = v.column2",
        backend.placeholder_rows(rows.len(), 4)
    );
    let mut update = planned_each_time(sqlx::query(&sql), backend);
    for &(account, grant_id, n, at) in rows {
        update = update.bind(account).bind(grant_id).bind(n).bind(at);
    }
    update.execute(conn).await?;
    Ok(())
}

/// Adds `n` occurrences to a denial's row, the last at `at`. The row is found through
/// `flows_by_account_time` (account and time first); should two rows match (a denial counted
/// in memory by a portal that restarted within the same second), the newer one counts. A row
/// that is not there (it was pruned, or its insert failed) is left so.
async fn count_denial_again(
    conn: &mut AnyConnection,
    backend: Backend,
    flow: &NewFlow,
    n: i64,
    at: i64,
) -> Result<(), StoreError> {
    let update = sqlx::query(
        "UPDATE flows SET count = count + $9,
                          last_time = CASE WHEN last_time > $10 THEN last_time ELSE $10 END
         WHERE id = (SELECT max(id) FROM flows
                     WHERE account = $1 AND time = $2 AND client_id = $3
                       AND resource_id = $4 AND name IS NOT DISTINCT FROM $5
                       AND decision = 'deny'
                       AND reason = $6 AND rule_id IS NOT DISTINCT FROM $7
                       AND bundle_hash = $8
                       AND grant_id IS NULL)",
    );
    planned_each_time(update, backend)
        .bind(&flow.account)
        .bind(flow.time)
        .bind(&flow.client_id)
        .bind(&flow.resource_id)
        .bind(flow.name.as_deref())
        .bind(&flow.reason)
        .bind(flow.rule_id.as_deref())
        .bind(&flow.bundle_hash)
        .bind(n)
        .bind(at)
        .execute(conn)
        .await?;
    Ok(())
}

/// The pools on the store's SQLite file in `data_dir`, made (0600) when `creation` allows:
/// one for reads, one of a single connection for transactions (see [`Store`]).
async fn open_sqlite(
    data_dir: &Path,
    creation: Creation,
) -> Result<(AnyPool, AnyPool), StoreError> {
    let path = data_dir.join(DATABASE_FILE);
    match creation {
        Creation::Allowed => data_dir::create_private_file(&path)?,
        Creation::Refused if !path.exists() => Err(DataDirError::Missing(path.clone()))?,
        Creation::Refused => {}
    }
    let open_error = |source| StoreError::Open {
        path: path.clone(),
        source,
    };
    // The any-driver takes a URL, which holds only UTF-8: a lossy one would open another file.
    if path.to_str().is_none() {
        return Err(open_error(sqlx::Error::Configuration(
            "the path is not UTF-8".into(),
        )));
    }
    let url = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(creation == Creation::Allowed)
        .to_url_lossy();
    let options = AnyConnectOptions::from_url(&url).map_err(open_error)?;
    let connect = |connections, writer: bool| {
        AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    connection.execute(SQLITE_SETTINGS).await?;
                    connection.execute(SQLITE_BUSY_TIMEOUT).await?;
                    if writer {
                        connection.execute(SQLITE_WRITER_SETTINGS).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
    };
    let reads = connect(MAX_CONNECTIONS - 1, false)
        .await
        .map_err(open_error)?;
    let transactions = connect(1, true).await.map_err(open_error)?;
    Ok((reads, transactions))
}

/// The pools on the PostgreSQL database at `url` (for reads, and one connection for
/// transactions: see [`Store`]); with [`Creation::Refused`], only on one that holds a store
/// already.
async fn open_postgres(url: &str, creation: Creation) -> Result<(AnyPool, AnyPool), StoreError> {
    let server = postgres_server_name(url);
    let connect_error = |source| StoreError::Connect {
        server: server.clone(),
        source,
    };
    let options = url
        .parse::<url::Url>()
        .map_err(|error| connect_error(sqlx::Error::Configuration(error.into())))
        .and_then(|url| AnyConnectOptions::from_url(&url).map_err(connect_error))?;
    let pool = AnyPoolOptions::new()
        .max_connections(MAX_CONNECTIONS - 1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options.clone())
        .await
        .map_err(connect_error)?;
    if creation == Creation::Refused {
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = 'accounts'",
        )
        .fetch_one(&pool)
        .await?;
        if tables == 0 {
            pool.close().await;
            return Err(StoreError::Uninitialized(server));
        }
    }
    // The transactions' statements touch rows by key, in tables that grow faster under load
    // than autoanalyze follows: a plan PostgreSQL cached while `flows` was small joins a
    // batch's reused grants to it by scanning it whole (measured: 45 ms against 3 ms for 100
    // grants at 200,000 rows). Planned each time, they see the table's size as it is. The group
    // commit alone lets PostgreSQL reuse plans, for its inserts' foreign-key checks
    // (`Planning::Cached`).
    let transactions = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection
                    .execute("SET plan_cache_mode = force_custom_plan")
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(connect_error)?;
    Ok((pool, transactions))
}

/// `host:port/database` of a PostgreSQL URL, for messages: never its user or password.
fn postgres_server_name(url: &str) -> String {
    match url.parse::<url::Url>() {
        Ok(url) => format!(
            "{}:{}{}",
            url.host_str().unwrap_or("localhost"),
            url.port().unwrap_or(5432),
            url.path()
        ),
        Err(_) => "(an unreadable URL)".to_owned(),
    }
}

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` parameters each: how a statement of many
/// rows is written in both dialects (the any-driver leaves placeholders as they are written).
impl Backend {
    /// `rows` rows of `columns` placeholders, numbered in order from the statement's first:
    /// `($1, $2), ($3, $4)` on PostgreSQL, `(?, ?), (?, ?)` on SQLite. SQLite takes `$1` as a
    /// name and looks each one up among those before it, by string, when it prepares the
    /// statement and again when sqlx binds it: quadratic in the placeholders, which made a
    /// batch's multi-row inserts half of the portal's CPU under load. Plain `?` is counted.
    fn placeholder_rows(self, rows: usize, columns: usize) -> String {
        let mut text = String::with_capacity(rows * columns * 6);
        for row in 0..rows {
            if row > 0 {
                text.push_str(", ");
            }
            text.push('(');
            for column in 0..columns {
                if column > 0 {
                    text.push_str(", ");
                }
                match self {
                    Backend::Sqlite => text.push('?'),
                    Backend::Postgres => {
                        text.push('$');
                        text.push_str(&(row * columns + column + 1).to_string());
                    }
                }
            }
            text.push(')');
        }
        text
    }
}

/// Turns a constraint violation into the error `map` gives for its kind; anything else (and
/// any kind `map` declines) stays a query error.
fn on_constraint(
    error: sqlx::Error,
    map: impl FnOnce(ErrorKind) -> Option<StoreError>,
) -> StoreError {
    error
        .as_database_error()
        .and_then(|e| map(e.kind()))
        .unwrap_or(StoreError::Query(error))
}

/// A public key already used by another client (or gateway) of the same account: WireGuard
/// tells peers apart by key alone, so two peers with one key could not both be served.
fn key_taken(entity: Entity) -> impl FnOnce(ErrorKind) -> Option<StoreError> {
    move |kind| match kind {
        ErrorKind::UniqueViolation => Some(StoreError::Conflict {
            entity,
            reason: "public key is already registered in this account",
        }),
        _ => None,
    }
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Query(sqlx::Error::Decode(what.into()))
}

/// A WireGuard public key in its canonical base64 form.
fn canonical_key(text: &str) -> Result<String, StoreError> {
    fz_proto::PublicKey::from_str(text)
        .map(|key| key.to_string())
        .map_err(|_| StoreError::Invalid("public key: it must be 32 bytes in base64"))
}

fn random_id(prefix: &str) -> Result<String, StoreError> {
    random::id(prefix).map_err(StoreError::Random)
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn placeholders_are_numbered_on_postgres_and_positional_on_sqlite() {
        assert_eq!(
            Backend::Postgres.placeholder_rows(2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(
            Backend::Sqlite.placeholder_rows(2, 3),
            "(?, ?, ?), (?, ?, ?)"
        );
        assert_eq!(Backend::Sqlite.placeholder_rows(1, 1), "(?)");
    }
}
