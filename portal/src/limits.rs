//! What bounds the cost one client can put on the portal, as plain state with time passed in:
//! [`RateLimiter`], a token bucket per client for connection requests, and [`Repeats`], which
//! tells a denial that repeats one recorded in the last [`REPEAT_WINDOW_SECS`] (so the flow log
//! counts it on that row instead of growing).
//!
//! No IO and no clock: the broker reads the clock and does the talking. Both forget what no
//! longer matters when asked ([`RateLimiter::forget_idle`], [`Repeats::forget_before`]); the
//! sweeper asks every second, so their size follows the clients active in the last moments,
//! and each has a hard ceiling besides.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::store::NewFlow;

/// How fast a client may ask: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// A token bucket per key (a client): each request takes a token; tokens come back at the
/// rate's pace up to its burst. A key it has not seen, or has forgotten, starts full.
#[derive(Debug)]
pub struct RateLimiter<K> {
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When it is full again if nothing more is taken: it can be forgotten then.
    full_at: Instant,
}

impl<K> Default for RateLimiter<K> {
    fn default() -> Self {
        RateLimiter {
            buckets: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// Takes one request of `key` at `now`: `Ok`, or `Err` with how long until one would pass.
    pub fn take(&mut self, key: K, rate: Rate, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(rate.burst.max(1));
        let per_second = f64::from(rate.per_second.max(1));
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
            full_at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.at = now.max(bucket.at);
        if bucket.tokens < 1.0 {
            let wait = (1.0 - bucket.tokens) / per_second;
            return Err(Duration::from_secs_f64(wait));
        }
        bucket.tokens -= 1.0;
        bucket.full_at = bucket.at + Duration::from_secs_f64((burst - bucket.tokens) / per_second);
        Ok(())
    }

    /// Forgets the buckets that are full again at `now`: they would start full anyway.
    pub fn forget_idle(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| bucket.full_at > now);
    }

    /// How many clients it remembers.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// How long after a denial an identical one counts on its row rather than making another. A
/// minute keeps the log readable to the minute (time windows open and close on minutes) while
/// a client denied in a loop adds at most one row a minute per thing it asks for.
pub const REPEAT_WINDOW_SECS: i64 = 60;

/// The most distinct denials remembered at once: beyond it, a new denial makes a row of its
/// own (still bounded by each client's request rate). At about 1.5 KB a denial at the worst
/// (every string at its cap), that is under 100 MB.
const MAX_REMEMBERED: usize = 65_536;

/// Whether a denial repeats one recorded a moment ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// The first of its kind in the window: a new row.
    First,
    /// The same as the one recorded at `first` (Unix seconds): count it on that row.
    Again { first: i64 },
}

/// The denials recorded in the last [`REPEAT_WINDOW_SECS`], by everything the flow log says
/// of them but the time: the same client, user, resource, name, decision, rule, policy and
/// reason.
#[derive(Debug, Default)]
pub struct Repeats {
    first: HashMap<NewFlow, i64>,
}

impl Repeats {
    /// Notes a denial about to be recorded at `flow.time`, and says whether it repeats one.
    pub fn note(&mut self, flow: &NewFlow) -> Occurrence {
        let key = NewFlow {
            time: 0,
            ..flow.clone()
        };
        let now = flow.time;
        match self.first.get(&key) {
            Some(first) if now.saturating_sub(*first) < REPEAT_WINDOW_SECS && *first <= now => {
                Occurrence::Again { first: *first }
            }
            _ => {
                if self.first.len() < MAX_REMEMBERED || self.first.contains_key(&key) {
                    self.first.insert(key, now);
                }
                Occurrence::First
            }
        }
    }

    /// Forgets denials whose window has closed at `now`.
    pub fn forget_before(&mut self, now: i64) {
        self.first
            .retain(|_, first| now.saturating_sub(*first) < REPEAT_WINDOW_SECS && *first <= now);
    }

    pub fn len(&self) -> usize {
        self.first.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Decision;

    const RATE: Rate = Rate {
        per_second: 2,
        burst: 5,
    };

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut limiter = RateLimiter::default();
        for _ in 0..5 {
            assert_eq!(limiter.take("a", RATE, at(0)), Ok(()));
        }
        assert_eq!(
            limiter.take("a", RATE, at(0)),
            Err(Duration::from_millis(500))
        );
        // Another client has its own bucket.
        assert_eq!(limiter.take("b", RATE, at(0)), Ok(()));
        // Refusals take nothing: half a second on, one token is back.
        assert_eq!(
            limiter.take("a", RATE, at(250)),
            Err(Duration::from_millis(250))
        );
        assert_eq!(limiter.take("a", RATE, at(500)), Ok(()));
        assert!(limiter.take("a", RATE, at(500)).is_err());
        // Time that goes backwards (a clock step) gives nothing back and takes nothing.
        assert!(limiter.take("a", RATE, at(100)).is_err());
        // After a long rest, a full burst again, never more.
        for _ in 0..5 {
            assert_eq!(limiter.take("a", RATE, at(60_000)), Ok(()));
        }
        assert!(limiter.take("a", RATE, at(60_000)).is_err());
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let start = Instant::now();
        let mut limiter = RateLimiter::default();
        limiter.take("a", RATE, start).unwrap();
        limiter.take("b", RATE, start).unwrap();
        limiter.take("b", RATE, start).unwrap();
        limiter.forget_idle(start + Duration::from_millis(500));
        assert_eq!(
            limiter.len(),
            1,
            "a is full again after half a second, b is not"
        );
        limiter.forget_idle(start + Duration::from_secs(1));
        assert!(limiter.is_empty());
    }

    fn denial(time: i64, reason: &str) -> NewFlow {
        NewFlow {
            account: "acme".into(),
            time,
            user: "alice@acme.example".into(),
            client_id: "cli_1".into(),
            resource_id: "db".into(),
            name: None,
            decision: Decision::Deny,
            rule_id: None,
            bundle_hash: "h".into(),
            reason: reason.into(),
            grant_id: None,
        }
    }

    #[test]
    fn identical_denials_within_the_window_repeat_the_first() {
        let mut repeats = Repeats::default();
        assert_eq!(repeats.note(&denial(100, "no")), Occurrence::First);
        assert_eq!(
            repeats.note(&denial(100, "no")),
            Occurrence::Again { first: 100 }
        );
        assert_eq!(
            repeats.note(&denial(159, "no")),
            Occurrence::Again { first: 100 }
        );
        assert_eq!(repeats.note(&denial(130, "other")), Occurrence::First);
        let mut elsewhere = denial(130, "no");
        elsewhere.client_id = "cli_2".into();
        assert_eq!(repeats.note(&elsewhere), Occurrence::First);
        // The window closes a minute after the first: the next one starts a row of its own.
        assert_eq!(repeats.note(&denial(160, "no")), Occurrence::First);
        assert_eq!(
            repeats.note(&denial(170, "no")),
            Occurrence::Again { first: 160 }
        );
        // A clock that stepped back never counts on a row from its future.
        assert_eq!(repeats.note(&denial(150, "no")), Occurrence::First);
        repeats.forget_before(195);
        assert_eq!(repeats.len(), 1, "only the row of 150 is still open at 195");
        repeats.forget_before(300);
        assert!(repeats.is_empty());
    }
}
