"""Policy files: every class of error with its line, valid files round-trip, examples pass check."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli

from lrpilot.controller.errors import PolicyError
from lrpilot.controller.policies import Phases, Plateau, StepDecay
from lrpilot.controller.policyfile import load_default, load_file, load_text

ROOT = Path(__file__).resolve().parent.parent


def errors_of(text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(PolicyError) as info:
        load_text(textwrap.dedent(text), "policy.yaml")
    return [(e.line, e.message) for e in info.value.errors]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "version: 1\ndefaults:\n  policy: {type: plateau,\n    factor: 1.5}\n",
            4,
            "factor must be in (0, 1), got 1.5",
        ),
        (
            "version: 1\ndefaults:\n  policy:\n    type: plateau\n    patiense: 3\n",
            5,
            "unknown key 'patiense' in plateau (did you mean 'patience'?)",
        ),
        (
            "version: 1\ndefaults:\n  policy:\n    type: plateau\n    patience: -1\n",
            5,
            "patience must be >= 0, got -1",
        ),
        (
            "version: 1\ndefaults:\n  policy:\n    type: plateau\n    patience: three\n",
            5,
            "patience must be an integer, got 'three'",
        ),
        (
            "version: 1\ndefaults:\n  policy:\n    type: plateau\n    patience: 2.5\n",
            5,
            "patience must be an integer, got 2.5",
        ),
        (
            "version: 1\ndefaults:\n  policy:\n    type: stepp\n",
            4,
            "unknown policy type 'stepp' (did you mean 'step'?)",
        ),
        ("version: 2\n", 1, "version must be 1, got 2"),
        ("version: 1\nextra: 1\n", 2, "unknown key 'extra' in the policy file"),
        (
            "version: 1\ndefaults:\n  policy: {type: exponential, k: 0.1,\n    decay_rate: 0.9}\n",
            3,
            "give either k or decay_rate/decay_steps, not both",
        ),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau, min_lr: 0.5, initial_lr: 0.1}\n",
            3,
            "min_lr must be <= initial_lr",
        ),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau, threshold_mode: rel}\n",
            3,
            "threshold_mode rel needs compat: torch",
        ),
        ("version: 1\ndefaults:\n  policy: {type: warmup, epochs: 3}\n", 3, "warmup needs to_lr"),
        ("version: 1\njobs:\n  - policy: {type: step}\n", 3, "a jobs rule needs match"),
        (
            "version: 1\njobs:\n  - match: a\n    policy: {type: step}\n    phases: []\n",
            3,
            "needs exactly one of policy or phases",
        ),
        (
            "version: 1\ndefaults:\n  phases:\n    - {type: constant}\n    - {type: step}\n",
            4,
            "phase 1 needs until",
        ),
        (
            "version: 1\ndefaults:\n  phases:\n    - {type: constant, until: 3, unit: step}\n"
            "    - {type: step}\n",
            4,
            "every phase must use the same unit",
        ),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau, monitor: 'val loss'}\n",
            3,
            "monitor must be 1-128 of",
        ),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau}\n  aggregate: median\n",
            4,
            "aggregate must be one of mean, max, chief, got 'median'",
        ),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau}\n  aggregate_timeout: soon\n",
            4,
            "aggregate_timeout: expected a duration",
        ),
        ("version: 1\ndefaults:\n  policy: {type: plateau\n", 4, "invalid YAML"),
        ("version: 1\nversion: 1\n", 2, "invalid YAML: duplicate key 'version'"),
        ("- 1\n- 2\n", 1, "a policy file is a mapping"),
        ("version: 1\ndefaults:\n  policy: {type: [plateau]}\n", 3, "unknown policy type"),
        ("version: 1\n? [a, b]\n: 1\n", 2, "a mapping key must be a plain value"),
        (
            "version: 1\ndefaults:\n  policy: {type: plateau}\n  aggregate_timeout: .inf\n",
            4,
            "a duration must be a finite number",
        ),
    ],
)
def test_each_error_names_its_line(text: str, line: int, fragment: str) -> None:
    errors = errors_of(text)
    assert any(ln == line and fragment in msg for ln, msg in errors), errors


def test_all_errors_are_reported_not_just_the_first() -> None:
    errors = errors_of(
        """\
        version: 1
        defaults:
          policy: {type: plateau, factor: 2}
        jobs:
          - match: "a-*"
            policy: {type: step, step_size: 0}
          - match: "b-*"
            policy: {type: cosine}
        """
    )
    assert [line for line, _ in errors] == [3, 6, 8]


def test_scientific_notation_without_a_dot_is_a_float() -> None:
    policy_set = load_text("version: 1\ndefaults:\n  policy: {type: plateau, min_lr: 1e-6}\n", "p")
    assert isinstance(policy_set.defaults.policy, Plateau)
    assert policy_set.defaults.policy.min_lr == 1e-6


def test_first_matching_rule_wins_and_defaults_catch_the_rest() -> None:
    policy_set = load_file(ROOT / "policies" / "per-job.yaml")
    assert isinstance(policy_set.rule_for("bert-large").policy, Phases)
    assert isinstance(policy_set.rule_for("resnet-50").policy, StepDecay)
    assert policy_set.rule_for("ddp-x").aggregate == "max"
    assert policy_set.rule_for("ddp-x").aggregate_timeout == 60.0
    assert policy_set.rule_for("something-else") is policy_set.defaults
    assert policy_set.rule_for("bert-large").lr0(0.1) == 3e-4


def test_valid_files_round_trip_to_the_same_objects(tmp_path: Path) -> None:
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        once = load_file(path)
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        again = load_file(copy)
        assert (again.defaults, again.rules, again.digest) == (
            once.defaults,
            once.rules,
            once.digest,
        )


def test_embedded_default_is_the_frameworks_reduce_lr_on_plateau() -> None:
    policy = load_default().defaults.policy
    assert isinstance(policy, Plateau) and policy.compat == "auto"
    # Bound to a job's framework, it is exactly that framework's constructor defaults
    # (test_plateau_parity.py compares those with Keras' and torch's own classes).
    assert policy.for_framework("keras") == Plateau(compat="keras")
    for framework in ("torch", "lightning", "hf"):
        assert policy.for_framework(framework) == Plateau(compat="torch")
    packaged = ROOT / "controller" / "default_policy.yaml"
    assert packaged.read_text() == (ROOT / "policies" / "default.yaml").read_text()


def test_every_example_policy_passes_lrpilot_check() -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.yaml"))
    assert len(files) >= 5
    result = run_cli("check", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(files)


def test_check_prints_file_line_errors_and_exits_2(write: Callable[[str, str], Path]) -> None:
    good = write("good.yaml", "version: 1\n")
    bad = write("bad.yaml", "version: 1\ndefaults:\n  policy: {type: plateau, factor: 1.5}\n")
    result = run_cli("check", str(good), str(bad))
    assert result.returncode == 2
    assert f"{good}: ok" in result.stdout
    assert f"{bad}:3: factor must be in (0, 1), got 1.5" in result.stdout


def test_check_warns_about_auto_mode_on_unknown_names(write: Callable[[str, str], Path]) -> None:
    path = write("p.yaml", "version: 1\ndefaults:\n  policy: {type: plateau, monitor: val_mae}\n")
    result = run_cli("check", str(path))
    assert result.returncode == 0
    assert f"{path}:3: warning: mode auto" in result.stdout


def test_check_on_a_missing_file(tmp_path: Path) -> None:
    result = run_cli("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: cannot read policy file" in result.stdout
