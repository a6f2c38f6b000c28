//! The store against real SQLite files in a temporary directory and against a real
//! PostgreSQL server (`fz_host::testing::postgres`): the store's test-suite runs on both
//! backends (`on_both_backends!` at the end), and what only one has (SQLite's files, its
//! migrations' history) is tested on that one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use fz_portal::data_dir::Creation;
use fz_portal::data_dir::DataDirError;
use fz_portal::keys::KeyFiles;
use fz_portal::store::{
    ClientRecord, DATABASE_FILE, Database, Decision, FlowFilter, GatewayRecord, GrantRecord,
    NewFlow, NewToken, SendLimit, SignInRecord, SignedIn, Store, StoreError, TokenKind, Write,
    tunnel_addresses,
};
use fz_portal::writer::Writer;
use sha2::{Digest as _, Sha256};
use sqlx::ConnectOptions as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tempfile::TempDir;

const NOW: i64 = 1_750_000_000;
const DAY: i64 = 86_400;
const A: &str = "acme";
const B: &str = "globex";

/// What `authenticate` found: token id, account, kind.
type Authenticated = Option<(String, String, TokenKind)>;

/// A store in a fresh temporary data dir (below a folder that does not exist yet) and a fresh
/// database, with accounts `A` and `B`.
struct Fixture {
    _dir: TempDir,
    data_dir: PathBuf,
    database: Database,
    store: Store,
}

async fn fixture(database: Database) -> Fixture {
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("var").join("fz-portal");
    let store = open(&data_dir, &database).await;
    store.ensure_account(A).await.unwrap();
    store.ensure_account(B).await.unwrap();
    Fixture {
        _dir: dir,
        data_dir,
        database,
        store,
    }
}

/// The store in `data_dir` and `database` (again: a restart, or a second replica).
async fn open(data_dir: &Path, database: &Database) -> Store {
    Store::open_in(data_dir, database, &KeyFiles::default(), Creation::Allowed)
        .await
        .unwrap()
}

/// Why the store in `data_dir` and `database` does not open.
async fn open_failure(data_dir: &Path, database: &Database, creation: Creation) -> StoreError {
    Store::open_in(data_dir, database, &KeyFiles::default(), creation)
        .await
        .unwrap_err()
}

/// A connection pool of our own on the fixture's database, beside the store's: read-only on
/// SQLite (where the store must be closed or dropped first, see
/// `the_database_never_contains_a_secret`).
async fn side_pool(data_dir: &Path, database: &Database) -> sqlx::AnyPool {
    let url = match database {
        Database::Sqlite => SqliteConnectOptions::new()
            .filename(data_dir.join(DATABASE_FILE))
            .read_only(true)
            .to_url_lossy()
            .to_string(),
        Database::Postgres(url) => url.clone(),
    };
    sqlx::AnyPool::connect(&url).await.unwrap()
}

/// Group names from every provider, sorted, without duplicates.
fn group_names(groups: &[fz_portal::store::IdpGroup]) -> Vec<String> {
    let names: std::collections::BTreeSet<String> =
        groups.iter().map(|g| g.group.clone()).collect();
    names.into_iter().collect()
}

/// A client token for alice, minted by an admin.
fn client_kind() -> TokenKind {
    TokenKind::Client {
        user: "alice@example.com".to_owned(),
        provider: None,
    }
}

/// A WireGuard public key made of one repeated byte.
fn key(byte: u8) -> String {
    STANDARD.encode([byte; 32])
}

/// One account's worth of everything.
struct World {
    account: &'static str,
    client_token: NewToken,
    gateway_token: NewToken,
    client: ClientRecord,
    gateway: GatewayRecord,
    grant: GrantRecord,
}

/// Fills `account`; `seed` keeps keys and names apart between accounts.
async fn populate(store: &Store, account: &'static str, seed: u8) -> World {
    let client_token = store
        .create_token(account, client_kind(), "laptop", NOW + DAY, NOW)
        .await
        .unwrap();
    let gateway_token = store
        .create_token(
            account,
            TokenKind::Gateway {
                site: "hq".to_owned(),
            },
            "gw-1",
            NOW + 30 * DAY,
            NOW,
        )
        .await
        .unwrap();
    let client = store
        .register_client(account, &client_token.id, &key(seed), NOW + 1)
        .await
        .unwrap();
    let gateway = store
        .register_gateway(
            account,
            &gateway_token.id,
            &key(seed + 1),
            &["192.0.2.1:51820".to_owned()],
            NOW + 2,
        )
        .await
        .unwrap();
    let grant = GrantRecord {
        id: format!("grant-{account}"),
        account: account.to_owned(),
        client_id: client.id.clone(),
        gateway_id: gateway.id.clone(),
        resource_id: "gitlab".to_owned(),
        rule_id: "engineers-gitlab".to_owned(),
        bundle_hash: "b1".to_owned(),
        issued_at: NOW + 3,
        expires_at: NOW + 3 + 3600,
        detail: Some(r#"{"kept":"as written"}"#.to_owned()),
        // The same id in every account: a session is the account's own.
        session_id: Some("ses-1".to_owned()),
        session: Some(format!(r#"{{"account":"{account}"}}"#)),
    };
    store.insert_grant(&grant).await.unwrap();
    store
        .set_memberships(account, "alice@example.com", "okta", &["eng".to_owned()])
        .await
        .unwrap();
    store
        .record_flow(&flow(
            account,
            NOW + 3,
            "alice@example.com",
            "gitlab",
            true,
            "f",
        ))
        .await
        .unwrap();
    World {
        account,
        client_token,
        gateway_token,
        client,
        gateway,
        grant,
    }
}

fn flow(
    account: &str,
    time: i64,
    user: &str,
    resource: &str,
    allow: bool,
    reason: &str,
) -> NewFlow {
    NewFlow {
        account: account.to_owned(),
        time,
        user: user.to_owned(),
        client_id: "cli_x".to_owned(),
        resource_id: resource.to_owned(),
        name: None,
        decision: if allow {
            Decision::Allow
        } else {
            Decision::Deny
        },
        rule_id: allow.then(|| "rule".to_owned()),
        bundle_hash: "b1".to_owned(),
        reason: reason.to_owned(),
        grant_id: None,
    }
}

fn all_flows(account: &str) -> FlowFilter {
    FlowFilter {
        account: account.to_owned(),
        ..FlowFilter::default()
    }
}

/// A 32-byte sign-in nonce in unpadded base64url, as a client draws it.
fn nonce(n: u8) -> String {
    URL_SAFE_NO_PAD.encode([n; 32])
}

/// The stored hash and salt of a token, read through a separate connection (only once the
/// store is closed or dropped: see `the_database_never_contains_a_secret`).
async fn stored_hash_and_salt(
    data_dir: &Path,
    database: &Database,
    token_id: &str,
) -> (String, String) {
    let pool = side_pool(data_dir, database).await;
    let row = sqlx::query_as("SELECT secret_hash, salt FROM tokens WHERE id = $1")
        .bind(token_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    row
}

/// Everything in every table of the store, read through a separate connection: each table's
/// rows as one JSON text, in a fixed order.
async fn snapshot(data_dir: &Path, database: &Database) -> Vec<(String, String)> {
    let pool = side_pool(data_dir, database).await;
    let tables = match database {
        Database::Sqlite => {
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
             ORDER BY name"
        }
        Database::Postgres(_) => {
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables
             WHERE table_schema = current_schema() ORDER BY table_name"
        }
    };
    let tables: Vec<String> = sqlx::query_scalar(tables).fetch_all(&pool).await.unwrap();
    let mut snapshot = Vec::new();
    for table in tables {
        let rows = match database {
            Database::Sqlite => {
                let columns: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
                        .bind(&table)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                let quoted: Vec<String> =
                    columns.iter().map(|c| format!("quote(\"{c}\")")).collect();
                format!(
                    "SELECT coalesce(json_group_array(json_array({})), '[]')
                     FROM (SELECT * FROM \"{table}\" ORDER BY rowid)",
                    quoted.join(", ")
                )
            }
            Database::Postgres(_) => format!(
                "SELECT coalesce(CAST(json_agg(t ORDER BY CAST(t AS TEXT)) AS TEXT), '[]')
                 FROM \"{table}\" t"
            ),
        };
        let rows: String = sqlx::query_scalar(&rows).fetch_one(&pool).await.unwrap();
        snapshot.push((table, rows));
    }
    pool.close().await;
    snapshot
}

#[tokio::test]
async fn open_creates_the_data_dir_and_opens_again() {
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("a").join("b");
    let store = Store::open(&data_dir, Creation::Allowed).await.unwrap();
    assert!(data_dir.join(DATABASE_FILE).is_file());
    // The directories it made, the database and the files SQLite keeps beside it are the
    // portal's user's alone, whatever the umask (the test's is usually 022).
    store.ensure_account(A).await.unwrap();
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&dir.path().join("a")), 0o700);
    for suffix in ["", "-wal", "-shm"] {
        let file = data_dir.join(format!("{DATABASE_FILE}{suffix}"));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    store.close().await;
    // Migrations already applied are skipped.
    let store = Store::open(&data_dir, Creation::Allowed).await.unwrap();
    store.ensure_account(A).await.unwrap();
    store.ensure_account(A).await.unwrap();
}

#[tokio::test]
async fn open_fails_clearly_when_the_data_dir_is_a_file() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a directory").unwrap();
    let error = Store::open(&file, Creation::Allowed).await.unwrap_err();
    assert!(
        matches!(error, StoreError::DataDir(DataDirError::NotADirectory(_))),
        "{error:?}"
    );
    let below = Store::open(&file.join("data"), Creation::Allowed)
        .await
        .unwrap_err();
    assert!(
        matches!(below, StoreError::DataDir(DataDirError::Io { .. })),
        "{below:?}"
    );
}

/// A file's permission bits.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_data_dir_or_store_file_open_to_others_is_refused_with_the_fix() {
    // The files are made here, not by a store: SQLite removes its log when a store's last
    // connection closes, on a thread of its own, so a log written after `close` could vanish
    // under the test.
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    set_mode(&data_dir, 0o700);
    // (path, too open a mode, the mode to give back, the chmod the message asks for)
    let database = data_dir.join(DATABASE_FILE);
    let log = data_dir.join(format!("{DATABASE_FILE}-wal"));
    for file in [&database, &log] {
        std::fs::write(file, b"").unwrap();
        set_mode(file, 0o600);
    }
    let cases = [
        (&data_dir, 0o755, 0o700, "chmod 700"),
        (&data_dir, 0o710, 0o700, "chmod 700"),
        (&database, 0o644, 0o600, "chmod 600"),
        (&database, 0o660, 0o600, "chmod 600"),
        (&log, 0o604, 0o600, "chmod 600"),
    ];
    for (path, open, private, chmod) in cases {
        set_mode(path, open);
        let error = Store::open(&data_dir, Creation::Allowed)
            .await
            .unwrap_err()
            .to_string();
        let shown = path.display();
        for needed in [
            format!("`{shown}`"),
            format!("mode {open:04o}"),
            format!("`{chmod} {shown}`"),
        ] {
            assert!(error.contains(&needed), "{needed} missing from: {error}");
        }
        set_mode(path, private);
    }
    Store::open(&data_dir, Creation::Allowed)
        .await
        .unwrap()
        .close()
        .await;
}

#[tokio::test]
async fn on_sqlite_no_commit_copies_the_log_into_the_file_fold_log_does() {
    let Fixture {
        _dir,
        data_dir,
        database: _,
        store,
    } = fixture(Database::Sqlite).await;
    let file = data_dir.join(DATABASE_FILE);
    let size = || std::fs::metadata(&file).unwrap().len();
    let before = size();
    // More than the 1,000 pages of log past which SQLite's default has the committing
    // connection copy the log into the file.
    commit_page_rows(&store, "all", 1_200).await;
    assert_eq!(size(), before, "a commit copied the log into the file");
    store.fold_log().await.unwrap();
    assert!(size() > before + 1_200 * 4_000, "{} after {before}", size());
}

/// Commits `count` rows of about a page each (sign-in codes of users named by `batch`), one
/// commit each.
async fn commit_page_rows(store: &Store, batch: &str, count: usize) {
    let page = "h".repeat(4_000);
    for n in 0..count {
        let email = format!("user-{batch}-{n}@example.com");
        store
            .put_email_code(A, &email, &page, (NOW, NOW + 900), 3)
            .await
            .unwrap();
    }
}

/// Once folded, the log starts over from its beginning even while the writer goes on
/// committing: a writer that never pauses (the portal's under load) never finds the log wholly
/// copied by a fold beside it, and would append to it for the whole minute between the
/// checkpoints that empty it, hundreds of megabytes, each write into new space the kernel must
/// allocate and zero first.
#[tokio::test]
async fn on_sqlite_the_log_starts_over_once_folded_while_commits_go_on() {
    const ROUND: usize = 200;
    const ROUNDS: usize = 8;
    let Fixture {
        _dir,
        data_dir,
        database: _,
        store,
    } = fixture(Database::Sqlite).await;
    let log = data_dir.join(format!("{DATABASE_FILE}-wal"));
    let size = || std::fs::metadata(&log).unwrap().len();
    let mut first_round = 0;
    for round in 0..ROUNDS {
        // A round's commits with the fold running beside them.
        let batch = round.to_string();
        let (_, folded) = tokio::join!(commit_page_rows(&store, &batch, ROUND), store.fold_log());
        folded.unwrap();
        if round == 0 {
            first_round = size();
        }
    }
    // Without the restart the log grows by a round's worth every round, to eight times the
    // first. With it the log stays near the first round's size, plus one round for each fold
    // whose restart ran out of patience (a commit held the writer's lock past it, as a slow
    // disk sync does on a busy machine), after which the next round appended. Half the
    // rounds tells the two apart with room for a few such misses.
    assert!(
        size() < (ROUNDS as u64 / 2) * first_round,
        "the log grew from {first_round} bytes after the first round to {} after {ROUNDS}",
        size()
    );
}

#[tokio::test]
async fn a_withdrawn_grants_preshared_key_is_gone_from_the_files_after_a_checkpoint() {
    let Fixture {
        _dir,
        data_dir,
        database: _,
        store,
    } = fixture(Database::Sqlite).await;
    let world = populate(&store, A, 1).await;
    // The detail as the broker writes it holds the signed grant with the pair's key.
    let grant = |id: &str| {
        let key = STANDARD.encode(Sha256::digest(id.as_bytes()));
        let record = GrantRecord {
            id: id.to_owned(),
            detail: Some(format!(
                r#"{{"signed":{{"grant":{{"preshared_key":"{key}"}}}},"session":{{}}}}"#
            )),
            ..world.grant.clone()
        };
        (record, key)
    };
    let contains = |path: PathBuf, key: &str| {
        let bytes = std::fs::read(path).unwrap_or_default();
        bytes.windows(key.len()).any(|w| w == key.as_bytes())
    };
    let database = || data_dir.join(DATABASE_FILE);
    let log = || data_dir.join(format!("{DATABASE_FILE}-wal"));

    // One grant reaches the database file itself (closing folds the log in; the database file
    // is read only while the store is closed, so as not to drop SQLite's locks on it) ...
    let (old, old_key) = grant("old");
    store.insert_grant(&old).await.unwrap();
    store.close().await;
    assert!(
        contains(database(), &old_key),
        "the search finds a stored key"
    );
    // ... the other lives in the log only.
    let store = Store::open(&data_dir, Creation::Allowed).await.unwrap();
    let (recent, recent_key) = grant("recent");
    store.insert_grant(&recent).await.unwrap();

    let withdraw = |record: &GrantRecord| Write::DeleteGrant {
        account: A.to_owned(),
        grant_id: record.id.clone(),
    };
    store
        .apply(&[withdraw(&old), withdraw(&recent)])
        .await
        .unwrap();
    assert!(
        contains(log(), &recent_key),
        "until a checkpoint, the log holds the pages as they were"
    );
    assert!(store.checkpoint().await.unwrap());
    for key in [&old_key, &recent_key] {
        assert!(
            !contains(log(), key),
            "the log holds a key after a checkpoint"
        );
    }
    // What was not withdrawn is still there, whole.
    assert_eq!(
        store.active_grants(A, NOW).await.unwrap(),
        vec![world.grant.clone()]
    );
    store.close().await;
    for key in [&old_key, &recent_key] {
        assert!(
            !contains(database(), key),
            "the database file still holds a withdrawn grant's key"
        );
    }
}

async fn a_restart_loses_nothing(database: Database) {
    let Fixture {
        _dir,
        data_dir,
        database,
        store,
    } = fixture(database).await;
    let world = populate(&store, A, 1).await;
    store
        .set_client_verified(A, &world.client.id, true)
        .await
        .unwrap();
    store
        .set_gateway_connected(A, &world.gateway.id, false, NOW + 10)
        .await
        .unwrap();
    store
        .set_memberships(A, "alice@example.com", "google", &["design".to_owned()])
        .await
        .unwrap();
    let revoked = store
        .create_token(A, client_kind(), "old", NOW + DAY, NOW)
        .await
        .unwrap();
    store.revoke_token(A, &revoked.id, NOW + 5).await.unwrap();

    let before = (
        store.list_tokens(A).await.unwrap(),
        store.list_clients(A).await.unwrap(),
        store.list_gateways(A).await.unwrap(),
        store.active_grants(A, NOW + 10).await.unwrap(),
        store.memberships(A, "alice@example.com").await.unwrap(),
        store.flows(&all_flows(A)).await.unwrap(),
    );
    // Drop without closing: whatever was committed must already be on disk.
    drop(store);

    let store = open(&data_dir, &database).await;
    let after = (
        store.list_tokens(A).await.unwrap(),
        store.list_clients(A).await.unwrap(),
        store.list_gateways(A).await.unwrap(),
        store.active_grants(A, NOW + 10).await.unwrap(),
        store.memberships(A, "alice@example.com").await.unwrap(),
        store.flows(&all_flows(A)).await.unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(after.0.len(), 3);
    assert!(after.1[0].verified);
    assert!(!after.2[0].connected);
    assert_eq!(after.3, vec![world.grant.clone()]);
    assert_eq!(group_names(&after.4), ["design", "eng"]);
    assert_eq!(after.5.len(), 1);

    let token = store
        .authenticate(&world.client_token.secret, NOW + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(token.id, world.client_token.id);
    assert!(
        store
            .authenticate(&revoked.secret, NOW + 10)
            .await
            .unwrap()
            .is_none()
    );
}

async fn authenticate_accepts_only_a_live_token_with_its_exact_secret(database: Database) {
    let Fixture {
        _dir,
        store,
        data_dir,
        database,
    } = fixture(database).await;
    let make = |account, kind, expires_at| {
        let store = store.clone();
        async move {
            store
                .create_token(account, kind, "t", expires_at, NOW)
                .await
                .unwrap()
        }
    };
    let live = make(A, client_kind(), NOW + DAY).await;
    let soon = make(A, client_kind(), NOW + 10).await;
    let revoked = make(A, client_kind(), NOW + DAY).await;
    store.revoke_token(A, &revoked.id, NOW + 1).await.unwrap();
    let site = TokenKind::Gateway {
        site: "hq".to_owned(),
    };
    let gateway = make(A, site.clone(), NOW + DAY).await;
    let other = make(B, client_kind(), NOW + DAY).await;

    let mut last_changed = live.secret.clone();
    let last = last_changed.pop().unwrap();
    last_changed.push(if last == 'A' { 'B' } else { 'A' });
    let (hash, _) = stored_hash_and_salt(&data_dir, &database, &live.id).await;

    let yes = |token: &NewToken, account: &str, kind: &TokenKind| -> Authenticated {
        Some((token.id.clone(), account.to_owned(), kind.clone()))
    };
    let client = client_kind();
    let secret = live.secret.clone();
    let cases = [
        ("live", secret.clone(), NOW, yes(&live, A, &client)),
        (
            "live, a second before expiry",
            secret.clone(),
            NOW + DAY - 1,
            yes(&live, A, &client),
        ),
        ("live, at expiry", secret.clone(), NOW + DAY, None),
        (
            "short-lived, in time",
            soon.secret.clone(),
            NOW + 9,
            yes(&soon, A, &client),
        ),
        ("short-lived, expired", soon.secret.clone(), NOW + 11, None),
        ("revoked", revoked.secret.clone(), NOW, None),
        (
            "revoked, before its revocation time",
            revoked.secret.clone(),
            NOW - 1,
            None,
        ),
        (
            "gateway token",
            gateway.secret.clone(),
            NOW,
            yes(&gateway, A, &site),
        ),
        (
            "another account's token",
            other.secret.clone(),
            NOW,
            yes(&other, B, &client),
        ),
        ("last character changed", last_changed, NOW, None),
        (
            "with a nonce it was not made for",
            format!("{}{secret}", nonce(1)),
            NOW,
            None,
        ),
        (
            "cut short",
            secret[..secret.len() - 1].to_owned(),
            NOW,
            None,
        ),
        ("the old form", format!("fzt_{}", "A".repeat(43)), NOW, None),
        ("empty", String::new(), NOW, None),
        ("the stored hash", hash, NOW, None),
        ("the token id", live.id.clone(), NOW, None),
    ];
    for (case, secret, now, expected) in cases {
        let got = store.authenticate(&secret, now).await.unwrap();
        let got = got.map(|t| (t.id, t.account, t.kind));
        assert_eq!(got, expected, "{case}");
    }
}

async fn a_signed_in_token_is_accepted_only_with_the_nonce_it_was_made_for(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let kind = TokenKind::Client {
        user: "alice@example.com".to_owned(),
        provider: Some("email".to_owned()),
    };
    let fragment = store
        .create_signed_in_token(
            A,
            kind.clone(),
            "laptop",
            (NOW + DAY, NOW),
            SignedIn {
                nonce: &nonce(1),
                identity: Some(("https://idp.example", "subject-1")),
            },
        )
        .await
        .unwrap();
    let found = store
        .authenticate(&format!("{}{}", nonce(1), fragment.secret), NOW)
        .await
        .unwrap();
    assert_eq!(
        found.map(|t| (t.id, t.kind)),
        Some((fragment.id.clone(), kind))
    );
    // The fragment is what travels through the browser: alone, or with another nonce, it is
    // worth nothing.
    for (case, text) in [
        ("the fragment alone", fragment.secret.clone()),
        ("another nonce", format!("{}{}", nonce(2), fragment.secret)),
        ("the nonce alone", nonce(1)),
    ] {
        let found = store.authenticate(&text, NOW).await.unwrap();
        assert!(found.is_none(), "{case}");
    }
    // A nonce that is not 32 bytes of base64url makes no token.
    let refused = store
        .create_signed_in_token(
            A,
            client_kind(),
            "t",
            (NOW + DAY, NOW),
            SignedIn {
                nonce: "short",
                identity: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.to_string(), "invalid sign-in nonce");
    assert_eq!(store.list_tokens(A).await.unwrap().len(), 1);
}

async fn every_secret_costs_one_check_whatever_it_is(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let live = store
        .create_token(A, client_kind(), "t", NOW + DAY, NOW)
        .await
        .unwrap();
    let revoked = store
        .create_token(A, client_kind(), "t", NOW + DAY, NOW)
        .await
        .unwrap();
    store.revoke_token(A, &revoked.id, NOW).await.unwrap();
    let inactive = store
        .create_inactive_token(A, client_kind(), "t", NOW + DAY, NOW)
        .await
        .unwrap();
    let unknown = format!("fzt_{}", "A".repeat(43));
    let forged = fz_portal::credential::TokenKey::from_seed([9; 32])
        .issue(fz_portal::credential::Label::Client, A, &live.id, None)
        .unwrap()
        .fragment;
    // Found or not, well formed or not: looked up, hashed and compared once each.
    let cases = [
        ("live", live.secret.as_str(), true),
        ("unknown", unknown.as_str(), false),
        ("made with another key", forged.as_str(), false),
        ("revoked", revoked.secret.as_str(), false),
        ("inactive", inactive.secret.as_str(), false),
        ("without its first character", &live.secret[1..], false),
        ("empty", "", false),
    ];
    for (case, secret, accepted) in cases {
        let before = store.token_checks();
        let got = store.authenticate(secret, NOW).await.unwrap();
        assert_eq!(got.is_some(), accepted, "{case}");
        assert_eq!(store.token_checks(), before + 1, "{case}");
    }
}

async fn a_token_made_inactive_is_refused_until_activated_even_across_a_restart(
    database: Database,
) {
    let Fixture {
        _dir,
        data_dir,
        database,
        store,
    } = fixture(database).await;
    let token = store
        .create_inactive_token(A, client_kind(), "laptop", NOW + DAY, NOW)
        .await
        .unwrap();
    // The maker dies here, before or after showing the secret: the token stays unusable.
    store.close().await;
    drop(store);
    let store = open(&data_dir, &database).await;
    assert!(
        store
            .authenticate(&token.secret, NOW)
            .await
            .unwrap()
            .is_none()
    );
    let refused = store
        .register_client(A, &token.id, &key(1), NOW)
        .await
        .unwrap_err();
    assert_eq!(refused.to_string(), "token was never activated");
    let listed = store.list_tokens(A).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].activated_at, None);

    // Activated, it is a token like any other; activating again changes nothing.
    store.activate_token(A, &token.id, NOW + 1).await.unwrap();
    store.activate_token(A, &token.id, NOW + 2).await.unwrap();
    assert_eq!(
        store.list_tokens(A).await.unwrap()[0].activated_at,
        Some(NOW + 1)
    );
    let found = store.authenticate(&token.secret, NOW + 3).await.unwrap();
    assert_eq!(found.map(|t| t.id), Some(token.id.clone()));
    store
        .register_client(A, &token.id, &key(1), NOW + 3)
        .await
        .unwrap();

    // Only its own account activates it, and a revoked token stays revoked.
    assert!(matches!(
        store.activate_token(B, &token.id, NOW).await,
        Err(StoreError::NotFound(_))
    ));
    let other = store
        .create_inactive_token(A, client_kind(), "phone", NOW + DAY, NOW)
        .await
        .unwrap();
    store.revoke_token(A, &other.id, NOW).await.unwrap();
    assert!(matches!(
        store.activate_token(A, &other.id, NOW).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(
        store
            .authenticate(&other.secret, NOW)
            .await
            .unwrap()
            .is_none()
    );
    // Tokens made live at once are active from their creation.
    let live = store
        .create_token(A, client_kind(), "t", NOW + DAY, NOW)
        .await
        .unwrap();
    let listed = store.list_tokens(A).await.unwrap();
    let live = listed.iter().find(|t| t.id == live.id).unwrap();
    assert_eq!(live.activated_at, Some(NOW));
}

async fn secrets_look_right_and_differ(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let mut secrets = Vec::new();
    for _ in 0..20 {
        let token = store
            .create_token(A, client_kind(), "t", NOW + DAY, NOW)
            .await
            .unwrap();
        // `fz1.<kind>.<account>.<id>.<secret>.<mac>`: 32 random bytes and a MAC, each in
        // unpadded base64url.
        let fields: Vec<&str> = token.secret.split('.').collect();
        assert_eq!(fields[..4], ["fz1", "client", A, token.id.as_str()]);
        for random in &fields[4..] {
            assert_eq!(random.len(), 43, "32 bytes in unpadded base64");
            assert!(
                random
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
        }
        assert_eq!(fields.len(), 6);
        assert!(
            !format!("{token:?}").contains(fields[4]),
            "Debug hides the secret"
        );
        secrets.push(token.secret);
    }
    secrets.sort();
    secrets.dedup();
    assert_eq!(secrets.len(), 20);
}

#[tokio::test]
async fn the_database_never_contains_a_secret() {
    let Fixture {
        _dir,
        data_dir,
        database: _,
        store,
    } = fixture(Database::Sqlite).await;
    let world = populate(&store, A, 1).await;
    let secrets = [&world.client_token.secret, &world.gateway_token.secret];
    for secret in secrets {
        store.authenticate(secret, NOW).await.unwrap().unwrap();
    }
    // While the store is open the recent writes sit in the write-ahead log, the only file read
    // then: opening and closing the database file itself from this process would drop SQLite's
    // POSIX locks on it. Once closed, everything is in the database file.
    for phase in ["open", "closed"] {
        let files = if phase == "open" {
            vec![data_dir.join(format!("{DATABASE_FILE}-wal"))]
        } else {
            store.close().await;
            vec![data_dir.join(DATABASE_FILE)]
        };
        let contents: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        let contain = |needle: &[u8]| {
            contents
                .iter()
                .any(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
        };
        for secret in secrets {
            let random_part = secret.split('.').nth(4).unwrap();
            let mac = secret.split('.').nth(5).unwrap();
            assert!(!contain(secret.as_bytes()), "{phase}: token found");
            assert!(
                !contain(random_part.as_bytes()),
                "{phase}: its secret found"
            );
            assert!(!contain(mac.as_bytes()), "{phase}: its MAC found");
        }
    }
    // The search does find what is there: the salted hash.
    for (secret, id) in secrets
        .iter()
        .zip([&world.client_token.id, &world.gateway_token.id])
    {
        let (hash, salt) = stored_hash_and_salt(&data_dir, &Database::Sqlite, id).await;
        assert_eq!(fz_portal::credential::stored_hash("", secret, &salt), hash);
        let file = std::fs::read(data_dir.join(DATABASE_FILE)).unwrap();
        assert!(file.windows(64).any(|window| window == hash.as_bytes()));
    }
    // The log, if sqlx has not finished closing a connection yet, is empty: it was truncated.
    match std::fs::read(data_dir.join(format!("{DATABASE_FILE}-wal"))) {
        Ok(bytes) => assert!(bytes.is_empty()),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound),
    }
}

async fn accounts_are_isolated(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    let b = populate(&store, B, 11).await;
    let not_found = |r: Result<(), StoreError>| match r {
        Err(StoreError::NotFound(entity)) => entity.to_string(),
        other => panic!("expected not found, got {other:?}"),
    };

    // Nothing of A can be reached through B.
    assert_eq!(
        not_found(store.revoke_token(B, &a.client_token.id, NOW).await),
        "token"
    );
    assert_eq!(
        not_found(store.revoke_token(B, &a.gateway_token.id, NOW).await),
        "token"
    );
    assert_eq!(
        not_found(
            store
                .set_client_verified(B, &a.client.id, true)
                .await
                .map(drop)
        ),
        "client"
    );
    assert_eq!(
        not_found(
            store
                .set_gateway_connected(B, &a.gateway.id, false, NOW)
                .await
        ),
        "gateway"
    );
    assert_eq!(store.client(B, &a.client.id).await.unwrap(), None);
    assert_eq!(store.gateway(B, &a.gateway.id).await.unwrap(), None);
    assert!(!store.delete_grant(B, &a.grant.id).await.unwrap());
    assert_eq!(
        store
            .delete_grants(B, std::slice::from_ref(&a.grant.id))
            .await
            .unwrap(),
        0
    );
    let register = store
        .register_client(B, &a.client_token.id, &key(50), NOW)
        .await
        .map(|_| ());
    assert_eq!(not_found(register), "token");
    let register = store
        .register_gateway(B, &a.gateway_token.id, &key(51), &[], NOW)
        .await
        .map(|_| ());
    assert_eq!(not_found(register), "token");
    let mut grant = a.grant.clone();
    grant.id = "stolen".to_owned();
    grant.account = B.to_owned();
    assert_eq!(not_found(store.insert_grant(&grant).await), "client");
    let mut grant = b.grant.clone();
    grant.id = "mixed".to_owned();
    grant.gateway_id = a.gateway.id.clone();
    assert_eq!(not_found(store.insert_grant(&grant).await), "gateway");

    // Every listing of B shows B's own and nothing of A's.
    for (own, other) in [(&b, &a), (&a, &b)] {
        let account = own.account;
        let tokens = store.list_tokens(account).await.unwrap();
        let ids: Vec<_> = tokens.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [own.client_token.id.as_str(), own.gateway_token.id.as_str()]
        );
        assert_eq!(
            store.list_clients(account).await.unwrap(),
            vec![own.client.clone()]
        );
        let gateways = store.list_gateways(account).await.unwrap();
        assert_eq!(gateways.len(), 1);
        assert_eq!(gateways[0].id, own.gateway.id);
        assert_eq!(
            store.active_grants(account, NOW).await.unwrap(),
            vec![own.grant.clone()]
        );
        let flows = store.flows(&all_flows(account)).await.unwrap();
        assert!(flows.iter().all(|f| f.account == account));
        assert_eq!(flows.len(), 1);
        assert!(
            store
                .client(account, &other.client.id)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(store.list_tokens("nobody").await.unwrap().is_empty());
    assert!(
        store
            .memberships("nobody", "alice@example.com")
            .await
            .unwrap()
            .is_empty()
    );

    // A is untouched by everything tried through B.
    let client = store.client(A, &a.client.id).await.unwrap().unwrap();
    assert!(!client.verified);
    assert!(store.list_gateways(A).await.unwrap()[0].connected);
    let token = store
        .authenticate(&a.client_token.secret, NOW)
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.account), Some(A.to_owned()));
}

/// A write that must fail and leave the store exactly as it was.
#[derive(Debug)]
enum BadWrite {
    EnsureEmptyAccount,
    CreateTokenInUnknownAccount,
    CreateExpiredToken,
    RevokeOtherAccountsToken,
    RegisterClientWithOtherAccountsToken,
    RegisterClientWithGatewayToken,
    RegisterClientWithRevokedToken,
    RegisterClientWithExpiredToken,
    RegisterClientWithBadKey,
    RegisterClientWithAnotherClientsKey,
    RegisterGatewayWithClientToken,
    RegisterGatewayWithBadEndpoint,
    VerifyOtherAccountsClient,
    ConnectOtherAccountsGateway,
    MembershipsWithEmptyGroupHalfway,
    MembershipsOfNewUserWithEmptyGroupHalfway,
    MembershipsInUnknownAccount,
    GrantAcrossAccounts,
    GrantWithUnknownGateway,
    GrantTwice,
    GrantExpiringBeforeIssued,
    FlowsWithOneInUnknownAccount,
    FlowInUnknownAccount,
}

/// What [`BadWrite`] cases work on.
struct Scene {
    a: World,
    spare_client_token: NewToken,
    revoked_client_token: NewToken,
}

impl BadWrite {
    async fn run(&self, store: &Store, scene: &Scene) -> Result<(), StoreError> {
        let a = &scene.a;
        match self {
            BadWrite::EnsureEmptyAccount => store.ensure_account("").await,
            BadWrite::CreateTokenInUnknownAccount => store
                .create_token("nobody", client_kind(), "t", NOW + DAY, NOW)
                .await
                .map(drop),
            BadWrite::CreateExpiredToken => store
                .create_token(A, client_kind(), "t", NOW, NOW)
                .await
                .map(drop),
            BadWrite::RevokeOtherAccountsToken => {
                store.revoke_token(B, &a.client_token.id, NOW).await
            }
            BadWrite::RegisterClientWithOtherAccountsToken => store
                .register_client(B, &scene.spare_client_token.id, &key(90), NOW)
                .await
                .map(drop),
            BadWrite::RegisterClientWithGatewayToken => store
                .register_client(A, &a.gateway_token.id, &key(90), NOW)
                .await
                .map(drop),
            BadWrite::RegisterClientWithRevokedToken => store
                .register_client(A, &scene.revoked_client_token.id, &key(90), NOW)
                .await
                .map(drop),
            BadWrite::RegisterClientWithExpiredToken => store
                .register_client(A, &scene.spare_client_token.id, &key(90), NOW + DAY)
                .await
                .map(drop),
            BadWrite::RegisterClientWithBadKey => store
                .register_client(A, &a.client_token.id, "bm90IGEga2V5", NOW)
                .await
                .map(drop),
            BadWrite::RegisterClientWithAnotherClientsKey => store
                .register_client(A, &scene.spare_client_token.id, &a.client.public_key, NOW)
                .await
                .map(drop),
            BadWrite::RegisterGatewayWithClientToken => store
                .register_gateway(A, &scene.spare_client_token.id, &key(91), &[], NOW)
                .await
                .map(drop),
            BadWrite::RegisterGatewayWithBadEndpoint => store
                .register_gateway(
                    A,
                    &a.gateway_token.id,
                    &key(91),
                    &["192.0.2.1:51820".to_owned(), "gateway.example".to_owned()],
                    NOW,
                )
                .await
                .map(drop),
            BadWrite::VerifyOtherAccountsClient => store
                .set_client_verified(B, &a.client.id, true)
                .await
                .map(drop),
            BadWrite::ConnectOtherAccountsGateway => {
                store
                    .set_gateway_connected(B, &a.gateway.id, false, NOW)
                    .await
            }
            BadWrite::MembershipsWithEmptyGroupHalfway => {
                let groups = ["ops".to_owned(), String::new()];
                store
                    .set_memberships(A, "alice@example.com", "okta", &groups)
                    .await
            }
            BadWrite::MembershipsOfNewUserWithEmptyGroupHalfway => {
                let groups = ["ops".to_owned(), String::new()];
                store
                    .set_memberships(A, "bob@example.com", "okta", &groups)
                    .await
            }
            BadWrite::MembershipsInUnknownAccount => {
                let groups = ["ops".to_owned()];
                store
                    .set_memberships("nobody", "bob@example.com", "okta", &groups)
                    .await
            }
            BadWrite::GrantAcrossAccounts => {
                let mut grant = a.grant.clone();
                grant.id = "new".to_owned();
                grant.account = B.to_owned();
                store.insert_grant(&grant).await
            }
            BadWrite::GrantWithUnknownGateway => {
                let mut grant = a.grant.clone();
                grant.id = "new".to_owned();
                grant.gateway_id = "gw_nope".to_owned();
                store.insert_grant(&grant).await
            }
            BadWrite::GrantTwice => store.insert_grant(&a.grant).await,
            BadWrite::GrantExpiringBeforeIssued => {
                let mut grant = a.grant.clone();
                grant.id = "new".to_owned();
                grant.expires_at = grant.issued_at - 1;
                store.insert_grant(&grant).await
            }
            BadWrite::FlowsWithOneInUnknownAccount => store
                .record_flows(&[
                    flow(A, NOW, "alice@example.com", "gitlab", true, "ok"),
                    flow("nobody", NOW, "alice@example.com", "gitlab", true, "bad"),
                ])
                .await
                .map(drop),
            BadWrite::FlowInUnknownAccount => store
                .record_flow(&flow("nobody", NOW, "a@b", "gitlab", false, "bad"))
                .await
                .map(drop),
        }
    }
}

async fn a_failed_write_leaves_nothing_behind(database: Database) {
    use BadWrite::*;
    let Fixture {
        _dir,
        data_dir,
        database,
        store,
    } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    populate(&store, B, 11).await;
    let spare_client_token = store
        .create_token(A, client_kind(), "spare", NOW + DAY, NOW)
        .await
        .unwrap();
    let revoked_client_token = store
        .create_token(A, client_kind(), "revoked", NOW + DAY, NOW)
        .await
        .unwrap();
    store
        .revoke_token(A, &revoked_client_token.id, NOW)
        .await
        .unwrap();
    let scene = Scene {
        a,
        spare_client_token,
        revoked_client_token,
    };

    let cases = [
        (EnsureEmptyAccount, "invalid account slug"),
        (CreateTokenInUnknownAccount, "account not found"),
        (
            CreateExpiredToken,
            "invalid token expiry: it must be in the future",
        ),
        (RevokeOtherAccountsToken, "token not found"),
        (RegisterClientWithOtherAccountsToken, "token not found"),
        (
            RegisterClientWithGatewayToken,
            "token is not a client token",
        ),
        (RegisterClientWithRevokedToken, "token is revoked"),
        (RegisterClientWithExpiredToken, "token has expired"),
        (
            RegisterClientWithBadKey,
            "invalid public key: it must be 32 bytes in base64",
        ),
        (
            RegisterClientWithAnotherClientsKey,
            "client public key is already registered in this account",
        ),
        (
            RegisterGatewayWithClientToken,
            "token is not a gateway token",
        ),
        (
            RegisterGatewayWithBadEndpoint,
            "invalid endpoint: it must be a socket address",
        ),
        (VerifyOtherAccountsClient, "client not found"),
        (ConnectOtherAccountsGateway, "gateway not found"),
        (MembershipsWithEmptyGroupHalfway, "invalid group name"),
        (
            MembershipsOfNewUserWithEmptyGroupHalfway,
            "invalid group name",
        ),
        (MembershipsInUnknownAccount, "account not found"),
        (GrantAcrossAccounts, "client not found"),
        (GrantWithUnknownGateway, "gateway not found"),
        (GrantTwice, "grant already exists"),
        (
            GrantExpiringBeforeIssued,
            "invalid grant expiry: it is before its issue time",
        ),
        (FlowsWithOneInUnknownAccount, "account not found"),
        (FlowInUnknownAccount, "account not found"),
    ];
    for (case, message) in cases {
        let before = snapshot(&data_dir, &database).await;
        let error = case.run(&store, &scene).await.unwrap_err();
        assert_eq!(error.to_string(), message, "{case:?}");
        assert_eq!(
            snapshot(&data_dir, &database).await,
            before,
            "{case:?} wrote something"
        );
    }
    // The case that failed halfway kept alice's groups.
    assert_eq!(
        group_names(&store.memberships(A, "alice@example.com").await.unwrap()),
        ["eng"]
    );
}

async fn memberships_are_replaced_per_provider(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let groups = |names: &[&str]| names.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
    // (email as the provider wrote it, provider, groups it says, alice's groups afterwards)
    let steps: &[(&str, &str, &[&str], &[&str])] = &[
        (
            "alice@example.com",
            "okta",
            &["eng", "ops"],
            &["eng", "ops"],
        ),
        (
            "Alice@Example.COM",
            "google",
            &["eng", "design"],
            &["design", "eng", "ops"],
        ),
        (
            "alice@example.com",
            "okta",
            &["sre"],
            &["design", "eng", "sre"],
        ),
        ("alice@example.com", "google", &[], &["sre"]),
        ("bob@example.com", "okta", &["admins"], &["sre"]),
        (
            "alice@example.com",
            "okta",
            &["sre", "sre", "eng"],
            &["eng", "sre"],
        ),
    ];
    for (step, (email, provider, said, expected)) in steps.iter().enumerate() {
        store
            .set_memberships(A, email, provider, &groups(said))
            .await
            .unwrap();
        let alice = store.memberships(A, "ALICE@example.com").await.unwrap();
        assert_eq!(group_names(&alice), groups(expected), "step {step}");
    }
    let alice = store.memberships(A, "alice@example.com").await.unwrap();
    let as_said: Vec<(&str, &str)> = alice
        .iter()
        .map(|g| (g.provider.as_str(), g.group.as_str()))
        .collect();
    assert_eq!(as_said, [("okta", "eng"), ("okta", "sre")]);
    assert_eq!(
        group_names(&store.memberships(A, "bob@example.com").await.unwrap()),
        ["admins"]
    );
    assert!(
        store
            .memberships(B, "alice@example.com")
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_client_registers_once_per_token_and_its_mark_stays_with_its_key(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let token = store
        .create_token(A, client_kind(), "alice's laptop", NOW + DAY, NOW)
        .await
        .unwrap();
    let first = store
        .register_client(A, &token.id, &key(1), NOW)
        .await
        .unwrap();
    assert_eq!(first.name, "alice's laptop");
    assert_eq!(first.token_id, token.id);
    assert!(!first.verified);
    assert_eq!(first.verified_key, None);
    let marked = store.set_client_verified(A, &first.id, true).await.unwrap();
    assert!(marked.verified);
    assert_eq!(marked.verified_key, Some(key(1)));
    let (_, before) = store.verified_changes_since(0).await.unwrap();

    // The same token from another machine, with that machine's key: the same client, not
    // verified. Whether it is verified changed, so a running portal decides its grants again.
    let copied = store
        .register_client(A, &token.id, &key(2), NOW + 5)
        .await
        .unwrap();
    assert_eq!(copied.id, first.id);
    assert_eq!(copied.public_key, key(2));
    assert!(!copied.verified);
    assert_eq!(copied.verified_key, Some(key(1)));
    assert_eq!(copied.created_at, NOW);
    assert_eq!(store.list_clients(A).await.unwrap(), vec![copied.clone()]);
    assert!(store.verified_keys().await.unwrap().is_empty());
    let (changed, after_copy) = store.verified_changes_since(before).await.unwrap();
    assert_eq!(changed, std::slice::from_ref(&first.id));

    // The marked device comes back with its own key: verified again, and that is a change too.
    let back = store
        .register_client(A, &token.id, &key(1), NOW + 9)
        .await
        .unwrap();
    assert!(back.verified);
    assert_eq!(store.client(A, &first.id).await.unwrap().unwrap(), back);
    let (changed, after_return) = store.verified_changes_since(after_copy).await.unwrap();
    assert_eq!(changed, std::slice::from_ref(&first.id));
    assert!(after_return > after_copy);
    // Registering again with the same key changes nothing.
    store
        .register_client(A, &token.id, &key(1), NOW + 10)
        .await
        .unwrap();
    assert_eq!(
        store.verified_changes_since(after_return).await.unwrap(),
        (vec![], after_return)
    );

    let unmarked = store
        .set_client_verified(A, &first.id, false)
        .await
        .unwrap();
    assert!(!unmarked.verified);
    assert_eq!(unmarked.verified_key, None);
    let read = store.client(A, &first.id).await.unwrap().unwrap();
    assert!(!read.verified);
    // An unmarked client's key changes are no mark changes.
    let (_, unmarked_at) = store.verified_changes_since(0).await.unwrap();
    store
        .register_client(A, &token.id, &key(3), NOW + 11)
        .await
        .unwrap();
    assert_eq!(
        store.verified_changes_since(unmarked_at).await.unwrap(),
        (vec![], unmarked_at)
    );

    // The same key in another account is another peer on other gateways: allowed.
    let other = store
        .create_token(B, client_kind(), "t", NOW + DAY, NOW)
        .await
        .unwrap();
    store
        .register_client(B, &other.id, &key(2), NOW)
        .await
        .unwrap();
}

#[tokio::test]
async fn marks_given_before_marks_had_keys_are_for_the_key_the_client_had() {
    // A store as the portal left it before verified marks had keys: the first two
    // migrations, a marked client and an unmarked one.
    let dir = TempDir::new().unwrap();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for name in ["0001_store.sql", "0002_client_identity.sql"] {
        std::fs::copy(source.join(name), migrations.join(name)).unwrap();
    }
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    set_mode(&data_dir, 0o700);
    std::fs::write(data_dir.join(DATABASE_FILE), b"").unwrap();
    set_mode(&data_dir.join(DATABASE_FILE), 0o600);
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join(DATABASE_FILE))
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = SqlitePool::connect_with(options).await.unwrap();
    sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO accounts (slug) VALUES ('acme')")
        .execute(&pool)
        .await
        .unwrap();
    for (n, name) in [(1_u8, "laptop"), (2, "phone")] {
        sqlx::query(
            "INSERT INTO tokens (id, account, kind, name, secret_hash, created_at, expires_at,
                                 user_email)
             VALUES ('tok_' || ?1, 'acme', 'client', ?2, printf('%064d', ?1), ?3, ?4,
                     'a@example.com')",
        )
        .bind(i64::from(n))
        .bind(name)
        .bind(NOW)
        .bind(NOW + DAY)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO clients (id, account, token_id, name, public_key, verified, created_at,
                                  tunnel_index, verified_seq)
             VALUES ('cli_' || ?1, 'acme', 'tok_' || ?1, ?2, ?3, ?1 = 1, ?4, ?1, ?1 = 1)",
        )
        .bind(i64::from(n))
        .bind(name)
        .bind(key(n))
        .bind(NOW)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let store = Store::open(&data_dir, Creation::Allowed).await.unwrap();
    let clients = store.list_clients(A).await.unwrap();
    let marks: Vec<(&str, bool, Option<&str>)> = clients
        .iter()
        .map(|c| (c.id.as_str(), c.verified, c.verified_key.as_deref()))
        .collect();
    let marked = key(1);
    assert_eq!(
        marks,
        [
            ("cli_1", true, Some(marked.as_str())),
            ("cli_2", false, None)
        ]
    );
    // Tokens of that time had the old form (unsalted `fzt_` secrets): the upgrade revoked them.
    let tokens = store.list_tokens(A).await.unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.revoked_at.is_some()));
    let refused = store
        .register_client(A, "tok_1", &key(1), NOW + 1)
        .await
        .unwrap_err();
    assert_eq!(refused.to_string(), "token is revoked");
}

async fn a_gateway_takes_its_site_from_its_token_and_tracks_its_connection(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let kind = |site: &str| TokenKind::Gateway {
        site: site.to_owned(),
    };
    let hq = store
        .create_token(A, kind("hq"), "hq-1", NOW + DAY, NOW)
        .await
        .unwrap();
    let lab = store
        .create_token(A, kind("lab"), "lab-1", NOW + DAY, NOW)
        .await
        .unwrap();
    let endpoints = vec![
        "192.0.2.1:51820".to_owned(),
        "[2001:db8::1]:51820".to_owned(),
    ];
    let gw = store
        .register_gateway(A, &lab.id, &key(3), &endpoints, NOW)
        .await
        .unwrap();
    assert_eq!((gw.site.as_str(), gw.name.as_str()), ("lab", "lab-1"));
    assert_eq!(gw.endpoints, endpoints);
    assert!(gw.connected);
    assert_eq!(gw.last_seen, NOW);
    store
        .register_gateway(A, &hq.id, &key(4), &[], NOW)
        .await
        .unwrap();

    // (connected, now, expected connected, expected last_seen)
    let steps = [
        (true, NOW + 10, true, NOW + 10),
        (false, NOW + 20, false, NOW + 10),
        (true, NOW + 30, true, NOW + 30),
        (true, NOW + 40, true, NOW + 40),
    ];
    for (connected, now, expect_connected, expect_seen) in steps {
        store
            .set_gateway_connected(A, &gw.id, connected, now)
            .await
            .unwrap();
        let read = store.gateway(A, &gw.id).await.unwrap().unwrap();
        assert_eq!(
            (read.connected, read.last_seen),
            (expect_connected, expect_seen)
        );
    }

    // Registering again keeps the id and replaces key and endpoints.
    let again = store
        .register_gateway(A, &lab.id, &key(5), &[], NOW + 50)
        .await
        .unwrap();
    assert_eq!(again.id, gw.id);
    assert_eq!(again.public_key, key(5));
    assert!(again.endpoints.is_empty());
    assert_eq!(again.created_at, NOW);

    let sites: Vec<_> = store
        .list_gateways(A)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.site)
        .collect();
    assert_eq!(sites, ["hq", "lab"]);
    // Each connection is this replica's; a gateway not heard from since a moment is on no
    // live replica, and a replica that stops lets go of its own.
    assert_eq!(again.replica.as_deref(), Some(store.replica()));
    let lost = store.mark_lost_gateways_disconnected(NOW + 50).await;
    assert_eq!(lost.unwrap(), 1);
    assert!(store.gateway(A, &gw.id).await.unwrap().unwrap().connected);
    assert_eq!(store.release_gateways().await.unwrap(), 1);
    assert!(
        store
            .list_gateways(A)
            .await
            .unwrap()
            .iter()
            .all(|g| !g.connected)
    );
}

async fn grants_expire_and_are_deleted(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    let b = populate(&store, B, 11).await;
    let grant = |id: &str, world: &World, expires_at: i64| GrantRecord {
        id: id.to_owned(),
        expires_at,
        ..world.grant.clone()
    };
    // `populate` made grant-acme and grant-globex, expiring at NOW + 3603.
    for g in [
        grant("a1", &a, NOW + 100),
        grant("a2", &a, NOW + 200),
        grant("b1", &b, NOW + 100),
    ] {
        store.insert_grant(&g).await.unwrap();
    }
    let active = |now| {
        let store = store.clone();
        async move {
            let ids: Vec<String> = store
                .active_grants(A, now)
                .await
                .unwrap()
                .into_iter()
                .map(|g| g.id)
                .collect();
            ids
        }
    };
    // (now, A's active grants)
    let cases: &[(i64, &[&str])] = &[
        (NOW, &["a1", "a2", "grant-acme"]),
        (NOW + 99, &["a1", "a2", "grant-acme"]),
        (NOW + 100, &["a2", "grant-acme"]),
        (NOW + 3602, &["grant-acme"]),
        (NOW + 3603, &[]),
    ];
    for (now, expected) in cases {
        let mut got = active(*now).await;
        got.sort();
        assert_eq!(got, *expected, "at NOW + {}", now - NOW);
    }

    assert_eq!(store.delete_expired_grants(NOW + 100).await.unwrap(), 2);
    assert_eq!(store.active_grants(B, NOW).await.unwrap().len(), 1);
    assert!(store.delete_grant(A, "a2").await.unwrap());
    assert!(!store.delete_grant(A, "a2").await.unwrap());
    let ids = [
        "grant-acme".to_owned(),
        "a2".to_owned(),
        "grant-globex".to_owned(),
    ];
    assert_eq!(store.delete_grants(A, &ids).await.unwrap(), 1);
    assert!(active(NOW).await.is_empty());
    assert_eq!(
        store.active_grants(B, NOW).await.unwrap(),
        vec![b.grant.clone()]
    );
}

async fn flows_filter_and_come_newest_first(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    // Recorded out of time order, with ties on time.
    let recorded = store
        .record_flows(&[
            flow(A, NOW + 20, "alice@example.com", "gitlab", true, "f1"),
            flow(A, NOW + 10, "bob@example.com", "gitlab", false, "f2"),
            flow(A, NOW + 30, "Alice@Example.com", "jenkins", false, "f3"),
            flow(A, NOW + 20, "bob@example.com", "jenkins", true, "f4"),
            flow(
                B,
                NOW + 40,
                "alice@example.com",
                "gitlab",
                true,
                "other account",
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        recorded[2].user, "alice@example.com",
        "emails are stored lowercase"
    );
    assert_eq!(recorded[1].rule_id, None);
    let single = store
        .record_flow(&flow(A, NOW + 5, "carol@example.com", "wiki", false, "f5"))
        .await
        .unwrap();
    assert!(single.id > recorded[4].id);

    let filter = |f: FlowFilter| FlowFilter {
        account: A.to_owned(),
        ..f
    };
    let user = |u: &str| Some(u.to_owned());
    let cases: Vec<(&str, FlowFilter, &[&str])> = vec![
        (
            "all",
            filter(FlowFilter::default()),
            &["f3", "f4", "f1", "f2", "f5"],
        ),
        (
            "user, any case",
            filter(FlowFilter {
                user: user("ALICE@example.com"),
                ..Default::default()
            }),
            &["f3", "f1"],
        ),
        (
            "resource",
            filter(FlowFilter {
                resource: user("gitlab"),
                ..Default::default()
            }),
            &["f1", "f2"],
        ),
        (
            "denies",
            filter(FlowFilter {
                decision: Some(Decision::Deny),
                ..Default::default()
            }),
            &["f3", "f2", "f5"],
        ),
        (
            "allows",
            filter(FlowFilter {
                decision: Some(Decision::Allow),
                ..Default::default()
            }),
            &["f4", "f1"],
        ),
        (
            "since, inclusive",
            filter(FlowFilter {
                since: Some(NOW + 20),
                ..Default::default()
            }),
            &["f3", "f4", "f1"],
        ),
        (
            "limit keeps the newest",
            filter(FlowFilter {
                limit: Some(2),
                ..Default::default()
            }),
            &["f3", "f4"],
        ),
        (
            "limit zero",
            filter(FlowFilter {
                limit: Some(0),
                ..Default::default()
            }),
            &[],
        ),
        (
            "all filters at once",
            filter(FlowFilter {
                user: user("bob@example.com"),
                resource: user("jenkins"),
                decision: Some(Decision::Allow),
                since: Some(NOW + 20),
                limit: Some(10),
                ..Default::default()
            }),
            &["f4"],
        ),
        (
            "nobody",
            filter(FlowFilter {
                user: user("mallory@example.com"),
                ..Default::default()
            }),
            &[],
        ),
        ("other account", all_flows(B), &["other account"]),
        ("unknown account", all_flows("nobody"), &[]),
    ];
    for (case, filter, expected) in cases {
        let reasons: Vec<String> = store
            .flows(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.reason)
            .collect();
        assert_eq!(reasons, expected, "{case}");
    }
}

async fn records_serialize_as_flat_json(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let world = populate(&store, A, 1).await;
    let tokens = store.list_tokens(A).await.unwrap();
    let json = serde_json::to_value(&tokens).unwrap();
    assert_eq!(json[0]["kind"], "client");
    assert_eq!(json[1]["kind"], "gateway");
    assert_eq!(json[1]["site"], "hq");
    assert_eq!(json[1]["revoked_at"], serde_json::Value::Null);
    let text = json.to_string();
    assert!(!text.contains(&world.client_token.secret));
    let flows = serde_json::to_value(store.flows(&all_flows(A)).await.unwrap()).unwrap();
    assert_eq!(flows[0]["decision"], "allow");
    assert_eq!(flows[0]["user"], "alice@example.com");
}

/// Writers of two stores on one database (two portal replicas, or a portal and an admin
/// command), each with tasks on two threads.
async fn concurrent_writers_all_get_through(database: Database) {
    let Fixture {
        _dir,
        data_dir,
        database,
        store,
    } = fixture(database).await;
    let other = open(&data_dir, &database).await;
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let store = if i % 2 == 0 { &store } else { &other }.clone();
        tasks.push(tokio::spawn(async move {
            let token = store
                .create_token(A, client_kind(), "t", NOW + DAY, NOW)
                .await?;
            store.register_client(A, &token.id, &key(i), NOW).await?;
            let groups = [format!("g{i}")];
            store
                .set_memberships(A, "alice@example.com", &format!("idp{i}"), &groups)
                .await?;
            store
                .record_flow(&flow(A, NOW, "alice@example.com", "r", true, "f"))
                .await?;
            Ok::<_, StoreError>(())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let clients = store.list_clients(A).await.unwrap();
    let tunnel_indices: std::collections::BTreeSet<_> =
        clients.iter().map(|c| c.tunnel_index).collect();
    assert_eq!((clients.len(), tunnel_indices.len()), (32, 32));
    assert_eq!(
        store
            .memberships(A, "alice@example.com")
            .await
            .unwrap()
            .len(),
        32
    );
    assert_eq!(store.flows(&all_flows(A)).await.unwrap().len(), 32);
}

/// Grants handed out again count on the allow row that made each, however many arrive in one
/// batch and for however many grants; another grant's row, made in the same second, is left.
/// A session is one row for all the grants that name it, written again with a grant when it
/// is gone, read back with each grant, and deleted by the sweeper with the last grant that
/// names it; each account has its own.
async fn a_session_is_stored_once_for_its_grants_and_goes_with_the_last(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    let b = populate(&store, B, 11).await;
    let grant = |id: &str| GrantRecord {
        id: id.to_owned(),
        ..a.grant.clone()
    };
    store
        .apply(&[
            Write::InsertGrant(grant("a1")),
            Write::InsertGrant(grant("a2")),
        ])
        .await
        .unwrap();
    let sessions = |account: &'static str| {
        let store = store.clone();
        async move {
            let mut read: Vec<(String, Option<String>, Option<String>)> = store
                .active_grants(account, NOW)
                .await
                .unwrap()
                .into_iter()
                .map(|g| (g.id, g.session_id, g.session))
                .collect();
            read.sort();
            read
        }
    };
    let ours = (Some("ses-1".to_owned()), a.grant.session.clone());
    let expected: Vec<_> = ["a1", "a2", "grant-acme"]
        .map(|id| (id.to_owned(), ours.0.clone(), ours.1.clone()))
        .into();
    assert_eq!(sessions(A).await, expected);
    assert_eq!(
        sessions(B).await,
        [(
            "grant-globex".to_owned(),
            Some("ses-1".to_owned()),
            b.grant.session.clone()
        )]
    );
    assert_eq!(store.delete_unused_sessions().await.unwrap(), 0);

    for id in ["a1", "a2"] {
        assert!(store.delete_grant(A, id).await.unwrap());
    }
    assert_eq!(
        store.delete_unused_sessions().await.unwrap(),
        0,
        "one grant names it"
    );
    assert!(store.delete_grant(A, "grant-acme").await.unwrap());
    assert_eq!(
        store.delete_unused_sessions().await.unwrap(),
        1,
        "one row, for three grants"
    );
    assert_eq!(sessions(B).await.len(), 1, "the other account's stays");

    // A grant of the session made after it was swept writes it again.
    store.insert_grant(&grant("a3")).await.unwrap();
    assert_eq!(
        sessions(A).await,
        [("a3".to_owned(), ours.0.clone(), ours.1.clone())]
    );
}

async fn reused_grants_count_on_the_rows_that_made_them(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let allow = |grant: &str| {
        Write::Flow(NewFlow {
            grant_id: Some(grant.to_owned()),
            ..flow(A, NOW, "alice@example.com", grant, true, "allowed")
        })
    };
    store
        .apply(&[allow("gr-1"), allow("gr-2"), allow("gr-3")])
        .await
        .unwrap();
    let reused = |grant: &str, at: i64| Write::GrantReused {
        account: A.to_owned(),
        grant_id: grant.to_owned(),
        at,
    };
    store
        .apply(&[
            reused("gr-1", NOW + 5),
            reused("gr-2", NOW + 7),
            reused("gr-1", NOW + 9),
        ])
        .await
        .unwrap();
    store.apply(&[reused("gr-1", NOW + 8)]).await.unwrap();
    let mut counted: Vec<(String, i64, i64)> = store
        .flows(&all_flows(A))
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.grant_id.unwrap_or_default(), f.count, f.last_time))
        .collect();
    counted.sort();
    assert_eq!(
        counted,
        [
            ("gr-1".to_owned(), 4, NOW + 9),
            ("gr-2".to_owned(), 2, NOW + 7),
            ("gr-3".to_owned(), 1, NOW),
        ]
    );
}

async fn a_batch_is_written_whole_or_not_at_all_and_the_writer_keeps_good_writes(
    database: Database,
) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    let good = Write::Flow(flow(
        A,
        NOW + 10,
        "bob@example.com",
        "wiki",
        false,
        "no rule",
    ));
    // A grant whose client is of another account: the composite keys refuse it.
    let bad = Write::InsertGrant(GrantRecord {
        id: "cross".to_owned(),
        account: B.to_owned(),
        ..a.grant.clone()
    });
    let error = store.apply(&[good.clone(), bad.clone()]).await.unwrap_err();
    assert_eq!(error.to_string(), "client not found");
    assert_eq!(
        store.flows(&all_flows(A)).await.unwrap().len(),
        1,
        "nothing of the batch"
    );

    // Through the writer, a bad write queued beside good ones fails alone.
    let writer = Writer::start(store.clone());
    let results = futures_util::future::join_all([
        writer.submit(vec![good.clone()]),
        writer.submit(vec![bad]),
        writer.submit(vec![good]),
    ])
    .await;
    let outcomes: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(outcomes, [true, false, true]);
    assert_eq!(store.flows(&all_flows(A)).await.unwrap().len(), 3);
    assert!(
        store
            .active_grants(B, NOW)
            .await
            .unwrap()
            .iter()
            .all(|g| g.id != "cross")
    );
}

async fn clients_get_stable_distinct_tunnel_addresses_and_tokens_name_their_user(
    database: Database,
) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let mut addresses = std::collections::HashSet::new();
    for seed in 1..=3u8 {
        let token = store
            .create_token(
                A,
                TokenKind::Client {
                    user: "Alice@Example.com".to_owned(),
                    provider: Some("okta".to_owned()),
                },
                "laptop",
                NOW + DAY,
                NOW,
            )
            .await
            .unwrap();
        let client = store
            .register_client(A, &token.id, &key(seed), NOW)
            .await
            .unwrap();
        let again = store
            .register_client(A, &token.id, &key(seed + 100), NOW)
            .await
            .unwrap();
        assert_eq!(
            client.tunnel_index, again.tunnel_index,
            "stable across reconnects"
        );
        let index = client.tunnel_index.unwrap();
        assert!(addresses.insert(tunnel_addresses(index)));
        let record = store
            .authenticate(&token.secret, NOW)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            record.kind,
            TokenKind::Client {
                user: "alice@example.com".to_owned(),
                provider: Some("okta".to_owned()),
            }
        );
    }
    let (v4, v6) = tunnel_addresses(1);
    assert_eq!(
        (v4.to_string(), v6.to_string()),
        ("100.64.0.1".to_owned(), "fd00:2021:1111::1".to_owned())
    );
    let (last, _) = tunnel_addresses(fz_portal::store::MAX_TUNNEL_INDEX);
    assert_eq!(last.to_string(), "100.95.255.254");
    let nobody = store
        .create_token(
            A,
            TokenKind::Client {
                user: String::new(),
                provider: None,
            },
            "t",
            NOW + DAY,
            NOW,
        )
        .await;
    assert_eq!(nobody.unwrap_err().to_string(), "invalid email");
}

async fn revoked_tokens_and_verified_devices_are_visible_to_the_sweeper(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let a = populate(&store, A, 1).await;
    let b = populate(&store, B, 11).await;
    assert!(store.tokens_revoked_since(NOW).await.unwrap().is_empty());
    store
        .revoke_token(A, &a.client_token.id, NOW + 50)
        .await
        .unwrap();
    store
        .revoke_token(B, &b.gateway_token.id, NOW + 70)
        .await
        .unwrap();
    assert_eq!(
        store.tokens_revoked_since(NOW).await.unwrap(),
        [a.client_token.id.clone(), b.gateway_token.id.clone()]
    );
    assert_eq!(
        store.tokens_revoked_since(NOW + 60).await.unwrap(),
        [b.gateway_token.id]
    );
    assert!(store.verified_keys().await.unwrap().is_empty());
    assert_eq!(store.verified_changes_since(0).await.unwrap(), (vec![], 0));
    // A mark set and taken back at once is still two changes a portal can see.
    store
        .set_client_verified(A, &a.client.id, true)
        .await
        .unwrap();
    let (changed, first) = store.verified_changes_since(0).await.unwrap();
    assert_eq!(changed, std::slice::from_ref(&a.client.id));
    store
        .set_client_verified(A, &a.client.id, false)
        .await
        .unwrap();
    let (changed, second) = store.verified_changes_since(first).await.unwrap();
    assert_eq!(changed, std::slice::from_ref(&a.client.id));
    assert!(second > first);
    assert_eq!(
        store.verified_changes_since(second).await.unwrap(),
        (vec![], second)
    );
    store
        .set_client_verified(B, &b.client.id, true)
        .await
        .unwrap();
    assert_eq!(
        store.verified_keys().await.unwrap(),
        std::collections::HashMap::from([(b.client.id, fz_proto::PublicKey([11; 32]))])
    );
}

async fn an_email_code_has_its_tries_its_lifetime_and_one_use(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let alice = "alice@example.com";
    store
        .put_email_code(A, alice, "hash-1", (NOW, NOW + 900), 3)
        .await
        .unwrap();
    assert!(store.knows_user(A, alice).await.unwrap());
    assert!(!store.knows_user(B, alice).await.unwrap());
    // Three tries, each spent as it reads the hash; then none.
    for _ in 0..3 {
        let hash = store.spend_email_code_try(A, alice, NOW).await.unwrap();
        assert_eq!(hash.as_deref(), Some("hash-1"));
    }
    assert_eq!(
        store.spend_email_code_try(A, alice, NOW).await.unwrap(),
        None
    );

    // A new code replaces the old one, tries and all; it works until it expires.
    store
        .put_email_code(A, alice, "hash-2", (NOW, NOW + 900), 3)
        .await
        .unwrap();
    assert!(!store.use_email_code(A, alice, "hash-1").await.unwrap());
    assert_eq!(
        store
            .spend_email_code_try(A, alice, NOW + 900)
            .await
            .unwrap(),
        None,
        "expired"
    );
    assert_eq!(
        store
            .spend_email_code_try(A, alice, NOW + 899)
            .await
            .unwrap()
            .as_deref(),
        Some("hash-2")
    );
    // Used once, it is gone; another account never sees it.
    assert_eq!(
        store.spend_email_code_try(B, alice, NOW).await.unwrap(),
        None
    );
    assert!(store.use_email_code(A, alice, "hash-2").await.unwrap());
    assert!(!store.use_email_code(A, alice, "hash-2").await.unwrap());
    assert_eq!(
        store.spend_email_code_try(A, alice, NOW).await.unwrap(),
        None
    );

    // Expired codes are swept.
    store
        .put_email_code(A, "bob@example.com", "hash-3", (NOW, NOW + 900), 3)
        .await
        .unwrap();
    assert_eq!(store.prune_email_codes(NOW + 899).await.unwrap(), 0);
    assert_eq!(store.prune_email_codes(NOW + 900).await.unwrap(), 1);
}

/// A sign-in as the sign-in pages start it, from `source`.
fn sign_in_record(account: &str, source: Option<&str>, started_at: i64) -> SignInRecord {
    SignInRecord {
        account: account.to_owned(),
        nonce: URL_SAFE_NO_PAD.encode([1u8; 32]),
        state: URL_SAFE_NO_PAD.encode([2u8; 32]),
        callback: "http://127.0.0.1:49152/callback".to_owned(),
        device: "laptop".to_owned(),
        email: None,
        started_at,
        source: source.map(str::to_owned),
    }
}

/// A hash the store finds a sign-in by (any 64 hex digits do).
fn sign_in_hash(n: u32) -> String {
    format!("{n:064x}")
}

async fn sign_ins_are_bounded_and_each_step_happens_once(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    const LIFETIME: i64 = 900;
    // `admit` sees what is under way: in all, and from the new one's source.
    let mut seen = Vec::new();
    for n in 0..3 {
        let record = sign_in_record(A, Some("192.0.2.1"), NOW + n);
        let started = store
            .start_sign_in(&sign_in_hash(n as u32), &record, LIFETIME, |under_way| {
                seen.push((under_way.in_all, under_way.from_source));
                Ok::<(), ()>(())
            })
            .await
            .unwrap();
        assert_eq!(started, Ok(()));
    }
    let elsewhere = sign_in_record(B, Some("192.0.2.2"), NOW + 3);
    let refused = store
        .start_sign_in(&sign_in_hash(3), &elsewhere, LIFETIME, |under_way| {
            seen.push((under_way.in_all, under_way.from_source));
            Err("full")
        })
        .await
        .unwrap();
    assert_eq!(refused, Err("full"));
    assert_eq!(seen, [(0, 0), (1, 1), (2, 2), (3, 0)]);
    assert_eq!(
        store.sign_in(&sign_in_hash(3)).await.unwrap(),
        None,
        "refused: not kept"
    );
    // Expired ones no longer count.
    let later = sign_in_record(A, Some("192.0.2.1"), NOW + 1 + LIFETIME);
    store
        .start_sign_in(&sign_in_hash(4), &later, LIFETIME, |under_way| {
            assert_eq!((under_way.in_all, under_way.from_source), (1, 1));
            Ok::<(), ()>(())
        })
        .await
        .unwrap()
        .unwrap();
    // A hash is one sign-in; an account the store does not know has none.
    let again = store
        .start_sign_in(&sign_in_hash(4), &later, LIFETIME, |_| Ok::<(), ()>(()))
        .await;
    assert!(matches!(again, Err(StoreError::Invalid(_))), "{again:?}");
    let nowhere = sign_in_record("initech", None, NOW);
    let refused = store
        .start_sign_in(&sign_in_hash(5), &nowhere, LIFETIME, |_| Ok::<(), ()>(()))
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );

    // Read back as started; the address is its account's to set.
    let first = sign_in_hash(0);
    assert_eq!(
        store.sign_in(&first).await.unwrap(),
        Some(sign_in_record(A, Some("192.0.2.1"), NOW))
    );
    assert!(
        !store
            .set_sign_in_email(B, &first, "mallory@example.com")
            .await
            .unwrap()
    );
    assert!(
        store
            .set_sign_in_email(A, &first, "alice@example.com")
            .await
            .unwrap()
    );
    let kept = store.sign_in(&first).await.unwrap().unwrap();
    assert_eq!(kept.email.as_deref(), Some("alice@example.com"));

    // Each trip to a provider has a new number; the open one is taken once.
    assert_eq!(store.take_oidc_attempt(A, &first).await.unwrap(), None);
    assert_eq!(
        store.open_oidc_attempt(B, &first, "okta").await.unwrap(),
        None
    );
    assert_eq!(
        store.open_oidc_attempt(A, &first, "okta").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.open_oidc_attempt(A, &first, "google").await.unwrap(),
        Some(2)
    );
    assert_eq!(store.take_oidc_attempt(B, &first).await.unwrap(), None);
    assert_eq!(
        store.take_oidc_attempt(A, &first).await.unwrap(),
        Some(("google".to_owned(), 2))
    );
    assert_eq!(
        store.take_oidc_attempt(A, &first).await.unwrap(),
        None,
        "a replay"
    );

    // A sign-in ends once.
    assert!(store.end_sign_in(&first).await.unwrap());
    assert!(!store.end_sign_in(&first).await.unwrap());
    assert_eq!(store.sign_in(&first).await.unwrap(), None);

    // The sweeper deletes what expired (and what started after now: the clock went back).
    assert_eq!(
        store
            .prune_sign_ins(NOW + 1 + LIFETIME, LIFETIME)
            .await
            .unwrap(),
        1
    );
    assert!(store.sign_in(&sign_in_hash(1)).await.unwrap().is_none());
    assert!(store.sign_in(&sign_in_hash(2)).await.unwrap().is_some());
    assert_eq!(store.prune_sign_ins(NOW + 1, LIFETIME).await.unwrap(), 2);
}

async fn codes_sent_to_an_address_are_counted_and_limited(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let limit = SendLimit {
        per_window: 3,
        window_secs: 300,
        max_counted: 5,
    };
    let send = async |account: &str, email: &str, at: i64| {
        store
            .count_code_send(account, email, at, limit)
            .await
            .unwrap()
    };
    let (alice, bob) = ("alice@example.com", "bob@example.com");
    for at in [NOW, NOW + 10, NOW + 20] {
        assert_eq!(send(A, alice, at).await, Ok(()));
    }
    // The fourth waits until the first leaves the window; the same address in another
    // account does not wait.
    assert_eq!(send(A, alice, NOW + 100).await, Err(200));
    assert_eq!(send(B, alice, NOW + 100).await, Ok(()));
    assert_eq!(send(A, alice, NOW + 300).await, Ok(()));
    // Five counted in all (the first left the window as the last was counted): full for a
    // whole window, whatever the address.
    assert_eq!(send(A, bob, NOW + 300).await, Ok(()));
    assert_eq!(send(A, bob, NOW + 300).await, Err(300));
    // The sweeper deletes what left the window.
    assert_eq!(store.prune_code_sends(NOW + 20).await.unwrap(), 2);
    assert_eq!(send(A, bob, NOW + 301).await, Ok(()));
}

async fn an_identity_holds_its_address_and_brings_its_groups(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let issuer = "https://idp.example";
    let groups = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    store
        .record_identity(
            A,
            "okta",
            (issuer, "sub-alice"),
            "alice@example.com",
            Some(&groups(&["SRE", "Finance"])),
            NOW,
        )
        .await
        .unwrap();
    let names = |found: Vec<fz_portal::store::IdpGroup>| {
        found.into_iter().map(|g| g.group).collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.memberships(A, "alice@example.com").await.unwrap()),
        ["Finance", "SRE"]
    );
    // Another person of the same provider cannot take her address; nothing changes.
    let taken = store
        .record_identity(
            A,
            "okta",
            (issuer, "sub-mallory"),
            "alice@example.com",
            Some(&groups(&[])),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(
        taken.to_string().contains("bound to another person"),
        "{taken}"
    );
    assert_eq!(
        names(store.memberships(A, "alice@example.com").await.unwrap()),
        ["Finance", "SRE"]
    );
    // She signs in again: her groups are what the provider says now; without a groups claim
    // they are left alone.
    store
        .record_identity(
            A,
            "okta",
            (issuer, "sub-alice"),
            "alice@example.com",
            Some(&groups(&["SRE"])),
            NOW + 1,
        )
        .await
        .unwrap();
    store
        .record_identity(
            A,
            "okta",
            (issuer, "sub-alice"),
            "alice@example.com",
            None,
            NOW + 2,
        )
        .await
        .unwrap();
    assert_eq!(
        names(store.memberships(A, "alice@example.com").await.unwrap()),
        ["SRE"]
    );
    // Another account is another world.
    store
        .record_identity(
            B,
            "okta",
            (issuer, "sub-mallory"),
            "alice@example.com",
            None,
            NOW,
        )
        .await
        .unwrap();
}

async fn a_client_session_is_announced_to_other_replicas_with_its_registration(database: Database) {
    let Fixture { _dir, store, .. } = fixture(database).await;
    let token = store
        .create_token(A, client_kind(), "laptop", NOW + DAY, NOW)
        .await
        .unwrap();
    let start = store.latest_cluster_event().await.unwrap();
    let (client, first) = store
        .connect_client(A, &token.id, &key(1), NOW)
        .await
        .unwrap();
    let (again, second) = store
        .connect_client(A, &token.id, &key(1), NOW + 1)
        .await
        .unwrap();
    assert_eq!(again.id, client.id);
    assert!(start < first && first < second, "{start} {first} {second}");
    assert_eq!(store.latest_cluster_event().await.unwrap(), second);

    let events = store.cluster_events_after(start, 10).await.unwrap();
    let seen: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.id,
                e.account.as_str(),
                e.kind,
                e.subject.as_str(),
                e.origin.as_str(),
            )
        })
        .collect();
    let kind = fz_portal::store::ClusterEventKind::ClientConnected;
    let origin = store.replica();
    assert!(origin.starts_with("rep_"), "{origin}");
    assert_eq!(
        seen,
        [
            (first, A, kind, client.id.as_str(), origin),
            (second, A, kind, client.id.as_str(), origin),
        ]
    );
    // Read from a position, a page at a time.
    let after_first = store.cluster_events_after(first, 10).await.unwrap();
    assert_eq!(
        after_first.iter().map(|e| e.id).collect::<Vec<_>>(),
        [second]
    );
    assert_eq!(store.cluster_events_after(start, 1).await.unwrap().len(), 1);

    // A registration refused announces nothing: the event is in its transaction.
    store.revoke_token(A, &token.id, NOW + 2).await.unwrap();
    store
        .connect_client(A, &token.id, &key(1), NOW + 3)
        .await
        .unwrap_err();
    assert_eq!(store.latest_cluster_event().await.unwrap(), second);
    // Plain registration (admin tools, tests) announces nothing either.
    let other = store
        .create_token(A, client_kind(), "phone", NOW + DAY, NOW)
        .await
        .unwrap();
    store
        .register_client(A, &other.id, &key(2), NOW + 3)
        .await
        .unwrap();
    assert_eq!(store.latest_cluster_event().await.unwrap(), second);

    // A sign-in that names the user's groups tells the other replicas which provider did; one
    // that names none (the provider has no groups claim) changes nothing and tells nothing.
    let identity = ("https://idp.example", "alice-1");
    let groups = ["eng".to_owned()];
    store
        .record_identity(
            A,
            "okta",
            identity,
            "alice@example.com",
            Some(&groups),
            NOW + 4,
        )
        .await
        .unwrap();
    let changed = store.cluster_events_after(second, 10).await.unwrap();
    let changed: Vec<_> = changed
        .iter()
        .map(|e| (e.kind, e.subject.as_str(), e.detail.as_deref()))
        .collect();
    let kind = fz_portal::store::ClusterEventKind::MembershipsChanged;
    assert_eq!(changed, [(kind, "alice@example.com", Some("okta"))]);
    let latest = store.latest_cluster_event().await.unwrap();
    store
        .record_identity(A, "okta", identity, "alice@example.com", None, NOW + 5)
        .await
        .unwrap();
    assert_eq!(store.latest_cluster_event().await.unwrap(), latest);

    // A gateway's connection is told of too; a plain registration is not.
    let site = TokenKind::Gateway {
        site: "hq".to_owned(),
    };
    let gateway_token = store
        .create_token(A, site, "gw", NOW + DAY, NOW)
        .await
        .unwrap();
    let (gateway, connected) = store
        .connect_gateway(A, &gateway_token.id, &key(3), &[], NOW + 6)
        .await
        .unwrap();
    let told = store.cluster_events_after(latest, 10).await.unwrap();
    let told: Vec<_> = told
        .iter()
        .map(|e| (e.id, e.kind, e.subject.as_str()))
        .collect();
    let kind = fz_portal::store::ClusterEventKind::GatewayConnected;
    assert_eq!(told, [(connected, kind, gateway.id.as_str())]);
    store
        .register_gateway(A, &gateway_token.id, &key(3), &[], NOW + 7)
        .await
        .unwrap();
    assert_eq!(store.latest_cluster_event().await.unwrap(), connected);

    assert_eq!(store.prune_cluster_events(NOW + 1).await.unwrap(), 1);
    let left = store.cluster_events_after(start, 2).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.id).collect::<Vec<_>>(),
        [second, latest]
    );
}

#[tokio::test]
async fn postgres_admin_commands_refuse_a_database_without_a_store_and_replicas_make_it_once() {
    let Some(database) = support::backends::postgres(
        "store::postgres_admin_commands_refuse_a_database_without_a_store_and_replicas_make_it_once",
    ) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("data");
    // The token key must be there for an admin command to get as far as the database.
    Store::open(&data_dir, Creation::Allowed).await.unwrap();
    let error = open_failure(&data_dir, &database, Creation::Refused).await;
    let message = error.to_string();
    assert!(
        message.contains("holds no fz store: `fz-portal init`"),
        "{message}"
    );
    assert!(
        !message.contains("postgres@"),
        "the URL's user leaked: {message}"
    );

    // Three replicas starting at once, each with a data dir of its own and the token key it
    // was given: one makes the schema, the others wait and find it; a token made through one
    // is good at another.
    let shared = KeyFiles {
        signing: None,
        token: Some(data_dir.join(fz_portal::keys::TOKEN_KEY_FILE)),
    };
    let replicas = [1, 2, 3].map(|n| dir.path().join(format!("replica-{n}")));
    let (a, b, c) = tokio::join!(
        Store::open_in(&replicas[0], &database, &shared, Creation::Allowed),
        Store::open_in(&replicas[1], &database, &shared, Creation::Allowed),
        Store::open_in(&replicas[2], &database, &shared, Creation::Allowed),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    a.ensure_account(A).await.unwrap();
    let token = b
        .create_token(A, client_kind(), "laptop", NOW + DAY, NOW)
        .await
        .unwrap();
    let seen = c.authenticate(&token.secret, NOW).await.unwrap().unwrap();
    assert_eq!(seen.id, token.id);
    Store::open_in(
        &data_dir,
        &database,
        &KeyFiles::default(),
        Creation::Refused,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn postgres_that_cannot_be_reached_is_named_without_its_password() {
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("data");
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let database = Database::Postgres(format!("postgres://fz:hunter2@127.0.0.1:{port}/fz"));
    let error = open_failure(&data_dir, &database, Creation::Allowed).await;
    assert_eq!(
        error.to_string(),
        format!("cannot connect to the store's PostgreSQL database `127.0.0.1:{port}/fz`")
    );
    assert!(!format!("{error:?} {database:?}").contains("hunter2"));
}

on_both_backends!("store":
    a_restart_loses_nothing,
    authenticate_accepts_only_a_live_token_with_its_exact_secret,
    a_signed_in_token_is_accepted_only_with_the_nonce_it_was_made_for,
    every_secret_costs_one_check_whatever_it_is,
    a_token_made_inactive_is_refused_until_activated_even_across_a_restart,
    secrets_look_right_and_differ,
    accounts_are_isolated,
    a_failed_write_leaves_nothing_behind,
    memberships_are_replaced_per_provider,
    a_client_registers_once_per_token_and_its_mark_stays_with_its_key,
    a_gateway_takes_its_site_from_its_token_and_tracks_its_connection,
    grants_expire_and_are_deleted,
    flows_filter_and_come_newest_first,
    records_serialize_as_flat_json,
    concurrent_writers_all_get_through,
    a_batch_is_written_whole_or_not_at_all_and_the_writer_keeps_good_writes,
    reused_grants_count_on_the_rows_that_made_them,
    a_session_is_stored_once_for_its_grants_and_goes_with_the_last,
    clients_get_stable_distinct_tunnel_addresses_and_tokens_name_their_user,
    revoked_tokens_and_verified_devices_are_visible_to_the_sweeper,
    an_email_code_has_its_tries_its_lifetime_and_one_use,
    codes_sent_to_an_address_are_counted_and_limited,
    sign_ins_are_bounded_and_each_step_happens_once,
    an_identity_holds_its_address_and_brings_its_groups,
    a_client_session_is_announced_to_other_replicas_with_its_registration,
);

#[tokio::test]
async fn postgres_over_tls_is_encrypted_and_checks_the_servers_certificate() {
    const TEST: &str = "store::postgres_over_tls_is_encrypted_and_checks_the_servers_certificate";
    let certified = |names: Vec<String>| rcgen::generate_simple_self_signed(names).unwrap();
    let server_pki = certified(vec!["localhost".into(), "127.0.0.1".into()]);
    let server = match fz_host::testing::postgres::server_with_tls(
        "tls",
        &server_pki.cert.pem(),
        &server_pki.signing_key.serialize_pem(),
    ) {
        Ok(server) => server,
        Err(why) => return fz_host::testing::skip_needing(TEST, "PostgreSQL", &why),
    };
    let dir = TempDir::new().unwrap();
    let trusted = dir.path().join("server-ca.pem");
    std::fs::write(&trusted, server_pki.cert.pem()).unwrap();
    let stranger = dir.path().join("other-ca.pem");
    let other = certified(vec!["127.0.0.1".into()]);
    std::fs::write(&stranger, other.cert.pem()).unwrap();
    let url = server.database();
    let with_root = |root: &Path| {
        Database::Postgres(format!(
            "{url}?sslmode=verify-full&sslrootcert={}",
            root.display()
        ))
    };

    // The server's certificate checks out against the root it was given: the store works,
    // and its connections are encrypted.
    let database = with_root(&trusted);
    let store = open(&dir.path().join("data"), &database).await;
    store.ensure_account(A).await.unwrap();
    let Database::Postgres(verified) = &database else {
        unreachable!()
    };
    let pool = sqlx::AnyPool::connect(verified).await.unwrap();
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted);
    pool.close().await;
    store.close().await;

    // Against another root the server is refused, and the error names it, not the URL.
    let refused = open_failure(
        &dir.path().join("data"),
        &with_root(&stranger),
        Creation::Allowed,
    )
    .await;
    assert!(matches!(refused, StoreError::Connect { .. }), "{refused:?}");
    assert!(!refused.to_string().contains("sslrootcert"), "{refused}");
}
