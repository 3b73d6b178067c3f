"""Offline replay: run a recorded metric history through the engine the daemon uses.

The CSV has an `epoch` column (0-based, as Keras' CSVLogger writes it) and one
column per metric; empty cells are missing values, `nan`/`inf` are kept (a
diverged loss is information).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.client.errors import SourceError

from .policies import Decision, Event, Phases, Policy
from .policyfile import JobRule

__all__ = [
    "History",
    "Row",
    "format_table",
    "initial_lr",
    "monitor_of",
    "plot",
    "read_history",
    "replay",
    "to_json",
]

KERAS_DEFAULT_LR = 0.001


@dataclass(frozen=True)
class History:
    """A metric history read from CSV: one (epoch, step, metrics) per row."""

    path: str
    epochs: tuple[int, ...]
    steps: tuple[int | None, ...]
    metrics: tuple[dict[str, float], ...]
    first_lr: float | None


@dataclass(frozen=True)
class Row:
    """One replayed report: `lr` is the LR in force from epoch + 1."""

    epoch: int
    value: float | None
    lr: float
    event: Event | None
    action: str | None = None
    phase: str | None = None


def _number(text: str, path: str, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SourceError(
            f"column {column!r}: expected a number, got {text!r}", path, line
        ) from None


def _integer(text: str, path: str, line: int, column: str) -> int:
    value = _number(text, path, line, column)
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise SourceError(f"column {column!r}: expected an integer >= 0, got {text!r}", path, line)
    return int(value)


def read_history(path: str | Path) -> History:
    """Read a CSV metric history.

    Raises:
        SourceError: `FILE:LINE: column 'x': expected a number, got 'abc'` and the like.
    """
    name = str(path)
    try:
        handle = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise SourceError(f"cannot read metrics: {exc.strerror}", name) from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SourceError(
                "empty file: expected a header with an epoch column", name, 1
            ) from None
        except csv.Error as exc:
            raise SourceError(f"bad CSV: {exc}", name, 1) from None
        if "epoch" not in header:
            raise SourceError(f"no epoch column in header, got {','.join(header)!r}", name, 1)
        epochs: list[int] = []
        steps: list[int | None] = []
        rows: list[dict[str, float]] = []
        first_lr: float | None = None
        try:
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise SourceError(
                        f"expected {len(header)} columns, got {len(cells)}", name, line
                    )
                metrics: dict[str, float] = {}
                step: int | None = None
                epoch = 0
                for column, cell in zip(header, cells, strict=True):
                    cell = cell.strip()
                    if column == "epoch":
                        epoch = _integer(cell, name, line, column)
                    elif column == "step":
                        step = _integer(cell, name, line, column) if cell else None
                    elif cell:
                        metrics[column] = _number(cell, name, line, column)
                if epochs and epoch <= epochs[-1]:
                    raise SourceError(
                        f"epochs must increase, got {epoch} after {epochs[-1]}", name, line
                    )
                if first_lr is None:
                    first_lr = metrics.get("learning_rate", metrics.get("lr"))
                epochs.append(epoch)
                steps.append(step)
                rows.append(metrics)
        except csv.Error as exc:
            raise SourceError(f"bad CSV: {exc}", name, reader.line_num) from None
    if not rows:
        raise SourceError("no rows after the header", name, 2)
    return History(name, tuple(epochs), tuple(steps), tuple(rows), first_lr)


def initial_lr(rule: JobRule, history: History, given: float | None) -> float:
    """--initial-lr, else the policy's initial_lr, else the CSV's first LR, else Keras' 0.001."""
    if given is not None:
        return given
    fallback = history.first_lr if history.first_lr is not None else KERAS_DEFAULT_LR
    return rule.lr0(fallback)


def monitor_of(policy: Policy) -> str | None:
    """The metric a policy watches: its own, or the first watched in a chain of phases."""
    if isinstance(policy, Phases):
        return next((m for p in policy.phases if (m := monitor_of(p.policy))), None)
    monitor = getattr(policy, "monitor", None)
    return monitor if isinstance(monitor, str) else None


def replay(
    rule: JobRule,
    history: History,
    lr0: float,
    directions: Mapping[str, str] | None = None,
    warn: Any = None,
) -> list[Row]:
    """Feed every row to the rule's policy, as the daemon would for a single worker.

    Raises:
        ProtocolError: `mode_unresolved` when `mode: auto` cannot tell a direction.
        SourceError: a `unit: step` policy on a history without a step column.
    """
    policy = rule.policy
    times: Sequence[int | None] = history.epochs
    if policy.unit == "step":
        times = history.steps
        if any(t is None for t in times):
            raise SourceError(
                "a unit: step policy needs a step column with a value in every row", history.path, 1
            )
    first = times[0]
    assert first is not None
    state = policy.start(lr0, first)
    out: list[Row] = []
    seen: set[str] = set()
    monitor = monitor_of(policy)
    for epoch, t, metrics in zip(history.epochs, times, history.metrics, strict=True):
        assert t is not None
        value = metrics.get(monitor) if monitor is not None else None
        state, decision = policy.step(state, t, metrics, directions or {})
        if decision.warning and warn is not None and decision.warning not in seen:
            seen.add(decision.warning)
            warn(decision.warning)
        out.append(_row(epoch, value, decision, policy.describe(state).get("phase")))
    return out


def _row(epoch: int, value: float | None, decision: Decision, phase: Any) -> Row:
    return Row(epoch, value, decision.lr, decision.event, decision.action, phase)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows as DESIGN.md's simulate --json objects; non-finite values are null."""
    return [
        {
            "epoch": r.epoch,
            "value": _finite(r.value),
            "lr": r.lr,
            "event": r.event.to_dict() if r.event is not None else None,
        }
        for r in rows
    ]


def _event_text(row: Row) -> str:
    parts = []
    if row.event is not None:
        parts.append(row.event.describe())
    if row.action == "stop":
        parts.append("stop (at min_lr and still on a plateau)")
    return "; ".join(parts)


def format_table(rows: Sequence[Row], monitor: str | None) -> str:
    """A table: epoch, monitored value, the LR in force from the next epoch on, and the event."""
    title = monitor or "value"
    lines = [f"{'epoch':>5}  {title:>12}  {'next lr':>12}  event"]
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.6g}"
        lines.append(f"{r.epoch:>5}  {value:>12}  {r.lr:>12.6g}  {_event_text(r)}".rstrip())
    return "\n".join(lines)


def plot(rows: Sequence[Row], monitor: str | None, path: str) -> None:
    """Draw the monitored value and the LR (log axis) over epochs into a PNG (extra `plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in rows]
    fig, ax_value = plt.subplots(figsize=(9, 4.5))
    ax_value.plot(
        epochs,
        [r.value if r.value is not None else math.nan for r in rows],
        "o-",
        color="tab:blue",
        ms=3,
    )
    ax_value.set_xlabel("epoch")
    ax_value.set_ylabel(monitor or "monitored value", color="tab:blue")
    ax_lr = ax_value.twinx()
    ax_lr.step([e + 1 for e in epochs], [r.lr for r in rows], where="post", color="tab:red")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate (from the next epoch)", color="tab:red")
    for r in rows:
        if r.event is not None:
            ax_lr.axvline(r.epoch + 1, color="tab:red", alpha=0.2, lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
