//! Rule conditions and the request context they are decided against.
//!
//! INVARIANT: a condition on a fact the context lacks fails closed on both sides: it is false
//! in an allow rule and true in a deny rule, so an allow never rests on a missing fact and a
//! guardrail never lapses for one. Callers pass which side they are on as `when_missing`.

use std::net::IpAddr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::{GapInfo, Tz};
use serde::{Deserialize, Serialize};

use crate::address::Network;

/// What the portal knows about a connection request beyond who and what.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    pub at: Option<DateTime<Utc>>,
    /// The client's public address.
    pub source: Option<IpAddr>,
    /// ISO 3166 alpha-2, uppercase.
    pub country: Option<String>,
    /// The identity provider the user signed in with.
    pub provider: Option<String>,
    /// The device was marked verified by an admin. Never missing: a device is marked or not.
    pub verified: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Condition {
    Time(TimeCondition),
    Country {
        negated: bool,
        codes: Vec<String>,
    },
    Source {
        negated: bool,
        networks: Vec<Network>,
    },
    Provider {
        provider: String,
    },
    ClientVerified,
}

/// `time DAYS HH:MM-HH:MM[, ...] TZ`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimeCondition {
    /// Days a window may start on.
    pub days: Vec<Day>,
    pub windows: Vec<ClockWindow>,
    #[serde(with = "zone_name")]
    pub zone: Tz,
}

/// Minutes after local midnight; `end` is exclusive and may be 1440 (`24:00`). A window whose
/// end is before its start crosses midnight and belongs to the day it starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClockWindow {
    pub start: u16,
    pub end: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

pub const DAYS: [Day; 7] = [
    Day::Mon,
    Day::Tue,
    Day::Wed,
    Day::Thu,
    Day::Fri,
    Day::Sat,
    Day::Sun,
];

impl Day {
    pub fn parse(text: &str) -> Option<Day> {
        let index = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .iter()
            .position(|d| *d == text)?;
        DAYS.get(index).copied()
    }

    pub fn as_str(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .get(self.index())
            .copied()
            .unwrap_or("")
    }

    fn index(self) -> usize {
        self as usize
    }

    fn previous(self) -> Day {
        DAYS.get((self.index() + 6) % 7)
            .copied()
            .unwrap_or(Day::Sun)
    }

    /// Days from `self` to `last`, wrapping past Sunday (`fri-mon`).
    pub fn through(self, last: Day) -> Vec<Day> {
        let span = (last.index() + 7 - self.index()) % 7;
        (0..=span)
            .filter_map(|i| DAYS.get((self.index() + i) % 7).copied())
            .collect()
    }
}

/// `HH:MM` to minutes after midnight; `24:00` allowed (as a window's end).
pub fn parse_clock(text: &str) -> Option<u16> {
    let (hours, minutes) = text.split_once(':')?;
    let hours: u16 = hours.parse().ok()?;
    let minutes: u16 = minutes.parse().ok()?;
    if minutes >= 60 || hours > 24 || (hours == 24 && minutes != 0) {
        return None;
    }
    Some(hours * 60 + minutes)
}

impl Condition {
    /// Whether the condition holds for `context`; `when_missing` is the answer when the fact
    /// it needs is absent (see the module invariant).
    pub fn holds(&self, context: &Context, when_missing: bool) -> bool {
        match self {
            Condition::Time(time) => context.at.map_or(when_missing, |at| time.contains(at)),
            Condition::Country { negated, codes } => {
                context.country.as_ref().map_or(when_missing, |c| {
                    codes.iter().any(|code| code == c) != *negated
                })
            }
            Condition::Source { negated, networks } => context.source.map_or(when_missing, |ip| {
                networks.iter().any(|n| n.contains(ip)) != *negated
            }),
            Condition::Provider { provider } => context
                .provider
                .as_ref()
                .map_or(when_missing, |p| p == provider),
            Condition::ClientVerified => context.verified,
        }
    }
}

/// How far ahead [`TimeCondition::window_end`] looks for a window to close. A condition that
/// holds for 8 days on end has held at every local weekday and minute (a week of wall clock,
/// with a day to spare for clock changes), so it never stops holding.
const HORIZON_DAYS: i64 = 8;

/// Local dates `window_end` tries window ends on: from the day before `at`'s (a clock set back
/// over midnight returns to it) to the day after the horizon's (where an end of `24:00` on the
/// horizon's date falls).
const SEARCH_DAYS: i64 = HORIZON_DAYS + 3;

impl TimeCondition {
    /// Whether `at` falls in a window, read off the zone's wall clock to the minute.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.zone);
        let Some(&day) = DAYS.get(local.weekday().num_days_from_monday() as usize) else {
            return false;
        };
        let minute = (local.hour() * 60 + local.minute()) as u16;
        let on = |d: Day| self.days.contains(&d);
        self.windows.iter().any(|w| {
            if w.start < w.end {
                on(day) && w.start <= minute && minute < w.end
            } else {
                (on(day) && minute >= w.start) || (on(day.previous()) && minute < w.end)
            }
        })
    }

    /// When the window that holds at `at` closes: the first instant after `at` at which
    /// [`contains`](Self::contains) is false. The portal gives a grant this expiry, so windows
    /// that touch count as one stretch (`mon 22:00-24:00` then `tue 00:00-06:00`, or
    /// `any 00:00-24:00` from one day to the next): a grant should not lapse at a midnight the
    /// policy does not close.
    ///
    /// - `Some(at)` when the condition does not hold at `at`: the window is already closed, so
    ///   a grant resting on it expires at once (fails closed).
    /// - `None` when it holds at `at` and does not stop within 8 days: it then holds at every
    ///   local weekday and minute, so it never stops.
    ///
    /// `contains` reads the wall clock, so it can only turn false where the wall clock reaches
    /// a window's end or where the zone changes its offset (the clock jumps forward or back).
    /// Those instants are tried in order, a few dozen zone lookups, where a scan of every
    /// minute would take 11,520 lookups; the portal asks once per grant.
    pub fn window_end(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if !self.contains(at) {
            return Some(at);
        }
        let mut candidates = self.wall_clock_ends(at);
        // The wall clock also jumps where the zone changes its offset, and a window can close
        // there without reaching its end (the clock set back from `03:00` to `02:00` leaves
        // `02:30-03:00`).
        let until = at + chrono::TimeDelta::days(SEARCH_DAYS);
        candidates.extend(crate::timeline::offset_changes(self.zone, at..until));
        candidates.retain(|t| *t > at);
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find(|t| !self.contains(*t))
    }

    /// Every instant at which the wall clock shows a window's end on a date of the search (an
    /// end of `24:00` is `00:00` of the next date; a window that crosses midnight ends on the
    /// date after its start). Every end on every date: `contains` rules out the ones that do
    /// not close anything, which is cheaper than working out which do.
    fn wall_clock_ends(&self, at: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut ends: Vec<NaiveTime> = self
            .windows
            .iter()
            .filter_map(|w| {
                let end = u32::from(w.end % 1440);
                NaiveTime::from_hms_opt(end / 60, end % 60, 0)
            })
            .collect();
        ends.sort_unstable();
        ends.dedup();
        let today = at.with_timezone(&self.zone).date_naive();
        let dates =
            std::iter::successors(today.pred_opt(), |d| d.succ_opt()).take(SEARCH_DAYS as usize);
        let mut instants = Vec::with_capacity(ends.len() * SEARCH_DAYS as usize);
        for date in dates {
            for end in &ends {
                instants.extend(
                    wall_clock_instants(self.zone, date.and_time(*end))
                        .into_iter()
                        .flatten(),
                );
            }
        }
        instants
    }
}

/// The instants at which `zone`'s wall clock shows `local`. When the clock is set back over
/// it, both: `at` may lie in the repeated hour, and then only the later one is after it. When
/// the clock is set forward over it, the first instant after the gap, when the clock moves
/// past it.
fn wall_clock_instants(zone: Tz, local: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => [Some(t.to_utc()), None],
        LocalResult::Ambiguous(earliest, latest) => {
            [Some(earliest.to_utc()), Some(latest.to_utc())]
        }
        LocalResult::None => [
            GapInfo::new(&local, &zone)
                .and_then(|gap| gap.end)
                .map(|t| t.to_utc()),
            None,
        ],
    }
}

impl std::fmt::Display for Condition {
    /// The condition as the language writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let not = |negated: bool| if negated { "not " } else { "" };
        match self {
            Condition::Time(t) => {
                let windows: Vec<String> = t.windows.iter().map(ClockWindow::to_string).collect();
                write!(
                    f,
                    "time {} {} {}",
                    day_list(&t.days),
                    windows.join(", "),
                    t.zone.name()
                )
            }
            Condition::Country { negated, codes } => {
                write!(f, "country {}in {}", not(*negated), codes.join(", "))
            }
            Condition::Source { negated, networks } => {
                let networks: Vec<String> = networks.iter().map(ToString::to_string).collect();
                write!(f, "source {}in {}", not(*negated), networks.join(", "))
            }
            Condition::Provider { provider } => write!(f, "provider {provider}"),
            Condition::ClientVerified => f.write_str("client verified"),
        }
    }
}

/// Sorted days as the language writes them: `any`, runs as `mon-fri`, others with commas.
fn day_list(days: &[Day]) -> String {
    if days.len() == 7 {
        return "any".to_owned();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut run: Vec<Day> = Vec::new();
    let mut flush = |run: &mut Vec<Day>| match run.as_slice() {
        [] => {}
        [one] => parts.push(one.as_str().to_owned()),
        [first, .., last] if run.len() > 2 => {
            parts.push(format!("{}-{}", first.as_str(), last.as_str()))
        }
        _ => parts.extend(run.iter().map(|d| d.as_str().to_owned())),
    };
    for day in days {
        if run
            .last()
            .is_some_and(|last| last.index() + 1 != day.index())
        {
            flush(&mut run);
            run.clear();
        }
        run.push(*day);
    }
    flush(&mut run);
    parts.join(",")
}

impl std::fmt::Display for ClockWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

mod zone_name {
    use chrono_tz::Tz;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(zone: &Tz, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(zone.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse()
            .map_err(|_| serde::de::Error::custom(format!("unknown time zone `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instant(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn at(text: &str) -> Context {
        Context {
            at: Some(instant(text)),
            ..Context::default()
        }
    }

    fn time(days: &[Day], windows: &[(&str, &str)], zone: &str) -> Condition {
        Condition::Time(time_condition(days, windows, zone))
    }

    fn time_condition(days: &[Day], windows: &[(&str, &str)], zone: &str) -> TimeCondition {
        TimeCondition {
            days: days.to_vec(),
            windows: windows
                .iter()
                .map(|(s, e)| ClockWindow {
                    start: parse_clock(s).unwrap(),
                    end: parse_clock(e).unwrap(),
                })
                .collect(),
            zone: zone.parse().unwrap(),
        }
    }

    /// `DAYS HH:MM-HH:MM[, ...] ZONE`, a time condition as the language writes it.
    fn time_of(text: &str) -> TimeCondition {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (days, rest) = words.split_first().unwrap();
        let (zone, windows) = rest.split_last().unwrap();
        let days: Vec<Day> = match *days {
            "any" => DAYS.to_vec(),
            days => days
                .split(',')
                .flat_map(|d| match d.split_once('-') {
                    Some((first, last)) => Day::parse(first)
                        .unwrap()
                        .through(Day::parse(last).unwrap()),
                    None => vec![Day::parse(d).unwrap()],
                })
                .collect(),
        };
        let windows: Vec<(&str, &str)> = windows
            .iter()
            .map(|w| w.trim_end_matches(',').split_once('-').unwrap())
            .collect();
        time_condition(&days, &windows, zone)
    }

    /// `window_end` of the time condition `condition` at each instant, against the expected
    /// end; instants in RFC 3339 with any offset.
    fn check_window_end(condition: &str, cases: &[(&str, Option<&str>)]) {
        let time = time_of(condition);
        for (at, expected) in cases {
            assert_eq!(
                time.window_end(instant(at)),
                expected.map(instant),
                "`{condition}` at {at}"
            );
        }
    }

    // 2026-11-23 is a Monday; Berlin is at +01:00 in November.

    #[test]
    fn window_end_of_a_plain_window_is_its_end() {
        check_window_end(
            "mon-fri 08:00-18:00 Europe/Berlin",
            &[
                (
                    "2026-11-26T10:00:00+01:00",
                    Some("2026-11-26T18:00:00+01:00"),
                ),
                (
                    "2026-11-26T08:00:00+01:00",
                    Some("2026-11-26T18:00:00+01:00"),
                ),
                (
                    "2026-11-26T17:59:59.5+01:00",
                    Some("2026-11-26T18:00:00+01:00"),
                ),
                ("2026-11-26T09:30:00Z", Some("2026-11-26T17:00:00Z")),
                ("2026-07-02T06:30:00Z", Some("2026-07-02T16:00:00Z")),
            ],
        );
        check_window_end(
            "mon-fri 08:00-18:00 UTC",
            &[("2026-11-26T10:00:00+01:00", Some("2026-11-26T18:00:00Z"))],
        );
        check_window_end(
            "thu 08:00-12:00, 13:00-18:00 Europe/Berlin",
            &[
                (
                    "2026-11-26T09:00:00+01:00",
                    Some("2026-11-26T12:00:00+01:00"),
                ),
                (
                    "2026-11-26T13:00:00+01:00",
                    Some("2026-11-26T18:00:00+01:00"),
                ),
            ],
        );
    }

    #[test]
    fn window_end_of_a_window_crossing_midnight_is_the_next_morning() {
        check_window_end(
            "fri 22:00-06:00 Europe/Berlin",
            &[
                (
                    "2026-11-27T23:00:00+01:00",
                    Some("2026-11-28T06:00:00+01:00"),
                ),
                // Saturday, in the window Friday opened.
                (
                    "2026-11-28T03:00:00+01:00",
                    Some("2026-11-28T06:00:00+01:00"),
                ),
            ],
        );
        check_window_end(
            "fri 22:00-00:00 Europe/Berlin",
            &[(
                "2026-11-27T23:59:00+01:00",
                Some("2026-11-28T00:00:00+01:00"),
            )],
        );
        check_window_end(
            "fri 08:00-07:00 America/New_York",
            &[(
                "2026-11-27T09:00:00-05:00",
                Some("2026-11-28T07:00:00-05:00"),
            )],
        );
    }

    #[test]
    fn window_end_runs_through_windows_that_touch() {
        check_window_end(
            "mon,tue 22:00-24:00, 00:00-06:00 Europe/Berlin",
            &[(
                "2026-11-23T23:00:00+01:00",
                Some("2026-11-24T06:00:00+01:00"),
            )],
        );
        // Tuesday is not a day of the condition, so its morning window does not open.
        check_window_end(
            "mon 22:00-24:00, 00:00-06:00 Europe/Berlin",
            &[(
                "2026-11-23T23:00:00+01:00",
                Some("2026-11-24T00:00:00+01:00"),
            )],
        );
        check_window_end(
            "mon-fri 00:00-24:00 UTC",
            &[("2026-11-23T12:00:00Z", Some("2026-11-28T00:00:00Z"))],
        );
        check_window_end(
            "any 22:00-06:00, 06:00-09:00 Europe/Berlin",
            &[(
                "2026-11-27T23:00:00+01:00",
                Some("2026-11-28T09:00:00+01:00"),
            )],
        );
        // Friday's night runs into a morning that Saturday, not a day of it, does not have.
        check_window_end(
            "mon-fri 22:00-06:00, 06:00-09:00 Europe/Berlin",
            &[(
                "2026-11-27T23:00:00+01:00",
                Some("2026-11-28T06:00:00+01:00"),
            )],
        );
        // Sunday's night runs into Monday's morning.
        check_window_end(
            "sun,mon 22:00-06:00, 06:00-09:00 Europe/Berlin",
            &[(
                "2026-11-22T23:00:00+01:00",
                Some("2026-11-23T09:00:00+01:00"),
            )],
        );
    }

    #[test]
    fn window_end_of_a_condition_that_always_holds_is_none() {
        let year = [
            "2026-11-23T12:00:00Z",
            "2026-03-27T12:00:00Z", // before both clock changes of the year
            "2026-10-23T12:00:00Z",
        ];
        for condition in [
            "any 00:00-24:00 Europe/Berlin",
            "any 00:00-24:00 America/New_York",
            "any 00:00-12:00, 12:00-24:00 UTC",
            "any 20:00-10:00, 09:00-21:00 Europe/Berlin",
            "mon-sun 06:00-05:00, 04:00-07:00 America/New_York",
        ] {
            let cases: Vec<_> = year.iter().map(|at| (*at, None)).collect();
            check_window_end(condition, &cases);
        }
    }

    // Berlin sets its clocks forward from 02:00 to 03:00 (+01:00 to +02:00) on 2026-03-29, and
    // back from 03:00 to 02:00 on 2026-10-25; New York forward on 2026-03-08 and back on
    // 2026-11-01, both at 02:00 local.

    #[test]
    fn window_end_in_a_skipped_hour_is_when_the_clock_jumps() {
        let before_the_jump = "2026-03-29T01:30:00+01:00";
        let jump = Some("2026-03-29T03:00:00+02:00");
        check_window_end("any 00:00-02:30 Europe/Berlin", &[(before_the_jump, jump)]);
        check_window_end("any 00:00-02:00 Europe/Berlin", &[(before_the_jump, jump)]);
        check_window_end("any 00:00-03:00 Europe/Berlin", &[(before_the_jump, jump)]);
        check_window_end(
            "any 00:00-04:00 Europe/Berlin",
            &[(before_the_jump, Some("2026-03-29T04:00:00+02:00"))],
        );
        check_window_end(
            "sat 22:00-02:30 Europe/Berlin",
            &[("2026-03-28T23:00:00+01:00", Some("2026-03-29T01:00:00Z"))],
        );
        check_window_end(
            "sun 00:00-02:30 America/New_York",
            &[("2026-03-08T01:00:00-05:00", Some("2026-03-08T07:00:00Z"))],
        );
    }

    #[test]
    fn window_end_in_a_repeated_hour_is_read_on_the_clock_of_that_pass() {
        check_window_end(
            "any 01:00-02:30 Europe/Berlin",
            &[
                (
                    "2026-10-25T01:30:00+02:00",
                    Some("2026-10-25T02:30:00+02:00"),
                ),
                (
                    "2026-10-25T02:10:00+01:00",
                    Some("2026-10-25T02:30:00+01:00"),
                ),
            ],
        );
        // Set back from 03:00 to 02:00, the clock leaves `02:30-03:00` before its end.
        check_window_end(
            "any 02:30-03:00 Europe/Berlin",
            &[("2026-10-25T02:45:00+02:00", Some("2026-10-25T01:00:00Z"))],
        );
        check_window_end(
            "any 00:00-03:00 Europe/Berlin",
            &[(
                "2026-10-25T02:45:00+02:00",
                Some("2026-10-25T03:00:00+01:00"),
            )],
        );
        check_window_end(
            "sun 00:00-01:30 America/New_York",
            &[
                (
                    "2026-11-01T01:15:00-04:00",
                    Some("2026-11-01T01:30:00-04:00"),
                ),
                (
                    "2026-11-01T01:15:00-05:00",
                    Some("2026-11-01T01:30:00-05:00"),
                ),
            ],
        );
    }

    #[test]
    fn window_end_outside_every_window_is_now() {
        let saturday = "2026-11-28T10:00:00+01:00";
        let evening = "2026-11-26T18:00:00+01:00";
        let closed = |at| (at, Some(at));
        check_window_end(
            "mon-fri 08:00-18:00 Europe/Berlin",
            &[closed(saturday), closed(evening)],
        );
        // Where the skipped hour would be, the clock reads 03:00.
        check_window_end(
            "any 02:00-02:30 Europe/Berlin",
            &[closed("2026-03-29T01:00:00Z")],
        );
        let at = instant(evening);
        let never = time_condition(&[], &[("00:00", "24:00")], "UTC");
        assert_eq!(never.window_end(at), Some(at));
        let never = time_condition(&DAYS, &[], "UTC");
        assert_eq!(never.window_end(at), Some(at));
    }

    #[test]
    fn time_windows_are_local_end_exclusive_and_cross_midnight() {
        let office = time(
            &Day::Mon.through(Day::Fri),
            &[("08:00", "18:00")],
            "Europe/Berlin",
        );
        let night = time(&[Day::Fri], &[("22:00", "06:00")], "Europe/Berlin");
        let cases = [
            (&office, "2026-11-26T10:00:00+01:00", true), // Thursday
            (&office, "2026-11-28T10:00:00+01:00", false), // Saturday
            (&office, "2026-11-26T07:59:00+01:00", false),
            (&office, "2026-11-26T18:00:00+01:00", false),
            (&office, "2026-11-26T17:59:00+01:00", true),
            (&office, "2026-11-26T09:30:00Z", true), // 10:30 in Berlin
            (&office, "2026-07-02T06:30:00Z", true), // 08:30 in Berlin, summer time
            (&office, "2026-07-02T16:30:00Z", false), // 18:30 in Berlin
            (&night, "2026-11-27T23:00:00+01:00", true), // Friday night
            (&night, "2026-11-28T05:59:00+01:00", true), // Saturday early, window began Friday
            (&night, "2026-11-28T06:00:00+01:00", false),
            (&night, "2026-11-28T23:00:00+01:00", false), // Saturday night
        ];
        for (condition, instant, expected) in cases {
            assert_eq!(condition.holds(&at(instant), false), expected, "{instant}");
        }
    }

    #[test]
    fn missing_facts_fail_closed_on_both_sides() {
        let conditions = [
            time(&[Day::Mon], &[("00:00", "24:00")], "UTC"),
            Condition::Country {
                negated: false,
                codes: vec!["DE".into()],
            },
            Condition::Country {
                negated: true,
                codes: vec!["DE".into()],
            },
            Condition::Source {
                negated: true,
                networks: vec!["10.0.0.0/8".parse().unwrap()],
            },
            Condition::Provider {
                provider: "okta".into(),
            },
        ];
        for condition in conditions {
            assert!(
                !condition.holds(&Context::default(), false),
                "{condition:?} in an allow"
            );
            assert!(
                condition.holds(&Context::default(), true),
                "{condition:?} in a deny"
            );
        }
    }

    #[test]
    fn clocks_and_days_parse() {
        assert_eq!(parse_clock("08:30"), Some(510));
        assert_eq!(parse_clock("24:00"), Some(1440));
        for bad in ["24:01", "25:00", "08:60", "8", "aa:bb"] {
            assert_eq!(parse_clock(bad), None, "{bad}");
        }
        assert_eq!(
            Day::Fri.through(Day::Mon),
            [Day::Fri, Day::Sat, Day::Sun, Day::Mon]
        );
        assert_eq!(Day::parse("sun"), Some(Day::Sun));
        assert_eq!(Day::parse("sunday"), None);
        assert_eq!(day_list(&Day::Mon.through(Day::Fri)), "mon-fri");
        assert_eq!(
            day_list(&[Day::Mon, Day::Tue, Day::Thu, Day::Sat, Day::Sun]),
            "mon,tue,thu,sat,sun"
        );
        assert_eq!(day_list(&DAYS), "any");
    }
}
