"""Every input of the demo views, validated before anything runs, and the throttled login.

Why forms and not ``float(request.POST[...])``: Python's number parsers take
far more than a person types. ``float()`` takes ``nan``, ``inf``, ``1e308``,
``' 1_0 '`` and other scripts' digits (``'١٢٣'`` is 123); ``min(nan, 60.0)``
is NaN, and a report told to sleep NaN seconds hung a spooler process until
spooler-harakiri killed it, over and over. ``int('abc')`` was a 500 with a
traceback. Here a number is ASCII digits (with an optional decimal part),
finite and within its range, or the request is refused with 400 and the
``{"error": code, "reason": ...}`` body the views answer for every refusal.

The login throttle lives here too (:class:`LoginThrottle`): it is what makes
:class:`ThrottledAuthenticationForm` refuse a guess before the password is
checked.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from offload import conf
from offload.addresses import client_address
from offload.backend.redis_client import REDIS_ERRORS, get_client

__all__ = [
    "MAX_TEXT",
    "ApiForm",
    "AsciiFloatField",
    "AsciiIntegerField",
    "LoginThrottle",
    "MessageForm",
    "ReportForm",
    "ThrottledAuthenticationForm",
    "login_throttle",
    "valid_download_name",
    "valid_task_id",
]

log = logging.getLogger("app.forms")

#: Longest chat message, in characters.
MAX_TEXT = 2000
#: Longest name below var/files/downloads, in characters, and per path segment in UTF-8 bytes
#: (a longer one made ``Path.is_file()`` raise ENAMETOOLONG: a 500).
MAX_DOWNLOAD_NAME = 1024
_MAX_SEGMENT_BYTES = 255
_TASK_ID_RE = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as offload.tasks makes them
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MESSAGE_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # all but \t \n \r


# -- numbers ----------------------------------------------------------------------


class AsciiIntegerField(forms.IntegerField):
    """An integer written with ASCII digits ``0-9`` only (at most 9 of them).

    Django's ``IntegerField`` goes through ``int()``, which also accepts
    blanks, signs, underscores and non-ASCII digits.
    """

    _pattern = re.compile(r"[0-9]{1,9}")

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        if not isinstance(value, str) or not self._pattern.fullmatch(value):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return int(value)


class AsciiFloatField(forms.FloatField):
    """A decimal number such as ``12`` or ``1.5``, in ASCII digits only.

    No exponent, sign, blank, underscore, ``nan`` or ``inf``: ``float()``
    takes all of them, and NaN passes every ``min``/``max`` clamp.
    """

    _pattern = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")

    def to_python(self, value: Any) -> float | None:
        if value in self.empty_values:
            return None
        if not isinstance(value, str) or not self._pattern.fullmatch(value):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return float(value)


# -- the demo views' forms --------------------------------------------------------


class ApiForm(forms.Form):
    """A form whose first error becomes the JSON refusal of the demo views."""

    #: Django error code -> the API's ``error`` code (default ``invalid_<field>``).
    error_codes: dict[str, str] = {}

    def first_error(self) -> tuple[str, str]:
        """``(code, reason)`` of the first invalid field, for ``{"error", "reason"}``."""
        for field, errors in self.errors.as_data().items():
            error = errors[0]
            code = self.error_codes.get(error.code or "", f"invalid_{field}")
            reason = " ".join(error.messages)
            return code, reason if field == "__all__" else f"{field}: {reason}"
        raise ValueError("the form is valid")


_RANGE_ERRORS = ("invalid", "min_value", "max_value")  # one message says what is accepted


class ReportForm(ApiForm):
    """``POST /reports/``: how long the demo report pauses and how many rows it writes."""

    seconds = AsciiFloatField(
        required=False,
        min_value=0,
        max_value=60,
        error_messages=dict.fromkeys(_RANGE_ERRORS, "a number of seconds from 0 to 60, like 1.5 (ASCII digits)"),
    )
    rows = AsciiIntegerField(
        required=False,
        min_value=1,
        max_value=2_000_000,
        error_messages=dict.fromkeys(_RANGE_ERRORS, "a whole number of rows from 1 to 2000000 (ASCII digits)"),
    )
    fail = forms.TypedChoiceField(
        required=False,
        choices=[("0", "no"), ("1", "yes")],
        coerce=lambda value: value == "1",
        empty_value=False,
    )

    def clean_seconds(self) -> float:
        value = self.cleaned_data["seconds"]
        return 10.0 if value is None else value

    def clean_rows(self) -> int:
        value = self.cleaned_data["rows"]
        return 200_000 if value is None else value


def _plain_text(value: str) -> None:
    """Refuse control characters other than tab and line breaks (a message is text a person typed)."""
    if _MESSAGE_CONTROL_RE.search(value):
        raise ValidationError("control characters are not allowed", code="invalid")


class MessageForm(ApiForm):
    """One chat message (blanks around it dropped), from ``POST /rooms/<room>/messages``
    or from a websocket ``publish`` through the room's publish hook (app/realtime.py)."""

    error_codes = {"required": "empty", "max_length": "too_long"}

    text = forms.CharField(
        max_length=MAX_TEXT,
        validators=[_plain_text],
        error_messages={"required": "message is empty", "max_length": f"at most {MAX_TEXT} characters"},
    )


def valid_task_id(task_id: str) -> bool:
    """Is ``task_id`` shaped like the ids :mod:`offload.tasks` gives out?"""
    return bool(_TASK_ID_RE.fullmatch(task_id))


def valid_download_name(name: str) -> bool:
    """Could ``name`` be a file below the downloads directory? (Whether it
    is one, and stays inside, is ``offload.transfers.resolve_under``'s job.)"""
    if not name or len(name) > MAX_DOWNLOAD_NAME or _CONTROL_RE.search(name):
        return False
    return all(len(segment.encode("utf-8", "surrogatepass")) <= _MAX_SEGMENT_BYTES for segment in name.split("/"))


# -- login throttling -------------------------------------------------------------


class LoginThrottle:
    """Failed logins per account and per client IP, in a sliding window in Redis.

    Each failure is a member of a sorted set scored by its time; entries
    older than ``window`` are dropped before counting. Redis, not process
    memory, because every worker serves logins and a guesser spreads over them.
    A set never holds more than its limit (older entries are trimmed): a
    guesser who is refused is not counted again, so the wait ends ``window``
    after the failures that caused it. A success clears the account's
    failures, not the IP's (one address may serve several people).

    If Redis is down the throttle is off (fail open) and says so in the log:
    refusing every login would be worse.

    Args:
        per_account: failures allowed for one username in ``window``.
        per_ip: failures allowed from one client address in ``window``.
        window: seconds.
        clock: wall-clock seconds (injected so that tests need no waiting).
        client: a redis-py client (default: offload's shared one).
    """

    def __init__(
        self,
        *,
        per_account: int = 5,
        per_ip: int = 20,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
        client: Any = None,
    ) -> None:
        self.per_account = per_account
        self.per_ip = per_ip
        self.window = window
        self.clock = clock
        self._client = client
        self._prefix = f"{conf.get('OFFLOAD_REDIS_PREFIX')}login-failures:"

    @property
    def client(self) -> Any:
        return self._client if self._client is not None else get_client()

    def _keys(self, username: str | None, ip: str) -> list[tuple[str, int]]:
        keys = [(f"{self._prefix}ip:{ip}", self.per_ip)]
        if username is not None:
            # Hashed: a username is client text of any length; case-folded so that
            # 'Alice' and 'alice' share a budget whatever the auth backend does.
            digest = hashlib.sha256(username.casefold().encode("utf-8", "surrogatepass")).hexdigest()[:32]
            keys.append((f"{self._prefix}account:{digest}", self.per_account))
        return keys

    def retry_after(self, username: str | None, ip: str) -> float:
        """Seconds until this account and address may try again (0: now).

        Fails open: 0 when Redis cannot be reached.
        """
        now = self.clock()
        keys = self._keys(username, ip)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, _ in keys:
                pipe.zremrangebyscore(key, "-inf", now - self.window)
                pipe.zrange(key, 0, -1, withscores=True)
            replies = pipe.execute()[1::2]
        except REDIS_ERRORS as exc:
            log.warning("login throttle off: Redis unavailable (%s)", exc)
            return 0.0
        wait = 0.0
        for (_, limit), entries in zip(keys, replies, strict=True):
            if len(entries) >= limit:
                # Allowed again once enough of the oldest failures left the window.
                oldest_blocking = entries[len(entries) - limit][1]
                wait = max(wait, oldest_blocking + self.window - now)
        return wait

    def record_failure(self, username: str | None, ip: str) -> None:
        """Count a wrong password for this account and address."""
        now = self.clock()
        member = f"{now!r}:{uuid.uuid4().hex[:8]}"
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, limit in self._keys(username, ip):
                pipe.zadd(key, {member: now})
                pipe.zremrangebyrank(key, 0, -(limit + 1))  # keep the newest `limit`
                pipe.expire(key, math.ceil(self.window))
            pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("login failure not counted: Redis unavailable (%s)", exc)

    def record_success(self, username: str) -> None:
        """Forget this account's failures (a successful login)."""
        try:
            self.client.delete(self._keys(username, "")[1][0])
        except REDIS_ERRORS as exc:
            log.warning("login failures not cleared: Redis unavailable (%s)", exc)


def login_throttle() -> LoginThrottle:
    """The throttle configured by the settings (documented defaults in brackets):
    ``LOGIN_FAILURES_PER_ACCOUNT`` [5], ``LOGIN_FAILURES_PER_IP`` [20] and
    ``LOGIN_FAILURES_WINDOW`` [900 seconds]."""
    return LoginThrottle(
        per_account=getattr(settings, "LOGIN_FAILURES_PER_ACCOUNT", 5),
        per_ip=getattr(settings, "LOGIN_FAILURES_PER_IP", 20),
        window=float(getattr(settings, "LOGIN_FAILURES_WINDOW", 900)),
    )


def client_ip(request: HttpRequest) -> str:
    """The address the request came from, the one every per-address limit counts:
    REMOTE_ADDR, or behind a trusted load balancer (``OFFLOAD_TRUSTED_PROXIES``)
    the client it forwarded for (:func:`offload.addresses.client_address`)."""
    return client_address(request.META)


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's login form, refusing a throttled account or address before the
    password is checked (a guess then costs no hash and reveals nothing).

    After a refusal ``retry_after`` holds the seconds to wait (the view answers
    429 with ``Retry-After``).
    """

    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed logins. Try again in %(minutes)d minute(s).",
    }

    def __init__(self, request: HttpRequest | None = None, *args: Any, throttle: LoginThrottle | None = None, **kw):
        super().__init__(request, *args, **kw)
        self.throttle = throttle or login_throttle()
        self.retry_after = 0.0

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        ip = client_ip(self.request) if self.request is not None else ""
        wait = self.throttle.retry_after(username, ip)
        if wait > 0:
            self.retry_after = wait
            raise ValidationError(
                self.error_messages["throttled"], code="throttled", params={"minutes": math.ceil(wait / 60)}
            )
        try:
            cleaned = super().clean()
        except ValidationError as exc:
            if exc.code == "invalid_login":
                self.throttle.record_failure(username, ip)
            raise
        if self.user_cache is not None and username is not None:
            self.throttle.record_success(username)
        return cleaned
