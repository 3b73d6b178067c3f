"""The repository is a real project: a wheel builds, installs, and its `lrpilot` runs."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_lrpilot_runs(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("lrpilot-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lrpilot/controller/py.typed" in names and "lrpilot/client/py.typed" in names
    assert "lrpilot/controller/policies/plateau.py" in names
    for name in ("index.html", "app.js", "app.css", "uPlot.iife.min.js", "uPlot.LICENSE"):
        assert f"lrpilot/controller/web/{name}" in names, name  # the web view, no CDN
    assert not any(n.startswith("lrpilot/__init__") for n in names)  # implicit namespace
    packaged = zipfile.ZipFile(wheel).read("lrpilot/controller/default_policy.yaml")
    assert packaged == (ROOT / "policies" / "default.yaml").read_bytes()
    for example in (ROOT / "policies").glob("*.yaml"):  # lrpilot init --example finds them
        assert f"lrpilot/policies/{example.name}" in names, example.name

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    with zipfile.ZipFile(wheel) as zf:  # install the wheel's files without pip or the network
        zf.extractall(site)
    # Only the standard library is importable in that venv: `--help` and `--version` need no more.
    py = env_dir / "bin" / "python"
    out = subprocess.run(
        [
            str(py),
            "-c",
            "import sys; from lrpilot.controller.cli import main; sys.exit(main())",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "simulate" in out.stdout and "check" in out.stdout
    # The examples come out of the installed package, not a checkout.
    init = subprocess.run(
        [
            str(py),
            "-c",
            "import sys; from lrpilot.controller.cli import main; sys.exit(main())",
            "init",
            str(tmp_path / "mine.yaml"),
            "--example",
            "warmup-plateau",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "mine.yaml").read_bytes() == (
        ROOT / "policies" / "warmup-plateau.yaml"
    ).read_bytes()
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "lrpilot = lrpilot.controller.cli:main" in entry

    # No framework is installed there: each adapter names the extra that brings its framework.
    for adapter, extra, missing in [
        ("keras", "keras", "keras"),
        ("torch", "torch", "torch"),
        ("lightning", "lightning", "torch"),
        ("hf", "hf", "torch"),
    ]:
        done = subprocess.run(
            [str(py), "-c", f"import lrpilot.client.{adapter}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        last = done.stderr.strip().splitlines()[-1]
        assert last == (
            f"ModuleNotFoundError: No module named '{missing}': lrpilot.client.{adapter} needs "
            f"the '{extra}' extra; install it with: pip install 'lrpilot[{extra}]'"
        ), done.stderr
    # The version a user sees is the distribution's.
    version = subprocess.run(
        [str(py), "-c", "import sys; from lrpilot.controller.cli import main; sys.exit(main())",
         "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert version.stdout.split()[-1] == "0.2.0", version.stdout + version.stderr
