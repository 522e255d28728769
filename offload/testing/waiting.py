"""Waiting on observable state instead of sleeping, with budgets a slow machine can stretch."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")


# -- time budgets ------------------------------------------------------------------


def timeout_factor() -> float:
    """``OFFLOAD_TEST_TIMEOUT_FACTOR`` from the environment (default 1): multiplies every time budget.

    Set it on a slow machine (``OFFLOAD_TEST_TIMEOUT_FACTOR=3``): the tests then
    wait longer and still pass or fail, instead of being skipped.

    Raises:
        ValueError: the variable is not a positive number.
    """
    raw = os.environ.get("OFFLOAD_TEST_TIMEOUT_FACTOR", "1")
    factor = float(raw)
    if not factor > 0:
        raise ValueError(f"OFFLOAD_TEST_TIMEOUT_FACTOR must be a positive number, not {raw!r}")
    return factor


class WaitTimeout(TimeoutError, AssertionError):
    """:func:`wait_for` ran out of time: a ``TimeoutError``, and a failed assertion for a test."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions from ``predicate`` count as "not yet" (a server still starting
    refuses connections); the last one is reported if time runs out.

    Args:
        predicate: called every ``interval`` seconds, and once more at the deadline.
        timeout: seconds, multiplied by :func:`timeout_factor`.
        what: what is awaited, for the error message.
        interval: seconds between calls.

    Returns:
        The first truthy value ``predicate`` returned.

    Raises:
        WaitTimeout: ``predicate`` stayed falsy (or kept raising) until the deadline.
    """
    budget = timeout * timeout_factor()
    deadline = time.monotonic() + budget
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    suffix = f" (last error: {last_error!r})" if last_error is not None else ""
    raise WaitTimeout(f"timed out after {budget:.1f} s waiting for {what}{suffix}") from last_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class TcpConnection(NamedTuple):
    """One TCP socket bound to a local port, as the kernel sees it."""

    peer_port: int
    state: str  # "ESTABLISHED", "CLOSE_WAIT", ...
    send_queue: int  # bytes written and not yet acknowledged by the peer
    inode: str  # matches /proc/<pid>/fd/* -> socket:[<inode>] (0 once no process holds it)


def tcp_connections(local_port: int) -> list[TcpConnection]:
    """The sockets with local port ``local_port`` (listeners excluded), from /proc/net/tcp and tcp6 (Linux).

    For a server port these are the server's sides of its connections: after a
    client closes, its connection leaves ESTABLISHED and CLOSE_WAIT once the
    server has closed its side too, which tells a test that the server is done
    with it (rather than sleeping and hoping).
    """
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                lines = f.readlines()
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) != local_port or fields[3] == "0A":
                continue
            state = _TCP_STATES.get(fields[3], fields[3])
            out.append(
                TcpConnection(int(fields[2].rsplit(":", 1)[1], 16), state, int(fields[4].split(":")[0], 16), fields[9])
            )
    return out
