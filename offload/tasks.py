"""Slow Python work in the uWSGI spooler, reporting progress on a channel.

A view calls ``build_report.delay(channel="user:7", rows=1000)`` and gets a
task id at once; a spooler process (``spooler`` in uwsgi.ini) runs the
function later, so no gevent core waits for it. The job is a spool file on
disk: it survives restarts and is deleted only when the task succeeded or
failed for good (after its retries).

Every state change is published on the task's channel (if it has one) as
``{"kind": "task", "task_id", "name", "state", ...}`` and kept in a small Redis
hash, so a page can show a progress bar and the final result or error.

States::

    queued -> running -> (progress ...) -> done
                      \\-> retrying -> running ...
                      \\-> failed            (after ``retries`` extra attempts)

Bounds, so that one bad job cannot block the spooler for everyone:

* **Time limit.** Each attempt may run ``timeout`` seconds (``@task(timeout=)``,
  default ``OFFLOAD_TASK_TIMEOUT`` = 300 s). Past it :class:`TaskTimeout` is
  raised inside the task, whether it waits (a gevent sleep, a socket) or spins
  the CPU, and the attempt counts as failed (retried while retries remain).
  uWSGI's ``spooler-harakiri`` (600 s) stays as the last resort: it kills the
  whole spooler process, and uWSGI then runs the same spool file again.
* **Attempts.** Each run counts an attempt in Redis *before* the task starts.
  A spool file whose count already exceeds ``retries + 1`` (its earlier runs
  died with their process and never recorded an outcome) is not run again:
  the task is failed, the failure published, and the spool file deleted.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import conf, metrics
from .backend.publishing import publish
from .backend.redis_client import REDIS_ERRORS, get_client
from .exceptions import BackendUnavailable

__all__ = ["Task", "TaskContext", "TaskError", "TaskTimeout", "spooler", "task", "task_state"]

log = logging.getLogger("offload.tasks")

_registry: dict[str, Task] = {}
_STATE_TTL = 86400


class TaskError(Exception):
    """Raise from a task to fail it for good with this message (no retry)."""


class TaskTimeout(BaseException):
    """Raised inside a task that ran past its time limit.

    A ``BaseException`` (like ``gevent.Timeout``) so that a task's own
    ``except Exception`` cannot swallow it and run on.
    """


@dataclass
class TaskContext:
    """What a running task gets: its id and a way to report progress."""

    task_id: str
    name: str
    channel: str | None
    attempt: int

    def progress(self, fraction: float, text: str = "") -> None:
        """Report progress (0.0 to 1.0). Redis errors here never fail the task."""
        fraction = max(0.0, min(1.0, float(fraction)))
        _report(self, "running", progress=round(fraction, 4), text=text, quiet=True)


class Task:
    """A registered task function: ``fn(ctx, **kwargs) -> JSON-serializable``."""

    def __init__(self, fn: Callable[..., Any], name: str, retries: int, timeout: float | None = None) -> None:
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"task {name}: retries must be an int >= 0, not {retries!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"task {name}: timeout must be a number of seconds > 0, not {timeout!r}")
        self.fn = fn
        self.name = name
        self.retries = retries
        self.timeout = timeout

    @property
    def time_limit(self) -> float:
        """Seconds one attempt may run: ``timeout``, else ``OFFLOAD_TASK_TIMEOUT``."""
        return float(self.timeout if self.timeout is not None else conf.get("OFFLOAD_TASK_TIMEOUT"))

    def __call__(self, ctx: TaskContext, **kwargs: Any) -> Any:
        return self.fn(ctx, **kwargs)

    def delay(self, *, channel: str | None = None, owner: int | None = None, **kwargs: Any) -> str:
        """Queue the task; returns its id at once.

        Args:
            channel: where progress and the result are published (e.g. the
                requesting user's ``user:<id>``).
            owner: an opaque id stored with the state (e.g. a user id), for
                permission checks on the result.
            **kwargs: JSON-serializable arguments.

        Raises:
            BackendUnavailable: Redis is down (the task was not queued).
            RuntimeError: not running under uWSGI with a spooler.
        """
        task_id = uuid.uuid4().hex
        payload = json.dumps(kwargs, separators=(",", ":"))
        ctx = TaskContext(task_id, self.name, channel, 0)
        _save(task_id, {"name": self.name, "owner": "" if owner is None else str(owner), "attempts": 0})
        if conf.get("OFFLOAD_INLINE"):
            _run(self, ctx, json.loads(payload))  # benchmarks: "offloading disabled"
            return task_id
        try:
            import uwsgi
        except ImportError:
            raise RuntimeError("offload tasks need uWSGI's spooler (run under uwsgi --ini uwsgi.ini)") from None
        _report(ctx, "queued")  # before spooling: the spooler may start at once
        uwsgi.spool(
            {
                b"offload_task": self.name.encode(),
                b"task_id": task_id.encode(),
                b"channel": (channel or "").encode(),
                b"body": payload.encode(),
            }
        )
        return task_id


def task(fn: Callable | None = None, *, name: str | None = None, retries: int = 0, timeout: float | None = None):
    """Register a function as a spooler task (usable bare or with arguments).

    Args:
        name: the name spool files carry (default: module and function name).
        retries: extra attempts after a failure or a timeout (a
            :class:`TaskError` is never retried).
        timeout: seconds one attempt may run; None: ``OFFLOAD_TASK_TIMEOUT``
            (300 s). Keep it below uwsgi.ini's ``spooler-harakiri``.
    """

    def register(f: Callable) -> Task:
        task_name = name or f"{f.__module__}.{f.__qualname__}"
        registered = _registry[task_name] = Task(f, task_name, retries, timeout)
        return registered

    return register(fn) if fn is not None else register


def task_state(task_id: str) -> dict[str, str]:
    """The last known state of a task (empty if unknown or expired)."""
    try:
        raw = get_client().hgetall(_key(task_id))
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    return {k.decode(): v.decode() for k, v in raw.items()}


def spooler(env: dict) -> int:
    """uWSGI's spooler callback (installed by ``offload.apps``)."""
    import uwsgi

    name = env.get(b"offload_task", b"").decode()
    registered = _registry.get(name)
    if registered is None:
        log.error("spool file for unknown task %r kept for later: %s", name, env.get(b"spooler_task_name"))
        return uwsgi.SPOOL_IGNORE
    task_id = env[b"task_id"].decode()
    ctx = TaskContext(task_id, name, env.get(b"channel", b"").decode() or None, 0)
    try:
        ctx.attempt = int(get_client().hincrby(_key(task_id), "attempts", 1))
    except REDIS_ERRORS:
        log.warning("Redis down: task %s postponed", task_id)
        return uwsgi.SPOOL_RETRY
    allowed = registered.retries + 1
    if ctx.attempt > allowed:
        # Its earlier runs began and never recorded an outcome: their process
        # died (spooler-harakiri, a crash, SIGKILL). Running it again would
        # most likely die again, and uWSGI would re-run it forever.
        error = (
            f"gave up after {allowed} attempt{'s' if allowed > 1 else ''}: "
            "the task never finished (its spooler process was killed or crashed)"
        )
        log.error("task %s (%s): %s; spool file deleted", task_id, name, error)
        metrics.task_finished("failed")
        _report(ctx, "failed", error=error, attempt=ctx.attempt, quiet=True)
        return uwsgi.SPOOL_OK
    # uWSGI hands the spool file's body over under the *str* key "body".
    body = env.get("body") or env.get(b"body") or b"{}"
    outcome = _run(registered, ctx, json.loads(body), time_limit=registered.time_limit)
    metrics.task_finished(outcome)
    return uwsgi.SPOOL_RETRY if outcome == "retry" else uwsgi.SPOOL_OK


def _run(registered: Task, ctx: TaskContext, kwargs: dict, time_limit: float | None = None) -> str:
    started = time.monotonic()
    _report(ctx, "running", progress=0.0, attempt=ctx.attempt, quiet=True)
    try:
        with _limited(time_limit):
            result = registered(ctx, **kwargs)
    except TaskTimeout:
        retry = ctx.attempt <= registered.retries
        error = f"timed out after {time_limit:g} s"
        log.warning("task %s (%s) attempt %d %s", ctx.task_id, ctx.name, ctx.attempt, error)
        _report(ctx, "retrying" if retry else "failed", error=error, quiet=True)
        return "retry" if retry else "failed"
    except Exception as exc:
        retry = not isinstance(exc, TaskError) and ctx.attempt <= registered.retries
        log.warning("task %s (%s) attempt %d failed: %s", ctx.task_id, ctx.name, ctx.attempt, exc)
        if not isinstance(exc, TaskError):
            log.debug("%s", traceback.format_exc())
        state = "retrying" if retry else "failed"
        _report(ctx, state, error=str(exc) or type(exc).__name__, quiet=True)
        return "retry" if retry else "failed"
    try:
        _report(ctx, "done", result=result, seconds=round(time.monotonic() - started, 3))
    except BackendUnavailable:
        return "retry"  # keep the spool file: the result must reach the user
    return "done"


@contextmanager
def _limited(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TaskTimeout` in the running task after ``seconds``.

    A ``SIGALRM`` timer, because it interrupts every kind of hang: a Python
    handler runs between bytecodes, so it stops a CPU loop that a
    ``gevent.Timeout`` (which needs the task to yield) could never stop, and a
    blocking system call returns EINTR to run it. Under gevent (the spooler
    is monkey-patched) the signal may instead arrive while the hub runs,
    because the task waits in a gevent sleep or socket: raising there would
    kill the hub, so the exception is thrown into the task's greenlet from
    the hub's next callback, as ``gevent.Timeout`` itself does. uWSGI's
    spooler ignores ``SIGALRM``; the previous handler is put back after.

    Only in the main thread (signals are delivered there); elsewhere, and for
    ``seconds`` None, there is no limit.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    task_greenlet, hub = _greenlet_and_hub()
    active = True

    def throw_if_still_running(exc: TaskTimeout) -> None:
        if active:
            task_greenlet.throw(exc)

    def on_alarm(signum: int, frame: object) -> None:
        if not active:  # the task ended as the timer fired
            return
        exc = TaskTimeout(f"ran past its time limit of {seconds:g} s")
        if hub is None or _current_greenlet() is task_greenlet:
            raise exc
        hub.loop.run_callback(throw_if_still_running, exc)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _greenlet_and_hub() -> tuple[Any, Any]:
    """The current greenlet and gevent hub if gevent patched ``time``, else Nones."""
    try:
        from gevent import monkey
    except ImportError:
        return None, None
    if not monkey.is_module_patched("time"):
        return None, None
    import gevent

    return _current_greenlet(), gevent.get_hub()


def _current_greenlet() -> Any:
    import greenlet

    return greenlet.getcurrent()


def _key(task_id: str) -> str:
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}task:{task_id}"


def _save(task_id: str, fields: dict[str, Any]) -> None:
    try:
        client = get_client()
        client.hset(_key(task_id), mapping={k: str(v) for k, v in fields.items()})
        client.expire(_key(task_id), _STATE_TTL)
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


def _report(ctx: TaskContext, state: str, *, quiet: bool = False, **fields: Any) -> None:
    message = {"kind": "task", "task_id": ctx.task_id, "name": ctx.name, "state": state, **fields}
    try:
        stored = {"state": state}
        for key in ("progress", "error", "result"):
            if key in fields:
                stored[key] = json.dumps(fields[key])
        _save(ctx.task_id, stored)
        if ctx.channel:
            # At once, like the state saved above: progress reported from inside the
            # task's own transaction.atomic() must not wait for its commit.
            publish(ctx.channel, message, on_commit=False)
    except BackendUnavailable:
        if not quiet:
            raise
        log.warning("task %s: state %s not reported (Redis down)", ctx.task_id, state)
