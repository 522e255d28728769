"""Demo spooler task: build a CSV report of several MB, reporting progress."""

from __future__ import annotations

import os
import random
import time

from django.conf import settings

from offload.tasks import TaskContext, TaskError, task


@task(name="build_report", retries=1)
def build_report(ctx: TaskContext, *, user_id: int, rows: int = 200_000, seconds: float = 10.0, fail: bool = False):
    """Write ``rows`` CSV rows (about 5 MB for 200k) over about ``seconds`` seconds.

    The file goes to REPORTS_DIR/<user_id>/<task_id>.csv, where the download
    view finds it (and checks that it belongs to the requesting user).
    """
    if fail:
        raise TaskError("the report generator was asked to fail")
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
