"""The web view on the metrics port: its JSON endpoints, and the page in a real browser
(Debian's headless Chromium, which `make chromium` installs) against a live controller.

`python tests/test_web_view.py docs/web-view.png` redraws the screenshots of docs/web-view.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client.protocol import Bye, encode

Factory = Callable[..., Controller]

POLICY = """version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2}
jobs:
  - match: "find-*"
    phases:
      - {type: range_test}
      - {type: plateau, monitor: loss, patience: 3, unit: step}
  - match: "gpt-*"
    policy: {type: plateau, monitor: loss, patience: 50, min_lr: 1.0e-4}
    guard: {monitor: loss, spike: 3.0, window: 5, warmup: 5, snapshot_every: 5, lr_factor: 0.5}
"""


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def _base(c: Controller) -> str:
    return c.metrics.removesuffix("metrics")


def _populate(c: Controller) -> dict[str, Any]:
    """A few jobs as they look in a day's work: a plateau job with an operator's override,
    a range test followed by a plateau, and a handful of fresh jobs."""
    made: dict[str, Any] = {}
    w = Wire(c.bind, "resnet-a")
    try:
        lr = w.hello(lr=0.1).lr
        for e in range(30):
            loss = 1.0 / (1 + e) if e < 12 else 0.083 + 0.001 * (e % 3)
            if e == 16:
                loss = math.nan  # a diverged evaluation: shown as a gap, served as null
            lr = w.report(e, {"val_loss": loss, "loss": 0.9 * loss}, lr=lr).lr
            if e == 20:
                out = run_cli("set-lr", "resnet-a", "0.003", "--epochs", "4", "--admin", c.admin)
                assert out.returncode == 0, out.stderr
                w.recv()  # the override's push
    finally:
        w.close()
    f = Wire(c.bind, "find-lr")
    try:
        lr = f.hello(lr=0.01, restore=True).lr
        swept, after = 0.0, 0
        for s in range(220):
            if lr >= swept and not after:  # the sweep: the loss falls, then blows up
                swept, x = lr, math.log10(lr)
                loss = 2.3 - 0.2 * (x + 8) if x < -2.5 else 1.2 + 2.5 * (x + 2.5) ** 2
            else:  # weights restored, training at the suggestion: the loss goes down
                after += 1
                loss = 0.6 + 1.6 * 0.97**after
            lr = f.report(0, {"loss": loss}, lr=lr, step=s).lr
    finally:
        f.close()
    s = Wire(c.bind, "gpt-spike")  # a guarded job: a loss spike rolled back, then a reload
    try:
        lr = s.hello(lr=0.1, restore=True).lr
        for e in range(20):
            lr = s.report(e, {"loss": 50.0 if e == 12 else 1.0 - 0.01 * e}, lr=lr).lr
        assert lr == pytest.approx(0.05)  # rolled back at epoch 12, lr x 0.5
        c.policy.write_text(POLICY.replace("min_lr: 1.0e-4", "min_lr: 0.08"))
        out = run_cli("reload", "--admin", c.admin)
        assert out.returncode == 0, out.stderr
        assert s.recv().reason == "reload"  # min_lr above the LR: pushed at once
    finally:
        s.close()
    for j in range(4):
        g = Wire(c.bind, f"bert-{j}")
        try:
            g.hello(lr=1e-3)
            g.report(0, {"val_loss": 1.0}, lr=1e-3)
            if j == 3:  # this one is done: its only worker says bye
                g.sock.send(encode(Bye(g.job, 0, g.session).to_wire()))
        finally:
            g.close()
    status, _, body = _get(_base(c) + "api/jobs/find-lr/metrics")
    assert status == 200
    made["range_test"] = json.loads(body)["range_test"]
    made["jobs"] = sorted(["resnet-a", "find-lr", "gpt-spike", *(f"bert-{j}" for j in range(4))])
    return made


# -- the JSON endpoints and the files ----------------------------------------------------------


def test_the_endpoints_serve_the_page_its_library_and_the_json(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    made = _populate(c)
    base = _base(c)

    assert f"web view (read-only): {base}" in c.log()  # said at start, after the ready line
    status, kind, page = _get(base)
    assert status == 200 and kind.startswith("text/html")
    with urllib.request.urlopen(base, timeout=10) as resp:  # nothing from elsewhere
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self';")
    assert b"/static/uPlot.iife.min.js" in page and b"/static/app.js" in page
    folder = files("lrpilot.controller") / "web"
    status, _, lib = _get(base + "static/uPlot.iife.min.js")
    assert status == 200 and lib == (folder / "uPlot.iife.min.js").read_bytes()
    assert lib.startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    status, _, licence = _get(base + "static/uPlot.LICENSE")
    assert status == 200 and b"The MIT License" in licence and b"Leon Sorokin" in licence
    assert _get(base + "static/../web.py")[0] == 404
    assert _get(base + "nothing")[0] == 404
    status, kind, text = _get(base + "metrics")  # /metrics is as it was
    assert status == 200 and b'lrpilot_learning_rate{training_job="resnet-a"}' in text

    status, kind, body = _get(base + "api/jobs")
    assert status == 200 and kind == "application/json"
    jobs = json.loads(body)
    assert [j["job"] for j in jobs["jobs"]] == made["jobs"]
    assert (jobs["total"], jobs["matched"], jobs["pages"]) == (7, 7, 1)

    status, _, body = _get(base + "api/jobs/resnet-a/metrics")
    one = json.loads(body)  # strict JSON: the NaN evaluation is null
    assert one["x"] == list(range(30)) and one["unit"] == "epoch"
    assert one["metrics"]["val_loss"][16] is None and one["metrics"]["val_loss"][0] == 1.0
    assert one["lr"][0] == pytest.approx(0.1) and one["lr"][22] == pytest.approx(0.003)
    assert one["status"]["job"] == "resnet-a" and one["monitor"] == "val_loss"
    reasons = [e["reason"] for e in one["events"]]
    assert reasons[0] == "initial" and "override" in reasons and "plateau" in reasons
    assert one["range_test"] is None
    assert one["count"] == 30 and one["after"] == -1
    status, _, body = _get(base + f"api/jobs/resnet-a/metrics?run={one['run']}&after=26")
    tail = json.loads(body)  # a page refreshing asks only for what it lacks
    assert tail["x"] == [27, 28, 29] and tail["count"] == 30
    assert tail["lr"] == one["lr"][27:] and tail["metrics"]["loss"] == one["metrics"]["loss"][27:]
    assert made["range_test"]["suggested_lr"] > 0 and made["range_test"]["done"]

    w = Wire(c.bind, "team/bert@v2:1")  # every character a job name may hold
    try:
        w.hello(lr=0.01)
        w.report(0, {"val_loss": 0.5}, lr=0.01)
    finally:
        w.close()
    for path in ("team/bert@v2:1", "team%2Fbert%40v2%3A1"):
        status, _, body = _get(base + f"api/jobs/{path}/metrics")
        assert status == 200 and json.loads(body)["metrics"] == {"val_loss": [0.5]}, path

    status, kind, body = _get(base + "api/jobs/nope/metrics")
    assert status == 404 and json.loads(body)["code"] == "unknown_job"
    status, _, body = _get(base + "api/jobs/bad%20name/metrics")
    assert status == 400 and json.loads(body)["code"] == "schema"


def test_a_thousand_jobs_are_filtered_and_paged(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(POLICY)
    w = Wire(c.bind, "job")
    try:
        for i in range(1000):
            w.job = f"job-{i:04d}"
            w.hello(lr=0.01)
    finally:
        w.close()
    base = _base(c)
    first = json.loads(_get(base + "api/jobs")[2])
    assert (first["total"], first["pages"], len(first["jobs"])) == (1000, 20, 50)
    assert first["jobs"][0]["job"] == "job-0000"
    page = json.loads(_get(base + "api/jobs?q=job-09&page=2&per_page=40")[2])
    assert page["matched"] == 100 and page["pages"] == 3
    assert [j["job"] for j in page["jobs"]] == [f"job-{i:04d}" for i in range(940, 980)]
    last = json.loads(_get(base + "api/jobs?page=999")[2])  # past the end: the last page
    assert last["page"] == 20 and last["jobs"][-1]["job"] == "job-0999"

    dom = Dom(browse(f"{base}?q=job-09", tmp_path / "profile", "--dump-dom"))  # in a browser
    assert dom.rows == [f"job-{i:04d}" for i in range(900, 950)]
    assert dom.text["summary"] == '1000 jobs, 100 match "job-09"'
    assert dom.text["page"] == "page 1 of 2"


# -- the page in a real browser ------------------------------------------------------------------


def _chromium() -> str:
    """Debian's chromium; skips only where `make test` could not install it (not root)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip(
            "chromium is not installed and this is not root: run 'sudo apt-get install -y "
            "chromium' (make test installs it when run as root)"
        )
    pytest.fail("chromium is missing: `make chromium` installs Debian's chromium package")


def browse(url: str, profile: Path, *flags: str, timeout: float = 90) -> str:
    """Load `url` in headless Chromium, give its scripts 6 s of (virtual) time, and return
    stdout (`--dump-dom`: the DOM as rendered). The browser's whole process group is killed
    afterwards, also when this fails."""
    proc = subprocess.Popen(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",  # root in a container has no user namespaces for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1400,1300",
            "--virtual-time-budget=6000",
            *flags,
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: renderers and zygotes go with it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, err[-2000:]
    return out


class Dom(HTMLParser):
    """The parts of the rendered page a user reads: element ids, classes and texts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.selected: list[str] = []
        self.finished: list[str] = []
        self.cells: dict[str, list[str]] = {}  # a job row's cells' texts
        self.canvases: dict[str, int] = {}
        self.labels: list[str] = []
        self.hidden: set[str] = set()
        self.events: list[str] = []
        self.text: dict[str, str] = {}
        self._stack: list[tuple[str, str | None, str]] = []  # tag, id of the section, class
        self._section: str | None = None
        self._capture: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = a.get("class") or ""
        if a.get("id"):
            self._section = a["id"]
            if "hidden" in a:
                self.hidden.add(a["id"] or "")
            if a["id"] in ("job-title", "job-info", "range-test-info", "page", "summary"):
                self._capture = a["id"]
                self.text[self._capture] = ""
        if tag == "tr" and "job-row" in cls:
            self.rows.append(a.get("data-job") or "")
            self.cells[self.rows[-1]] = []
            if "selected" in cls:
                self.selected.append(a.get("data-job") or "")
            if "finished" in cls:
                self.finished.append(a.get("data-job") or "")
        if tag == "td" and self._stack and self._stack[-1][0] == "tr" and self.rows:
            row = self._stack[-1][2]
            if "job-row" in row:
                self.cells[self.rows[-1]].append("")
                self._capture = "cell"
        if tag == "tr" and cls.startswith("event "):
            self.events.append(cls.removeprefix("event ev-"))
        if tag == "canvas":
            chart = next((s for s in reversed(self._ids()) if s.endswith("-chart")), "?")
            self.canvases[chart] = self.canvases.get(chart, 0) + 1
        if "u-label" in cls:
            self._capture = "label"
            self.labels.append("")
        self._stack.append((tag, a.get("id"), cls))

    def _ids(self) -> list[str]:
        return [i for _, i, _ in self._stack if i]

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break
        if self._capture and tag in ("div", "p", "span", "h2", "td"):  # none nests a tag
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture == "label":
            self.labels[-1] += data
        elif self._capture == "cell":
            self.cells[self.rows[-1]][-1] += data
        elif self._capture:
            self.text[self._capture] += data


def _red_pixels(png: Path) -> int:
    """Pixels of the LR line's red (#d62728) in a screenshot."""
    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(str(png))
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    near = (abs(r - 214 / 255) < 0.08) & (abs(g - 39 / 255) < 0.08) & (abs(b - 40 / 255) < 0.08)
    return int(near.sum())


def test_the_page_in_headless_chromium(controller_factory: Factory, tmp_path: Path) -> None:
    c = controller_factory(POLICY)
    made = _populate(c)
    base = _base(c)

    dom = Dom(browse(f"{base}?job=resnet-a", tmp_path / "profile", "--dump-dom"))
    assert dom.rows == made["jobs"]  # the jobs table, from /api/jobs
    assert dom.selected == ["resnet-a"]
    assert dom.finished == ["bert-3"]  # greyed, "finished" in place of its workers
    assert dom.cells["bert-3"][1] == "finished" and dom.cells["find-lr"][2] == "step 219"
    assert dom.text["summary"] == "7 jobs" and dom.text["page"] == "page 1 of 1"
    assert dom.text["job-title"] == "resnet-a"
    assert "30 points recorded" in dom.text["job-info"] and "plateau" in dom.text["job-info"]
    assert dom.canvases.get("lr-chart") == 1  # uPlot drew the LR and monitor chart
    assert "lr (trained)" in dom.labels and "val_loss" in dom.labels
    history = run_cli("history", "resnet-a", "--json", "--admin", c.admin)
    rows = json.loads(history.stdout)
    assert dom.events == [r["reason"] for r in reversed(rows)]  # newest first
    assert "override" in dom.events
    assert "range-test" in dom.hidden  # no range test for this job

    dom = Dom(browse(f"{base}?job=find-lr", tmp_path / "profile", "--dump-dom"))
    assert dom.selected == ["find-lr"]
    assert "range-test" not in dom.hidden and dom.canvases.get("range-chart") == 1
    rt = made["range_test"]
    info = dom.text["range-test-info"]
    assert f"{len(rt['points'])} points, stopped: {rt['stop_reason']}" in info
    assert f"({rt['suggest']})" in info and "valley" in info and "steep" in info
    assert {"loss", "smoothed"} <= set(dom.labels)
    assert dom.events.count("range_test") >= 100  # every step of the sweep, marked

    dom = Dom(browse(f"{base}?job=gpt-spike", tmp_path / "profile", "--dump-dom"))
    assert dom.events == ["reload", "divergence", "initial"]  # a rollback and a reload, marked
    assert dom.canvases.get("lr-chart") == 1 and "loss" in dom.labels

    dom = Dom(browse(f"{base}?q=bert", tmp_path / "profile", "--dump-dom"))  # the filter box
    assert dom.rows == [f"bert-{j}" for j in range(4)]
    assert dom.text["summary"] == '7 jobs, 4 match "bert"'
    assert "job" in dom.hidden  # no job chosen: no job panel

    shot = tmp_path / "web-view.png"  # kept with the test's temp dir for a look
    browse(f"{base}?job=resnet-a", tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _red_pixels(shot) > 300  # the LR line is on the canvas, not just the canvas


if __name__ == "__main__":  # redraw the screenshots docs/web-view.md shows
    import tempfile

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/web-view.png").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        ctl = Controller(Path(tmp) / "state", policy).start()
        try:
            _populate(ctl)
            for job, png, height in (
                ("resnet-a", target, 1000),
                ("find-lr", target.with_name(target.stem + "-range-test.png"), 1250),
            ):
                browse(
                    f"{_base(ctl)}?job={job}",
                    Path(tmp) / "p",
                    f"--window-size=1280,{height}",
                    f"--screenshot={png}",
                )
                print(png)
        finally:
            ctl.stop()
