"""Talking to a running controller's admin socket (`status`, `set-lr`, `reload`, ...)."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import zmq

from lrpilot.client.errors import LRPilotError
from lrpilot.client.protocol import encode

__all__ = ["DEFAULT_ADMIN", "NoAnswer", "default_admin", "request"]

DEFAULT_ADMIN = "tcp://127.0.0.1:5556"


class NoAnswer(LRPilotError):
    """No controller answered on the admin endpoint in time."""


def default_admin() -> str:
    return os.environ.get("LRPILOT_ADMIN") or DEFAULT_ADMIN


def request(endpoint: str, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send one admin request and wait at most `timeout` seconds for its answer.

    Raises:
        NoAnswer: nothing answered in time (no controller, or a wrong endpoint).
    """
    from lrpilot.client.env import curve_keys

    keys = curve_keys()  # LRPILOT_CURVE_*: the admin socket needs an authorized key
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        sock.connect(endpoint)
        sock.send(encode(message))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise NoAnswer(f"no controller answered at {endpoint} within {timeout:g} s")
        return decode_reply(endpoint, sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def decode_reply(endpoint: str, frame: bytes) -> dict[str, Any]:
    """An admin reply, of any size: the status of 50,000 jobs, a history of 100,000 changes
    (the client socket's 64 KiB limit protects the controller, not the operator).

    Raises:
        NoAnswer: the reply is not an admin reply.
    """
    try:
        reply = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise NoAnswer(f"garbled answer from {endpoint}: {type(exc).__name__}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("t"), str):
        raise NoAnswer(f"garbled answer from {endpoint}: not an admin reply")
    return reply
