"""Property tests (hypothesis): hostile input only ever raises the project's own errors, and
the daemon core decides exactly as a pure replay of the engine through restarts, reloads,
overrides, pins and job ends. `make test` runs a short profile; `make fuzz` a long one
(HYPOTHESIS_PROFILE=fuzz)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any

import msgpack
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import Bye, Hello, Report, parse_client_message, parse_server_message
from lrpilot.controller.errors import PolicyError
from lrpilot.controller.jobs import JobTable
from lrpilot.controller.policies import Plateau, PlateauState
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.store import Store

settings.register_profile("ci", max_examples=150, deadline=None)
settings.register_profile(
    "fuzz", max_examples=20000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FIELDS = [
    "t", "v", "job", "rank", "world", "session", "lr", "seq", "epoch", "step", "metrics",
    "start_epoch", "start_step", "directions", "framework", "host", "pid", "code", "message",
    "version", "run", "reason", "apply_from_epoch", "apply_from_step", "action",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack can carry
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from(["hello", "report", "bye", "lr", "error", "min", "max", "plateau"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(FIELDS), inner, max_size=5)
    ),
    max_leaves=20,
)
messages = st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS))


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(frame: bytes) -> None:
    for parse in (parse_client_message, parse_server_message):
        try:
            parse(frame)
        except ProtocolError as exc:
            assert exc.code in ("too_large", "decode", "schema", "unknown_type", "out_of_range",
                                "bad_version")  # fmt: skip


@given(messages)
def test_random_msgpack_messages_only_raise_protocol_errors(msg: dict[str, Any]) -> None:
    frame = msgpack.packb(msg, use_bin_type=True)
    for parse in (parse_client_message, parse_server_message):
        try:
            parsed = parse(frame)
        except ProtocolError:
            continue
        assert isinstance(parsed.to_wire(), dict)  # what parses is well-formed


POLICY_KEYS = [
    "version", "defaults", "jobs", "policy", "phases", "match", "type", "monitor", "mode",
    "factor", "patience", "min_delta", "cooldown", "min_lr", "compat", "unit", "initial_lr",
    "until", "lr", "epochs", "to_lr", "step_size", "milestones", "decay_rate", "decay_steps",
    "aggregate", "aggregate_timeout", "apply", "smoothing", "k", "alpha",
]  # fmt: skip
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 100)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.sampled_from(["plateau", "step", "phases", "warmup", "val_loss", "min", "*", "auto"])
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(POLICY_KEYS), inner, max_size=6)
    ),
    max_leaves=25,
)


@given(
    st.dictionaries(st.sampled_from(POLICY_KEYS), yaml_values, max_size=4) | st.text(max_size=200)
)
def test_random_policy_files_only_raise_located_policy_errors(doc: Any) -> None:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    try:
        load_text(text, "fuzz.yaml")
    except PolicyError as exc:
        assert exc.errors and all(e.file == "fuzz.yaml" for e in exc.errors)
        assert all(e.line is None or e.line >= 1 for e in exc.errors)


# -- the daemon core against a pure replay of the engine ------------------------------------

POLICIES = [
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 2, min_lr: 0.001}\n",
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 2, min_lr: 0.01}\n",
]


class DaemonCore(RuleBasedStateMachine):
    """One job driven through the real JobTable, Batch and SQLite store; the model is the
    bare policy engine. Restarts reopen the store from disk, as a kill -9 would."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lrpilot-fuzz-")
        self.now = 100.0
        self.which = 0
        self.store: Store | None = None

    @initialize()
    def start(self) -> None:
        self._open()
        self.session = os.urandom(16)
        self.seq = 0
        self.epoch = 0
        self._turn(lambda b: b.hello(Hello("job", 0, 1, self.session, 0.1, 0)))
        self.policy = self._policy()
        self.model: PlateauState = self.policy.start(0.1, 0)  # type: ignore[assignment]
        self.pin: tuple[float, float] | None = None  # (lr, monotonic end) of a --for pin

    def _policy(self) -> Plateau:
        p = load_text(POLICIES[self.which], "p.yaml").defaults.policy
        assert isinstance(p, Plateau)
        return p.for_framework("python")

    def _open(self) -> None:
        self.store = Store(self.dir)
        self.table = JobTable(load_text(POLICIES[self.which], "p.yaml"), self.store)
        self.table.restore(self.store.load_jobs(), self.now, 1.7e9 + self.now)

    def _turn(self, feed: Any) -> None:
        assert self.store is not None
        batch = self.table.batch(self.now, 1.7e9 + self.now)
        feed(batch)
        self.store.commit(batch.writes())
        self.table.publish(batch)

    @rule(value=st.sampled_from([1.0, 0.9, 0.5, 2.0, math.nan, math.inf]))
    def report(self, value: float) -> None:
        self.seq += 1
        r = Report("job", 0, self.session, self.seq, self.epoch, {"val_loss": value}, 0.1)
        self._turn(lambda b: b.report(r))
        self.model, _ = self.policy.step(self.model, self.epoch, {"val_loss": value}, {})
        if self.pin is not None and self.now >= self.pin[1]:
            self.pin = None  # over: the policy's LR from the next epoch
        self.epoch += 1
        self.now += 1

    @rule(value=st.sampled_from([1.0, 0.7]))
    def replayed_report(self, value: float) -> None:
        """The client resends its last report (it never heard the answer): deduplicated."""
        if self.seq == 0:
            return
        r = Report("job", 0, self.session, self.seq, self.epoch - 1, {"val_loss": value}, 0.1)
        self._turn(lambda b: b.report(r))

    @rule(lr=st.sampled_from([0.05, 0.2]))
    def override(self, lr: float) -> None:
        self._turn(lambda b: b.override("job", lr, "fuzz", "tester"))
        self.model = self.policy.rebase(self.model, lr, self.epoch - 1)  # type: ignore[assignment]
        self.pin = None

    @precondition(lambda self: self.epoch > 0)
    @rule(lr=st.sampled_from([0.05, 0.3]), seconds=st.sampled_from([1.0, 2.5, 4.0]))
    def pin_for(self, lr: float, seconds: float) -> None:
        """`set-lr --for`: the LR holds; the engine underneath goes on untouched."""
        self._turn(lambda b: b.override("job", lr, "fuzz", "tester", seconds=seconds))
        self.pin = (lr, self.now + seconds)

    @rule()
    def reload(self) -> None:
        self.which = 1 - self.which
        new = load_text(POLICIES[self.which], "p.yaml")
        self.table.swap_policies(new)
        self._turn(lambda b: b.rebind())
        self.policy = self._policy()
        self.model = self.model.replace(lr=max(self.model.lr, self.policy.min_lr))

    @rule()
    def restart(self) -> None:
        """kill -9 and start again: everything committed is back; the client says hello again."""
        assert self.store is not None
        self.store.close()
        self._open()
        self._turn(lambda b: b.hello(Hello("job", 0, 1, self.session, 0.1, self.epoch)))

    @precondition(lambda self: self.epoch > 0)
    @rule()
    def new_process_resumes(self) -> None:
        """The trainer ends and a new process resumes from its checkpoint at this epoch."""
        self._turn(lambda b: b.bye(Bye("job", 0, self.session)))
        self.session, self.seq = os.urandom(16), 0
        self._turn(lambda b: b.hello(Hello("job", 0, 1, self.session, 0.1, self.epoch)))

    @invariant()
    def decides_as_the_engine(self) -> None:
        job = self.table.jobs["job"]
        assert job.policy_lr == self.model.lr
        assert job.lr == (self.model.lr if self.pin is None else self.pin[0])
        state = job.state
        assert isinstance(state, PlateauState)
        assert (state.best, state.wait, state.cooldown_counter) == (
            self.model.best,
            self.model.wait,
            self.model.cooldown_counter,
        )
        assert job.last_epoch == (self.epoch - 1 if self.epoch else None)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


DaemonCore.TestCase.settings = settings(
    settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")),
    max_examples=40 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 2000,
    stateful_step_count=30,
)
test_daemon_core_decides_as_the_engine = DaemonCore.TestCase
