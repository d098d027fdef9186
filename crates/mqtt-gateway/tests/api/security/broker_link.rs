//! The gateway's link to its broker: credentials from the environment or a file (never in
//! the logs), TLS with a CA file and a client certificate, WebSocket and secure WebSocket.

use std::time::Duration;

use crate::helpers::*;
use test_support::make_certificates;

#[tokio::test]
async fn mqtts_with_a_ca_file_and_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let tls_port = free_port();
    let c = certs.path().display();
    let broker = TestBroker::start_with(
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\n\
             keyfile {c}/server.key\nrequire_certificate true\n"
        ),
        &[],
    );
    if !broker.is_mosquitto_for("mqtts_with_a_ca_file_and_a_client_certificate") {
        return;
    }
    let _device = demo_device(&broker, "d").await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = format!("{c}/ca.pem");
    let (cert, key) = (format!("{c}/client.pem"), format!("{c}/client.key"));

    let app = TestApp::spawn_unready(
        &url,
        &[
            "--mqtt-ca-file",
            &ca,
            "--mqtt-client-cert-file",
            &cert,
            "--mqtt-client-key-file",
            &key,
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await,
        "TLS with a client certificate"
    );
    let response = app.call("d", "echo", "over tls").await;
    assert_eq!(response.text().await.unwrap(), "over tls");

    // Without the client certificate the broker refuses the handshake: never ready.
    let anonymous = TestApp::spawn_unready(&url, &["--mqtt-ca-file", &ca]).await;
    // Without our CA the broker's certificate is not trusted: never ready either.
    let untrusting = TestApp::spawn_unready(
        &url,
        &[
            "--mqtt-client-cert-file",
            &cert,
            "--mqtt-client-key-file",
            &key,
            "--mqtt-ca-file",
            &cert,
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!anonymous.mqtt.is_ready());
    assert!(!untrusting.mqtt.is_ready());
    assert_eq!(anonymous.call("d", "echo", "x").await.status(), 503);
}

#[tokio::test]
async fn broker_credentials_come_from_env_or_file_and_never_reach_the_logs() {
    const PASSWORD: &str = "s3cret-Broker-Pa55";
    let passwd_dir = tempfile::tempdir().unwrap();
    let passwd = passwd_dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["gateway", PASSWORD])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        report_not_run("(mosquitto_passwd not available): broker_credentials_come_from_env_or_file_and_never_reach_the_logs");
        return;
    }
    std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwd)
        .args(["device", PASSWORD])
        .status()
        .unwrap();
    let auth_port = free_port();
    let broker = TestBroker::start_with(
        &format!(
            "per_listener_settings true\nlistener {auth_port} 127.0.0.1\nallow_anonymous false\n\
             password_file {}\n",
            passwd.display()
        ),
        &[],
    );
    if !broker.is_mosquitto_for("broker_credentials_come_from_env_or_file_and_never_reach_the_logs")
    {
        return;
    }
    let mut host = mqtt_rpc::responder::ServiceHost::new(
        mqtt_rpc::Connect::parse(&format!("mqtt://device:{PASSWORD}@127.0.0.1:{auth_port}"))
            .unwrap()
            .mqtt_options("cred-device")
            .unwrap(),
    );
    host = host
        .service("devices/locked/echo", |req| async move {
            mqtt_rpc::responder::Reply::new(req.payload)
        })
        .unwrap();
    let _device = start_ready(host).await;
    let url = format!("mqtt://127.0.0.1:{auth_port}");
    let file = passwd_dir.path().join("gateway-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.display().to_string();

    // From the environment, and from a file; logging everything, down to trace.
    let by_env = GatewayProcess::serve(
        &url,
        &["--mqtt-username", "gateway"],
        &[("GATEWAY_MQTT_PASSWORD", PASSWORD), ("RUST_LOG", "trace")],
    )
    .await;
    let by_file = GatewayProcess::serve(
        &url,
        &["--mqtt-username", "gateway", "--mqtt-password-file", &file],
        &[("RUST_LOG", "trace")],
    )
    .await;
    let http = http_client();
    for gateway in [&by_env, &by_file] {
        let r = http
            .post(gateway.service_url("locked", "echo"))
            .body("in")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "in");
    }

    // A wrong password: the gateway says why, and still not the password.
    let wrong = GatewayProcess::spawn(
        &url,
        &["--mqtt-username", "gateway"],
        &[
            ("GATEWAY_MQTT_PASSWORD", "wrong-Pa55word"),
            ("RUST_LOG", "trace"),
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wrong_output = wrong.output().join("\n");
    assert!(
        wrong_output.contains("NotAuthorized") || wrong_output.contains("BadUserNamePassword"),
        "{wrong_output}"
    );

    let outputs = [by_env.output().join("\n"), by_file.output().join("\n")];
    assert!(
        outputs.iter().all(|o| o.len() > 1000),
        "trace logging was on"
    );
    for output in outputs.iter().chain([&wrong_output]) {
        assert!(
            !output.contains(PASSWORD) && !output.contains("wrong-Pa55word"),
            "a password reached the logs"
        );
    }
}

/// A WebSocket front for the broker (Mosquitto here is built without WebSocket support, and the
/// embedded broker speaks only MQTT 3.1.1 over WebSockets): accepts `mqtt` WebSocket
/// connections, over TLS when given a certificate directory, and relays their bytes to the
/// broker's TCP port.
async fn websocket_front(
    broker_port: u16,
    tls: Option<&std::path::Path>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use async_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_util::compat::FuturesAsyncReadCompatExt;

    // The callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    async fn relay<S>(stream: S, broker_port: u16)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let agree_mqtt = |_: &Request, mut response: Response| {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
            Ok(response)
        };
        let Ok(ws) = async_tungstenite::tokio::accept_hdr_async(stream, agree_mqtt).await else {
            return;
        };
        let mut client = ws_stream_tungstenite::WsStream::new(ws).compat();
        let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
        else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }

    let acceptor = tls.map(|dir| {
        let certs = rustls_pemfile::certs(&mut &std::fs::read(dir.join("server.pem")).unwrap()[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls_pemfile::private_key(&mut &std::fs::read(dir.join("server.key")).unwrap()[..])
                .unwrap()
                .unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            relay(tls, broker_port).await;
                        }
                    }
                    None => relay(tcp, broker_port).await,
                }
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn the_gateway_reaches_its_broker_over_ws_and_wss() {
    let broker = TestBroker::start();
    let _device = demo_device(&broker, "d").await;
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let ca = certs.path().join("ca.pem").display().to_string();

    let (ws_port, ws_front) = websocket_front(broker.port, None).await;
    let (wss_port, wss_front) = websocket_front(broker.port, Some(certs.path())).await;
    let cases = [
        (format!("ws://127.0.0.1:{ws_port}/mqtt"), vec![]),
        (
            format!("wss://127.0.0.1:{wss_port}/mqtt"),
            vec!["--mqtt-ca-file", ca.as_str()],
        ),
    ];
    for (url, flags) in cases {
        let app = TestApp::spawn_unready(&url, &flags).await;
        assert!(
            eventually(Duration::from_secs(10), || app.mqtt.is_ready()).await,
            "connected over {url}"
        );
        let response = app.call("d", "echo", "over websockets").await;
        assert_eq!(response.text().await.unwrap(), "over websockets", "{url}");
    }
    ws_front.abort();
    wss_front.abort();
}
