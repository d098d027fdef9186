//! A plain rumqttc v5 client, for tests that play a device or a sniffer by hand.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::{mpsc, oneshot};

use crate::TestBroker;

/// A plain rumqttc v5 client whose incoming publishes arrive on a channel.
pub struct RawClient {
    /// The client, to publish with.
    pub client: AsyncClient,
    /// Every PUBLISH the broker delivered, in order.
    pub publishes: mpsc::UnboundedReceiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connects and subscribes to `filters`, returning once the broker granted them.
    pub async fn connect(broker: &TestBroker, client_id: &str, filters: &[&str]) -> Self {
        Self::connect_with(
            broker.mqtt_options(client_id),
            filters,
            Duration::from_secs(10),
        )
        .await
        .expect("raw client subscribed within 10 s")
    }

    /// The same with any client options; None when not subscribed `within`.
    pub async fn connect_with(
        options: rumqttc::v5::MqttOptions,
        filters: &[&str],
        within: Duration,
    ) -> Option<Self> {
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (tx, publishes) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let mut expected_subacks = filters.len();
        if expected_subacks == 0 {
            let _ = subscribed_tx.take().map(|t| t.send(()));
        }
        for filter in filters {
            client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
        }
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // A gateway's no-subscribers probe (one per connect) is no call: a test
                    // that counts what was published does not count it.
                    Ok(Event::Incoming(Packet::Publish(p))) if is_probe(&p.topic) => {}
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        expected_subacks = expected_subacks.saturating_sub(1);
                        if expected_subacks == 0 {
                            let _ = subscribed_tx.take().map(|t| t.send(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if expected_subacks == 0 => {
                        let _ = subscribed_tx.take().map(|t| t.send(()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let client = RawClient {
            client,
            publishes,
            task,
        };
        match tokio::time::timeout(within, subscribed_rx).await {
            Ok(Ok(())) => Some(client),
            _ => None,
        }
    }

    /// The next publish, or None after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Publish> {
        tokio::time::timeout(wait, self.publishes.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Whether a topic is a caller's no-subscribers probe
/// ([`mqtt_rpc::protocol::NO_SUBSCRIBERS_PROBE_PREFIX`]).
fn is_probe(topic: &[u8]) -> bool {
    let prefix = mqtt_rpc::protocol::NO_SUBSCRIBERS_PROBE_PREFIX.as_bytes();
    topic.windows(prefix.len()).any(|w| w == prefix)
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
