"""The client's socket layer: one DEALER socket to one controller, and its monitor.

`Client` holds one `Link` at a time and replaces it when it follows a `moved` reply or
fails over to the next endpoint; everything the protocol decides lives elsewhere (the
`Outbox`, the `Decisions`). The socket options are what make the client never block and
never hold up the process exit.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq

from .outbox import MAX_KEPT
from .protocol import SOCKET_MAX_MSG_SIZE

__all__ = [
    "DOWN",
    "RECONNECT_MAX_MS",
    "RECONNECT_MS",
    "RETRIED",
    "UP",
    "Link",
    "Sockets",
    "shutdown",
]

# Reconnecting after a lost connection: the first try after this many ms, doubling up to the
# cap, so a controller that restarts is found again within a second of listening.
RECONNECT_MS = 100
RECONNECT_MAX_MS = 1000

SOCKET_OPTIONS = (
    (zmq.IMMEDIATE, 1),  # queue only on live connections: no connection -> zmq.Again at once
    # Small enough that little sits in a pipe a disconnect can discard (those reports are kept
    # and resent anyway), large enough for the reports of a few milliseconds.
    (zmq.SNDHWM, 1000),
    # Room for a reply to every kept report, so the controller never has to drop one.
    (zmq.RCVHWM, 2 * MAX_KEPT),
    (zmq.LINGER, 0),  # never hold up close() or the process exit
    (zmq.MAXMSGSIZE, SOCKET_MAX_MSG_SIZE),
    (zmq.RECONNECT_IVL, RECONNECT_MS),
    (zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS),
    (zmq.HEARTBEAT_IVL, 5000),
    (zmq.HEARTBEAT_TIMEOUT, 15000),
    (zmq.HEARTBEAT_TTL, 15000),
)
# Connection changes, read from the socket's monitor.
UP, DOWN = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED
RETRIED = zmq.EVENT_CONNECT_RETRIED  # a connection attempt failed; the next one is scheduled


class Link:
    """The DEALER socket to one endpoint and its connection monitor; replaced on a move or
    a failover. Holds no reference to the Client, so that an unclosed client is still
    collected (its finalizer closes the link and terminates the context)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, session: bytes, keys: Any) -> None:
        self.endpoint = endpoint
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.monitor: zmq.Socket[Any] = self.sock.get_monitor_socket(UP | DOWN | RETRIED)
        self.monitor.linger = 0
        try:
            self.sock.setsockopt(zmq.ROUTING_ID, session)
            for option, value in SOCKET_OPTIONS:
                self.sock.setsockopt(option, value)
            if keys is not None:
                self.sock.curve_serverkey = keys.server_public
                self.sock.curve_publickey = keys.public
                self.sock.curve_secretkey = keys.secret
            self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.looked_at = [(self.sock, zmq.POLLIN), (self.monitor, zmq.POLLIN)]

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the socket is going anyway
            self.sock.disable_monitor()
        with contextlib.suppress(zmq.ZMQError):
            self.monitor.close(linger=0)
            self.sock.close(linger=0)


class Sockets:
    """The context and the current link: what the finalizer closes."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.link: Link | None = None


def shutdown(sockets: Sockets) -> None:
    # Runs from close(), from garbage collection or at interpreter exit; never references the
    # Client itself, so an unclosed client is still collected and never holds up the exit.
    if sockets.link is not None:
        sockets.link.close()
        sockets.link = None
    with contextlib.suppress(zmq.ZMQError):  # pragma: no cover - nothing left to do about it
        sockets.ctx.term()
