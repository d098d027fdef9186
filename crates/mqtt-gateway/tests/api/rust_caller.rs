//! A Rust service calls the gateway's demo device over MQTT 5 with `mqtt-rpc` alone: no HTTP,
//! no gateway in between (the `call_device` example of `mqtt-rpc` does the same as a program).

use std::time::Duration;

use mqtt_rpc::{Call, Caller, CallerOptions, DeviceId, ServiceName};

use crate::helpers::*;

#[tokio::test]
async fn a_rust_program_using_only_mqtt_rpc_gets_the_demo_devices_echo() {
    let broker = TestBroker::start();
    let _demo = demo_device(&broker, "demo-1").await;
    let options = CallerOptions::new(
        broker.mqtt_options("rust-service"),
        "callers/rust-service/replies",
    );
    let (caller, _task) = Caller::start(options);
    tokio::time::timeout(Duration::from_secs(10), caller.wait_ready())
        .await
        .expect("the caller is ready within 10 s");

    let call = Call::new(
        DeviceId::parse("demo-1").unwrap(),
        ServiceName::parse("echo").unwrap(),
        "hello, device",
    )
    .with_content_type("text/plain")
    .with_user_property("from", "rust");
    let reply = caller.call(call).await.expect("the demo device echoes");
    assert_eq!(&reply.payload[..], b"hello, device");
    assert_eq!(reply.content_type.as_deref(), Some("text/plain"));
    assert_eq!(reply.status_or_ok(), 200);
    assert!(reply
        .user_properties
        .contains(&("from".to_owned(), "rust".to_owned())));

    let config = caller
        .call(Call::new(
            DeviceId::parse("demo-1").unwrap(),
            ServiceName::parse("get_config").unwrap(),
            "",
        ))
        .await
        .expect("get_config answers");
    let config: serde_json::Value = serde_json::from_slice(&config.payload).unwrap();
    assert_eq!(config["device_id"], "demo-1");
}
