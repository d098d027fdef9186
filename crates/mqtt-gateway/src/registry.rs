//! The registry: devices and their services, learned from their announcements
//! (`docs/PROTOCOL.md`, section 11), kept live from the caller's one presence subscription.
//!
//! One task ([`run`]) reads the caller's presence feed, parses and checks each message, compiles
//! the request schemas it carries, and only then swaps the device's entry in whole: an entry is
//! never half-written, and nothing on the call path parses JSON or compiles a schema. The call
//! path asks [`Registry::check`] (one read lock, one map lookup) whether to answer at once:
//! offline, service not offered, or a body that does not match the service's request schema.
//! A device that never announced is not in the registry, and its calls go out as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use mqtt_rpc::presence::{
    Announcement, AnnouncementLimits, PresenceEvent, PresenceFeed, PresenceMessage, ServiceInfo,
};
use tracing::{debug, info, warn};

use crate::http::SchemaViolation;

/// How many devices' rejected announcements are logged (once each); past it they are only
/// counted, so a flood of bad announcements under new ids cannot grow this set without bound.
const MAX_LOGGED_REJECTIONS: usize = 10_000;

/// The most schema errors one 422 lists.
pub(crate) const MAX_SCHEMA_ERRORS: usize = 10;

/// What the registry holds about one device.
#[derive(Debug)]
pub(crate) struct Device {
    /// Online (its last word was a birth) or offline (a death of its current connection).
    pub(crate) online: bool,
    /// When this gateway saw it come online or go offline.
    pub(crate) since: SystemTime,
    /// When this gateway last heard from it.
    pub(crate) last_seen: SystemTime,
    /// What it said last, but its services (`services` is always None here: they are in
    /// [`Device::service_set`], shared).
    pub(crate) announcement: Announcement,
    /// Its services and their compiled request schemas (a death that lists none keeps the
    /// birth's); None for a device whose only word was a bare death.
    service_set: Option<Arc<ServiceSet>>,
    /// The presence subscription this was learned on (see [`Registry::subscribed`]).
    generation: u64,
    /// What it counts for in the registry's byte limit.
    weight: usize,
}

/// A set of services with their request schemas compiled, shared by every device that
/// announces the same set (a fleet of one model announces one set thousands of times: it is
/// parsed each time, but compiled and held once).
#[derive(Debug)]
pub(crate) struct ServiceSet {
    services: std::collections::BTreeMap<String, ServiceInfo>,
    validators: HashMap<String, Arc<jsonschema::Validator>>,
}

impl Device {
    /// The services it offers, by name (none known for a device whose only word was a bare
    /// death).
    pub(crate) fn services(&self) -> impl Iterator<Item = (&String, &ServiceInfo)> {
        self.service_set.iter().flat_map(|set| set.services.iter())
    }

    /// Whether it lists this service.
    pub(crate) fn offers(&self, service: &str) -> bool {
        self.service_set
            .as_ref()
            .is_some_and(|set| set.services.contains_key(service))
    }
}

/// What a call to a device should do, by what the registry knows.
pub(crate) enum Check {
    /// Publish it: the device never announced, or it offers the service with no request schema.
    Send,
    /// Publish it once its body matches this schema.
    Validate(Arc<jsonschema::Validator>),
    /// Answer 404 `device-offline` at once.
    Offline { since: SystemTime },
    /// Answer 404 `unknown-service` at once; the names it does offer (cut to a few).
    UnknownService { offered: Vec<String> },
    /// Answer 404 `unknown-device` at once: it never announced, and announcements are required.
    NotAnnounced,
}

/// Counters `/metrics` shows.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// Deaths of an earlier connection (a late Will), ignored.
    pub(crate) stale: AtomicU64,
}

/// What a registry takes and holds.
#[derive(Debug, Clone)]
pub(crate) struct RegistryOptions {
    /// Bounds on one announcement.
    pub(crate) announcement: AnnouncementLimits,
    /// The most devices held (`--max-devices`).
    pub(crate) max_devices: usize,
    /// The most bytes of announcements held, each device counted with the size of its last
    /// announcement and [`DEVICE_OVERHEAD`] more (`--max-registry-bytes`).
    pub(crate) max_bytes: usize,
    /// The discovery window the caller asks for.
    pub(crate) discovery_window: Duration,
    /// Calls to devices that never announced are refused (`--require-announcement`).
    pub(crate) require_announcement: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            announcement: AnnouncementLimits::default(),
            max_devices: 100_000,
            max_bytes: 256 * 1024 * 1024,
            discovery_window: Duration::from_secs(5),
            require_announcement: false,
        }
    }
}

/// What a device costs beyond its announcement's bytes, in the registry's byte count: its
/// entry, its id twice, the map's node (about what the benchmark measures per device).
pub(crate) const DEVICE_OVERHEAD: usize = 512;

/// The devices this gateway has heard announce.
#[derive(Debug)]
pub(crate) struct Registry {
    devices: RwLock<BTreeMap<String, Arc<Device>>>,
    limits: AnnouncementLimits,
    max_devices: usize,
    max_bytes: usize,
    /// The bytes the entries count for (changed under the devices' write lock).
    bytes: std::sync::atomic::AtomicUsize,
    pub(crate) counters: Counters,
    logged: Mutex<HashSet<String>>,
    /// How long after a new presence subscription what was learned on an earlier one is not
    /// trusted for an answer at once: the discovery window, and a second.
    settle: Duration,
    /// The current presence subscription, and until when entries from earlier ones are
    /// not trusted.
    epoch: Mutex<(u64, Option<Instant>)>,
    /// Service sets by their JSON, so devices announcing the same one share it.
    sets: Mutex<HashMap<String, std::sync::Weak<ServiceSet>>>,
    /// Calls to devices that never announced are refused (`--require-announcement`).
    require_announcement: bool,
    /// Who waits for a device to come online (queued calls), by device id.
    waiters: Mutex<HashMap<String, Vec<tokio::sync::oneshot::Sender<()>>>>,
}

/// A page of devices, in id order.
pub(crate) struct Page {
    pub(crate) devices: Vec<(String, Arc<Device>)>,
    /// The last id of this page when more may follow.
    pub(crate) next: Option<String>,
}

impl Registry {
    pub(crate) fn new(options: RegistryOptions) -> Arc<Self> {
        Arc::new(Self {
            devices: RwLock::new(BTreeMap::new()),
            limits: options.announcement,
            max_devices: options.max_devices,
            max_bytes: options.max_bytes,
            bytes: std::sync::atomic::AtomicUsize::new(0),
            counters: Counters::default(),
            logged: Mutex::new(HashSet::new()),
            settle: options.discovery_window + Duration::from_secs(1),
            epoch: Mutex::new((0, None)),
            sets: Mutex::new(HashMap::new()),
            require_announcement: options.require_announcement,
            waiters: Mutex::new(HashMap::new()),
        })
    }

    /// Fires when the device announces itself online (at once if it is). Under the waiters'
    /// lock, which [`Registry::apply`] takes after writing an entry, so no birth is missed.
    pub(crate) fn wait_online(&self, id: &str) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if self.read().get(id).is_some_and(|d| d.online) {
            let _ = tx.send(());
            return rx;
        }
        let list = waiters.entry(id.to_owned()).or_default();
        // Waits given up (their calls expired or were cancelled) go, so the list stays as
        // long as the calls still waiting.
        list.retain(|tx| !tx.is_closed());
        list.push(tx);
        rx
    }

    fn wake(&self, id: &str) {
        let woken = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        for tx in woken.into_iter().flatten() {
            let _ = tx.send(());
        }
    }

    /// The bytes the entries count for now (see [`RegistryOptions::max_bytes`]).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the announcements of the current presence subscription may still be arriving
    /// (or there is none yet).
    fn settling(&self) -> bool {
        match self.epoch() {
            (0, _) => true,
            (_, until) => until.is_some_and(|t| Instant::now() < t),
        }
    }

    fn epoch(&self) -> (u64, Option<Instant>) {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new presence subscription (after a reconnect without a session): what the registry
    /// knew may have changed while the gateway was away, and a broker may not hand back every
    /// retained announcement (rumqttd: about 100). Until the discovery window has passed, an
    /// entry not refreshed on this subscription is not used for an answer at once: its calls
    /// are published as for a device that never announced.
    pub(crate) fn subscribed(&self) {
        let mut epoch = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        *epoch = (epoch.0 + 1, Some(Instant::now() + self.settle));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Device>>> {
        // Every write swaps whole entries: a poisoned lock still holds whole entries.
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Device>>> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// What a call to `service` of `device` should do.
    pub(crate) fn check(&self, device: &str, service: &str) -> Check {
        let devices = self.read();
        let Some(entry) = devices.get(device) else {
            if self.require_announcement && !self.settling() {
                return Check::NotAnnounced;
            }
            return Check::Send;
        };
        let (generation, settling_until) = self.epoch();
        if entry.generation < generation && settling_until.is_some_and(|t| Instant::now() < t) {
            // Learned before the current subscription, and not confirmed since: maybe stale.
            return Check::Send;
        }
        if !entry.online {
            return Check::Offline { since: entry.since };
        }
        let Some(set) = &entry.service_set else {
            return Check::Send;
        };
        if let Some(validator) = set.validators.get(service) {
            return Check::Validate(validator.clone());
        }
        if entry.announcement.other_services || set.services.contains_key(service) {
            return Check::Send;
        }
        Check::UnknownService {
            offered: set.services.keys().take(20).cloned().collect(),
        }
    }

    /// One device, if it announced.
    pub(crate) fn device(&self, id: &str) -> Option<Arc<Device>> {
        self.read().get(id).cloned()
    }

    /// Up to `limit` devices after `after` (exclusive) that `admits` takes.
    pub(crate) fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        admits: impl Fn(&str, &Device) -> bool,
    ) -> Page {
        let devices = self.read();
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut page: Vec<(String, Arc<Device>)> = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        for (id, device) in devices.range::<str, _>((start, Bound::Unbounded)) {
            if !admits(id, device) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push((id.clone(), device.clone()));
        }
        let next = more
            .then(|| page.last().map(|(id, _)| id.clone()))
            .flatten();
        Page {
            devices: page,
            next,
        }
    }

    /// Devices known, and how many of them are online.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let devices = self.read();
        let online = devices.values().filter(|d| d.online).count();
        (devices.len(), online)
    }

    /// Takes one presence message into the registry, or says why not.
    pub(crate) fn apply(&self, message: &PresenceMessage) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let id = message.device.as_str();
        if message.payload.is_empty() {
            // The retained announcement was cleared: the device is forgotten.
            let removed = self.write().remove(id).inspect(|gone| {
                self.bytes.fetch_sub(gone.weight, Ordering::Relaxed);
            });
            if removed.is_some() {
                info!(device = %id, "device forgotten: its retained announcement was cleared");
            }
            return;
        }
        let mut announcement =
            match Announcement::parse(&message.device, &message.payload, self.limits) {
                Ok(a) => a,
                Err(e) => return self.reject(id, &e.to_string()),
            };
        let service_set = match announcement.services.take() {
            None => None,
            Some(services) => match self.service_set(services) {
                Ok(set) => Some(set),
                Err(why) => return self.reject(id, &why),
            },
        };
        let now = SystemTime::now();
        let generation = self.epoch().0;
        let weight = message.payload.len() + DEVICE_OVERHEAD;
        let mut devices = self.write();
        let previous = devices.get(id).cloned();
        if previous.is_none() && devices.len() >= self.max_devices {
            drop(devices);
            return self.reject(
                id,
                &format!(
                    "the registry holds {} devices, as many as it may (--max-devices)",
                    self.max_devices
                ),
            );
        }
        let held = self.bytes() - previous.as_ref().map_or(0, |p| p.weight);
        if held + weight > self.max_bytes {
            drop(devices);
            return self.reject(
                id,
                &format!(
                    "the registry holds {held} bytes of announcements, and this one would take \
                     it past {} (--max-registry-bytes)",
                    self.max_bytes
                ),
            );
        }
        let online = announcement.online;
        // What the new entry holds: the announcement, its services, its weight; a bare death
        // keeps what the birth said (and what the birth brought is still held).
        let (announcement, service_set, weight, since) = match (previous, online) {
            (previous, true) => {
                let since = match &previous {
                    Some(p) if p.online && p.announcement.seq == announcement.seq => p.since,
                    _ => now,
                };
                if previous.as_ref().is_none_or(|p| !p.online) {
                    debug!(device = %id, seq = announcement.seq, retained = message.retained, "device online");
                }
                (announcement, service_set, weight, since)
            }
            (Some(p), false) if p.announcement.seq != announcement.seq => {
                // The Will of an earlier connection, delivered after the current one's birth.
                self.counters.stale.fetch_add(1, Ordering::Relaxed);
                debug!(
                    device = %id,
                    stale_seq = announcement.seq,
                    seq = p.announcement.seq,
                    "ignoring the death of an earlier connection"
                );
                return;
            }
            (previous, false) => {
                debug!(device = %id, seq = announcement.seq, "device offline");
                let since = match &previous {
                    Some(p) if !p.online => p.since,
                    _ => now,
                };
                match previous {
                    Some(p) if service_set.is_none() => (
                        Announcement {
                            online: false,
                            ..p.announcement.clone()
                        },
                        p.service_set.clone(),
                        p.weight.max(weight),
                        since,
                    ),
                    _ => (announcement, service_set, weight, since),
                }
            }
        };
        let entry = Device {
            online,
            since,
            last_seen: now,
            announcement,
            service_set,
            generation,
            weight,
        };
        let added = entry.weight;
        if let Some(replaced) = devices.insert(id.to_owned(), Arc::new(entry)) {
            self.bytes.fetch_sub(replaced.weight, Ordering::Relaxed);
        }
        self.bytes.fetch_add(added, Ordering::Relaxed);
        drop(devices);
        if online {
            self.wake(id);
        }
    }

    fn reject(&self, id: &str, why: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() < MAX_LOGGED_REJECTIONS && logged.insert(id.to_owned()) {
            warn!(
                device = %id,
                "announcement ignored (logged once per device): {}",
                crate::logging::bounded(why)
            );
        }
    }
}

impl Registry {
    /// The shared set for these services: the one another device announced, or a new one
    /// with its schemas compiled. Sets no device holds any more are swept as the map grows.
    fn service_set(
        &self,
        services: std::collections::BTreeMap<String, ServiceInfo>,
    ) -> Result<Arc<ServiceSet>, String> {
        // serde_json's maps are sorted, so one set has one JSON text.
        let key = serde_json::to_string(&services).unwrap_or_default();
        if let Some(set) = self
            .lock_sets()
            .get(&key)
            .and_then(std::sync::Weak::upgrade)
        {
            return Ok(set);
        }
        // Compiled outside the lock; two devices announcing a new set at once compile it twice.
        let set = Arc::new(ServiceSet {
            validators: compile(&services)?,
            services,
        });
        let mut sets = self.lock_sets();
        if sets.len() >= 1024 && sets.len().is_power_of_two() {
            sets.retain(|_, set| set.strong_count() > 0);
        }
        sets.insert(key, Arc::downgrade(&set));
        Ok(set)
    }

    fn lock_sets(&self) -> std::sync::MutexGuard<'_, HashMap<String, std::sync::Weak<ServiceSet>>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Compiles every service's request schema; any that does not compile refuses the whole
/// announcement. Patterns use the `regex` crate (linear time: a device cannot make a call's
/// validation backtrack without end), and no `$ref` is fetched from anywhere.
fn compile(
    services: &std::collections::BTreeMap<String, ServiceInfo>,
) -> Result<HashMap<String, Arc<jsonschema::Validator>>, String> {
    let mut validators = HashMap::new();
    for (name, info) in services {
        let Some(schema) = &info.request_schema else {
            continue;
        };
        let validator = jsonschema::options()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(schema)
            .map_err(|e| {
                format!("the request schema of service {name:?} is not a valid JSON Schema: {e}")
            })?;
        validators.insert(name.clone(), Arc::new(validator));
    }
    Ok(validators)
}

/// Checks a body against a request schema: None when it matches, else what is wrong (the body
/// not being JSON is one violation at `""`). An empty body is checked as JSON `null`.
pub(crate) fn violations(
    validator: &jsonschema::Validator,
    body: &[u8],
) -> Option<Vec<SchemaViolation>> {
    let value: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Some(vec![SchemaViolation {
                    instance_path: String::new(),
                    message: format!("the body is not JSON ({e}), but this service takes JSON"),
                }])
            }
        }
    };
    if validator.is_valid(&value) {
        return None;
    }
    Some(
        validator
            .iter_errors(&value)
            .take(MAX_SCHEMA_ERRORS)
            .map(|e| SchemaViolation {
                instance_path: e.instance_path().to_string(),
                message: crate::logging::bounded(&e.to_string()).into_owned(),
            })
            .collect(),
    )
}

/// Reads the caller's presence feed into the registry until the caller stops.
pub(crate) async fn run(mut feed: PresenceFeed, registry: Arc<Registry>) {
    while let Some(event) = feed.next().await {
        match event {
            PresenceEvent::Subscribed => registry.subscribed(),
            PresenceEvent::Message(message) => registry.apply(&message),
        }
        // Yield now and then: a burst of thousands of announcements must not keep a worker
        // thread from the calls.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqtt_rpc::DeviceId;
    use serde_json::json;

    fn message(device: &str, payload: serde_json::Value) -> PresenceMessage {
        PresenceMessage {
            device: DeviceId::parse(device).unwrap(),
            payload: Bytes::from(payload.to_string()),
            retained: false,
            held: None,
        }
    }

    fn birth(device: &str, seq: u64) -> serde_json::Value {
        json!({"protocol": 1, "device_id": device, "online": true, "seq": seq,
               "services": {"echo": {}, "move": {"request_schema": {
                   "type": "object", "required": ["to"],
                   "properties": {"to": {"type": "integer", "minimum": 0}}}}}})
    }

    fn death(device: &str, seq: u64) -> serde_json::Value {
        json!({"protocol": 1, "device_id": device, "online": false, "seq": seq})
    }

    fn registry() -> Arc<Registry> {
        Registry::new(RegistryOptions {
            max_devices: 3,
            ..RegistryOptions::default()
        })
    }

    #[test]
    fn births_deaths_and_late_wills() {
        let r = registry();
        assert!(
            matches!(r.check("d", "echo"), Check::Send),
            "unknown device"
        );
        r.apply(&message("d", birth("d", 1)));
        assert!(matches!(r.check("d", "echo"), Check::Send));
        assert!(matches!(r.check("d", "move"), Check::Validate(_)));
        assert!(
            matches!(r.check("d", "nope"), Check::UnknownService { ref offered } if offered == &["echo", "move"])
        );
        // The device reconnects (seq 2); the first connection's Will arrives late.
        r.apply(&message("d", birth("d", 2)));
        r.apply(&message("d", death("d", 1)));
        assert!(r.device("d").unwrap().online, "a late Will is ignored");
        assert_eq!(r.counters.stale.load(Ordering::Relaxed), 1);
        r.apply(&message("d", death("d", 2)));
        let d = r.device("d").unwrap();
        assert!(!d.online);
        assert_eq!(d.services().count(), 2, "a bare death keeps the services");
        assert!(matches!(r.check("d", "echo"), Check::Offline { .. }));
        // Cleared retained message: forgotten.
        r.apply(&PresenceMessage {
            payload: Bytes::new(),
            ..message("d", json!(null))
        });
        assert!(r.device("d").is_none());
    }

    #[test]
    fn what_was_learned_before_a_resubscription_waits_for_confirmation() {
        let r = Registry::new(RegistryOptions {
            discovery_window: Duration::from_secs(60),
            ..RegistryOptions::default()
        });
        r.subscribed();
        r.apply(&message("a", birth("a", 1)));
        r.apply(&message("a", death("a", 1)));
        r.apply(&message("b", birth("b", 1)));
        assert!(matches!(r.check("a", "echo"), Check::Offline { .. }));
        assert!(matches!(r.check("b", "nope"), Check::UnknownService { .. }));
        // The connection came back without a session: both may have changed meanwhile.
        r.subscribed();
        assert!(
            matches!(r.check("a", "echo"), Check::Send),
            "not trusted yet"
        );
        assert!(
            matches!(r.check("b", "nope"), Check::Send),
            "not trusted yet"
        );
        // The retained death comes again: confirmed.
        r.apply(&message("a", death("a", 1)));
        assert!(matches!(r.check("a", "echo"), Check::Offline { .. }));
        // Once the window has passed, what was not refreshed is trusted again.
        let r = Registry::new(RegistryOptions {
            discovery_window: Duration::ZERO,
            ..RegistryOptions::default()
        });
        r.subscribed();
        r.apply(&message("a", death("a", 1)));
        r.subscribed();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(r.check("a", "echo"), Check::Offline { .. }));
    }

    #[test]
    fn devices_announcing_the_same_services_share_one_compiled_set() {
        let r = Registry::new(RegistryOptions::default());
        for id in ["a", "b", "c"] {
            r.apply(&message(id, birth(id, 1)));
        }
        let (a, b) = (r.device("a").unwrap(), r.device("b").unwrap());
        let (sa, sb) = (
            a.service_set.as_ref().unwrap(),
            b.service_set.as_ref().unwrap(),
        );
        assert!(Arc::ptr_eq(sa, sb));
        let mut other = birth("c", 2);
        other["services"]["extra"] = json!({});
        r.apply(&message("c", other));
        let c = r.device("c").unwrap();
        assert!(!Arc::ptr_eq(sa, c.service_set.as_ref().unwrap()));
        assert!(c.offers("extra") && !a.offers("extra"));
    }

    #[test]
    fn with_announcements_required_an_unknown_device_is_refused_once_settled() {
        let r = Registry::new(RegistryOptions {
            discovery_window: Duration::ZERO,
            require_announcement: true,
            ..RegistryOptions::default()
        });
        assert!(
            matches!(r.check("ghost", "echo"), Check::Send),
            "not subscribed yet"
        );
        r.subscribed();
        assert!(
            matches!(r.check("ghost", "echo"), Check::Send),
            "announcements arriving"
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(r.check("ghost", "echo"), Check::NotAnnounced));
        r.apply(&message("ghost", birth("ghost", 1)));
        assert!(matches!(r.check("ghost", "echo"), Check::Send));
        let lenient = registry();
        lenient.subscribed();
        assert!(matches!(lenient.check("ghost", "echo"), Check::Send));
    }

    #[test]
    fn the_registry_holds_at_most_its_bytes() {
        let one = birth("a", 1).to_string().len() + DEVICE_OVERHEAD;
        let r = Registry::new(RegistryOptions {
            max_bytes: 2 * one + 10,
            ..RegistryOptions::default()
        });
        for id in ["a", "b", "c"] {
            r.apply(&message(id, birth(id, 1)));
        }
        assert!(r.device("c").is_none(), "the third would not fit");
        assert_eq!(r.bytes(), 2 * one);
        // Updating a device it holds still works, and so does forgetting one.
        r.apply(&message("a", birth("a", 2)));
        assert_eq!(r.device("a").unwrap().announcement.seq, 2);
        r.apply(&PresenceMessage {
            payload: Bytes::new(),
            ..message("b", json!(null))
        });
        assert_eq!(r.bytes(), one);
        r.apply(&message("c", birth("c", 1)));
        assert!(r.device("c").is_some());
    }

    #[test]
    fn bad_announcements_change_nothing() {
        let r = registry();
        r.apply(&message("d", birth("d", 1)));
        let mut bad_schema = birth("d", 2);
        bad_schema["services"]["move"]["request_schema"] = json!({"type": 12});
        for bad in [
            json!({"protocol": 1}),
            birth("other", 2),
            bad_schema,
            json!({"protocol": 1, "device_id": "d", "online": true, "seq": 2,
                   "services": {"a/b": {}}}),
        ] {
            r.apply(&message("d", bad));
        }
        assert_eq!(r.counters.rejected.load(Ordering::Relaxed), 4);
        let d = r.device("d").unwrap();
        assert_eq!(d.announcement.seq, 1, "the entry is the last good one");
        assert!(d.offers("move"));
        // A full registry takes no new devices, but still updates the ones it has.
        for id in ["e", "f", "g"] {
            r.apply(&message(id, birth(id, 1)));
        }
        assert!(r.device("g").is_none());
        r.apply(&message("d", death("d", 1)));
        assert!(!r.device("d").unwrap().online);
    }

    #[test]
    fn bodies_are_checked_against_the_schema() {
        let r = registry();
        r.apply(&message("d", birth("d", 1)));
        let Check::Validate(v) = r.check("d", "move") else {
            panic!("move has a schema")
        };
        assert!(violations(&v, br#"{"to": 5}"#).is_none());
        let wrong = violations(&v, br#"{"to": -1}"#).unwrap();
        assert_eq!(wrong[0].instance_path, "/to");
        assert!(violations(&v, b"not json").is_some());
        assert!(
            violations(&v, b"").is_some(),
            "empty is null, not an object"
        );
    }

    #[test]
    fn pages_follow_id_order_and_filters() {
        let r = Registry::new(RegistryOptions::default());
        for i in 0..10 {
            let id = format!("dev-{i}");
            r.apply(&message(&id, birth(&id, 1)));
        }
        r.apply(&message("dev-3", death("dev-3", 1)));
        let all = |_: &str, _: &Device| true;
        let first = r.page(None, 4, all);
        assert_eq!(first.devices.len(), 4);
        assert_eq!(first.next.as_deref(), Some("dev-3"));
        let rest = r.page(first.next.as_deref(), 100, all);
        assert_eq!(rest.devices.len(), 6);
        assert!(rest.next.is_none());
        let exact = r.page(None, 10, all);
        assert!(exact.next.is_none(), "no next page when nothing follows");
        let offline = r.page(None, 100, |_, d| !d.online);
        assert_eq!(offline.devices.len(), 1);
        assert_eq!(offline.devices[0].0, "dev-3");
        assert_eq!(r.counts(), (10, 9));
    }
}
