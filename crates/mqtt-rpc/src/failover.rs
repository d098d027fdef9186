//! Several brokers for one client (the nodes of one cluster): after a connection fails or is
//! lost, the next one is tried, in turn.
//!
//! Only *where* each broker is comes from its options (host, port, transport and its TLS
//! settings). Everything that makes the client itself (client id, credentials, clean start,
//! session expiry and the other CONNECT properties, keep-alive, Will, socket options) is
//! carried over from the connection that failed, so a persistent session and a presence Will
//! follow the client from node to node.

use rumqttc::v5::MqttOptions;

/// The brokers one client connects to in turn.
#[derive(Clone)]
pub(crate) struct Failover {
    /// Where each broker is; the first is where the client starts.
    brokers: Vec<MqttOptions>,
    /// The one the client connects to now.
    current: usize,
}

impl Failover {
    /// `first` and then `others`, in order.
    pub(crate) fn new(first: &MqttOptions, others: Vec<MqttOptions>) -> Self {
        let mut brokers = Vec::with_capacity(others.len() + 1);
        brokers.push(first.clone());
        brokers.extend(others);
        Self {
            brokers,
            current: 0,
        }
    }

    /// Whether there is another broker to try.
    pub(crate) fn has_others(&self) -> bool {
        self.brokers.len() > 1
    }

    /// Points `options` (the event loop's) at the next broker, keeping everything else of the
    /// client; returns its address, or None when there is no other broker.
    pub(crate) fn advance(&mut self, options: &mut MqttOptions) -> Option<String> {
        if !self.has_others() {
            return None;
        }
        self.current = (self.current + 1) % self.brokers.len();
        *options = transplant(options, &self.brokers[self.current]);
        Some(address(options))
    }
}

/// The client of `client` connecting where `broker` connects.
fn transplant(client: &MqttOptions, broker: &MqttOptions) -> MqttOptions {
    let mut next = broker.clone();
    next.set_client_id(client.client_id());
    next.set_keep_alive(client.keep_alive());
    next.set_clean_start(client.clean_start());
    // Session expiry, receive maximum, maximum packet size, topic alias maximum, user
    // properties, authentication: all of the CONNECT properties at once.
    if let Some(properties) = client.connect_properties() {
        next.set_connect_properties(properties);
    }
    if let Some(login) = client.credentials() {
        next.set_credentials(login.username, login.password);
    }
    if let Some(will) = client.last_will() {
        next.set_last_will(will);
    }
    next.set_network_options(client.network_options());
    next.set_manual_acks(client.manual_acks());
    next
}

/// `host:port`, for logs and readiness details.
pub(crate) fn address(options: &MqttOptions) -> String {
    let (host, port) = options.broker_address();
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_client_moves_from_broker_to_broker_and_stays_itself() {
        let mut client = MqttOptions::new("gw-1", "node-a", 1883);
        client
            .set_clean_start(false)
            .set_session_expiry_interval(Some(60))
            .set_keep_alive(Duration::from_secs(7))
            .set_max_packet_size(Some(1 << 20))
            .set_credentials("gateway", "secret");
        let mut network = client.network_options();
        network.set_connection_timeout(3);
        client.set_network_options(network);
        let others = vec![
            MqttOptions::new("ignored", "node-b", 1884),
            MqttOptions::new("ignored", "node-c", 1885),
        ];
        let mut failover = Failover::new(&client, others);
        let mut options = client.clone();

        assert_eq!(
            failover.advance(&mut options).as_deref(),
            Some("node-b:1884")
        );
        assert_eq!(options.client_id(), "gw-1");
        assert!(!options.clean_start());
        assert_eq!(options.session_expiry_interval(), Some(60));
        assert_eq!(options.keep_alive(), Duration::from_secs(7));
        assert_eq!(options.max_packet_size(), Some(1 << 20));
        assert_eq!(options.credentials().unwrap().username, "gateway");
        assert_eq!(options.network_options().connection_timeout(), 3);

        assert_eq!(
            failover.advance(&mut options).as_deref(),
            Some("node-c:1885")
        );
        assert_eq!(
            failover.advance(&mut options).as_deref(),
            Some("node-a:1883"),
            "and round again"
        );
        assert_eq!(options.client_id(), "gw-1");

        let mut alone = Failover::new(&client, Vec::new());
        assert_eq!(alone.advance(&mut options), None);
    }
}
