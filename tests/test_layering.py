"""The house's layers: the engine is read and tested apart from the daemon and the wire.

The policy engine (`controller/policies/`) imports, from the rest of lrpilot, only the
shared vocabulary (`client/vocabulary.py`), the plan evaluator (`client/plans.py`, which
computes every schedule's values for the controller and the client alike) and the root of
the error tree; the client never
imports the controller; every error lrpilot raises on purpose is an `LRPilotError`.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import lrpilot.client
import lrpilot.controller
import lrpilot.controller.errors
import lrpilot.controller.policies.errors
from lrpilot.client import errors as client_errors
from lrpilot.client.errors import LRPilotError

CLIENT = Path(lrpilot.client.__file__).parent
CONTROLLER = Path(lrpilot.controller.__file__).parent
ENGINE = CONTROLLER / "policies"
#: What the engine may import from lrpilot outside itself.
ENGINE_MAY_USE = {
    "lrpilot.client.vocabulary",
    "lrpilot.client.errors",
    "lrpilot.client.plans",
    "lrpilot.client.expression",
}
#: Modules the daemon and the wire are made of; none may load with the engine.
DAEMON_AND_WIRE = [
    "lrpilot.client.protocol",
    "lrpilot.client.core",
    "lrpilot.controller.server",
    "lrpilot.controller.transitions",
    "lrpilot.controller.jobs",
    "lrpilot.controller.jobstate",
    "lrpilot.controller.store",
    "lrpilot.controller.metrics",
    "lrpilot.controller.admin_requests",
    "lrpilot.controller.policyfile",
    "lrpilot.controller.reload",
    "zmq",
    "msgpack",
]


def _lrpilot_imports(path: Path, package: str) -> set[str]:
    """The absolute names of the lrpilot modules a file imports (relative ones resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lrpilot")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("lrpilot"):
                found.add(name)
    return found


def test_the_engine_imports_only_itself_and_the_vocabulary() -> None:
    offenders = {}
    for path in sorted(ENGINE.glob("*.py")):
        outside = {
            name
            for name in _lrpilot_imports(path, "lrpilot.controller.policies")
            if not name.startswith("lrpilot.controller.policies")
        }
        if outside - ENGINE_MAY_USE:
            offenders[path.name] = sorted(outside - ENGINE_MAY_USE)
    assert not offenders, offenders


def test_importing_the_engine_loads_neither_the_daemon_nor_the_wire() -> None:
    # A fresh interpreter: what `import lrpilot.controller.policies` pulls in, transitively.
    code = (
        "import sys, lrpilot.controller.policies\n"
        "print('\\n'.join(sorted(m for m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(out.stdout.split())
    assert "lrpilot.controller.policies.plateau" in loaded  # the probe sees the engine
    assert "lrpilot.client.vocabulary" in loaded
    assert sorted(loaded & set(DAEMON_AND_WIRE)) == []


def test_the_vocabulary_depends_on_the_standard_library_only() -> None:
    path = CLIENT / "vocabulary.py"
    tree = ast.parse(path.read_text())
    imported = {
        (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in node.names
    }
    assert imported <= {"__future__", "math", "re", "struct"}, imported


def test_the_plan_evaluator_depends_on_the_standard_library_and_the_vocabulary_only() -> None:
    path = CLIENT / "plans.py"
    tree = ast.parse(path.read_text())
    imported = {
        (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in node.names
    }
    assert imported <= {
        "__future__",
        "bisect",
        "math",
        "collections",
        "typing",
        "vocabulary",
        "errors",
        "expression",  # a formula plan's checker and evaluator, loaded when one comes
    }
    assert _lrpilot_imports(path, "lrpilot.client") <= {
        "lrpilot.client.vocabulary",
        "lrpilot.client.errors",
        "lrpilot.client.expression",
    }
    expression = CLIENT / "expression.py"
    assert _lrpilot_imports(expression, "lrpilot.client") <= {"lrpilot.client.errors"}


def test_the_client_never_imports_the_controller() -> None:
    offenders = {
        path.name: sorted(n for n in _lrpilot_imports(path, "lrpilot.client") if "controller" in n)
        for path in sorted(CLIENT.glob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_every_error_class_is_an_lrpilot_error_in_an_errors_module() -> None:
    classes = []
    for module in (client_errors, lrpilot.controller.errors, lrpilot.controller.policies.errors):
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)]
    errors = {c for c in classes if issubclass(c, BaseException)}
    assert len(errors) >= 15
    assert all(issubclass(c, LRPilotError) for c in errors), errors
    # No exception class is defined anywhere else in the packages.
    stray = []
    for root in (CLIENT, CONTROLLER):
        for path in sorted(root.rglob("*.py")):
            if path.name == "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")))
                    for b in node.bases
                ):
                    stray.append(f"{path.relative_to(root.parent)}: {node.name}")
    assert not stray, stray
