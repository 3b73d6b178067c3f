"""Recorded metrics: every decided epoch's metrics and the LR trained, in the store with the
decisions; `lrpilot metrics JOB [--csv]`; `lrpilot simulate --job JOB --policy FILE` (what-if)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.controller.store import METRIC_POINTS_KEPT, MetricPoint, Store, Writes

Factory = Callable[..., Controller]

PLATEAU = """version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2}
"""
PATIENT = """version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 5}
"""


def _loss(epoch: int) -> float:
    """Falls, then sits on a plateau (with a NaN once: a diverged value is recorded too)."""
    if epoch == 9:
        return math.nan
    return 1.0 / (1 + epoch) if epoch < 6 else 0.14 + 0.001 * (epoch % 2)


def _train(c: Controller, job: str, epochs: int) -> list[float]:
    """A single-worker job as a client runs it; returns the LR it trained each epoch with."""
    w = Wire(c.bind, job)
    try:
        lr = w.hello(lr=0.1).lr
        trained = []
        for e in range(epochs):
            trained.append(lr)
            lr = w.report(e, {"val_loss": _loss(e), "acc": e / 100}, lr=lr).lr
        return trained
    finally:
        w.close()


def _points(job: str, run: int, ts: range) -> list[MetricPoint]:
    return [
        MetricPoint(job, run, t, t // 100, 0.1 / (1 + t), 1.7e9 + t, {"loss": t / 7}) for t in ts
    ]


def test_a_long_run_is_thinned_to_every_kth_point_across_restarts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        for start in range(0, 25_000, 1_000):  # 25 turns of 1,000 steps
            store.commit(Writes(metrics=_points("j", 7, range(start, start + 1_000))))
        store.commit(Writes(metrics=_points("other", 1, range(10))))
        kept = store.metrics("j", 7)
        assert [p.t for p in kept] == list(range(0, 25_000, 4))  # 6,250: stride doubled twice
    finally:
        store.close()
    store = Store(tmp_path)  # the stride is read back: the run goes on thinned the same way
    try:
        store.commit(Writes(metrics=_points("j", 7, range(25_000, 40_005))))
        kept = store.metrics("j", 7)
        assert len(kept) <= METRIC_POINTS_KEPT
        assert [p.t for p in kept] == list(range(0, 40_005, 8))
        assert kept[3] == _points("j", 7, range(24, 25))[0]  # LR, time and metrics intact
        assert [p.t for p in store.metrics("other", 1)] == list(range(10))
        assert store.metric_runs("j") == [7]
    finally:
        store.close()


def test_metrics_survive_kill_9_and_export_as_csv_simulate_reads(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(PLATEAU)
    trained = _train(c, "resnet-a", 14)
    c.kill()  # every LR a client received was committed, and its metrics with it
    c = controller_factory(PLATEAU, state_dir=c.state_dir)

    out = run_cli("metrics", "resnet-a", "--csv", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["epoch", "acc", "val_loss", "lr"]
    assert [int(r["epoch"]) for r in rows] == list(range(14))
    assert [float(r["lr"]) for r in rows] == pytest.approx(trained, rel=1e-6)
    assert trained[0] > trained[-1]  # the plateau did reduce it: the column is not constant
    assert rows[9]["val_loss"] == "nan" and float(rows[3]["val_loss"]) == pytest.approx(0.25)

    table = run_cli("metrics", "resnet-a", "--admin", c.admin)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("job resnet-a: run ") and "14 points, monitor val_loss" in lines[0]
    assert lines[1].split() == ["epoch", "acc", "val_loss", "lr"]
    assert len(lines) == 2 + 14

    # The export replays as it ran: the same policy on it gives the LRs the job trained with.
    path = tmp_path / "export.csv"
    path.write_text(out.stdout)
    policy = tmp_path / "same.yaml"
    policy.write_text(PLATEAU)
    replay = run_cli(
        "simulate", "--policy", str(policy), "--job", "resnet-a", "--metrics", str(path), "--json"
    )
    assert replay.returncode == 0, replay.stderr
    next_lrs = [r["lr"] for r in json.loads(replay.stdout)]
    assert next_lrs[:-1] == pytest.approx(trained[1:], rel=1e-6)

    assert run_cli("forget", "resnet-a", "--admin", c.admin).returncode == 0
    gone = run_cli("metrics", "resnet-a", "--admin", c.admin)
    assert gone.returncode == 1 and "no job 'resnet-a'" in gone.stderr


def test_simulate_job_replays_another_policy_beside_what_happened(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(PLATEAU)
    trained = _train(c, "resnet-a", 14)
    patient = tmp_path / "patient.yaml"
    patient.write_text(PATIENT)

    out = run_cli(
        "simulate", "--job", "resnet-a", "--policy", str(patient), "--admin", c.admin, "--json"
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["actual_lr"] for r in rows] == pytest.approx(trained, rel=1e-6)
    # The what-if is the CSV replay of the same history (an independent path to the engine).
    export = run_cli("metrics", "resnet-a", "--csv", "--admin", c.admin).stdout
    (tmp_path / "h.csv").write_text(export)
    offline = run_cli(
        "simulate",
        "--job",
        "resnet-a",
        "--policy",
        str(patient),
        "--metrics",
        str(tmp_path / "h.csv"),
        "--json",
    )
    assert [{k: v for k, v in r.items() if k != "actual_lr"} for r in rows] == json.loads(
        offline.stdout
    )
    # Patience 5 waits longer on this plateau than the job's patience 2 did.
    first_cut = next(i for i, r in enumerate(rows) if r["event"] is not None)
    happened = next(i for i in range(1, 14) if trained[i] < trained[i - 1]) - 1
    assert first_cut > happened

    table = run_cli("simulate", "--job", "resnet-a", "--policy", str(patient), "--admin", c.admin)
    assert table.returncode == 0, table.stderr
    head = table.stdout.splitlines()[1].split()
    assert head == ["epoch", "val_loss", "trained", "lr", "what-if", "lr", "what-if", "event"]

    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "what-if.png"
        drawn = run_cli(
            "simulate",
            "--job",
            "resnet-a",
            "--policy",
            str(patient),
            "--admin",
            c.admin,
            "--plot",
            str(png),
        )
        assert drawn.returncode == 0 and f"plot: {png}" in drawn.stdout, drawn.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    unknown = run_cli("simulate", "--job", "nope", "--policy", str(patient), "--admin", c.admin)
    assert unknown.returncode == 1 and "no job 'nope'" in unknown.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults:\n  policy: {type: plateau, factor: 1.5}\n")
    refused = run_cli("simulate", "--job", "resnet-a", "--policy", str(bad), "--admin", c.admin)
    assert refused.returncode == 2 and "bad.yaml:3:" in refused.stderr


def test_plot_without_matplotlib_fails_before_any_work(tmp_path: Path) -> None:
    csv_path = tmp_path / "h.csv"
    csv_path.write_text("epoch,val_loss\n" + "".join(f"{e},{_loss(e)}\n" for e in range(30)))
    import subprocess

    blocked = (
        "import sys; sys.modules['matplotlib'] = None; "  # as if matplotlib were not installed
        "from lrpilot.controller.cli import main; sys.exit(main())"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            blocked,
            "simulate",
            "--job",
            "j",
            "--metrics",
            str(csv_path),
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stdout == ""  # no table first: it fails fast
    assert "--plot needs matplotlib: pip install 'lrpilot[plot]'" in out.stderr
    assert not (tmp_path / "p.png").exists()
    out = subprocess.run(  # range-test --plot too, before asking any controller
        [
            sys.executable,
            "-c",
            blocked,
            "range-test",
            "j",
            "--plot",
            str(tmp_path / "r.png"),
            "--admin",
            "tcp://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert "--plot needs matplotlib" in out.stderr and "no answer" not in out.stderr


def test_the_plot_shows_the_first_epochs_lr_and_what_happened_beside_the_what_if() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrpilot.controller.policies import Event
    from lrpilot.controller.simulate import Row, _plot_timeline

    rows = [
        Row(0, 1.0, 0.1, None),
        Row(1, 0.9, 0.05, Event("plateau", 0.1, 0.05)),
        Row(2, 0.9, 0.05, None),
    ]
    fig, ax = plt.subplots()
    try:
        _plot_timeline(ax, rows, "val_loss", start_lr=0.1, actual=[(0, 0.1), (1, 0.1), (2, 0.1)])
        lines = {line.get_label(): line for a in fig.axes for line in a.get_lines()}
        what_if = lines["what-if lr"]
        assert list(what_if.get_xdata())[:2] == [0, 1]  # epoch 0 trains at the start LR
        assert list(what_if.get_ydata()) == [0.1, 0.1, 0.05, 0.05]
        assert list(lines["lr trained (what happened)"].get_ydata()) == [0.1, 0.1, 0.1]
    finally:
        plt.close(fig)


def test_a_resume_from_an_older_checkpoint_rewrites_the_curve_from_there(
    controller_factory: Factory,
) -> None:
    c = controller_factory(PLATEAU)
    _train(c, "resnet-a", 10)
    w = Wire(c.bind, "resnet-a")  # the trainer restarts from its epoch-6 checkpoint
    try:
        lr = w.hello(lr=0.1, start_epoch=6).lr
        resumed = run_cli("metrics", "resnet-a", "--csv", "--admin", c.admin).stdout
        assert [r["epoch"] for r in csv.DictReader(io.StringIO(resumed))] == list("012345")
        w.report(6, {"val_loss": 0.5, "acc": 0.9}, lr=lr)
    finally:
        w.close()
    rows = list(
        csv.DictReader(
            io.StringIO(run_cli("metrics", "resnet-a", "--csv", "--admin", c.admin).stdout)
        )
    )
    assert [int(r["epoch"]) for r in rows] == list(range(7))
    assert float(rows[6]["val_loss"]) == 0.5  # the redone epoch, not the abandoned one


def test_each_run_is_recorded_apart_and_the_last_ten_are_kept(
    controller_factory: Factory, tmp_path: Path
) -> None:
    from lrpilot.controller.admin import Admin

    c = controller_factory(PLATEAU)
    admin = Admin(c.admin)
    runs = []
    for n in range(12):  # a trainer started over 12 times: each hello at epoch 0 is a new run
        w = Wire(c.bind, "resnet-a")
        try:
            lr = w.hello(lr=0.1).lr
            for e in range(n % 3 + 1):
                lr = w.report(e, {"val_loss": float(n)}, lr=lr).lr
        finally:
            w.close()
        runs.append(admin.metrics("resnet-a")["run"])
    current = admin.metrics("resnet-a")
    assert current["run"] == runs[-1] and current["metrics"] == {"val_loss": [11.0] * 3}
    assert current["runs"] == runs[2:]  # the last ten runs
    older = run_cli("metrics", "resnet-a", "--run", str(runs[4]), "--csv", "--admin", c.admin)
    rows = list(csv.reader(io.StringIO(older.stdout)))
    assert rows[0] == ["epoch", "val_loss", "lr"] and [r[:2] for r in rows[1:]] == [
        ["0", "4.0"],
        ["1", "4.0"],
    ]
    assert float(rows[1][2]) == pytest.approx(0.1)
    gone = admin.metrics("resnet-a", run=runs[0])
    assert gone["run"] == runs[0] and gone["x"] == []


def test_a_multi_worker_job_records_the_metrics_the_policy_decided_on(
    controller_factory: Factory,
) -> None:
    from lrpilot.controller.admin import Admin

    c = controller_factory(PLATEAU)
    ranks = [Wire(c.bind, "ddp", rank=r, world=2) for r in range(2)]
    try:
        for w in ranks:
            w.hello(lr=0.1)
        for e in range(3):
            ranks[0].report(e, {"val_loss": 1.0 + e}, lr=0.1, wait=False)
            ranks[1].report(e, {"val_loss": 3.0 + e}, lr=0.1, wait=False)
            for w in ranks:
                w.recv()
    finally:
        for w in ranks:
            w.close()
    recorded = Admin(c.admin).metrics("ddp")
    assert recorded["x"] == [0, 1, 2]  # one point per decided epoch, not per rank
    assert recorded["metrics"]["val_loss"] == [2.0, 3.0, 4.0]  # the mean, as aggregate: mean
