"""lrpilot's controller: the daemon, the policy engine, the state store, metrics and CLI."""

from __future__ import annotations

__all__ = ["__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("lrpilot")
except Exception:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0.0.0"
