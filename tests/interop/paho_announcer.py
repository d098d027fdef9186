"""A device that announces itself (docs/PROTOCOL.md section 11), written with Eclipse Paho
(Python) from the document alone: the interop tests check that the gateway's presence registry
and this device understand each other.

Usage: paho_announcer.py HOST PORT DEVICE_ID [--keepalive SECONDS] [--seq N]
                         [--topic-template T] [--presence-prefix P]

It offers two services on devices/DEVICE_ID/echo and devices/DEVICE_ID/add (one filter per
service, 2.4), announces them on presence/DEVICE_ID (11.2, 11.3), answers discovery requests on
presence/$discover (11.4) and repairs a late Will (11.3 step 6). It prints the single line
"ready" on stdout once its first birth has been acknowledged by the broker, and nothing else;
logs go to stderr. SIGTERM or SIGINT stops it cleanly (death, then DISCONNECT 0x00), exit 0.
"""

import argparse
import json
import logging
import math
import random
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("paho-announcer")

PROTOCOL = 1
LIBRARY = "paho-announcer/1"
MAX_SEQ = 2**53 - 1                   # 11.2: seq is an integer from 0 to 2^53-1
DEFAULT_WINDOW_MS = 5000              # 11.4
MAX_WINDOW_MS = 60000                 # 11.4
MIN_ANSWER_INTERVAL_S = 1.0           # 11.4: at most one answer per second
DEATH_ACK_TIMEOUT_S = 5.0

ADD_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["a", "b"],
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
}
ADD_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["sum"],
    "properties": {"sum": {"type": "number"}},
}
SERVICES = {
    "echo": {"description": "Replies with the request's payload and content type unchanged"},
    "add": {
        "description": "Adds two numbers: {\"a\": 1, \"b\": 2} gives {\"sum\": 3}",
        "request_schema": ADD_REQUEST_SCHEMA,
        "response_schema": ADD_RESPONSE_SCHEMA,
    },
}
METADATA = {"model": "paho-announcer", "language": "python"}


# ---------------------------------------------------------------------------------------------
# Strings (2.2, 3.1, 7.1)

def mqtt_string_ok(s):
    """7.1: at most 65535 bytes, no control character, no Unicode non-character."""
    try:
        if len(s.encode("utf-8")) > 65535:
            return False
    except UnicodeEncodeError:          # lone surrogates
        return False
    for ch in s:
        c = ord(ch)
        if c < 0x20 or 0x7F <= c <= 0x9F:
            return False
        if 0xFDD0 <= c <= 0xFDEF or (c & 0xFFFE) == 0xFFFE:
            return False
    return True


def name_ok(name):
    """2.2: a device id or service name."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    if not 1 <= size <= 256:
        return False
    if "/" in name or "+" in name or "#" in name or name.startswith("$"):
        return False
    return mqtt_string_ok(name)


def template_ok(template):
    """2.1: {device_id} and {service} once each, each a whole level; no +, #, NUL, leading $."""
    if template.count("{device_id}") != 1 or template.count("{service}") != 1:
        return False
    levels = template.split("/")
    if "{device_id}" not in levels or "{service}" not in levels:
        return False
    if "+" in template or "#" in template or "\0" in template or template.startswith("$"):
        return False
    return mqtt_string_ok(template)


def usable_response_topic(topic):
    """4.3: a topic a client may publish to."""
    return (bool(topic) and "+" not in topic and "#" not in topic
            and not topic.startswith("$") and mqtt_string_ok(topic))


def textual(content_type):
    """3.1: the textual content types."""
    base = content_type.split(";", 1)[0].strip().lower()
    return (base.startswith("text/") or base == "application/json" or base.endswith("+json")
            or base == "application/xml" or base.endswith("+xml"))


def is_utf8(payload):
    try:
        payload.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(payload):
    """Strict JSON (no NaN/Infinity); raises ValueError (UnicodeDecodeError is one)."""
    return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))


def discovery_window_ms(payload):
    """11.4: window_ms of a discovery request, at most 60000; 5000 for a bad payload."""
    try:
        request = parse_json(payload)
    except ValueError:
        return DEFAULT_WINDOW_MS
    if not isinstance(request, dict):
        return DEFAULT_WINDOW_MS
    window = request.get("window_ms")
    if not is_number(window) or window < 0:
        return DEFAULT_WINDOW_MS
    return min(window, MAX_WINDOW_MS)


def announcement_properties():
    """11.2: Content Type application/json, Payload Format Indicator 1."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    return props


# ---------------------------------------------------------------------------------------------
# The device

class Announcer:
    def __init__(self, args):
        self.host, self.port = args.host, args.port
        self.device_id = args.device_id
        self.keepalive = args.keepalive
        self.first_seq = args.seq
        self.request_topics = {
            args.topic_template.replace("{device_id}", self.device_id).replace("{service}", s): s
            for s in SERVICES
        }
        self.presence_topic = f"{args.presence_prefix}/{self.device_id}"
        self.discover_topic = f"{args.presence_prefix}/$discover"

        # Everything below is guarded by self.lock. Never take it in on_publish: paho calls
        # that holding its own _out_message_mutex, which client.publish() also takes.
        self.lock = threading.RLock()
        self.seq = None              # the seq of the current (or last tried) connection
        self.seq_used = False        # a socket was opened with it: the broker may know its Will
        self.generation = 0          # counts successful connections (CONNACK 0)
        self.connected = False
        self.subscribe_mid = None
        self.birth_published = False  # on the current connection
        self.timer = None            # the scheduled re-publication of the birth (11.4, 11.3.6)
        self.timer_due = None        # its time.monotonic()
        self.last_answer = None      # time.monotonic() of the last re-publication
        self.stopping = False
        self.ready_printed = False
        self.exit_code = 0
        self.stop_event = threading.Event()

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"paho-announcer-{self.device_id}",
                             protocol=mqtt.MQTTv5)
        client.on_pre_connect = self.on_pre_connect
        client.on_socket_open = self.on_socket_open
        client.on_connect = self.on_connect
        client.on_connect_fail = self.on_connect_fail
        client.on_disconnect = self.on_disconnect
        client.on_subscribe = self.on_subscribe
        client.on_publish = self.on_publish
        client.on_message = self.on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client = client

    # -- announcements (11.2) -----------------------------------------------------------------

    def birth_payload(self, seq):
        return json.dumps({
            "protocol": PROTOCOL,
            "device_id": self.device_id,
            "online": True,
            "seq": seq,
            "services": SERVICES,
            "metadata": METADATA,
            "library": LIBRARY,
        }, ensure_ascii=False).encode("utf-8")

    def death_payload(self, seq):
        return json.dumps({
            "protocol": PROTOCOL,
            "device_id": self.device_id,
            "online": False,
            "seq": seq,
        }, ensure_ascii=False).encode("utf-8")

    def publish_birth(self):
        """Called with self.lock held, so a clean stop cannot slip a death in before it."""
        log.info("birth seq=%d", self.seq)
        return self.client.publish(self.presence_topic, self.birth_payload(self.seq), qos=1,
                                   retain=True, properties=announcement_properties())

    # -- life cycle (11.3) --------------------------------------------------------------------

    def next_seq(self):
        """11.3 step 1: the wall clock in ms, raised to the previous + 1 if it has not moved."""
        now = time.time_ns() // 1_000_000
        if self.seq is None:
            return self.first_seq if self.first_seq is not None else now
        seq = max(now, self.seq + 1)
        if seq > MAX_SEQ:
            seq = now if now != self.seq else 0
        return seq

    def on_pre_connect(self, client, userdata):
        # Called by paho before every CONNECT it sends, reconnects included: the Will is fixed
        # at CONNECT time, so this is where each connection gets its seq and its own Will.
        with self.lock:
            if self.seq is None or self.seq_used:
                self.seq = self.next_seq()
                self.seq_used = False
            will = Properties(PacketTypes.WILLMESSAGE)
            will.ContentType = "application/json"
            will.PayloadFormatIndicator = 1
            will.WillDelayInterval = 0
            client.will_set(self.presence_topic, self.death_payload(self.seq), qos=1,
                            retain=True, properties=will)
            log.info("connecting to %s:%d, seq=%d", self.host, self.port, self.seq)

    def on_socket_open(self, client, userdata, sock):
        # From here on the broker may hold a connection with this seq's Will, so the next
        # connection must choose another seq (a socket that never opened reuses it).
        with self.lock:
            self.seq_used = True

    def on_connect_fail(self, client, userdata):
        log.warning("could not connect to %s:%d; retrying", self.host, self.port)

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("CONNACK refused: %s", reason_code)
            return
        with self.lock:
            self.generation += 1
            self.connected = True
            self.birth_published = False
            self.cancel_timer()
            if self.stopping:
                return
            if flags.session_present:
                # 11.3 step 3: a resumed session still has its subscriptions. (Never happens
                # here: the client always connects with Clean Start 1.)
                self.birth_after_subscriptions()
                return
            # 11.3 step 3 and 2.4: all four filters in one SUBSCRIBE, Retain Handling 2, so
            # its SUBACK also means that presence/<id> is subscribed before the birth goes
            # out: a late Will arriving after the birth is then always seen (step 6).
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            filters = [(topic, options) for topic in self.request_topics]
            filters += [(self.discover_topic, options), (self.presence_topic, options)]
            rc, mid = client.subscribe(filters)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("SUBSCRIBE not sent: %s", mqtt.error_string(rc))
            self.subscribe_mid = mid
        log.info("connected (seq=%d)", self.seq)

    def on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.lock:
            if mid != self.subscribe_mid or not self.connected or self.stopping:
                return
            self.subscribe_mid = None
            count = len(self.request_topics)
            refused = [(t, c) for t, c in zip(self.request_topics, reason_codes[:count])
                       if c.is_failure]
            if refused or len(reason_codes) < count:
                log.error("the broker refused the request subscriptions: %s", refused)
                self.exit_code = 1
                self.stop_event.set()
                return
            for topic, code in zip([self.discover_topic, self.presence_topic],
                                   reason_codes[count:]):
                if code.is_failure:
                    log.warning("subscription to %s refused (%s): no %s", topic, code,
                                "discovery" if topic == self.discover_topic
                                else "late Will repair")
            self.birth_after_subscriptions()

    def birth_after_subscriptions(self):
        """With self.lock held: the request topics are granted, publish the birth."""
        info = self.publish_birth()
        self.birth_published = True
        if not self.ready_printed:
            self.ready_printed = True
            threading.Thread(target=self.print_ready, args=(info,), daemon=True).start()

    def print_ready(self, info):
        # "ready" once the broker acknowledged the first birth (paho resends it after a
        # reconnect if the PUBACK never came).
        while not info.is_published():
            if self.stop_event.wait(0.05):
                return
        print("ready", flush=True)

    def on_publish(self, client, userdata, mid, reason_code, properties):
        # No self.lock here (see __init__).
        if reason_code.is_failure:
            log.warning("PUBLISH %d refused by the broker: %s", mid, reason_code)

    def on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.lock:
            self.connected = False
            self.birth_published = False
            self.subscribe_mid = None
            self.cancel_timer()
            stopping = self.stopping
        if not stopping:
            log.warning("connection lost (%s); paho reconnects", reason_code)

    # -- re-publishing the birth (11.4, 11.3 step 6) ------------------------------------------

    def cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        self.timer_due = None

    def schedule_birth(self, delay_s, why, urgent=False):
        """Re-publish the birth after delay_s, at most once per second. A discovery request
        joins an answer already scheduled (11.4); an urgent one (a late Will) brings it
        forward instead, and that one publication answers both."""
        with self.lock:
            if self.stopping or not self.connected or not self.birth_published:
                return            # 11.4: only once the birth is out on this connection
            now = time.monotonic()
            due = now + delay_s
            if self.last_answer is not None:
                due = max(due, self.last_answer + MIN_ANSWER_INTERVAL_S)
            if self.timer is not None:
                if not urgent or self.timer_due <= due:
                    log.debug("%s: joined to the answer already scheduled", why)
                    return
                self.cancel_timer()
            log.info("%s: birth again in %.3f s", why, due - now)
            timer = threading.Timer(max(0.0, due - now), self.answer, args=(self.generation,))
            timer.daemon = True
            self.timer, self.timer_due = timer, due
            timer.start()

    def answer(self, generation):
        with self.lock:
            if threading.current_thread() is not self.timer:
                return            # cancelled or replaced meanwhile
            self.timer = None
            self.timer_due = None
            if (self.stopping or not self.connected or not self.birth_published
                    or generation != self.generation):
                return
            self.last_answer = time.monotonic()
            self.publish_birth()

    def on_discover(self, msg):
        window = discovery_window_ms(msg.payload)
        self.schedule_birth(random.uniform(0, window) / 1000.0,
                            f"discovery request (window {window} ms)")

    def on_own_presence(self, msg):
        # 11.3 step 6: a death with another seq is a late Will of an earlier connection; being
        # retained it replaced our birth, so publish the birth again.
        try:
            announcement = parse_json(msg.payload)
        except ValueError:
            return
        if not isinstance(announcement, dict) or announcement.get("online") is not False:
            return
        seq = announcement.get("seq")
        with self.lock:
            current = self.seq
        if seq != current or isinstance(seq, bool):
            self.schedule_birth(0.0, f"late Will (seq {seq!r}, ours {current})", urgent=True)

    # -- requests (4) and replies (5) ---------------------------------------------------------

    def on_message(self, client, userdata, msg):
        try:
            if msg.topic == self.discover_topic:
                self.on_discover(msg)
            elif msg.topic == self.presence_topic:
                self.on_own_presence(msg)
            else:
                self.on_request(msg)
        except Exception:
            log.exception("while handling a message on %r", msg.topic)

    def on_request(self, msg):
        received = time.monotonic()
        if msg.retain:                                   # 2.4, 4.4
            log.warning("dropped a retained message on %s", msg.topic)
            return
        request = msg.properties
        response_topic = getattr(request, "ResponseTopic", None)
        if response_topic is not None and not usable_response_topic(response_topic):
            log.warning("dropped a request with an unusable response topic %r", response_topic)
            return                                       # 4.3
        expiry = getattr(request, "MessageExpiryInterval", None)
        deadline = None if expiry is None else received + expiry
        if deadline is not None and time.monotonic() >= deadline:
            log.info("dropped an expired request on %s", msg.topic)
            return                                       # 4.5

        service = self.request_topics.get(msg.topic)
        if service == "echo":
            payload, content_type, status = self.echo(msg)
            user_properties = [("served-by", "paho-announcer")]
        elif service == "add":
            payload, content_type, status = self.add(msg)
            user_properties = []
        else:                                            # 5.5 (cannot happen: one filter each)
            payload, content_type, status = (f"no service on {msg.topic!r}".encode(),
                                             "text/plain", 404)
            user_properties = []

        if response_topic is None:
            return                                       # 4.2: one-way
        if deadline is not None and time.monotonic() >= deadline:
            return                                       # 4.5: the caller gave up
        reply = Properties(PacketTypes.PUBLISH)
        correlation = getattr(request, "CorrelationData", None)
        if correlation is not None:
            reply.CorrelationData = correlation          # 4.1, 5.1: byte for byte
        if content_type is not None:
            reply.ContentType = content_type
            if textual(content_type) and is_utf8(payload):
                reply.PayloadFormatIndicator = 1         # 5.1, following 3.1
        if status is not None:
            user_properties = [("status", str(status))] + user_properties   # 5.2
        if user_properties:
            reply.UserProperty = user_properties
        self.client.publish(response_topic, payload, qos=1, retain=False, properties=reply)

    def echo(self, msg):
        content_type = getattr(msg.properties, "ContentType", None)
        if content_type is not None and not mqtt_string_ok(content_type):
            return b"the request's content type cannot be sent back", "text/plain", 500  # 7.1
        return msg.payload, content_type, None

    def add(self, msg):
        try:
            request = parse_json(msg.payload) if msg.payload else None   # empty is null (11.2)
        except ValueError:
            return b"the request is not JSON", "text/plain", 400
        if not (isinstance(request, dict) and is_number(request.get("a"))
                and is_number(request.get("b"))):
            return b'expected {"a": number, "b": number}', "text/plain", 400
        total = request["a"] + request["b"]
        if not is_number(total):
            return b"the sum is out of range", "text/plain", 400
        return json.dumps({"sum": total}).encode(), "application/json", None

    # -- start and clean stop -----------------------------------------------------------------

    def run(self):
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive,
                                  clean_start=True)
        self.client.loop_start()
        while not self.stop_event.wait(0.5):
            pass
        return self.stop()

    def request_stop(self, signum, frame):
        log.info("signal %d: stopping", signum)
        self.stop_event.set()

    def stop(self):
        """11.3 step 5: the death (same seq), then DISCONNECT 0x00, which discards the Will."""
        with self.lock:
            self.stopping = True
            self.cancel_timer()
            connected = self.connected
            if connected:
                info = self.client.publish(self.presence_topic, self.death_payload(self.seq),
                                           qos=1, retain=True,
                                           properties=announcement_properties())
                log.info("death seq=%d", self.seq)
        if not connected:
            # No connection to publish the death on: leave without DISCONNECT, so the broker
            # publishes the Will of any connection it still has.
            log.warning("not connected: stopping without a death, the Will stands")
            self.client.loop_stop()
            return self.exit_code
        acknowledged = False
        try:
            info.wait_for_publish(timeout=DEATH_ACK_TIMEOUT_S)
            acknowledged = info.is_published()
        except (RuntimeError, ValueError) as err:
            log.warning("the death was not published: %s", err)
        if acknowledged:
            self.client.disconnect()                     # reason 0x00: the Will is discarded
        else:
            # The death never got its PUBACK: let the broker publish the Will instead
            # (DISCONNECT 0x04, "Disconnect with Will Message").
            log.warning("the death was not acknowledged: disconnecting with the Will")
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                         identifier=0x04))
        self.client.loop_stop()
        log.info("stopped")
        return self.exit_code


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("device_id")
    parser.add_argument("--keepalive", type=int, default=60, metavar="SECONDS")
    parser.add_argument("--seq", type=int, default=None, metavar="N",
                        help="the seq of the first connection (default: wall clock in ms)")
    parser.add_argument("--topic-template", default="devices/{device_id}/{service}")
    parser.add_argument("--presence-prefix", default="presence")
    args = parser.parse_args(argv)
    if not name_ok(args.device_id):
        parser.error(f"invalid device id {args.device_id!r} (PROTOCOL.md 2.2)")
    if not template_ok(args.topic_template):
        parser.error(f"invalid topic template {args.topic_template!r} (PROTOCOL.md 2.1)")
    prefix = args.presence_prefix
    if (not prefix or "+" in prefix or "#" in prefix or prefix.startswith("$")
            or not mqtt_string_ok(prefix)):
        parser.error(f"invalid presence prefix {prefix!r}")
    if args.seq is not None and not 0 <= args.seq <= MAX_SEQ:
        parser.error("--seq must be from 0 to 2^53-1 (PROTOCOL.md 11.2)")
    if not 0 <= args.keepalive <= 65535:
        parser.error("--keepalive must be from 0 to 65535")
    if not 1 <= args.port <= 65535:
        parser.error("invalid port")
    return args


def main(argv):
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s paho-announcer %(levelname)s %(message)s")
    device = Announcer(args)
    signal.signal(signal.SIGTERM, device.request_stop)
    signal.signal(signal.SIGINT, device.request_stop)
    return device.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
