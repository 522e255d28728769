"""``python -m bench.plot RESULTS.json OUT.png`` (bench venv): draws the panels a scenario describes as data
(``results["plot"]``): ``cdf`` (latency CDFs, log x), ``bars`` (values on top) and ``lines`` (series over time)."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter


def _log(ax, axis: str, values: list[float]) -> None:
    """Log scale with plain tick labels at 1, 2, 5, 10 ... (no 2x10^0 clutter), when there is data."""
    if not any(v and v > 0 for v in values):
        return
    getattr(ax, f"set_{axis}scale")("log")
    scale = getattr(ax, f"{axis}axis")
    scale.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    scale.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    scale.set_minor_formatter(NullFormatter())


def cdf(ax, panel: dict) -> None:
    for s in (s for s in panel["series"] if s["x"]):  # evenly spaced quantiles: their ECDF is the samples' CDF
        ax.ecdf(s["x"], linestyle=s.get("style", "-"), color=s.get("color"), label=s["label"])
    _log(ax, "x", [v for s in panel["series"] for v in s["x"]])
    ax.set_xlabel(panel.get("xlabel", "latency (ms, log)"))
    ax.set_ylabel("fraction of samples")


def lines(ax, panel: dict) -> None:
    for s in panel["series"]:
        ax.plot(s["x"], s["y"], s.get("style", "-"), color=s.get("color"), label=s["label"])
    for x in panel.get("marks", []):
        ax.axvline(x, color="gray", alpha=0.3, linewidth=1)
    if panel.get("log"):
        _log(ax, "y", [v for s in panel["series"] for v in s["y"]])
    ax.set_xlabel(panel.get("xlabel", "second of the window"))
    ax.set_ylabel(panel.get("ylabel", ""))


def bars(ax, panel: dict) -> None:
    values = [v or 0 for v in panel["values"]]
    drawn = ax.bar(range(len(values)), values, color=panel.get("colors"), hatch=panel.get("hatch"))
    ax.bar_label(drawn, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(values)), panel["labels"], rotation=30, ha="right", fontsize=7)
    if panel.get("target"):
        ax.axhline(panel["target"], color="black", linestyle="--", linewidth=1, label=f"target {panel['target']:g}")
    if panel.get("log", True):
        _log(ax, "y", values)
    ax.set_ylabel(panel.get("ylabel", ""))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        plot = json.load(f)["plot"]
    panels = plot["panels"]
    rows = (len(panels) + 2) // 3
    fig, axes = plt.subplots(rows, min(3, len(panels)), figsize=(6 * min(3, len(panels)), 5 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        {"cdf": cdf, "lines": lines, "bars": bars}[panel["kind"]](ax, panel)
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(plot["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
