"""`make demo` on a fresh clone: what it installs, how fast a newcomer sees decisions.

The demo's set-up is the pinned, complete requirements/demo.txt (lrpilot's core and Keras on
JAX, CPU) installed with --no-deps into a venv of its own; the suite itself runs Keras on
TensorFlow. bench/fresh_demo.py times a fresh clone's `make demo` against the old set-up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "demo.txt"
#: What the demo must not install: the other adapters' frameworks, TensorFlow, the dev tools.
HEAVY = ("tensorflow", "torch", "lightning", "transformers", "pytest", "mypy", "ruff")
DECISION = re.compile(r"^\s*\d+\s+\S+\s+\S+\s+\S+\s+(wait|reduce)\b")


def pins() -> dict[str, str]:
    """requirements/demo.txt as {canonical name: version}; every line is `name==version`."""
    found: dict[str, str] = {}
    for n, line in enumerate(PINS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"demo.txt:{n}: not a pin: {line}"
        found[canonicalize_name(req.name)] = spec[0].version
    return found


def test_demo_pins_satisfy_the_core_and_the_keras_jax_extra() -> None:
    import tomllib  # Python 3.11+, as the suite's venv

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["keras-jax"]]
    declared += [r for r in build if r.startswith("setuptools")]  # --no-build-isolation
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (pyproject.toml) is not pinned in demo.txt"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {req}"
    for heavy in HEAVY:
        assert not any(heavy in name for name in pinned), heavy


def _tree(tmp: Path) -> Path:
    """The files a fresh clone of this checkout has (uncommitted edits included)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    tree = tmp / "lrpilot"
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel)
    return tree


def _env() -> dict[str, str]:
    """The caller's environment as a newcomer's shell has it: no venv, no backend chosen."""
    drop = ("KERAS_BACKEND", "VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in drop}  # also not `make test`'s own
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return env


def test_make_demo_on_a_fresh_tree_installs_only_its_pins(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    try:
        _fresh_tree_demo(tree)
    finally:  # pytest keeps recent temp dirs: not 0.6 GB of venv each
        shutil.rmtree(tree / ".venv", ignore_errors=True)


def _plan(tree: Path, target: str) -> str:
    """What `make -n TARGET` would run in `tree`, in a newcomer's environment."""
    done = subprocess.run(
        ["make", "-n", target], cwd=tree, capture_output=True, text=True, timeout=30,
        check=True, env=_env(),
    )  # fmt: skip
    return done.stdout


def _fresh_tree_demo(tree: Path) -> None:
    plan = _plan(tree, "demo")
    assert "requirements/demo.txt" in plan and "--no-deps" in plan, plan
    for heavy in (*HEAVY, "[keras]", "[keras,", "dev]"):
        assert heavy not in plan, f"make demo would install {heavy}: {plan}"

    start = time.monotonic()
    done = subprocess.run(
        ["make", "demo"], cwd=tree, capture_output=True, text=True, timeout=600, env=_env()
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # No KERAS_BACKEND was set: without TensorFlow, `lrpilot demo` picks JAX itself.
    assert re.search(r"^keras 3\.\S+ on jax$", out, re.M), out[:2000]
    rows = [ln for ln in out.splitlines() if DECISION.match(ln)]
    assert len(rows) == 45, out  # every epoch answered by the controller
    assert any("reduce 0.02 -> 0.002 (plateau, wait 10/10)" in ln for ln in rows), out
    print(f"fresh tree: make demo {took:.1f} s")  # the figure is bench/fresh_demo.py's

    py = tree / ".venv" / "bin" / "python"
    listing = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; "
         "print('\\n'.join(f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions()))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    installed = {canonicalize_name(n): v for n, v in (x.split("==") for x in listing)}
    assert installed == {**pins(), "lrpilot": installed.get("lrpilot", "missing")}, installed
    assert installed["lrpilot"] == "0.2.0"

    # The pins are complete and consistent: pip finds nothing missing or conflicting.
    pip = [sys.executable, "-m", "pip", "--python", str(py), "check"]
    checked = subprocess.run(pip, capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # A second `make demo` installs nothing.
    again = _plan(tree, "demo")
    assert "pip" not in again and "-m venv" not in again, again

    # The Keras adapter without a backend chosen says how to run it on JAX.
    imp = subprocess.run(
        [str(py), "-c", "import lrpilot.client.keras"],
        capture_output=True, text=True, timeout=60, env=_env(), check=False,
    )  # fmt: skip
    assert imp.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: No module named 'tensorflow': Keras' default backend; "
        "lrpilot.client.keras runs on JAX with KERAS_BACKEND=jax set before Keras is imported, "
        "or on TensorFlow with: pip install 'lrpilot[keras]'"
    ), imp.stderr
    # The other adapters, imported there, name the extra that brings their framework.
    for adapter, extra, missing in [("torch", "torch", "torch"), ("hf", "hf", "torch")]:
        imp = subprocess.run(
            [str(py), "-c", f"import lrpilot.client.{adapter}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert imp.stderr.strip().splitlines()[-1] == (
            f"ModuleNotFoundError: No module named '{missing}': lrpilot.client.{adapter} needs "
            f"the '{extra}' extra; install it with: pip install 'lrpilot[{extra}]'"
        ), imp.stderr


def test_make_demo_installs_nothing_where_make_test_already_installed(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    venv = tree / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # this suite's full venv
    stamp = venv / ".installed"
    stamp.touch()
    later = time.time() + 5  # newer than pyproject.toml, Makefile and the pins
    os.utime(stamp, (later, later))
    plan = _plan(tree, "demo")
    assert "pip" not in plan and "-m venv" not in plan, plan
    assert plan.splitlines()[-1] == ".venv/bin/lrpilot demo", plan


def test_make_test_completes_a_venv_that_make_demo_made(tmp_path: Path) -> None:
    """The full install puts pip into the demo's pip-less venv before it installs the rest."""
    tree = _tree(tmp_path)
    subprocess.run(
        [shutil.which("python3") or sys.executable, "-m", "venv", "--without-pip", ".venv"],
        cwd=tree, check=True, timeout=60, env=_env(),
    )  # fmt: skip
    (tree / ".venv" / ".demo-installed").touch()
    plan = _plan(tree, ".venv/.installed")
    ensure = plan.index("ensurepip")
    assert ensure < plan.index("pip install"), plan
    assert "keras,keras-jax,torch" in plan, plan
    # The step that adds pip works on such a venv.
    added = subprocess.run(
        ["bash", "-c", plan.splitlines()[0]], cwd=tree, capture_output=True, text=True, timeout=120
    )
    assert added.returncode == 0, added.stderr
    version = subprocess.run(
        [str(tree / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("pip "), version.stderr
