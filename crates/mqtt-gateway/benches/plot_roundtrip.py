"""Draws the round-trip benchmark: throughput and p99 latency against calls in flight, the
gateway and raw MQTT 5 side by side, one row per payload size.

    python3 crates/mqtt-gateway/benches/plot_roundtrip.py target/tmp/roundtrip.json docs/benchmark-roundtrip.png

The JSON file is what `cargo bench --bench roundtrip` writes (its path is printed at the end).
Needs matplotlib (`pip install matplotlib`).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

# As in the benchmark: a phase during which other processes used more cores than this is disturbed.
NOISY_OTHER_CORES = 0.15

STYLE = {
    "raw-mqtt": {"color": "#555555", "marker": "o", "label": "raw MQTT 5 (no HTTP)"},
    "gateway": {"color": "#1f77b4", "marker": "s", "label": "gateway (default)"},
    "gateway-2-threads": {
        "color": "#ff7f0e",
        "marker": "^",
        "label": "gateway --worker-threads 2",
    },
}


def payload_label(size):
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def main(source, target):
    with open(source) as f:
        data = json.load(f)
    phases = data["phases"]
    # A curve needs two settings: sizes measured at one number in flight only (64 KiB) are
    # in the tables, not the plot.
    payloads = sorted(
        size
        for size in {p["payload"] for p in phases}
        if len({p["in_flight"] for p in phases if p["payload"] == size}) > 1
    )
    fig, axes = plt.subplots(len(payloads), 2, figsize=(11, 4.2 * len(payloads)), squeeze=False)
    for row, payload in enumerate(payloads):
        for path, style in STYLE.items():
            points = sorted(
                (p["in_flight"], p["sample"])
                for p in phases
                if p["payload"] == payload and p["path"] == path
            )
            if not points:
                continue
            x = [n for n, _ in points]
            throughput = [s["throughput"] for _, s in points]
            p99_ms = [s["p99_us"] / 1000 for _, s in points]
            axes[row][0].plot(x, throughput, **style)
            axes[row][1].plot(x, p99_ms, **style)
            # Phases that other processes disturbed (the report flags them too): ringed in red.
            for i, (_, s) in enumerate(points):
                if (s.get("other_cores") or 0) > NOISY_OTHER_CORES:
                    for ax, y in ((axes[row][0], throughput[i]), (axes[row][1], p99_ms[i])):
                        ax.plot(x[i], y, "o", ms=14, mfc="none", mec="red", mew=1.5)
                        ax.annotate("disturbed", (x[i], y), textcoords="offset points",
                                    xytext=(-30, -22), color="red", fontsize=8)
        label = payload_label(payload)
        axes[row][0].set_title(f"Throughput, {label} payload, QoS 1")
        axes[row][0].set_ylabel("calls per second")
        axes[row][0].set_ylim(bottom=0)
        axes[row][1].set_title(f"p99 latency, {label} payload, QoS 1")
        axes[row][1].set_ylabel("milliseconds (log scale)")
        axes[row][1].set_yscale("log")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 16, 64, 256], ["1", "16", "64", "256"])
            ax.set_xlabel("calls in flight")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"mqtt-gateway vs raw MQTT 5 request/response — {data['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
