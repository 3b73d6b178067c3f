"""Shared fixtures: running the real `lrpilot` CLI and writing files into a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# TensorFlow's start-up chatter is noise in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

LRPILOT = [sys.executable, "-m", "lrpilot.controller.cli"]


def run_cli(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `lrpilot ARGS...` as a user would, capturing its output."""
    return subprocess.run(
        [*LRPILOT, *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(name, text) -> path of a new file in the test's temp dir."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write
