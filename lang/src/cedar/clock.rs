//! Time windows in Cedar. Cedar has no time zones, so the context gives the wall clock of each
//! zone a tree names: `context.time["Europe/Berlin"]` is `{ day: "mon".."sun", minute:
//! 0..1439 }`, the local weekday and minute of the day that fz's own `time` condition reads.
//! Tests of it compile into an fz `time` condition:
//!
//! - a clause: `&&` of day tests (`["mon", "fri"].contains(T.day)`, `T.day == "mon"`, their
//!   negations) and minute bounds (`T.minute >= 480`, `T.minute < 1080`, `<=`, `>`, either
//!   operand order, negations): one window on those days;
//! - `||` of clauses of one zone on the same days: several windows. A window that crosses
//!   midnight is two clauses in a row: `(D && T.minute >= S)` then `(NEXT && T.minute < E)`,
//!   where the second clause names its days (the days after D) and has no lower bound.
//!
//! Everything here is a pure function of Cedar's syntax tree; the caller reports refusals.

use cedar_policy::pst::{BinaryOp, Expr, Literal, UnaryOp, Var};

/// Day names as the context gives them, Monday first: bit `i` of a day mask is `DAYS[i]`.
pub(super) const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const EVERY_DAY: u8 = 0x7f;
/// Minutes in a day: a window may end at `24:00`.
const DAY_MINUTES: u16 = 1440;

/// Why a test of the clock cannot become an fz `time` condition.
#[derive(Debug)]
pub(super) struct Refusal {
    pub message: String,
    pub label: &'static str,
    pub help: &'static str,
}

const CLOCK_HELP: &str = "a time window reads `context.time[\"ZONE\"]`: \
    `[\"mon\", \"tue\"].contains(context.time[\"Europe/Berlin\"].day) && \
    context.time[\"Europe/Berlin\"].minute >= 480 && context.time[\"Europe/Berlin\"].minute < 1080`";

fn refusal(message: impl Into<String>, label: &'static str) -> Refusal {
    Refusal {
        message: message.into(),
        label,
        help: CLOCK_HELP,
    }
}

/// One test of a zone's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ClockTest {
    pub zone: String,
    pub bound: Bound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bound {
    /// The day is one of these (a mask of [`DAYS`]).
    Days(u8),
    /// The minute is at least this.
    From(u16),
    /// The minute is below this.
    Until(u16),
}

impl Bound {
    pub(super) fn negate(self) -> Bound {
        match self {
            Bound::Days(mask) => Bound::Days(!mask & EVERY_DAY),
            Bound::From(minute) => Bound::Until(minute),
            Bound::Until(minute) => Bound::From(minute),
        }
    }
}

/// `context.time["ZONE"].FIELD`: the zone and the field.
fn clock_field(expr: &Expr) -> Option<(&str, &str)> {
    let Expr::GetAttr { expr: zone, attr } = expr else {
        return None;
    };
    let Expr::GetAttr {
        expr: time,
        attr: zone_name,
    } = &**zone
    else {
        return None;
    };
    match &**time {
        Expr::GetAttr { expr, attr: key }
            if key == "time" && matches!(**expr, Expr::Var(Var::Context)) =>
        {
            Some((zone_name.as_str(), attr.as_str()))
        }
        _ => None,
    }
}

/// A test of a zone's clock, before negation; `None` when the expression reads no clock.
pub(super) fn clock_test(expr: &Expr) -> Option<Result<ClockTest, Refusal>> {
    let Expr::BinaryOp { op, left, right } = expr else {
        return None;
    };
    let test = |zone: &str, bound| {
        Ok(ClockTest {
            zone: zone.to_owned(),
            bound,
        })
    };
    match (op, clock_field(left), clock_field(right)) {
        (BinaryOp::Contains, None, Some((zone, "day"))) => {
            let Expr::Set(elements) = &**left else {
                return Some(Err(refusal(
                    "the days must be a list of day names",
                    "not a list",
                )));
            };
            let mut mask = 0;
            for element in elements {
                match day_bit(element) {
                    Ok(bit) => mask |= bit,
                    Err(refused) => return Some(Err(refused)),
                }
            }
            Some(test(zone, Bound::Days(mask)))
        }
        (BinaryOp::Eq | BinaryOp::NotEq, Some((zone, "day")), None)
        | (BinaryOp::Eq | BinaryOp::NotEq, None, Some((zone, "day"))) => {
            let value = if clock_field(left).is_some() {
                right
            } else {
                left
            };
            let bound = match day_bit(value) {
                Ok(bit) => Bound::Days(bit),
                Err(refused) => return Some(Err(refused)),
            };
            let bound = if *op == BinaryOp::NotEq {
                bound.negate()
            } else {
                bound
            };
            Some(test(zone, bound))
        }
        (
            BinaryOp::Less | BinaryOp::LessEq | BinaryOp::Greater | BinaryOp::GreaterEq,
            Some((zone, "minute")),
            None,
        ) => Some(minute_bound(*op, right).and_then(|b| test(zone, b))),
        (
            BinaryOp::Less | BinaryOp::LessEq | BinaryOp::Greater | BinaryOp::GreaterEq,
            None,
            Some((zone, "minute")),
        ) => {
            // `n < T.minute` is `T.minute > n`.
            let mirrored = match op {
                BinaryOp::Less => BinaryOp::Greater,
                BinaryOp::LessEq => BinaryOp::GreaterEq,
                BinaryOp::Greater => BinaryOp::Less,
                _ => BinaryOp::LessEq,
            };
            Some(minute_bound(mirrored, left).and_then(|b| test(zone, b)))
        }
        (_, Some((_, field)), _) | (_, _, Some((_, field))) => Some(Err(refusal(
            format!("`{field}` of a zone's clock cannot be tested like this"),
            "not a time window fz can hold",
        ))),
        _ => None,
    }
}

/// A test of a zone's clock under any number of `!`.
pub(super) fn clock_atom(expr: &Expr) -> Option<Result<ClockTest, Refusal>> {
    match expr {
        Expr::UnaryOp {
            op: UnaryOp::Not,
            expr: inner,
        } => clock_atom(inner).map(|test| {
            test.map(|t| ClockTest {
                bound: t.bound.negate(),
                ..t
            })
        }),
        _ => clock_test(expr),
    }
}

fn day_bit(expr: &Expr) -> Result<u8, Refusal> {
    let name = match expr {
        Expr::Literal(Literal::String(name)) => name.as_str(),
        _ => return Err(refusal("a day must be a day name", "not a string")),
    };
    DAYS.iter()
        .position(|d| *d == name)
        .map(|i| 1 << i)
        .ok_or_else(|| {
            refusal(
                format!("`{name}` is not a day: the clock's day is one of mon, tue, wed, thu, fri, sat, sun"),
                "never equal to the day",
            )
        })
}

/// `T.minute OP n` as a bound, `n` clamped to a day.
fn minute_bound(op: BinaryOp, value: &Expr) -> Result<Bound, Refusal> {
    let n = match value {
        Expr::Literal(Literal::Long(n)) => *n,
        // `-5` parses as the negation of 5.
        Expr::UnaryOp {
            op: UnaryOp::Neg,
            expr,
        } => match &**expr {
            Expr::Literal(Literal::Long(n)) => n.saturating_neg(),
            _ => return Err(refusal("a minute must be a number", "not a number")),
        },
        _ => return Err(refusal("a minute must be a number", "not a number")),
    };
    let clamp = |n: i64| n.clamp(0, i64::from(DAY_MINUTES)) as u16;
    Ok(match op {
        BinaryOp::GreaterEq => Bound::From(clamp(n)),
        BinaryOp::Greater => Bound::From(clamp(n.saturating_add(1))),
        BinaryOp::Less => Bound::Until(clamp(n)),
        _ => Bound::Until(clamp(n.saturating_add(1))),
    })
}

/// Tests joined by `&&`: one window on some days.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ClockClause {
    pub zone: String,
    /// `None`: no day test.
    pub days: Option<u8>,
    pub from: Option<u16>,
    pub until: Option<u16>,
}

impl ClockClause {
    pub(super) fn new(test: ClockTest) -> ClockClause {
        let mut clause = ClockClause {
            zone: test.zone.clone(),
            ..ClockClause::default()
        };
        clause.add(test.bound);
        clause
    }

    /// Adds a test of the same zone: the clause then holds where both do.
    pub(super) fn add(&mut self, bound: Bound) {
        match bound {
            Bound::Days(mask) => self.days = Some(self.days.unwrap_or(EVERY_DAY) & mask),
            Bound::From(m) => self.from = Some(self.from.map_or(m, |f| f.max(m))),
            Bound::Until(m) => self.until = Some(self.until.map_or(m, |u| u.min(m))),
        }
    }
}

/// An fz `time` condition: the days windows start on (a mask), the windows as minutes of the
/// day (end exclusive; an end before the start crosses midnight), and the zone.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Window {
    pub zone: String,
    pub days: u8,
    pub windows: Vec<(u16, u16)>,
}

/// Clauses joined by `||` (or one clause) as one fz `time` condition.
pub(super) fn time_condition(clauses: &[ClockClause]) -> Result<Window, Refusal> {
    let Some(first) = clauses.first() else {
        return Err(refusal("an empty time condition", "never holds"));
    };
    if clauses.iter().any(|c| c.zone != first.zone) {
        return Err(refusal(
            "one time condition reads the clock of one zone",
            "`||` between clocks of different zones",
        ));
    }
    // The days windows start on: those of the first clause with a lower bound (a clause
    // without one may be the second half of a window that crosses midnight).
    let days = clauses
        .iter()
        .find(|c| c.from.is_some())
        .unwrap_or(first)
        .days
        .unwrap_or(EVERY_DAY);
    if days == 0 {
        return Err(refusal(
            "no day is left, so the policy never applies",
            "never holds",
        ));
    }
    let mut windows = Vec::new();
    let mut pending = clauses.iter().peekable();
    while let Some(clause) = pending.next() {
        let start = clause.from.unwrap_or(0);
        let end = clause.until.unwrap_or(DAY_MINUTES);
        let crossing_tail = pending.peek().filter(|next| {
            clause.from.is_some()
                && clause.until.is_none()
                && next.from.is_none()
                && next.days == Some(following(days))
        });
        if let Some(tail) = crossing_tail {
            let end = tail.until.unwrap_or(DAY_MINUTES);
            // An end of `00:00` is a window to midnight: its second half is empty.
            if end >= start {
                return Err(refusal(
                    "these two clauses are not one window across midnight",
                    "not a time window fz can hold",
                ));
            }
            windows.push((start, end));
            pending.next();
            continue;
        }
        if clause.days.unwrap_or(EVERY_DAY) != days {
            return Err(refusal(
                "the windows of one time condition must start on the same days",
                "windows on different days",
            ));
        }
        if start >= end {
            return Err(refusal(
                "this window is empty, so it never holds",
                "never holds",
            ));
        }
        windows.push((start, end));
    }
    Ok(Window {
        zone: first.zone.clone(),
        days,
        windows,
    })
}

/// The days after each of `days`.
pub(super) fn following(days: u8) -> u8 {
    ((days << 1) | (days >> 6)) & EVERY_DAY
}

/// `HH:MM`, `24:00` for the end of the day.
pub(super) fn clock_text(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}
