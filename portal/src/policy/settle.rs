//! Reading a policy tree whole. An edit that spans files (a guardrail moved from one file to
//! another: the first file written without it, the second a moment later) passes through trees
//! that may well be valid, and a reload that reads one of them would install it. So a tree is
//! read until two reads in a row find the same thing and nothing in it has changed for a quiet
//! period; only then is it compiled.
//!
//! The decision is pure ([`Settling::observe`]: a read and the time it started in, what to do
//! next out), and [`read_settled`] drives it with a read and a [`SettleClock`] it is given, so
//! tests decide when the tree changes and what the time is without sleeping.
//!
//! Two things count as evidence that the tree has been quiet for the quiet period, and either
//! will do: the newest change time the read saw (files and directories; on Unix the later of
//! modification and status change, which tools that keep modification times, such as
//! `rsync -t` or `tar`, cannot set back) is at least that old; or reads identical to this one
//! have been coming back for at least that long (for change times in the future, from a
//! machine whose clock runs ahead).

use std::time::{Duration, SystemTime};

/// How a load of a policy tree waits for the tree to stop changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettleOptions {
    /// A tree is read when nothing in it has changed for this long and two reads in a row
    /// agree. Longer than the file watcher's own quiet period (`WatchOptions::quiet_period`),
    /// so an edit whose writes are further apart than the watcher waits is still caught here.
    pub quiet_period: Duration,
    /// The most reads one load makes before it gives up.
    pub max_reads: u32,
    /// The most one load waits between reads, in all, before it gives up.
    pub max_wait: Duration,
}

impl Default for SettleOptions {
    fn default() -> Self {
        SettleOptions {
            quiet_period: Duration::from_millis(250),
            max_reads: 40,
            max_wait: Duration::from_secs(5),
        }
    }
}

/// What one read of a source found. Two reads are compared whole: any difference (a file, its
/// text, a change time) means the source changed in between.
pub(crate) trait Snapshot: PartialEq {
    /// The latest time anything in it changed; `None` when nothing says.
    fn newest_change(&self) -> Option<SystemTime>;
}

/// The time, and waiting: the system's for the portal, a test's own in tests.
pub(crate) trait SettleClock {
    fn now(&mut self) -> SystemTime;
    fn pause(&mut self, duration: Duration);
}

/// The wall clock and `thread::sleep`.
#[derive(Debug, Default)]
pub(crate) struct SystemClock;

impl SettleClock for SystemClock {
    fn now(&mut self) -> SystemTime {
        SystemTime::now()
    }

    fn pause(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// What to do after a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The read is settled: compile it.
    Settled,
    /// Read again after this long (zero: at once).
    ReadAgain { after: Duration },
    /// The bounds are spent (reads or time): the load fails.
    GiveUp,
}

/// How [`read_settled`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome<S> {
    Settled(S),
    Unsettled { reads: u32, waited: Duration },
}

/// The settling of one load: the reads so far, and the time waited.
#[derive(Debug)]
pub(crate) struct Settling<S> {
    options: SettleOptions,
    previous: Option<S>,
    /// When the first of the current run of identical reads started.
    run_started: SystemTime,
    reads: u32,
    waited: Duration,
}

impl<S: Snapshot> Settling<S> {
    pub(crate) fn new(options: SettleOptions) -> Settling<S> {
        Settling {
            options,
            previous: None,
            run_started: SystemTime::UNIX_EPOCH,
            reads: 0,
            waited: Duration::ZERO,
        }
    }

    /// Takes the read that started at `at` and says what to do next. After
    /// [`Step::ReadAgain`] the caller is expected to wait as long as it says (that time counts
    /// against [`SettleOptions::max_wait`]); after [`Step::Settled`], [`Settling::into_read`]
    /// gives the read.
    pub(crate) fn observe(&mut self, read: S, at: SystemTime) -> Step {
        self.reads = self.reads.saturating_add(1);
        let same = self.previous.as_ref() == Some(&read);
        if !same {
            self.run_started = at;
        }
        let quiet = self.options.quiet_period;
        // How long until the tree will have been quiet long enough, by each kind of evidence
        // (zero: it has been already).
        let by_changes = read
            .newest_change()
            .and_then(|changed| changed.checked_add(quiet))
            .map_or(Duration::ZERO, |quiet_at| until(at, quiet_at));
        let by_reads = self
            .run_started
            .checked_add(quiet)
            .map_or(Duration::ZERO, |quiet_at| until(at, quiet_at));
        let wait = by_changes.min(by_reads);
        self.previous = Some(read);
        if same && wait.is_zero() {
            return Step::Settled;
        }
        let budget = self.options.max_wait.saturating_sub(self.waited);
        if self.reads >= self.options.max_reads || wait > budget {
            return Step::GiveUp;
        }
        self.waited += wait;
        Step::ReadAgain { after: wait }
    }

    pub(crate) fn reads(&self) -> u32 {
        self.reads
    }

    pub(crate) fn waited(&self) -> Duration {
        self.waited
    }

    /// The latest read.
    pub(crate) fn into_read(self) -> Option<S> {
        self.previous
    }
}

/// Reads with `read` (given the read's number, from 1) until [`Settling`] says the read is
/// settled or gives up. A read that fails ends it with that error.
pub(crate) fn read_settled<S: Snapshot, E>(
    options: SettleOptions,
    clock: &mut impl SettleClock,
    mut read: impl FnMut(u32) -> Result<S, E>,
) -> Result<Outcome<S>, E> {
    let mut settling = Settling::new(options);
    loop {
        let at = clock.now();
        let snapshot = read(settling.reads().saturating_add(1))?;
        match settling.observe(snapshot, at) {
            Step::Settled => {
                let reads = settling.reads();
                let waited = settling.waited();
                return Ok(match settling.into_read() {
                    Some(read) => Outcome::Settled(read),
                    None => Outcome::Unsettled { reads, waited },
                });
            }
            Step::ReadAgain { after } => {
                if !after.is_zero() {
                    clock.pause(after);
                }
            }
            Step::GiveUp => {
                return Ok(Outcome::Unsettled {
                    reads: settling.reads(),
                    waited: settling.waited(),
                });
            }
        }
    }
}

/// How long from `now` until `then`; zero when `then` is not later.
fn until(now: SystemTime, then: SystemTime) -> Duration {
    then.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::convert::Infallible;
    use std::rc::Rc;

    use super::*;

    const QUIET: Duration = Duration::from_millis(250);

    fn options() -> SettleOptions {
        SettleOptions {
            quiet_period: QUIET,
            max_reads: 10,
            max_wait: Duration::from_secs(2),
        }
    }

    /// A tree as a test sees it: its text and when it last changed.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Tree {
        text: &'static str,
        changed: Option<SystemTime>,
    }

    impl Snapshot for Tree {
        fn newest_change(&self) -> Option<SystemTime> {
            self.changed
        }
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000) + Duration::from_millis(ms)
    }

    fn tree(text: &'static str, changed_ms: u64) -> Tree {
        Tree {
            text,
            changed: Some(at(changed_ms)),
        }
    }

    /// A clock that moves only when asked to pause, and remembers every pause. Its time is
    /// shared, so that a test's reader can see it.
    struct TestClock {
        now: Rc<Cell<SystemTime>>,
        pauses: Vec<Duration>,
    }

    impl TestClock {
        fn at(ms: u64) -> TestClock {
            TestClock {
                now: Rc::new(Cell::new(at(ms))),
                pauses: Vec::new(),
            }
        }
    }

    impl SettleClock for TestClock {
        fn now(&mut self) -> SystemTime {
            self.now.get()
        }

        fn pause(&mut self, duration: Duration) {
            self.pauses.push(duration);
            self.now.set(self.now.get() + duration);
        }
    }

    /// Runs [`read_settled`] from time `start_ms` over the tree `tree_at` gives for each read
    /// (by its number and the time), and returns the outcome, the reads and the clock.
    fn run(
        options: SettleOptions,
        start_ms: u64,
        mut tree_at: impl FnMut(u32, SystemTime) -> Tree,
    ) -> (Outcome<Tree>, Vec<Tree>, TestClock) {
        let mut clock = TestClock::at(start_ms);
        let now = Rc::clone(&clock.now);
        let mut reads = Vec::new();
        let outcome = read_settled(options, &mut clock, |n| -> Result<Tree, Infallible> {
            let read = tree_at(n, now.get());
            reads.push(read.clone());
            Ok(read)
        });
        let Ok(outcome) = outcome;
        (outcome, reads, clock)
    }

    #[test]
    fn a_quiet_tree_is_settled_by_two_reads_without_waiting() {
        let (outcome, reads, clock) = run(options(), 10_000, |_, _| tree("a", 0));
        assert_eq!(outcome, Outcome::Settled(tree("a", 0)));
        assert_eq!(reads.len(), 2);
        assert!(clock.pauses.is_empty());
    }

    #[test]
    fn a_tree_that_changes_between_reads_is_read_until_it_holds_still() {
        // The guardrail moves: read 1 sees the first file written without it (a valid tree),
        // then the second file is written; reads go on until two agree and the tree is quiet.
        let (outcome, reads, _) = run(options(), 1_000, |n, _| match n {
            1 => tree("half-written", 1_000),
            _ => tree("whole", 1_050),
        });
        assert_eq!(outcome, Outcome::Settled(tree("whole", 1_050)));
        assert_eq!(reads.first(), Some(&tree("half-written", 1_000)));
        assert!(reads.len() >= 3, "{reads:?}");
    }

    #[test]
    fn a_recent_change_is_waited_out_before_the_tree_is_read_again() {
        // The first file was just written; the second may yet come: wait until the tree has
        // been quiet for the quiet period, then read again.
        let (outcome, reads, clock) = run(options(), 1_100, |n, now| {
            if now >= at(1_200) {
                tree("whole", 1_200)
            } else {
                assert!(n <= 2, "read {n} came before the tree was quiet");
                tree("half-written", 1_000)
            }
        });
        assert_eq!(outcome, Outcome::Settled(tree("whole", 1_200)));
        assert!(reads.contains(&tree("half-written", 1_000)));
        assert_eq!(clock.pauses.first(), Some(&Duration::from_millis(150)));
    }

    #[test]
    fn what_the_decision_says_after_each_read() {
        let mut settling = Settling::new(options());
        // Changed 100 ms before the read: wait the other 150 ms.
        assert_eq!(
            settling.observe(tree("a", 900), at(1_000)),
            Step::ReadAgain {
                after: Duration::from_millis(150)
            }
        );
        // Read again too soon: the reads agree, but the tree has not been quiet long enough.
        assert_eq!(
            settling.observe(tree("a", 900), at(1_050)),
            Step::ReadAgain {
                after: Duration::from_millis(100)
            }
        );
        // Something changed meanwhile: the run starts again.
        assert_eq!(
            settling.observe(tree("b", 1_100), at(1_150)),
            Step::ReadAgain {
                after: Duration::from_millis(200)
            }
        );
        assert_eq!(settling.observe(tree("b", 1_100), at(1_350)), Step::Settled);
        assert_eq!(settling.reads(), 4);
        assert_eq!(settling.waited(), Duration::from_millis(450));
        assert_eq!(settling.into_read(), Some(tree("b", 1_100)));
    }

    #[test]
    fn change_times_in_the_future_are_outlasted_by_identical_reads() {
        // Files from a machine whose clock runs an hour ahead: their times never look old,
        // but reads that agree for the quiet period are evidence enough.
        let (outcome, reads, clock) = run(options(), 1_000, |_, _| tree("a", 3_600_000));
        assert_eq!(outcome, Outcome::Settled(tree("a", 3_600_000)));
        assert_eq!(reads.len(), 2);
        assert_eq!(clock.pauses, [QUIET]);
    }

    #[test]
    fn a_tree_that_never_holds_still_is_given_up_within_the_bounds() {
        let texts = ["a", "b"];
        let options = options();
        let (outcome, reads, clock) = run(options, 1_000, |n, now| Tree {
            text: texts[n as usize % 2],
            changed: Some(now),
        });
        let Outcome::Unsettled {
            reads: count,
            waited,
        } = outcome
        else {
            panic!("a tree that changes at every read settled: {outcome:?}");
        };
        assert_eq!(count as usize, reads.len());
        assert!(count <= options.max_reads);
        assert!(waited <= options.max_wait);
        assert_eq!(clock.pauses.iter().sum::<Duration>(), waited);
    }

    #[test]
    fn the_read_limit_holds_even_without_waiting() {
        // Reads that differ while change times are old: no waiting, but no end either.
        let options = SettleOptions {
            max_reads: 4,
            ..options()
        };
        let (outcome, reads, clock) = run(options, 10_000, |n, _| Tree {
            text: if n % 2 == 0 { "a" } else { "b" },
            changed: Some(at(0)),
        });
        assert_eq!(
            outcome,
            Outcome::Unsettled {
                reads: 4,
                waited: Duration::ZERO
            }
        );
        assert_eq!(reads.len(), 4);
        assert!(clock.pauses.is_empty());
    }

    #[test]
    fn a_wait_longer_than_the_time_left_gives_up_at_once() {
        let options = SettleOptions {
            max_wait: Duration::from_millis(100),
            ..options()
        };
        let mut settling = Settling::new(options);
        assert_eq!(settling.observe(tree("a", 1_000), at(1_000)), Step::GiveUp);
    }

    #[test]
    fn a_failed_read_ends_the_load_with_its_error() {
        let mut clock = TestClock::at(0);
        let outcome = read_settled(options(), &mut clock, |n| match n {
            1 => Ok(tree("a", 0)),
            _ => Err("gone"),
        });
        assert_eq!(outcome, Err("gone"));
    }
}
