"""Demo spooler tasks: build a CSV report of several MB, reporting progress (and a hang, for tests)."""

from __future__ import annotations

import math
import os
import random
import time

from django.conf import settings

from offload.tasks import TaskContext, TaskError, task

# At most 60 s of pauses (app.forms.ReportForm) plus writing 2,000,000 rows
# (under 4 s here): twice that is a hang, well before spooler-harakiri (600 s).
REPORT_TIMEOUT = 120.0


@task(name="build_report", retries=1, timeout=REPORT_TIMEOUT)
def build_report(ctx: TaskContext, *, user_id: int, rows: int = 200_000, seconds: float = 10.0, fail: bool = False):
    """Write ``rows`` CSV rows (about 5 MB for 200k) over about ``seconds`` seconds.

    The file goes to REPORTS_DIR/<user_id>/<task_id>.csv, where the download
    view finds it (and checks that it belongs to the requesting user).
    """
    if fail:
        raise TaskError("the report generator was asked to fail")
    # The view validated them, but a spool file queued before that (or by other
    # code) may not be: sleep(nan) never returns under gevent.
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise TaskError(f"seconds must be a finite number >= 0, not {seconds!r}")
    if not (isinstance(rows, int) and rows >= 1):
        raise TaskError(f"rows must be a whole number >= 1, not {rows!r}")
    directory = settings.REPORTS_DIR / str(user_id)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ctx.task_id}.csv"
    tmp = path.with_suffix(".part")
    steps = 20
    per_step = max(1, rows // steps)
    rng = random.Random(ctx.task_id)
    with open(tmp, "w") as f:
        f.write("row,region,product,units,price\n")
        for step in range(steps):
            start = step * per_step
            lines = (
                f"{n},{rng.choice('NESW')},{rng.randrange(1000):04d},{rng.randrange(1, 50)},{rng.random() * 100:.2f}\n"
                for n in range(start, start + per_step)
            )
            f.writelines(lines)
            time.sleep(seconds / steps)
            ctx.progress((step + 1) / steps, f"{start + per_step:,} rows")
    os.replace(tmp, path)
    return {"download": f"/reports/{ctx.task_id}/download", "bytes": path.stat().st_size}


@task(name="demo_hang", retries=1, timeout=1.0)
def demo_hang(ctx: TaskContext, *, spin: bool = False) -> None:
    """Demo and tests only: a task that never ends (no view queues it).

    It shows that a hung task is stopped by its time limit inside the spooler
    (retried once, then failed, and the user told) instead of holding a
    spooler process until spooler-harakiri kills it. ``spin`` hangs on the
    CPU (no gevent yield at all) instead of in a sleep. The integration tests
    queue it by writing a spool file, as ``uwsgi.spool`` would.
    """
    if spin:
        while True:
            pass
    time.sleep(3600)
