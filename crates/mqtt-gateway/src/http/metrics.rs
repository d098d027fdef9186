//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format.
//!
//! One registry per gateway (not a process-global one), so several gateways in one process,
//! as in the tests, never mix their numbers. Per-call metrics are recorded by
//! [`super::front`]; the MQTT connection's own counters are read at scrape time.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::server::ServerStats;
use super::AppState;

/// The content type of the OpenMetrics text format, which Prometheus scrapes natively.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// `answered` when the device replied, `client-disconnected` when the caller left first,
    /// else the problem code (`device-timeout`, ...).
    outcome: String,
    status: u16,
}

/// The gateway's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    duration: Histogram,
}

impl Metrics {
    pub(crate) fn new(
        mqtt: mqtt_rpc::Caller,
        server: std::sync::Arc<ServerStats>,
        registry: std::sync::Arc<crate::registry::Registry>,
        kept_calls: std::sync::Arc<crate::calls::Calls>,
    ) -> Self {
        let registry_of_devices = registry;
        let mut registry = Registry::with_prefix("mqtt_gateway");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Calls to device services, by outcome (answered, or the problem code) and HTTP status",
            calls.clone(),
        );
        // 0.5 ms to about 65 s: from a loopback round trip to the longest sensible timeout.
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        registry.register(
            "call_duration_seconds",
            "Time from receiving a call to answering it",
            duration.clone(),
        );
        registry.register_collector(Box::new(ConnectionCollector {
            mqtt,
            server,
            devices: registry_of_devices,
            calls: kept_calls,
        }));
        Self {
            registry,
            calls,
            duration,
        }
    }

    /// Records one finished call: its problem code, or "" when the device answered.
    pub(crate) fn record_call(&self, outcome: &str, status: u16, took: Duration) {
        let outcome = if outcome.is_empty() {
            "answered"
        } else {
            outcome
        }
        .to_owned();
        self.calls
            .get_or_create(&CallLabels { outcome, status })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and every metric here encodes.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The MQTT side's and the HTTP server's counters, read at scrape time.
#[derive(Debug)]
struct ConnectionCollector {
    mqtt: mqtt_rpc::Caller,
    server: std::sync::Arc<ServerStats>,
    devices: std::sync::Arc<crate::registry::Registry>,
    calls: std::sync::Arc<crate::calls::Calls>,
}

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.mqtt.stats();
        let server = &self.server;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        let open = server.open.load(std::sync::atomic::Ordering::Relaxed);
        let (known, online) = self.devices.counts();
        let calls = self.calls.stats();
        let gauges: [(&str, &str, i64); 9] = [
            (
                "calls_kept",
                "Async and streamed calls kept now, running or finished (--max-calls)",
                i64::try_from(calls.kept).unwrap_or(i64::MAX),
            ),
            (
                "call_store_bytes",
                "Bytes the kept calls hold: progress events and results, each call with 1 KiB more (--max-call-bytes)",
                i64::try_from(calls.bytes).unwrap_or(i64::MAX),
            ),
            (
                "registry_bytes",
                "Bytes of announcements the registry holds, each device with 512 more (--max-registry-bytes)",
                i64::try_from(self.devices.bytes()).unwrap_or(i64::MAX),
            ),
            (
                "devices_known",
                "Devices in the registry: every device that announced itself (--max-devices)",
                i64::try_from(known).unwrap_or(i64::MAX),
            ),
            (
                "devices_online",
                "Devices whose last announcement says they are online",
                i64::try_from(online).unwrap_or(i64::MAX),
            ),
            (
                "calls_in_flight",
                "Calls waiting for their device now",
                s.parked as i64,
            ),
            (
                "broker_connected",
                "1 while connected to the broker and its response topic delivers (a probe came back)",
                i64::from(s.ready),
            ),
            (
                "http_connections",
                "HTTP connections open now",
                i64::try_from(open).unwrap_or(i64::MAX),
            ),
            (
                "buffered_bytes",
                "Bytes held for calls now: bodies being received or sent to the broker, replies being written (--max-buffered-bytes)",
                i64::try_from(s.buffered_bytes).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        // What the broker can do (its CONNACK, and the no-subscribers probe): 1 or 0 per
        // capability, absent while unknown; and its limits.
        let broker = self.mqtt.broker();
        let capabilities = [
            ("answers_no_subscribers", broker.answers_no_subscribers),
            ("shared_subscriptions", Some(broker.shared_subscriptions)),
            ("retain", Some(broker.retain_available)),
            (
                "wildcard_subscriptions",
                Some(broker.wildcard_subscriptions),
            ),
            (
                "subscription_identifiers",
                Some(broker.subscription_identifiers),
            ),
        ];
        let mut family = encoder.encode_descriptor(
            "broker_capability",
            "1 when the broker offers it, 0 when not (its CONNACK; answers_no_subscribers: PUBACK 0x10, probed after each connect); absent while unknown",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (capability, offered) in capabilities {
            if let (Some(offered), true) = (offered, broker.connected) {
                let labels = [("capability", capability)];
                ConstGauge::new(i64::from(offered)).encode(family.encode_family(&labels)?)?;
            }
        }
        let limits: [(&str, &str, Option<u32>); 3] = [
            (
                "broker_maximum_packet_bytes",
                "The Maximum Packet Size the broker accepts (its CONNACK); absent when it sets none",
                broker.maximum_packet_size,
            ),
            (
                "broker_receive_maximum",
                "The QoS 1 publishes the broker takes before their PUBACKs (its CONNACK's Receive Maximum)",
                Some(u32::from(broker.receive_maximum)),
            ),
            (
                "broker_topic_alias_maximum",
                "The topic aliases the broker takes (its CONNACK's Topic Alias Maximum)",
                Some(u32::from(broker.topic_alias_maximum)),
            ),
        ];
        for (name, help, value) in limits {
            if let (Some(value), true) = (value, broker.connected) {
                let gauge = ConstGauge::new(i64::from(value));
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        let registry = &self.devices.counters;
        let counters: [(&str, &str, u64); 14] = [
            (
                "calls_evicted",
                "Finished calls forgotten before their retention ended, to make room for new ones (--max-calls)",
                calls.evicted,
            ),
            (
                "cancels_sent",
                "Cancel messages sent to devices: calls given up on (timed out, client gone, DELETE)",
                s.cancels_sent,
            ),
            (
                "progress_dropped",
                "Progress messages dropped because --max-buffered-bytes were held",
                s.progress_dropped,
            ),
            (
                "announcements_received",
                "Messages on presence topics taken from the broker",
                load(&registry.received),
            ),
            (
                "announcements_rejected",
                "Announcements ignored: malformed, too large, too many services, a schema that does not compile, or past --max-devices (each device's first one is logged)",
                load(&registry.rejected) + s.presence_dropped,
            ),
            (
                "announcements_stale",
                "Deaths of a device's earlier connection (a late Will) that were ignored",
                load(&registry.stale),
            ),
            (
                "broker_reconnects",
                "Connections to the broker after the first",
                s.reconnects,
            ),
            (
                "unmatched_replies",
                "Replies matching no waiting call: late, duplicated or forged",
                s.unmatched_replies,
            ),
            (
                "replies_without_correlation",
                "Messages on the response topic without 16 bytes of correlation data",
                s.replies_without_correlation,
            ),
            (
                "invalid_replies",
                "Replies whose status property is not an HTTP status code",
                s.invalid_replies,
            ),
            (
                "calls_shed",
                "Calls refused at once because the gateway was full",
                s.shed,
            ),
            (
                "http_connections_refused",
                "HTTP connections answered 503 and closed because --http-max-connections were open",
                load(&server.refused),
            ),
            (
                "http_connections_timed_out",
                "HTTP connections closed by a timeout: request head, response write, or a close that did not finish",
                load(&server.timed_out),
            ),
            (
                "log_lines_dropped",
                "Log lines dropped because the reader of the gateway's output stopped reading",
                crate::logging::dropped_lines(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(super::only("GET", routes!(metrics)))
}

/// Prometheus metrics: calls by outcome and status, call latency, calls in flight, broker
/// connection state and reconnects, unmatched and invalid replies, shed calls.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "health",
    responses(
        (status = 200, description = "Metrics in the OpenMetrics text format.", content_type = "application/openmetrics-text", body = String),
        (status = 405, description = "Only GET is allowed. Code: `method-not-allowed`.", body = super::error::Problem, content_type = "application/problem+json"),
    ),
)]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
}
