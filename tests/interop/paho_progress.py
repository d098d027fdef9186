"""A device that streams progress and honours cancels (docs/PROTOCOL.md section 12), written
with Eclipse Paho (Python) from the document alone.

Usage: paho_progress.py --host HOST --port PORT [--device-id ID]

It offers one service on devices/ID/count (2.4). A request {"to": N, "every_ms": M} gets N
progress messages {"n": 1} ... {"n": N}, one every M ms (12.1), then the reply {"counted": N}
(5). A cancel on devices/ID/$cancel stops the matching request at once, and nothing more is
sent for it (12.3). Every request runs in its own thread; paho's network thread only starts
threads and sets events. Stdout carries exactly these lines (logs go to stderr):

    ready                       the SUBACK granted both subscriptions
    finished <correlation hex>  a reply was sent
    cancelled <correlation hex> a request was stopped by a cancel message

("-" stands for a request without Correlation Data.) SIGTERM or SIGINT stops it: running
requests are abandoned without a reply, then DISCONNECT 0x00, exit 0.
"""

import argparse
import json
import logging
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("paho-progress")

SERVICE = "count"
CANCEL_SERVICE = "$cancel"            # 12.3
MAX_RUNNING = 1000                    # 5.6: beyond this, answer 503 at once
MAX_TO = 100000                       # 12.1: pace yourself (the gateway keeps 1000 events)
MAX_EVERY_MS = 60000


def mqtt_string_ok(s):
    """7.1: at most 65535 bytes, no control character, no Unicode non-character."""
    try:
        if len(s.encode("utf-8")) > 65535:
            return False
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xFDD0 <= ord(c) <= 0xFDEF
                   or (ord(c) & 0xFFFE) == 0xFFFE for c in s)


def usable_response_topic(topic):
    """4.3: a topic a client may publish to."""
    return (bool(topic) and "+" not in topic and "#" not in topic
            and not topic.startswith("$") and mqtt_string_ok(topic))


def parse_count(payload):
    """{"to": N, "every_ms": M} -> (N, M), or a reason for a 400."""
    try:
        request = json.loads(payload.decode("utf-8"))
    except ValueError:                # UnicodeDecodeError is one; NaN fails the checks below
        return None, "the request is not JSON"
    if not isinstance(request, dict):
        return None, 'expected {"to": N, "every_ms": M}'
    to, every_ms = request.get("to"), request.get("every_ms")
    if not (type(to) is int and 0 <= to <= MAX_TO):
        return None, f'"to" must be an integer from 0 to {MAX_TO}'
    if not (type(every_ms) in (int, float) and 0 <= every_ms <= MAX_EVERY_MS):
        return None, f'"every_ms" must be a number from 0 to {MAX_EVERY_MS}'
    return (to, every_ms), None


class Request:
    """One running count request. self.lock makes "check cancelled, then publish" atomic
    against a cancel, so nothing at all goes out after the cancel was seen (12.3)."""

    def __init__(self, response_topic, correlation, deadline):
        self.response_topic = response_topic
        self.correlation = correlation
        self.deadline = deadline          # time.monotonic(), or None (4.5)
        self.cancelled = threading.Event()
        self.replied = False              # the reply is out: a later cancel is ignored
        self.lock = threading.Lock()

    @property
    def key(self):                        # 12.3: a cancel names Response Topic + Correlation
        return (self.response_topic, self.correlation)

    @property
    def hex(self):
        return "-" if self.correlation is None else self.correlation.hex()   # 4.1: opaque


class ProgressDevice:
    def __init__(self, host, port, device_id):
        self.host, self.port = host, port
        self.request_topic = f"devices/{device_id}/{SERVICE}"       # 2.1, default template
        self.cancel_topic = f"devices/{device_id}/{CANCEL_SERVICE}"  # 12.3
        self.running = {}                 # key -> set of Request, guarded by self.lock
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()  # one stdout line at a time
        self.subscribe_mid = None
        self.ready_printed = False
        self.exit_code = 0
        self.stop_event = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"paho-progress-{device_id}",   # 1.3
                                  protocol=mqtt.MQTTv5)                     # 1.2
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.client.on_disconnect = self.on_disconnect

    def say(self, line):
        with self.out_lock:
            print(line, flush=True)

    # -- connection and subscriptions (2.4, 12.3) ---------------------------------------------

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("CONNACK refused: %s", reason_code)
            return
        # 2.4: Retain Handling 2, QoS 1; 12.3: the cancel topic next to the service, in one
        # SUBSCRIBE so one SUBACK says both are in place. (Clean Start 1: every connection
        # subscribes again.)
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        _, self.subscribe_mid = client.subscribe([(self.request_topic, options),
                                                  (self.cancel_topic, options)])
        log.info("connected")

    def on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if mid != self.subscribe_mid:
            return
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused or len(reason_codes) != 2:
            log.error("the broker refused the subscriptions: %s", refused)
            self.exit_code = 1
            self.stop_event.set()
        elif not self.ready_printed:
            self.ready_printed = True
            self.say("ready")

    def on_disconnect(self, client, userdata, flags, reason_code, properties):
        if not self.stop_event.is_set():
            log.warning("connection lost (%s); paho reconnects", reason_code)

    # -- incoming messages (4, 12.3) ----------------------------------------------------------

    def on_message(self, client, userdata, msg):
        # Runs on paho's network thread: never sleeps, never waits for a request.
        try:
            if msg.retain:                                   # 2.4, 4.4
                log.warning("dropped a retained message on %s", msg.topic)
            elif msg.topic == self.cancel_topic:
                self.on_cancel(msg)
            elif msg.topic == self.request_topic:
                self.on_request(msg)
        except Exception:
            log.exception("while handling a message on %r", msg.topic)

    def on_request(self, msg):
        received = time.monotonic()
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic is None:
            log.info("dropped a one-way count request: it has nothing to do")   # 4.2, 12.4
            return
        if not usable_response_topic(response_topic):                           # 4.3
            log.warning("dropped a request with an unusable response topic %r", response_topic)
            return
        expiry = getattr(props, "MessageExpiryInterval", None)
        deadline = None if expiry is None else received + expiry                # 4.5
        if deadline is not None and time.monotonic() >= deadline:
            log.info("dropped an expired request")
            return
        request = Request(response_topic, getattr(props, "CorrelationData", None), deadline)
        with self.lock:
            busy = sum(len(s) for s in self.running.values()) >= MAX_RUNNING
            if not busy:
                self.running.setdefault(request.key, set()).add(request)
        if busy:                                                                # 5.6
            self.reply(request, b"the device is busy; retry later", "text/plain", status=503)
            return
        threading.Thread(target=self.count, args=(request, msg.payload), daemon=True).start()

    def on_cancel(self, msg):
        # 12.3: stop the request(s) with this Response Topic and Correlation Data; a cancel for
        # no running request is ignored, and a cancel is never answered.
        key = (getattr(msg.properties, "ResponseTopic", None),
               getattr(msg.properties, "CorrelationData", None))
        with self.lock:
            requests = self.running.pop(key, set())
        for request in requests:
            with request.lock:            # waits at most for one publish() call to return
                if request.replied:
                    continue
                request.cancelled.set()
            self.say(f"cancelled {request.hex}")

    # -- the service (12.1, 5) ----------------------------------------------------------------

    def count(self, request, payload):
        try:
            parsed, error = parse_count(payload)
            if error is not None:
                self.reply(request, error.encode(), "text/plain", status=400)   # 5.2
                return
            to, every_ms = parsed
            for n in range(1, to + 1):
                if request.cancelled.wait(every_ms / 1000.0):                   # 12.3: at once
                    return
                if not self.reply(request, json.dumps({"n": n}).encode(), "application/json",
                                  progress=True):
                    return
            if self.reply(request, json.dumps({"counted": to}).encode(), "application/json"):
                self.say(f"finished {request.hex}")
        finally:
            self.forget(request)

    def forget(self, request):
        with self.lock:
            requests = self.running.get(request.key)
            if requests is not None:
                requests.discard(request)
                if not requests:
                    del self.running[request.key]

    def reply(self, request, payload, content_type, status=None, progress=False):
        """Publish a progress message (12.1) or the reply (5.1) for request, unless it was
        cancelled (12.3) or its deadline passed (4.5, 12.1). True if it was published."""
        props = Properties(PacketTypes.PUBLISH)
        if request.correlation is not None:
            props.CorrelationData = request.correlation      # 4.1, 5.1: byte for byte
        props.ContentType = content_type                     # 5.1, 5.4
        props.PayloadFormatIndicator = 1                     # 3.1: both types are textual
        user_properties = []
        if status is not None and not progress:
            user_properties.append(("status", str(status)))  # 5.2: absent means 200
        if progress:
            user_properties.append(("rpc-progress", "true"))  # 12.1
        if user_properties:
            props.UserProperty = user_properties
        with request.lock:
            if request.cancelled.is_set() or self.stop_event.is_set():
                return False
            if request.deadline is not None and time.monotonic() >= request.deadline:
                log.info("request %s: deadline passed, stopped without a reply", request.hex)
                return False
            # 5.1: QoS 1, RETAIN 0. publish() only queues: it never waits for the network.
            self.client.publish(request.response_topic, payload, qos=1, retain=False,
                                properties=props)
            request.replied = not progress    # 12.1: nothing is sent after the reply
            return True

    # -- start and clean stop -----------------------------------------------------------------

    def run(self):
        self.client.connect_async(self.host, self.port, clean_start=True)
        self.client.loop_start()
        while not self.stop_event.wait(0.5):
            pass
        with self.lock:                   # abandon what still runs: nothing more is sent
            abandoned = [r for s in self.running.values() for r in s]
        for request in abandoned:
            with request.lock:
                request.cancelled.set()
        if abandoned:
            log.warning("stopping with %d request(s) unanswered", len(abandoned))
        self.client.disconnect()          # reason 0x00
        self.client.loop_stop()
        log.info("stopped")
        return self.exit_code

    def request_stop(self, signum, frame):
        log.info("signal %d: stopping", signum)
        self.stop_event.set()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device-id", default="py-1")
    args = parser.parse_args(argv)
    device_id = args.device_id
    if (not 1 <= len(device_id.encode("utf-8", "replace")) <= 256 or "/" in device_id
            or "+" in device_id or "#" in device_id or device_id.startswith("$")
            or not mqtt_string_ok(device_id)):
        parser.error(f"invalid device id {device_id!r} (PROTOCOL.md 2.2)")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s paho-progress %(levelname)s %(message)s")
    device = ProgressDevice(args.host, args.port, device_id)
    signal.signal(signal.SIGTERM, device.request_stop)
    signal.signal(signal.SIGINT, device.request_stop)
    return device.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
