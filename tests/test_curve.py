"""CURVE: `lrpilot keygen`, a controller that only lets authorized clients in."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from conftest import Controller, run_cli

Factory = Callable[..., Controller]
POLICY = "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 1}\n"

CLIENT = """
import sys
from lrpilot.client import Client
c = Client(sys.argv[1], job="curve-job", initial_lr=0.1, timeout=1.0)
print(c.report(0, {"val_loss": 1.0}))
c.close()
"""


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_only_authorized_clients_get_decisions(controller_factory: Factory, tmp_path: Path) -> None:
    server, client, stranger = tmp_path / "server", tmp_path / "client", tmp_path / "stranger"
    for d in (server, client, stranger):
        out = run_cli("keygen", str(d))
        assert out.returncode == 0, out.stderr
    secret = server / "lrpilot.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((client / "lrpilot.key").read_bytes())
    c = controller_factory(
        POLICY, "--curve-secret-key", str(secret), "--curve-authorized-dir", str(authorized)
    )

    def run(keys: Path) -> str:
        env = {
            **os.environ,
            "LRPILOT_CURVE_SERVER_KEY": str(server / "lrpilot.key"),
            "LRPILOT_CURVE_SECRET_KEY": str(keys / "lrpilot.key_secret"),
        }
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, c.bind],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert float(run(client)) == pytest.approx(0.05)  # decided by the step policy
    assert float(run(stranger)) == pytest.approx(0.1)  # refused: keeps its LR, no crash
    assert c.metric("lrpilot_reports_total", training_job="curve-job") == 1


def _keys(tmp_path: Path, name: str, *extra: str) -> Path:
    d = tmp_path / name
    out = run_cli("keygen", str(d), *extra)
    assert out.returncode == 0, out.stderr
    return d


class Peer:
    """A raw protocol peer speaking CURVE with a given key pair."""

    def __init__(self, endpoint: str, server_key: Path, keys: Path, job: str) -> None:
        from zmq.auth import load_certificate

        from lrpilot.client.protocol import SESSION_BYTES

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.session = os.urandom(SESSION_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.session)
        server_public, _ = load_certificate(str(server_key))
        public, secret = load_certificate(str(keys / "lrpilot.key_secret"))
        self.sock.curve_serverkey, self.sock.curve_publickey = server_public, public
        self.sock.curve_secretkey = secret
        self.sock.connect(endpoint)
        self.job, self.seq = job, 0

    def ask(self, message: object) -> object:
        from lrpilot.client.protocol import encode, parse_server_message

        self.sock.send(encode(message.to_wire()))  # type: ignore[attr-defined]
        assert self.sock.poll(5000), "no answer"
        return parse_server_message(self.sock.recv())

    def hello(self) -> object:
        from lrpilot.client.protocol import Hello

        return self.ask(Hello(self.job, 0, 1, self.session, 0.1, 0))

    def report(self, epoch: int) -> object:
        from lrpilot.client.protocol import Report

        self.seq += 1
        return self.ask(Report(self.job, 0, self.session, self.seq, epoch, {"loss": 1.0}, 0.1))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_keys_are_limited_to_their_jobs_and_removed_keys_stop_at_once(
    controller_factory: Factory, tmp_path: Path
) -> None:
    from lrpilot.client.protocol import ErrorMessage, LrMessage

    server = _keys(tmp_path, "server")
    bert = _keys(tmp_path, "bert", "--jobs", "bert-*")
    ops = _keys(tmp_path, "ops")
    assert 'jobs = "bert-*"' in (bert / "lrpilot.key").read_text()
    refused = run_cli("keygen", str(bert))
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert 'jobs = "bert-*"' in (bert / "lrpilot.key").read_text()  # untouched
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "bert.key").write_bytes((bert / "lrpilot.key").read_bytes())
    (authorized / "ops.key").write_bytes((ops / "lrpilot.key").read_bytes())
    c = controller_factory(
        POLICY,
        "--curve-secret-key",
        str(server / "lrpilot.key_secret"),
        "--curve-authorized-dir",
        str(authorized),
    )
    own = Peer(c.bind, server / "lrpilot.key", bert, "bert-base")
    other = Peer(c.bind, server / "lrpilot.key", bert, "gpt-small")
    try:
        assert isinstance(own.hello(), LrMessage)
        answer = other.hello()
        assert isinstance(answer, ErrorMessage) and answer.code == "forbidden"
        assert isinstance(own.report(0), LrMessage)

        def admin(keys: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("LRPILOT_CURVE")}
            if keys is not None:
                env["LRPILOT_CURVE_SERVER_KEY"] = str(server / "lrpilot.key")
                env["LRPILOT_CURVE_SECRET_KEY"] = str(keys / "lrpilot.key_secret")
            return run_cli(*args, "--admin", c.admin, env=env)

        assert admin(None, "status").returncode == 1  # no key: no answer
        status = admin(ops, "status", "--json")
        assert status.returncode == 0 and '"bert-base"' in status.stdout
        assert admin(bert, "set-lr", "bert-base", "0.01").returncode == 0  # its own job
        assert own.sock.poll(5000)
        own.sock.recv()  # the override's push
        denied = admin(bert, "set-lr", "gpt-small", "0.01")
        assert denied.returncode != 0 and "may not use job gpt-small" in denied.stderr
        assert admin(bert, "reload").returncode != 0  # reload needs an unrestricted key

        # The key leaves the authorized dir: after a reload its very next message is refused.
        (authorized / "bert.key").unlink()
        assert admin(ops, "reload").returncode in (0, 2)
        answer = own.report(1)
        assert isinstance(answer, ErrorMessage) and answer.code == "forbidden"
        assert c.metric("lrpilot_invalid_messages_total", reason="forbidden") == 2
    finally:
        own.close(), other.close()
