"""`python -m lrpilot.client.demo`: a simulated training that reports to an lrpilot controller.

A pure-Python loop (no TensorFlow, no PyTorch) whose validation loss falls, then flattens
into a noisy plateau. A smaller learning rate settles a little lower, so the controller's
plateau reductions show up in the loss. It is what `deploy/docker-compose.yml` runs as the
`trainer` service, so the Grafana dashboard has something to show.

Example:

    LRPILOT_ENDPOINT=tcp://127.0.0.1:5555 python -m lrpilot.client.demo --job demo --epochs 50
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Sequence

from .core import Client

__all__ = ["main", "simulated_val_loss"]

#: With --epochs 0 the demo runs forever, starting a new run every this many epochs.
RUN_EPOCHS = 200


def simulated_val_loss(epoch: int, lr: float, initial_lr: float, rng: random.Random) -> float:
    """The validation loss of a made-up training at `epoch`, trained so far at `lr`.

    Falls quickly at first, then plateaus around 0.3 plus a floor proportional to the LR
    (as SGD's noise floor is), plus a little noise.

    Args:
        epoch: the 0-based epoch within the run.
        lr: the learning rate in force for that epoch.
        initial_lr: the run's first LR; the LR's effect is relative to it.
        rng: the source of the noise.
    """
    trend = 0.3 + 2.0 * math.exp(-epoch / 12)
    lr_floor = 0.2 * min(lr / initial_lr, 1.0)
    return trend + lr_floor + rng.gauss(0.0, 0.01)


def _run(args: argparse.Namespace, epochs: int, rng: random.Random) -> None:
    with Client(args.endpoint, job=args.job, initial_lr=args.initial_lr, start_epoch=0) as c:
        lr = c.lr
        for epoch in range(epochs):
            val_loss = simulated_val_loss(epoch, lr, args.initial_lr, rng)
            lr = c.report(epoch=epoch, metrics={"val_loss": val_loss})
            state = "" if c.online else "  (controller offline: keeping the LR)"
            print(
                f"{c.job} epoch {epoch:4d}  val_loss {val_loss:.4f}  next lr {lr:.3g}{state}",
                flush=True,
            )
            if args.epoch_seconds > 0:
                time.sleep(args.epoch_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and train; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m lrpilot.client.demo",
        description="A simulated training that reports val_loss to an lrpilot controller.",
    )
    parser.add_argument(
        "--endpoint", default=None, help="controller (default LRPILOT_ENDPOINT, else :5555)"
    )
    parser.add_argument(
        "--job",
        default=os.environ.get("LRPILOT_JOB") or "demo",
        help="job name (default LRPILOT_JOB, else demo)",
    )
    parser.add_argument("--initial-lr", type=float, default=0.1, help="the LR to start with")
    parser.add_argument(
        "--epochs",
        type=int,
        default=0,
        help=f"epochs to run; 0 = forever, a new run every {RUN_EPOCHS} epochs",
    )
    parser.add_argument(
        "--epoch-seconds", type=float, default=2.0, help="seconds to sleep between epochs"
    )
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default random)")
    args = parser.parse_args(argv)
    if args.epochs < 0 or args.epoch_seconds < 0:
        parser.error("--epochs and --epoch-seconds must be >= 0")
    rng = random.Random(args.seed)
    try:
        if args.epochs:
            _run(args, args.epochs, rng)
        else:
            while True:
                _run(args, RUN_EPOCHS, rng)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # bad arguments the client refused, with the fix in the text
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
