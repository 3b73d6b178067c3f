"""Shared fixtures: running the real `lrpilot` CLI and writing files into a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lrpilot.controller.server import parse_ready_line

# TensorFlow's start-up chatter is noise in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs Keras on TensorFlow (make test installs JAX too, for `make demo`; a
# ~/.keras/keras.json naming another backend must not move the suite): KERAS_BACKEND=jax
# pytest ... runs it on JAX on purpose.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

LRPILOT = [sys.executable, "-m", "lrpilot.controller.cli"]


def run_cli(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `lrpilot ARGS...` as a user would, capturing its output."""
    return subprocess.run(
        [*LRPILOT, *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def wait_for(
    ready: Callable[[], object], what: str, timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll a separate process (a controller's log or metrics, a worker's output file) until
    `ready()` is true; fails naming `what` after `timeout` seconds or `timeout / interval`
    polls, whichever comes first.

    Only for what another process does on its own time: that process has no clock a test can
    step and sends no signal a test could block on, so the pause between polls is the one
    sleep such a wait needs. Logic in this process is driven by an injected `Clock` instead.
    """
    deadline = time.monotonic() + timeout
    for _ in range(max(1, round(timeout / interval))):
        if ready():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    assert ready(), f"{what}: not seen within {timeout} s"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(name, text) -> path of a new file in the test's temp dir."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


class Controller:
    """A real `lrpilot serve` subprocess on random loopback ports."""

    def __init__(
        self, state_dir: Path, policy: Path | None = None, *extra: str, max_file_bytes: int = 0
    ) -> None:
        self.max_file_bytes = max_file_bytes  # > 0: RLIMIT_FSIZE, a disk that fills up
        self.state_dir = state_dir
        self.policy = policy
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.bind = self.admin = self.metrics = ""

    def start(self, timeout: float = 30.0) -> Controller:
        args = [
            *LRPILOT,
            "serve",
            "--bind",
            "tcp://127.0.0.1:0",
            "--admin-bind",
            "tcp://127.0.0.1:0",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--state-dir",
            str(self.state_dir),
            *self.extra,
        ]
        if self.policy is not None:
            args += ["--policy", str(self.policy)]
        self.stderr_path = self.state_dir.parent / f"controller-{os.getpid()}-{id(self)}.log"
        self._stderr = open(self.stderr_path, "a")  # noqa: SIM115 - closed in stop()
        limit = self.max_file_bytes

        def preexec() -> None:
            if limit:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._stderr, text=True, preexec_fn=preexec
        )
        assert self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            raise AssertionError(f"controller not ready in {timeout}s: {self.log()}")
        line = self.proc.stdout.readline()
        fields = parse_ready_line(line)
        if fields is None:
            self.kill()
            raise AssertionError(f"unexpected first line {line!r}: {self.log()}")
        self.bind, self.admin, self.metrics = fields["bind"], fields["admin"], fields["metrics"]
        return self

    def log(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_files()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_files()
        return self.proc.returncode

    def _close_files(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics, timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from a real scrape; a missing series fails the test."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise AssertionError(f"no series {name}{labels} in the scrape")


@pytest.fixture
def controller_factory(tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    """controller_factory(policy_text=None, *extra_args, state_dir=None) -> a started Controller."""
    started: list[Controller] = []

    def make(
        policy_text: str | None = None, *extra: str, state_dir: Path | None = None
    ) -> Controller:
        policy = None
        if policy_text is not None:
            policy = tmp_path / f"policy-{len(started)}.yaml"
            policy.write_text(policy_text)
        c = Controller(state_dir or tmp_path / "state", policy, *extra)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.kill()


class Clock:
    """Monotonic and wall time that move only when a test says so (`clock.t += 5`).

    Pass the clock itself as `clock=` and `clock.wall` as `wall=` to a `Server`.
    """

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1.7e9 + self.t


class Wire:
    """A raw protocol peer (a DEALER speaking msgpack) for exact, deterministic tests.

    With `ctx` (an in-process `Server`'s context and its inproc:// endpoint) a message is in
    the controller's queue once `send` returns, and a reply in this peer's once `turn()`
    returns: a test can then check that nothing came without waiting for it.
    """

    def __init__(
        self, endpoint: str, job: str, rank: int = 0, world: int = 1, ctx: Any = None
    ) -> None:
        import zmq

        from lrpilot.client.protocol import SESSION_BYTES

        self.zmq = zmq
        self._own_ctx = ctx is None
        self.ctx = zmq.Context() if ctx is None else ctx
        self.job, self.rank, self.world = job, rank, world
        self.session = os.urandom(SESSION_BYTES)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.session)
        self.sock.connect(endpoint)
        self.seq = 0

    def send_raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float = 5.0) -> Any:
        from lrpilot.client.protocol import parse_server_message

        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no answer from the controller")
        return parse_server_message(self.sock.recv())

    def hello(self, lr: float = 0.1, start_epoch: int = 0, **kw: Any) -> Any:
        from lrpilot.client.protocol import Hello, encode

        h = Hello(self.job, self.rank, self.world, self.session, lr, start_epoch, **kw)
        self.sock.send(encode(h.to_wire()))
        return self.recv()

    def report(
        self,
        epoch: int,
        metrics: dict[str, float],
        lr: float = 0.1,
        wait: bool = True,
        seq: int | None = None,
        step: int | None = None,
    ) -> Any:
        from lrpilot.client.protocol import Report, encode

        if seq is None:
            self.seq += 1
            seq = self.seq
        r = Report(self.job, self.rank, self.session, seq, epoch, metrics, lr, step)
        self.sock.send(encode(r.to_wire()))
        return self.recv() if wait else None

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()


def turn_until(server: Any, *peers: Wire, tries: int = 200) -> list[Any]:
    """Turn an in-process `Server`'s loop until every peer has an answer waiting; returns one
    answer per peer (bounded: `tries` turns of at most 10 ms each per peer)."""
    answers: list[Any] = []
    for peer in peers:
        for _ in range(tries):
            if peer.sock.poll(0):
                break
            server.sock.poll(10)
            server.turn()
        answers.append(peer.recv(timeout=1))
    return answers


@pytest.fixture
def clocked_server(tmp_path: Path) -> Iterator[Callable[..., tuple[Any, Clock]]]:
    """clocked_server(policy_text, state_store=None, **ServeConfig fields) -> (a Server on
    random loopback ports with no metrics port, its Clock); the loop runs only when a test calls
    `turn()`. `state_store(state_dir)` opens the store the server gets (default: a `Store`)."""
    from lrpilot.controller.policyfile import load_text
    from lrpilot.controller.server import ServeConfig, build_server

    started: list[Any] = []

    def make(policy_text: str, state_store: Any = None, **config: Any) -> tuple[Any, Clock]:
        clock = Clock()
        settings = {
            "bind": "tcp://127.0.0.1:0",
            "admin_bind": "tcp://127.0.0.1:0",
            "metrics_port": None,
            "state_dir": str(tmp_path / f"state-{len(started)}"),
            **config,
        }
        server = build_server(
            ServeConfig(**settings),
            load_text(policy_text, "p.yaml"),
            clock=clock,
            wall=clock.wall,
            store=state_store(settings["state_dir"]) if state_store else None,
        )
        started.append(server)
        return server, clock

    yield make
    for server in started:
        server.close()
