"""Talking to a running controller's admin socket (`status`, `set-lr`, `reload`, ...)."""

from __future__ import annotations

import os
from typing import Any

import zmq

from lrpilot.client.errors import LRPilotError, ProtocolError
from lrpilot.client.protocol import decode, encode

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
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode(message))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise NoAnswer(f"no controller answered at {endpoint} within {timeout:g} s")
        try:
            return decode(sock.recv())
        except ProtocolError as exc:
            raise NoAnswer(f"garbled answer from {endpoint}: {exc}") from None
    finally:
        sock.close(linger=0)
        ctx.term()
