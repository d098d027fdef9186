//! The shared store: call records in Redis (`--store-url`), so that every gateway instance
//! behind a load balancer reads, streams and cancels every call, and a call outlives the
//! instance that accepted it. Why Redis and not the broker: ARCHITECTURE.md, "Many gateways,
//! one truth".
//!
//! Under the prefix `mqtt-gateway:` (one Redis database per group of gateways):
//! - `call:{id}`: a hash, the call's record (fields below), with a TTL of its deadline plus its
//!   retention, cut to the retention once it has finished;
//! - `call:{id}:events`: a stream of its progress events, ids `0-1`, `0-2`, ... (the event
//!   ids the API shows), at most `--max-progress-events`, with the record's TTL;
//! - `key:{sha256 of scope and key}`: an `Idempotency-Key`, `{fingerprint hex} {call id}`;
//! - `gateways`: a hash, each instance's name → its calls' MQTT client id and response topic;
//!   `alive:{instance}`: set every second, 5 s TTL; `gw:{instance}:calls`: its calls that
//!   have not finished; `adopt:{instance}`: who took over a dead instance's calls;
//! - channels `changes` (a call id: its record changed) and `cancel` (a call id: whoever runs
//!   it, cancel it).
//!
//! Every change is one Lua script, so a transition is atomic across instances: a call that
//! has finished (or was cancelled elsewhere) never changes again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::Script;
use sha2::Digest;
use tokio::sync::{watch, Notify};

use super::{CallState, Message, Outcome, Progress, ProgressEvent, Record, Template};
use crate::http::error::StoredProblem;

const PREFIX: &str = "mqtt-gateway:";
/// How long an instance that stopped saying it is alive counts as alive.
const ALIVE_TTL: Duration = Duration::from_secs(5);
/// How long a connection or command may take before the store counts as unreachable.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// The store could not be reached, or answered what no gateway writes.
#[derive(Debug, thiserror::Error)]
#[error("the call store (Redis) failed: {0}")]
pub(crate) struct StoreError(String);

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

type Fields = HashMap<String, Vec<u8>>;

/// What a record in the store says beyond what a [`Record`] holds: who runs the call and how
/// its request went out, for a cancel when nobody runs it any more.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    /// Its request's Response Topic and Correlation Data, once published.
    pub(crate) sent: Option<(String, Vec<u8>)>,
    /// The request, while it may be published again (async calls).
    pub(crate) template: Option<Template>,
}

/// Which progress events a snapshot carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Events {
    /// The latest only (a status document's `latest_progress`).
    Latest,
    /// Up to `n` after this event id (an event stream's next ones).
    After(u64, usize),
}

/// The Redis side of [`super::Calls`].
pub(crate) struct Shared {
    client: redis::Client,
    conn: ConnectionManager,
    /// This process's name among the instances sharing the store: `{--id}-{random}`, new on
    /// every start (a restarted instance's earlier calls are taken over like a dead one's).
    pub(crate) instance: String,
    retention: Duration,
    max_events: usize,
    /// Local readers of calls, woken when the `changes` channel names their call.
    waiters: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn key(kind: &str, id: &str) -> String {
    format!("{PREFIX}{kind}:{id}")
}

fn record_key(id: &str) -> String {
    key("call", id)
}

fn events_key(id: &str) -> String {
    format!("{PREFIX}call:{id}:events")
}

fn calls_of(instance: &str) -> String {
    format!("{PREFIX}gw:{instance}:calls")
}

fn channel(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The message fields both progress events and replies have.
fn message_fields(m: &Message, out: &mut Vec<(&'static str, Vec<u8>)>) {
    if let Some(ct) = &m.content_type {
        out.push(("ct", ct.as_bytes().to_vec()));
    }
    let up = serde_json::to_vec(&m.user_properties).unwrap_or_else(|_| b"[]".to_vec());
    out.push(("up", up));
    out.push(("pl", m.payload.to_vec()));
}

fn text(f: &Fields, name: &str) -> Option<String> {
    f.get(name).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn number(f: &Fields, name: &str) -> Option<u64> {
    text(f, name)?.parse().ok()
}

fn message_of(f: &Fields, status: Option<u16>) -> Message {
    Message {
        status,
        content_type: text(f, "ct"),
        user_properties: f
            .get("up")
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default(),
        payload: Bytes::from(f.get("pl").cloned().unwrap_or_default()),
        _held: None,
    }
}

fn state_of(name: &str) -> Option<CallState> {
    use CallState::*;
    [Queued, Sent, Running, Succeeded, Failed, Expired, Cancelled]
        .into_iter()
        .find(|s| s.as_str() == name)
}

const FINAL: &str = "local function final(s) return s == 'succeeded' or s == 'failed' or \
                     s == 'expired' or s == 'cancelled' end\n";

/// A new call: its idempotency key (when keyed and not taken: else the holder's value), its
/// record, its place among its instance's calls.
/// KEYS: record, key, instance's calls. ARGV: keyed, key value, ttl ms, call id, fields...
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if ARGV[1] == '1' then
           local prior = redis.call('GET', KEYS[2])
           if prior then return prior end
           redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
         end
         redis.call('HSET', KEYS[1], unpack(ARGV, 5))
         redis.call('PEXPIRE', KEYS[1], ARGV[3])
         redis.call('SADD', KEYS[3], ARGV[4])
         return false",
    )
});

/// A state change (queued, sent) with extra fields, unless finished.
/// KEYS: record, changes. ARGV: state, now, call id, fields...
static STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FINAL}
         local s = redis.call('HGET', KEYS[1], 'state')
         if not s or final(s) then return 0 end
         if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
         if s ~= 'running' and s ~= ARGV[1] then
           redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
         end
         redis.call('PUBLISH', KEYS[2], ARGV[3])
         return 1"
    ))
});

/// A progress message, unless finished: counted, and kept as an event when `kept`.
/// KEYS: record, events, changes. ARGV: now, max events, call id, kept, fields...
static PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FINAL}
         local s = redis.call('HGET', KEYS[1], 'state')
         if not s or final(s) then return 0 end
         local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
         redis.call('HSET', KEYS[1], 'state', 'running', 'updated', ARGV[1])
         if ARGV[4] == '1' then
           redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. n, 'at', ARGV[1], unpack(ARGV, 5))
           local ttl = redis.call('PTTL', KEYS[1])
           if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
         else
           redis.call('HINCRBY', KEYS[1], 'nd', 1)
         end
         redis.call('PUBLISH', KEYS[3], ARGV[3])
         return n"
    ))
});

/// The end of a call, unless it had ended: its outcome, its retention, its key's.
/// KEYS: record, events, changes. ARGV: state, now, retention ms, call id, prefix, fields...
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FINAL}
         local s = redis.call('HGET', KEYS[1], 'state')
         if not s or final(s) then return 0 end
         redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2], 'finished', ARGV[2], unpack(ARGV, 6))
         redis.call('HDEL', KEYS[1], 'tpl', 'tct', 'tup')
         redis.call('PEXPIRE', KEYS[1], ARGV[3])
         redis.call('PEXPIRE', KEYS[2], ARGV[3])
         local ik = redis.call('HGET', KEYS[1], 'ik')
         if ik then redis.call('PEXPIRE', ik, ARGV[3]) end
         local gw = redis.call('HGET', KEYS[1], 'gw')
         if gw then redis.call('SREM', ARGV[5] .. 'gw:' .. gw .. ':calls', ARGV[4]) end
         redis.call('PUBLISH', KEYS[3], ARGV[4])
         return 1"
    ))
});

/// Forgets a call: its record, events, and key (if still its own).
/// KEYS: record, events, changes. ARGV: call id, prefix.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local ik = redis.call('HGET', KEYS[1], 'ik')
         if ik then
           local v = redis.call('GET', ik)
           if v and string.sub(v, -#ARGV[1]) == ARGV[1] then redis.call('DEL', ik) end
         end
         local gw = redis.call('HGET', KEYS[1], 'gw')
         if gw then redis.call('SREM', ARGV[2] .. 'gw:' .. gw .. ':calls', ARGV[1]) end
         redis.call('DEL', KEYS[1], KEYS[2])
         redis.call('PUBLISH', KEYS[3], ARGV[1])
         return 1",
    )
});

/// Takes a dead instance's call over: runs on `ARGV[2]` now.
/// KEYS: record. ARGV: call id, new instance, prefix.
static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local gw = redis.call('HGET', KEYS[1], 'gw')
         if not gw then return 0 end
         redis.call('SREM', ARGV[3] .. 'gw:' .. gw .. ':calls', ARGV[1])
         redis.call('HSET', KEYS[1], 'gw', ARGV[2])
         redis.call('SADD', ARGV[3] .. 'gw:' .. ARGV[2] .. ':calls', ARGV[1])
         return 1",
    )
});

/// What a new call found in the store.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Kept: publish it.
    New,
    /// Its `Idempotency-Key` names an earlier call: the fingerprint it was made with, and the
    /// call.
    Keyed { fingerprint: String, call: String },
}

impl Shared {
    /// Connects (within [`STORE_TIMEOUT`]); an error names what failed, for the startup
    /// message.
    pub(crate) async fn connect(
        url: &str,
        instance: String,
        retention: Duration,
        max_events: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(STORE_TIMEOUT))
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            STORE_TIMEOUT * 2,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError(format!("no connection within {:?}", STORE_TIMEOUT * 2)))??;
        let shared = Arc::new(Self {
            client,
            conn,
            instance,
            retention,
            max_events,
            waiters: Mutex::default(),
        });
        // Proves it answers (and that it is Redis) before the gateway serves.
        let _: String = redis::cmd("PING").query_async(&mut shared.conn()).await?;
        Ok(shared)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn idempotency_key(owner: Option<&str>, key: &str) -> String {
        let mut digest = sha2::Sha256::new();
        digest.update(owner.unwrap_or("").as_bytes());
        digest.update([0]);
        digest.update(key.as_bytes());
        format!("{PREFIX}key:{}", hex(&digest.finalize()))
    }

    /// Keeps a new call, or finds the call its idempotency key already names.
    pub(crate) async fn create(
        &self,
        record: &Record,
        key: Option<(&str, &[u8; 32])>,
        template: Option<&Template>,
    ) -> Result<Claim, StoreError> {
        let id = &record.id;
        let ttl = record
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + self.retention
            + Duration::from_secs(60);
        let created = ms(record.created_at);
        let mut fields: Vec<(&'static str, Vec<u8>)> = vec![
            ("device", record.device.clone().into_bytes()),
            ("service", record.service.clone().into_bytes()),
            ("created", created.to_string().into_bytes()),
            ("updated", created.to_string().into_bytes()),
            ("deadline", ms(record.deadline).to_string().into_bytes()),
            (
                "state",
                record.progress().state.as_str().as_bytes().to_vec(),
            ),
            ("gw", self.instance.clone().into_bytes()),
        ];
        if let Some(owner) = &record.owner {
            fields.push(("owner", owner.as_bytes().to_vec()));
        }
        let idem = key.map(|(k, _)| Self::idempotency_key(record.owner.as_deref(), k));
        if let Some(ik) = &idem {
            fields.push(("ik", ik.clone().into_bytes()));
        }
        if let Some(t) = template {
            fields.push(("tpl", t.payload.to_vec()));
            if let Some(ct) = &t.content_type {
                fields.push(("tct", ct.as_bytes().to_vec()));
            }
            let up = serde_json::to_vec(&t.user_properties).unwrap_or_else(|_| b"[]".to_vec());
            fields.push(("tup", up));
        }
        let mut invocation = CREATE.prepare_invoke();
        invocation
            .key(record_key(id))
            .key(idem.as_deref().unwrap_or(PREFIX))
            .key(calls_of(&self.instance))
            .arg(if key.is_some() { "1" } else { "0" })
            .arg(
                key.map(|(_, fp)| format!("{} {id}", hex(fp)))
                    .unwrap_or_default(),
            )
            .arg(millis(ttl))
            .arg(id);
        for (name, value) in fields {
            invocation.arg(name).arg(value);
        }
        let prior: Option<String> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(match prior.as_deref().and_then(|p| p.split_once(' ')) {
            None => Claim::New,
            Some((fingerprint, call)) => Claim::Keyed {
                fingerprint: fingerprint.to_owned(),
                call: call.to_owned(),
            },
        })
    }

    /// The call's request went out (again): its correlation data and response topic, so that
    /// another instance can cancel it.
    pub(crate) async fn sent(
        &self,
        id: &str,
        response_topic: &str,
        correlation: &[u8; 16],
    ) -> Result<(), StoreError> {
        let fields = [
            ("rt", response_topic.as_bytes().to_vec()),
            ("corr", correlation.to_vec()),
        ];
        self.state(id, CallState::Sent, &fields).await
    }

    /// Moves a call that has not finished to `state` (never back from running), with fields.
    pub(crate) async fn state(
        &self,
        id: &str,
        state: CallState,
        fields: &[(&str, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut invocation = STATE.prepare_invoke();
        invocation
            .key(record_key(id))
            .key(channel("changes"))
            .arg(state.as_str())
            .arg(ms(SystemTime::now()))
            .arg(id);
        for (name, value) in fields {
            invocation.arg(*name).arg(value.as_slice());
        }
        let _: i64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// A progress message: kept as the next event, or only counted (`None`: not kept).
    pub(crate) async fn progress(
        &self,
        id: &str,
        message: Option<&Message>,
    ) -> Result<(), StoreError> {
        let mut fields = Vec::new();
        if let Some(m) = message {
            message_fields(m, &mut fields);
        }
        let mut invocation = PROGRESS.prepare_invoke();
        invocation
            .key(record_key(id))
            .key(events_key(id))
            .key(channel("changes"))
            .arg(ms(SystemTime::now()))
            .arg(self.max_events)
            .arg(id)
            .arg(if message.is_some() { "1" } else { "0" });
        for (name, value) in fields {
            invocation.arg(name).arg(value);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// The call ended with this outcome; false when it had ended already (cancelled by
    /// another instance, say).
    pub(crate) async fn finish(
        &self,
        id: &str,
        state: CallState,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        let mut fields: Vec<(&'static str, Vec<u8>)> = Vec::new();
        match outcome {
            Outcome::Reply(m) => {
                fields.push(("ok", b"reply".to_vec()));
                if let Some(status) = m.status {
                    fields.push(("st", status.to_string().into_bytes()));
                }
                message_fields(m, &mut fields);
            }
            Outcome::Problem(p) => {
                fields.push(("ok", b"problem".to_vec()));
                fields.push(("pcode", p.problem.code.as_str().as_bytes().to_vec()));
                fields.push(("pdetail", p.problem.detail.clone().into_bytes()));
                if let Some(retry) = &p.retry_after {
                    fields.push(("pretry", retry.clone().into_bytes()));
                }
            }
        }
        let mut invocation = FINISH.prepare_invoke();
        invocation
            .key(record_key(id))
            .key(events_key(id))
            .key(channel("changes"))
            .arg(state.as_str())
            .arg(ms(SystemTime::now()))
            .arg(millis(self.retention))
            .arg(id)
            .arg(PREFIX);
        for (name, value) in fields {
            invocation.arg(name).arg(value);
        }
        let done: i64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(done == 1)
    }

    /// Forgets a call now (`DELETE`, or one that could not be published).
    pub(crate) async fn forget(&self, id: &str) -> Result<(), StoreError> {
        let _: i64 = FORGET
            .key(record_key(id))
            .key(events_key(id))
            .key(channel("changes"))
            .arg(id)
            .arg(PREFIX)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Asks whichever instance runs the call to cancel it; true if some instance heard.
    pub(crate) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let heard: i64 = redis::cmd("PUBLISH")
            .arg(channel("cancel"))
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(heard > 0)
    }

    /// The call as the store has it, with the progress events asked for; None when it is not
    /// kept (never made, forgotten, or its retention is over).
    pub(crate) async fn snapshot(
        &self,
        id: &str,
        events: Events,
    ) -> Result<Option<(Arc<Record>, Remote)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(record_key(id));
        match events {
            Events::Latest => pipe
                .cmd("XREVRANGE")
                .arg(events_key(id))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
            Events::After(after, count) => pipe
                .cmd("XRANGE")
                .arg(events_key(id))
                .arg(format!("(0-{after}"))
                .arg("+")
                .arg("COUNT")
                .arg(count),
        };
        let (fields, entries): (Fields, Vec<(String, Fields)>) =
            pipe.query_async(&mut self.conn()).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut events: VecDeque<ProgressEvent> = entries
            .into_iter()
            .filter_map(|(entry, f)| {
                let id = entry.strip_prefix("0-")?.parse().ok()?;
                Some(ProgressEvent {
                    id,
                    at: time(number(&f, "at").unwrap_or(0)),
                    message: Arc::new(message_of(&f, None)),
                })
            })
            .collect();
        events.make_contiguous().sort_by_key(|e| e.id);
        Ok(Some(self.record_of(id, &fields, events)))
    }

    fn record_of(
        &self,
        id: &str,
        f: &Fields,
        events: VecDeque<ProgressEvent>,
    ) -> (Arc<Record>, Remote) {
        let state = text(f, "state")
            .as_deref()
            .and_then(state_of)
            .unwrap_or(CallState::Failed);
        let outcome = match text(f, "ok").as_deref() {
            Some("reply") => {
                let status = number(f, "st").and_then(|s| u16::try_from(s).ok());
                Some(Arc::new(Outcome::Reply(message_of(f, status))))
            }
            Some("problem") => StoredProblem::from_parts(
                &text(f, "pcode").unwrap_or_default(),
                text(f, "pdetail").unwrap_or_default(),
                text(f, "pretry"),
            )
            .map(|p| Arc::new(Outcome::Problem(p))),
            _ => None,
        };
        let sent = match (text(f, "rt"), f.get("corr")) {
            (Some(rt), Some(corr)) => Some((rt, corr.clone())),
            _ => None,
        };
        let template = f.get("tpl").and_then(|payload| {
            Some(Template {
                device: mqtt_rpc::DeviceId::parse(text(f, "device")?).ok()?,
                service: mqtt_rpc::ServiceName::parse(text(f, "service")?).ok()?,
                payload: Bytes::from(payload.clone()),
                content_type: text(f, "tct"),
                user_properties: f
                    .get("tup")
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or_default(),
            })
        });
        let record = Record {
            id: id.to_owned(),
            key: None,
            owner: text(f, "owner").map(Arc::from),
            device: text(f, "device").unwrap_or_default(),
            service: text(f, "service").unwrap_or_default(),
            created_at: time(number(f, "created").unwrap_or(0)),
            deadline: time(number(f, "deadline").unwrap_or(0)),
            progress: Mutex::new(Progress {
                state,
                updated_at: time(number(f, "updated").unwrap_or(0)),
                finished_at: number(f, "finished").map(time),
                events,
                progress_count: number(f, "n").unwrap_or(0),
                progress_dropped: number(f, "nd").unwrap_or(0),
                outcome,
            }),
            changed: watch::Sender::new(0),
            cancel: Mutex::new(None),
            remote: true,
            _held: None,
        };
        let remote = Remote { sent, template };
        (Arc::new(record), remote)
    }

    /// Something to await for the next change of a call's record (a permit is kept, so a
    /// change between a read and the wait is not missed).
    pub(crate) fn watch(&self, id: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let list = waiters.entry(id.to_owned()).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&notify));
        notify
    }

    fn wake(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|w| match w.upgrade() {
                Some(n) => {
                    n.notify_one();
                    true
                }
                None => false,
            });
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    fn wake_all(&self) {
        let ids: Vec<String> = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.wake(&id);
        }
    }

    /// Follows the `changes` and `cancel` channels until the store is dropped, reconnecting
    /// when the connection drops (and waking every local reader then, since a change may have
    /// been missed).
    pub(crate) async fn listen(shared: Weak<Self>, cancel: impl Fn(&str)) {
        loop {
            let Some(this) = shared.upgrade() else { return };
            let client = this.client.clone();
            drop(this);
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel("changes")).await?;
                pubsub.subscribe(channel("cancel")).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(STORE_TIMEOUT, subscribed).await {
                Ok(Ok(mut pubsub)) => {
                    if let Some(this) = shared.upgrade() {
                        this.wake_all();
                    }
                    let cancel_channel = channel("cancel");
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Ok(id) = message.get_payload::<String>() else {
                            continue;
                        };
                        if message.get_channel_name() == cancel_channel {
                            cancel(&id);
                        } else if let Some(this) = shared.upgrade() {
                            this.wake(&id);
                        } else {
                            return;
                        }
                    }
                    tracing::warn!("lost the call store's change channel; reconnecting");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot follow the call store's changes; retrying")
                }
                Err(_) => {
                    tracing::warn!("cannot follow the call store's changes: no answer; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Says this instance is alive, with where its calls' replies go.
    pub(crate) async fn heartbeat(
        &self,
        client_id: &str,
        response_topic: &str,
    ) -> Result<(), StoreError> {
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(key("alive", &self.instance))
            .arg(1)
            .arg("PX")
            .arg(millis(ALIVE_TTL))
            .ignore()
            .cmd("HSET")
            .arg(channel("gateways"))
            .arg(&self.instance)
            .arg(format!("{client_id}\n{response_topic}"))
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Instances that stopped saying they are alive, and that nobody has taken over yet,
    /// claimed for this one: (name, their calls' client id, response topic).
    pub(crate) async fn claim_dead(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut conn = self.conn();
        let gateways: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(channel("gateways"))
            .query_async(&mut conn)
            .await?;
        let mut claimed = Vec::new();
        for (name, session) in gateways {
            if name == self.instance {
                continue;
            }
            let alive: bool = redis::cmd("EXISTS")
                .arg(key("alive", &name))
                .query_async(&mut conn)
                .await?;
            if alive {
                continue;
            }
            // Held for as long as taking over may take; released when done.
            let taken: Option<String> = redis::cmd("SET")
                .arg(key("adopt", &name))
                .arg(&self.instance)
                .arg("NX")
                .arg("PX")
                .arg(millis(Duration::from_secs(7 * 24 * 3600)))
                .query_async(&mut conn)
                .await?;
            if taken.is_none() {
                continue;
            }
            let Some((client_id, response_topic)) = session.split_once('\n') else {
                continue;
            };
            claimed.push((name, client_id.to_owned(), response_topic.to_owned()));
        }
        Ok(claimed)
    }

    /// The calls of an instance that have not finished.
    pub(crate) async fn calls_of(&self, instance: &str) -> Result<Vec<String>, StoreError> {
        Ok(redis::cmd("SMEMBERS")
            .arg(calls_of(instance))
            .query_async(&mut self.conn())
            .await?)
    }

    /// This instance runs the call now.
    pub(crate) async fn take_over(&self, id: &str) -> Result<(), StoreError> {
        let _: i64 = TAKE_OVER
            .key(record_key(id))
            .arg(id)
            .arg(&self.instance)
            .arg(PREFIX)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// A dead instance whose calls were all taken over: forgotten.
    pub(crate) async fn forget_instance(&self, instance: &str) -> Result<(), StoreError> {
        let _: () = redis::pipe()
            .cmd("HDEL")
            .arg(channel("gateways"))
            .arg(instance)
            .ignore()
            .cmd("DEL")
            .arg(calls_of(instance))
            .arg(key("adopt", instance))
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
