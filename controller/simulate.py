"""Offline replay: a recorded metric history folded through the daemon's own reducer.

`run` feeds a hello and then one report per row to `transitions.step`, exactly
as the daemon does for a single worker, so shadow mode, phases, notices and
range-test actions come out as the daemon would send them.

The CSV has an `epoch` column (0-based, as Keras' CSVLogger writes it) and one
column per metric; empty cells (and CSVLogger's `NA`) are missing values,
`nan`/`inf` are kept (a diverged loss is information). With a `step` column
(for `unit: step` policies) an epoch may span many rows; the steps increase.

A range test needs only its loss column: the policy sets the LR, so a history
recorded under the same sweep (the seeds' `1e-8 * 10**(epoch / 20)`) replays as
it ran. Its curve and suggestions come back in `Replay.range_test`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.client.protocol import SESSION_BYTES, ErrorMessage, Hello, LrMessage, Report

from .errors import SourceError
from .jobstate import momentum
from .policies import Event, Policy
from .policies.errors import EngineError
from .policies.suggest import SKIP_END
from .policyfile import JobRule
from .transitions import Env, step

__all__ = [
    "History",
    "Replay",
    "Row",
    "format_range_test",
    "format_table",
    "format_what_if",
    "initial_lr",
    "metrics_csv",
    "metrics_table",
    "monitor_of",
    "plot",
    "plot_range_test",
    "read_history",
    "recorded_history",
    "replay",
    "run",
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
    """One replayed report: `lr` is the LR the daemon sends, in force from epoch + 1.

    `event` is the policy's own decision (in shadow mode: what it decided but did not send,
    then `shadow_lr` is the LR it runs on); `notices` are the (code, text) the client gets.
    """

    epoch: int
    value: float | None
    lr: float
    event: Event | None
    action: str | None = None
    phase: str | None = None
    step: int | None = None
    shadow_lr: float | None = None
    notices: tuple[tuple[str, str], ...] = ()
    momentum: float | None = None  # what a cycle_momentum plan sets from epoch (step) + 1


@dataclass(frozen=True)
class Replay:
    """A whole replay: the rows, the LR and action of the start, the last range test's report."""

    rows: list[Row]
    start_lr: float
    start_action: str | None = None
    range_test: dict[str, Any] | None = None


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
                    elif cell and cell != "NA":  # Keras' CSVLogger writes NA for no value
                        metrics[column] = _number(cell, name, line, column)
                if "step" in header and step is not None and steps and steps[-1] is not None:
                    # Per-step rows: an epoch spans many of them, the steps increase.
                    if step <= steps[-1]:
                        raise SourceError(
                            f"steps must increase, got {step} after {steps[-1]}", name, line
                        )
                    if epoch < epochs[-1]:
                        raise SourceError(
                            f"epochs must not decrease, got {epoch} after {epochs[-1]}", name, line
                        )
                elif epochs and epoch <= epochs[-1]:
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


def recorded_history(recorded: Mapping[str, Any], source: str) -> History:
    """A job's recorded metrics (`Admin.metrics`, columns) as a History; its first LR is the
    LR the job trained its first recorded epoch (or step) with."""
    step = recorded.get("unit") == "step"
    x, names = recorded["x"], list(recorded["metrics"])
    rows = [
        {k: float(v) for k in names if (v := recorded["metrics"][k][i]) is not None}
        for i in range(len(x))
    ]
    lrs = recorded["lr"]
    return History(
        source,
        tuple(recorded["epoch"]),
        tuple(x) if step else (None,) * len(x),
        tuple(rows),
        float(lrs[0]) if lrs else None,
    )


def _columns(recorded: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of `lrpilot metrics`: epoch[, step], every metric, the LR trained."""
    names = list(recorded["metrics"])
    lr_name = "lr" if "lr" not in names else "lr_trained"
    step = recorded.get("unit") == "step"
    header = ["epoch", *(["step"] if step else []), *names, lr_name]
    rows = []
    for i, x in enumerate(recorded["x"]):
        where = [recorded["epoch"][i], *([x] if step else [])]
        rows.append([*where, *(recorded["metrics"][k][i] for k in names), recorded["lr"][i]])
    return header, rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def metrics_csv(recorded: Mapping[str, Any]) -> str:
    """`lrpilot metrics JOB --csv`: `simulate --metrics` reads it back (missing values empty,
    non-finite ones as nan/inf)."""
    header, rows = _columns(recorded)
    lines = [",".join(header)] + [",".join(_cell(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def metrics_table(recorded: Mapping[str, Any]) -> str:
    """`lrpilot metrics JOB`: a line on the run, then one aligned row per recorded point."""
    header, rows = _columns(recorded)
    runs = recorded.get("runs") or []
    head = (
        f"job {recorded['job']}: run {recorded['run']} ({len(runs)} recorded), "
        f"{len(rows)} points, monitor {recorded.get('monitor') or '-'}"
    )
    widths = [max(8, len(h)) for h in header]
    lines = [head, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    for row in rows:
        cells = ["-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines) + "\n"


def initial_lr(rule: JobRule, history: History, given: float | None) -> float:
    """--initial-lr, else the policy's initial_lr, else the CSV's first LR, else Keras' 0.001."""
    if given is not None:
        return given
    fallback = history.first_lr if history.first_lr is not None else KERAS_DEFAULT_LR
    return rule.lr0(fallback)


def monitors_of(policy: Policy) -> list[str]:
    """Every metric the policy (each phase of a chain) watches, in order."""
    return list(policy.monitors())


def monitor_of(policy: Policy) -> str | None:
    """The metric a policy watches: its own, or the first watched in a chain of phases."""
    return next(iter(policy.monitors()), None)


def replay(
    rule: JobRule,
    history: History,
    lr0: float,
    directions: Mapping[str, str] | None = None,
    warn: Any = None,
) -> list[Row]:
    """Feed every row to the rule's policy, as the daemon would for a single worker.

    Raises:
        ModeUnresolved: when `mode: auto` cannot tell a direction.
        SourceError: a `unit: step` policy on a history without a step column.
    """
    return run(rule, history, lr0, directions, warn).rows


def run(
    rule: JobRule,
    history: History,
    lr0: float,
    directions: Mapping[str, str] | None = None,
    warn: Any = None,
    job: str = "simulate",
) -> Replay:
    """`replay`, with the start (LR and action, as a hello reply) and the range test's report.

    A fold of `transitions.step`: one hello (rank 0 of 1, able to restore weights), then
    one report per row, each decided as the daemon decides it.
    """
    unit = rule.policy.unit
    if unit == "step" and any(t is None for t in history.steps):
        raise SourceError(
            "a unit: step policy needs a step column with a value in every row "
            "(or the policy says unit: epoch)",
            history.path,
            1,
        )
    rule = dataclasses.replace(rule, initial_lr=lr0)  # lr0 was chosen by initial_lr()
    env = Env(now=0.0, wall=0.0, rules=lambda _name: rule)
    session = bytes(SESSION_BYTES)
    first_step = history.steps[0] if unit == "step" else None
    hello = Hello(
        job,
        0,
        1,
        session,
        lr0,
        history.epochs[0],
        start_step=first_step or 0,
        directions=dict(directions or {}),
        restore=True,
    )
    start = step(None, hello, env)
    assert start is not None and start.job is not None
    state = start.job
    answer = _answer(start.out, session)
    out: list[Row] = []
    seen: set[str] = set()
    monitor = monitor_of(rule.policy)
    for seq, (epoch, t_step, metrics) in enumerate(
        zip(history.epochs, history.steps, history.metrics, strict=True), start=1
    ):
        t_step = t_step if unit == "step" else None
        decided = step(state, Report(job, 0, session, seq, epoch, metrics, state.lr, t_step), env)
        assert decided is not None and decided.job is not None
        state = decided.job
        reply = _answer(decided.out, session)
        for warning in decided.warnings:
            if warn is not None and warning not in seen:
                seen.add(warning)
                warn(warning)
        event = decided.decision.event if decided.decision is not None else None
        out.append(
            Row(
                epoch,
                metrics.get(monitor) if monitor is not None else None,
                reply.lr,
                event,
                reply.action,
                state.policy.describe(state.state).get("phase"),
                t_step,
                state.shadow_lr,
                reply.notices,
                momentum(state),
            )
        )
    report = state.policy.range_test_report(state.state)
    return Replay(out, answer.lr, answer.action, report)


def _answer(out: Sequence[tuple[bytes, LrMessage | ErrorMessage]], session: bytes) -> LrMessage:
    """The reply to the replaying session; an error reply raises as the daemon's would.

    Raises:
        EngineError: e.g. `mode: auto` cannot tell a direction (`mode_unresolved`).
    """
    reply = next(m for ident, m in out if ident == session)
    if isinstance(reply, ErrorMessage):
        raise EngineError(reply.message)
    return reply


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows as DESIGN.md's simulate --json objects; non-finite values are null."""
    out = []
    for r in rows:
        row = {
            "epoch": r.epoch,
            "value": _finite(r.value),
            "lr": r.lr,
            "event": r.event.to_dict() if r.event is not None else None,
        }
        if r.momentum is not None:  # a policy that sets momentum (cycle_momentum)
            row["momentum"] = r.momentum
        out.append(row)
    return out


_ACTIONS = {
    "stop": "stop (at min_lr and still on a plateau)",
    "snapshot": "snapshot the weights (a range test starts)",
    "restore": "restore the weights from before the range test",
}


def _event_text(row: Row) -> str:
    parts = []
    if row.event is not None:
        shadow = "shadow (not sent): " if row.shadow_lr is not None else ""
        parts.append(shadow + row.event.describe())
    if row.event is not None and row.event.kind == "divergence":
        parts.append(
            "rollback: restore the last good snapshot"
            if row.action == "restore"
            else "loss spike, max_rollbacks spent" + (": stop" if row.action == "stop" else "")
        )
    elif row.action in _ACTIONS:
        parts.append(_ACTIONS[row.action])
    return "; ".join(parts)


def format_table(rows: Sequence[Row], monitor: str | None) -> str:
    """A table: epoch, monitored value, the LR in force from the next epoch on, and the event.

    Rows of a `unit: step` policy show their step too.
    """
    title = monitor or "value"
    steps = any(r.step is not None for r in rows)
    head = f"{'epoch':>5}  {'step':>7}  " if steps else f"{'epoch':>5}  "
    lines = [f"{head}{title:>12}  {'next lr':>12}  event"]
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.6g}"
        where = f"{r.epoch:>5}  {r.step if r.step is not None else '-':>7}  "
        if not steps:
            where = f"{r.epoch:>5}  "
        lines.append(f"{where}{value:>12}  {r.lr:>12.6g}  {_event_text(r)}".rstrip())
    return "\n".join(lines)


def format_what_if(
    rows: Sequence[Row], monitor: str | None, actual: Sequence[tuple[int, float]], start_lr: float
) -> str:
    """The what-if table: per epoch (step), the value, the LR the job trained with and the LR
    the replayed policy would have had in force then, and the replay's event."""
    trained = dict(actual)
    title = monitor or "value"
    steps = any(r.step is not None for r in rows)
    unit = "step" if steps else "epoch"
    lines = [f"{unit:>7}  {title:>12}  {'trained lr':>12}  {'what-if lr':>12}  what-if event"]
    in_force = start_lr
    for r in rows:
        x = r.step if r.step is not None else r.epoch
        value = "-" if r.value is None else f"{r.value:.6g}"
        had = trained.get(x)
        had_text = "-" if had is None else f"{had:.6g}"
        line = f"{x:>7}  {value:>12}  {had_text:>12}  {in_force:>12.6g}  {_event_text(r)}"
        lines.append(line.rstrip())
        in_force = r.lr
    return "\n".join(lines)


_STOPS = {
    "divergence": "stopped by divergence (smoothed loss above 4x its best, or not finite)",
    "end_lr": "stopped at end_lr",
}


def format_range_test(report: Mapping[str, Any]) -> str:
    """The range test in a few lines: why it stopped, the LRs it swept, the suggestions."""
    points = report["points"]
    if report["done"]:
        head = f"range test: {_STOPS.get(report['stop_reason'], 'stopped')}"
    else:
        head = "range test: still sweeping at the end of the history (suggestions so far)"
    lines = [head]
    if points:
        lines.append(f"  {len(points)} points, lr {points[0][0]:.3g} .. {points[-1][0]:.3g}")
    for name, lr in report["suggestions"].items():
        mark = "  <- suggested" if name == report["suggest"] else ""
        shown = "-" if lr is None else f"{lr:.3g}"
        lines.append(f"  {name:<8} {shown}{mark}")
    return "\n".join(lines)


def plot(
    rows: Sequence[Row],
    monitor: str | None,
    path: str,
    range_test: Mapping[str, Any] | None = None,
    start_lr: float | None = None,
    actual: Sequence[tuple[int, float]] | None = None,
) -> None:
    """Draw the replay into a PNG (extra `plot`).

    Without a range test: the monitored value and the LR (log axis) over epochs, from the
    first epoch's (`start_lr`) on; with `actual` ((epoch or step, LR trained) as recorded)
    what happened beside the replay. With a range test: its loss against the LR (log axis)
    with the three suggestions marked, and, when the history goes on after the test, the
    epochs panel beside it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    after = [r for r in rows if r.phase is not None and "range_test" not in str(r.phase)]
    if range_test is None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        _plot_timeline(ax, rows, monitor, start_lr, actual)
    elif not after:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        _plot_range_test(ax, range_test)
    else:
        fig, (ax_rt, ax) = plt.subplots(1, 2, figsize=(15, 5.5))
        _plot_range_test(ax_rt, range_test)
        _plot_timeline(ax, rows, monitor, start_lr, actual)
        ax.set_title("the whole replay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_range_test(report: Mapping[str, Any], path: str) -> None:
    """Draw a range test's report (`Policy.range_test_report`) into a PNG: loss against LR.

    The picture of `simulate --plot` for a range test, for `lrpilot range-test JOB --plot`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    _plot_range_test(ax, report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_timeline(
    ax_value: Any,
    rows: Sequence[Row],
    monitor: str | None,
    start_lr: float | None = None,
    actual: Sequence[tuple[int, float]] | None = None,
) -> None:
    steps = any(r.step is not None for r in rows)
    xs = [r.step if r.step is not None else r.epoch for r in rows]
    ax_value.plot(
        xs,
        [r.value if r.value is not None else math.nan for r in rows],
        "o-",
        color="tab:blue",
        ms=3,
    )
    ax_value.set_xlabel("step" if steps else "epoch")
    ax_value.set_ylabel(monitor or "monitored value", color="tab:blue")
    ax_lr = ax_value.twinx()
    # Each row's LR is in force from the next epoch; the first epoch trains with start_lr.
    lr_x, lr_y = [x + 1 for x in xs], [r.lr for r in rows]
    if start_lr is not None and xs:
        lr_x, lr_y = [xs[0], *lr_x], [start_lr, *lr_y]
    label = "what-if lr" if actual is not None else "lr"
    ax_lr.step(lr_x, lr_y, where="post", color="tab:red", label=label)
    if actual:
        ax_lr.step(
            [a[0] for a in actual],
            [a[1] for a in actual],
            where="post",
            color="0.3",
            ls="--",
            label="lr trained (what happened)",
        )
        ax_lr.legend(loc="upper right", framealpha=0.9)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate", color="tab:red")
    for x, r in zip(xs, rows, strict=True):
        if r.event is not None and r.event.kind != "range_test":
            ax_lr.axvline(x + 1, color="tab:red", alpha=0.2, lw=1)
    cycled = [(x + 1, r.momentum) for x, r in zip(xs, rows, strict=True) if r.momentum is not None]
    if cycled:  # a cycle_momentum plan: its momentum on an axis of its own, further right
        ax_m = ax_value.twinx()
        ax_m.spines["right"].set_position(("axes", 1.09))
        ax_m.step([c[0] for c in cycled], [c[1] for c in cycled], where="post", color="tab:green")
        ax_m.set_ylabel("momentum (Adam: beta1)", color="tab:green")


_SUGGESTION_STYLE = {"valley": "tab:green", "steep": "tab:orange", "minimum": "tab:purple"}


def _plot_range_test(ax: Any, report: Mapping[str, Any]) -> None:
    """Loss against LR on a log axis: the losses as reported, the smoothed loss the
    suggestions read, the suggestions on the reported curve and where the sweep stopped.

    The smoothed loss is an EMA with about 50 points of memory: where the loss falls by
    decades within fewer points it lags far above them, so the axes follow the reported
    losses and each suggestion is marked where the reported curve is at its LR.
    """
    points = report["points"]
    lrs = [p[0] for p in points]
    raw = [p[1] if p[1] is not None else math.nan for p in points]
    smooth = [p[2] if p[2] is not None else math.nan for p in points]
    ax.plot(lrs, raw, "o-", color="0.45", ms=3, lw=0.8, label="loss (as reported)")
    ax.plot(
        lrs, smooth, "--", color="tab:blue", lw=1.2, alpha=0.8,
        label="smoothed loss, which the suggestions read (lags ~50 points)",
    )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    measured = [v for v in raw if math.isfinite(v)]
    if measured:
        # The blow-up that stops the sweep (its last points) would flatten the rest: cut it.
        top = max(measured[:-SKIP_END] or measured)
        low = min(measured)
        if low > 0 and top / low > 20:  # a loss falling by decades: show them all
            ax.set_yscale("log")
            ax.set_ylim(low / 1.5, top * 2)
        else:
            pad = 0.08 * (top - low) or 0.1 * abs(top) or 1.0
            ax.set_ylim(low - pad, top + 2 * pad)
    if lrs:  # room right of the last point for the stop's label
        ax.set_xlim(lrs[0] / 10**0.2, lrs[-1] * 10**0.35)
    for name, lr in report["suggestions"].items():
        if lr is None:
            continue
        chosen = name == report["suggest"]
        y = _loss_at(lrs, raw, lr, log=ax.get_yscale() == "log")
        label = f"{name}: {lr:.2g}" + ("  (suggested)" if chosen else "")
        color = _SUGGESTION_STYLE.get(name, "black")
        ax.axvline(lr, color=color, ls="-" if chosen else "--", lw=2 if chosen else 1.2)
        if math.isfinite(y):
            ax.plot([lr], [y], "o", color=color, ms=10 if chosen else 7, label=label, zorder=5)
        else:
            ax.plot([], [], "o", color=color, label=label)
    if report["done"] and lrs:
        why = report.get("stop_reason") or "end_lr"
        ax.axvline(lrs[-1], color="tab:red", ls=":", lw=1.2)
        # Along the stop line, right of it, from the top down: clear of the x axis.
        ax.annotate(
            f"stop: {why}",
            (lrs[-1], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -6),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va="top",
            color="tab:red",
        )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", framealpha=0.9)
    ax.set_title(f"LR range test: {len(points)} points, suggested lr {_lr_text(report)}")


def _lr_text(report: Mapping[str, Any]) -> str:
    lr = report.get("suggested_lr")
    return "-" if lr is None else f"{lr:.2g} ({report['suggest']})"


def _loss_at(lrs: Sequence[float], losses: Sequence[float], lr: float, log: bool = False) -> float:
    """The loss at `lr`, interpolated in log LR (and in log loss with `log`: straight on a
    log-log plot); NaN outside the curve."""
    for i in range(len(lrs) - 1):
        a, b = lrs[i], lrs[i + 1]
        if a <= lr <= b:
            w = (math.log(lr) - math.log(a)) / (math.log(b) - math.log(a)) if b > a else 0.0
            y0, y1 = losses[i], losses[i + 1]
            if log and y0 > 0 and y1 > 0:
                return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
            return y0 + w * (y1 - y0)
    if lrs and lr == lrs[-1]:
        return losses[-1]
    return math.nan
