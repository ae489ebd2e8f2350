//! The one retry policy of the node: every loop that tries something again after a failure
//! (a write while no leader is known, a model request, joining a cluster, registering this
//! node, a CLI watch reconnecting) waits the delays of a [`RetryPolicy`], so the schedule is
//! written once and bounded by a name. It lives in the lowest crate that retries (the replica's
//! writes), and the crates above use it from here.
//!
//! The delays come from `backon`'s exponential backoff without jitter: the first delay, then
//! doubling up to a cap. What counts as retryable, and any deadline, stays with each caller,
//! since those differ (a wrong secret must fail at once; a 429 names its own delay).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How long to wait between attempts, and how many retries at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait after the first failure.
    pub first_delay_ms: u64,
    /// Each later wait doubles, up to this.
    pub max_delay_ms: u64,
    /// Retries after the first attempt; `None` retries until the caller stops (a deadline, or a
    /// task that lives as long as the node).
    pub max_retries: Option<usize>,
}

impl RetryPolicy {
    /// The same schedule with at most `max_retries` retries.
    pub const fn with_max_retries(self, max_retries: usize) -> RetryPolicy {
        RetryPolicy {
            max_retries: Some(max_retries),
            ..self
        }
    }

    /// The waits, in order: `None` once the retries are used up.
    pub fn delays(&self) -> Delays {
        let builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.first_delay_ms))
            .with_max_delay(Duration::from_millis(self.max_delay_ms))
            .with_factor(2.0);
        let builder = match self.max_retries {
            Some(max_retries) => builder.with_max_times(max_retries),
            None => builder.without_max_times(),
        };
        Delays {
            backoff: builder.build(),
        }
    }
}

/// The waits of one run of retries; start a new run (after progress, say) with
/// [`RetryPolicy::delays`].
#[derive(Debug)]
pub struct Delays {
    backoff: ExponentialBackoff,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.backoff.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays_ms(policy: RetryPolicy, count: usize) -> Vec<u64> {
        policy
            .delays()
            .take(count)
            .map(|delay| delay.as_millis() as u64)
            .collect()
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy = RetryPolicy {
            first_delay_ms: 200,
            max_delay_ms: 5_000,
            max_retries: None,
        };
        assert_eq!(delays_ms(policy, 8), [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn retries_end_after_the_maximum() {
        let policy = RetryPolicy {
            first_delay_ms: 100,
            max_delay_ms: 2_000,
            max_retries: Some(3),
        };
        assert_eq!(delays_ms(policy, 10), [100, 200, 400]);
        assert!(policy.with_max_retries(0).delays().next().is_none());
    }
}
