//! The one task that polls rumqttc's event loop, and the reactions of [`Inner`] to what it sees.
//! Nothing else polls it, and it never awaits the client (rumqtt issue 1025).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Event, EventLoop, Request};
use rumqttc::Outgoing;
use tracing::{debug, error, info, warn};

use super::publish_order::Written;
use super::readiness::{self, Action, Problem, Readiness};
use super::{BrokerInfo, CallOutcome, CorrelationId, Inner, Link, PublishRefusal, Received};
use crate::backoff::Backoff;
use crate::event_loop_access;
use crate::presence::{self, Discovery, PresenceEvent, PresenceMessage};
use crate::protocol::{self, Reply};

impl Inner {
    pub(super) fn lock_link(&self) -> std::sync::MutexGuard<'_, Link> {
        // Every critical section leaves `Link` consistent, so a poisoned lock is still usable.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Within the settling time after a reconnect.
    pub(super) fn settling(&self) -> bool {
        let at = *self
            .reconnected_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        at.is_some_and(|at| at.elapsed() < self.reconnect_settle)
    }

    /// The QoS of the response topic subscription. With a clean session, QoS 1 would buy
    /// nothing: a reply in flight when the connection drops is lost with the session either way
    /// (and its call is failed at once), while every reply would cost a PUBACK from us and an
    /// in-flight slot at the broker (Mosquitto allows 20 per client by default and queues, then
    /// drops, the rest). With a persistent session, QoS 1 makes the broker keep the replies
    /// that arrive while we are away.
    fn reply_qos(&self) -> QoS {
        match self.session_expiry {
            Some(_) => QoS::AtLeastOnce,
            None => QoS::AtMostOnce,
        }
    }

    fn set_ready(&self, ready: bool) {
        self.lock_link().ready = ready;
        self.ready.send_replace(ready);
    }

    fn lock_readiness(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // Every critical section is one state transition: a poisoned lock is still consistent.
        self.readiness.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request an [`Action`] asks for, handed to `send` (the event loop's queue, or the
    /// client's channel).
    fn act(&self, action: Action, send: impl FnOnce(Request)) {
        match action {
            Action::Nothing => {}
            Action::Subscribe => {
                let filter = Filter::new(self.response_topic.clone(), self.reply_qos());
                // Presence in the same SUBSCRIBE, second: its reason code is the second one.
                // QoS 1 and the retained store (Retain Handling 0): every device's last word.
                let presence = self
                    .presence
                    .iter()
                    .map(|watch| Filter::new(watch.topics.filter(), QoS::AtLeastOnce));
                send(Request::Subscribe(Subscribe::new_many(
                    std::iter::once(filter).chain(presence),
                    None,
                )));
            }
            Action::Probe(nonce) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: Some(readiness::probe_correlation(nonce).into()),
                    ..Default::default()
                };
                send(Request::Publish(Publish::new(
                    self.response_topic.clone(),
                    QoS::AtMostOnce,
                    bytes::Bytes::new(),
                    Some(properties),
                )));
            }
        }
    }

    /// One log line for a readiness problem, naming what to check.
    fn report(&self, problem: &Problem, reasons: Option<&[SubscribeReasonCode]>) {
        let topic = &self.response_topic;
        match problem {
            Problem::SubscribeRefused(retry_in) => error!(
                response_topic = %topic,
                ?reasons,
                ?retry_in,
                "the broker refused the response topic subscription; check its ACL (the caller \
                 needs to read and write its response topic). Calls are refused (the gateway \
                 answers 503) until it is granted"
            ),
            Problem::SubscribeTimedOut => warn!(
                response_topic = %topic,
                "no SUBACK for the response topic subscription in time; subscribing again"
            ),
            Problem::ProbeLost { attempt } => error!(
                response_topic = %topic,
                attempt,
                "replies never arrive: a message the caller published to its own response topic \
                 did not come back. The broker's ACL must let it read and write that topic. \
                 Calls are refused (the gateway answers 503) until a probe comes back"
            ),
        }
    }

    /// The connection dropped. With a clean session, nothing queued or unacknowledged will
    /// reach the broker, and replies to what did would go to a subscription that no longer
    /// exists: fail every parked call now (503) rather than let it run into its timeout. With a
    /// persistent session, keep everything: the broker holds our subscription and replies.
    fn connection_lost(&self, eventloop: &mut EventLoop) {
        self.lock_readiness().disconnected();
        {
            // Under the lock, so no call can slip a request in between.
            let mut link = self.lock_link();
            link.ready = false;
            let clean = self.session_expiry.is_none();
            event_loop_access::after_connection_lost(eventloop, clean);
            if clean {
                link.order.clear();
            }
        }
        self.ready.send_replace(false);
        if self.session_expiry.is_none() {
            self.fail_all_lost();
        }
    }

    /// The broker has no session for us: whatever was in flight is gone.
    fn session_lost(&self, eventloop: &mut EventLoop) {
        {
            let mut link = self.lock_link();
            event_loop_access::forget_unsent(eventloop);
            link.order.clear();
        }
        self.fail_all_lost();
    }

    fn fail_all_lost(&self) {
        let failed = self.parked.fail_all(|| CallOutcome::ConnectionLost);
        if failed > 0 {
            warn!(failed, "connection lost: failed the calls it carried");
        }
    }

    /// A discovery request, asking every announcing device to announce again. QoS 0: a QoS 1
    /// publish that is not a call would take a call's place in the PUBACK order
    /// (`publish_order.rs`).
    pub(super) fn discovery_request(&self) -> Option<Publish> {
        let watch = self.presence.as_ref()?;
        Some(Publish::new(
            watch.topics.discovery(),
            QoS::AtMostOnce,
            Discovery::payload(watch.discovery_window),
            None,
        ))
    }

    /// A message on a device's presence topic: handed on, unparsed, within the watch's bounds.
    fn route_presence(&self, publish: Publish) {
        let Some(watch) = &self.presence else {
            return;
        };
        let topic = String::from_utf8_lossy(&publish.topic);
        let Some(device) = watch.topics.device_of(&topic) else {
            // Our own discovery request, or a topic deeper than a device's.
            return;
        };
        let dropped = |why: &str| {
            self.counters
                .presence_dropped
                .fetch_add(1, Ordering::Relaxed);
            debug!(device = %device, "presence message dropped: {why}");
        };
        if publish.payload.len() > watch.max_bytes {
            return dropped("larger than the announcement limit");
        }
        let Some(held) = watch
            .budget
            .try_hold(publish.payload.len() + presence::MESSAGE_OVERHEAD)
        else {
            return dropped("too many presence messages waiting");
        };
        let message = PresenceMessage {
            device: device.clone(),
            payload: publish.payload,
            retained: publish.retain,
            held: Some(held),
        };
        if watch.sink.send(PresenceEvent::Message(message)).is_err() {
            dropped("nobody reads the presence feed");
        }
    }

    fn route_reply(&self, publish: Publish) {
        if publish.topic != self.response_topic.as_bytes() {
            if self.presence.is_some() {
                return self.route_presence(publish);
            }
            debug!(topic = ?publish.topic, "ignoring a message on a topic we did not subscribe to");
            return;
        }
        let properties = publish.properties.unwrap_or_default();
        if let Some(nonce) = properties
            .correlation_data
            .as_deref()
            .and_then(readiness::probe_nonce)
        {
            if self.lock_readiness().probe_returned(nonce) {
                self.set_ready(true);
                info!(response_topic = %self.response_topic, "ready: the response topic delivers");
            }
            return;
        }
        let Some(id) = properties
            .correlation_data
            .as_deref()
            .and_then(CorrelationId::from_bytes)
        else {
            self.counters
                .replies_without_correlation
                .fetch_add(1, Ordering::Relaxed);
            debug!("ignoring a reply without 16 bytes of correlation data");
            return;
        };
        if let Some(at) = properties
            .user_properties
            .iter()
            .position(|(key, _)| key == protocol::PROGRESS_PROPERTY)
        {
            return self.route_progress(id, publish.payload, properties, at);
        }
        let outcome = match protocol::split_status(properties.user_properties) {
            Ok((status, user_properties)) => {
                // What the reply holds until whoever receives it lets go (the gateway: until
                // hyper has taken the HTTP response).
                let bytes = publish.payload.len()
                    + user_properties
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                match self.budget.try_hold(bytes) {
                    Some(held) => CallOutcome::Reply(Box::new(Received {
                        reply: Reply {
                            payload: publish.payload,
                            content_type: properties.content_type,
                            status,
                            user_properties,
                        },
                        held: Some(held),
                    })),
                    None => CallOutcome::BufferFull,
                }
            }
            Err(why) => CallOutcome::InvalidStatus(why.to_string()),
        };
        // Counted once: as unmatched when no call waits for it, else as invalid if it is.
        let invalid = matches!(outcome, CallOutcome::InvalidStatus(_));
        if !self.parked.resolve(&id, outcome) {
            self.counters
                .unmatched_replies
                .fetch_add(1, Ordering::Relaxed);
            debug!("ignoring a reply that matches no waiting call (late, duplicate or forged)");
        } else if invalid {
            self.counters
                .invalid_replies
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Inner {
    /// A progress message: handed to its call, which stays parked. It holds its bytes in the
    /// budget like a reply; when the budget is full it is dropped (and counted), never queued
    /// beyond it.
    fn route_progress(
        &self,
        id: CorrelationId,
        payload: bytes::Bytes,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
        marker: usize,
    ) {
        let mut user_properties = properties.user_properties;
        user_properties.remove(marker);
        let bytes = payload.len()
            + user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let Some(held) = self.budget.try_hold(bytes) else {
            self.counters
                .progress_dropped
                .fetch_add(1, Ordering::Relaxed);
            debug!("dropping a progress message: the budget is full");
            return;
        };
        let received = Received {
            reply: Reply {
                payload,
                content_type: properties.content_type,
                status: None,
                user_properties,
            },
            held: Some(held),
        };
        if !self.parked.progress(&id, received) {
            self.counters
                .unmatched_replies
                .fetch_add(1, Ordering::Relaxed);
            debug!("ignoring a progress message that matches no waiting call");
        }
    }
}

fn refusal(reason: PubAckReason) -> Option<PublishRefusal> {
    Some(match reason {
        PubAckReason::Success => return None,
        PubAckReason::NoMatchingSubscribers => PublishRefusal::NoMatchingSubscribers,
        PubAckReason::NotAuthorized => PublishRefusal::NotAuthorized,
        PubAckReason::QuotaExceeded => PublishRefusal::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PublishRefusal::PayloadFormatInvalid,
        PubAckReason::TopicNameInvalid => PublishRefusal::TopicNameInvalid,
        PubAckReason::UnspecifiedError => PublishRefusal::Other(0x80),
        PubAckReason::ImplementationSpecificError => PublishRefusal::Other(0x83),
        PubAckReason::PacketIdentifierInUse => PublishRefusal::Other(0x91),
    })
}

/// The event loop. Nothing else polls it, and it never awaits the client (rumqtt issue 1025):
/// its own requests (the subscription, the probe) go straight into the event loop's queue.
pub(super) async fn run(mut eventloop: EventLoop, inner: Arc<Inner>) {
    let mut backoff = Backoff::default();
    let mut connected_once = false;
    // When the current connection's CONNACK came: how long a connection lived decides whether
    // the next reconnect may be quick (see `Backoff::after_failure`).
    let mut connected_at: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected_at = Some(Instant::now());
                if connected_once {
                    inner.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    *inner
                        .reconnected_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
                connected_once = true;
                let max_packet = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .unwrap_or(0);
                inner.broker_max_packet.store(max_packet, Ordering::Relaxed);
                let known = BrokerInfo::from_connack(
                    crate::failover::address(&eventloop.options),
                    ack.properties.as_ref(),
                );
                info!(
                    response_topic = %inner.response_topic,
                    broker = %known.address,
                    broker_max_packet = max_packet,
                    receive_maximum = known.receive_maximum,
                    topic_alias_maximum = known.topic_alias_maximum,
                    shared_subscriptions = known.shared_subscriptions,
                    retain_available = known.retain_available,
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                *inner.lock_broker() = known;
                if !ack.session_present && inner.session_expiry.is_some() {
                    inner.session_lost(&mut eventloop);
                }
                // With the session present our subscription survived: only the probe is
                // needed. rumqttc now retransmits the unacknowledged requests, then sends the
                // queued ones.
                let action = inner
                    .lock_readiness()
                    .connected(Instant::now(), ack.session_present);
                inner.act(action, |request| {
                    event_loop_access::send_next(&mut eventloop, request)
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let success = |c: Option<&SubscribeReasonCode>| {
                    matches!(c, Some(SubscribeReasonCode::Success(_)))
                };
                // The response topic's code first, presence's (when watched) second.
                let granted = success(ack.return_codes.first());
                if let Some(watch) = &inner.presence {
                    if success(ack.return_codes.get(1)) {
                        // Before the retained messages, which follow the SUBACK.
                        let _ = watch.sink.send(PresenceEvent::Subscribed);
                        // Retained announcements are on their way; ask for the rest (a
                        // cluster may keep retained messages on another node).
                        if let Some(discovery) = inner.discovery_request() {
                            event_loop_access::send_next(
                                &mut eventloop,
                                Request::Publish(discovery),
                            );
                        }
                    } else {
                        error!(
                            reasons = ?ack.return_codes,
                            "the broker refused the presence subscription; check its ACL (the \
                             caller needs to read presence/+). No device's presence is known"
                        );
                    }
                }
                let (action, problem) = inner.lock_readiness().subscribed(Instant::now(), granted);
                if let Some(problem) = problem {
                    inner.report(&problem, Some(&ack.return_codes));
                } else if granted {
                    debug!(response_topic = %inner.response_topic, "subscribed to the response topic; probing it");
                }
                inner.act(action, |request| {
                    event_loop_access::send_next(&mut eventloop, request)
                });
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let written = inner.lock_link().order.written(pkid);
                if written == Written::Stray {
                    warn!(pkid, "a request left with no call waiting for its PUBACK");
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let call = inner.lock_link().order.acked(ack.pkid);
                match (call, refusal(ack.reason)) {
                    (Some(id), Some(refusal)) => {
                        inner.parked.resolve(&id, CallOutcome::Refused(refusal));
                    }
                    (Some(id), None) if inner.one_way.load(Ordering::SeqCst) > 0 => {
                        inner.parked.accepted(&id);
                    }
                    _ => {}
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => inner.route_reply(publish),
            Ok(Event::Outgoing(Outgoing::Disconnect))
                if inner.disconnecting.load(Ordering::SeqCst) =>
            {
                info!("disconnected from the MQTT broker");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                if inner.disconnecting.load(Ordering::SeqCst) {
                    break;
                }
                inner.connection_lost(&mut eventloop);
                let lived = connected_at.take().map(|at| at.elapsed());
                let delay = backoff.after_failure(&e, "caller", &inner.client_id, lived);
                let next = inner
                    .failover
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .advance(&mut eventloop.options);
                {
                    let mut known = inner.lock_broker();
                    known.connected = false;
                    if let Some(broker) = next {
                        info!(%broker, "connecting to the next broker");
                        known.address = broker;
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Once a second: subscribes again when a SUBACK never came or a refusal has waited its turn,
/// and probes again when a probe got lost, saying why the caller is not ready. Through the
/// client's channel, like a call, since only the event loop may touch the event loop.
pub(super) async fn watch_readiness(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if inner.disconnecting.load(Ordering::SeqCst) {
            return;
        }
        let (action, problem) = inner.lock_readiness().tick(Instant::now());
        if let Some(problem) = problem {
            inner.report(&problem, None);
        }
        let client = inner.client.clone();
        inner.act(action, |request| {
            let sent = match request {
                Request::Subscribe(subscribe) => client.try_subscribe_many(subscribe.filters),
                Request::Publish(publish) => client.try_publish_with_properties(
                    String::from_utf8_lossy(&publish.topic).into_owned(),
                    publish.qos,
                    false,
                    publish.payload,
                    publish.properties.unwrap_or_default(),
                ),
                _ => Ok(()),
            };
            if let Err(e) = sent {
                debug!("could not queue a readiness request: {e}");
            }
        });
    }
}
