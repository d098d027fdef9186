"""A device written with another MQTT client library (Eclipse Paho, Python), following
docs/PROTOCOL.md section by section: the interop tests check that the gateway and this device
understand each other from the document alone.

Usage: paho_responder.py HOST PORT DEVICE_ID
Prints "ready" once the broker granted the subscription to devices/DEVICE_ID/+; exits 1 with a
message if it refused it.
"""

import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

host, port, device_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def on_connect(client, userdata, flags, reason_code, properties):
    # 2.4: Retain Handling 2, so no retained message is taken for a request on subscribing.
    options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    client.subscribe(f"devices/{device_id}/+", options=options)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    refused = [code for code in reason_codes if code.is_failure]
    if refused:
        print(f"the broker refused the subscription: {refused}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("ready", flush=True)


def usable_response_topic(topic):
    """4.3: a topic a client may publish to, or None."""
    if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
        return None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic):
        return None
    return topic


def on_message(client, userdata, msg):
    received = time.monotonic()
    # 4.4: a retained message is never a request.
    if msg.retain:
        return
    request = msg.properties
    # 4.3: one-way requests and unusable response topics get no reply.
    response_topic = usable_response_topic(getattr(request, "ResponseTopic", None))
    if response_topic is None:
        return
    # 4.5: the caller has given up once the Message Expiry Interval has passed.
    expiry = getattr(request, "MessageExpiryInterval", None)
    reply = Properties(PacketTypes.PUBLISH)
    # 5.1: the Correlation Data echoed unchanged, when there was one.
    correlation = getattr(request, "CorrelationData", None)
    if correlation is not None:
        reply.CorrelationData = correlation
    reply.ContentType = "application/json"
    # 5.3: the status as a decimal user property; other user properties become x-mqtt-* headers.
    reply.UserProperty = [("status", "201"), ("library", "paho")]
    body = {
        "service": msg.topic.rsplit("/", 1)[-1],
        "payload": msg.payload.decode("utf-8", "replace"),
        "content_type": getattr(request, "ContentType", None),
        "user_properties": dict(getattr(request, "UserProperty", []) or []),
    }
    if expiry is not None and time.monotonic() - received >= expiry:
        return
    client.publish(response_topic, json.dumps(body), qos=1, properties=reply)


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=f"paho-{device_id}",
    protocol=mqtt.MQTTv5,
)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port)
client.loop_forever()
