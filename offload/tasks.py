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
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import conf
from .exceptions import BackendUnavailable
from .publishing import publish
from .redis_client import REDIS_ERRORS, get_client

__all__ = ["Task", "TaskContext", "TaskError", "spooler", "task", "task_state"]

log = logging.getLogger("offload.tasks")

_registry: dict[str, Task] = {}
_STATE_TTL = 86400


class TaskError(Exception):
    """Raise from a task to fail it for good with this message (no retry)."""


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

    def __init__(self, fn: Callable[..., Any], name: str, retries: int) -> None:
        self.fn = fn
        self.name = name
        self.retries = retries

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


def task(fn: Callable | None = None, *, name: str | None = None, retries: int = 0):
    """Register a function as a spooler task (usable bare or with arguments)."""

    def register(f: Callable) -> Task:
        task_name = name or f"{f.__module__}.{f.__qualname__}"
        registered = _registry[task_name] = Task(f, task_name, retries)
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
    # uWSGI hands the spool file's body over under the *str* key "body".
    body = env.get("body") or env.get(b"body") or b"{}"
    outcome = _run(registered, ctx, json.loads(body))
    return uwsgi.SPOOL_RETRY if outcome == "retry" else uwsgi.SPOOL_OK


def _run(registered: Task, ctx: TaskContext, kwargs: dict) -> str:
    started = time.monotonic()
    _report(ctx, "running", progress=0.0, attempt=ctx.attempt, quiet=True)
    try:
        result = registered(ctx, **kwargs)
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
            publish(ctx.channel, message)
    except BackendUnavailable:
        if not quiet:
            raise
        log.warning("task %s: state %s not reported (Redis down)", ctx.task_id, state)
