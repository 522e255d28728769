"""One websocket's calls into project code: RPC methods and publish hooks (the gevent side).

Theory of operation
-------------------
The project's functions run in a thread of :func:`offload.blocking.handler_pool`
(:mod:`offload.handlers` is the thread's side). The connection's greenlet
only admits a call and spawns a greenlet for it, which waits for a thread and
then for the outcome under one timeout, and answers; the connection keeps
reading frames and answering pings meanwhile.

* Admission, on the connection's greenlet, answered at once (the socket
  stays open): an unknown method is ``method_not_found``; beyond
  ``OFFLOAD_RPC_CALLS_PER_SECOND`` (a token bucket holding
  ``OFFLOAD_RPC_BURST``) a call is ``rate_limited``; beyond
  ``OFFLOAD_RPC_MAX_IN_FLIGHT`` calls at once, ``too_many_calls``.
* Timeout (``OFFLOAD_RPC_TIMEOUT``, waiting for a thread included): the
  client gets ``rpc_timeout``. A call still waiting for a thread never
  starts; one running in its thread cannot be stopped: the function may still
  finish (and write to the database), and its result is dropped.
* A hooked publish runs its hook and publishes in one thread and one database
  transaction (:func:`offload.handlers.run_hook`), after the publish the
  client sent before it: a connection's messages go out in the order sent.
* Close: calls waiting for a thread and RPC calls end at once (their
  greenlets are killed: nothing keeps the socket alive); a publish whose hook
  already runs is finished, so that what the hook stored is also published
  (bounded by the timeout). Replies to a closed socket are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from gevent import Greenlet

from .. import conf
from ..blocking import handler_pool
from ..core.protocol import Publish, Rpc, error_text, reply, rpc_reply
from ..core.rates import TokenBucket
from ..exceptions import LimitExceeded, RefusedError
from ..handlers import INTERNAL_ERROR, Outcome, method, run_hook, run_method
from ..logs import connection_fields
from .connection import WebSocket

__all__ = ["Calls"]

log = logging.getLogger("offload.transports.calls")


class Calls:
    """The calls of one websocket into project code, with their limits.

    Args:
        ws: the socket the answers go to (``send_text`` works from any greenlet).
        clock: for the rate limit (tests pass a fake one).
    """

    __slots__ = ("_bucket", "_calls", "_last_publish", "_max_bytes", "_max_in_flight", "_timeout", "_ws")

    def __init__(self, ws: WebSocket, clock: Callable[[], float] = time.monotonic) -> None:
        self._ws = ws
        self._bucket = TokenBucket(conf.get("OFFLOAD_RPC_CALLS_PER_SECOND"), conf.get("OFFLOAD_RPC_BURST"), clock)
        self._max_in_flight = conf.get("OFFLOAD_RPC_MAX_IN_FLIGHT")
        self._timeout = conf.get("OFFLOAD_RPC_TIMEOUT")
        self._max_bytes = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
        #: running calls -> True once the call must finish even if the socket closes
        self._calls: dict[Greenlet, bool] = {}
        #: set when the latest hooked publish is done (the next one waits for it)
        self._last_publish: gevent.event.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # -- the connection's greenlet ---------------------------------------------------

    def rpc(self, command: Rpc) -> None:
        """Start an RPC call (its answer comes later, from its own greenlet).

        Raises:
            RefusedError: ``method_not_found``.
            LimitExceeded: ``rate_limited``, ``too_many_calls``.
        """
        fn = method(command.method)
        if fn is None:
            raise RefusedError(f"no RPC method {command.method[:64]!r}", code="method_not_found")
        self._admit()
        self._spawn(self._rpc, command, fn)

    def publish(self, hook: Callable, command: Publish) -> None:
        """Start a publish through its namespace's hook (policy already checked).

        Raises:
            LimitExceeded: ``rate_limited``, ``too_many_calls``.
        """
        self._admit()
        before, done = self._last_publish, gevent.event.Event()
        self._last_publish = done
        self._spawn(self._publish, command, hook, before, done)

    def close(self) -> None:
        """The socket closed: end the calls nobody needs any more (see the module's docstring)."""
        abandoned = [call for call, finish in self._calls.items() if not finish]
        if abandoned:
            gevent.killall(abandoned, block=False)

    def _admit(self) -> None:
        if not self._bucket.allow():
            raise LimitExceeded("too many calls per second: slow down", code="rate_limited")
        if len(self._calls) >= self._max_in_flight:
            raise LimitExceeded(f"at most {self._max_in_flight} calls at once per connection", code="too_many_calls")

    def _spawn(self, fn: Callable, *args: Any) -> None:
        call = Greenlet(fn, *args)
        self._calls[call] = False
        call.start()

    # -- each call's greenlet ----------------------------------------------------------

    def _rpc(self, command: Rpc, fn: Callable) -> None:
        try:
            what = f"RPC method {command.method!r}"
            outcome = self._run(what, False, run_method, command.method, fn, self._ws.identity, command.data)
            if outcome.text is not None:
                self._ws.send_text(rpc_reply(command.ref, outcome.text))
            else:
                self._ws.send_text(error_text(outcome.code, outcome.reason, command.ref))
        finally:
            self._calls.pop(gevent.getcurrent(), None)

    def _publish(
        self, command: Publish, hook: Callable, before: gevent.event.Event | None, done: gevent.event.Event
    ) -> None:
        channel, ref = command.channel, command.ref
        try:
            if before is not None:  # bounded: a publish killed before it started never sets its event
                before.wait(self._timeout)
            timed_out: list[bool] = []  # read by the thread: no publish once the client was told rpc_timeout
            outcome = self._run(
                f"publish hook of {channel}",
                True,
                run_hook,
                hook,
                self._ws.identity,
                channel,
                command.data_json,
                self._max_bytes,
                lambda: bool(timed_out),
                on_timeout=lambda: timed_out.append(True),
            )
            if outcome.text is None:
                self._ws.send_text(error_text(outcome.code, outcome.reason, ref, channel))
            else:
                self._ws.send_text(reply("published", ref, channel=channel, id=outcome.text))
        finally:
            done.set()
            if self._last_publish is done:
                self._last_publish = None
            self._calls.pop(gevent.getcurrent(), None)

    def _run(
        self, what: str, finish: bool, fn: Callable[..., Outcome], *args: Any, on_timeout: Callable | None = None
    ) -> Outcome:
        """``fn(*args)`` in a handler thread, under the call's timeout: its outcome, or ``rpc_timeout``.

        Args:
            finish: once ``fn`` runs, finish the call even if the socket closes.
            on_timeout: called when the timeout is answered (the thread may still run).
        """
        timer = gevent.Timeout(self._timeout)
        timer.start()
        try:
            result = handler_pool().spawn(fn, *args)  # waits for a free thread
            if finish:
                self._calls[gevent.getcurrent()] = True
            return result.get()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            if on_timeout is not None:
                on_timeout()
            log.warning(
                "%s did not return within %.1f s: answered rpc_timeout",
                what,
                self._timeout,
                extra=connection_fields(self._ws),
            )
            return Outcome(code="rpc_timeout", reason=f"no answer within {self._timeout:g} s")
        except Exception:  # fn maps the project's exceptions itself: this is the pool failing
            log.exception("%s could not run", what, extra=connection_fields(self._ws))
            return INTERNAL_ERROR
        finally:
            timer.close()
