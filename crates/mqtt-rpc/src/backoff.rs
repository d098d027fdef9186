//! Reconnect delays: exponential with full jitter, so a fleet of gateways and devices that lost
//! the same broker do not all knock on its door in the same millisecond when it returns.
//!
//! Two cases are told apart. A broker that cannot be reached is retried quickly (at most
//! [`MAX_DELAY`] apart), so a restart costs callers little. A connection the broker accepted
//! and then closed within [`STABLE_AFTER`] is retried ever more slowly (up to
//! [`FLAP_MAX_DELAY`]): the usual cause is another client with the same client id, and two
//! clients taking the session from each other as fast as they can would only flood the broker
//! (and each other's callers) forever. The backoff starts over only once a connection has
//! stayed up for [`STABLE_AFTER`].

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rumqttc::v5::{ConnectionError, StateError};

/// The first delay after a failure: short, so a broker restart costs callers little.
pub(crate) const MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between attempts to reach a broker: a returning broker is found within
/// about a second.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(1);
/// The longest delay after connections that the broker closed soon after accepting them.
pub(crate) const FLAP_MAX_DELAY: Duration = Duration::from_secs(30);
/// A connection that lived this long was healthy: the next failure starts the backoff over.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The wait after the broker refused the connection outright.
pub(crate) const REFUSED_DELAY: Duration = Duration::from_secs(10);
/// After this many short-lived connections in a row, say what the likely cause is.
pub(crate) const FLAPS_BEFORE_WARNING: u32 = 3;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    /// Connections in a row that the broker closed within [`STABLE_AFTER`].
    flaps: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: MIN_DELAY,
            flaps: 0,
        }
    }
}

impl Backoff {
    /// The delay to wait now, at most `ceiling`; each call doubles the next one.
    pub(crate) fn next_delay(&mut self, ceiling: Duration) -> Duration {
        let delay = self.next.min(ceiling);
        self.next = (self.next * 2).min(FLAP_MAX_DELAY);
        // Full jitter between half the delay and the delay: never zero, never a herd.
        let half = delay / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The delay after this failure, logged once at the fitting level. `lived` is how long the
    /// connection was up (None when it never got a CONNACK); `client_id` names it in the log.
    ///
    /// A broker that refused the connection (bad credentials, not authorized) will not change
    /// its mind in a second: wait [`REFUSED_DELAY`] then, instead of knocking every second and
    /// filling the logs.
    pub(crate) fn after_failure(
        &mut self,
        error: &ConnectionError,
        what: &str,
        client_id: &str,
        lived: Option<Duration>,
    ) -> Duration {
        if lived.is_some_and(|l| l >= STABLE_AFTER) {
            self.reset();
        }
        if let ConnectionError::ConnectionRefused(code) = error {
            let delay = REFUSED_DELAY + self.next_delay(MAX_DELAY);
            tracing::error!(reason = ?code, retry_in = ?delay, "{what}: the broker refused the connection; check the credentials and the broker's ACL");
            return delay;
        }
        let short_lived = lived.is_some_and(|l| l < STABLE_AFTER);
        if !short_lived {
            let delay = self.next_delay(MAX_DELAY);
            tracing::warn!(error = %error, retry_in = ?delay, "{what}: connection failed");
            return delay;
        }
        self.flaps += 1;
        let delay = self.next_delay(FLAP_MAX_DELAY);
        if is_takeover(error) {
            tracing::error!(
                client_id,
                retry_in = ?delay,
                "{what}: another client is using client id {client_id:?}: the broker gave it \
                 this connection's session (DISCONNECT 0x8E). Each gateway (--id) and each \
                 device needs an id of its own; backing off meanwhile"
            );
        } else if self.flaps >= FLAPS_BEFORE_WARNING {
            tracing::error!(
                client_id,
                error = %error,
                flaps = self.flaps,
                retry_in = ?delay,
                "{what}: the broker closed the connection soon after accepting it, {} times in a \
                 row; is another client using client id {client_id:?}? Backing off meanwhile",
                self.flaps
            );
        } else {
            tracing::warn!(error = %error, retry_in = ?delay, "{what}: connection lost soon after it was made");
        }
        delay
    }

    /// Starts over: the connection was healthy.
    pub(crate) fn reset(&mut self) {
        self.next = MIN_DELAY;
        self.flaps = 0;
    }
}

/// The broker closed the connection because another client connected with its client id.
pub(crate) fn is_takeover(error: &ConnectionError) -> bool {
    matches!(
        error,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        })
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aborted() -> ConnectionError {
        ConnectionError::MqttState(StateError::ConnectionAborted)
    }

    #[test]
    fn unreachable_brokers_are_retried_quickly_and_the_backoff_resets() {
        let mut b = Backoff::default();
        let first = b.after_failure(&aborted(), "test", "c", None);
        assert!(first <= MIN_DELAY && first >= MIN_DELAY / 2);
        for _ in 0..20 {
            assert!(b.after_failure(&aborted(), "test", "c", None) <= MAX_DELAY);
        }
        b.reset();
        assert!(b.next_delay(MAX_DELAY) <= MIN_DELAY);
    }

    #[test]
    fn connections_that_die_young_back_off_further_until_one_stays_up() {
        let mut b = Backoff::default();
        let young = Some(Duration::from_millis(50));
        let delays: Vec<Duration> = (0..12)
            .map(|_| b.after_failure(&aborted(), "test", "c", young))
            .collect();
        assert!(
            delays.last().unwrap() >= &(FLAP_MAX_DELAY / 2),
            "flapping slows down to the flap ceiling: {delays:?}"
        );
        assert!(delays.iter().all(|d| *d <= FLAP_MAX_DELAY));
        let takeover = ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: None,
        });
        assert!(is_takeover(&takeover));
        assert!(!is_takeover(&aborted()));
        assert!(b.after_failure(&takeover, "test", "c", young) >= FLAP_MAX_DELAY / 2);
        // A connection that stayed up starts the backoff over.
        let after_stable = b.after_failure(&aborted(), "test", "c", Some(STABLE_AFTER));
        assert!(after_stable <= MIN_DELAY, "{after_stable:?}");
    }
}
