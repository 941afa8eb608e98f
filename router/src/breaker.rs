//! The per-edge circuit breaker: after a few consecutive failures an edge is
//! not dialed for a cooldown that grows while it stays broken, so a dead edge
//! costs its own events a fast failure instead of everyone a timeout.

use std::time::{Duration, Instant};

/// Consecutive failures that open the circuit.
pub const FAILURE_THRESHOLD: u32 = 3;
/// First cooldown once open.
pub const BASE_COOLDOWN: Duration = Duration::from_secs(2);
/// Longest cooldown.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// Where the breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Normal operation; `failures` consecutive failures so far.
    Closed { failures: u32 },
    /// Failing fast until `until`.
    Open { until: Instant },
    /// The cooldown passed: one trial is allowed; its outcome decides.
    HalfOpen,
}

/// A circuit breaker driven by explicit timestamps (so it is testable without a clock).
#[derive(Clone, Debug)]
pub struct Breaker {
    state: State,
    cooldown: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self { state: State::Closed { failures: 0 }, cooldown: BASE_COOLDOWN }
    }
}

impl Breaker {
    /// The state at `now` (an expired open period reads as half-open).
    pub fn state(&mut self, now: Instant) -> State {
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen;
        }
        self.state
    }

    /// When open at `now`, the instant it stops failing fast.
    pub fn open_until(&mut self, now: Instant) -> Option<Instant> {
        match self.state(now) {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Consecutive failures while closed (0 when open or half-open).
    pub fn failures(&self) -> u32 {
        match self.state {
            State::Closed { failures } => failures,
            _ => 0,
        }
    }

    /// A delivery succeeded: close and reset the cooldown.
    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
        self.cooldown = BASE_COOLDOWN;
    }

    /// A connection, stream or ack failed at `now`. Returns true if this
    /// failure opened the circuit.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed { failures } if failures + 1 < FAILURE_THRESHOLD => {
                self.state = State::Closed { failures: failures + 1 };
                false
            }
            State::Closed { .. } | State::HalfOpen => {
                self.state = State::Open { until: now + self.cooldown };
                self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
                true
            }
            // Late failures of work started before the circuit opened.
            State::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_recovers_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert_eq!(b.open_until(t0), None, "two failures keep it closed");
        assert!(b.on_failure(t0), "the third opens it");
        assert_eq!(b.open_until(t0), Some(t0 + BASE_COOLDOWN));
        assert_eq!(b.open_until(t0 + BASE_COOLDOWN), None);
        assert_eq!(b.state(t0 + BASE_COOLDOWN), State::HalfOpen);
        b.on_success();
        assert_eq!(b.state(t0), State::Closed { failures: 0 });
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success();
        assert!(!b.on_failure(t0));
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn a_failed_trial_reopens_with_a_growing_capped_cooldown() {
        let mut now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD {
            b.on_failure(now);
        }
        let mut expected = BASE_COOLDOWN;
        for _ in 0..10 {
            let until = b.open_until(now).expect("open");
            assert_eq!(until - now, expected);
            // A failure reported while open changes nothing.
            assert!(!b.on_failure(now));
            now = until;
            assert_eq!(b.state(now), State::HalfOpen);
            assert!(b.on_failure(now), "a failed trial reopens at once");
            expected = (expected * 2).min(MAX_COOLDOWN);
        }
        assert_eq!(b.open_until(now).map(|u| u - now), Some(MAX_COOLDOWN));
        b.on_success();
        for _ in 0..FAILURE_THRESHOLD {
            b.on_failure(now);
        }
        assert_eq!(b.open_until(now).map(|u| u - now), Some(BASE_COOLDOWN), "success resets the cooldown");
    }
}
