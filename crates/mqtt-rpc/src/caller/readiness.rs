//! When the caller may take calls: connected, subscribed to its response topic, and a message
//! it published there itself has come back. The last step matters because a broker may grant a
//! subscription and deliver nothing on it (Mosquitto does when its ACL refuses the read), and
//! then every call would wait for its timeout while devices act on the requests.
//!
//! A pure state machine: the connection task feeds it broker events, a once-a-second tick
//! feeds it time, and it answers with what to send next. It does no I/O and is unit-tested
//! without a broker.

use std::time::{Duration, Instant};

/// How long a SUBACK may take before the subscription is sent again: a broker answers in
/// milliseconds, so this only ever waits for a lost one.
pub(crate) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the probe may take to come back before the caller says why it is not ready and
/// probes again. A round trip through a broker takes milliseconds.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait between two attempts after refusals or timeouts.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(30);

use crate::protocol::PROBE_PREFIX;

/// What the connection should send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    /// Subscribe to the response topic.
    Subscribe,
    /// Publish a probe with this nonce to the response topic.
    Probe(u64),
}

/// Something worth a log line, returned so the caller logs it with its own context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// No SUBACK within [`SUBSCRIBE_TIMEOUT`].
    SubscribeTimedOut,
    /// The broker refused the subscription; retried after this long.
    SubscribeRefused(Duration),
    /// The probe did not come back within [`PROBE_TIMEOUT`] (`attempt` counts from 1).
    ProbeLost { attempt: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    /// Subscribe sent at `since`.
    Subscribing {
        since: Instant,
    },
    /// Refused; subscribe again at `retry_at`.
    Refused {
        retry_at: Instant,
    },
    /// Probe `nonce` sent at `since`; `attempt` counts probes on this connection.
    Probing {
        nonce: u64,
        since: Instant,
        attempt: u32,
    },
    /// The probe came back: calls may be sent.
    Ready,
}

/// The readiness of one connection, rebuilt on every reconnect.
#[derive(Debug)]
pub(crate) struct Readiness {
    phase: Phase,
    /// Failed attempts in a row (refusals, timeouts), for the backoff between them.
    failures: u32,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            phase: Phase::Disconnected,
            failures: 0,
        }
    }
}

impl Readiness {
    #[cfg(test)]
    pub(crate) fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// CONNACK: with the session present, the subscription survived and only the probe is
    /// needed.
    pub(crate) fn connected(&mut self, now: Instant, session_present: bool) -> Action {
        self.failures = 0;
        if session_present {
            self.probe(now, 1)
        } else {
            self.phase = Phase::Subscribing { since: now };
            Action::Subscribe
        }
    }

    pub(crate) fn disconnected(&mut self) {
        self.phase = Phase::Disconnected;
    }

    /// SUBACK for the response topic.
    pub(crate) fn subscribed(&mut self, now: Instant, granted: bool) -> (Action, Option<Problem>) {
        if !matches!(self.phase, Phase::Subscribing { .. }) {
            return (Action::Nothing, None);
        }
        if granted {
            self.failures = 0;
            return (self.probe(now, 1), None);
        }
        let wait = self.next_wait();
        self.phase = Phase::Refused {
            retry_at: now + wait,
        };
        (Action::Nothing, Some(Problem::SubscribeRefused(wait)))
    }

    /// A probe came back; true when that made the connection ready.
    pub(crate) fn probe_returned(&mut self, nonce: u64) -> bool {
        match self.phase {
            Phase::Probing { nonce: sent, .. } if sent == nonce => {
                self.phase = Phase::Ready;
                self.failures = 0;
                true
            }
            _ => false,
        }
    }

    /// Time passes: retries what timed out or waited out its refusal.
    pub(crate) fn tick(&mut self, now: Instant) -> (Action, Option<Problem>) {
        match self.phase {
            Phase::Subscribing { since } if now >= since + self.timeout(SUBSCRIBE_TIMEOUT) => {
                self.failures += 1;
                self.phase = Phase::Subscribing { since: now };
                (Action::Subscribe, Some(Problem::SubscribeTimedOut))
            }
            Phase::Refused { retry_at } if now >= retry_at => {
                self.phase = Phase::Subscribing { since: now };
                (Action::Subscribe, None)
            }
            Phase::Probing { since, attempt, .. } if now >= since + self.timeout(PROBE_TIMEOUT) => {
                self.failures += 1;
                (
                    self.probe(now, attempt + 1),
                    Some(Problem::ProbeLost { attempt }),
                )
            }
            _ => (Action::Nothing, None),
        }
    }

    fn probe(&mut self, now: Instant, attempt: u32) -> Action {
        let nonce = rand::random();
        self.phase = Phase::Probing {
            nonce,
            since: now,
            attempt,
        };
        Action::Probe(nonce)
    }

    /// The wait before the next attempt: `base` for the first, doubling with each failure in a
    /// row, at most [`MAX_RETRY`].
    fn timeout(&self, base: Duration) -> Duration {
        (base * 2u32.saturating_pow(self.failures.min(8))).min(MAX_RETRY.max(base))
    }

    fn next_wait(&mut self) -> Duration {
        self.failures += 1;
        (Duration::from_secs(1) * 2u32.saturating_pow(self.failures.min(8) - 1)).min(MAX_RETRY)
    }
}

/// The correlation data of a probe with this nonce.
pub(crate) fn probe_correlation(nonce: u64) -> Vec<u8> {
    let mut data = PROBE_PREFIX.to_vec();
    data.extend_from_slice(&nonce.to_be_bytes());
    data
}

/// The nonce, if this correlation data is a probe's.
pub(crate) fn probe_nonce(correlation: &[u8]) -> Option<u64> {
    let nonce = correlation.strip_prefix(PROBE_PREFIX)?;
    Some(u64::from_be_bytes(nonce.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_the_probe_comes_back() {
        let t0 = Instant::now();
        let mut r = Readiness::default();
        assert_eq!(r.connected(t0, false), Action::Subscribe);
        assert!(!r.is_ready());
        let (Action::Probe(nonce), None) = r.subscribed(t0, true) else {
            panic!("a granted subscription is probed")
        };
        assert!(!r.is_ready(), "subscribed is not enough");
        assert!(!r.probe_returned(nonce ^ 1), "someone else's probe");
        assert!(r.probe_returned(nonce));
        assert!(r.is_ready());
        r.disconnected();
        assert!(!r.is_ready());
        // A resumed session needs only the probe.
        assert!(matches!(r.connected(t0, true), Action::Probe(_)));
    }

    #[test]
    fn a_lost_probe_is_reported_and_retried_later_each_time() {
        let t0 = Instant::now();
        let mut r = Readiness::default();
        r.connected(t0, false);
        r.subscribed(t0, true);
        assert_eq!(r.tick(t0 + PROBE_TIMEOUT / 2), (Action::Nothing, None));
        let (Action::Probe(second), Some(Problem::ProbeLost { attempt: 1 })) =
            r.tick(t0 + PROBE_TIMEOUT)
        else {
            panic!("the probe is sent again")
        };
        let t1 = t0 + PROBE_TIMEOUT;
        assert_eq!(
            r.tick(t1 + PROBE_TIMEOUT).0,
            Action::Nothing,
            "the second wait is longer"
        );
        assert!(matches!(
            r.tick(t1 + 2 * PROBE_TIMEOUT),
            (Action::Probe(_), Some(Problem::ProbeLost { attempt: 2 }))
        ));
        assert!(
            !r.probe_returned(second),
            "a superseded probe does not count"
        );
    }

    #[test]
    fn a_refused_or_unanswered_subscription_is_retried_with_backoff() {
        let t0 = Instant::now();
        let mut r = Readiness::default();
        r.connected(t0, false);
        let (action, problem) = r.subscribed(t0, false);
        assert_eq!(action, Action::Nothing);
        assert_eq!(
            problem,
            Some(Problem::SubscribeRefused(Duration::from_secs(1)))
        );
        assert_eq!(r.tick(t0 + Duration::from_millis(500)).0, Action::Nothing);
        assert_eq!(r.tick(t0 + Duration::from_secs(1)).0, Action::Subscribe);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            r.subscribed(t1, false).1,
            Some(Problem::SubscribeRefused(Duration::from_secs(2))),
            "the second refusal waits twice as long"
        );
        // No SUBACK at all: subscribe again after the timeout.
        let mut silent = Readiness::default();
        silent.connected(t0, false);
        assert_eq!(silent.tick(t0 + SUBSCRIBE_TIMEOUT / 2).0, Action::Nothing);
        assert_eq!(
            silent.tick(t0 + SUBSCRIBE_TIMEOUT),
            (Action::Subscribe, Some(Problem::SubscribeTimedOut))
        );
        // A late SUBACK after a reconnect's refusal phase is ignored.
        let mut late = Readiness::default();
        assert_eq!(late.subscribed(t0, true).0, Action::Nothing);
    }

    #[test]
    fn probe_correlation_round_trips_and_never_looks_like_a_call() {
        let data = probe_correlation(42);
        assert_eq!(probe_nonce(&data), Some(42));
        assert_ne!(data.len(), 16);
        assert_eq!(probe_nonce(&[0u8; 16]), None);
    }
}
