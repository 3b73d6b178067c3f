"""What every benchmark records beside its figures: the machine, the versions, the code."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """`git ARGS` in the repository; "" when git fails."""
    r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def context(started_load: str, versions: Sequence[str], shares: str) -> list[str]:
    """The lines that say where and on what the figures were measured.

    Args:
        started_load: the load average when the benchmark started.
        versions: distributions whose installed versions matter to these figures.
        shares: what shares the machine's cores with the measured code ("the client", ...).
    """
    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    found = [f"Python {platform.python_version()}"]
    for dist in versions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{dist} {importlib.metadata.version(dist)}")
            if dist == "pyzmq":
                import zmq

                found[-1] += f" (libzmq {zmq.zmq_version()})"
    dirty = git("status", "--porcelain", "--", "client")
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"machine: {os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}",
        f"versions: {', '.join(found)}",
        f"code measured: commit {git('rev-parse', 'HEAD')[:12]}"
        + (" + uncommitted changes in client/" if dirty else ""),
        f"load average (1/5/15 min) at the start {started_load}, at the end {load} (the "
        f"controller, and other work on the machine, share its cores with {shares})",
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish(lines: Sequence[str], results: Path, record: bool) -> None:
    """Prints a section of figures and, with `record`, appends it to `results`
    (bench/RESULTS.md) after a blank line."""
    section = "\n".join(lines) + "\n"
    print(section)
    if record:
        with open(results, "a", encoding="utf-8") as f:
            f.write("\n" + section)
