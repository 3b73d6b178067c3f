"""`lrpilot simulate`: a user's CSV history through the daemon's engine, as table, JSON and plot."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
PLATEAU = (
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 2, min_delta: 0.0}\n"
)


def test_table_shows_reductions_with_wait_and_patience(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", PLATEAU)
    csv = write("h.csv", "epoch,loss,val_loss\n0,1,0.9\n1,1,0.7\n2,1,0.71\n3,1,0.72\n4,1,0.73\n")
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "reduce 0.001 -> 0.0005 (plateau, wait 2/2)" in lines[5]
    assert lines[5].split()[0] == "3"


def test_json_matches_keras_on_a_random_history(write: Callable[[str, str], Path]) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(7)
    values = [1.0]
    for _ in range(59):
        values.append(values[-1] * rng.choice([0.97, 1.0, 1.001, 1.01]))
    csv = "epoch,val_loss\n" + "".join(f"{e},{v!r}\n" for e, v in enumerate(values))
    policy = write(
        "p.yaml", "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 2}\n"
    )
    path = write("h.csv", csv)
    result = run_cli(
        "simulate",
        "--policy",
        str(policy),
        "--job",
        "j",
        "--metrics",
        str(path),
        "--initial-lr",
        "0.01",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    cb = keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2)
    cb.set_model(model)
    cb.on_train_begin()
    expected = []
    for e, v in enumerate(values):
        cb.on_epoch_end(e, {"val_loss": v})
        expected.append(float(model.optimizer.learning_rate.numpy()))
    assert [r["lr"] for r in rows] == expected
    assert sum(r["event"] is not None for r in rows) >= 2
    assert set(rows[0]) == {"epoch", "value", "lr", "event"}
    event = next(r["event"] for r in rows if r["event"])
    assert set(event) == {"kind", "old", "new", "wait", "patience"} and event["kind"] == "plateau"


def test_non_finite_values_are_null_in_json(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", PLATEAU)
    csv = write("h.csv", "epoch,val_loss\n0,1.0\n1,nan\n2,inf\n")
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    rows = json.loads(result.stdout)
    assert [r["value"] for r in rows] == [1.0, None, None]
    assert rows[2]["event"]["kind"] == "plateau"  # NaN and inf are no improvement


def test_initial_lr_falls_back_to_the_csv_learning_rate_column(
    write: Callable[[str, str], Path],
) -> None:
    policy = write(
        "p.yaml", "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 1}\n"
    )
    csv = write("h.csv", "epoch,learning_rate,val_loss\n0,0.25,1\n1,0.125,1\n")
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert [r["lr"] for r in json.loads(result.stdout)] == [0.125, 0.0625]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (
            "epoch,val_loss\n0,1.0\n1,abc\n",
            "h.csv:3: column 'val_loss': expected a number, got 'abc'",
        ),
        ("val_loss\n1.0\n", "h.csv:1: no epoch column"),
        ("epoch,val_loss\n0,1.0\n1\n", "h.csv:3: expected 2 columns, got 1"),
        ("epoch,val_loss\n0,1.0\n0,1.0\n", "h.csv:3: epochs must increase"),
        ("epoch,val_loss\n-1,1.0\n", "h.csv:2: column 'epoch': expected an integer >= 0"),
        ("", "h.csv:1: empty file"),
    ],
)
def test_bad_csv_names_file_line_and_column(
    write: Callable[[str, str], Path], csv: str, message: str
) -> None:
    policy = write("p.yaml", PLATEAU)
    path = write("h.csv", csv)
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(path))
    assert result.returncode == 2
    assert message in result.stderr.replace(str(path.parent) + "/", "")


def test_bad_policy_exits_2(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", "version: 1\ndefaults:\n  policy: {type: plateau, factor: 3}\n")
    csv = write("h.csv", "epoch,val_loss\n0,1\n")
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv))
    assert result.returncode == 2 and "p.yaml:3: factor" in result.stderr


def test_plot_writes_a_png(write: Callable[[str, str], Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "lr.png"
    result = run_cli(
        "simulate",
        "--policy",
        str(ROOT / "policies" / "warmup-plateau.yaml"),
        "--job",
        "x",
        "--metrics",
        str(ROOT / "policies" / "history-example.csv"),
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_warmup_plateau_example_is_what_the_readme_says() -> None:
    result = run_cli(
        "simulate",
        "--policy",
        str(ROOT / "policies" / "warmup-plateau.yaml"),
        "--job",
        "x",
        "--metrics",
        str(ROOT / "policies" / "history-example.csv"),
        "--json",
    )
    rows = json.loads(result.stdout)
    assert math.isclose(rows[4]["lr"], 1e-3, rel_tol=1e-6) and rows[4]["event"]["kind"] == "phase"
    assert [r["epoch"] for r in rows if r["event"] and r["event"]["kind"] == "plateau"] == [11, 17]


# -- the LR range test -----------------------------------------------------------------------

RANGE_TEST = "version: 1\ndefaults:\n  policy: {type: range_test, unit: epoch}\n"


def _seed_history(n: int = 120) -> str:
    """A loss recorded under the seeds' sweep: falling, then blowing up past 1e-4."""
    rows = []
    for e in range(n):
        lr = 1e-8 * 10 ** (e / 20)
        x = math.log10(lr)
        loss = (
            0.5 + 2.0 / (1 + math.exp(2.0 * (x + 5.5))) + (math.exp(3 * (x + 4)) if x > -5 else 0)
        )
        rows.append(f"{e},{loss!r}\n")
    return "epoch,loss\n" + "".join(rows)


def test_a_range_test_replays_a_loss_column_and_keeps_the_json_shape(
    write: Callable[[str, str], Path],
) -> None:
    policy = write("p.yaml", RANGE_TEST)
    csv = write("h.csv", _seed_history())
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(set(r) == {"epoch", "value", "lr", "event"} for r in rows)
    sweep = [r["lr"] for r in rows]
    stop = next(i for i in range(1, len(rows)) if rows[i]["lr"] < rows[i - 1]["lr"])
    assert sweep[:stop] == [1e-8 * 10 ** ((e + 1) / 20) for e in range(stop)]
    event = rows[stop]["event"]
    assert set(event) == {"kind", "old", "new", "wait", "patience"}
    assert event["kind"] == "range_test" and event["new"] == rows[stop]["lr"]
    assert all(r["lr"] == rows[stop]["lr"] and r["event"] is None for r in rows[stop + 1 :])
    # The curve's summary goes to stderr: stdout stays the documented list.
    assert "range test: stopped by divergence" in result.stderr
    assert f"valley   {rows[stop]['lr']:.3g}  <- suggested" in result.stderr


def test_a_range_test_table_shows_the_snapshot_restore_and_suggestions(
    write: Callable[[str, str], Path],
) -> None:
    policy = write("p.yaml", RANGE_TEST.replace("unit: epoch}", "unit: epoch, suggest: minimum}"))
    csv = write("h.csv", _seed_history())
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "start: lr 1e-08; snapshot the weights (a range test starts)" in out
    assert "(range_test); restore the weights from before the range test" in out
    assert "minimum" in out and "<- suggested" in out.split("minimum")[-1]


def test_a_per_step_history_may_repeat_epochs(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", "version: 1\ndefaults:\n  policy: {type: range_test}\n")
    lines = "".join(f"{s // 50},{s},{2.0 - 0.001 * s}\n" for s in range(200))
    csv = write("h.csv", "epoch,step,loss\n" + lines)
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["lr"] == 10 ** (1 / 20) * 1e-8 and rows[60]["epoch"] == 1
    bad = write("bad.csv", "epoch,step,loss\n0,0,1\n0,0,1\n")
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(bad))
    assert result.returncode == 2 and "bad.csv:3: steps must increase" in result.stderr


def test_keras_csvlogger_na_cells_are_missing(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", RANGE_TEST)
    csv = write("h.csv", "epoch,learning_rate,loss,val_loss\n0,1e-08,2.0,NA\n1,1.1e-08,1.9,NA\n")
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert [r["value"] for r in json.loads(result.stdout)] == [2.0, 1.9]


def test_range_test_plot_is_loss_against_lr(
    write: Callable[[str, str], Path], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    policy = write(
        "p.yaml",
        "version: 1\ndefaults:\n  phases:\n    - {type: range_test, unit: epoch}\n"
        "    - {type: plateau, lr: suggested, monitor: loss}\n",
    )
    csv = write("h.csv", _seed_history())
    png = tmp_path / "rt.png"
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--plot", str(png)
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_range_test_plot_marks_the_three_suggestions(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrpilot.controller.policies import RangeTest
    from lrpilot.controller.simulate import _plot_range_test, plot_range_test

    policy = RangeTest(unit="epoch")
    state = policy.start(1e-3, 0)
    for line in _seed_history().splitlines()[1:]:
        epoch, loss = line.split(",")
        state, d = policy.step(state, int(epoch), {"loss": float(loss)}, {})
        if d.action == "restore":
            break
    report = policy.range_test_report(state)
    assert report is not None
    fig, ax = plt.subplots()
    _plot_range_test(ax, report)
    assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("learning rate")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for name in ("valley", "steep", "minimum"):
        assert any(label.startswith(f"{name}: ") for label in labels), labels
    assert any("(suggested)" in label and label.startswith("valley") for label in labels)
    plt.close(fig)
    png = tmp_path / "report.png"  # what `lrpilot range-test JOB --plot` can draw
    plot_range_test(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_range_test_plot_marks_suggestions_on_the_reported_losses(tmp_path: Path) -> None:
    """A loss that falls three decades within 30 points: the smoothed loss (an EMA with ~50
    points of memory) lags far above it. The markers sit on the reported curve, the axes
    show it, and the stop's label is clear of the x axis and of the legend."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrpilot.controller.policies import RangeTest
    from lrpilot.controller.simulate import _plot_range_test

    policy = RangeTest(start_lr=1e-6, suggest="minimum")
    state = policy.start(1e-3, 0)
    for t in range(400):
        lr = state.lr
        loss = 10 / (1 + (lr / 1e-3) ** 3) + 0.01 if lr < 2 else 1e4 * lr
        state, d = policy.step(state, t, {"loss": loss}, {})
        if d.action == "restore":
            break
    report = policy.range_test_report(state)
    assert report is not None and report["stop_reason"] == "divergence"
    lrs = [p[0] for p in report["points"]]
    raw = [p[1] for p in report["points"]]
    smooth = [p[2] for p in report["points"]]
    assert max(s / r for s, r in zip(smooth, raw, strict=True)) > 100  # the lag is real
    fig, ax = plt.subplots(figsize=(9, 5.5))
    try:
        _plot_range_test(ax, report)
        fig.tight_layout()
        markers = [
            line
            for line in ax.get_lines()
            if line.get_marker() == "o" and len(line.get_xdata()) == 1
        ]
        assert len(markers) == 3
        for m in markers:
            x, y = float(m.get_xdata()[0]), float(m.get_ydata()[0])
            i = max(k for k, lr in enumerate(lrs) if lr <= x)  # its neighbours on the curve
            assert min(raw[i], raw[i + 1]) <= y * (1 + 1e-9) and y <= max(raw[i], raw[i + 1]) * (
                1 + 1e-9
            ), (x, y)
        low, high = ax.get_ylim()
        assert low <= min(raw) and high < 1e3  # the reported losses fill the axes
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        (stop,) = [t for t in ax.texts if t.get_text() == "stop: divergence"]
        box = stop.get_window_extent(renderer)
        frame = ax.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 < box.y0 <= box.y1 <= frame.y1
        ticks = ax.xaxis.get_tightbbox(renderer)
        assert ticks is not None and box.y0 > ticks.y1  # clear of the x axis and its labels
        legend = ax.get_legend().get_window_extent(renderer)
        assert not box.overlaps(legend)
    finally:
        plt.close(fig)
