//! The time part of invariant proofs (`fz_compiler::timeline`).
//! - Zones that change their clocks on other days, or in other seasons: an invariant that
//!   holds only while their clocks are in step fails, and its counterexample is a request that
//!   the table really allows.
//! - On random sets of time conditions in zones with half-hour and 45-minute offsets, a
//!   half-hour summer time and summers in both hemispheres, the combinations of truth values
//!   the search finds in 2026 and 2027 are exactly those a scan of every minute of them finds
//!   (none missed, none made up), each at the first instant it holds; the search over all of
//!   time finds at least those, at the same instants. The same holds in random spans of up to
//!   six weeks, mostly in the months when clocks change, where a span holds few periods of
//!   constant offsets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::collections::BTreeMap;
use std::ops::Range;

use chrono::{DateTime, TimeDelta, Utc};
use common::repo;
use fz_compiler::condition::{ClockWindow, Context, DAYS, TimeCondition};
use fz_compiler::table::{Effect, PortRange};
use fz_compiler::timeline::{self, Representative};
use fz_compiler::{DecisionTable, Request};
use fz_lang::{Code, SourceFile, Sources};
use proptest::prelude::*;

// ------------------------------------------------------------------ counterexamples

/// The fixture `name` fails its one invariant, and the request of the counterexample (a user
/// the tree does not name, in the groups it lists, at the instant it names) is allowed by the
/// table of the same tree without the invariant. Returns that instant.
fn counterexample_is_allowed(name: &str) -> DateTime<Utc> {
    let path = repo().join(format!("tests/fixtures/diagnostics/{name}.fz"));
    let text = std::fs::read_to_string(path).expect("fixture");
    let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("a.fz", text.as_str())]));
    let failed: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.code == Code::InvariantFailed)
        .collect();
    let [diagnostic] = failed.as_slice() else {
        panic!("{name}: one failed invariant expected: {failed:#?}");
    };
    let note = |prefix: &str| {
        diagnostic
            .notes
            .iter()
            .find_map(|n| n.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{name}: no note `{prefix}`: {diagnostic:#?}"))
    };
    let groups: Vec<String> = note("counterexample: ")
        .split_once(" in groups ")
        .expect("groups")
        .1
        .split(", ")
        .map(|g| g.trim_matches('`').to_owned())
        .collect();
    let reaches = note("reaches `prod-db` on tcp/5432 at ");
    let at = DateTime::parse_from_rfc3339(reaches.split(',').next().expect("instant"))
        .expect("RFC 3339")
        .to_utc();

    let without_invariant: String = text
        .lines()
        .filter(|l| !l.starts_with("assert "))
        .map(|l| format!("{l}\n"))
        .collect();
    let checked = fz_compiler::check(Sources::new(vec![SourceFile::new(
        "a.fz",
        without_invariant,
    )]));
    let table = DecisionTable::new(checked.table.expect("a table without the invariant"));
    let request = Request {
        user: "someone@example.com".into(),
        groups,
        resource: "prod-db".into(),
        port: Some("tcp/5432".parse::<PortRange>().expect("port")),
        context: Context {
            at: Some(at),
            ..Context::default()
        },
    };
    let decision = table.decide(&request);
    assert_eq!(decision.effect, Effect::Allow, "{name}: {request:?}");
    at
}

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

#[test]
fn zones_that_change_their_clocks_on_other_days_break_an_invariant() {
    // New York sets its clocks forward on 2026-03-08, Berlin on 2026-03-29.
    let at = counterexample_is_allowed("E019-clocks-change-on-other-days");
    assert!(
        utc("2026-03-08T07:00:00Z") <= at && at < utc("2026-03-29T01:00:00Z"),
        "{at}"
    );
}

#[test]
fn zones_that_change_their_clocks_in_other_seasons_break_an_invariant() {
    // Berlin sets its clocks forward on 2026-03-29; Sydney sets them back on 2026-04-05.
    let at = counterexample_is_allowed("E019-clocks-change-in-other-seasons");
    assert!(
        utc("2026-03-29T01:00:00Z") <= at && at < utc("2026-04-04T16:00:00Z"),
        "{at}"
    );
}

// ------------------------------------------------------------------ exact search

const ZONES: [&str; 10] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/St_Johns",    // -03:30, -02:30 in summer
    "America/Santiago",    // southern summer; clocks change at midnight
    "Asia/Kolkata",        // +05:30, no clock changes
    "Asia/Kathmandu",      // +05:45, no clock changes
    "Australia/Adelaide",  // +09:30, +10:30 in the southern summer
    "Australia/Sydney",    // southern summer
    "Australia/Lord_Howe", // +10:30, summer time is half an hour
];

/// Minutes after midnight: on the quarter hour more often than not, so that windows touch and
/// meet the offsets' half and quarter hours; `24:00` included.
fn clock() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => (0..=96u16).prop_map(|quarters| quarters * 15),
        1 => 0..=1440u16,
    ]
}

/// A window as the compiler accepts it: starts before `24:00`, is not empty; it crosses
/// midnight when it ends before it starts.
fn window() -> impl Strategy<Value = ClockWindow> {
    (clock(), clock()).prop_filter_map("a window the compiler accepts", |(start, end)| {
        (start < 1440 && start != end).then_some(ClockWindow { start, end })
    })
}

fn condition() -> impl Strategy<Value = TimeCondition> {
    (
        prop::sample::subsequence(DAYS.to_vec(), 1..=7),
        prop::collection::vec(window(), 1..3),
        prop::sample::select(ZONES.to_vec()),
    )
        .prop_map(|(days, windows, zone)| TimeCondition {
            days,
            windows,
            zone: zone.parse().expect("zone"),
        })
}

/// The combinations of truth values at every minute of `span`, each with the first minute it
/// holds at. Every zone here is a whole number of minutes off UTC in these years and changes
/// its offset on a minute, so `contains` changes only on a minute of UTC: this sees every
/// combination there is, and the first instant of each.
fn every_minute(
    conditions: &[TimeCondition],
    span: Range<DateTime<Utc>>,
) -> BTreeMap<Vec<bool>, DateTime<Utc>> {
    let mut first = BTreeMap::new();
    for m in 0..(span.end - span.start).num_minutes() {
        let at = span.start + TimeDelta::minutes(m);
        let holds = conditions.iter().map(|c| c.contains(at)).collect();
        first.entry(holds).or_insert(at);
    }
    first
}

/// The combinations the search found, each with its instant, checked to be what the conditions
/// say there and to be inside `span`.
fn found(
    conditions: &[TimeCondition],
    span: Range<DateTime<Utc>>,
) -> Result<BTreeMap<Vec<bool>, DateTime<Utc>>, TestCaseError> {
    let representatives: Vec<Representative> = timeline::representatives(conditions, span.clone());
    for r in &representatives {
        prop_assert!(span.contains(&r.at), "{} outside {span:?}", r.at);
        let holds: Vec<bool> = conditions.iter().map(|c| c.contains(r.at)).collect();
        prop_assert_eq!(&holds, &r.holds, "at {}", r.at);
    }
    let combinations: BTreeMap<Vec<bool>, DateTime<Utc>> = representatives
        .iter()
        .map(|r| (r.holds.clone(), r.at))
        .collect();
    prop_assert_eq!(
        combinations.len(),
        representatives.len(),
        "one instant per combination"
    );
    Ok(combinations)
}

/// A span of whole minutes in 2026 or 2027, from an hour to six weeks long, mostly in the
/// months when clocks change (March and April, September to November).
fn span() -> impl Strategy<Value = Range<DateTime<Utc>>> {
    let from = |start: &str, days: i64| {
        let start = utc(start);
        (0..days * 1440).prop_map(move |m| start + TimeDelta::minutes(m))
    };
    (
        prop_oneof![
            from("2026-01-01T00:00:00Z", 2 * 365 - 42),
            from("2026-03-01T00:00:00Z", 46),
            from("2026-09-01T00:00:00Z", 70),
            from("2027-03-01T00:00:00Z", 46),
            from("2027-09-01T00:00:00Z", 70),
        ],
        60..42 * 1440i64,
    )
        .prop_map(|(start, minutes)| start..start + TimeDelta::minutes(minutes))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Over 2026 and 2027 the search finds what a scan of every minute finds, and for each
    /// combination the first instant it holds at (the reference is 2026-01-01T00:00:00Z).
    #[test]
    fn the_search_finds_the_combinations_a_scan_of_every_minute_finds(
        conditions in prop::collection::vec(condition(), 2..=4),
    ) {
        let years = utc("2026-01-01T00:00:00Z")..utc("2028-01-01T00:00:00Z");
        let scanned = every_minute(&conditions, years.clone());
        let searched = found(&conditions, years)?;
        prop_assert_eq!(&searched, &scanned, "{:?}", conditions);
        let all_time = found(&conditions, timeline::ALL_TIME)?;
        for (holds, at) in &scanned {
            prop_assert_eq!(all_time.get(holds), Some(at), "{:?}", conditions);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_search_finds_the_combinations_a_scan_of_every_minute_finds_in_a_few_weeks(
        conditions in prop::collection::vec(condition(), 2..=4),
        span in span(),
    ) {
        let scanned = every_minute(&conditions, span.clone());
        let searched = found(&conditions, span.clone())?;
        prop_assert_eq!(&searched, &scanned, "{:?} in {:?}", conditions, span);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Over all of time, the search finds what searches of each year from 1800 to 2199 and of
    /// the time before and after find together, and for a combination that holds on or after
    /// 2026-01-01 the same first instant. Each year holds few periods of constant offsets, all
    /// of time holds every one: this covers the search's shortcuts that only long spans take,
    /// through the database's whole history (local mean times, war times, double summer times).
    #[test]
    fn the_search_over_all_of_time_finds_what_the_searches_of_each_year_find(
        conditions in prop::collection::vec(condition(), 2..=4),
    ) {
        let year = |y: i32| utc(&format!("{y}-01-01T00:00:00Z"));
        let spans = std::iter::once(timeline::ALL_TIME.start..year(1800))
            .chain((1800..2200).map(|y| year(y)..year(y + 1)))
            .chain(std::iter::once(year(2200)..timeline::ALL_TIME.end));
        let reference = year(2026);
        let mut by_year: BTreeMap<Vec<bool>, DateTime<Utc>> = BTreeMap::new();
        for span in spans {
            for (holds, at) in found(&conditions, span)? {
                let first = by_year.entry(holds).or_insert(at);
                if at >= reference && (*first < reference || at < *first) {
                    *first = at;
                }
            }
        }
        let all_time = found(&conditions, timeline::ALL_TIME)?;
        let combinations = |found: &BTreeMap<Vec<bool>, DateTime<Utc>>| -> Vec<Vec<bool>> {
            found.keys().cloned().collect()
        };
        prop_assert_eq!(combinations(&all_time), combinations(&by_year), "{:?}", conditions);
        for (holds, at) in by_year.iter().filter(|(_, at)| **at >= reference) {
            prop_assert_eq!(all_time.get(holds), Some(at), "{:?}", conditions);
        }
    }
}
