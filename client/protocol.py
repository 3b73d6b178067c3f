"""Wire protocol v1, shared by the controller and the client.

ZeroMQ ROUTER (controller) / DEALER (client); one msgpack frame per message
after the routing id, string keys. Every incoming message is checked against
the limits below *before* any work is done with it; a violation is a
`ProtocolError` whose `code` is sent back in an `error` message.

    hello  {t:"hello", v:1, job, rank, world, session, lr, start_epoch, start_step, framework,
            host, pid, directions?}
    report {t:"report", job, rank, session, seq, epoch, step|null, metrics: {name: float}, lr}
    bye    {t:"bye", job, rank, session}
    lr     {t:"lr", job, lr, version, run, seq|null, apply_from_epoch|null, apply_from_step|null,
            reason, action?}
    error  {t:"error", code, message, seq|null}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgpack

from .errors import ProtocolError
from .plans import check_plan
from .vocabulary import (
    ACTIONS,
    ERROR_CODES,
    MAX_LR,
    MIN_LR,
    NAME_RE,
    NOTICE_CODES,
    REASONS,
    RETRYABLE_CODES,
    lr_ok,
    lr_problem,
)

__all__ = [
    "ACTIONS",
    "ERROR_CODES",
    "MAX_ENDPOINT",
    "MAX_INT",
    "MAX_LR",
    "MAX_MESSAGE_BYTES",
    "MAX_METRICS",
    "MAX_UNDECIDED",
    "MAX_WORLD",
    "MIN_LR",
    "NAME_RE",
    "NOTICE_CODES",
    "PROTOCOL_VERSION",
    "REASONS",
    "RETRYABLE_CODES",
    "SOCKET_MAX_MSG_SIZE",
    "Bye",
    "ErrorMessage",
    "Hello",
    "LrMessage",
    "Report",
    "check_name",
    "decode",
    "echo_seq",
    "encode",
    "parse_client_dict",
    "parse_client_message",
    "parse_server_dict",
    "parse_server_message",
    "read_report",
]

PROTOCOL_VERSION = 1
SOCKET_MAX_MSG_SIZE = 1 << 20  # the socket drops the peer above this
MAX_MESSAGE_BYTES = 64 * 1024  # rejected before unpacking above this
MAX_METRICS = 256
MAX_INT = 1 << 40  # epochs and steps
MAX_SEQ = (1 << 63) - 1
MAX_WORLD = 4096
#: A job holds at most this many epochs (or steps) waiting for other ranks' reports.
MAX_UNDECIDED = 64
SESSION_BYTES = 16
#: The longest endpoint a `moved` error may name.
MAX_ENDPOINT = 256
MAX_NOTICES = 16


def encode(message: Mapping[str, Any]) -> bytes:
    """One msgpack frame (`use_bin_type=True`)."""
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def decode(frame: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """A msgpack frame → a dict with a string `t`, within the size limits.

    Args:
        frame: the bytes received.
        limit: the largest frame accepted (64 KiB on the client socket, 1 MiB for admin).

    Raises:
        ProtocolError: `too_large`, `decode` or `schema`.
    """
    if len(frame) > limit:
        raise ProtocolError("too_large", f"message of {len(frame)} bytes > {limit}")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=4096,
            max_bin_len=256,
            max_array_len=1024,
            max_map_len=2 * MAX_METRICS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise ProtocolError("decode", f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"a message is a map, got {type(obj).__name__}")
    if not isinstance(obj.get("t"), str):
        raise ProtocolError("schema", "a message needs a string field t")
    return obj


# -- field checks ---------------------------------------------------------------


def _get(msg: Mapping[str, Any], key: str) -> Any:
    if key not in msg:
        raise ProtocolError("schema", f"{msg.get('t')} needs {key}")
    return msg[key]


def _int(msg: Mapping[str, Any], key: str, lo: int, hi: int, *, optional: bool = False) -> Any:
    value = msg.get(key) if optional else _get(msg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError("out_of_range", f"{key} must be in {lo}..{hi}, got {value}")
    return value


def _lr(msg: Mapping[str, Any], key: str = "lr", *, zero: bool = True) -> float:
    """An LR in the vocabulary's bounds; `zero` also lets 0 through (what a trainer reports
    after a schedule of its own ended there, or an older controller sent for cosine alpha 0).
    """
    value = _get(msg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("schema", f"{key} must be a number, got {type(value).__name__}")
    value = float(value)
    if zero and value == 0:
        return value
    problem = lr_problem(value)
    if problem is not None:
        raise ProtocolError("out_of_range", f"{key} {problem}, got {value!r}")
    return value


def _str(msg: Mapping[str, Any], key: str, limit: int, *, optional: bool = False) -> str:
    value = msg.get(key, "") if optional else _get(msg, key)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError("schema", f"{key} must be a string of at most {limit} characters")
    return value


def check_name(value: Any, what: str) -> str:
    """A job or metric name: 1-128 characters of [A-Za-z0-9._:/@-]."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise ProtocolError("schema", f"{what} must be 1-128 of [A-Za-z0-9._:/@-], got {shown}")
    return value


def _session(msg: Mapping[str, Any]) -> bytes:
    value = _get(msg, "session")
    if not isinstance(value, bytes) or len(value) != SESSION_BYTES:
        raise ProtocolError("schema", f"session must be {SESSION_BYTES} bytes")
    return value


def _rank(msg: Mapping[str, Any]) -> int:
    return int(_int(msg, "rank", 0, MAX_WORLD - 1))


# -- messages --------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A client starts (or restarts): who it is, its LR and the first epoch it will run."""

    job: str
    rank: int
    world: int
    session: bytes
    lr: float
    start_epoch: int
    start_step: int = 0
    framework: str = ""
    host: str = ""
    pid: int = 0
    directions: dict[str, str] = field(default_factory=dict)
    restore: bool = False  # the client can snapshot and restore its weights (range test)
    plans: bool = False  # the client evaluates `lr.plan` itself (see lrpilot.client.plans)

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "hello",
            "v": PROTOCOL_VERSION,
            "job": self.job,
            "rank": self.rank,
            "world": self.world,
            "session": self.session,
            "lr": self.lr,
            "start_epoch": self.start_epoch,
            "start_step": self.start_step,
            "framework": self.framework,
            "host": self.host,
            "pid": self.pid,
            "directions": self.directions,
            "restore": self.restore,
            "plans": self.plans,
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Hello:
        if msg.get("v") != PROTOCOL_VERSION:
            raise ProtocolError("bad_version", f"protocol version {msg.get('v')!r} is not 1")
        world = int(_int(msg, "world", 1, MAX_WORLD))
        rank = _rank(msg)
        if rank >= world:
            raise ProtocolError("out_of_range", f"rank {rank} must be < world {world}")
        directions = msg.get("directions") or {}
        if not isinstance(directions, dict) or len(directions) > MAX_METRICS:
            raise ProtocolError("schema", "directions must be a map of metric -> min|max")
        for name, d in directions.items():
            check_name(name, "metric name")
            if d not in ("min", "max"):
                raise ProtocolError("schema", f"direction of {name} must be min or max, got {d!r}")
        return cls(
            job=check_name(_get(msg, "job"), "job"),
            rank=rank,
            world=world,
            session=_session(msg),
            lr=_lr(msg, zero=False),
            start_epoch=int(_int(msg, "start_epoch", 0, MAX_INT)),
            start_step=int(_int(msg, "start_step", 0, MAX_INT, optional=True) or 0),
            framework=_str(msg, "framework", 64, optional=True),
            host=_str(msg, "host", 255, optional=True),
            pid=int(_int(msg, "pid", 0, 1 << 32, optional=True) or 0),
            directions=dict(directions),
            restore=msg.get("restore") is True,
            plans=msg.get("plans") is True,
        )


@dataclass(frozen=True)
class Report:
    """The metrics of one finished epoch (or step): `epoch` is 0-based, as Keras' on_epoch_end."""

    job: str
    rank: int
    session: bytes
    seq: int
    epoch: int
    metrics: dict[str, float]
    lr: float
    step: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "report",
            "job": self.job,
            "rank": self.rank,
            "session": self.session,
            "seq": self.seq,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": self.metrics,
            "lr": self.lr,
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Report:
        metrics = _get(msg, "metrics")
        if not isinstance(metrics, dict):
            raise ProtocolError("schema", "metrics must be a map of name -> number")
        if len(metrics) > MAX_METRICS:
            raise ProtocolError(
                "out_of_range", f"at most {MAX_METRICS} metrics, got {len(metrics)}"
            )
        clean: dict[str, float] = {}
        for name, value in metrics.items():
            check_name(name, "metric name")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ProtocolError("schema", f"metric {name} must be a number")
            clean[name] = float(value)  # NaN and ±inf are information, kept as they are
        return cls(
            job=check_name(_get(msg, "job"), "job"),
            rank=_rank(msg),
            session=_session(msg),
            seq=int(_int(msg, "seq", 0, MAX_SEQ)),
            epoch=int(_int(msg, "epoch", 0, MAX_INT)),
            step=_int(msg, "step", 0, MAX_INT, optional=True),
            metrics=clean,
            lr=_lr(msg),
        )


@dataclass(frozen=True)
class Bye:
    """A client is done: its rank no longer counts as a worker."""

    job: str
    rank: int
    session: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": "bye", "job": self.job, "rank": self.rank, "session": self.session}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Bye:
        return cls(check_name(_get(msg, "job"), "job"), _rank(msg), _session(msg))


@dataclass(frozen=True)
class LrMessage:
    """The controller's answer or push: the LR to use from `apply_from_epoch` (or step) on."""

    job: str
    lr: float
    version: int
    run: int
    reason: str
    seq: int | None = None
    apply_from_epoch: int | None = None
    apply_from_step: int | None = None
    action: str | None = None
    notices: tuple[tuple[str, str], ...] = ()  # (code, message) pairs
    #: The schedule in force as a function of time (see `lrpilot.client.plans`), for clients
    #: whose hello said `plans: true`; None otherwise.
    plan: dict[str, Any] | None = None
    #: Integers about the decision: a guarded job's `snapshot_every` (the trainer copies its
    #: state at every multiple of it) and, with a guard's `action: restore`, `snapshot_unit`.
    detail: dict[str, int] | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "t": "lr",
            "job": self.job,
            "lr": self.lr,
            "version": self.version,
            "run": self.run,
            "seq": self.seq,
            "apply_from_epoch": self.apply_from_epoch,
            "apply_from_step": self.apply_from_step,
            "reason": self.reason,
        }
        if self.action is not None:
            msg["action"] = self.action
        if self.notices:
            msg["notices"] = [{"code": c, "message": m} for c, m in self.notices]
        if self.plan is not None:
            msg["plan"] = self.plan
        if self.detail:
            msg["detail"] = self.detail
        return msg

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> LrMessage:
        epoch = _int(msg, "apply_from_epoch", 0, MAX_INT, optional=True)
        step = _int(msg, "apply_from_step", 0, MAX_INT, optional=True)
        if (epoch is None) == (step is None):
            raise ProtocolError("schema", "exactly one of apply_from_epoch, apply_from_step")
        reason = _get(msg, "reason")
        if reason not in REASONS:
            raise ProtocolError("schema", f"unknown reason {reason!r}")
        action = msg.get("action")
        if action is not None and action not in ACTIONS:
            raise ProtocolError("schema", f"unknown action {action!r}")
        notices = msg.get("notices") or []
        if not isinstance(notices, list) or len(notices) > MAX_NOTICES:
            raise ProtocolError("schema", f"notices must be a list of at most {MAX_NOTICES}")
        parsed = []
        for n in notices:
            if not isinstance(n, dict) or not isinstance(n.get("code"), str):
                raise ProtocolError("schema", "a notice is {code, message}")
            # An unknown code (a newer controller) is kept: clients log it like the others.
            parsed.append((n["code"][:64], _str(n, "message", 4096, optional=True)))
        plan = msg.get("plan")
        if plan is not None:
            plan = _checked_plan(plan)
        detail = _detail(msg.get("detail"))
        return cls(
            job=check_name(_get(msg, "job"), "job"),
            lr=_lr(msg),
            version=int(_int(msg, "version", 0, MAX_SEQ)),
            run=int(_int(msg, "run", 0, MAX_SEQ)),
            reason=reason,
            seq=_int(msg, "seq", 0, MAX_SEQ, optional=True),
            apply_from_epoch=epoch,
            apply_from_step=step,
            action=action,
            notices=tuple(parsed),
            plan=plan,
            detail=detail,
        )


#: The last plan checked, as one (as received, as checked) pair (replaced whole: a client in
#: another thread never reads half of it). Every reply repeats the plan in force (a range
#: test's sweep: one reply a step), so the same plan is checked once.
_last_plan: list[tuple[Any, dict[str, Any]] | None] = [None]


def _checked_plan(plan: Any) -> dict[str, Any]:
    """`check_plan(plan)`, or the result of the last check when the plan is the same."""
    last = _last_plan[0]
    if last is not None and plan == last[0]:
        return last[1]
    checked = check_plan(plan)
    _last_plan[0] = (plan, checked)
    return checked


#: The `lr.detail` keys a client acts on (others, from a newer controller, are dropped).
DETAIL_KEYS = ("snapshot_every", "snapshot_unit")


def _detail(detail: Any) -> dict[str, int] | None:
    if detail is None:
        return None
    if not isinstance(detail, dict) or len(detail) > 16:
        raise ProtocolError("schema", "detail must be a mapping of at most 16 entries")
    out: dict[str, int] = {}
    for key in DETAIL_KEYS:
        value = detail.get(key)
        if value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_INT:
            raise ProtocolError("schema", f"detail.{key} must be an integer >= 0, got {value!r}")
        out[key] = value
    if out.get("snapshot_every") == 0:
        raise ProtocolError("schema", "detail.snapshot_every must be >= 1")
    return out or None


@dataclass(frozen=True)
class ErrorMessage:
    """The controller refused a message; `code` says why (one of ERROR_CODES).

    With code `moved`, `endpoint` names the controller that owns the job (a ZeroMQ endpoint
    such as `tcp://host:5555`); the client sends there from then on.
    """

    code: str
    message: str
    seq: int | None = None
    endpoint: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"t": "error", "code": self.code, "message": self.message, "seq": self.seq}
        if self.endpoint is not None:
            wire["endpoint"] = self.endpoint
        return wire

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> ErrorMessage:
        code = _get(msg, "code")
        if code not in ERROR_CODES:
            raise ProtocolError("schema", f"unknown error code {code!r}")
        endpoint = _str(msg, "endpoint", MAX_ENDPOINT, optional=True) or None
        if code == "moved" and (endpoint is None or "://" not in endpoint):
            raise ProtocolError("schema", f"moved names no endpoint, got {endpoint!r}")
        return cls(
            code,
            _str(msg, "message", 4096, optional=True),
            _int(msg, "seq", 0, MAX_SEQ, optional=True),
            endpoint if code == "moved" else None,
        )


ClientMessage = Hello | Report | Bye
ServerMessage = LrMessage | ErrorMessage

_CLIENT = {"hello": Hello, "report": Report, "bye": Bye}
_SERVER = {"lr": LrMessage, "error": ErrorMessage}


def parse_client_message(frame: bytes) -> ClientMessage:
    """Decode and validate a message from a client.

    Raises:
        ProtocolError: with the code to answer and count.
    """
    return parse_client_dict(decode(frame))


def parse_client_dict(msg: Mapping[str, Any]) -> ClientMessage:
    """Validate a decoded client message (see `decode`).

    Raises:
        ProtocolError: with the code to answer and count.
    """
    kind = _CLIENT.get(msg["t"])
    if kind is None:
        raise ProtocolError("unknown_type", f"unknown message type {msg['t'][:40]!r}")
    return kind.from_wire(msg)  # type: ignore[attr-defined, no-any-return]


def _compiled_report_reader() -> Callable[[bytes], Report | None] | None:
    """A compiled decoder for the one message a busy controller mostly reads: a `report`
    whose every field is well-formed. It needs msgspec (extra `fast`); None without it."""
    try:
        import msgspec
    except ImportError:
        return None
    meta = msgspec.Meta
    # NAME_RE as a whole-string match (msgspec searches; \Z also refuses a trailing newline).
    name = Annotated[str, meta(pattern=rf"\A{NAME_RE.pattern}\Z")]
    count = Annotated[int, meta(ge=0, le=MAX_INT)]

    # defstruct, not a class statement: this module's annotations are strings.
    wire_report = msgspec.defstruct(
        "WireReport",
        [
            ("t", Literal["report"]),  # a field, not a struct tag: a tag may be left out
            ("job", name),
            ("rank", Annotated[int, meta(ge=0, le=MAX_WORLD - 1)]),
            ("session", Annotated[bytes, meta(min_length=SESSION_BYTES, max_length=SESSION_BYTES)]),
            ("seq", Annotated[int, meta(ge=0, le=MAX_SEQ)]),
            ("epoch", count),
            ("metrics", Annotated[dict[name, float], meta(max_length=MAX_METRICS)]),  # type: ignore[valid-type]
            ("lr", float),
            ("step", count | None, None),  # type: ignore[operator]
        ],
        forbid_unknown_fields=True,
    )

    decoder = msgspec.msgpack.Decoder(wire_report)
    failed = (msgspec.DecodeError, msgspec.ValidationError)
    new = object.__new__

    def read(frame: bytes) -> Report | None:
        if len(frame) > MAX_MESSAGE_BYTES:
            return None
        try:
            w: Any = decoder.decode(frame)
        except failed:
            return None
        if w.lr != 0 and not lr_ok(w.lr):
            return None
        # The frozen dataclass's __init__ (a guarded setattr per field) would cost as much
        # as the decoding: fill the instance's dict, every field validated above.
        report: Report = new(Report)
        report.__dict__.update(
            job=w.job,
            rank=w.rank,
            session=w.session,
            seq=w.seq,
            epoch=w.epoch,
            step=w.step,
            metrics=w.metrics,
            lr=w.lr,
        )
        return report

    return read


_read_report = _compiled_report_reader()


def read_report(frame: bytes) -> Report | None:
    """A well-formed `report` frame, decoded and validated in one compiled step; None for
    anything else (another type, a field out of bounds, an unknown field, bad msgpack) and
    always None without msgspec. `decode` + `parse_client_dict` then read that frame and
    answer it exactly as they would have: the fast path only ever accepts a frame they
    accept, as the same `Report`. The wire format is unchanged (clients keep msgpack).
    """
    return None if _read_report is None else _read_report(frame)


def parse_server_message(frame: bytes) -> ServerMessage:
    """Decode and validate a message from the controller (the client trusts nothing either).

    Raises:
        ProtocolError: for anything that is not a valid `lr` or `error`.
    """
    return parse_server_dict(decode(frame))


def echo_seq(msg: Mapping[str, Any], job: str, run: int | None, version: int) -> int | None:
    """The `seq` of a decoded `lr` that only answers a report, else None.

    Such a reply (every report gets one; a plan's job gets one per report while the LR goes
    on by the plan) is of job `job`, of run `run` and not newer than `version` (the decision
    the client holds), with a report's seq and no action or notices: accepting it would
    change nothing but the report it answers. Only those fields are checked, so a client
    takes it without validating (and copying) the rest; anything else goes to
    `parse_server_dict`, whole.
    """
    seq, got_version = msg.get("seq"), msg.get("version")
    if (
        type(seq) is int
        and type(got_version) is int
        and 0 <= seq <= MAX_SEQ
        and got_version <= version
        and msg.get("run") == run
        and type(run) is int
        and msg.get("t") == "lr"
        and msg.get("job") == job
        and not msg.get("action")
        and not msg.get("notices")
    ):
        return seq
    return None


def parse_server_dict(msg: dict[str, Any]) -> ServerMessage:
    """`parse_server_message` of a frame `decode` read.

    Raises:
        ProtocolError: for anything that is not a valid `lr` or `error`.
    """
    kind = _SERVER.get(msg["t"])
    if kind is None:
        raise ProtocolError("unknown_type", f"unknown message type {msg['t'][:40]!r}")
    return kind.from_wire(msg)  # type: ignore[attr-defined, no-any-return]
