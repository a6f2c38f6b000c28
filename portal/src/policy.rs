//! The policy engine of one account: the decision table the portal decides with, kept current.
//!
//! It loads a [`PolicySource`] (a policy tree, compiled here with [`fz_compiler::load_tree`] and
//! [`fz_compiler::check`], or a bundle file written by `fzc compile`, read and verified with
//! [`Bundle::from_bytes`]), serves the installed table to every decision through
//! [`PolicyEngine::current`], reloads on request ([`PolicyEngine::reload`]) or when the files
//! change ([`PolicyEngine::watch`]), and tells subscribers when a different table is installed
//! ([`PolicyEngine::subscribe`]).
//!
//! INVARIANT: a bad tree or bundle never replaces the last good table. The first load must
//! succeed (a portal does not start without a table); after that, any reload that fails (IO,
//! error diagnostics, failing tests or invariants, a damaged bundle, a tree that never stops
//! changing, even a compiler panic) leaves the installed table in place and says why.
//!
//! INVARIANT: what is compiled is a tree as it stood still, never one caught between two
//! writes of an edit: a tree is read until two reads in a row agree and nothing in it has
//! changed for a quiet period (`settle`, bounded by [`SettleOptions`]). A bundle is read once,
//! whole (one `read` of one file, which `fzc compile` replaces by rename), and its content hash
//! refuses one written in place and read half-way.
//!
//! It does not decide (that is [`DecisionTable::decide`] on the table [`current`] returns),
//! re-evaluate or revoke grants (the portal does that after [`subscribe`] reports a new hash),
//! nor know about accounts: the portal runs one engine per account.
//!
//! Entry types: [`PolicySource`], [`PolicyEngine`] (with [`LoadOptions`] and
//! [`SettleOptions`]), [`LoadedPolicy`], [`ReloadOutcome`], [`ReloadStatus`], [`Watcher`] (with
//! [`WatchOptions`]) and [`PolicyError`].
//!
//! [`current`]: PolicyEngine::current
//! [`subscribe`]: PolicyEngine::subscribe

use std::ffi::OsString;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fz_compiler::{Bundle, BundleError, DecisionTable, LoadError};
use fz_lang::Sources;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};

mod settle;

pub use settle::SettleOptions;
use settle::{Outcome, Snapshot, SystemClock, read_settled};

/// How many error diagnostics a [`PolicyError::Invalid`] names; the rest are counted.
const LISTED_DIAGNOSTICS: usize = 3;

/// Where an account's policy comes from. Fixed when the engine is built: a reload reads the
/// same kind of source again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// A policy tree: every `*.fz` and `*.cedar` file below the directory, compiled on load.
    Tree(PathBuf),
    /// A bundle file written by `fzc compile`, checked against its content hash on load.
    Bundle(PathBuf),
}

impl PolicySource {
    /// A tree when `path` is a directory, a bundle when it is a file (symbolic links are
    /// followed); an error when it does not exist or is neither.
    pub fn detect(path: impl Into<PathBuf>) -> Result<PolicySource, PolicyError> {
        let path = path.into();
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(source) => return Err(PolicyError::Io { path, source }),
        };
        if metadata.is_dir() {
            Ok(PolicySource::Tree(path))
        } else if metadata.is_file() {
            Ok(PolicySource::Bundle(path))
        } else {
            Err(PolicyError::NotTreeOrBundle(path))
        }
    }

    /// The configured directory or file.
    pub fn path(&self) -> &Path {
        match self {
            PolicySource::Tree(path) | PolicySource::Bundle(path) => path,
        }
    }

    /// Reads (a tree until it is settled) and compiles (or verifies) the source into a table
    /// ready for decisions. A panic in the compiler is caught and reported as an error, so a
    /// hostile file cannot take the portal down.
    fn compile(&self, options: &LoadOptions) -> Result<LoadedPolicy, PolicyError> {
        let compiled = catch_unwind(AssertUnwindSafe(|| match self {
            PolicySource::Tree(dir) => {
                let sources = read_tree_settled(dir, options)?;
                compile_tree(dir, sources)
            }
            PolicySource::Bundle(file) => read_bundle(file),
        }));
        compiled.unwrap_or_else(|_| Err(PolicyError::Panicked(self.path().to_owned())))
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::Tree(path) => write!(f, "policy tree `{}`", path.display()),
            PolicySource::Bundle(path) => write!(f, "bundle `{}`", path.display()),
        }
    }
}

/// How an engine reads its source.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// How a tree is read until it stands still.
    pub settle: SettleOptions,
    /// Called after each read of a tree with the read's number within the load (from 1),
    /// before it is compared with the one before: for tests that change the tree between two
    /// reads. `None` in the portal.
    pub after_read: Option<Arc<dyn Fn(u32) + Send + Sync>>,
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("settle", &self.settle)
            .field("after_read", &self.after_read.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

/// One read of a policy tree: the files the compiler reads, and when each part of the tree
/// last changed.
struct TreeRead {
    /// The directory read, symbolic links resolved: one read sees one checkout even while a
    /// link to the tree is swapped.
    root: PathBuf,
    /// Every directory and policy file below the root (the root itself as an empty path), with
    /// the time it last changed, sorted. A file added, removed or renamed changes its
    /// directory's. Hidden folders are left out, as the watcher leaves them out: `.git`
    /// changes with every `git status`, and files in it are still compared by their text.
    stamps: Vec<(PathBuf, SystemTime)>,
    sources: Sources,
}

impl PartialEq for TreeRead {
    fn eq(&self, other: &TreeRead) -> bool {
        let same_files = self.sources.len() == other.sources.len()
            && self
                .sources
                .iter()
                .zip(other.sources.iter())
                .all(|((_, a), (_, b))| a.path == b.path && a.text == b.text);
        self.root == other.root && self.stamps == other.stamps && same_files
    }
}

impl Snapshot for TreeRead {
    fn newest_change(&self) -> Option<SystemTime> {
        self.stamps.iter().map(|(_, changed)| *changed).max()
    }
}

/// Reads the tree until it is settled (see `settle`), or fails when it does not settle within
/// the bounds.
fn read_tree_settled(dir: &Path, options: &LoadOptions) -> Result<Sources, PolicyError> {
    let outcome = read_settled(options.settle, &mut SystemClock, |n| {
        let read = read_tree(dir);
        if let Some(hook) = &options.after_read {
            hook(n);
        }
        read
    })?;
    match outcome {
        Outcome::Settled(read) => Ok(read.sources),
        Outcome::Unsettled { reads, waited } => Err(PolicyError::Unsettled {
            path: dir.to_owned(),
            reads,
            waited,
            quiet_period: options.settle.quiet_period,
        }),
    }
}

/// One read of the tree at `dir`: the change times of its directories and policy files (found
/// as [`fz_compiler::load_tree`] finds them, hidden folders aside), then the files.
fn read_tree(dir: &Path) -> Result<TreeRead, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PolicyError::Io { path, source }
    };
    let root = std::fs::canonicalize(dir).map_err(io(dir))?;
    let mut stamps = Vec::new();
    let mut pending = vec![root.clone()];
    while let Some(current) = pending.pop() {
        let metadata = std::fs::metadata(&current).map_err(io(&current))?;
        stamps.push((relative(&root, &current), changed_at(&metadata)));
        for entry in std::fs::read_dir(&current).map_err(io(&current))? {
            let entry = entry.map_err(io(&current))?;
            let path = entry.path();
            if entry.file_type().map_err(io(&path))?.is_dir() {
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    pending.push(path);
                }
            } else if path
                .extension()
                .is_some_and(|ext| ext == "fz" || ext == "cedar")
            {
                let metadata = std::fs::metadata(&path).map_err(io(&path))?;
                stamps.push((relative(&root, &path), changed_at(&metadata)));
            }
        }
    }
    stamps.sort();
    let sources = fz_compiler::load_tree(&root)?;
    Ok(TreeRead {
        root,
        stamps,
        sources,
    })
}

fn relative(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_owned()
}

/// When a file or directory last changed: the later of its modification time and, on Unix,
/// its status change time, which no tool can set back (`rsync -t`, `tar` and `cp -p` keep
/// modification times from elsewhere).
fn changed_at(metadata: &std::fs::Metadata) -> SystemTime {
    let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let status_changed = u64::try_from(metadata.ctime())
            .ok()
            .map(|secs| {
                let nanos = u32::try_from(metadata.ctime_nsec()).unwrap_or(0);
                Duration::new(secs, nanos)
            })
            .and_then(|since| SystemTime::UNIX_EPOCH.checked_add(since));
        if let Some(status_changed) = status_changed {
            return modified.max(status_changed);
        }
    }
    modified
}

fn compile_tree(dir: &Path, sources: Sources) -> Result<LoadedPolicy, PolicyError> {
    if sources.is_empty() {
        // Most likely a wrong path or a half-finished checkout; a table that denies everything
        // would revoke every grant of the account.
        return Err(PolicyError::EmptyTree(dir.to_owned()));
    }
    let checked = fz_compiler::check(sources);
    let errors: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .collect();
    if !errors.is_empty() {
        let listed = errors
            .iter()
            .take(LISTED_DIAGNOSTICS)
            .map(|d| {
                let (file, line, column) = checked.sources.position(d.loc);
                format!(
                    "{file}:{line}:{column}: [{}] {}",
                    d.code.as_str(),
                    d.message
                )
            })
            .collect();
        return Err(PolicyError::Invalid {
            path: dir.to_owned(),
            errors: errors.len(),
            listed,
        });
    }
    let warnings = checked.diagnostics.len();
    let Some(table) = checked.table else {
        return Err(PolicyError::NoTable {
            path: dir.to_owned(),
            failed: checked.tests.failed,
        });
    };
    let bundle = Bundle::new(table).map_err(|source| PolicyError::Bundle {
        path: dir.to_owned(),
        source,
    })?;
    debug!(
        tree = %dir.display(),
        warnings,
        tests_passed = checked.tests.passed,
        "policy tree compiled"
    );
    Ok(LoadedPolicy::new(bundle))
}

fn read_bundle(file: &Path) -> Result<LoadedPolicy, PolicyError> {
    let bytes = std::fs::read(file).map_err(|source| PolicyError::Io {
        path: file.to_owned(),
        source,
    })?;
    let bundle = Bundle::from_bytes(&bytes).map_err(|source| PolicyError::Bundle {
        path: file.to_owned(),
        source,
    })?;
    Ok(LoadedPolicy::new(bundle))
}

/// A decision table as installed: what every decision of the account reads.
pub struct LoadedPolicy {
    pub table: DecisionTable,
    /// `sha256:` and hex: the content hash of the table, as `Bundle::new` computes it for a
    /// tree, or the bundle file's own (verified) hash. Grants and flow records carry it.
    pub bundle_hash: String,
    /// When this table was installed (a reload that finds the same hash keeps it, and its
    /// time).
    pub loaded_at: SystemTime,
}

impl LoadedPolicy {
    fn new(bundle: Bundle) -> LoadedPolicy {
        LoadedPolicy {
            table: DecisionTable::new(bundle.table),
            bundle_hash: bundle.hash,
            loaded_at: SystemTime::now(),
        }
    }
}

impl fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table.table();
        f.debug_struct("LoadedPolicy")
            .field("bundle_hash", &self.bundle_hash)
            .field("loaded_at", &self.loaded_at)
            .field("resources", &table.resources.len())
            .field("rules", &table.rules.len())
            .finish_non_exhaustive()
    }
}

/// What a successful reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The hash installed before the reload.
    pub previous_hash: String,
    /// The hash installed now.
    pub hash: String,
    /// The source compiled to a different table, which is now installed. `false`: the same
    /// table, and nothing was swapped.
    pub changed: bool,
}

/// Counts of reload attempts and why the latest one failed, for admins and tests
/// ([`PolicyEngine::reload_status`]). The first load is not counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Reloads that compiled, whether or not the table changed.
    pub succeeded: u64,
    /// Reloads that failed and kept the installed table.
    pub failed: u64,
    /// Why the latest reload failed; `None` when it succeeded, or before any reload. While it
    /// is `Some`, the installed table is older than the source.
    pub last_error: Option<String>,
}

/// The policy engine of one account: the installed table, and the machinery to replace it.
///
/// Share it as `Arc<PolicyEngine>`; every method takes `&self`. Reloads are serialised, so a
/// request from an admin and one from the file watcher never interleave.
#[derive(Debug)]
pub struct PolicyEngine {
    source: PolicySource,
    /// Readers clone the `Arc` under a read lock held for a few instructions; a reload takes
    /// the write lock only to swap the pointer.
    current: RwLock<Arc<LoadedPolicy>>,
    /// The installed hash; sent only when a different table is installed.
    hash: watch::Sender<String>,
    status: watch::Sender<ReloadStatus>,
    /// Held for a whole reload (compile and swap).
    reloading: Mutex<()>,
    options: LoadOptions,
}

impl PolicyEngine {
    /// [`PolicySource::detect`] then [`PolicyEngine::load`].
    pub fn open(path: impl Into<PathBuf>) -> Result<PolicyEngine, PolicyError> {
        PolicyEngine::load(PolicySource::detect(path)?)
    }

    /// [`PolicyEngine::load_with`] with the default options.
    pub fn load(source: PolicySource) -> Result<PolicyEngine, PolicyError> {
        PolicyEngine::load_with(source, LoadOptions::default())
    }

    /// Compiles the source and installs its table; reloads read the source the same way.
    /// Fails when the source does not give a table: a portal must not start without one.
    pub fn load_with(
        source: PolicySource,
        options: LoadOptions,
    ) -> Result<PolicyEngine, PolicyError> {
        let loaded = source.compile(&options)?;
        info!(
            source = %source,
            hash = %loaded.bundle_hash,
            resources = loaded.table.table().resources.len(),
            rules = loaded.table.table().rules.len(),
            "policy loaded"
        );
        let (hash, _) = watch::channel(loaded.bundle_hash.clone());
        let (status, _) = watch::channel(ReloadStatus::default());
        Ok(PolicyEngine {
            source,
            current: RwLock::new(Arc::new(loaded)),
            hash,
            status,
            reloading: Mutex::new(()),
            options,
        })
    }

    /// Where the policy comes from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// The installed table. Cheap: a read lock and an `Arc` clone. Hold the result for the
    /// whole of one decision, so that a decision and the hash it records agree.
    pub fn current(&self) -> Arc<LoadedPolicy> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Compiles the source again. On success, installs the new table when its hash differs
    /// from the installed one (then subscribers hear of it) and says whether it did. On any
    /// failure, keeps the installed table and returns why.
    ///
    /// Blocking and CPU-bound (it reads and compiles files, and waits for a tree that is being
    /// written to stand still, up to [`SettleOptions::max_wait`]): from async code, call it
    /// through `tokio::task::spawn_blocking`.
    pub fn reload(&self) -> Result<ReloadOutcome, PolicyError> {
        let _reloading = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let previous = self.current();
        let loaded = match self.source.compile(&self.options) {
            Ok(loaded) => loaded,
            Err(error) => {
                self.status.send_modify(|status| {
                    status.failed += 1;
                    status.last_error = Some(error.to_string());
                });
                return Err(error);
            }
        };
        let outcome = ReloadOutcome {
            changed: loaded.bundle_hash != previous.bundle_hash,
            previous_hash: previous.bundle_hash.clone(),
            hash: loaded.bundle_hash.clone(),
        };
        if outcome.changed {
            // Install first, then announce: a subscriber woken by the new hash finds the new
            // table in `current`.
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
            self.hash.send_replace(outcome.hash.clone());
            info!(
                source = %self.source,
                previous = %outcome.previous_hash,
                hash = %outcome.hash,
                "policy reloaded: new table installed"
            );
        } else {
            debug!(source = %self.source, hash = %outcome.hash, "policy reloaded: unchanged");
        }
        self.status.send_modify(|status| {
            status.succeeded += 1;
            status.last_error = None;
        });
        Ok(outcome)
    }

    /// The installed bundle hash, updated only when a reload installs a different table. After
    /// `changed()` returns, [`PolicyEngine::current`] already holds the table of that hash (or
    /// a newer one): re-evaluate live grants against it.
    pub fn subscribe(&self) -> watch::Receiver<String> {
        self.hash.subscribe()
    }

    /// Reload counts and the latest failure; updated after every reload attempt.
    pub fn reload_status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// [`PolicyEngine::watch_with`] with the default options.
    pub fn watch(self: &Arc<Self>) -> Result<Watcher, PolicyError> {
        self.watch_with(WatchOptions::default())
    }

    /// Watches the source for changes and reloads after each burst of them, on a thread of its
    /// own. A tree is watched recursively; a bundle through its parent directory, keeping only
    /// events that name the bundle file (editors and `fzc compile` replace files by rename).
    /// Failed reloads are logged at WARN and keep the installed table. Watching stops when the
    /// returned [`Watcher`] is dropped.
    pub fn watch_with(self: &Arc<Self>, options: WatchOptions) -> Result<Watcher, PolicyError> {
        let (target, mode, filter) = match &self.source {
            PolicySource::Tree(dir) => (
                dir.clone(),
                RecursiveMode::Recursive,
                EventFilter::Tree { root: dir.clone() },
            ),
            PolicySource::Bundle(file) => {
                let name = file
                    .file_name()
                    .ok_or_else(|| PolicyError::NotTreeOrBundle(file.clone()))?
                    .to_owned();
                let parent = match file.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                    _ => PathBuf::from("."),
                };
                (
                    parent,
                    RecursiveMode::NonRecursive,
                    EventFilter::File { name },
                )
            }
        };

        let (signals, receiver) = mpsc::channel();
        let engine = Arc::clone(self);
        let worker = std::thread::Builder::new()
            .name("fz-policy-watch".to_owned())
            .spawn(move || reload_after_changes(&engine, &receiver, options))
            .map_err(PolicyError::Thread)?;
        // From here on, an early return drops `watcher`, which stops and joins the worker.
        let mut watcher = Watcher {
            notify: None,
            signals: signals.clone(),
            worker: Some(worker),
            path: target.clone(),
        };
        let watch_error = |source| PolicyError::Watch {
            path: target.clone(),
            source,
        };
        let mut notify = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let relevant = match event {
                Ok(event) => filter.is_relevant(&event),
                Err(error) => {
                    // Events may have been lost (e.g. a queue overflow): reload to be sure.
                    warn!(%error, "policy file watcher error");
                    true
                }
            };
            if relevant {
                // Fails only when the worker is gone, i.e. the watcher is being dropped.
                let _ = signals.send(Signal::Changed);
            }
        })
        .map_err(watch_error)?;
        notify.watch(&target, mode).map_err(watch_error)?;
        watcher.notify = Some(notify);
        info!(source = %self.source, "watching policy for changes");
        Ok(watcher)
    }
}

/// How the file watcher coalesces bursts of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// After an event, further events are collected until none arrives for this long; then
    /// the source is reloaded once.
    pub quiet_period: Duration,
    /// The longest a reload waits for quiet after the first event of a burst, so a file that
    /// never stops changing still gets reloaded.
    pub max_delay: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            quiet_period: Duration::from_millis(150),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// A running file watch ([`PolicyEngine::watch`]). Dropping it stops the watch and waits for
/// a reload in progress to finish; no reload starts after the drop returns.
pub struct Watcher {
    notify: Option<RecommendedWatcher>,
    signals: mpsc::Sender<Signal>,
    worker: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Stop the events first, then the worker, which may be waiting out a burst.
        drop(self.notify.take());
        let _ = self.signals.send(Signal::Stop);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// What the notify callback and [`Watcher::drop`] tell the reload thread.
#[derive(Clone, Copy, Debug)]
enum Signal {
    Changed,
    Stop,
}

/// The reload thread: waits for a change, lets the burst settle, reloads; until told to stop.
fn reload_after_changes(
    engine: &PolicyEngine,
    signals: &mpsc::Receiver<Signal>,
    options: WatchOptions,
) {
    loop {
        match signals.recv() {
            Ok(Signal::Changed) => {}
            Ok(Signal::Stop) | Err(_) => return,
        }
        let deadline = Instant::now() + options.max_delay;
        loop {
            let wait = options
                .quiet_period
                .min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
            match signals.recv_timeout(wait) {
                Ok(Signal::Changed) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // Events that arrive during the reload queue up and cause another one, so an edit
        // that lands mid-compile is never missed.
        if let Err(error) = engine.reload() {
            warn!(
                source = %engine.source,
                %error,
                "policy reload failed; keeping the last good table"
            );
        }
    }
}

/// Which watcher events can change what a reload reads.
#[derive(Debug)]
enum EventFilter {
    /// Anything about `*.fz` and `*.cedar` files, and about directories (or files without an
    /// extension: a deleted path cannot be asked which it was) outside hidden folders such as
    /// `.git`.
    Tree { root: PathBuf },
    /// Anything naming the bundle file, in the watched parent directory.
    File { name: OsString },
}

impl EventFilter {
    fn is_relevant(&self, event: &Event) -> bool {
        match event.kind {
            // Opening and reading files (our own reloads do) changes nothing; a file closed
            // after writing may have.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        if event.need_rescan() || event.paths.is_empty() {
            return true;
        }
        event.paths.iter().any(|path| match self {
            EventFilter::Tree { root } => {
                if path
                    .extension()
                    .is_some_and(|ext| ext == "fz" || ext == "cedar")
                {
                    return true;
                }
                if path.extension().is_some() {
                    return false;
                }
                match path.strip_prefix(root) {
                    Ok(relative) => !relative
                        .components()
                        .any(|c| c.as_os_str().to_string_lossy().starts_with('.')),
                    Err(_) => true,
                }
            }
            EventFilter::File { name } => path.file_name() == Some(name.as_os_str()),
        })
    }
}

/// Why a policy could not be loaded, reloaded or watched.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read `{path}`: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` is neither a policy tree directory nor a bundle file", .0.display())]
    NotTreeOrBundle(PathBuf),
    #[error("cannot read the policy tree: {0}")]
    Tree(#[from] LoadError),
    #[error("policy tree `{}` has no .fz or .cedar files", .0.display())]
    EmptyTree(PathBuf),
    #[error(
        "policy tree `{path}` kept changing: {reads} reads over {waited} ms never found it \
         unchanged for {quiet} ms",
        path = .path.display(),
        waited = .waited.as_millis(),
        quiet = .quiet_period.as_millis()
    )]
    Unsettled {
        path: PathBuf,
        reads: u32,
        waited: Duration,
        quiet_period: Duration,
    },
    #[error(
        "policy tree `{path}` has {errors} error{s}: {list}",
        path = .path.display(),
        s = plural_s(.errors),
        list = list_diagnostics(.listed, .errors)
    )]
    Invalid {
        path: PathBuf,
        /// How many error diagnostics the tree has.
        errors: usize,
        /// The first few, as `file:line:column: [CODE] message`, file relative to the tree.
        listed: Vec<String>,
    },
    #[error(
        "policy tree `{path}` gave no decision table ({failed} tests or invariants failed)",
        path = .path.display()
    )]
    NoTable { path: PathBuf, failed: usize },
    #[error("bundle `{path}` is not usable: {source}", path = .path.display())]
    Bundle { path: PathBuf, source: BundleError },
    #[error("the policy compiler panicked on `{}`; this is a bug in fz", .0.display())]
    Panicked(PathBuf),
    #[error("cannot watch `{path}` for changes: {source}", path = .path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot start the policy watcher thread: {0}")]
    Thread(std::io::Error),
}

fn plural_s(count: &usize) -> &'static str {
    if *count == 1 { "" } else { "s" }
}

fn list_diagnostics(listed: &[String], errors: &usize) -> String {
    let mut list = listed.join("; ");
    if let Some(more) = errors.checked_sub(listed.len()).filter(|&more| more > 0) {
        list.push_str(&format!("; and {more} more"));
    }
    list
}
