//! Which call a PUBACK answers: a pure state machine, fed by the event loop, with no I/O.
//!
//! rumqttc's `publish` returns no packet id, yet the broker's PUBACK (with its reason code)
//! names only the packet id. The link works because the event loop turns requests into packets
//! in exactly the order they entered its channel, and reports each as `Outgoing::Publish(pkid)`:
//! every call is [`PublishOrder::queued`] under the same lock that sends its request into the
//! channel, so the n-th written packet belongs to the n-th queued call. From then on the packet
//! id maps to the call until its PUBACK arrives.
//!
//! After a lost connection with a clean session, everything queued or unacknowledged is gone
//! ([`PublishOrder::clear`]), and the event loop drops the same requests from rumqttc's queues,
//! so no stale packet can shift the order. With a persistent session nothing is cleared: rumqttc
//! retransmits unacknowledged requests under their old packet ids (still mapped here) before it
//! writes the queued ones.

use std::collections::{HashMap, VecDeque};

use super::CorrelationId;
use crate::budget::Held;

/// Calls whose request is on its way to the broker, in the order they were sent.
#[derive(Debug, Default)]
pub(super) struct PublishOrder {
    /// Requests in rumqttc's channel with no packet id yet, oldest first, with the budget their
    /// payload holds until it is written.
    unsent: VecDeque<(CorrelationId, Option<Held>)>,
    /// Packet id → call, from the moment the request is written until its PUBACK.
    in_flight: HashMap<u16, CorrelationId>,
}

/// What an `Outgoing::Publish(pkid)` event meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// The oldest queued call's request was written under this packet id.
    Call(CorrelationId),
    /// Packet id 0: a QoS 0 publish (the readiness probe), which belongs to no call.
    Untracked,
    /// A retransmission on a resumed session: the packet id is already mapped.
    Retransmitted,
    /// A packet id with no call queued: something else published through this client.
    Stray,
}

impl PublishOrder {
    /// A call's request entered the event loop's channel (under the same lock as the send).
    pub(super) fn queued(&mut self, id: CorrelationId, held: Option<Held>) {
        self.unsent.push_back((id, held));
    }

    /// The event loop wrote a PUBLISH with this packet id. The written call's payload budget is
    /// given back here.
    pub(super) fn written(&mut self, pkid: u16) -> Written {
        if pkid == 0 {
            return Written::Untracked;
        }
        if self.in_flight.contains_key(&pkid) {
            return Written::Retransmitted;
        }
        match self.unsent.pop_front() {
            Some((id, _written)) => {
                self.in_flight.insert(pkid, id);
                Written::Call(id)
            }
            None => Written::Stray,
        }
    }

    /// The broker acknowledged this packet id: the call it carried, if any.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<CorrelationId> {
        self.in_flight.remove(&pkid)
    }

    /// Nothing queued or unacknowledged will reach the broker (a clean session was lost, or the
    /// broker came back without our session).
    pub(super) fn clear(&mut self) {
        self.unsent.clear();
        self.in_flight.clear();
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.unsent.len(), self.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::budget::ByteBudget;

    fn ids<const N: usize>() -> [CorrelationId; N] {
        std::array::from_fn(|_| CorrelationId::random())
    }

    #[test]
    fn acks_in_any_order_reach_the_call_written_under_their_packet_id() {
        let mut order = PublishOrder::default();
        let [a, b, c] = ids();
        for id in [a, b, c] {
            order.queued(id, None);
        }
        assert_eq!(order.written(7), Written::Call(a));
        assert_eq!(order.written(8), Written::Call(b));
        assert_eq!(order.written(9), Written::Call(c));
        assert_eq!(order.acked(8), Some(b));
        assert_eq!(order.acked(7), Some(a));
        assert_eq!(order.acked(9), Some(c));
        assert_eq!(order.acked(9), None, "a duplicate PUBACK answers nothing");
        assert_eq!(order.counts(), (0, 0));
    }

    #[test]
    fn a_retransmitted_packet_id_does_not_take_the_next_call() {
        let mut order = PublishOrder::default();
        let [a, b] = ids();
        order.queued(a, None);
        assert_eq!(order.written(1), Written::Call(a));
        // The connection drops with a persistent session: nothing is cleared. On the resumed
        // session rumqttc writes packet 1 again, then the call queued meanwhile.
        order.queued(b, None);
        assert_eq!(order.written(1), Written::Retransmitted);
        assert_eq!(order.written(2), Written::Call(b));
        assert_eq!(order.acked(1), Some(a));
        assert_eq!(order.acked(2), Some(b));
    }

    #[test]
    fn a_clean_session_forgets_everything_and_acks_after_the_reconnect_match_new_calls() {
        let mut order = PublishOrder::default();
        let [a, b, c] = ids();
        order.queued(a, None);
        order.queued(b, None);
        assert_eq!(order.written(1), Written::Call(a));
        // Lost with a clean session: a (written) and b (queued) are failed by the caller.
        order.clear();
        assert_eq!(order.counts(), (0, 0));
        assert_eq!(
            order.acked(1),
            None,
            "a late PUBACK from the old connection"
        );
        // rumqttc numbers packets from 1 again on the new connection.
        order.queued(c, None);
        assert_eq!(order.written(1), Written::Call(c));
        assert_eq!(order.acked(1), Some(c));
    }

    #[test]
    fn a_stray_or_untracked_publish_leaves_the_order_alone() {
        let mut order = PublishOrder::default();
        assert_eq!(order.written(5), Written::Stray);
        let [a] = ids();
        order.queued(a, None);
        assert_eq!(order.written(0), Written::Untracked, "the QoS 0 probe");
        assert_eq!(order.counts(), (1, 0));
        assert_eq!(order.written(3), Written::Call(a));
    }

    #[test]
    fn a_payload_holds_its_budget_until_written_or_cleared() {
        let budget: Arc<ByteBudget> = ByteBudget::new(100);
        let mut order = PublishOrder::default();
        let [a, b] = ids();
        order.queued(a, budget.try_hold(30));
        order.queued(b, budget.try_hold(40));
        assert_eq!(budget.used(), 70);
        order.written(1);
        assert_eq!(budget.used(), 40, "a's payload was written");
        order.clear();
        assert_eq!(budget.used(), 0, "b's payload will never be written");
    }
}
