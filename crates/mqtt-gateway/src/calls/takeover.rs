//! With a shared store, the calls of an instance that died are taken over by another, and
//! their replies are not lost.
//!
//! Every instance sends its kept calls (async and streamed) on a connection of their own with a
//! persistent MQTT session (`{client id}-calls-{random}`, session expiry the longest async
//! timeout): when the instance dies, the broker keeps that session, its subscription to the
//! calls' response topic, and every reply and progress message the devices publish to it.
//! Each instance says every second that it is alive; when one has been silent for 5 s, the
//! first other instance to claim it reads its unfinished calls from the store, parks them under
//! their correlation data, and resumes the dead one's session (same client id, clean start off,
//! session expiry 0 so that the session ends once it is drained): the broker delivers what it
//! kept, and the calls run to their end here as if they had been sent from here. Calls the dead
//! instance held for an offline device are published from here when the device is back.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use mqtt_rpc::{Adopted, CallError, CallerOptions};

use super::shared::Events;
use super::{Calls, Job, Outcome, Template};
use crate::http::ApiError;

/// Makes the options of a caller on another instance's session: its client id and response
/// topic.
pub(crate) type SessionOptions = Box<dyn Fn(&str, &str) -> Option<CallerOptions> + Send + Sync>;

/// What taking over needs from the gateway.
pub(crate) struct Takeover {
    /// This instance's connection for kept calls.
    pub(crate) kept: mqtt_rpc::Caller,
    /// Its client id (what another instance resumes if this one dies).
    pub(crate) client_id: String,
    pub(crate) registry: Arc<crate::registry::Registry>,
    /// The options of a caller on another instance's session (client id, response topic).
    pub(crate) options: SessionOptions,
}

/// Says this instance is alive and takes over dead ones, every second, until the calls are
/// dropped.
pub(crate) async fn run(calls: Weak<Calls>, takeover: Arc<Takeover>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(calls) = calls.upgrade() else { return };
        let Some(shared) = calls.shared.clone() else {
            return;
        };
        let topic = takeover.kept.response_topic();
        if let Err(error) = shared.heartbeat(&takeover.client_id, topic).await {
            tracing::warn!(%error, "cannot tell the call store this instance is alive");
            continue;
        }
        match shared.claim_dead().await {
            Ok(dead) => {
                for (instance, client_id, topic) in dead {
                    let (calls, takeover) = (calls.clone(), takeover.clone());
                    tokio::spawn(adopt(calls, takeover, instance, client_id, topic));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot look for instances that died"),
        }
    }
}

/// Takes over the unfinished calls of `dead`, whose kept calls' session is `client_id` with
/// replies on `topic`, and runs them to their end.
async fn adopt(
    calls: Arc<Calls>,
    takeover: Arc<Takeover>,
    dead: String,
    client_id: String,
    topic: String,
) {
    let Some(shared) = calls.shared.clone() else {
        return;
    };
    let ids = match shared.calls_of(&dead).await {
        Ok(ids) => ids,
        Err(error) => {
            return tracing::warn!(%error, instance = %dead, "cannot read the calls of an instance that died");
        }
    };
    tracing::info!(instance = %dead, calls = ids.len(), "an instance stopped: taking over its calls");
    let mut jobs = Vec::new();
    let mut adopted = Vec::new();
    for id in ids {
        let (snapshot, remote) = match shared.snapshot(&id, Events::Latest).await {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, call = %id, "cannot read a call to take over");
                continue;
            }
        };
        if snapshot.progress().state.is_final() {
            continue;
        }
        if snapshot.device == crate::http::FAN_OUT_DEVICE {
            // A fan-out's devices were called by the instance that died, each under its own
            // correlation data, none of it in the store: nothing here can wait for them.
            tracing::warn!(call = %id, "a fan-out of an instance that died cannot be taken over");
            continue;
        }
        if let Err(error) = shared.take_over(&id).await {
            tracing::warn!(%error, call = %id, "cannot take a call over");
            continue;
        }
        let (record, cancelled) = calls.adopt_record(&snapshot);
        let left = snapshot
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let queue = remote.template.is_some();
        // A call without its request kept (streamed, or keyed sync) is never published again:
        // its template only names where it went.
        let template = remote.template.or_else(|| {
            Some(Template {
                device: mqtt_rpc::DeviceId::parse(snapshot.device.clone()).ok()?,
                service: mqtt_rpc::ServiceName::parse(snapshot.service.clone()).ok()?,
                payload: bytes::Bytes::new(),
                content_type: None,
                user_properties: Vec::new(),
            })
        });
        let Some(template) = template else { continue };
        let sent = remote
            .sent
            .as_ref()
            .and_then(|(_, c)| <[u8; 16]>::try_from(c.as_slice()).ok());
        let waiting = snapshot.progress().state == super::CallState::Queued || sent.is_none();
        if !waiting {
            adopted.push((
                jobs.len(),
                Adopted {
                    correlation: sent.unwrap_or_default(),
                    device: template.device.clone(),
                    timeout: left.max(Duration::from_millis(1)),
                },
            ));
        }
        let job = Job {
            mqtt: takeover.kept.clone(),
            registry: takeover.registry.clone(),
            call: template,
            deadline: tokio::time::Instant::now() + left,
            queue,
            streaming: None,
            _payload: None,
        };
        jobs.push((record, job, cancelled));
    }
    let mut session = None;
    if !adopted.is_empty() {
        let Some(mut options) = (takeover.options)(&client_id, &topic) else {
            return;
        };
        // Resume its session, and let it end with this connection.
        options.session_expiry = Some(0);
        options.presence = None;
        let (places, calls_adopted): (Vec<_>, Vec<_>) = adopted.into_iter().unzip();
        let (caller, streams, task) = mqtt_rpc::Caller::adopt(options, calls_adopted);
        for (place, streaming) in places.into_iter().zip(streams) {
            jobs[place].1.streaming = streaming;
        }
        session = Some((caller, task));
    }
    let mut running = Vec::new();
    for (record, job, cancelled) in jobs {
        if job.streaming.is_none() && !job.queue {
            // Not parked here, and its request is gone with the instance: it cannot go on.
            let lost = ApiError::Call(CallError::ConnectionLost).stored();
            calls
                .end(&record, super::CallState::Failed, Outcome::Problem(lost))
                .await;
            continue;
        }
        running.push(tokio::spawn(calls.clone().run(record, job, cancelled, ())));
    }
    let taken = running.len();
    for task in running {
        let _ = task.await;
    }
    if let Some((caller, task)) = session {
        caller.disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Err(error) = shared.forget_instance(&dead).await {
        tracing::warn!(%error, instance = %dead, "cannot forget an instance that died");
    }
    tracing::info!(instance = %dead, calls = taken, "the calls taken over have ended");
}
