"""lrpilot's client side: the wire protocol, `Client`, and the Keras / PyTorch adapters.

Example:

    from lrpilot.client import Client
    c = Client("tcp://127.0.0.1:5555", job="resnet-a", initial_lr=0.1)
    lr = c.report(epoch=0, metrics={"val_loss": 0.41})
"""

from __future__ import annotations
