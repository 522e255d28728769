"""``python -m bench.plot RESULTS.json OUT.png`` (bench venv): the report's picture.

One drawing function per scenario, chosen by the JSON's ``scenario`` field.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

COLORS = {"offload": "tab:blue", "inline": "tab:red"}
LABELS = {"offload": "offloading", "inline": "offloading disabled"}
STYLES = {"idle": ":", "loaded": "-"}


def _plain_log(axis) -> None:
    """Log scale with plain tick labels at 1, 2, 5, 10, 20 ... (no 2x10^0 clutter)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _cdf(ax, summary: dict, kind: str, title: str) -> None:
    for mode, result in summary.items():
        for window in ("idle", "loaded"):
            points = result[window][kind].get("cdf_ms") or []
            if points:
                ys = [i / (len(points) - 1) for i in range(len(points))] if len(points) > 1 else [1.0]
                ax.plot(points, ys, STYLES[window], color=COLORS.get(mode), label=f"{LABELS.get(mode, mode)}, {window}")
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _timeline(ax, summary: dict) -> None:
    for mode, result in summary.items():
        for window in ("idle", "loaded"):
            rows = result[window]["broadcast"].get("timeline") or []
            if rows:
                ax.plot(
                    [r[0] for r in rows],
                    [r[2] for r in rows],
                    STYLES[window],
                    color=COLORS.get(mode),
                    label=f"{LABELS.get(mode, mode)}, {window}",
                )
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_xlabel("second of the window")
    ax.set_ylabel("p99 broadcast latency (ms, log)")
    ax.set_title("broadcast p99, per second")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _ratios(ax, verdict: dict, target: float) -> None:
    names = ["broadcast_p50", "broadcast_p99", "view_p50", "view_p99"]
    modes = list(verdict)
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        values = [verdict[mode]["ratios"].get(n) or 0 for n in names]
        xs = [x + i * width for x in range(len(names))]
        bars = ax.bar(xs, values, width, color=COLORS.get(mode), label=LABELS.get(mode, mode))
        ax.bar_label(bars, labels=[f"{v:.1f}x" for v in values], fontsize=7)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}x")
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(names))], [n.replace("_", " ") for n in names])
    ax.set_yscale("log")
    highest = max([v for mode in modes for v in verdict[mode]["ratios"].values() if v] + [target])
    ax.set_ylim(0.5, highest * 1.4)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= highest * 1.4]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_ylabel("loaded / idle (log)")
    ax.set_title("degradation under load")
    ax.legend(fontsize=7)


def draw_offload(results: dict, path: str) -> None:
    summary = results["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _cdf(axes[0][0], summary, "broadcast", "websocket broadcast latency (all deliveries)")
    _cdf(axes[0][1], summary, "view", "Django view latency (GET /accounts/login/)")
    _timeline(axes[1][0], summary)
    _ratios(axes[1][1], results["verdict"], 2.0)
    cfg = results["config"]
    fig.suptitle(
        f"offload benchmark {results['started']}: {cfg['subscribers']} subscribers x {cfg['rate']:g} msg/s; "
        f"load = {cfg['downloads']} slow downloads + {cfg['tasks']} tasks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fanout_windows(results: dict) -> list[tuple[str, dict, bool]]:
    """(label, window, is ours) of every fixed-rate window, ours first."""
    k, out = results["knobs"], []
    for name, n in (("fanout_small", k["small"]), ("fanout_large", k["large"]), ("fanout_storm", k["storm"])):
        if name in results["ours"]["windows"]:
            out.append((f"ours, {n:,} sockets", results["ours"]["windows"][name], True))
    for combo, a in results["channels"].items():
        if "windows" in a:
            out.append((f"Channels {combo}, {k['small']:,}", a["windows"]["fanout_small"], False))
    return out


def draw_fanout(results: dict, path: str) -> None:
    k = results["knobs"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    ax = axes[0]
    for label, w, ours in _fanout_windows(results):
        points = w["broadcast"].get("cdf_ms") or []
        if points:
            ys = [i / (len(points) - 1) for i in range(len(points))] if len(points) > 1 else [1.0]
            ax.plot(points, ys, "-" if ours else "--", label=label)
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("delivery latency (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(f"fan-out latency at {k['rate']:g} msgs/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    bars = [
        (f"ours {name[4:]}/s", w["broadcast"]["deliveries_per_s"], w.get("server_us_per_delivery"), "tab:blue")
        for name, w in results["ours"]["windows"].items()
        if name.startswith("sat_")
    ]
    bars += [
        (
            combo,
            a["windows"]["sat"]["broadcast"]["deliveries_per_s"],
            a["windows"]["sat"].get("server_us_per_delivery"),
            "tab:red",
        )
        for combo, a in results["channels"].items()
        if "windows" in a
    ]
    names = [b[0] for b in bars]
    for ax, idx, title, ylabel in (
        (axes[1], 1, f"saturation, {k['small']:,} sockets", "deliveries/s (log)"),
        (axes[2], 2, "server CPU per delivery, saturated", "µs per delivery (log)"),
    ):
        values = [b[idx] or 0 for b in bars]
        drawn = ax.bar(range(len(bars)), values, color=[b[3] for b in bars])
        ax.bar_label(drawn, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(bars)), names, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        positive = [v for v in values if v > 0]
        if positive:
            ax.set_ylim(min(positive) / 3, max(positive) * 2)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(
        f"fan-out benchmark {results['started']}: one uWSGI worker (blue) vs Django Channels 4 (red), "
        "same Redis and client"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


DRAW = {"offload": draw_offload, "fanout": draw_fanout}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        results = json.load(f)
    DRAW[results["scenario"]](results, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
