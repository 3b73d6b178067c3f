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
