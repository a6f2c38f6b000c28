//! The policy engine against real files: loading trees and bundles, reloads that keep the last
//! good table, and the file watcher.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fz_compiler::table::Effect;
use fz_compiler::{Bundle, Request};
use fz_portal::policy::{
    LoadOptions, PolicyEngine, PolicyError, PolicySource, ReloadStatus, SettleOptions,
};
use tokio::sync::watch;
use tokio::time::timeout;

/// How long a watcher test waits for the watcher to react before failing.
const PATIENCE: Duration = Duration::from_secs(5);

const SITES: &str = r#"site hq "Headquarters"

resource gitlab { address "gitlab.company.com"; site hq; ports tcp/443 }
resource wiki { address "wiki.company.com"; site hq }

group engineering { members "alice@company.com" }
"#;

const ACCESS: &str = "allow engineering -> gitlab as eng-gitlab\n";

/// The good edit: bob reaches the wiki.
const ACCESS_WITH_WIKI: &str = "allow engineering -> gitlab as eng-gitlab
allow user \"bob@company.com\" -> wiki as bob-wiki
";

/// Another good edit: engineering reaches the wiki too.
const ACCESS_WITH_ENGINEERING_WIKI: &str = "allow engineering -> gitlab, wiki as eng-tools\n";

/// The bad edit: a misspelt group, E004 at line 1, column 7.
const ACCESS_MISSPELT: &str = "allow engineerin -> gitlab as eng-gitlab\n";
const MISSPELT_DIAGNOSTIC: &str = "access.fz:1:7: [E004]";

const TESTS: &str = r#"test "engineering reaches gitlab" {
  expect allow "alice@company.com" -> gitlab tcp/443
  expect deny  "bob@company.com"   -> gitlab tcp/443
}
"#;

/// A tree that parses and resolves but whose test fails: E018.
const TESTS_FAILING: &str = r#"test "bob reaches gitlab" {
  expect allow "bob@company.com" -> gitlab tcp/443
}
"#;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Writes `bytes` beside `path` and renames it over `path`, as editors and `fzc compile` do.
fn replace(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// A good tree in `parent/policies`, with `access` as its rules.
fn tree(parent: &Path, access: &str) -> PathBuf {
    let dir = parent.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir.join("sites.fz"), SITES);
    write(&dir.join("access.fz"), access);
    write(&dir.join("tests.fz"), TESTS);
    dir
}

/// The bundle `fzc compile` would write for a tree.
fn compile(dir: &Path) -> Bundle {
    let checked = fz_compiler::check(fz_compiler::load_tree(dir).unwrap());
    assert!(!checked.has_errors(), "{:?}", checked.diagnostics);
    Bundle::new(checked.table.unwrap()).unwrap()
}

/// The hash of a tree with the standard files and `access` as its rules.
fn hash_of(access: &str) -> String {
    let scratch = tempfile::tempdir().unwrap();
    compile(&tree(scratch.path(), access)).hash
}

fn decide(engine: &PolicyEngine, user: &str, resource: &str) -> Effect {
    let request = Request {
        user: user.to_owned(),
        resource: resource.to_owned(),
        ..Request::default()
    };
    engine.current().table.decide(&request).effect
}

/// Waits until the watcher has made `failed` reloads fail, without sleeping.
async fn wait_for_failures(status: &mut watch::Receiver<ReloadStatus>, failed: u64) -> String {
    let status = timeout(PATIENCE, status.wait_for(|s| s.failed >= failed))
        .await
        .expect("the watcher did not attempt a reload in time")
        .unwrap();
    status.last_error.clone().expect("a failed reload says why")
}

/// Waits until the watcher has installed a different table, and returns its hash.
async fn wait_for_new_hash(hash: &mut watch::Receiver<String>) -> String {
    timeout(PATIENCE, hash.changed())
        .await
        .expect("the watcher did not install a new table in time")
        .unwrap();
    hash.borrow_and_update().clone()
}

#[test]
fn loads_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    assert_eq!(
        PolicySource::detect(&tree).unwrap(),
        PolicySource::Tree(tree.clone())
    );

    let engine = PolicyEngine::open(&tree).unwrap();
    let current = engine.current();
    assert_eq!(current.bundle_hash, compile(&tree).hash);
    assert!(current.bundle_hash.starts_with("sha256:"));
    assert_eq!(*engine.subscribe().borrow(), current.bundle_hash);
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
    assert_eq!(decide(&engine, "bob@company.com", "gitlab"), Effect::Deny);
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Deny);
}

#[test]
fn loads_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(&tree(dir.path(), ACCESS_WITH_WIKI));
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, bundle.to_bytes().unwrap()).unwrap();
    assert_eq!(
        PolicySource::detect(&file).unwrap(),
        PolicySource::Bundle(file.clone())
    );

    let engine = PolicyEngine::open(&file).unwrap();
    assert_eq!(engine.current().bundle_hash, bundle.hash);
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);
    assert_eq!(decide(&engine, "bob@company.com", "gitlab"), Effect::Deny);
}

#[test]
fn a_tree_and_its_bundle_have_the_same_hash() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, compile(&tree).to_bytes().unwrap()).unwrap();

    let from_tree = PolicyEngine::open(&tree).unwrap();
    let from_bundle = PolicyEngine::open(&file).unwrap();
    assert_eq!(
        from_tree.current().bundle_hash,
        from_bundle.current().bundle_hash
    );
}

#[test]
fn a_missing_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let error = PolicyEngine::open(&missing).unwrap_err();
    assert!(matches!(error, PolicyError::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("nowhere"), "{error}");
}

#[test]
fn a_bad_tree_at_start_is_refused_with_its_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS_MISSPELT);
    let error = PolicyEngine::open(&tree).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, PolicyError::Invalid { errors: 1, .. }),
        "{error:?}"
    );
    assert!(message.contains("has 1 error:"), "{message}");
    assert!(message.contains(MISSPELT_DIAGNOSTIC), "{message}");
    assert!(message.contains("engineerin"), "{message}");
}

#[test]
fn a_tree_with_a_failing_test_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    write(&tree.join("tests.fz"), TESTS_FAILING);
    let message = PolicyEngine::open(&tree).unwrap_err().to_string();
    assert!(message.contains("tests.fz:"), "{message}");
    assert!(message.contains("[E018]"), "{message}");
}

#[test]
fn many_errors_are_counted_beyond_the_first_few() {
    let dir = tempfile::tempdir().unwrap();
    let rules: String = (0..5)
        .map(|i| format!("allow nobody{i} -> gitlab as r{i}\n"))
        .collect();
    let tree = tree(dir.path(), &rules);
    let message = PolicyEngine::open(&tree).unwrap_err().to_string();
    assert!(message.contains("has 5 errors:"), "{message}");
    assert!(message.contains("access.fz:1:7: [E004]"), "{message}");
    assert!(message.contains("access.fz:3:7: [E004]"), "{message}");
    assert!(!message.contains("access.fz:4:7"), "{message}");
    assert!(message.ends_with("; and 2 more"), "{message}");
}

#[test]
fn an_empty_tree_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = PolicyEngine::open(dir.path()).unwrap_err();
    assert!(matches!(error, PolicyError::EmptyTree(_)), "{error:?}");
}

#[test]
fn a_reload_after_a_breaking_edit_keeps_the_last_good_table() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = PolicyEngine::open(&tree).unwrap();
    let before = engine.current();
    let mut hash = engine.subscribe();
    let status = engine.reload_status();

    write(&tree.join("access.fz"), ACCESS_MISSPELT);
    let message = engine.reload().unwrap_err().to_string();
    assert!(message.contains(MISSPELT_DIAGNOSTIC), "{message}");

    assert!(Arc::ptr_eq(&before, &engine.current()));
    assert!(!hash.has_changed().unwrap());
    assert_eq!(*hash.borrow_and_update(), before.bundle_hash);
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
    assert_eq!(decide(&engine, "bob@company.com", "gitlab"), Effect::Deny);
    let status = status.borrow().clone();
    assert_eq!((status.succeeded, status.failed), (0, 1));
    assert_eq!(status.last_error, Some(message));

    // A tree that cannot be read at all keeps it too.
    std::fs::remove_dir_all(&tree).unwrap();
    assert!(engine.reload().is_err());
    assert!(Arc::ptr_eq(&before, &engine.current()));
}

#[test]
fn a_reload_after_a_good_edit_installs_the_new_table() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = PolicyEngine::open(&tree).unwrap();
    let before = engine.current().bundle_hash.clone();
    let mut hash = engine.subscribe();
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Deny);

    write(&tree.join("access.fz"), ACCESS_WITH_WIKI);
    let outcome = engine.reload().unwrap();

    assert!(outcome.changed);
    assert_eq!(outcome.previous_hash, before);
    assert_eq!(outcome.hash, hash_of(ACCESS_WITH_WIKI));
    assert_eq!(engine.current().bundle_hash, outcome.hash);
    assert!(hash.has_changed().unwrap());
    assert_eq!(*hash.borrow_and_update(), outcome.hash);
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
}

#[test]
fn a_good_reload_after_a_bad_one_clears_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = PolicyEngine::open(&tree).unwrap();

    write(&tree.join("access.fz"), ACCESS_MISSPELT);
    engine.reload().unwrap_err();
    write(&tree.join("access.fz"), ACCESS);
    let outcome = engine.reload().unwrap();

    assert!(!outcome.changed);
    let status = engine.reload_status().borrow().clone();
    assert_eq!((status.succeeded, status.failed), (1, 1));
    assert_eq!(status.last_error, None);
}

#[test]
fn a_reload_without_a_change_reports_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = PolicyEngine::open(&tree).unwrap();
    let before = engine.current();
    let hash = engine.subscribe();

    // Rewriting a file with the same rules, and adding a file that is not policy.
    write(&tree.join("access.fz"), ACCESS);
    write(&tree.join("README.md"), "# policies\n");
    let outcome = engine.reload().unwrap();

    assert!(!outcome.changed);
    assert_eq!(outcome.hash, outcome.previous_hash);
    assert_eq!(outcome.hash, before.bundle_hash);
    assert!(!hash.has_changed().unwrap());
    // The installed table is kept, not rebuilt.
    assert!(Arc::ptr_eq(&before, &engine.current()));
}

#[test]
fn a_damaged_bundle_keeps_the_last_good_table() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(&tree(dir.path(), ACCESS));
    let file = dir.path().join("bundle.json");
    let bytes = bundle.to_bytes().unwrap();
    std::fs::write(&file, &bytes).unwrap();
    let engine = PolicyEngine::open(&file).unwrap();
    let hash = engine.subscribe();

    // Edited by hand: the table no longer matches the hash.
    let edited = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("alice@company.com", "mallory@company.com");
    assert_ne!(edited.as_bytes(), bytes.as_slice());
    std::fs::write(&file, edited).unwrap();
    let message = engine.reload().unwrap_err().to_string();
    assert!(message.contains("bundle.json"), "{message}");
    assert!(message.contains("damaged"), "{message}");

    // Cut short.
    std::fs::write(&file, bytes.get(..bytes.len() / 2).unwrap()).unwrap();
    let error = engine.reload().unwrap_err();
    assert!(matches!(error, PolicyError::Bundle { .. }), "{error:?}");

    // Gone.
    std::fs::remove_file(&file).unwrap();
    let error = engine.reload().unwrap_err();
    assert!(matches!(error, PolicyError::Io { .. }), "{error:?}");

    assert_eq!(engine.current().bundle_hash, bundle.hash);
    assert!(!hash.has_changed().unwrap());
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
    assert_eq!(
        decide(&engine, "mallory@company.com", "gitlab"),
        Effect::Deny
    );
    assert_eq!(engine.reload_status().borrow().failed, 3);
}

#[test]
fn a_damaged_bundle_at_start_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bundle.json");
    write(&file, "{\"format\": \"something-else\", \"version\": 1}");
    let message = PolicyEngine::open(&file).unwrap_err().to_string();
    assert!(message.contains("not an fz bundle"), "{message}");
}

#[tokio::test]
async fn the_watcher_reloads_a_tree_after_edits_and_keeps_the_table_on_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = Arc::new(PolicyEngine::open(&tree).unwrap());
    let original = engine.current().bundle_hash.clone();
    let mut hash = engine.subscribe();
    let mut status = engine.reload_status();
    let _watcher = engine.watch().unwrap();

    // A good edit, written in place.
    write(&tree.join("access.fz"), ACCESS_WITH_WIKI);
    assert_eq!(
        wait_for_new_hash(&mut hash).await,
        hash_of(ACCESS_WITH_WIKI)
    );
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);
    let good = engine.current();

    // A bad edit: the reload fails, says why, and the table stays.
    let failed = status.borrow().failed;
    write(&tree.join("access.fz"), ACCESS_MISSPELT);
    let reason = wait_for_failures(&mut status, failed + 1).await;
    assert!(reason.contains(MISSPELT_DIAGNOSTIC), "{reason}");
    assert!(!hash.has_changed().unwrap());
    assert!(Arc::ptr_eq(&good, &engine.current()));
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);

    // The next good edit, in a new file of a new folder, is the next table installed.
    write(&tree.join("access.fz"), "");
    std::fs::create_dir_all(tree.join("teams")).unwrap();
    replace(
        &tree.join("teams").join("engineering.fz"),
        ACCESS_WITH_ENGINEERING_WIKI.as_bytes(),
    );
    let installed = wait_for_new_hash(&mut hash).await;
    // The watcher may have seen the empty access.fz and the new file apart; then the first
    // reload had no rules for gitlab and failed the tree's test, keeping the table.
    assert_eq!(installed, compile(&tree).hash);
    assert_ne!(installed, original);
    assert_eq!(decide(&engine, "alice@company.com", "wiki"), Effect::Allow);
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Deny);
}

#[tokio::test]
async fn the_watcher_follows_a_bundle_replaced_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let first = compile(&tree(dir.path(), ACCESS));
    let second = {
        let scratch = tempfile::tempdir().unwrap();
        compile(&tree(scratch.path(), ACCESS_WITH_WIKI))
    };
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let file = out.join("bundle.json");
    std::fs::write(&file, first.to_bytes().unwrap()).unwrap();
    let engine = Arc::new(PolicyEngine::open(&file).unwrap());
    let mut hash = engine.subscribe();
    let mut status = engine.reload_status();
    let _watcher = engine.watch().unwrap();

    // A damaged bundle, moved into place: refused, the table stays.
    replace(&file, b"{ not json");
    let reason = wait_for_failures(&mut status, 1).await;
    assert!(reason.contains("bundle.json"), "{reason}");
    assert!(!hash.has_changed().unwrap());
    assert_eq!(engine.current().bundle_hash, first.hash);

    // A good one, moved into place as `fzc compile` does.
    replace(&file, &second.to_bytes().unwrap());
    assert_eq!(wait_for_new_hash(&mut hash).await, second.hash);
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);
}

#[tokio::test]
async fn dropping_the_watcher_stops_watching() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let engine = Arc::new(PolicyEngine::open(&tree).unwrap());
    let watcher = engine.watch().unwrap();
    drop(watcher);
    // The reload thread has ended and let go of the engine.
    assert_eq!(Arc::strong_count(&engine), 1);

    // Nothing reloads behind our back any more: this reload is the one that sees the edit.
    write(&tree.join("access.fz"), ACCESS_WITH_WIKI);
    let outcome = engine.reload().unwrap();
    assert!(outcome.changed);
    assert_eq!(engine.reload_status().borrow().succeeded, 1);
}

/// Engineering's tools, and the guardrail that keeps alice out of the wiki, as an edit moves it
/// from one file to another.
const TOOLS: &str = "allow engineering -> gitlab, wiki as eng-tools\n";
const GUARDRAIL: &str = "deny user \"alice@company.com\" -> wiki as alice-not-wiki\n";

/// What a test does to the tree between two reads.
type Action = Box<dyn FnOnce() + Send>;

/// A hook for [`LoadOptions::after_read`] that runs what a test armed it with once, after the
/// next read, and counts the reads.
#[derive(Clone, Default)]
struct BetweenReads {
    armed: Arc<Mutex<Option<Action>>>,
    reads: Arc<AtomicU32>,
}

impl BetweenReads {
    fn arm(&self, action: impl FnOnce() + Send + 'static) {
        *self.armed.lock().unwrap() = Some(Box::new(action));
    }

    fn fired(&self) -> bool {
        self.armed.lock().unwrap().is_none()
    }

    fn options(&self, settle: SettleOptions) -> LoadOptions {
        let hook = self.clone();
        LoadOptions {
            settle,
            after_read: Some(Arc::new(move |_| {
                hook.reads.fetch_add(1, Ordering::SeqCst);
                let action = hook.armed.lock().unwrap().take();
                if let Some(action) = action {
                    action();
                }
            })),
        }
    }
}

#[test]
fn a_reload_caught_between_two_writes_of_an_edit_never_installs_the_half_written_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), &format!("{TOOLS}{GUARDRAIL}"));
    let between = BetweenReads::default();
    let engine = PolicyEngine::load_with(
        PolicySource::Tree(tree.clone()),
        between.options(SettleOptions::default()),
    )
    .unwrap();
    assert_eq!(decide(&engine, "alice@company.com", "wiki"), Effect::Deny);
    let mut hash = engine.subscribe();

    // The guardrail moves to a file of its own: access.fz is written without it (a valid
    // tree, which lets alice into the wiki), and guardrails.fz only after the reload's first
    // read.
    write(&tree.join("access.fz"), TOOLS);
    let guardrails = tree.join("guardrails.fz");
    between.arm(move || write(&guardrails, GUARDRAIL));
    let reads_before = between.reads.load(Ordering::SeqCst);
    let outcome = engine.reload().unwrap();

    assert!(
        between.fired(),
        "the second write came after the first read"
    );
    let half_written = hash_of(TOOLS);
    assert_ne!(outcome.hash, half_written);
    assert_eq!(outcome.hash, compile(&tree).hash);
    assert!(outcome.changed);
    // One table was installed by the reload: the whole edit's.
    assert!(hash.has_changed().unwrap());
    assert_eq!(*hash.borrow_and_update(), outcome.hash);
    assert_eq!(decide(&engine, "alice@company.com", "wiki"), Effect::Deny);
    assert_eq!(
        decide(&engine, "alice@company.com", "gitlab"),
        Effect::Allow
    );
    // Read 1 found the half-written tree, read 2 the whole edit, read 3 the same again.
    assert!(between.reads.load(Ordering::SeqCst) - reads_before >= 3);
}

#[test]
fn a_tree_that_never_stops_changing_is_a_failed_reload_and_the_table_stays() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), ACCESS);
    let between = BetweenReads::default();
    let settle = SettleOptions {
        quiet_period: Duration::from_millis(20),
        max_reads: 5,
        max_wait: Duration::from_secs(60),
    };
    let engine =
        PolicyEngine::load_with(PolicySource::Tree(tree.clone()), between.options(settle)).unwrap();
    let before = engine.current();

    // Something writes the tree after every read, each time something else.
    let notes = tree.join("notes.fz");
    let writes = Arc::new(AtomicU32::new(0));
    fn keep_writing(notes: PathBuf, writes: Arc<AtomicU32>, between: BetweenReads) {
        let n = writes.fetch_add(1, Ordering::SeqCst);
        write(&notes, &format!("# write {n}\n"));
        let again = between.clone();
        between.arm(move || keep_writing(notes, writes, again));
    }
    write(&tree.join("access.fz"), ACCESS_WITH_WIKI);
    {
        let (notes, writes, again) = (notes.clone(), writes.clone(), between.clone());
        between.arm(move || keep_writing(notes, writes, again));
    }
    let error = engine.reload().unwrap_err();

    assert!(
        matches!(error, PolicyError::Unsettled { reads: 5, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("kept changing"), "{message}");
    assert!(Arc::ptr_eq(&before, &engine.current()));
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Deny);
    let status = engine.reload_status().borrow().clone();
    assert_eq!((status.succeeded, status.failed), (0, 1));
    assert_eq!(status.last_error, Some(message));

    // Once the writing stops, the next reload takes the edit.
    *between.armed.lock().unwrap() = None;
    let outcome = engine.reload().unwrap();
    assert!(outcome.changed);
    assert_eq!(decide(&engine, "bob@company.com", "wiki"), Effect::Allow);
}

#[test]
fn the_engine_can_be_shared_across_tasks() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<PolicyEngine>();
    shareable::<PolicyError>();
    shareable::<fz_portal::policy::Watcher>();
}
