"""`lrpilot` command line: parse arguments, call the code that does the work, map exit codes.

Exit codes follow DESIGN.md: 0 success, 2 bad input (flags, policy, CSV),
1 runtime failure (no answer, bind failure, unknown job).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lrpilot.client.vocabulary import lr_problem

from . import __version__
from .errors import PolicyError, SourceError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if (problem := lr_problem(value)) is not None:
        raise argparse.ArgumentTypeError(f"{problem}, got {text}")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    from .policyfile import load_file

    status = 0
    for path in args.files:
        try:
            policy_set = load_file(path)
        except PolicyError as exc:
            for error in exc.errors:
                print(error.located())
            status = 2
            continue
        for warning in policy_set.warnings:
            print(warning)
        print(f"{path}: ok")
    return status


def _matplotlib_missing() -> bool:
    """Whether --plot cannot work here (checked before any work, so it fails fast)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        return False
    print("--plot needs matplotlib: pip install 'lrpilot[plot]'", file=sys.stderr)
    return True


def cmd_simulate(args: argparse.Namespace) -> int:
    from .policies.errors import EngineError
    from .policyfile import load_default, load_file
    from .simulate import (
        format_range_test,
        format_table,
        format_what_if,
        initial_lr,
        monitor_of,
        monitors_of,
        plot,
        read_history,
        recorded_history,
        run,
        to_json,
    )

    if args.plot and _matplotlib_missing():
        return 2
    recorded: dict[str, Any] | None = None
    if args.metrics is None:  # what-if on the job's recorded history, from the controller
        status = _with_admin(args, lambda admin: _fetch_metrics(admin, args))
        if status:
            return status
        recorded = args.recorded
    source = args.metrics or f"job {args.job}'s recorded metrics"
    try:
        policy_set = load_file(args.policy) if args.policy else load_default()
        rule = policy_set.rule_for(args.job)
        if recorded is not None:
            if not recorded["x"]:
                print(f"lrpilot simulate: {source}: nothing recorded yet", file=sys.stderr)
                return 1
            history = recorded_history(recorded, source)
        else:
            history = read_history(args.metrics)
        columns = sorted({name for row in history.metrics for name in row})
        missing = [m for m in monitors_of(rule.policy) if m not in columns]
        if missing:
            what = "metric" if recorded is not None else "column"
            print(
                f"{source}: no {what} {missing[0]!r}, which the policy for job "
                f"{args.job} monitors; it has: epoch, {', '.join(columns) or '(nothing)'}",
                file=sys.stderr,
            )
            return 2
        lr0 = initial_lr(rule, history, args.initial_lr)
        replay = run(rule, history, lr0, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        rows = replay.rows
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SourceError as exc:
        print(exc.located(), file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"{args.policy or 'policy'}: {exc}", file=sys.stderr)
        return 2
    monitor = monitor_of(rule.policy)
    actual = None if recorded is None else list(zip(recorded["x"], recorded["lr"], strict=True))
    if args.json and actual is not None:
        trained = dict(actual)
        print(
            json.dumps(
                [
                    {**row, "actual_lr": trained.get(r.step if r.step is not None else r.epoch)}
                    for row, r in zip(to_json(rows), rows, strict=True)
                ]
            )
        )
    elif args.json:
        print(json.dumps(to_json(rows)))
        if replay.range_test is not None:  # stdout keeps its documented shape
            print(format_range_test(replay.range_test), file=sys.stderr)
    else:
        print(f"job {args.job}: rule {rule.match!r} ({rule.policy.type}), initial lr {lr0:.6g}")
        if replay.start_action == "snapshot":
            print(f"start: lr {replay.start_lr:.6g}; snapshot the weights (a range test starts)")
        if actual is not None:
            print(format_what_if(rows, monitor, actual, replay.start_lr))
        else:
            print(format_table(rows, monitor))
        if replay.range_test is not None:
            print(format_range_test(replay.range_test))
    if args.plot:
        plot(rows, monitor, args.plot, replay.range_test, replay.start_lr, actual)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _fetch_metrics(admin: Any, args: argparse.Namespace) -> int:
    args.recorded = admin.metrics(args.job, run=args.run)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        from .simulate import metrics_csv, metrics_table

        recorded = admin.metrics(args.job, run=args.run)
        print(metrics_csv(recorded) if args.csv else metrics_table(recorded), end="")
        return 0

    return _with_admin(args, run)


def _duration(text: str) -> float:
    from .units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _setup_logging(level: str, fmt: str) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from .store import rfc3339

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                line = {
                    "time": rfc3339(record.created),  # RFC 3339, UTC, milliseconds
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": record.getMessage(),
                }
                if record.exc_info:
                    line["exception"] = self.formatException(record.exc_info)
                return json.dumps(line)

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lrpilot")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .policyfile import load_default, load_file
    from .server import ServeConfig, serve

    _setup_logging(args.log_level, args.log_format)
    log = logging.getLogger("lrpilot.controller")  # every line, startup errors too, as asked
    if bool(args.curve_secret_key) != bool(args.curve_authorized_dir):
        log.error("lrpilot serve: --curve-secret-key and --curve-authorized-dir go together")
        return 2
    try:
        policies = load_file(args.policy) if args.policy else load_default()
    except PolicyError as exc:
        for error in exc.errors:
            log.error("%s", error.located())
        return 2
    for warning in policies.warnings:
        log.warning("%s", warning)
    if args.store and not args.store.startswith(("postgresql://", "postgres://")):
        log.error("lrpilot serve: --store takes postgresql://USER@HOST:PORT/DB, got %r", args.store)
        return 2
    config = ServeConfig(
        policy=args.policy,
        bind=args.bind,
        admin_bind=args.admin_bind,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        state_dir=args.state_dir,
        job_ttl=args.job_ttl,
        max_jobs=args.max_jobs,
        worker_timeout=args.worker_timeout,
        curve_secret_key=args.curve_secret_key,
        curve_authorized_dir=args.curve_authorized_dir,
        store=args.store,
        advertise=args.advertise,
    )
    return serve(config, policies)


def _ask(args: argparse.Namespace, message: dict[str, object]) -> dict[str, object] | None:
    from .admin import NoAnswer, request

    try:
        return request(args.admin, message)
    except (NoAnswer, ValueError) as exc:  # ValueError: a bad endpoint or LRPILOT_CURVE_*
        print(f"lrpilot: {exc}", file=sys.stderr)
        return None


def _with_admin(args: argparse.Namespace, call: Callable[[Any], int]) -> int:
    """Run `call(Admin)`; no answer, a bad endpoint or a refusal is printed and exits 1
    (a value the controller finds out of range: 2). Never shown as an empty result."""
    from .admin import Admin
    from .errors import AdminError, NoAnswer

    try:
        return call(Admin(args.admin))
    except (NoAnswer, ValueError) as exc:  # ValueError: a bad endpoint or LRPILOT_CURVE_*
        print(f"lrpilot {args.command}: {exc}", file=sys.stderr)
        return 1
    except AdminError as exc:
        print(f"lrpilot {args.command}: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "out_of_range" else 1


def _fmt(value: object, spec: str = ".6g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _lr(value: object) -> str:
    """An LR as people write them: 0.1, 0.005, 3e-04, 2.5e-05."""
    if not isinstance(value, float | int) or isinstance(value, bool):
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return format(value, ".4g")
    mantissa, exponent = format(value, ".3e").split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _override_note(o: dict[str, Any] | None) -> str:
    """A pin as the NOTE column of `status` shows it: who, and its end."""
    if not o:
        return ""
    return f"pinned by {o.get('author')} {_pin_end(o)}"


def _pin_end(o: dict[str, Any]) -> str:
    """A pin's end: `until epoch 9 (2/4 trained at it)`, `for 4 epochs trained at it, from
    epoch 5 or later`, `until 2026-12-05T08:10:00Z (9m58s left)`."""
    unit = "step" if o.get("unit") == "step" else "epoch"
    if o.get("epochs") is not None:
        n = o["epochs"]
        if o.get("until_epoch") is not None:
            return f"until {unit} {o['until_epoch']} ({o.get('trained')}/{n} trained at it)"
        plural = "s" if n != 1 else ""
        return f"for {n} {unit}{plural} trained at it, from {unit} {o.get('from_epoch')} or later"
    until = str(o.get("until") or "-")[:19] + "Z"
    return f"until {until} ({_seconds(o.get('remaining_s'))} left)"


def _seconds(value: object) -> str:
    """A time left as people read it: 42s, 9m58s, 3h05m, 12d04h."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    s = int(value)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cmd_status(args: argparse.Namespace) -> int:
    from .jobstate import STATUS_FIELDS

    def run(admin: Any) -> int:
        jobs = admin.status()
        if args.json:
            print(json.dumps([{k: j.get(k) for k in STATUS_FIELDS} for j in jobs]))
            return 0
        print(status_table(jobs))
        return 0

    if args.watch is not None:
        return _watch(args)
    return _with_admin(args, run)


def _watch(args: argparse.Namespace) -> int:
    """`status --watch`: the table redrawn in place every SECONDS until Ctrl-C; into a file
    or a pipe, the tables one after another in plain text."""
    import time

    from .admin import Admin
    from .errors import AdminError, NoAnswer

    try:
        admin = Admin(args.admin)
    except ValueError as exc:
        print(f"lrpilot status: {exc}", file=sys.stderr)
        return 1
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                body = status_table(admin.status())
            except (NoAnswer, AdminError) as exc:  # keep watching: it may come back
                body = f"(no answer: {exc})"
            stamp = time.strftime("%H:%M:%S")
            header = f"lrpilot status at {admin.endpoint}, every {args.watch:g} s, {stamp}"
            if tty:  # redrawn in place
                sys.stdout.write(f"\x1b[H\x1b[2J{header} (Ctrl-C to stop)\n\n{body}\n")
            else:  # a file or a pipe: one plain table after another, no escape codes
                sys.stdout.write(f"{header}\n{body}\n\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 0


def _position(job: dict[str, Any]) -> str:
    """The EPOCH cell: the last epoch decided, or `step N` for a unit: step job."""
    if job.get("epoch") is None:
        return "-"
    return f"step {job['epoch']}" if job.get("unit") == "step" else str(job["epoch"])


def _wait(job: dict[str, Any]) -> str:
    """The WAIT cell: `wait/patience`; at min_lr, where Keras keeps counting past the
    patience with nothing left to reduce, the count stops at it: `2/2 min_lr`."""
    wait, patience = job.get("wait"), job.get("patience")
    if wait is None:
        return "-"
    min_lr, lr = job.get("min_lr"), job.get("lr")
    # (1 + 1e-6): a Keras-compat plateau holds min_lr rounded to float32
    if isinstance(min_lr, float) and isinstance(lr, float) and 0 < lr <= min_lr * (1 + 1e-6):
        shown = min(wait, patience) if isinstance(patience, int) else wait
        return f"{shown}/{patience} min_lr"
    return f"{wait}/{patience}"


def status_table(jobs: list[dict[str, Any]]) -> str:
    """The `lrpilot status` table."""
    header = (
        "JOB",
        "WORKERS",
        "EPOCH",
        "LR",
        "MOMENTUM",
        "MONITOR",
        "VALUE",
        "BEST",
        "WAIT",
        "POLICY",
        "PHASE",
        "AGE",
        "NOTE",
    )
    rows = [header]
    for j in jobs:
        age = "-" if j.get("last_report_age_s") is None else f"{j['last_report_age_s']:.0f}s"
        notes = ["finished" if j.get("finished") else "", _override_note(j.get("override"))]
        if j.get("policy") == "range_test" or j.get("suggested_lr") is not None:
            suggested = j.get("suggested_lr")
            notes.append("suggested -" if suggested is None else f"suggested {suggested:.3g}")
        if j.get("rollbacks"):
            n = j["rollbacks"]
            notes.append(f"{n} rollback{'s' if n != 1 else ''} (loss spikes)")
        rows.append(
            (
                j["job"],
                _fmt(j["workers"]),
                _position(j),
                _lr(j["lr"]),
                _fmt(j.get("momentum"), ".4g"),
                _fmt(j["monitor"]),
                _fmt(j["value"], ".4g"),
                _fmt(j["best"], ".4g"),
                _wait(j),
                _fmt(j["policy"]),
                _fmt(j["phase"]),
                age,
                "; ".join(n for n in notes if n),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    if not jobs:
        lines.append("(no jobs yet)")
    return "\n".join(lines)


def cmd_set_lr(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        reply = admin.set_lr(
            args.job,
            args.lr,
            reason=args.reason,
            expires=args.for_,
            epochs=args.epochs,
            force=args.force,
        )
        unit, start = reply.get("unit") or "epoch", reply.get("apply_from")
        pin = reply.get("override")
        if not pin:
            print(
                f"{args.job}: lr {_lr(reply.get('lr'))} from {unit} {start} "
                f"(version {reply.get('version')}); the policy goes on from it"
            )
            return 0
        # The trainer applies it at its next boundary at or after `start`; an --epochs pin
        # counts what is reported as trained at it, so only `status` can name its last epoch.
        print(
            f"{args.job}: lr {_lr(pin.get('lr'))} pinned {_pin_end(pin)}"
            + ("" if pin.get("epochs") is not None else f", from {unit} {start}")
            + f" (version {reply.get('version')}); then the policy's LR, now"
            f" {_lr(pin.get('policy_lr'))}; `lrpilot release {args.job}` ends it early"
        )
        return 0

    return _with_admin(args, run)


def cmd_release(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        reply = admin.release(args.job)
        unit = reply.get("unit") or "epoch"
        print(
            f"{args.job}: pin released; the policy's lr {_lr(reply.get('lr'))} from "
            f"{unit} {reply.get('apply_from')} (version {reply.get('version')})"
        )
        return 0

    return _with_admin(args, run)


def cmd_reload(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        reply = admin.reload()
        if not reply.get("ok"):
            for line in reply.get("errors") or []:
                print(line)
            print("reload rejected; the old policy stays in force", file=sys.stderr)
            return 2
        print("reloaded" if reply.get("changed") else "reloaded (no change)")
        return 0

    return _with_admin(args, run)


def cmd_history(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        rows = admin.history(
            args.job, run=args.run, all_runs=args.all_runs, since=args.since, tail=args.tail
        )
        if args.json:
            print(json.dumps(rows))
            return 0
        run_id = None
        for r in rows:
            if r.get("run") != run_id:
                run_id = r.get("run")
                state = _RUN_STATES.get(r.get("run_state") or "")
                print(f"-- run {run_id}{f' ({state})' if state else ''} --")
            detail = _detail(args.job, r)
            print(
                f"{r['time']}  epoch {_fmt(r['epoch']):>5}  {_fmt(r['old_lr']):>10} -> "
                f"{_fmt(r['new_lr']):<10}  {r['reason']:<9} v{r['version']}  {r['source']}"
                + (f"  ({detail})" if detail else "")
            )
        return 0

    return _with_admin(args, run)


_RUN_STATES = {
    "finished": "finished: every worker said bye",
    "ended": "ended: a later run started",
    "current": "current",
}
_DETAIL_CHARS = 120  # a history line stays a line; `history --json` has the whole detail


def _detail(job: str, row: dict[str, Any]) -> str:
    """A history row's detail in one short line: a range test's outcome, not its curve."""
    detail = str(row.get("detail") or "")
    if row.get("reason") == "range_test" and detail.startswith("{"):
        try:
            report = json.loads(detail)
        except ValueError:
            report = None
        if isinstance(report, dict) and "points" in report:
            how = report.get("stop_reason") or "running"
            chosen = report.get("suggest") or "-"
            return (
                f"range test stopped: {how}, {len(report.get('points') or [])} points, "
                f"suggested {_lr(report.get('suggested_lr'))} ({chosen}); "
                f"the curve: lrpilot range-test {job}"
            )
    detail = _PLAN_DETAIL.sub(_plan_in_short, detail)
    if len(detail) > _DETAIL_CHARS:
        return detail[: _DETAIL_CHARS - 3] + "..."
    return detail


_PLAN_DETAIL = re.compile(r"\bplan (\{.*\})")


def _plan_in_short(m: re.Match[str]) -> str:
    """`plan {...}` in a history line: the plan's kind and span (`--json` has it whole)."""
    try:
        plan = json.loads(m.group(1))
    except ValueError:
        return m.group(0)
    if not isinstance(plan, dict) or "kind" not in plan:
        return m.group(0)
    until = plan.get("until")
    span = f"from {plan.get('from', 0)}" + (f" until {until}" if until is not None else "")
    return f"plan {plan['kind']} {span}"


def cmd_range_test(args: argparse.Namespace) -> int:
    if args.plot and _matplotlib_missing():
        return 2

    def run(admin: Any) -> int:
        report = admin.range_test(args.job)
        if args.plot:
            from .simulate import plot_range_test

            plot_range_test(report, args.plot)
        if args.json:
            print(json.dumps(report))
            return 0
        found = report.get("suggestions") or {}
        state = "done" if report.get("done") else "running"
        print(
            f"{args.job}: LR range test {state}, {len(report.get('points') or [])} points, "
            f"stopped: {report.get('stop_reason') or '-'}"
        )
        for name in ("valley", "steep", "minimum"):
            mark = "  <- suggest" if name == report.get("suggest") else ""
            print(f"  {name:<8} {_lr(found.get(name))}{mark}")
        print(f"suggested lr: {_lr(report.get('suggested_lr'))}")
        if args.plot:
            print(f"plot: {args.plot}")
        return 0

    return _with_admin(args, run)


def cmd_forget(args: argparse.Namespace) -> int:
    def run(admin: Any) -> int:
        admin.forget(args.job)
        print(f"{args.job}: forgotten")
        return 0

    return _with_admin(args, run)


def _examples() -> dict[str, Any]:
    """The example policies shipped with lrpilot (also in a wheel install), by name."""
    from importlib.resources import files

    folder = files("lrpilot.policies")
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    examples = _examples()
    if args.example not in examples:
        print(
            f"lrpilot init: no example {args.example!r}; one of: {', '.join(sorted(examples))}",
            file=sys.stderr,
        )
        return 2
    target = Path(args.file)
    if target.exists():
        print(f"lrpilot init: {target} exists; not overwritten", file=sys.stderr)
        return 2
    target.write_text(examples[args.example].read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {target} (from {args.example}); check it: lrpilot check {target}")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from zmq.auth import create_certificates

    from .auth import write_jobs

    directory = Path(args.dir)
    public, secret = directory / f"{args.name}.key", directory / f"{args.name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not args.force:
        print(
            f"lrpilot keygen: {' and '.join(existing)} exist; pass --force to replace them "
            "(clients holding the old keys will be refused)",
            file=sys.stderr,
        )
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret is never readable by others, not even for a moment
    try:
        create_certificates(directory, args.name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    if args.jobs:
        write_jobs(public, args.jobs)
        write_jobs(secret, args.jobs)
    limits = f" (jobs {args.jobs})" if args.jobs else ""
    print(f"public key: {public}{limits}\nsecret key: {secret} (mode 0600)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(epochs=args.epochs, policy=args.policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpilot",
        description="Learning-rate controller: training jobs report metrics, YAML policies decide.",
    )
    parser.add_argument("--version", action="version", version=f"lrpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="validate policy files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=cmd_check)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--admin",
        default=None,
        metavar="ENDPOINT",
        help="admin endpoint (default: $LRPILOT_ADMIN or tcp://127.0.0.1:5556)",
    )

    p = sub.add_parser(
        "simulate",
        parents=[admin],
        help="replay a metric history (a CSV, or a job's recorded one) through a policy",
        description="Replay a metric history through a policy, with the daemon's engine. "
        "Without --metrics: what-if on the job's history recorded by the controller, beside "
        "the LR the job trained with.",
    )
    p.add_argument("--policy", metavar="FILE", help="policy file (default: the embedded default)")
    p.add_argument("--job", required=True, metavar="NAME", help="job name that picks the rule")
    p.add_argument(
        "--metrics",
        metavar="CSV",
        help="CSV with an epoch column (default: the job's recorded metrics from the controller)",
    )
    p.add_argument("--run", type=int, metavar="RUN", help="with a recorded history: this run")
    p.add_argument("--initial-lr", type=_positive_float, metavar="X")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="draw the value and the LR into a PNG (a range test: loss vs LR, suggestions marked)",
    )
    p.set_defaults(handler=cmd_simulate)

    p = sub.add_parser(
        "serve",
        help="run the controller",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run the controller until SIGTERM/SIGINT. Prints one line "
        "`lrpilot ready bind=... admin=... metrics=...` once bound.",
    )
    p.add_argument(
        "--policy", metavar="FILE", help="policy file, hot-reloaded (none: the embedded default)"
    )
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="endpoint for training clients")
    p.add_argument(
        "--admin-bind",
        default="tcp://127.0.0.1:5556",
        help="admin endpoint; ipc:///PATH makes a mode-0600 Unix socket (shared machines)",
    )
    p.add_argument("--metrics-port", type=_port, default=9477, help="Prometheus port (0: any)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="Prometheus address")
    p.add_argument("--state-dir", default="./lrpilot-state", help="durable state (SQLite)")
    p.add_argument(
        "--store",
        metavar="postgresql://USER@HOST:PORT/DB",
        help="state in PostgreSQL instead of --state-dir: several controllers share it",
    )
    p.add_argument(
        "--advertise",
        metavar="tcp://HOST:PORT",
        help="this controller's client endpoint as other controllers name it in `moved` "
        "(default: the bound one, 0.0.0.0 as this host's name)",
    )
    p.add_argument(
        "--job-ttl",
        type=_duration,
        default="24h",
        metavar="DURATION",
        help="silent jobs leave memory and metrics after this (kept on disk)",
    )
    p.add_argument("--max-jobs", type=int, default=10000, help="jobs in memory at most")
    p.add_argument(
        "--worker-timeout",
        type=_duration,
        default="10m",
        metavar="DURATION",
        help="a rank not heard from this long is no longer a worker",
    )
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log"
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line, time in RFC 3339 UTC",
    )
    p.add_argument(
        "--curve-secret-key", metavar="F", help="server certificate (lrpilot keygen); enables CURVE"
    )
    p.add_argument(
        "--curve-authorized-dir", metavar="D", help="client public keys (.key) allowed in"
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("status", parents=[admin], help="live jobs")
    p.add_argument("--json", action="store_true", help="a list of objects, one per job")
    p.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw the table in place every SECONDS (default 2) until Ctrl-C",
    )
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "set-lr",
        parents=[admin],
        help="operator override of a job's LR",
        description="Set the job's LR from its next epoch: a new base the policy goes on "
        "from. With --for or --epochs the LR is pinned instead: it holds exactly (no plateau, "
        "schedule, phase or reload moves it) while the policy keeps observing, and at the end "
        "the policy's LR applies. The audit log names you as the controller authenticated "
        "you, and the reason.",
    )
    p.add_argument("job")
    p.add_argument("lr", type=_positive_float)
    p.add_argument("--reason", default="", metavar="TEXT", help="why, for the audit log")
    until = p.add_mutually_exclusive_group()
    until.add_argument(
        "--for",
        dest="for_",
        type=_duration,
        metavar="DURATION",
        help="pin for this long on the controller's clock, e.g. 30m, 2h (at most 365d)",
    )
    until.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        help="pin for N epochs trained at the LR (steps with unit: step)",
    )
    p.add_argument(
        "--force", action="store_true", help="also for a finished job (every worker said bye)"
    )
    p.set_defaults(handler=cmd_set_lr)

    p = sub.add_parser(
        "release",
        parents=[admin],
        help="end a job's pinned LR now",
        description="End the pin set by `set-lr --for/--epochs`: the policy's LR applies from "
        "the job's next epoch.",
    )
    p.add_argument("job")
    p.set_defaults(handler=cmd_release)

    p = sub.add_parser("reload", parents=[admin], help="re-read the policy file now")
    p.set_defaults(handler=cmd_reload)

    p = sub.add_parser("history", parents=[admin], help="a job's LR changes from the audit log")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--run", type=int, metavar="RUN", help="this run (default: the current)")
    runs.add_argument("--all-runs", action="store_true", help="every run, marked")
    p.add_argument("--since", type=_duration, metavar="DURATION", help="only the last DURATION")
    p.add_argument("--tail", type=_positive_int, metavar="N", help="only the last N changes")
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser(
        "range-test", parents=[admin], help="the job's last LR range test and its suggestions"
    )
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="points, suggestions, stop reason")
    p.add_argument("--plot", metavar="PNG", help="draw loss against LR (log axis) into a PNG")
    p.set_defaults(handler=cmd_range_test)

    p = sub.add_parser(
        "metrics", parents=[admin], help="a job's recorded metrics and the LR it trained with"
    )
    p.add_argument("job")
    p.add_argument("--run", type=int, metavar="RUN", help="this run (default: the current)")
    p.add_argument(
        "--csv", action="store_true", help="CSV (epoch[, step], metrics, lr): simulate reads it"
    )
    p.set_defaults(handler=cmd_metrics)

    p = sub.add_parser("forget", parents=[admin], help="drop a job's state")
    p.add_argument("job")
    p.set_defaults(handler=cmd_forget)

    p = sub.add_parser(
        "keygen",
        help="create a CURVE key pair",
        description="Create a CURVE key pair in zmq.auth certificate format. Copy NAME.key into "
        "the controller's --curve-authorized-dir to let its holder in.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", default="lrpilot", help="file names NAME.key / NAME.key_secret")
    p.add_argument(
        "--jobs",
        metavar="GLOBS",
        help="comma-separated job globs this key may use, e.g. 'bert-*' (default: any job)",
    )
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(handler=cmd_keygen)

    p = sub.add_parser(
        "init",
        help="write a commented starter policy",
        description="Write a commented starter policy (or one of the example policies).",
    )
    p.add_argument("file", nargs="?", default="lrpilot-policy.yaml", metavar="FILE")
    p.add_argument(
        "--example",
        default="starter",
        metavar="NAME",
        help="an example policy instead: default, warmup-plateau, step-decay, per-job, ...",
    )
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(handler=cmd_completion)

    p = sub.add_parser(
        "demo",
        help="a controller driving a short real Keras training",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=45, help="epochs of the demo training")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="policy file (none: the embedded default, ReduceLROnPlateau: factor 0.1, patience 10)",
    )
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lrpilot` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "admin", "unset") is None:
        from .admin import default_admin

        args.admin = default_admin()
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:  # `lrpilot simulate --json | head`: the reader is gone, quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
