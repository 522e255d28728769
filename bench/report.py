"""What a scenario's report is made of, as data: tables of ``(heading, getter)`` columns applied to rows of results,
paragraph templates, verdicts, warnings and the PNG's panels (drawn by ``bench.plot`` in the bench venv)."""

from __future__ import annotations

from collections.abc import Callable

Column = tuple[str, Callable[[dict], object]]


def cell(value, suffix: str = "") -> str:
    """A table cell: numbers rounded for reading, missing values as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        return text + suffix
    return f"{value}{suffix}"


def table(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def columns_table(columns: list[Column], rows: list[tuple[str, dict]], first: str = "window") -> str:
    """One row per ``(title, item)``, a cell per column; an item with an ``error`` shows it instead."""
    out = []
    for title, item in rows:
        if "error" in item:
            out.append([f"{title}: FAILED ({item['error'][:160]})"] + [""] * len(columns))
        else:
            out.append([title] + [cell(get(item)) for _, get in columns])
    return table([first] + [head for head, _ in columns], out)


def grid(first: str, rows: list[tuple[str, Callable]], columns: list[tuple[str, Callable]]) -> str:
    """The transposed form: one row per ``(title, getter)``, the cell of a column is ``column(getter)``."""
    rows = [[t] + [cell(f(get)) for _, f in columns] for t, get in rows]
    return table([first] + [head for head, _ in columns], rows)


def latency(of=lambda w: w["broadcast"], prefix: str = "") -> list[Column]:
    """p50, p90, p99 and max columns of a latency summary (``bench.stats``), by default the deliveries'."""
    return [(f"{prefix}{q} ms", lambda w, q=q: of(w)[q]) for q in ("p50", "p90", "p99", "max")]


def cpu(group: str, head: str | None = None) -> Column:
    return (head or f"{group} %core", lambda w: w["cpu"]["groups"].get(group, {}).get("core_pct"))


DELIVERIES: Column = ("deliveries/s", lambda w: w["broadcast"]["deliveries_per_s"])
LOST: Column = ("lost / dup", lambda w: f"{w['broadcast'].get('lost', '—')} / {w['broadcast'].get('dup', '—')}")
API_P99: Column = ("publish API p99 ms", lambda w: w["publish"]["p99"])
SERVER_US: Column = ("server µs/delivery", lambda w: w["server_us_per_delivery"])
LAG: Column = ("client lag p99 ms", lambda w: w["client_loop_lag"]["p99"])
DRAIN: Column = ("drain s", lambda w: w.get("drain_s"))


def verdict(items: dict[str, tuple]) -> dict:
    """``{name: (value, op, target)}`` -> ``{name: {value, op, target, met}}``; op ``""``: no target."""
    ops = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t}
    met = {name: None if v is None or not op else ops[op](v, t) for name, (v, op, t) in items.items()}
    return {name: {"value": v, "op": op, "target": t, "met": met[name]} for name, (v, op, t) in items.items()}


def fill(template: str, knobs: dict = {}, **values) -> str:  # noqa: B006 (only read)
    """A paragraph template (``str.format``) filled with ``knobs`` (as set) and figures (as table cells)."""
    text = {k: f"{v:,}" if isinstance(v, int) else f"{v:g}" if isinstance(v, float) else v for k, v in knobs.items()}
    return template.format(**text, **{k: v if isinstance(v, str) else cell(v) for k, v in values.items()})


def heading(results: dict, title: str, text: str) -> list[str]:
    """The title and the run's first paragraph (how to reproduce it, where, what)."""
    m = results["machine"]
    where = f"`{results['command']}` on {m['cpus']} CPUs, commit {m['commit']}"
    return [f"## {title}, {results['started']}", "", f"{where}; {text}", ""]


def closing(results: dict, first: str = "target") -> list[str]:
    """The targets table of the verdict and the "Warnings" paragraph that end every report."""
    rows = []
    for name, v in results["verdict"].items():
        state = "for comparison" if not v["op"] else "not measured" if v["met"] is None else "met"
        state = "**MISSED**" if v["met"] is False else state
        rows.append([name, cell(v["value"]), f"{v['op']} {v['target']:,}" if v["op"] else "—", state])
    lines = [table([first, "measured", "target", "state"], rows)] if rows else []
    warnings = results.get("warnings")
    return lines + (["", "**Warnings**:", ""] + [f"* {x}" for x in warnings] if warnings else [])


def colours(names: list[str]) -> dict[str, str]:
    """Ours in blues, Channels setups (and whatever is compared with ours) in reds."""
    blues = iter(["tab:blue", "tab:cyan", "navy", "tab:purple", "tab:green", "steelblue"])
    reds = iter(["tab:red", "tab:orange", "tab:brown", "tab:pink", "darkred", "salmon"])
    ours = [n.startswith(("ours", "baseline")) or (n.startswith("offloading") and "disabled" not in n) for n in names]
    return {n: next(blues if mine else reds, "tab:gray") for n, mine in zip(names, ours, strict=True)}


def _series(windows: dict[str, dict], style, x, y) -> list[dict]:
    colour = colours(list(windows))
    return [{"label": n, "x": x(w), "y": y(w), "style": style(n), "color": colour[n]} for n, w in windows.items()]


def cdf(title: str, curves: dict[str, dict], style=lambda name: "-") -> dict:
    """A CDF panel of latency summaries (their ``cdf_ms``) by label."""
    return {"kind": "cdf", "title": title, "series": _series(curves, style, lambda s: s.get("cdf_ms") or [], len)}


def timeline(title: str, windows: dict[str, dict], style=lambda name: "-", marks=()) -> dict:
    """The per-second delivery p99 of each window."""
    rows = lambda w: w["broadcast"]["timeline"]  # noqa: E731
    series = _series(windows, style, lambda w: [r[0] for r in rows(w)], lambda w: [r[2] for r in rows(w)])
    more = {"ylabel": "p99 per second (ms, log)", "log": True, "series": series, "marks": list(marks)}
    return {"kind": "lines", "title": title, **more}


def bars_of(title: str, ylabel: str, items: dict[str, dict], get, **more) -> dict:
    """A bar per item: ``get(item)``."""
    return bars(title, ylabel, {name: get(item) for name, item in items.items()}, **more)


def bars(title: str, ylabel: str, values: dict[str, float | None], **more) -> dict:
    colour = colours(list(values))
    more.update(labels=list(values), values=list(values.values()), colors=[colour[n] for n in values])
    return {"kind": "bars", "title": title, "ylabel": ylabel, **more}


def window_warnings(where: str, w: dict, client: str = "clients", lost: bool = True) -> list[str]:
    """What makes one window's figures doubtful: the reader should see it next to them."""
    b, cpu, lag, out = w["broadcast"], w["cpu"]["groups"], w["client_loop_lag"]["p99"] or 0, []
    if lost and (b.get("lost") or b.get("dup")):
        out.append(f"{where}: {b['lost']} lost, {b['dup']} duplicate deliveries")
    if w["disconnects"]["count"]:
        out.append(f"{where}: {w['disconnects']['count']} websockets closed {w['disconnects']['codes']}")
    if lag > 20:
        out.append(f"{where}: the event loop of the {client} lagged (p99 {lag} ms)")
    if cpu.get(client, {}).get("core_pct", 0) > 85:
        out.append(f"{where}: {client} at {cpu[client]['core_pct']:.0f}% of a core: client-bound")
    if cpu["other"]["core_pct"] > 20:
        out.append(f"{where}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
    return out
