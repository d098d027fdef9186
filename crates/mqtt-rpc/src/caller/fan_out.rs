//! Many devices in one call: a **fan-out** sends the same service request (or one payload per
//! device) to a list of devices under one deadline and hands back each device's outcome as it
//! arrives; a **group call** publishes one request to a group topic, which the broker copies
//! to every member, and gathers the replies until the deadline, a stall or a count.
//!
//! A fan-out is plain calls underneath: each device gets an ordinary request with its own
//! Correlation Data, parked like any other call (so each is cancelled on its device when the
//! fan-out is dropped), and nothing new is asked of the devices. What the fan-out adds is the
//! timing: its publishes are paced by a [`Pacer`] shared between fan-outs, a device that is
//! slow or gone holds only its own place, and the deadline is one for all (a request sent
//! later gets what is left of it, as its Message Expiry too).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pending::Message;
use super::{Call, CallError, Caller, Parked, Received};
use crate::topic::{DeviceId, GroupName, ServiceName};

/// How long a fan-out waits before asking again for a place among the calls in flight, when
/// the caller has none free ([`CallError::Overloaded`]).
const RETRY_FULL: Duration = Duration::from_millis(5);

/// Paces requests: at most `per_second` a second, in bursts of at most `burst`. One pacer
/// shared by every fan-out of a caller keeps them together within the rate, so a fan-out to
/// thousands of devices neither floods the broker nor fills the request channel that ordinary
/// calls use. Requests go a chunk at a time (5 ms' worth), so paced requests are still written
/// to the broker a batch at a time: one at a time costs a write and a wake-up each, about
/// twice the CPU per request (measured, BENCHMARKS.md).
///
/// A token bucket on tokio's timer, written here rather than taken from `governor` (the
/// gateway's rate limiter): a device author's build of this crate must not grow by a rate
/// limiter's tree for a feature only callers use (`.ci/run` checks the tree), and the bucket
/// is a dozen lines.
pub struct Pacer {
    per_second: f64,
    burst: f64,
    chunk: u32,
    /// Tokens now, and when they were counted.
    bucket: std::sync::Mutex<(f64, Instant)>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("per_second", &self.per_second)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl Pacer {
    /// A pacer of `per_second` requests a second, `burst` at once (it starts full).
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Arc<Self> {
        // 5 ms' worth, within the burst.
        let chunk = (per_second.get() / 200).clamp(1, burst.get());
        Arc::new(Self {
            per_second: f64::from(per_second.get()),
            burst: f64::from(burst.get()),
            chunk,
            bucket: std::sync::Mutex::new((f64::from(burst.get()), Instant::now())),
        })
    }

    /// Waits until the next requests may go, and says how many (a chunk).
    async fn wait(&self) -> u32 {
        loop {
            let short = {
                // Every critical section leaves the bucket whole: a poisoned lock is usable.
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let (tokens, at) = *bucket;
                let tokens = (tokens + (now - at).as_secs_f64() * self.per_second).min(self.burst);
                let chunk = f64::from(self.chunk);
                if tokens >= chunk {
                    *bucket = (tokens - chunk, now);
                    return self.chunk;
                }
                *bucket = (tokens, now);
                chunk - tokens
            };
            tokio::time::sleep(Duration::from_secs_f64(short / self.per_second)).await;
        }
    }
}

/// One device of a fan-out, with its own payload if it has one.
#[derive(Debug, Clone)]
pub struct Target {
    /// The device.
    pub device: DeviceId,
    /// Its payload, in place of the fan-out's.
    pub payload: Option<Bytes>,
}

impl From<DeviceId> for Target {
    fn from(device: DeviceId) -> Self {
        Self {
            device,
            payload: None,
        }
    }
}

/// One service request to many devices: what [`Caller::fan_out`] runs.
#[derive(Debug)]
pub struct FanOut {
    /// The service every target is called on.
    pub service: ServiceName,
    /// The devices, in the order their requests are published.
    pub targets: Vec<Target>,
    /// The payload of every target without its own.
    pub payload: Bytes,
    /// Sent as every request's Content Type.
    pub content_type: Option<String>,
    /// Sent as every request's user properties.
    pub user_properties: Vec<(String, String)>,
    /// The one deadline, from [`Caller::fan_out`]: a target whose request could not be sent
    /// by then times out unsent.
    pub timeout: Duration,
    /// Paces the publishes; None publishes as fast as the caller takes them.
    pub pacer: Option<Arc<Pacer>>,
}

impl FanOut {
    /// A fan-out of one payload to these devices, a 10 s deadline, no pacing.
    pub fn new(
        service: ServiceName,
        targets: impl IntoIterator<Item = impl Into<Target>>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            service,
            targets: targets.into_iter().map(Into::into).collect(),
            payload: payload.into(),
            content_type: None,
            user_properties: Vec::new(),
            timeout: Call::DEFAULT_TIMEOUT,
            pacer: None,
        }
    }

    /// The deadline, from the start.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the Content Type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a user property.
    pub fn with_user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.user_properties.push((key.into(), value.into()));
        self
    }

    /// Paces the publishes.
    pub fn with_pacer(mut self, pacer: Arc<Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }
}

/// One target's outcome.
#[derive(Debug)]
pub struct Answer {
    /// Its place in [`FanOut::targets`].
    pub index: usize,
    /// The device.
    pub device: DeviceId,
    /// Its reply, or why there is none.
    pub result: Result<Received, CallError>,
    /// Its request was published (false: refused before, or the deadline came first).
    pub sent: bool,
}

/// A fan-out under way: await [`FanOutRun::next`] for each target's outcome, in the order they
/// arrive; every target gets exactly one. Dropping it stops the fan-out: nothing more is
/// published, and every call still waiting is cancelled on its device.
#[derive(Debug)]
pub struct FanOutRun {
    answers: mpsc::UnboundedReceiver<Answer>,
    task: tokio::task::JoinHandle<()>,
    deadline: Instant,
    left: usize,
}

impl FanOutRun {
    /// The next target's outcome; None once every target has one.
    pub async fn next(&mut self) -> Option<Answer> {
        if self.left == 0 {
            return None;
        }
        let answer = self.answers.recv().await?;
        self.left -= 1;
        Some(answer)
    }

    /// How many targets have no outcome yet.
    pub fn left(&self) -> usize {
        self.left
    }

    /// When the fan-out's deadline ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Drop for FanOutRun {
    fn drop(&mut self) {
        // Drops the calls still parked, which cancels each on its device.
        self.task.abort();
    }
}

impl Caller {
    /// Starts a fan-out: one request per target, published in order (paced by
    /// [`FanOut::pacer`]), each parked like a call of its own, all under one deadline.
    /// A target waits for a place among the calls in flight rather than failing when the
    /// caller has none free; it fails at once only for what no wait can mend (not connected,
    /// shutting down, a packet too large).
    pub fn fan_out(&self, fan_out: FanOut) -> FanOutRun {
        let deadline = Instant::now() + fan_out.timeout;
        let left = fan_out.targets.len();
        let (tx, answers) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(self.clone(), fan_out, deadline, tx));
        FanOutRun {
            answers,
            task,
            deadline,
            left,
        }
    }
}

async fn run(
    caller: Caller,
    fan_out: FanOut,
    deadline: Instant,
    tx: mpsc::UnboundedSender<Answer>,
) {
    let FanOut {
        service,
        targets,
        payload,
        content_type,
        user_properties,
        timeout,
        pacer,
    } = fan_out;
    let mut queue: VecDeque<(usize, Target)> = targets.into_iter().enumerate().collect();
    let mut waiting = FuturesUnordered::new();
    let unsent = |index: usize, device: DeviceId, error: CallError| Answer {
        index,
        device,
        result: Err(error),
        sent: false,
    };
    // Publishes the pacer has let through and not yet used; when the caller was full, none
    // before `retry_at`.
    let mut retry_at: Option<Instant> = None;
    let mut credit: u32 = 0;
    while !(queue.is_empty() && waiting.is_empty()) {
        let sending = !queue.is_empty();
        tokio::select! {
            biased;
            Some(answer) = waiting.next(), if !waiting.is_empty() => {
                let _ = tx.send(answer);
            }
            () = tokio::time::sleep_until(deadline), if sending => {
                for (index, target) in queue.drain(..) {
                    let _ = tx.send(unsent(index, target.device, CallError::Timeout(timeout)));
                }
            }
            granted = ready(pacer.as_deref(), retry_at, credit), if sending => {
                credit = granted;
                retry_at = None;
                let slot = match caller.reserve() {
                    Ok(slot) => slot,
                    Err(CallError::Overloaded) => {
                        retry_at = Some(Instant::now() + RETRY_FULL);
                        continue;
                    }
                    Err(error) => {
                        if let Some((index, target)) = queue.pop_front() {
                            let _ = tx.send(unsent(index, target.device, error));
                        }
                        credit -= 1;
                        continue;
                    }
                };
                let Some((index, target)) = queue.pop_front() else { continue };
                let left = deadline.saturating_duration_since(Instant::now());
                let call = Call {
                    device: target.device.clone(),
                    service: service.clone(),
                    payload: target.payload.clone().unwrap_or_else(|| payload.clone()),
                    content_type: content_type.clone(),
                    user_properties: user_properties.clone(),
                    timeout: left.max(Duration::from_millis(1)),
                    held: None,
                };
                match caller.send(slot, call) {
                    Ok(parked) => {
                        credit -= 1;
                        waiting.push(wait(index, target.device, parked));
                    }
                    Err(CallError::Overloaded) => {
                        // The request channel is full: this target goes again, shortly.
                        queue.push_front((index, target));
                        retry_at = Some(Instant::now() + RETRY_FULL);
                    }
                    Err(error) => {
                        credit -= 1;
                        let _ = tx.send(unsent(index, target.device, error));
                    }
                }
            }
        }
    }
}

/// Ready to try the next publish, with how many may go: after the retry delay, if the caller
/// was full; then the credit left, or what the pacer grants next (as many as are left
/// without one).
async fn ready(pacer: Option<&Pacer>, retry_at: Option<Instant>, credit: u32) -> u32 {
    if let Some(at) = retry_at {
        tokio::time::sleep_until(at).await;
    }
    match pacer {
        _ if credit > 0 => credit,
        Some(pacer) => pacer.wait().await,
        None => u32::MAX,
    }
}

async fn wait(index: usize, device: DeviceId, parked: Parked) -> Answer {
    let result = parked.reply().await;
    Answer {
        index,
        device,
        result,
        sent: true,
    }
}

/// One request to every member of a group: what [`Caller::send_group`] publishes to
/// `groups/{group}/{service}`. The caller cannot know how many members there are, so the call
/// ends at the deadline, after a stall (no reply for `stall` since the last one), or after
/// `max_replies` replies, whichever comes first.
#[derive(Debug)]
pub struct GroupCall {
    /// The group.
    pub group: GroupName,
    /// The service.
    pub service: ServiceName,
    /// The request body, published unchanged.
    pub payload: Bytes,
    /// Sent as the Content Type property.
    pub content_type: Option<String>,
    /// Sent as user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// The deadline; also the request's Message Expiry.
    pub timeout: Duration,
    /// End when no reply came for this long after the last one (not before the first).
    pub stall: Option<Duration>,
    /// End after this many replies.
    pub max_replies: Option<usize>,
}

impl GroupCall {
    /// A group call with a 10 s deadline, no stall timer, no maximum.
    pub fn new(group: GroupName, service: ServiceName, payload: impl Into<Bytes>) -> Self {
        Self {
            group,
            service,
            payload: payload.into(),
            content_type: None,
            user_properties: Vec::new(),
            timeout: Call::DEFAULT_TIMEOUT,
            stall: None,
            max_replies: None,
        }
    }
}

/// What a group call receives next.
#[derive(Debug)]
pub enum GroupUpdate {
    /// A member's reply (its device id, when it said, in
    /// [`crate::protocol::DEVICE_PROPERTY`]).
    Reply(Received),
    /// A member replied, but its reply could not be taken (the budget was full, or its status
    /// property is invalid).
    Skipped(CallError),
    /// The end.
    Done(GroupEnd),
}

/// Why a group call ended.
#[derive(Debug, Clone)]
pub enum GroupEnd {
    /// Its deadline passed.
    Deadline,
    /// No reply for the stall time since the last one.
    Stalled,
    /// The most replies asked for came.
    MaxReplies,
    /// The broker refused the request (0x10: the group has no members), or the connection
    /// was lost.
    Failed(CallError),
}

/// A group call under way ([`Caller::send_group`]).
pub struct GroupRun {
    parked: Option<Parked>,
    deadline: Instant,
    stall: Option<Duration>,
    stall_at: Option<Instant>,
    max_replies: Option<usize>,
    replies: usize,
}

impl std::fmt::Debug for GroupRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupRun")
            .field("replies", &self.replies)
            .finish_non_exhaustive()
    }
}

impl GroupRun {
    pub(super) fn new(parked: Parked, stall: Option<Duration>, max_replies: Option<usize>) -> Self {
        Self {
            deadline: Instant::now() + parked.timeout,
            parked: Some(parked),
            stall,
            stall_at: None,
            max_replies,
            replies: 0,
        }
    }

    /// The next reply, or the end; None after the end.
    pub async fn next(&mut self) -> Option<GroupUpdate> {
        let parked = self.parked.as_mut()?;
        if self.max_replies.is_some_and(|max| self.replies >= max) {
            return Some(self.end(GroupEnd::MaxReplies));
        }
        let until = self
            .stall_at
            .map_or(self.deadline, |s| s.min(self.deadline));
        // Ok(Ok): a reply; Ok(Err): the end; Err: a timer.
        let message = loop {
            match tokio::time::timeout_at(until, parked.parked.next()).await {
                Ok(Message::Answer(outcome)) => break Ok(Ok(outcome)),
                Ok(Message::Outcome(outcome)) => break Ok(Err(outcome)),
                // A group call is handed no progress (see `ParkedCalls::progress`).
                Ok(Message::Progress(_)) => continue,
                Err(elapsed) => break Err(elapsed),
            }
        };
        let update = match message {
            Ok(Ok(outcome)) => {
                self.replies += 1;
                self.stall_at = self.stall.map(|stall| Instant::now() + stall);
                match parked.caller.result(outcome) {
                    Ok(received) => GroupUpdate::Reply(received),
                    Err(error) => GroupUpdate::Skipped(error),
                }
            }
            Ok(Err(outcome)) => {
                let error = match parked.caller.result(outcome) {
                    Err(error) => error,
                    Ok(_) => CallError::ConnectionLost,
                };
                self.end(GroupEnd::Failed(error))
            }
            Err(_) if until < self.deadline => self.end(GroupEnd::Stalled),
            Err(_) => self.end(GroupEnd::Deadline),
        };
        Some(update)
    }

    /// How many replies came.
    pub fn replies(&self) -> usize {
        self.replies
    }

    fn end(&mut self, end: GroupEnd) -> GroupUpdate {
        self.parked = None;
        GroupUpdate::Done(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pacer_lets_its_burst_through_then_keeps_its_rate() {
        let pacer = Pacer::new(1_000.try_into().unwrap(), 100.try_into().unwrap());
        let started = Instant::now();
        let mut granted = 0;
        while granted < 100 {
            granted += pacer.wait().await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(1),
            "the burst at once"
        );
        while granted < 1_100 {
            granted += pacer.wait().await;
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1_010),
            "1,000 more at 1,000 a second: {took:?}"
        );
        assert_eq!(pacer.chunk, 5, "5 ms' worth at a time");
    }
}
