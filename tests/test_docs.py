"""The documentation a user reads: the generated policy reference and the links between pages."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lrpilot.controller.docgen import reference
from lrpilot.controller.policies import POLICY_TYPES

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def test_the_committed_policy_reference_is_what_the_code_generates() -> None:
    committed = (ROOT / "docs" / "policy-reference.md").read_text(encoding="utf-8")
    assert committed == reference(), (
        "docs/policy-reference.md is out of date: run `make docs` and commit the result"
    )


def test_make_docs_command_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lrpilot.controller.docgen"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == reference()


@pytest.mark.parametrize("name", sorted(POLICY_TYPES))
def test_every_type_has_a_section_with_each_parameter_documented(name: str) -> None:
    cls = POLICY_TYPES[name]
    text = reference()
    section = text.split(f"\n## `{name}`\n", 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        assert field.metadata.get("doc"), f"{name}.{field.name} has no doc= text"
        if field.name not in ("initial_lr", "apply") and (
            field.name != "unit" or field.default != "epoch"
        ):
            assert f"| `{field.name}` |" in section, f"{name}.{field.name} missing from its table"
    if name != "constant":
        assert "Framework equivalents: " in section and cls.equivalents, name
    assert f"[`{name}`](#{name})" in text  # the summary table links to it


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
    return headings | set(re.findall(r"""<a (?:id|name)=["']([^"']+)["']""", text))  # as GitHub


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: checked by a person, not here (no network)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_changelog_has_one_unreleased_section_then_this_version() -> None:
    import tomllib

    from lrpilot.controller import __version__

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "[Unreleased]" and headings.count("[Unreleased]") == 1, headings
    assert headings[1].startswith(f"[{version}] - "), headings
    assert __version__ == version  # what `lrpilot --version` prints
    released = (ROOT / "CHANGELOG.md").read_text().split(f"## [{version}]", 1)[1]
    assert not re.search(r"\bissue \d+", released, re.I), "name changes, not issue numbers"


def test_each_framework_example_gets_the_rule_the_docs_say(tmp_path: Path) -> None:
    """The five-minute policy of the README gives its `bert-*` warmup to the README's Keras job
    only: the framework examples in docs/frameworks.md run at their own LR under the defaults."""
    from conftest import run_cli

    readme = (ROOT / "README.md").read_text()
    policy = tmp_path / "my-policy.yaml"
    policy.write_text(readme.split("# my-policy.yaml\n", 1)[1].split("```", 1)[0])
    assert run_cli("check", str(policy)).returncode == 0
    frameworks = (ROOT / "docs" / "frameworks.md").read_text()
    jobs = set(re.findall(r'job="([^"]+)"', frameworks))
    assert "hf-demo" in jobs and len(jobs) >= 3, jobs
    csv = tmp_path / "m.csv"
    csv.write_text("epoch,val_loss\n0,1.0\n1,0.9\n")

    def rule(job: str) -> str:
        out = run_cli("simulate", "--policy", str(policy), "--job", job, "--metrics", str(csv))
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[0]

    assert "rule 'bert-*' (phases)" in rule("bert-base-1")  # the README's own Keras job
    for job in sorted(jobs):
        assert "rule '*' (plateau)" in rule(job), (job, rule(job))


def test_the_readme_stays_a_five_minute_read() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 400, f"README.md has {lines} lines: move the detail to docs/"
