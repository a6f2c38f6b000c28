//! The time part of invariant proofs: one instant for every combination of truth values that a
//! set of `time` conditions takes, over all of time as the time-zone database describes it.
//!
//! A time condition reads its zone's wall clock ([`TimeCondition::contains`]): the local weekday
//! and minute of the instant plus the zone's offset from UTC at that instant, to the second. So
//! the truth values of a set of conditions can change only where
//! - a zone the conditions name changes its offset (a transition of the database), or
//! - a zone's wall clock reaches a minute where one of its windows starts or ends, or midnight
//!   (where the weekday changes).
//!
//! Between two offset changes of any of the zones, every offset is constant: each local time is
//! the instant plus a constant, and the truth values repeat every week. [`representatives`] cuts
//! time into such periods and, in each, decides the instant where it begins (or, for a period
//! longer than a week, one week of it) and every instant within it where a zone's clock reaches
//! one of those minutes. Between two of those instants nothing the conditions read changes, and
//! every instant is decided by `contains` itself, so the combinations found are exactly those
//! that occur: none is missed, none is made up. A week of a period longer than a week shows all
//! the period's combinations, and so does a week of any other period whose clocks are as far
//! apart; so of such periods (and of short ones that are also alike in where in the week they
//! start) only the ones nearest the present are tried: the others show nothing new. Of 500 to
//! 1,000 periods since the database begins, three zones need 20 to 40 tried.
//!
//! Representatives are deterministic and near the present, for readable counterexamples: the
//! first instant on or after 2026-01-01T00:00:00Z at which the combination holds (that instant
//! itself, a window's edge or a clock change, all of which are tried), else the latest instant
//! tried before it. They never depend on the real clock.
//!
//! Transitions come from chrono-tz, the data `fzc query` and the portal decide with. chrono-tz
//! 0.10 keeps its transition table private, so `OffsetHistory::of` reads a zone's offset
//! every 3 days over the database's span and bisects each change to the second. That
//! finds every change unless a zone left an offset and came back to it within one step: the
//! shortest stretch of one offset in the database (tzdb 2025b) is 6 days 23 hours, more than
//! twice the step, which a test checks over every zone.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{LazyLock, OnceLock};

use chrono::{DateTime, Offset, TimeZone, Utc};
use chrono_tz::{TZ_VARIANTS, Tz};

use crate::condition::TimeCondition;

const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;

/// 2026-01-01T00:00:00Z: representatives are chosen as near it as they can be.
const REFERENCE: i64 = 1_767_225_600;

/// The span [`OffsetHistory::of`] reads, 1830-01-01 to 2110-01-01 (UTC). The database's first
/// change is in 1844 and its last in 2099: a test checks that every change is more than ten
/// years inside the span (a database with changes beyond it would show some near its ends)
/// and that each zone keeps its first offset before it and its last after it.
const SCAN_FROM: i64 = -4_417_977_600;
const SCAN_UNTIL: i64 = 4_417_977_600;

/// How far apart offsets are read. No zone changes its offset twice within twice this.
const SCAN_STEP: i64 = 3 * DAY;

/// All of time that chrono can represent: the span of a search without bounds.
pub const ALL_TIME: Range<DateTime<Utc>> = DateTime::<Utc>::MIN_UTC..DateTime::<Utc>::MAX_UTC;

/// A combination of truth values and an instant at which the conditions take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Representative {
    pub at: DateTime<Utc>,
    /// Whether each condition holds at `at`, in the order the conditions were given.
    pub holds: Vec<bool>,
}

/// One instant for every combination of truth values that `conditions` take at the instants
/// of `span` (its ends read to the second), in order of time. See the module documentation for
/// why the list is exact and which instant stands for each combination.
pub fn representatives(
    conditions: &[TimeCondition],
    span: Range<DateTime<Utc>>,
) -> Vec<Representative> {
    let mut zones: Vec<Tz> = Vec::new();
    for condition in conditions {
        if !zones.contains(&condition.zone) {
            zones.push(condition.zone);
        }
    }
    let clocks: Vec<Clock> = zones
        .iter()
        .map(|&zone| Clock {
            history: OffsetHistory::cached(zone),
            boundaries: boundaries(conditions, zone),
        })
        .collect();
    let periods = periods(&clocks, span.start.timestamp(), span.end.timestamp());
    let mut nearest: HashMap<Vec<bool>, i64> = HashMap::new();
    for (window, offsets) in windows(&periods) {
        for at in candidates(&clocks, offsets, window) {
            let Some(instant) = DateTime::from_timestamp(at, 0) else {
                continue;
            };
            let holds = conditions.iter().map(|c| c.contains(instant)).collect();
            nearest
                .entry(holds)
                .and_modify(|best| {
                    if nearness(at) < nearness(*best) {
                        *best = at;
                    }
                })
                .or_insert(at);
        }
    }
    let mut found: Vec<Representative> = nearest
        .into_iter()
        .filter_map(|(holds, at)| {
            Some(Representative {
                at: DateTime::from_timestamp(at, 0)?,
                holds,
            })
        })
        .collect();
    // INVARIANT: an instant has one combination, so no two representatives share one.
    found.sort_by_key(|r| r.at);
    found
}

/// Orders instants by how well they stand for a combination: those on or after the reference
/// first, earliest first, then those before it, latest first.
fn nearness(at: i64) -> (bool, i64) {
    if at >= REFERENCE {
        (false, at)
    } else {
        (true, -at)
    }
}

/// A zone the conditions name: its offsets and the seconds after local midnight at which one
/// of its conditions can change.
struct Clock {
    history: Cow<'static, OffsetHistory>,
    boundaries: Vec<i64>,
}

/// Seconds after local midnight where a window of a condition in `zone` starts or ends, and
/// midnight itself, where the weekday changes. `contains` reads the minute, so within a local
/// day its answer changes only at these.
fn boundaries(conditions: &[TimeCondition], zone: Tz) -> Vec<i64> {
    let mut seconds = vec![0];
    for window in conditions
        .iter()
        .filter(|c| c.zone == zone)
        .flat_map(|c| &c.windows)
    {
        for minute in [window.start, window.end] {
            seconds.push(i64::from(minute % 1440) * 60);
        }
    }
    seconds.sort_unstable();
    seconds.dedup();
    seconds
}

/// A stretch of time in which no zone changes its offset.
#[derive(Debug)]
struct Period {
    start: i64,
    end: i64,
    /// Each clock's offset, in seconds east of UTC.
    offsets: Vec<i32>,
}

/// `[from, until)` cut where any clock changes its offset.
fn periods(clocks: &[Clock], from: i64, until: i64) -> Vec<Period> {
    if from >= until {
        return Vec::new();
    }
    let mut changes: Vec<(i64, usize, i32)> = clocks
        .iter()
        .enumerate()
        .flat_map(|(i, clock)| {
            clock
                .history
                .changes
                .iter()
                .filter(|c| from < c.at && c.at < until)
                .map(move |c| (c.at, i, c.offset))
        })
        .collect();
    changes.sort_unstable();
    let mut offsets: Vec<i32> = clocks.iter().map(|c| c.history.offset_at(from)).collect();
    let mut periods = Vec::new();
    let mut start = from;
    for (at, clock, offset) in changes {
        if at > start {
            periods.push(Period {
                start,
                end: at,
                offsets: offsets.clone(),
            });
            start = at;
        }
        if let Some(o) = offsets.get_mut(clock) {
            *o = offset;
        }
    }
    periods.push(Period {
        start,
        end: until,
        offsets,
    });
    periods
}

/// The stretches of time to try, with the offsets in force there: every period of a week or
/// less whole, and of the longer ones a week each, the week nearest the reference. Alike
/// windows ([`Likeness`]) show the same combinations, so of each kind only the one around the
/// reference and the one nearest after it are tried, or the one nearest before it when there
/// is none after: windows do not overlap, so every instant of a nearer one is nearer than
/// every instant of a farther one, and every instant after the reference nearer than every
/// instant before it.
fn windows(periods: &[Period]) -> Vec<(Range<i64>, &[i32])> {
    let mut tried = Vec::new();
    let mut after: HashMap<Likeness, (Range<i64>, &[i32])> = HashMap::new();
    let mut before: HashMap<Likeness, (Range<i64>, &[i32])> = HashMap::new();
    for period in periods {
        let offsets = period.offsets.as_slice();
        let window = if period.end - period.start <= WEEK {
            period.start..period.end
        } else {
            let start = REFERENCE.clamp(period.start, period.end - WEEK);
            start..start + WEEK
        };
        let likeness = Likeness::of(&window, offsets);
        if window.start >= REFERENCE {
            // Periods come in order of time: the first one after is the nearest.
            after.entry(likeness).or_insert((window, offsets));
        } else if window.end <= REFERENCE {
            before.insert(likeness, (window, offsets));
        } else {
            tried.push((window, offsets));
        }
    }
    before.retain(|likeness, _| !after.contains_key(likeness));
    tried.extend(after.into_values());
    tried.extend(before.into_values());
    tried
}

/// What a window shows. Each condition reads its clock's place in the week, the instant plus
/// its offset modulo a week, so two windows of the same length show the same combinations, at
/// the same distances from their starts, when every clock stands at the same place in the week
/// at their starts: when the clocks are the same distances apart and the first stands at the
/// same place. A window of a whole week shows every place of every clock, wherever it starts.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Likeness {
    length: i64,
    /// Where the first clock stands in the week at the start; `None` for a whole week.
    place: Option<i64>,
    /// Each clock's offset less the first's.
    apart: Vec<i64>,
}

impl Likeness {
    fn of(window: &Range<i64>, offsets: &[i32]) -> Likeness {
        let first = offsets.first().map_or(0, |&o| i64::from(o));
        let length = window.end - window.start;
        Likeness {
            length,
            place: (length < WEEK).then(|| (window.start + first).rem_euclid(WEEK)),
            apart: offsets.iter().map(|&o| i64::from(o) - first).collect(),
        }
    }
}

/// The instants of `window` at which a condition can change: its start, and every instant at
/// which a clock (at its offset there) reaches one of its boundaries; and the reference, when
/// the window holds it, so that a combination that holds there is represented by it.
fn candidates(clocks: &[Clock], offsets: &[i32], window: Range<i64>) -> Vec<i64> {
    let mut instants = vec![window.start];
    if window.contains(&REFERENCE) {
        instants.push(REFERENCE);
    }
    for (clock, &offset) in clocks.iter().zip(offsets) {
        for &second in &clock.boundaries {
            // The first instant of the window at which the local time of day is `second`.
            let mut at = window.start + (second - i64::from(offset) - window.start).rem_euclid(DAY);
            while at < window.end {
                instants.push(at);
                at += DAY;
            }
        }
    }
    instants.sort_unstable();
    instants.dedup();
    instants
}

/// The instants in `span` at which `zone` changes its offset from UTC (from the zone's history,
/// read once per process).
pub(crate) fn offset_changes(zone: Tz, span: Range<DateTime<Utc>>) -> Vec<DateTime<Utc>> {
    let (from, until) = (span.start.timestamp(), span.end.timestamp());
    OffsetHistory::cached(zone)
        .changes
        .iter()
        .filter(|c| from <= c.at && c.at < until)
        .filter_map(|c| DateTime::from_timestamp(c.at, 0))
        .collect()
}

/// A zone's offset from UTC through all of time, as chrono-tz has it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OffsetHistory {
    /// Seconds east of UTC before the first change (for all time when there is none).
    first: i32,
    /// In order of time; each changes the offset.
    changes: Vec<OffsetChange>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OffsetChange {
    /// Seconds since the epoch: the first second of the new offset.
    at: i64,
    /// Seconds east of UTC from `at` on.
    offset: i32,
}

/// Offset histories, found once per zone and process: they depend only on the database
/// compiled in, and every tree checked reads the same ones.
static HISTORIES: LazyLock<Vec<OnceLock<OffsetHistory>>> =
    LazyLock::new(|| TZ_VARIANTS.iter().map(|_| OnceLock::new()).collect());

impl OffsetHistory {
    /// Reads the zone's offset every `SCAN_STEP` from 1830 to 2110 and bisects each change to
    /// the second, going on from the change found. A change is missed only if the zone leaves
    /// an offset and returns to it between two readings.
    fn of(zone: Tz) -> OffsetHistory {
        let offset = |at: i64| {
            DateTime::from_timestamp(at, 0).map_or(0, |t| {
                zone.offset_from_utc_datetime(&t.naive_utc())
                    .fix()
                    .local_minus_utc()
            })
        };
        let first = offset(SCAN_FROM);
        let mut changes = Vec::new();
        let (mut at, mut current) = (SCAN_FROM, first);
        while at < SCAN_UNTIL {
            let next = (at + SCAN_STEP).min(SCAN_UNTIL);
            if offset(next) == current {
                at = next;
                continue;
            }
            // INVARIANT: the offset at `before` is `current`, the offset at `after` is not.
            let (mut before, mut after) = (at, next);
            while after - before > 1 {
                let middle = before + (after - before) / 2;
                if offset(middle) == current {
                    before = middle;
                } else {
                    after = middle;
                }
            }
            current = offset(after);
            changes.push(OffsetChange {
                at: after,
                offset: current,
            });
            at = after;
        }
        OffsetHistory { first, changes }
    }

    /// [`of`](Self::of), found once per zone and process.
    fn cached(zone: Tz) -> Cow<'static, OffsetHistory> {
        match HISTORIES.get(zone as usize) {
            Some(cell) => Cow::Borrowed(cell.get_or_init(|| OffsetHistory::of(zone))),
            None => Cow::Owned(OffsetHistory::of(zone)),
        }
    }

    /// The offset at `at`, in seconds since the epoch.
    fn offset_at(&self, at: i64) -> i32 {
        let after = self.changes.partition_point(|c| c.at <= at);
        after
            .checked_sub(1)
            .and_then(|i| self.changes.get(i))
            .map_or(self.first, |c| c.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows are alike when they are as long and every clock stands at the same place in the
    /// week at their starts: a week apart, or with every offset moved by as much as the start
    /// moves back. A whole week shows every place, wherever it starts.
    #[test]
    fn windows_are_alike_when_every_clock_stands_at_the_same_place_in_the_week() {
        const HOUR: i64 = 3_600;
        const MONDAY: i64 = 1_767_571_200; // 2026-01-05T00:00:00Z
        let like = |start: i64, length: i64, offsets: &[i32]| {
            Likeness::of(&(start..start + length), offsets)
        };
        let winter = [3_600, -18_000]; // Berlin and New York
        let summer = [7_200, -14_400];
        let out_of_step = [3_600, -14_400];
        let window = like(MONDAY, 5 * HOUR, &winter);
        assert_eq!(window, like(MONDAY + WEEK, 5 * HOUR, &winter));
        assert_eq!(window, like(MONDAY - 4 * WEEK - HOUR, 5 * HOUR, &summer));
        assert_ne!(window, like(MONDAY + DAY, 5 * HOUR, &winter));
        assert_ne!(window, like(MONDAY - HOUR, 5 * HOUR, &winter));
        assert_ne!(window, like(MONDAY, 5 * HOUR, &out_of_step));
        assert_ne!(window, like(MONDAY, 4 * HOUR, &winter));
        assert_eq!(
            like(MONDAY, WEEK, &winter),
            like(MONDAY + DAY + HOUR, WEEK, &summer)
        );
        assert_ne!(
            like(MONDAY, WEEK, &winter),
            like(MONDAY, WEEK, &out_of_step)
        );
    }

    fn offset(zone: Tz, at: DateTime<Utc>) -> i32 {
        zone.offset_from_utc_datetime(&at.naive_utc())
            .fix()
            .local_minus_utc()
    }

    /// The histories are what chrono-tz says, for every zone: each change is where the offset
    /// changes, to the second; no two changes are within two steps of each other, so no zone
    /// can leave an offset and come back to it between two readings unseen; and nothing
    /// changes before or after the span read, whose ends are more than ten years from any
    /// change found.
    #[test]
    fn every_zone_changes_its_offset_where_chrono_tz_says_and_seldom() {
        let seconds = |at: i64| DateTime::from_timestamp(at, 0).unwrap();
        let mut shortest = (i64::MAX, "");
        for zone in TZ_VARIANTS {
            let history = OffsetHistory::of(zone);
            assert_eq!(
                history.first,
                offset(zone, DateTime::<Utc>::MIN_UTC),
                "{zone}"
            );
            let last = history.changes.last().map_or(history.first, |c| c.offset);
            assert_eq!(last, offset(zone, DateTime::<Utc>::MAX_UTC), "{zone}");
            let ten_years = 3_653 * DAY;
            let inside = SCAN_FROM + ten_years..SCAN_UNTIL - ten_years;
            let mut previous = history.first;
            for change in &history.changes {
                assert_eq!(offset(zone, seconds(change.at - 1)), previous, "{zone}");
                assert_eq!(offset(zone, seconds(change.at)), change.offset, "{zone}");
                assert_ne!(change.offset, previous, "{zone}");
                assert!(
                    inside.contains(&change.at),
                    "{zone} changes at {}",
                    change.at
                );
                previous = change.offset;
            }
            for pair in history.changes.windows(2) {
                let gap = pair[1].at - pair[0].at;
                if gap < shortest.0 {
                    shortest = (gap, zone.name());
                }
            }
        }
        assert!(
            shortest.0 > 2 * SCAN_STEP,
            "{} changes its offset twice within {} s",
            shortest.1,
            shortest.0
        );
    }
}
