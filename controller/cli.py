"""`lrpilot` command line: parse arguments, call the code that does the work, map exit codes.

Exit codes follow DESIGN.md: 0 success, 2 bad input (flags, policy, CSV),
1 runtime failure (no answer, bind failure, unknown job).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from lrpilot.client.errors import PolicyError, ProtocolError, SourceError

from . import __version__

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 < value <= 10):
        raise argparse.ArgumentTypeError(f"must be in (0, 10], got {text}")
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from .policyfile import load_default, load_file
    from .simulate import format_table, initial_lr, monitor_of, plot, read_history, replay, to_json

    try:
        policy_set = load_file(args.policy) if args.policy else load_default()
        rule = policy_set.rule_for(args.job)
        history = read_history(args.metrics)
        lr0 = initial_lr(rule, history, args.initial_lr)
        rows = replay(rule, history, lr0, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SourceError as exc:
        print(exc.located(), file=sys.stderr)
        return 2
    except ProtocolError as exc:
        print(f"{args.policy or 'policy'}: {exc.message}", file=sys.stderr)
        return 2
    monitor = monitor_of(rule.policy)
    if args.json:
        print(json.dumps(to_json(rows)))
    else:
        print(f"job {args.job}: rule {rule.match!r} ({rule.policy.type}), initial lr {lr0:.6g}")
        print(format_table(rows, monitor))
    if args.plot:
        try:
            plot(rows, monitor, args.plot)
        except ImportError:
            print("--plot needs matplotlib: pip install 'lrpilot[plot]'", file=sys.stderr)
            return 2
    return 0


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

    p = sub.add_parser("simulate", help="replay a CSV metric history through a policy")
    p.add_argument("--policy", metavar="FILE", help="policy file (default: the embedded default)")
    p.add_argument("--job", required=True, metavar="NAME", help="job name that picks the rule")
    p.add_argument("--metrics", required=True, metavar="CSV", help="CSV with an epoch column")
    p.add_argument("--initial-lr", type=_positive_float, metavar="X")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="draw the value and the LR into a PNG")
    p.set_defaults(handler=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lrpilot` console script."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
