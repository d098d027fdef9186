"""A device written with another MQTT client library (Eclipse Paho, Python), answering MQTT 5
requests the standard way: reply to the Response Topic with the Correlation Data echoed.

Usage: paho_responder.py HOST PORT DEVICE_ID
Prints "ready" once subscribed to devices/DEVICE_ID/+.
"""

import json
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port, device_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(f"devices/{device_id}/+", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print("ready", flush=True)


def on_message(client, userdata, msg):
    request = msg.properties
    response_topic = getattr(request, "ResponseTopic", None)
    if not response_topic:
        return
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = request.CorrelationData
    reply.ContentType = "application/json"
    reply.UserProperty = [("status", "201"), ("library", "paho")]
    body = {
        "service": msg.topic.rsplit("/", 1)[-1],
        "payload": msg.payload.decode("utf-8", "replace"),
        "content_type": getattr(request, "ContentType", None),
        "user_properties": dict(getattr(request, "UserProperty", []) or []),
    }
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
