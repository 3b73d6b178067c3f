"""deploy/'s dashboard and alert rules, run by a real Prometheus scraping a real controller.

Every PromQL expression of deploy/grafana/dashboards/lrpilot.json and
deploy/prometheus/alerts.yml is executed by Prometheus (the `prometheus` server from
Debian, which `make prometheus` installs); every dashboard panel must return data, and
every `lrpilot_*` name an expression uses must exist in the controller's real scrape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from conftest import Controller, Wire, run_cli
from prometheus_client.parser import text_string_to_metric_families

from lrpilot.client.protocol import ErrorMessage, LrMessage

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lrpilot.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

JOB = "prom-e2e"  # no regex metacharacters: it stands for Grafana's $training_job as is
RANGE_JOB = "prom-range"  # a job whose range test ends, for the suggested-LR panel
SCRAPE_JOB = "lrpilot"  # the scrape job name the alerts and dashboard select on
MIN_SCRAPES = 6  # scrapes of the controller before querying: enough for rate() over 1m
WAIT_SECONDS = 60.0  # for Prometheus to be ready: bounded in time and in polls
POLL_SECONDS = 0.5

# Grafana's variables as a user's dashboard would expand them.
GRAFANA_VARIABLES = {
    "training_job": f"{JOB}|{RANGE_JOB}",  # both selected, as Grafana's multi-value joins them
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}

POLICY = """\
version: 1
defaults:
  policy:
    {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0, min_lr: 1.0e-6}
jobs:
  - match: prom-range
    policy: {type: range_test, unit: epoch, start_lr: 1.0e-4, end_lr: 1.0, steps_per_decade: 1,
             beta: 0.0}
"""
RELOADED = POLICY.replace("patience: 1", "patience: 2")

BAD_FRAMES = [b"garbage", msgpack.packb({"t": "nope"}), msgpack.packb({"t": "hello", "v": 2})]

Factory = Callable[..., Controller]


def _tool(name: str) -> str:
    """The path of a Prometheus tool; skips only where `make test` could not install it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip(
            f"{name} is not installed and this is not root: run "
            "'sudo apt-get install -y prometheus' (make test installs it when run as root)"
        )
    pytest.fail(f"{name} is missing: `make prometheus` installs Debian's prometheus package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- expressions ------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their panels when collapsed


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (f"panel {p.get('id')} {p.get('title')!r} {t.get('refId', '')}", t)
        for p in _panels(board["panels"])
        for t in p.get("targets", [])
    ]


def dashboard_variables() -> list[dict[str, Any]]:
    """The query variables (the `datasource` variable picks Prometheus, it queries nothing)."""
    board = json.loads(DASHBOARD.read_text())
    return [v for v in board.get("templating", {}).get("list", []) if v.get("type") != "datasource"]


def dashboard_annotations() -> list[tuple[str, dict[str, Any]]]:
    """(name, annotation) for every annotation that runs a PromQL query."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (f"annotation {a.get('name')!r}", a)
        for a in board.get("annotations", {}).get("list", [])
        if a.get("expr")
    ]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def expand(expr: str) -> str:
    """`expr` with Grafana's `$var`, `${var}`, `${var:fmt}` and `[[var]]` substituted."""

    def one(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"{expr!r}: the test does not know Grafana variable ${name}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", one, expr)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\blrpilot_[A-Za-z0-9_]+", expr))


# -- Prometheus -------------------------------------------------------------------------


class Prometheus:
    """A `prometheus` server subprocess and its HTTP API."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(ALERTS, workdir / "alerts.yml")
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": SCRAPE_JOB, "static_configs": [{"targets": [target]}]},
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def stop(self) -> None:
        """Terminates this server (by its PID) and waits for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def get(self, path: str, **params: Any) -> Any:
        """GET /api/v1/PATH; returns `data`, fails the test on an error answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the body
            body = json.loads(exc.read() or b"{}")
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data}"
        return list(data["result"])

    def query_range(self, expr: str, seconds: float = 60, step: str = "1s") -> list[Any]:
        end = time.time()
        data = self.get("query_range", query=expr, start=end - seconds, end=end, step=step)
        return list(data["result"])

    def wait_until_ready(self, controller: Controller, deadline: float) -> None:
        """Until the target is up, scraped MIN_SCRAPES times and every rule evaluated."""
        why = "not started"
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
            if time.monotonic() > deadline:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                why = self._not_ready()
            except (OSError, AssertionError) as exc:
                why = f"API not answering: {exc}"
            if not why:
                return
            time.sleep(POLL_SECONDS)
        raise AssertionError(
            f"prometheus not ready in {WAIT_SECONDS:.0f}s ({why})\n{self.log()}\n{controller.log()}"
        )

    def _not_ready(self) -> str:
        targets = self.get("targets")["activeTargets"]
        ours = [t for t in targets if t["labels"].get("job") == SCRAPE_JOB]
        if not ours or ours[0]["health"] != "up":
            return f"target not up: {ours}"
        scrapes = self.query(f'count_over_time(up{{job="{SCRAPE_JOB}"}}[1m])')
        if not scrapes or float(scrapes[0]["value"][1]) < MIN_SCRAPES:
            return f"fewer than {MIN_SCRAPES} scrapes: {scrapes}"
        rules = [r for g in self.get("rules")["groups"] for r in g["rules"]]
        if len(rules) != len(alert_rules()) or any(
            r.get("lastEvaluation", "").startswith("0001") for r in rules
        ):
            return "rules not evaluated yet"
        return ""


@pytest.fixture
def prometheus_binary() -> str:
    return _tool("prometheus")


@pytest.fixture
def promtool() -> str:
    return _tool("promtool")


# -- the controller's side --------------------------------------------------------------


def report(w: Wire, epoch: int, val_loss: float) -> LrMessage:
    """One report and its answer, skipping the pushes (override, reload) queued before it."""
    w.report(epoch, {"val_loss": val_loss}, wait=False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = w.recv(timeout=max(0.0, deadline - time.monotonic()))
        if msg.seq == w.seq:
            assert isinstance(msg, LrMessage), msg
            return msg
    raise TimeoutError(f"no answer to report seq {w.seq}")


class Reporter(threading.Thread):
    """Keeps the job reporting every 0.2 s (on a plateau) so rates and histograms have data."""

    def __init__(self, wire: Wire, first_epoch: int) -> None:
        super().__init__(daemon=True)
        self.wire, self.epoch = wire, first_epoch
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.reports = 0

    def run(self) -> None:
        try:
            while not self.halt.wait(0.2):
                report(self.wire, self.epoch, 1.0 + 0.001 * (self.epoch % 3))
                self.epoch += 1
                self.reports += 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert not self.is_alive(), "the reporter thread did not stop"
        assert self.error is None, f"the reporter failed: {self.error!r}"


def exercise(c: Controller, w: Wire) -> int:
    """LR changes of each kind, an override, a reload and invalid messages; the next epoch."""
    assert w.hello(lr=0.1).reason == "initial"
    replies = [report(w, e, v) for e, v in enumerate([1.0, 1.0, 1.0, 0.5])]
    assert any(r.reason == "plateau" for r in replies), replies

    done = run_cli("set-lr", JOB, "0.01", "--admin", c.admin)
    assert done.returncode == 0, done.stderr
    assert c.metric("lrpilot_lr_changes_total", training_job=JOB, reason="override") == 1

    assert c.policy is not None
    c.policy.write_text(RELOADED)
    done = run_cli("reload", "--admin", c.admin)
    assert done.returncode == 0, done.stdout + done.stderr
    assert c.metric("lrpilot_policy_reloads_total", result="success") >= 1

    bad = Wire(c.bind, "bad-peer")
    try:
        for frame in BAD_FRAMES:
            bad.send_raw(frame)
            assert isinstance(bad.recv(), ErrorMessage)
    finally:
        bad.close()
    assert c.metric("lrpilot_invalid_messages_total", reason="decode") >= 1

    sweep = Wire(c.bind, RANGE_JOB)
    try:
        lr = sweep.hello(lr=0.1, restore=True).lr
        for epoch, loss in enumerate([1.0, 0.8, 0.5, 5.0]):  # diverges at the 4th point
            lr = sweep.report(epoch, {"loss": loss}, lr=lr).lr
    finally:
        sweep.close()
    assert c.metric("lrpilot_range_test_suggested_lr", training_job=RANGE_JOB) > 0
    return len(replies)


# -- tests ------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_accepts_the_prometheus_config(promtool: str) -> None:
    # Run on the real file: `check config` resolves rule_files relative to it, so the
    # rules it loads are deploy/prometheus/alerts.yml themselves.
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and str(ALERTS.name) in done.stdout


def test_every_dashboard_and_alert_query_runs_on_real_prometheus(
    controller_factory: Factory,
    prometheus_binary: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    c = controller_factory(POLICY)
    w = Wire(c.bind, JOB)
    reporter: Reporter | None = None
    prom: Prometheus | None = None
    verified: dict[str, int] = {}
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    try:
        epoch = exercise(c, w)
        # The Wire now belongs to the reporter thread until it is stopped.
        reporter = Reporter(w, epoch)
        reporter.start()
        target = urllib.parse.urlsplit(c.metrics).netloc
        prom = Prometheus(prometheus_binary, workdir, target)
        prom.wait_until_ready(c, deadline)
        verified = verify_queries(prom, c)
        reporter.stop()
        assert reporter.reports >= MIN_SCRAPES
    finally:
        if reporter is not None:
            reporter.halt.set()
            reporter.join(10)
        if prom is not None:
            prom.stop()
        w.close()
    with capsys.disabled():
        print(
            f"\nverified {sum(verified.values())} PromQL queries against Prometheus "
            + ", ".join(f"{n} {what}" for what, n in verified.items())
        )


def verify_queries(prom: Prometheus, c: Controller) -> dict[str, int]:
    """Runs every expression; returns how many were verified, by source."""
    scraped = {
        sample.name
        for family in text_string_to_metric_families(c.scrape())
        for sample in family.samples
    }
    stored = set(prom.get("label/__name__/values"))
    named: dict[str, str] = {}  # metric name -> where it is used
    verified = {"dashboard panel queries": 0, "template variables": 0, "alert rules": 0}

    up = prom.query(f'up{{job="{SCRAPE_JOB}"}}')
    assert [float(s["value"][1]) for s in up] == [1.0], up
    verified["up"] = 1

    targets = dashboard_targets()
    assert targets, "the dashboard has no queries"
    annotations = dashboard_annotations()
    assert annotations, "the dashboard marks no overrides or reloads"
    assert any("lrpilot_rollbacks_total" in a["expr"] for _, a in annotations), "no rollbacks"
    for where, target in annotations:  # events: no data is fine, a failing query is not
        prom.query(expand(target["expr"]))
        named.update(dict.fromkeys(metric_names(target["expr"]), where))
        verified["annotation queries"] = verified.get("annotation queries", 0) + 1
    for where, target in targets:
        assert target.get("expr"), f"{where}: a target without a PromQL expr"
        expr = expand(target["expr"])
        result = prom.query(expr)
        assert result, f"{where}: no data for {expr}"
        if target.get("range", not target.get("instant", False)):
            assert prom.query_range(expr), f"{where}: no data over a range for {expr}"
        named.update(dict.fromkeys(metric_names(expr), where))
        verified["dashboard panel queries"] += 1

    for variable in dashboard_variables():
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", str(query).strip())
        assert variable.get("type") == "query" and m, f"unsupported variable {variable}"
        metric, label = m.groups()
        values = prom.get(f"label/{label}/values", **{"match[]": metric})
        assert JOB in values, f"variable {variable['name']}: {values}"
        named[metric] = f"variable {variable['name']}"
        verified["template variables"] += 1

    for rule in alert_rules():
        expr = rule["expr"]
        prom.query(expr)  # no data is fine (no alert); a failing query is not
        named.update(dict.fromkeys(metric_names(expr), f"alert {rule.get('alert')}"))
        verified["alert rules"] += 1
    health = {r["name"]: r["health"] for g in prom.get("rules")["groups"] for r in g["rules"]}
    assert set(health.values()) == {"ok"}, health

    missing = {name: where for name, where in named.items() if name not in scraped}
    assert not missing, f"not in the controller's scrape: {missing}"
    unstored = {name: where for name, where in named.items() if name not in stored}
    assert not unstored, f"not stored by Prometheus: {unstored}"
    return verified


def test_the_stale_alert_fires_for_stalled_jobs_not_finished_ones(
    promtool: str, tmp_path: Path
) -> None:
    """promtool's rule unit test: two jobs stop reporting at t=0; the one whose workers all
    said bye (lrpilot_job_finished 1) finished normally and must not page anyone."""
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'lrpilot_last_report_timestamp_seconds{{training_job="{j}"}}',
                        "values": "0x60",
                    }
                    for j in ("stalled", "done")
                ]
                + [
                    {"series": 'lrpilot_job_finished{training_job="stalled"}', "values": "0x60"},
                    {"series": 'lrpilot_job_finished{training_job="done"}', "values": "1x60"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "40m",
                        "alertname": "LrpilotJobStale",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "info", "training_job": "stalled"},
                                "exp_annotations": {
                                    "summary": "Training job stalled stopped reporting",
                                    "description": "No report from stalled for 40m 0s.",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "stale-test.yml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- annotations at any dashboard interval ------------------------------------------------

SCRAPE_SECONDS = 1  # the test Prometheus' scrape_interval
ANNOTATION_INTERVALS = (1, 5, 10, 15, 60)  # Grafana's $__interval (the query step), seconds
# A plateau keeps its state over a reload; a higher min_lr lifts the LR (0.01 → 0.05).
RELOAD_POLICY = POLICY.replace("min_lr: 1.0e-6", "min_lr: 0.05")


def _wait_for_sample(prom: Prometheus, expr: str, value: float, deadline: float) -> None:
    """Until Prometheus holds `expr` == value and has scraped once more after that."""
    seen_at = None
    for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
        if time.monotonic() > deadline:
            break
        result = prom.query(f"timestamp({expr})")
        current = prom.query(expr)
        if current and float(current[0]["value"][1]) == value and result:
            stamp = float(result[0]["value"][1])
            if seen_at is None:
                seen_at = stamp
            elif stamp >= seen_at + SCRAPE_SECONDS:
                return
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"Prometheus never stored {expr} == {value}:\n{prom.log()}")


def test_annotations_mark_overrides_and_reloads_at_any_dashboard_interval(
    controller_factory: Factory, prometheus_binary: str, tmp_path: Path
) -> None:
    """Grafana evaluates the annotation query once per step ($__interval). A window of
    $__interval alone holds one sample at 1 s steps and misses changes between windows at
    longer ones; $__rate_interval (>= a step plus a scrape) sees each change."""
    deadline = time.monotonic() + 2 * WAIT_SECONDS
    c = controller_factory(POLICY)
    w = Wire(c.bind, JOB)
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prom = Prometheus(prometheus_binary, workdir, urllib.parse.urlsplit(c.metrics).netloc)
    try:
        assert w.hello(lr=0.1).reason == "initial"
        report(w, 0, 1.0)
        prom.wait_until_ready(c, deadline)
        start = time.time()
        done = run_cli("set-lr", JOB, "0.01", "--admin", c.admin)
        assert done.returncode == 0, done.stderr
        changes = f'lrpilot_lr_changes_total{{training_job="{JOB}",reason="%s"}}'
        _wait_for_sample(prom, changes % "override", 1, deadline)
        assert c.policy is not None
        c.policy.write_text(RELOAD_POLICY)
        done = run_cli("reload", "--admin", c.admin)
        assert done.returncode == 0, done.stdout + done.stderr
        report(w, 1, 1.0)  # a reload applies at the job's next decision at the latest
        _wait_for_sample(prom, changes % "reload", 1, deadline)
        end = time.time()
        (annotation,) = [a for _, a in dashboard_annotations() if "lr_changes" in a["expr"]]
        for interval in ANNOTATION_INTERVALS:
            rate = max(interval + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS)  # as Grafana computes it
            GRAFANA = {**GRAFANA_VARIABLES, "__interval": f"{interval}s"}
            GRAFANA["__rate_interval"] = f"{rate}s"
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m, g=GRAFANA: g[m.group(1)], annotation["expr"])
            first = (start // interval - 1) * interval  # Grafana aligns the range to the step
            data = prom.get(
                "query_range", query=expr, start=first, end=end + interval + 1, step=interval
            )
            marks = {series["metric"]["reason"] for series in data["result"]}
            assert marks == {"override", "reload"}, f"$__interval {interval}s: {expr} → {data}"
    finally:
        prom.stop()
        w.close()


# -- the min-LR alert under both compat modes ----------------------------------------------

MIN_LR_POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_delta: 0.0,
           min_lr: 0.025}
"""
MIN_LR_EPOCHS = 24  # one epoch per minute in the rule test


def test_the_min_lr_alert_fires_for_keras_and_torch_jobs(
    controller_factory: Factory, promtool: str, tmp_path: Path
) -> None:
    """Both jobs sit at min_lr on a plateau. The series are what a real controller exported
    after each epoch (one epoch a minute); promtool evaluates the alert rule on them. Under
    compat torch (what `auto` picks for torch clients) wait cycles 0..patience at min_lr, so
    the former `wait >= patience` rule never held for 10 minutes."""
    c = controller_factory(MIN_LR_POLICY)
    series: dict[str, dict[str, list[float]]] = {}
    for framework in ("keras", "torch"):
        job = f"{framework}-at-min"
        w = Wire(c.bind, job)
        try:
            assert w.hello(lr=0.1, framework=framework).reason == "initial"
            values: dict[str, list[float]] = {"at_min_lr": [], "wait": [], "lr": []}
            for epoch in range(MIN_LR_EPOCHS):
                report(w, epoch, 1.0)
                for name in values:
                    family = "lrpilot_learning_rate" if name == "lr" else f"lrpilot_{name}"
                    if name == "wait":
                        family = "lrpilot_plateau_wait"
                    values[name].append(c.metric(family, training_job=job))
        finally:
            w.close()
        series[job] = values
        assert values["lr"][-1] == pytest.approx(0.025)
    torch_tail = series["torch-at-min"]["wait"][-10:]
    assert min(torch_tail) < 2, f"torch's wait did not cycle at min_lr: {torch_tail}"

    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'lrpilot_at_min_lr{{training_job="{job}"}}',
                        "values": " ".join(f"{v:g}" for v in values["at_min_lr"]),
                    }
                    for job, values in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{MIN_LR_EPOCHS - 1}m",
                        "alertname": "LrpilotAtMinLrOnPlateau",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "info", "training_job": job},
                                "exp_annotations": {
                                    "summary": f"{job} is at min_lr and still on a plateau",
                                    "description": (
                                        f"{job} sits at its min_lr and its monitored metric "
                                        "has not improved since it got there. Consider "
                                        "stopping it (policy key stop_at_min_lr) or "
                                        "revisiting the policy."
                                    ),
                                },
                            }
                            for job in sorted(series)
                        ],
                    },
                    {"eval_time": "4m", "alertname": "LrpilotAtMinLrOnPlateau", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "min-lr-test.yml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lr_panel_draws_min_lr_only_for_jobs_whose_policy_has_one(
    promtool: str, tmp_path: Path
) -> None:
    """A policy without min_lr exports lrpilot_min_lr 0, which a log axis cannot draw: the LR
    panel's min_lr query (evaluated by promtool) returns the jobs with a min_lr only."""
    exprs = [
        expand(t["expr"])
        for _, t in dashboard_targets()
        if "lrpilot_min_lr" in metric_names(expand(t["expr"]))
    ]
    assert len(exprs) == 1, exprs
    expr = exprs[0].replace(GRAFANA_VARIABLES["training_job"], "with-min|without")
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'lrpilot_min_lr{training_job="with-min"}', "values": "1e-06x3"},
                    {"series": 'lrpilot_min_lr{training_job="without"}', "values": "0x3"},
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": 'lrpilot_min_lr{training_job="with-min"}', "value": 1e-06}
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "min-lr-panel-test.yml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
