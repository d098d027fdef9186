//! Reconnect delays: exponential with full jitter, so a fleet of gateways and devices that lost
//! the same broker do not all knock on its door in the same millisecond when it returns.

use std::time::Duration;

/// The first delay after a failure: short, so a broker restart costs callers little.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest delay: a returning broker is found within about a second, so a broker restart
/// costs callers little; the jitter keeps a fleet from reconnecting in lockstep.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// The wait after the broker refused the connection outright.
pub const REFUSED_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN_DELAY }
    }
}

impl Backoff {
    /// The delay to wait now; each call doubles the ceiling up to [`MAX_DELAY`].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        // Full jitter between half the ceiling and the ceiling: never zero, never a herd.
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The delay after this failure, logged once at the fitting level. A broker that refused
    /// the connection (bad credentials, not authorized) will not change its mind in a second:
    /// wait [`REFUSED_DELAY`] then, instead of knocking every second and filling the logs.
    pub fn after_failure(&mut self, error: &rumqttc::v5::ConnectionError, what: &str) -> Duration {
        if let rumqttc::v5::ConnectionError::ConnectionRefused(code) = error {
            let delay = REFUSED_DELAY + self.next_delay();
            tracing::error!(reason = ?code, retry_in = ?delay, "{what}: the broker refused the connection; check the credentials and the broker's ACL");
            delay
        } else {
            let delay = self.next_delay();
            tracing::warn!(error = %error, retry_in = ?delay, "{what}: connection failed");
            delay
        }
    }

    /// Called once connected again.
    pub fn reset(&mut self) {
        self.next = MIN_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first <= MIN_DELAY && first >= MIN_DELAY / 2);
        for _ in 0..20 {
            assert!(b.next_delay() <= MAX_DELAY);
        }
        assert!(b.next_delay() >= MAX_DELAY / 2);
        b.reset();
        assert!(b.next_delay() <= MIN_DELAY);
    }
}
