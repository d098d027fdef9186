//! A cap on the bytes held for calls: request payloads until their PUBLISH is written to the
//! broker, and replies until whoever received them lets go (the gateway: request bodies while
//! they are uploaded, replies until their HTTP response is handed to the client's connection;
//! its `--max-buffered-bytes`).
//!
//! A limit on calls in flight bounds how many calls there are; this bounds what they hold,
//! which the count alone cannot: ten thousand calls of 256 KiB each would be 2.5 GiB.
//! Reservations never wait: what does not fit is refused at once, so a slow reader can hold at
//! most its share until its timeout frees it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The budget, shared by everything that holds bytes for calls.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes` from the budget, or returns None when they do not fit.
    pub fn try_hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        Some(Held {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes held right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes that may be held at once.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Bytes taken from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Held {
    /// Adds `bytes` more to this reservation; false (and nothing taken) when they do not fit.
    pub fn grow(&mut self, bytes: usize) -> bool {
        match self.budget.try_hold(bytes) {
            Some(more) => {
                self.bytes += more.bytes;
                std::mem::forget(more);
                true
            }
            None => false,
        }
    }

    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_the_limit_and_gives_back_on_drop() {
        let budget = ByteBudget::new(100);
        let mut a = budget.try_hold(60).unwrap();
        assert!(budget.try_hold(41).is_none(), "over the limit");
        let b = budget.try_hold(40).unwrap();
        assert_eq!(budget.used(), 100);
        assert!(!a.grow(1));
        drop(b);
        assert!(a.grow(40));
        assert_eq!((a.bytes(), budget.used()), (100, 100));
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_hold(0).is_some());
    }
}
