"""Every exception the library raises, in one place.

Hierarchy::

    OffloadError
    ├── RefusedError            the peer asked for something it may not have;
    │   │                       carries a stable ``code`` sent to clients
    │   ├── ProtocolError       malformed or unknown client command
    │   ├── ChannelError        bad channel name / unknown namespace
    │   ├── PermissionDenied    a namespace policy said no
    │   ├── LimitExceeded       a configured limit was hit
    │   └── Rejected            the project's own code said no (an RPC method,
    │                           a publish hook): its code goes to the client
    └── BackendUnavailable      Redis is down (code ``unavailable``)
        └── OutcomeUnknown      Redis timed out mid-call (code ``outcome_unknown``)

``RefusedError`` is about the remote side (like h11's ``RemoteProtocolError``);
``BackendUnavailable`` is about our own infrastructure. Misuse of the library
by the programmer raises ordinary ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import re


class OffloadError(Exception):
    """Base class of every offload error."""

    code = "internal"

    def __init__(self, reason: str = "", *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code
        #: The refused command's ``ref`` and ``channel``, when they could be read.
        self.ref = None
        self.channel: str | None = None


class RefusedError(OffloadError):
    """A client request refused with a machine-readable ``code``."""


class ProtocolError(RefusedError):
    """A client command is malformed (``bad_json``, ``bad_message``, ...)."""

    code = "bad_message"


class ChannelError(RefusedError):
    """A channel name is invalid or its namespace is not declared."""

    code = "invalid_channel"


class PermissionDenied(RefusedError):
    """A namespace policy refused the user (``forbidden``, ``publish_forbidden``)."""

    code = "forbidden"


class LimitExceeded(RefusedError):
    """A configured limit was exceeded (``message_too_large``, ...)."""

    code = "limit_exceeded"


class Rejected(RefusedError):
    """Raised by an RPC method or a publish hook to refuse with a client-visible code.

    ``raise offload.Rejected("the room is closed", code="room_closed")``: the
    client gets ``{"type":"error","code":"room_closed","reason":...}``. Any
    other exception from project code becomes ``internal_error`` (logged with
    its traceback, never shown to the client), so the reason here must be fit
    for the client's eyes.

    Raises:
        ValueError: ``code`` is not 1 to 64 characters of ``[a-z0-9_]``.
    """

    code = "rejected"

    def __init__(self, reason: str = "", *, code: str = "rejected") -> None:
        if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
            raise ValueError(f"a Rejected code is 1 to 64 characters of [a-z0-9_], not {code!r}")
        super().__init__(str(reason), code=code)


_CODE_RE = re.compile(r"[a-z0-9_]{1,64}")


class BackendUnavailable(OffloadError):
    """Redis could not be reached in time. Nothing was published."""

    code = "unavailable"


class OutcomeUnknown(BackendUnavailable):
    """Redis timed out after the command was sent: it may have run.

    A publish that raises this may or may not have been delivered (it was
    not delivered twice: publish calls are idempotent within a call).
    """

    code = "outcome_unknown"
