//! The parked calls: every call waiting for its reply, keyed by its correlation data.
//!
//! A call parks here before its request is published and leaves when its reply arrives, when the
//! broker refuses the request, when the connection is lost, or when the caller stops waiting
//! (timeout, or whoever made the call went away). The [`Ticket`] guard removes the entry on drop, so
//! no exit path can leave an entry behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{CallOutcome, CorrelationId};

/// Calls waiting for a reply. Cheap to clone; all clones share one map.
#[derive(Clone, Default)]
pub(crate) struct ParkedCalls {
    // A plain mutex: every critical section is a single hash map operation, never held across
    // an await, so contention stays far below the cost of the network round trip.
    calls: Arc<Mutex<HashMap<CorrelationId, oneshot::Sender<CallOutcome>>>>,
}

impl ParkedCalls {
    /// Parks a call under a fresh random correlation id.
    pub(crate) fn park(&self) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let mut calls = self.lock();
        // 128 random bits: a collision with a live call is astronomically unlikely, but the
        // loop makes it impossible rather than unlikely.
        let id = loop {
            let id = CorrelationId::random();
            if !calls.contains_key(&id) {
                break id;
            }
        };
        calls.insert(id, tx);
        drop(calls);
        Ticket {
            id,
            rx,
            calls: self.clone(),
        }
    }

    /// Hands an outcome to the call parked under `id`. Returns false when no such call waits
    /// (it timed out, was answered already, or the id was never ours).
    pub(crate) fn resolve(&self, id: &CorrelationId, outcome: CallOutcome) -> bool {
        let waiter = self.lock().remove(id);
        match waiter {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Fails every parked call with the same outcome (the connection that carried them is gone,
    /// or the caller is shutting down).
    pub(crate) fn fail_all(&self, outcome: impl Fn() -> CallOutcome) -> usize {
        let drained: Vec<_> = self.lock().drain().collect();
        let n = drained.len();
        for (_, tx) in drained {
            let _ = tx.send(outcome());
        }
        n
    }

    /// How many calls are parked right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CorrelationId, oneshot::Sender<CallOutcome>>> {
        // A panic while holding this lock cannot leave the map inconsistent (each operation is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One parked call's place in the map. Await [`Ticket::outcome`]; dropping it un-parks the call.
pub(crate) struct Ticket {
    id: CorrelationId,
    rx: oneshot::Receiver<CallOutcome>,
    calls: ParkedCalls,
}

impl Ticket {
    pub(crate) fn id(&self) -> CorrelationId {
        self.id
    }

    /// Waits for the outcome. A call removed without an outcome counts as a lost connection.
    pub(crate) async fn outcome(&mut self) -> CallOutcome {
        (&mut self.rx).await.unwrap_or(CallOutcome::ConnectionLost)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_a_parked_call_removes_it() {
        let pending = ParkedCalls::default();
        let a = pending.park();
        let b = pending.park();
        assert_ne!(a.id(), b.id());
        assert_eq!(pending.len(), 2);
        drop(a);
        assert_eq!(pending.len(), 1);
        drop(b);
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn resolve_reaches_only_the_named_call() {
        let pending = ParkedCalls::default();
        let mut a = pending.park();
        let b = pending.park();
        assert!(pending.resolve(&a.id(), CallOutcome::ConnectionLost));
        assert!(
            !pending.resolve(&a.id(), CallOutcome::ConnectionLost),
            "answered twice"
        );
        assert!(matches!(a.outcome().await, CallOutcome::ConnectionLost));
        assert_eq!(pending.len(), 1);
        assert!(pending.resolve(&b.id(), CallOutcome::ConnectionLost));
    }
}
