//! A broker URL into rumqttc client options: the one place credentials, TLS, WebSocket paths,
//! TCP_NODELAY and packet limits are set, for the gateway, devices, examples and tests alike.

use std::time::Duration;

use rumqttc::v5::MqttOptions;
#[cfg(feature = "tls")]
use rumqttc::TlsConfiguration;
#[cfg(any(feature = "tls", feature = "websocket"))]
use rumqttc::Transport;

/// A secret string: never shown by `Debug`, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// How the client reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `mqtt://` (or `tcp://`): plain TCP, port 1883 by default.
    Tcp,
    /// `mqtts://` (or `ssl://`): TLS, port 8883 by default.
    Tls,
    /// `ws://`: WebSocket, port 80 by default.
    Ws,
    /// `wss://`: WebSocket over TLS, port 443 by default.
    Wss,
}

/// Why a broker URL could not be parsed. Never echoes the URL: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// Not a URL at all.
    #[error("invalid MQTT URL: {0}")]
    Invalid(String),
    /// A scheme other than the four this crate speaks.
    #[error("unknown MQTT URL scheme {0:?}; use mqtt://, mqtts://, ws:// or wss://")]
    UnknownScheme(String),
    /// No host in the URL.
    #[error("the MQTT URL has no host")]
    NoHost,
}

/// A broker address parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port, or the scheme's default.
    pub port: u16,
    /// The WebSocket path (`/mqtt`, say); `/` for TCP.
    pub path: String,
    /// `user:password@` from the URL, percent-decoded.
    pub credentials: Option<(String, Secret)>,
}

/// The most QoS 1 publishes one client has awaiting their PUBACK (before the broker's own
/// Receive Maximum lowers it); past it, new ones wait in the client's queue.
const MAX_UNACKED: u16 = 1024;

impl BrokerUrl {
    /// Parses `mqtt://`, `mqtts://`, `ws://` or `wss://` URLs, with optional `user:password@`.
    pub fn parse(raw: &str) -> Result<Self, BrokerUrlError> {
        let url = url::Url::parse(raw).map_err(|e| BrokerUrlError::Invalid(e.to_string()))?;
        let (scheme, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (Scheme::Tcp, 1883),
            "mqtts" | "ssl" => (Scheme::Tls, 8883),
            "ws" => (Scheme::Ws, 80),
            "wss" => (Scheme::Wss, 443),
            other => return Err(BrokerUrlError::UnknownScheme(other.to_owned())),
        };
        let host = url
            .host_str()
            .ok_or(BrokerUrlError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let credentials = (!url.username().is_empty()).then(|| {
            (
                decode(url.username()),
                Secret(decode(url.password().unwrap_or(""))),
            )
        });
        Ok(Self {
            scheme,
            host,
            port: url.port().unwrap_or(default_port),
            path: url.path().to_owned(),
            credentials,
        })
    }

    /// Parses a comma-separated list of broker URLs (the nodes of one cluster, to connect to
    /// in turn: [`crate::CallerOptions::failover`], [`crate::ServiceHost::failover`]); at
    /// least one, none empty.
    pub fn parse_list(raw: &str) -> Result<Vec<Self>, BrokerUrlError> {
        raw.split(',')
            .map(|one| match one.trim() {
                "" => Err(BrokerUrlError::Invalid(
                    "an empty entry in the list of broker URLs".into(),
                )),
                one => Self::parse(one),
            })
            .collect()
    }

    /// The address without credentials, for banners and logs.
    pub fn display_address(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Tcp => "mqtt",
            Scheme::Tls => "mqtts",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = if matches!(self.scheme, Scheme::Ws | Scheme::Wss) {
            self.path.as_str()
        } else {
            ""
        };
        format!("{scheme}://{host}:{}{path}", self.port)
    }
}

/// Why client options could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A password was given without a username.
    #[error("an MQTT password needs a username too")]
    PasswordWithoutUsername,
    /// A client certificate was given without the CA to check the broker with.
    #[error("a client certificate needs a CA certificate too (--mqtt-ca-file)")]
    ClientCertWithoutCa,
    /// The URL's scheme needs a feature this build of `mqtt-rpc` lacks.
    #[error("{scheme}:// needs mqtt-rpc's `{feature}` feature, which this build lacks")]
    Unsupported {
        /// The URL's scheme.
        scheme: &'static str,
        /// The feature to turn on.
        feature: &'static str,
    },
}

/// How to connect to a broker: its URL plus what a URL cannot say. Build it, then turn it into
/// rumqttc options per client id with [`Connect::mqtt_options`].
#[derive(Debug, Clone)]
pub struct Connect {
    url: BrokerUrl,
    username: Option<String>,
    password: Option<Secret>,
    keep_alive: Duration,
    max_packet_bytes: u32,
    ca_pem: Option<Vec<u8>>,
    client_auth_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl Connect {
    /// The keep-alive unless [`Connect::keep_alive`] says otherwise: a dead connection is
    /// noticed within about 45 s.
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// The packet size limit unless [`Connect::max_packet_bytes`] says otherwise: room for a
    /// 1 MiB payload's worth of packet. rumqttc's own default is only 10 KiB.
    pub const DEFAULT_MAX_PACKET_BYTES: u32 = 1024 * 1024;

    /// Parses the URL; see [`BrokerUrl::parse`].
    pub fn parse(url: &str) -> Result<Self, BrokerUrlError> {
        BrokerUrl::parse(url).map(Self::new)
    }

    /// Connects to this broker with the defaults: the URL's credentials, the system's TLS roots.
    pub fn new(url: BrokerUrl) -> Self {
        Self {
            url,
            username: None,
            password: None,
            keep_alive: Self::DEFAULT_KEEP_ALIVE,
            max_packet_bytes: Self::DEFAULT_MAX_PACKET_BYTES,
            ca_pem: None,
            client_auth_pem: None,
        }
    }

    /// The broker's URL.
    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    /// A username, instead of the URL's.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// A password, instead of the URL's.
    pub fn password(mut self, password: Secret) -> Self {
        self.password = Some(password);
        self
    }

    /// MQTT keep-alive: how soon a dead connection is noticed.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// The largest packet this client sends or accepts (also sent to the broker in CONNECT).
    pub fn max_packet_bytes(mut self, bytes: u32) -> Self {
        self.max_packet_bytes = bytes;
        self
    }

    /// CA certificates (PEM) to trust for `mqtts://` and `wss://`, instead of the system's.
    pub fn ca_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }

    /// A client certificate and its private key (PEM), for brokers that require one.
    pub fn client_cert_pem(mut self, cert: Vec<u8>, key: Vec<u8>) -> Self {
        self.client_auth_pem = Some((cert, key));
        self
    }

    /// rumqttc options for one client: clean start, TCP_NODELAY on (request/response is small
    /// packets, which Nagle's algorithm would hold back by tens of milliseconds), an explicit
    /// packet size limit, a 5 s connection timeout, credentials and TLS as configured.
    pub fn mqtt_options(&self, client_id: &str) -> Result<MqttOptions, OptionsError> {
        let url = &self.url;
        let host = match url.scheme {
            Scheme::Tcp | Scheme::Tls => url.host.clone(),
            // rumqttc takes the whole URL as the "host" of a WebSocket connection.
            Scheme::Ws | Scheme::Wss => url.display_address(),
        };
        let mut options = MqttOptions::new(client_id, host, url.port);
        options.set_keep_alive(self.keep_alive);
        options.set_clean_start(true);
        options.set_max_packet_size(Some(self.max_packet_bytes));
        // Seconds: a broker that accepts TCP but never answers CONNECT is given up on quickly.
        options.set_connection_timeout(5);
        // rumqttc keeps a slot for every packet id it may use, all allocated up front: 65,535
        // slots were about 14 MiB of an idle gateway. A thousand publishes awaiting their PUBACK
        // is far more than a broker allows anyway (its Receive Maximum lowers this further).
        options.set_outgoing_inflight_upper_limit(MAX_UNACKED);

        let user = self
            .username
            .clone()
            .or_else(|| url.credentials.as_ref().map(|(u, _)| u.clone()));
        let password = self
            .password
            .clone()
            .or_else(|| url.credentials.as_ref().map(|(_, p)| p.clone()));
        match (user, password) {
            (Some(user), password) => {
                options.set_credentials(user, password.map(|p| p.0).unwrap_or_default());
            }
            (None, Some(_)) => return Err(OptionsError::PasswordWithoutUsername),
            (None, None) => {}
        }

        if self.client_auth_pem.is_some() && self.ca_pem.is_none() {
            return Err(OptionsError::ClientCertWithoutCa);
        }
        match url.scheme {
            Scheme::Tcp => {}
            #[cfg(feature = "tls")]
            Scheme::Tls => {
                options.set_transport(Transport::tls_with_config(self.tls()));
            }
            #[cfg(feature = "websocket")]
            Scheme::Ws => {
                options.set_transport(Transport::Ws);
            }
            #[cfg(all(feature = "tls", feature = "websocket"))]
            Scheme::Wss => {
                options.set_transport(Transport::wss_with_config(self.tls()));
            }
            #[allow(unreachable_patterns)]
            scheme => {
                let (name, feature) = match scheme {
                    Scheme::Tls => ("mqtts", "tls"),
                    Scheme::Ws => ("ws", "websocket"),
                    _ => ("wss", "tls` and `websocket"),
                };
                return Err(OptionsError::Unsupported {
                    scheme: name,
                    feature,
                });
            }
        }
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        Ok(options)
    }

    /// TLS with the CA file's roots (and the client certificate), or the system's roots.
    #[cfg(feature = "tls")]
    fn tls(&self) -> TlsConfiguration {
        match &self.ca_pem {
            Some(ca) => TlsConfiguration::Simple {
                ca: ca.clone(),
                alpn: None,
                client_auth: self.client_auth_pem.clone(),
            },
            None => TlsConfiguration::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let plain = BrokerUrl::parse("mqtt://broker:1884").unwrap();
        assert_eq!(
            (plain.scheme, plain.host.as_str(), plain.port),
            (Scheme::Tcp, "broker", 1884)
        );
        assert_eq!(plain.credentials, None);
        assert_eq!(BrokerUrl::parse("mqtts://b").unwrap().port, 8883);
        let ws = BrokerUrl::parse("ws://b:9001/mqtt").unwrap();
        assert_eq!(ws.display_address(), "ws://b:9001/mqtt");
        assert_eq!(BrokerUrl::parse("wss://b/mqtt").unwrap().port, 443);
        assert_eq!(BrokerUrl::parse("mqtt://127.0.0.1").unwrap().port, 1883);
        assert_eq!(
            BrokerUrl::parse("mqtt://u%40x:p%3A@h").unwrap().credentials,
            Some(("u@x".into(), Secret::new("p:")))
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1").unwrap().host, "::1");
        assert!(BrokerUrl::parse("http://h").is_err());
        let secret = BrokerUrl::parse("mqtt://u:hunter2@h").unwrap();
        assert!(
            !format!("{secret:?}").contains("hunter2"),
            "Debug hides the password"
        );
        assert!(!secret.display_address().contains("hunter2"));
        let err = BrokerUrl::parse("mqtt://u:hunter2@[bad").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(BrokerUrl::parse("nonsense").is_err());
    }

    #[test]
    fn a_list_of_broker_urls_is_the_nodes_of_one_cluster() {
        let list = BrokerUrl::parse_list("mqtt://a:1883, mqtt://b:1884").unwrap();
        let hosts: Vec<_> = list.iter().map(|u| (u.host.as_str(), u.port)).collect();
        assert_eq!(hosts, [("a", 1883), ("b", 1884)]);
        assert_eq!(BrokerUrl::parse_list("mqtt://a").unwrap().len(), 1);
        for bad in [
            "",
            "mqtt://a,",
            ",mqtt://a",
            "mqtt://a,,mqtt://b",
            "mqtt://a,http://b",
        ] {
            assert!(BrokerUrl::parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    #[cfg(all(feature = "tls", feature = "websocket"))]
    fn options_honour_credentials_tls_and_websocket() {
        let o = Connect::parse("mqtt://dev:pw@h:1884")
            .unwrap()
            .mqtt_options("c1")
            .unwrap();
        assert_eq!(o.broker_address(), ("h".to_owned(), 1884));
        let login = |o: &MqttOptions| o.credentials().map(|l| (l.username, l.password));
        assert_eq!(login(&o), Some(("dev".to_owned(), "pw".to_owned())));
        assert_eq!(o.max_packet_size(), Some(Connect::DEFAULT_MAX_PACKET_BYTES));

        let o = Connect::parse("mqtt://dev:pw@h")
            .unwrap()
            .username("other")
            .password(Secret::new("secret"))
            .mqtt_options("c1")
            .unwrap();
        assert_eq!(login(&o), Some(("other".to_owned(), "secret".to_owned())));

        let tls = Connect::parse("mqtts://h")
            .unwrap()
            .mqtt_options("c")
            .unwrap();
        assert!(matches!(tls.transport(), Transport::Tls(_)));
        let ws = Connect::parse("ws://h:9001/mqtt")
            .unwrap()
            .mqtt_options("c")
            .unwrap();
        assert!(matches!(ws.transport(), Transport::Ws));
        assert_eq!(ws.broker_address().0, "ws://h:9001/mqtt");

        assert_eq!(
            Connect::parse("mqtt://h")
                .unwrap()
                .password(Secret::new("x"))
                .mqtt_options("c")
                .unwrap_err(),
            OptionsError::PasswordWithoutUsername
        );
        assert_eq!(
            Connect::parse("mqtts://h")
                .unwrap()
                .client_cert_pem(vec![], vec![])
                .mqtt_options("c")
                .unwrap_err(),
            OptionsError::ClientCertWithoutCa
        );
    }
}
