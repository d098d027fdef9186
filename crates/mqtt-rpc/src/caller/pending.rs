//! The parked calls: every call waiting for its reply, keyed by its correlation data.
//!
//! A call parks here before its request is published and leaves when its reply arrives, when the
//! broker refuses the request, when the connection is lost, or when the caller stops waiting
//! (timeout, or whoever made the call went away). The [`Ticket`] guard removes the entry on drop, so
//! no exit path can leave an entry behind.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};

use super::{CallOutcome, CorrelationId, Received};

/// Who waits for a call: a plain call waits for its outcome only (progress messages are
/// dropped); a streaming call takes its progress messages too, in order, then the outcome.
pub(crate) enum Waiter {
    Once(oneshot::Sender<CallOutcome>),
    Stream(mpsc::UnboundedSender<Message>),
    /// A one-way request: waits for the broker's PUBACK only.
    Ack(oneshot::Sender<CallOutcome>),
    /// A group request: every reply under its correlation data, until whoever waits leaves
    /// (a refusal or a lost connection still ends it).
    Many(mpsc::UnboundedSender<Message>),
}

/// Which [`Waiter`] a call parks as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Once,
    Stream,
    Ack,
    Many,
}

/// What a streaming call receives. The channel is unbounded in count but not in bytes: every
/// progress message holds its bytes in the caller's budget until it is taken and dropped.
#[derive(Debug)]
pub(crate) enum Message {
    Progress(Received),
    Outcome(CallOutcome),
    /// One of a group request's replies (or why one could not be taken); more may follow.
    Answer(CallOutcome),
}

impl Waiter {
    fn finish(self, outcome: CallOutcome) -> bool {
        match self {
            Waiter::Once(tx) | Waiter::Ack(tx) => tx.send(outcome).is_ok(),
            Waiter::Stream(tx) | Waiter::Many(tx) => tx.send(Message::Outcome(outcome)).is_ok(),
        }
    }
}

/// Calls waiting for a reply. Cheap to clone; all clones share one map.
#[derive(Clone, Default)]
pub(crate) struct ParkedCalls {
    // A plain mutex: every critical section is a single hash map operation, never held across
    // an await, so contention stays far below the cost of the network round trip.
    calls: Arc<Mutex<HashMap<CorrelationId, Waiter>>>,
}

/// The receiving end a [`Ticket`] holds.
enum Receiver {
    Once(oneshot::Receiver<CallOutcome>),
    Stream(mpsc::UnboundedReceiver<Message>),
}

impl ParkedCalls {
    /// Parks a call under a fresh random correlation id.
    pub(crate) fn park(&self, kind: Kind) -> Ticket {
        let (waiter, rx) = Self::waiter(kind);
        let mut calls = self.lock();
        // 128 random bits: a collision with a live call is astronomically unlikely, but the
        // loop makes it impossible rather than unlikely.
        let id = loop {
            let id = CorrelationId::random();
            if !calls.contains_key(&id) {
                break id;
            }
        };
        calls.insert(id, waiter);
        drop(calls);
        self.ticket(id, rx)
    }

    /// Parks a call under a given correlation id (one another caller published, whose session
    /// this caller adopts); None when a call is parked under it already.
    pub(crate) fn park_as(&self, id: CorrelationId, kind: Kind) -> Option<Ticket> {
        let (waiter, rx) = Self::waiter(kind);
        let mut calls = self.lock();
        if calls.contains_key(&id) {
            return None;
        }
        calls.insert(id, waiter);
        drop(calls);
        Some(self.ticket(id, rx))
    }

    fn ticket(&self, id: CorrelationId, rx: Receiver) -> Ticket {
        Ticket {
            id,
            rx,
            calls: self.clone(),
            left: false,
        }
    }

    fn waiter(kind: Kind) -> (Waiter, Receiver) {
        match kind {
            Kind::Stream => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Waiter::Stream(tx), Receiver::Stream(rx))
            }
            Kind::Many => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Waiter::Many(tx), Receiver::Stream(rx))
            }
            Kind::Once => {
                let (tx, rx) = oneshot::channel();
                (Waiter::Once(tx), Receiver::Once(rx))
            }
            Kind::Ack => {
                let (tx, rx) = oneshot::channel();
                (Waiter::Ack(tx), Receiver::Once(rx))
            }
        }
    }

    /// Hands an outcome to the call parked under `id`. Returns false when no such call waits
    /// (it timed out, was answered already, or the id was never ours).
    ///
    /// A group request takes a reply (or a reply it could not hold) and stays parked; any
    /// other outcome ends it.
    pub(crate) fn resolve(&self, id: &CorrelationId, outcome: CallOutcome) -> bool {
        let mut calls = self.lock();
        // One lookup for a plain call's reply; a group call's is put back.
        let waiter = calls.remove(id);
        if let Some(Waiter::Many(tx)) = &waiter {
            if matches!(
                outcome,
                CallOutcome::Reply(_) | CallOutcome::InvalidStatus(_) | CallOutcome::BufferFull
            ) {
                let _ = tx.send(Message::Answer(outcome));
                if let Some(waiter) = waiter {
                    calls.insert(*id, waiter);
                }
                return true;
            }
        }
        drop(calls);
        match waiter {
            Some(waiter) => waiter.finish(outcome),
            None => false,
        }
    }

    /// The broker accepted the request under `id` (PUBACK 0x00): a one-way call is done; any
    /// other waits on for its reply.
    pub(crate) fn accepted(&self, id: &CorrelationId) {
        let mut calls = self.lock();
        if matches!(calls.get(id), Some(Waiter::Ack(_))) {
            if let Some(waiter) = calls.remove(id) {
                drop(calls);
                waiter.finish(CallOutcome::Accepted);
            }
        }
    }

    /// Hands a progress message to the call parked under `id`, which stays parked. Returns
    /// false when no such call waits; a plain call that waits drops it (true).
    pub(crate) fn progress(&self, id: &CorrelationId, received: Received) -> bool {
        let calls = self.lock();
        match calls.get(id) {
            Some(Waiter::Stream(tx)) => {
                let _ = tx.send(Message::Progress(received));
                true
            }
            Some(Waiter::Once(_) | Waiter::Ack(_) | Waiter::Many(_)) => true,
            None => false,
        }
    }

    /// Fails every parked call with the same outcome (the connection that carried them is gone,
    /// or the caller is shutting down).
    pub(crate) fn fail_all(&self, outcome: impl Fn() -> CallOutcome) -> usize {
        let drained: Vec<_> = self.lock().drain().collect();
        let n = drained.len();
        for (_, waiter) in drained {
            waiter.finish(outcome());
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CorrelationId, Waiter>> {
        // A panic while holding this lock cannot leave the map inconsistent (each operation is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One parked call's place in the map. Await [`Ticket::outcome`] (or [`Ticket::next`] for a
/// streaming call); dropping it un-parks the call.
pub(crate) struct Ticket {
    id: CorrelationId,
    rx: Receiver,
    calls: ParkedCalls,
    /// Already taken out of the map by [`Ticket::leave`].
    left: bool,
}

impl Ticket {
    pub(crate) fn id(&self) -> CorrelationId {
        self.id
    }

    /// Polls for the outcome (progress messages and a group's answers are passed over). A call
    /// removed without an outcome counts as a lost connection.
    pub(crate) fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<CallOutcome> {
        match &mut self.rx {
            Receiver::Once(rx) => Pin::new(rx)
                .poll(cx)
                .map(|outcome| outcome.unwrap_or(CallOutcome::ConnectionLost)),
            Receiver::Stream(rx) => loop {
                match std::task::ready!(rx.poll_recv(cx)) {
                    Some(Message::Outcome(outcome)) => return Poll::Ready(outcome),
                    Some(Message::Progress(_) | Message::Answer(_)) => continue,
                    None => return Poll::Ready(CallOutcome::ConnectionLost),
                }
            },
        }
    }

    /// Waits for the outcome ([`Ticket::poll_outcome`]).
    #[cfg(test)]
    pub(crate) async fn outcome(&mut self) -> CallOutcome {
        std::future::poll_fn(|cx| self.poll_outcome(cx)).await
    }

    /// The next message of a streaming call (a plain call's only one is its outcome). After
    /// the outcome, or if the call was removed without one, a lost connection.
    pub(crate) async fn next(&mut self) -> Message {
        let lost = || Message::Outcome(CallOutcome::ConnectionLost);
        match &mut self.rx {
            Receiver::Once(rx) => rx.await.map(Message::Outcome).unwrap_or_else(|_| lost()),
            Receiver::Stream(rx) => rx.recv().await.unwrap_or_else(lost),
        }
    }

    /// Leaves the map now; true when the call was still parked, so no outcome had reached it
    /// (whoever waited gave up: the caller cancels it).
    pub(crate) fn leave(&mut self) -> bool {
        if self.left {
            return false;
        }
        self.left = true;
        self.calls.lock().remove(&self.id).is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parked call holds a channel with room for one outcome (and hyper's task holds
    /// the call's future): what a parked call costs is mostly these sizes, 100,000 times.
    #[test]
    fn a_parked_call_keeps_little() {
        let outcome = std::mem::size_of::<CallOutcome>();
        assert!(outcome <= 32, "CallOutcome is {outcome} B");
        let waiter = std::mem::size_of::<Waiter>();
        assert!(waiter <= 16, "Waiter is {waiter} B");
    }

    #[tokio::test]
    async fn dropping_a_parked_call_removes_it() {
        let pending = ParkedCalls::default();
        let a = pending.park(Kind::Once);
        let b = pending.park(Kind::Once);
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
        let mut a = pending.park(Kind::Once);
        let b = pending.park(Kind::Stream);
        assert!(pending.resolve(&a.id(), CallOutcome::ConnectionLost));
        assert!(
            !pending.resolve(&a.id(), CallOutcome::ConnectionLost),
            "answered twice"
        );
        assert!(matches!(a.outcome().await, CallOutcome::ConnectionLost));
        assert_eq!(pending.len(), 1);
        assert!(pending.resolve(&b.id(), CallOutcome::ConnectionLost));
    }

    #[tokio::test]
    async fn a_group_call_takes_every_reply_until_it_ends() {
        let pending = ParkedCalls::default();
        let mut group = pending.park(Kind::Many);
        for _ in 0..3 {
            assert!(pending.resolve(&group.id(), CallOutcome::BufferFull));
        }
        assert_eq!(pending.len(), 1, "still parked after its replies");
        for _ in 0..3 {
            assert!(matches!(
                group.next().await,
                Message::Answer(CallOutcome::BufferFull)
            ));
        }
        assert!(pending.resolve(&group.id(), CallOutcome::ConnectionLost));
        assert!(matches!(
            group.next().await,
            Message::Outcome(CallOutcome::ConnectionLost)
        ));
        assert!(pending.is_empty());
    }
}
