//! A host's presence (`docs/PROTOCOL.md`, section 11): who it is, found from its filters; its
//! birth, its Will, its death on a clean stop; answers to discovery requests; and the repair
//! of a late Will of an earlier connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, LastWillProperties, PublishProperties};
use rumqttc::v5::mqttbytes::v5::{Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::filter::TopicFilter;
use crate::presence::{
    Announcement, Discovery, PresenceTopics, ServiceInfo, MAX_SEQ, MIN_DISCOVERY_INTERVAL_MS,
};
use crate::topic::{DeviceId, TopicTemplate};

/// Whom a host announces, as its author chose.
#[derive(Debug, Clone, Default)]
pub(super) enum Identity {
    /// The one device id its filters name literally, if they name exactly one.
    #[default]
    FromFilters,
    /// This device.
    Device(DeviceId),
    /// Nobody: the host does not announce.
    Silent,
}

/// What the filters say about one device: the services they name, and whether a `+` in the
/// service level takes services not named.
fn services_of(
    template: &TopicTemplate,
    filters: &[(&TopicFilter, Option<&ServiceInfo>)],
    device: &str,
) -> (BTreeMap<String, ServiceInfo>, bool) {
    let mut services = BTreeMap::new();
    let mut other_services = false;
    for (filter, info) in filters {
        let Some((d, s)) = names_in(template, filter) else {
            continue;
        };
        if d != device && d != "+" {
            continue;
        }
        if s == "+" {
            other_services = true;
        } else if crate::ServiceName::parse(s).is_ok() {
            // The first filter naming a service is the one dispatch uses: so is its description.
            services
                .entry(s.to_owned())
                .or_insert_with(|| info.cloned().unwrap_or_default());
        }
    }
    (services, other_services)
}

/// The device and service levels of a filter made from the template (each a name or `+`), or
/// None when the filter is not the template's shape.
fn names_in<'f>(template: &TopicTemplate, filter: &'f TopicFilter) -> Option<(&'f str, &'f str)> {
    let levels = filter.levels();
    let shape: Vec<&str> = template.as_str().split('/').collect();
    if levels.len() != shape.len() {
        return None;
    }
    let (mut device, mut service) = (None, None);
    for (level, expected) in levels.iter().zip(shape) {
        match expected {
            "{device_id}" => device = Some(level.as_str()),
            "{service}" => service = Some(level.as_str()),
            literal if level == literal => {}
            _ => return None,
        }
    }
    match (device?, service?) {
        ("#", _) | (_, "#") => None,
        names => Some(names),
    }
}

/// The device a host announces and what it offers, or None with the reason it does not.
pub(super) fn announcement(
    identity: &Identity,
    template: &TopicTemplate,
    filters: &[(&TopicFilter, Option<&ServiceInfo>)],
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Result<Announcement, String> {
    let device = match identity {
        Identity::Silent => return Err("announcements are switched off".into()),
        Identity::Device(device) => device.clone(),
        Identity::FromFilters => {
            let mut ids: Vec<&str> = filters
                .iter()
                .filter_map(|(f, _)| names_in(template, f).map(|(d, _)| d))
                .filter(|d| *d != "+")
                .collect();
            ids.sort_unstable();
            ids.dedup();
            match ids.as_slice() {
                [one] => DeviceId::parse(*one).map_err(|e| format!("{one:?}: {e}"))?,
                [] => {
                    return Err(format!(
                        "no filter names a device id in {}; call ServiceHost::device_id to \
                         announce",
                        template.as_str()
                    ))
                }
                many => {
                    return Err(format!(
                        "the filters name {} device ids ({}); call ServiceHost::device_id to \
                         choose the one to announce",
                        many.len(),
                        many.join(", ")
                    ))
                }
            }
        }
    };
    let (services, other_services) = services_of(template, filters, device.as_str());
    let mut birth = Announcement::birth(&device, 0);
    birth.services = Some(services);
    birth.other_services = other_services;
    birth.metadata = metadata.clone();
    Ok(birth)
}

/// A connection's `seq`: the wall clock in milliseconds, kept above the previous one (so two
/// connections within a millisecond, or a clock set back, still differ).
fn next_seq(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(MAX_SEQ));
    let next = now.max(previous.saturating_add(1));
    if next > MAX_SEQ {
        1
    } else {
        next
    }
}

/// A host's presence while it runs.
pub(super) struct Presence {
    topics: PresenceTopics,
    /// The device's own presence topic.
    topic: String,
    state: Mutex<State>,
}

struct State {
    /// The current birth, carrying the current connection's seq.
    birth: Announcement,
    /// The birth went out on the current connection.
    announced: bool,
    /// An announcement is scheduled (a discovery answer or a repair).
    scheduled: bool,
    /// When the last scheduled announcement went out.
    last_answer: Option<Instant>,
}

impl Presence {
    pub(super) fn new(topics: PresenceTopics, mut birth: Announcement) -> Arc<Self> {
        birth.seq = next_seq(0);
        let device = DeviceId::parse(birth.device_id.as_str()).ok();
        let topic = device.map_or_else(String::new, |d| topics.topic(&d));
        Arc::new(Self {
            topics,
            topic,
            state: Mutex::new(State {
                birth,
                announced: false,
                scheduled: false,
                last_answer: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Each critical section leaves the state whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Will for the current connection: its death, retained.
    pub(super) fn will(&self) -> LastWill {
        let death = self.lock().birth.death();
        LastWill::new(
            self.topic.clone(),
            death.to_payload().to_vec(),
            QoS::AtLeastOnce,
            true,
            Some(LastWillProperties {
                delay_interval: None,
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                content_type: Some("application/json".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        )
    }

    /// The connection dropped: the next one gets a new seq (so this one's Will, however late
    /// the broker publishes it, cannot mark the next one offline). Returns the next Will.
    pub(super) fn disconnected(&self) -> LastWill {
        {
            let mut state = self.lock();
            state.birth.seq = next_seq(state.birth.seq);
            state.announced = false;
        }
        self.will()
    }

    /// The subscriptions presence needs besides the services': discovery requests, and the
    /// device's own topic (to see a late Will). Retain Handling 2: neither is wanted from the
    /// retained store.
    pub(super) fn filters(&self) -> [Filter; 2] {
        [self.topics.discovery(), self.topic.clone()].map(|topic| Filter {
            retain_forward_rule: RetainForwardRule::Never,
            ..Filter::new(topic, QoS::AtLeastOnce)
        })
    }

    /// The birth as a PUBLISH, marking it sent.
    pub(super) fn birth_publish(&self) -> Publish {
        let payload = {
            let mut state = self.lock();
            state.announced = true;
            state.birth.to_payload()
        };
        let mut publish = Publish::new(
            self.topic.clone(),
            QoS::AtLeastOnce,
            payload,
            Some(json_properties()),
        );
        publish.retain = true;
        publish
    }

    /// The death, for a clean stop.
    pub(super) fn death_payload(&self) -> Bytes {
        self.lock().birth.death().to_payload()
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether a message on this topic is presence's to handle (and handles it): a discovery
    /// request, or a message on the device's own topic.
    pub(super) fn handle(
        self: &Arc<Self>,
        client: &AsyncClient,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        if self.topics.is_discovery(topic) {
            let window = Discovery::window_of(payload);
            let delay = window.mul_f64(rand::random::<f64>());
            debug!(?delay, "discovery request: announcing again");
            self.schedule(client, delay, false);
            return true;
        }
        if topic != self.topic {
            return false;
        }
        // Our own birth and death come back here too; only a death of another connection
        // (a late Will) needs an answer.
        let seen: Option<(bool, u64)> = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| Some((v.get("online")?.as_bool()?, v.get("seq")?.as_u64()?)));
        let current = self.lock().birth.seq;
        match seen {
            Some((false, seq)) if seq != current => {
                info!(
                    stale_seq = seq,
                    seq = current,
                    "an earlier connection's Will marked this device offline; announcing again"
                );
                self.schedule(client, Duration::ZERO, true);
            }
            Some((true, seq)) if seq != current => warn!(
                other_seq = seq,
                "another client announces under this device's id"
            ),
            _ => {}
        }
        true
    }

    /// Announces again after `delay`, at most once per [`MIN_DISCOVERY_INTERVAL_MS`] however
    /// often it is asked; discovery requests while one is scheduled join it. An `urgent` one
    /// (the repair of a stale Will, which now sits in the broker's retained store) does not
    /// wait for a scheduled discovery answer, only for the one-second floor.
    fn schedule(self: &Arc<Self>, client: &AsyncClient, delay: Duration, urgent: bool) {
        let delay = {
            let mut state = self.lock();
            if !state.announced || (state.scheduled && !urgent) {
                return;
            }
            state.scheduled = true;
            let gap = Duration::from_millis(MIN_DISCOVERY_INTERVAL_MS);
            let earliest = state
                .last_answer
                .map_or(Duration::ZERO, |at| gap.saturating_sub(at.elapsed()));
            delay.max(earliest)
        };
        let presence = self.clone();
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let publish = {
                let mut state = presence.lock();
                state.scheduled = false;
                state.last_answer = Some(Instant::now());
                // Not connected any more: the next connection announces on its own, with its
                // own seq.
                state.announced.then(|| state.birth.to_payload())
            };
            if let Some(payload) = publish {
                if let Err(e) = client
                    .publish_with_properties(
                        presence.topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        payload,
                        json_properties(),
                    )
                    .await
                {
                    debug!("could not queue an announcement: {e}");
                }
            }
        });
    }

    /// Changes the metadata and announces again when connected.
    pub(super) fn set_metadata(&self, client: &AsyncClient, key: String, value: serde_json::Value) {
        let payload = {
            let mut state = self.lock();
            state.birth.metadata.insert(key, value);
            state.announced.then(|| state.birth.to_payload())
        };
        if let Some(payload) = payload {
            let _ = client.try_publish_with_properties(
                self.topic.clone(),
                QoS::AtLeastOnce,
                true,
                payload,
                json_properties(),
            );
        }
    }

    /// The current birth.
    pub(super) fn birth(&self) -> Announcement {
        self.lock().birth.clone()
    }
}

pub(super) fn json_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        ..Default::default()
    }
}

/// The cancel topic filters a host subscribes to: one per device level (a name or `+`) of
/// the filters made from the template, and one per group level of the group filters
/// (`groups/{group}/{service}`), whose service level names one service (a `+` or `#` there
/// already covers the cancel topic).
pub(super) fn cancel_filters<'f>(
    template: &TopicTemplate,
    filters: impl Iterator<Item = &'f TopicFilter>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for filter in filters {
        let cancel = match (group_in(filter), names_in(template, filter)) {
            (Some((_, "+")), _) | (None, Some((_, "+"))) | (None, None) => continue,
            (Some((group, _)), _) => crate::topic::group_cancel_topic(group),
            (None, Some((device, _))) => template.filter(device, crate::protocol::CANCEL_SERVICE),
        };
        if !out.contains(&cancel) {
            out.push(cancel);
        }
    }
    out
}

/// The group and service levels of a group filter (`groups/{group}/{service}`, `$share`
/// stripped); None for any other filter, and for a `#` in either level.
fn group_in(filter: &TopicFilter) -> Option<(&str, &str)> {
    match filter.levels() {
        [prefix, group, service]
            if prefix == crate::protocol::GROUP_TOPIC_PREFIX && group != "#" && service != "#" =>
        {
            Some((group, service))
        }
        _ => None,
    }
}

/// Whether a topic is a cancel topic: the template's shape with
/// [`crate::protocol::CANCEL_SERVICE`] in the service level, or a group's
/// (`groups/{group}/$cancel`).
pub(super) fn is_cancel_topic(template: &TopicTemplate, topic: &str) -> bool {
    if let [prefix, group, service] = topic.split('/').collect::<Vec<_>>()[..] {
        if prefix == crate::protocol::GROUP_TOPIC_PREFIX
            && !group.is_empty()
            && service == crate::protocol::CANCEL_SERVICE
        {
            return true;
        }
    }
    let mut levels = topic.split('/');
    for expected in template.as_str().split('/') {
        let Some(level) = levels.next() else {
            return false;
        };
        let fits = match expected {
            "{device_id}" => true,
            "{service}" => level == crate::protocol::CANCEL_SERVICE,
            literal => level == literal,
        };
        if !fits {
            return false;
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(raw: &[&str]) -> Vec<TopicFilter> {
        raw.iter().map(|f| TopicFilter::parse(f).unwrap()).collect()
    }

    fn announce(identity: Identity, raw: &[&str]) -> Result<Announcement, String> {
        let parsed = filters(raw);
        let with_info: Vec<_> = parsed.iter().map(|f| (f, None)).collect();
        announcement(
            &identity,
            &TopicTemplate::default(),
            &with_info,
            &Default::default(),
        )
    }

    fn names(a: &Announcement) -> Vec<&str> {
        a.services
            .as_ref()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn a_host_is_the_one_device_its_filters_name() {
        let a = announce(
            Identity::FromFilters,
            &["devices/t-7/get", "$share/g/devices/t-7/set", "other/x"],
        )
        .unwrap();
        assert_eq!(a.device_id, "t-7");
        assert_eq!(names(&a), ["get", "set"]);
        assert!(!a.other_services && a.online);

        let parsed = filters(&["devices/t-7/get", "$share/g/devices/t-7/get"]);
        let described = ServiceInfo::new().description("first");
        let twice = announcement(
            &Identity::FromFilters,
            &TopicTemplate::default(),
            &[(&parsed[0], Some(&described)), (&parsed[1], None)],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            twice.services.unwrap()["get"].description.as_deref(),
            Some("first"),
            "the first filter naming a service describes it, as it is the one dispatched to"
        );

        let open = announce(Identity::FromFilters, &["devices/t-7/+", "devices/t-7/get"]).unwrap();
        assert!(open.other_services);
        assert_eq!(names(&open), ["get"]);

        assert!(announce(Identity::FromFilters, &["devices/+/get"]).is_err());
        assert!(announce(Identity::FromFilters, &["devices/a/get", "devices/b/get"]).is_err());
        assert!(announce(Identity::FromFilters, &["devices/#"]).is_err());
        assert!(announce(Identity::Silent, &["devices/a/get"]).is_err());

        let chosen = announce(
            Identity::Device(DeviceId::parse("b").unwrap()),
            &["devices/a/get", "devices/b/set", "devices/+/ping"],
        )
        .unwrap();
        assert_eq!(chosen.device_id, "b");
        assert_eq!(names(&chosen), ["ping", "set"]);
    }

    #[test]
    fn every_connection_has_its_own_seq() {
        let a = next_seq(0);
        assert!(a > 1_600_000_000_000, "milliseconds since 1970");
        assert!(next_seq(a) > a);
        assert!(
            next_seq(a + 10_000) > a + 10_000,
            "a clock set back still moves on"
        );
        assert_eq!(
            next_seq(MAX_SEQ),
            1,
            "wraps before leaving JSON's exact integers"
        );
    }

    #[test]
    fn cancel_topics_follow_the_template() {
        let t = TopicTemplate::default();
        assert!(is_cancel_topic(&t, "devices/d1/$cancel"));
        assert!(!is_cancel_topic(&t, "devices/d1/echo"));
        assert!(!is_cancel_topic(&t, "devices/d1/$cancel/x"));
        assert!(!is_cancel_topic(&t, "other/d1/$cancel"));
        assert!(is_cancel_topic(&t, "groups/floor-1/$cancel"));
        assert!(!is_cancel_topic(&t, "groups/floor-1/echo"));
        assert!(!is_cancel_topic(&t, "groups//$cancel"));
        assert!(!is_cancel_topic(&t, "groups/floor-1/$cancel/x"));
        let filters: Vec<TopicFilter> = [
            "devices/d1/echo",
            "devices/d1/get",
            "$share/g/devices/+/echo",
            "devices/d2/+",
            "devices/#",
            "groups/floor-1/echo",
            "groups/floor-1/get",
            "groups/+/reboot",
            "groups/floor-2/+",
            "groups/#",
        ]
        .iter()
        .map(|f| TopicFilter::parse(f).unwrap())
        .collect();
        assert_eq!(
            cancel_filters(&t, filters.iter()),
            vec![
                "devices/d1/$cancel".to_owned(),
                "devices/+/$cancel".to_owned(),
                "groups/floor-1/$cancel".to_owned(),
                "groups/+/$cancel".to_owned(),
            ],
            "one per device or group level; `+` and `#` service levels already receive it"
        );
    }
}
