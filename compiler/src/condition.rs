//! Rule conditions and the request context they are decided against.
//!
//! INVARIANT: a condition on a fact the context lacks fails closed on both sides: it is false
//! in an allow rule and true in a deny rule, so an allow never rests on a missing fact and a
//! guardrail never lapses for one. Callers pass which side they are on as `when_missing`.

use std::net::IpAddr;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
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

impl TimeCondition {
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

    fn at(text: &str) -> Context {
        Context {
            at: Some(DateTime::parse_from_rfc3339(text).unwrap().to_utc()),
            ..Context::default()
        }
    }

    fn time(days: &[Day], windows: &[(&str, &str)], zone: &str) -> Condition {
        Condition::Time(TimeCondition {
            days: days.to_vec(),
            windows: windows
                .iter()
                .map(|(s, e)| ClockWindow {
                    start: parse_clock(s).unwrap(),
                    end: parse_clock(e).unwrap(),
                })
                .collect(),
            zone: zone.parse().unwrap(),
        })
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
