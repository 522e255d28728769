"""Why a connection ends: close codes and the server's disconnect reasons, as values.

A websocket carries the code and the reason in its close frame
(docs/protocol.md lists them); an event stream has no close frame and logs
the reason. Every place that ends a connection names one
:class:`Disconnect`, so what clients see is defined here once.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "Disconnect"]


class CloseCode(enum.IntEnum):
    """RFC 6455 close codes the server sends or answers, and the library's own (4000-4999)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012
    SESSION_ENDED = 4001
    TOKEN_EXPIRED = 4003


class Disconnect(enum.Enum):
    """A reason the server ends a connection: its close code and the reason text."""

    SLOW_CONSUMER = (CloseCode.POLICY, "slow consumer")
    RATE_LIMIT = (CloseCode.POLICY, "rate limit exceeded")
    INTERNAL_ERROR = (CloseCode.INTERNAL, "internal error")
    RESTART = (CloseCode.RESTART, "server restart")
    SHUTDOWN = (CloseCode.GOING_AWAY, "server shutting down")
    LOGGED_OUT = (CloseCode.SESSION_ENDED, "logged out")
    PASSWORD_CHANGED = (CloseCode.SESSION_ENDED, "password changed")
    DEACTIVATED = (CloseCode.SESSION_ENDED, "account deactivated")
    TOKEN_EXPIRED = (CloseCode.TOKEN_EXPIRED, "token expired")

    @property
    def code(self) -> CloseCode:
        return self.value[0]

    @property
    def reason(self) -> str:
        return self.value[1]
