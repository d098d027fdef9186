"""Where the gateway's CPU goes, from folded stacks (inferno-collapse-perf): each stack goes to
the first category whose regex it matches, then to the first sub-category. Usage:
python3 cpu_breakdown.py gw.folded"""
import re, sys, collections
CATS = [
    ("MQTT connection task (connection::run)", r"mqtt::connection::run", [
        ("write syscalls (publish, PUBACK)", r"(writev|sys_write|sendto|sendmsg)"),
        ("read syscalls", r"(sys_read|recvfrom|readv|recvmsg|sys_recv)"),
        ("route_reply / parked calls", r"(route_reply|ParkedCalls|oneshot)"),
        ("encode publish", r"(Codec.*encode|mqttbytes.*write|Publish.*write)"),
        ("decode packets", r"(Codec.*decode|mqttbytes.*read)"),
        ("rest", r""),
    ]),
    ("HTTP connection tasks (hyper h1 Dispatcher)", r"(Dispatcher|h1::|hyper::proto|axum::serve)", [
        ("write syscalls (responses)", r"(writev|sys_write|sendto|sendmsg)"),
        ("read syscalls (requests)", r"(sys_read|recvfrom|readv|recvmsg|sys_recv)"),
        ("Caller::send: park + publish into rumqttc", r"(ParkedCalls::park|try_publish|into_publish|lock_link|flume)"),
        ("handler: extract, parse, build reply", r"(call_service|devices::|reply_response|Handler<)"),
        ("axum routing + tower layers", r"(axum::routing|tower_http|tower::|Router)"),
        ("hyper parse/encode", r"(role::Server|parse_headers|encode)"),
        ("rest", r""),
    ]),
    ("tokio scheduler: idle, park, wake", r"(epoll_wait|futex|park|Parker|Context::run|worker::run)", [
        ("epoll_wait", r"epoll_wait"),
        ("futex", r"futex"),
        ("rest", r""),
    ]),
    ("other", r"", [("all", r"")]),
]
stacks = []
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    stacks.append((stack, int(n)))
total = sum(n for _, n in stacks)
acc = collections.OrderedDict()
for name, pat, subs in CATS:
    acc[name] = collections.OrderedDict((s, 0) for s, _ in subs)
for stack, n in stacks:
    for name, pat, subs in CATS:
        if re.search(pat, stack):
            for sname, spat in subs:
                if re.search(spat, stack):
                    acc[name][sname] += n
                    break
            break
for name, subs in acc.items():
    tot = sum(subs.values())
    print(f"{100*tot/total:5.1f}%  {name}")
    for sname, v in subs.items():
        print(f"        {100*v/total:5.1f}%  {sname}")
