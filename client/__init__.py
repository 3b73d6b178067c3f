"""lrpilot's client side: the wire protocol, `Client`, and the Keras / PyTorch adapters.

Example:

    from lrpilot.client import Client
    c = Client("tcp://127.0.0.1:5555", job="resnet-a", initial_lr=0.1)
    lr = c.report(epoch=0, metrics={"val_loss": 0.41})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ControllerUnavailable, LRPilotError

if TYPE_CHECKING:
    from .core import Client

__all__ = ["Client", "ControllerUnavailable", "LRPilotError"]


def __getattr__(name: str) -> Any:
    # Lazy: the controller imports the protocol from this package, and `lrpilot --help`
    # must not need pyzmq (nor does anything here import Keras or torch).
    if name == "Client":
        from .core import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
