//! Property tests: `TimeCondition::window_end`, which tries only the instants where a window
//! can close, finds what a scan of every minute for 8 days finds.
//! - On random conditions in zones with clock changes (at midnight, by half an hour, at odd
//!   offsets) at random instants of a year, half of them in the days before a clock change.
//! - Around the clock changes themselves, with windows that open and close near them: where
//!   the clock jumps past a window's end, or is set back out of a window or into it again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use fz_compiler::condition::{ClockWindow, Condition, DAYS, TimeCondition};
use proptest::prelude::*;

const ZONES: [&str; 8] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",    // clocks change at midnight: Sunday 00:00 is skipped
    "America/Havana",      // back from 01:00 to 00:00: the first hour after midnight repeats
    "Australia/Lord_Howe", // summer time is half an hour
    "Pacific/Chatham",     // +12:45, +13:45 in summer
    "Asia/Kathmandu",      // +05:45, no clock changes
];

/// The 2026 clock changes of the zones above: zone, instant in UTC.
const CLOCK_CHANGES: [(&str, &str); 12] = [
    ("Europe/Berlin", "2026-03-29T01:00:00Z"),
    ("Europe/Berlin", "2026-10-25T01:00:00Z"),
    ("America/New_York", "2026-03-08T07:00:00Z"),
    ("America/New_York", "2026-11-01T06:00:00Z"),
    ("America/Santiago", "2026-04-05T03:00:00Z"),
    ("America/Santiago", "2026-09-06T04:00:00Z"),
    ("America/Havana", "2026-03-08T05:00:00Z"),
    ("America/Havana", "2026-11-01T05:00:00Z"),
    ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
    ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
    ("Pacific/Chatham", "2026-04-04T14:00:00Z"),
    ("Pacific/Chatham", "2026-09-26T14:00:00Z"),
];

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

/// Minutes after midnight, on the half hour more often than not, so that windows touch.
fn clock() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => (0..=48u16).prop_map(|half_hours| half_hours * 30),
        1 => 0..=1440u16,
    ]
}

/// A window as the compiler accepts it: starts before `24:00`, is not empty.
fn window() -> impl Strategy<Value = ClockWindow> {
    (clock(), clock()).prop_filter_map("a window the compiler accepts", |(start, end)| {
        (start < 1440 && start != end).then_some(ClockWindow { start, end })
    })
}

fn condition() -> impl Strategy<Value = TimeCondition> {
    (
        prop::sample::subsequence(DAYS.to_vec(), 0..=7),
        prop::collection::vec(window(), 1..4),
        prop::sample::select(ZONES.to_vec()),
    )
        .prop_map(|(days, windows, zone)| TimeCondition {
            days,
            windows,
            zone: zone.parse().expect("zone"),
        })
}

/// An instant of 2026 to the second, half of them in the 9 days before a clock change (or the
/// day after it), where the change falls within `window_end`'s 8 days.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    let year = utc("2026-01-01T00:00:00Z");
    prop_oneof![
        (0..365 * 86_400i64).prop_map(move |s| year + TimeDelta::seconds(s)),
        (
            prop::sample::select(CLOCK_CHANGES.to_vec()),
            -9 * 86_400..86_400i64
        )
            .prop_map(|((_, change), s)| utc(change) + TimeDelta::seconds(s)),
    ]
}

/// A condition in a zone and an instant within 3 hours of one of its clock changes, with
/// windows that open and close within 3 hours of the change on the wall clock, in steps of
/// half an hour from it, mostly on every day: where random conditions and instants seldom go.
fn around_a_clock_change() -> impl Strategy<Value = (TimeCondition, DateTime<Utc>)> {
    prop::sample::select(CLOCK_CHANGES.to_vec()).prop_flat_map(|(zone, change)| {
        let zone: chrono_tz::Tz = zone.parse().expect("zone");
        let change = utc(change);
        let local = change.with_timezone(&zone);
        let minute = (local.hour() * 60 + local.minute()) as i64;
        let near = move || {
            (-6..=6i64)
                .prop_map(move |half_hours| (minute + half_hours * 30).rem_euclid(1440) as u16)
        };
        let window = (near(), prop_oneof![near(), Just(1440u16)])
            .prop_filter_map("a window the compiler accepts", |(start, end)| {
                (start != end).then_some(ClockWindow { start, end })
            });
        let days = prop_oneof![
            2 => Just(DAYS.to_vec()),
            1 => prop::sample::subsequence(DAYS.to_vec(), 0..=7),
        ];
        (
            days,
            prop::collection::vec(window, 1..4),
            -3 * 3_600..3 * 3_600i64,
        )
            .prop_map(move |(days, windows, s)| {
                (
                    TimeCondition {
                        days,
                        windows,
                        zone,
                    },
                    change + TimeDelta::seconds(s),
                )
            })
    })
}

/// `window_end` read off its definition: `Some(at)` outside every window, else the first
/// minute after `at` that is outside every window, looking 8 days ahead. Every zone here is a
/// whole number of minutes off UTC, so `contains` changes only on a minute of UTC.
fn scan(time: &TimeCondition, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if !time.contains(at) {
        return Some(at);
    }
    let minute = DateTime::from_timestamp(at.timestamp().div_euclid(60) * 60, 0).unwrap();
    (1..=8 * 24 * 60)
        .map(|m| minute + TimeDelta::minutes(m))
        .find(|t| !time.contains(*t))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn window_end_is_the_first_minute_outside_every_window(time in condition(), at in instant()) {
        check(&time, at)?;
    }

    #[test]
    fn window_end_is_the_first_minute_outside_every_window_across_a_clock_change(
        (time, at) in around_a_clock_change(),
    ) {
        check(&time, at)?;
    }
}

fn check(time: &TimeCondition, at: DateTime<Utc>) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        time.window_end(at),
        scan(time, at),
        "`{}` at {} ({} there)",
        Condition::Time(time.clone()),
        at,
        at.with_timezone(&time.zone)
    );
    Ok(())
}
