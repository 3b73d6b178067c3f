"""The compiled `report` reader (`read_report`, msgspec) against the msgpack path it stands in
for: on every frame it either steps aside (None) or returns exactly the `Report` that
`decode` + `parse_client_dict` return, and it never accepts a frame they refuse. Without
msgspec the controller reads every frame the msgpack way.

The client's own shortcut, `echo_seq` (a reply that only answers a report), against
`parse_server_dict` + `Decisions.accept`: every reply it takes would change nothing but the
report it answers, and every such reply is taken.

Hypothesis generates valid reports, each field of them replaced by hostile values, unknown
and duplicated keys, and raw bytes; `make fuzz` runs the long profile (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import msgpack
import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpilot.client.decisions import Decisions
from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import (
    MAX_INT,
    MAX_MESSAGE_BYTES,
    MAX_METRICS,
    MAX_SEQ,
    MAX_WORLD,
    ClientMessage,
    LrMessage,
    Report,
    decode,
    echo_seq,
    encode,
    parse_client_dict,
    parse_server_dict,
    read_report,
)

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

names = st.from_regex(r"[A-Za-z0-9._:/@-]{1,128}", fullmatch=True)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(1 << 53), 1 << 53)
reports = st.fixed_dictionaries(
    {
        "t": st.just("report"),
        "job": names,
        "rank": st.integers(0, MAX_WORLD - 1),
        "session": st.binary(min_size=16, max_size=16),
        "seq": st.integers(0, MAX_SEQ),
        "epoch": st.integers(0, MAX_INT),
        "step": st.none() | st.integers(0, MAX_INT),
        "metrics": st.dictionaries(names, numbers, max_size=8),
        "lr": st.just(0.0) | st.floats(1e-12, 10.0) | st.integers(1, 10),
    }
)
hostile = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=140)
    | st.binary(max_size=20)
    | st.sampled_from(["report", "hello", "job\n", "", "a" * 129, -1, MAX_INT + 1, MAX_SEQ + 1])
    | st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=3)
    | st.dictionaries(
        st.text(max_size=10) | st.integers(-9, 9), numbers | st.booleans(), max_size=4
    )
)


def slow(frame: bytes) -> ClientMessage | ProtocolError:
    """What the controller makes of a frame without the compiled reader."""
    try:
        return parse_client_dict(decode(frame))
    except ProtocolError as exc:
        return exc


def same(a: Report, b: Report) -> bool:
    """Equal, NaN metrics included (NaN != NaN), with the same Python types."""
    fields = ("job", "rank", "session", "seq", "epoch", "step", "lr")
    if any(getattr(a, f) != getattr(b, f) or type(getattr(a, f)) is not type(getattr(b, f))
           for f in fields):  # fmt: skip
        return False
    return list(a.metrics) == list(b.metrics) and all(
        type(x) is float and repr(x) == repr(y)
        for x, y in zip(a.metrics.values(), b.metrics.values(), strict=True)
    )


def check(frame: bytes) -> Report | None:
    """The property, for one frame; returns what the fast path made of it."""
    fast = read_report(frame)
    expected = slow(frame)
    if fast is not None:
        assert isinstance(expected, Report), f"accepted a frame msgpack refuses: {expected}"
        assert same(fast, expected), (fast, expected)
    return fast


@given(reports)
def test_a_valid_report_is_read_as_the_msgpack_path_reads_it(msg: dict[str, Any]) -> None:
    fast = check(encode(msg))
    assert fast is not None, "a valid report fell back to the slow path"
    assert isinstance(fast.lr, float) and all(type(v) is float for v in fast.metrics.values())


@given(reports, st.sampled_from([*sorted(Report.__dataclass_fields__), "t"]), hostile)
def test_a_report_with_one_hostile_field_is_refused_or_read_the_same(
    msg: dict[str, Any], key: str, value: Any
) -> None:
    check(encode({**msg, key: value}))


@given(reports, st.sampled_from([*sorted(Report.__dataclass_fields__), "t"]))
def test_a_report_missing_a_field_is_refused_or_read_the_same(
    msg: dict[str, Any], key: str
) -> None:
    msg.pop(key)
    fast = check(encode(msg))
    assert (fast is None) == (key != "step")  # only step may be left out


@given(reports, st.text(max_size=12), hostile)
def test_an_unknown_field_steps_aside(msg: dict[str, Any], key: str, value: Any) -> None:
    if key in msg:
        return
    assert check(encode({**msg, key: value})) is None  # the msgpack path answers it


@given(reports, st.sampled_from(sorted(Report.__dataclass_fields__)), hostile)
def test_a_duplicated_key_is_read_as_msgpack_reads_it(
    msg: dict[str, Any], key: str, value: Any
) -> None:
    # A map that names `key` twice: msgpack keeps the last value; so must the fast path.
    pairs = [*msg.items(), (key, value)]
    head = bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + len(pairs).to_bytes(2)
    frame = head + b"".join(
        msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs
    )
    check(frame)


@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_read_the_same(frame: bytes) -> None:
    check(frame)


def test_limits_at_their_edges() -> None:
    base = {
        "t": "report",
        "job": "j",
        "rank": MAX_WORLD - 1,
        "session": b"s" * 16,
        "seq": MAX_SEQ,
        "epoch": MAX_INT,
        "step": MAX_INT,
        "metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS)},
        "lr": 10.0,
    }
    assert check(encode(base)) is not None
    for key, value in [
        ("rank", MAX_WORLD),
        ("epoch", MAX_INT + 1),
        ("step", MAX_INT + 1),
        ("seq", -1),
        ("metrics", {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}),
        ("lr", 10.5),
        ("lr", 1e-13),
        ("lr", math.nan),
        ("job", "x" * 129),
        ("session", b"s" * 15),
    ]:
        frame = encode({**base, key: value})
        assert check(frame) is None, key
        assert isinstance(slow(frame), ProtocolError), key
    big = encode({**base, "metrics": {"m": 1.0, "x" * (MAX_MESSAGE_BYTES): 1.0}})
    assert read_report(big) is None and isinstance(slow(big), ProtocolError)


def test_it_is_msgspec_that_reads_here() -> None:
    # The properties above compare two paths only while the compiled one exists.
    frame = encode(Report("j", 0, b"s" * 16, 1, 0, {"loss": 1.0}, 0.1).to_wire())
    assert read_report(frame) is not None
    assert msgspec.__version__


def test_without_msgspec_every_frame_takes_the_msgpack_path() -> None:
    # A fresh interpreter where msgspec cannot be imported (the `fast` extra not installed).
    code = (
        "import sys; sys.modules['msgspec'] = None\n"
        "from lrpilot.client.protocol import Report, encode, read_report, parse_client_message\n"
        "f = encode(Report('j', 0, b's' * 16, 1, 0, {'loss': 1.0}, 0.1).to_wire())\n"
        "assert read_report(f) is None\n"
        "assert parse_client_message(f).job == 'j'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


# -- the client's shortcut for a reply that only answers a report ----------------------------

replies = st.builds(
    lambda job, seq, version, run, step, lr, reason, extra: {
        **LrMessage(job, lr, version, run, reason, seq, apply_from_step=step, **extra).to_wire()
    },
    st.sampled_from(["job-a", "job-a", "job-b"]),
    st.none() | st.integers(0, MAX_SEQ),
    st.integers(0, 3),  # near the client's own: one newer, the same, older
    st.integers(1, 2),
    st.integers(0, MAX_INT),
    st.floats(1e-12, 10.0),
    st.sampled_from(["unchanged", "plateau", "schedule"]),
    st.sampled_from(
        [
            {},
            {"action": "restore"},
            {"notices": (("monitor_missing", "no val_loss"),)},
            {
                "plan": {
                    "kind": "constant",
                    "params": {},
                    "unit": "step",
                    "from": 0,
                    "until": None,
                    "lr0": 0.1,
                }
            },
            {"detail": {"snapshot_every": 50}},
        ]
    ),
)


def echo_property(msg: dict[str, Any], run: int, version: int) -> None:
    """A client of job-a holding decision (run, version) receives `msg`."""
    try:
        found = decode(encode(msg))  # as the client reads a frame
    except ProtocolError:
        return  # not a message: the client counts it invalid
    seq = echo_seq(found, "job-a", run, version)
    try:
        parsed = parse_server_dict(found)
    except ProtocolError:
        return  # a broken field: at most the report it names is taken as answered
    held = Decisions(lr=0.1, epoch=0, step=0)
    held.run, held.version = run, version
    plain = (
        isinstance(parsed, LrMessage)
        and parsed.job == "job-a"
        and parsed.seq is not None
        and parsed.run == run
        and parsed.version <= version
        and parsed.action is None
        and not parsed.notices
    )
    assert (seq is not None) == plain, (seq, parsed)
    if seq is not None:
        assert isinstance(parsed, LrMessage) and parsed.seq == seq
        assert not held.accept(parsed) and held.pending == []  # it changes no decision


@given(replies, st.integers(1, 2), st.integers(0, 3))
def test_the_client_takes_exactly_the_replies_that_only_answer_a_report(
    msg: dict[str, Any], run: int, version: int
) -> None:
    echo_property(msg, run, version)


@given(
    replies,
    st.integers(1, 3),
    st.integers(0, 12),
    st.sampled_from(["t", "job", "seq", "version", "run", "action", "notices", "lr", "reason"]),
    hostile,
)
def test_a_reply_with_a_hostile_field_is_taken_only_if_it_changes_nothing(
    msg: dict[str, Any], run: int, version: int, key: str, value: Any
) -> None:  # fmt: skip
    echo_property({**msg, key: value}, run, version)
