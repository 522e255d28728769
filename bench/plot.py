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
        positive = [v for v in values if v > 0]
        if positive:  # a run without saturation steps has nothing to scale
            ax.set_yscale("log")
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


def _bars(ax, bars: list[tuple[str, float | None, str]], title: str, ylabel: str, log: bool = True) -> None:
    """One bar per (label, value, colour); values written on top."""
    values = [b[1] or 0 for b in bars]
    drawn = ax.bar(range(len(bars)), values, color=[b[2] for b in bars])
    ax.bar_label(drawn, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=7)
    positive = [v for v in values if v > 0]
    if log and positive:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_ylim(min(positive) / 3, max(positive) * 3)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def _cdf_lines(ax, curves: list[tuple[str, list[float], str, str]], title: str) -> None:
    """(label, cdf_ms points, colour, line style) per curve, log x."""
    for label, points, color, style in curves:
        if points:
            ys = [i / (len(points) - 1) for i in range(len(points))] if len(points) > 1 else [1.0]
            ax.plot(points, ys, style, color=color, label=label)
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("delivery latency (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _latency_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def draw_manychannels(results: dict, path: str) -> None:
    k = results["knobs"]
    rate = k["rate_per_channel"] * k["channels"]
    setups = [("ours", results["ours"], "tab:blue")]
    reds = iter(["tab:red", "tab:orange", "tab:brown", "tab:pink"])
    setups += [(combo, a, next(reds, "tab:gray")) for combo, a in results["channels"].items() if "windows" in a]
    windows = [
        (f"{name} {wname}", setup, w, color) for name, setup, color in setups for wname, w in setup["windows"].items()
    ]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _cdf_lines(
        axes[0][0],
        [
            (f"{label} ({s['sockets']:,})", w["broadcast"].get("cdf_ms") or [], c, "--" if "api" in label else "-")
            for label, s, w, c in windows
        ],
        f"delivery latency, {rate:,.0f} publishes/s over {k['channels']:,} channels",
    )
    ax = axes[0][1]
    xs = range(len(windows))
    for offset, key, hatch in ((-0.2, "p50", ""), (0.2, "p99", "//")):
        values = [w["broadcast"][key] or 0 for _, _, w, _ in windows]
        drawn = ax.bar([x + offset for x in xs], values, 0.4, color=[c for *_, c in windows], hatch=hatch, label=key)
        ax.bar_label(drawn, labels=[_latency_label(v) for v in values], fontsize=6)
    ax.set_xticks(list(xs), [label for label, *_ in windows], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_ylabel("ms (log)")
    ax.set_title("delivery latency p50 (plain) and p99 (hatched)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _bars(
        axes[1][0],
        [(label, w.get("server_us_per_delivery"), c) for label, _, w, c in windows],
        "server CPU per delivery",
        "µs per delivery (log)",
    )
    _bars(
        axes[1][1],
        [(f"{name} ({s['sockets']:,})", s["idle_rss"]["per_socket_kib"], c) for name, s, c in setups],
        "server memory per idle socket",
        "KiB per socket",
        log=False,
    )
    fig.suptitle(
        f"many channels {results['started']}: {results['ours']['sockets']:,} sockets over {k['channels']:,} channels, "
        f"one uWSGI worker (blue) vs Django Channels 4 (red), same Redis and client"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _publish_style(label: str) -> str:
    return "--" if "http" in label else ":" if "threads" in label else "-"


def draw_publish(results: dict, path: str) -> None:
    k = results["knobs"]
    rows = [(f"ours {name}", w, "tab:blue") for name, w in results["ours"]["windows"].items()]
    reds = iter(["tab:red", "tab:orange", "tab:brown", "tab:pink"])
    for combo, a in results["channels"].items():
        if "windows" in a:
            color = next(reds, "tab:gray")
            rows += [(f"{combo} {name}", w, color) for name, w in a["windows"].items()]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    _bars(
        axes[0],
        [(label, w["publisher"].get("publishes_per_s"), c) for label, w, c in rows],
        f"publishes/s, {k['concurrency']} callers, closed loop",
        "publishes/s (log)",
    )
    ax = axes[1]
    xs = range(len(rows))
    for offset, key, hatch in ((-0.2, "p50", ""), (0.2, "p99", "//")):
        values = [w["publisher"]["latency"][key] or 0 for _, w, _ in rows]
        drawn = ax.bar([x + offset for x in xs], values, 0.4, color=[c for *_, c in rows], hatch=hatch, label=key)
        ax.bar_label(drawn, labels=[_latency_label(v) for v in values], fontsize=6)
    ax.set_xticks(list(xs), [label for label, *_ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_ylabel("ms per call (log)")
    ax.set_title("call latency p50 (plain) and p99 (hatched)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _cdf_lines(
        axes[2],
        [(label, w["broadcast"].get("cdf_ms") or [], c, _publish_style(label)) for label, w, c in rows],
        f"delivery latency, {k['subscribers']:,} sockets over {k['channels']:,} channels",
    )
    fig.suptitle(
        f"publish throughput {results['started']}: offload.publish() / HTTP API of one uWSGI worker (blue) vs "
        "Django Channels 4 group_send / publish view (red), same Redis"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def draw_backpressure(results: dict, path: str) -> None:
    k, windows = results["knobs"], results["windows"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    palette = {"baseline": ["tab:blue", "tab:cyan", "navy"], "stalled": ["tab:red", "tab:orange", "darkred"]}
    colour: dict[str, str] = {}
    for name, w in windows.items():
        same = [n for n in colour if windows[n]["kind"] == w["kind"]]
        colour[name] = palette[w["kind"]][len(same) % 3]

    ax = axes[0]
    for name, w in windows.items():
        points = w["broadcast"].get("cdf_ms") or []
        if points:
            ys = [i / (len(points) - 1) for i in range(len(points))] if len(points) > 1 else [1.0]
            ax.plot(points, ys, "-" if w["kind"] == "baseline" else "--", color=colour[name], label=name)
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("fast delivery latency (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(f"{k['fast']:,} fast subscribers, {k['rate']:g} x {k['payload'] // 1024} KiB msgs/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1]
    for name, w in windows.items():
        rows = w["broadcast"].get("timeline") or []
        ax.plot(
            [r[0] for r in rows], [r[2] for r in rows], "-" if w["kind"] == "baseline" else "--", color=colour[name]
        )
        for r in (w.get("stalled") or {}).get("sockets", []):
            if r["dropped_s"] is not None:
                ax.axvline(r["dropped_s"], color=colour[name], alpha=0.25, linewidth=1)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_xlabel("second of the window (thin lines: a stalled socket closed by the server)")
    ax.set_ylabel("fast p99 per second (ms, log)")
    ax.set_title(f"fast p99 over time; stalled windows add {k['stalled']} sockets that never read")
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[2]
    run = results.get("rss_run") or {}
    samples = run.get("samples") or []
    ax.plot([x[0] for x in samples], [x[1] for x in samples], "-", color="black", linewidth=1)
    for mark in run.get("windows", []):
        if len(mark) == 4:
            name, _kind, start, end = mark
            ax.axvspan(start, end, color=colour[name], alpha=0.15, label=name)
    ax.set_xlabel("second of the measured run (shaded: windows)")
    ax.set_ylabel("worker RSS (MiB)")
    ax.set_title(f"worker memory over the run (queue limit {k['queue']} messages)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ratio = results["summary"].get("p99_ratio")
    fig.suptitle(
        f"slow-consumer benchmark {results['started']}: fast p99 stalled / baseline = "
        f"{ratio if ratio is not None else '?'}x (target <= 1.5x)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


DRAW = {"offload": draw_offload, "fanout": draw_fanout}
DRAW.update({"manychannels": draw_manychannels, "publish": draw_publish})
DRAW.update({"backpressure": draw_backpressure})


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
