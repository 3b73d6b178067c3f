"""one_cycle, cyclic, cosine_restarts, polynomial, piecewise equal torch's and Keras' own classes.

Each test draws its parameters from a seeded generator and compares every step of the engine
(the LR the daemon would hand out: hello, then one decision per report) with the framework's
class stepped the same number of times, in the same test.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from lrpilot.controller.errors import PolicyError
from lrpilot.controller.policies import (
    CosineRestarts,
    Cyclic,
    OneCycle,
    Phase,
    Phases,
    Piecewise,
    Policy,
    PolynomialDecay,
)
from lrpilot.controller.policyfile import load_text

F32 = 2e-6  # Keras computes schedules in float32


def engine_lrs(policy: Policy, lr0: float, n: int) -> list[float]:
    state = policy.start(lr0, 0)
    out = [state.lr]
    for t in range(n - 1):
        state, decision = policy.step(state, t, {}, {})
        out.append(decision.lr)
    return out


def torch_run(
    make: Callable[[Any], Any], lr0: float, n: int, *, adam: bool = False
) -> tuple[list[float], list[float]]:
    """LR and momentum (SGD momentum or Adam beta1) of torch's scheduler over `n` steps."""
    torch = pytest.importorskip("torch")
    p = [torch.zeros(1, requires_grad=True)]
    opt = torch.optim.Adam(p, lr=lr0) if adam else torch.optim.SGD(p, lr=lr0, momentum=0.9)
    sched = make(opt)
    lrs, moms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            group = opt.param_groups[0]
            lrs.append(group["lr"])
            moms.append(group["betas"][0] if adam else group["momentum"])
            opt.step()
            sched.step()
    return lrs, moms


@pytest.mark.parametrize("seed", range(24))
def test_one_cycle_equals_torch_one_cycle_lr(seed: int) -> None:
    torch = pytest.importorskip("torch")
    rng = random.Random(seed)
    total = rng.randint(20, 400)
    three = seed % 2 == 1
    pct = rng.uniform(0.05, 0.45 if three else 0.9)
    kw = dict(
        max_lr=rng.choice([0.1, 0.01, 3e-4, 1.0]),
        total_steps=total,
        pct_start=pct,
        anneal=rng.choice(["cos", "linear"]),
        div_factor=rng.choice([25.0, 10.0, 4.0]),
        final_div_factor=rng.choice([1e4, 100.0]),
        three_phase=three,
        cycle_momentum=seed % 4 < 2,
        base_momentum=0.85,
        max_momentum=0.95,
    )
    policy = OneCycle(**kw)  # type: ignore[arg-type]
    if policy.problems():
        pytest.skip(f"parameters torch would divide by zero on: {policy.problems()}")
    adam = seed % 3 == 0

    def make(opt: Any) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=kw["max_lr"],
            total_steps=total,
            pct_start=pct,
            anneal_strategy=kw["anneal"],
            div_factor=kw["div_factor"],
            final_div_factor=kw["final_div_factor"],
            three_phase=three,
            cycle_momentum=kw["cycle_momentum"],
            base_momentum=0.85,
            max_momentum=0.95,
        )

    lrs, moms = torch_run(make, 0.5, total, adam=adam)
    got = engine_lrs(policy, 0.5, total + 30)
    assert got[:total] == pytest.approx(lrs, rel=1e-12)
    assert got[total:] == [got[total - 1]] * 30  # holds its last LR (torch raises)
    if kw["cycle_momentum"]:
        assert [policy.momentum(0.5, t) for t in range(total)] == pytest.approx(moms, rel=1e-12)
    else:
        assert policy.momentum(0.5, 3) is None


def test_one_cycle_max_lr_defaults_to_lr0_so_a_suggestion_is_its_peak() -> None:
    chain = Phases(phases=(Phase(OneCycle(total_steps=100), lr="suggested"),))
    lrs = engine_lrs(chain, 0.02, 100)
    assert max(lrs) == pytest.approx(0.02) and lrs[0] == pytest.approx(0.02 / 25)


@pytest.mark.parametrize("seed", range(24))
def test_cyclic_equals_torch_cyclic_lr(seed: int) -> None:
    torch = pytest.importorskip("torch")
    rng = random.Random(seed)
    mode = ["triangular", "triangular2", "exp_range"][seed % 3]
    base, peak = rng.choice([(1e-4, 1e-2), (0.001, 0.1), (0.05, 0.06)])
    up = rng.randint(1, 40)
    down = rng.choice([None, rng.randint(1, 40)])
    gamma = rng.uniform(0.95, 1.0)
    cycle_momentum = seed % 2 == 0
    policy = Cyclic(
        base_lr=base,
        max_lr=peak,
        step_size_up=up,
        step_size_down=down,
        mode=mode,
        gamma=gamma,
        cycle_momentum=cycle_momentum,
    )

    def make(opt: Any) -> Any:
        return torch.optim.lr_scheduler.CyclicLR(
            opt,
            base,
            peak,
            step_size_up=up,
            step_size_down=down,
            mode=mode,
            gamma=gamma,
            cycle_momentum=cycle_momentum,
        )

    n = 300
    lrs, moms = torch_run(make, 0.5, n)
    assert engine_lrs(policy, 0.5, n) == pytest.approx(lrs, rel=1e-12)
    if cycle_momentum:
        assert [policy.momentum(0.5, t) for t in range(n)] == pytest.approx(moms, rel=1e-12)


@pytest.mark.parametrize("seed", range(16))
def test_cosine_restarts_equals_keras_and_torch(seed: int) -> None:
    keras = pytest.importorskip("keras")
    torch = pytest.importorskip("torch")
    rng = random.Random(seed)
    first = rng.randint(1, 30)
    t_mul = rng.choice([1.0, 2.0, 3.0, 1.5])
    m_mul = rng.choice([1.0, 1.0, 0.5, 0.9])
    alpha = rng.choice([0.0, 0.1, 0.3])
    lr0 = rng.choice([0.1, 0.01])
    n = 250
    policy = CosineRestarts(first_decay_steps=first, t_mul=t_mul, m_mul=m_mul, alpha=alpha)
    got = engine_lrs(policy, lr0, n)
    ref = keras.optimizers.schedules.CosineDecayRestarts(lr0, first, t_mul, m_mul, alpha)
    for t in range(n):
        assert got[t] == pytest.approx(float(ref(t)), rel=1e-5, abs=1e-6 * lr0), t
    if m_mul == 1.0 and t_mul.is_integer():
        lrs, _ = torch_run(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                o, first, int(t_mul), eta_min=alpha * lr0
            ),
            lr0,
            n,
        )
        assert got == pytest.approx(lrs, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(16))
def test_polynomial_equals_keras_polynomial_decay(seed: int) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(seed)
    steps, power, end = rng.randint(1, 60), rng.choice([1.0, 0.5, 2.0, 3.0]), 1e-4
    cycle = seed % 2 == 1
    lr0 = rng.choice([0.1, 0.01])
    policy = PolynomialDecay(decay_steps=steps, end_lr=end, power=power, cycle=cycle)
    ref = keras.optimizers.schedules.PolynomialDecay(lr0, steps, end, power=power, cycle=cycle)
    got = engine_lrs(policy, lr0, 200)
    for t in range(200):
        assert got[t] == pytest.approx(float(ref(t)), rel=F32, abs=1e-7), t


def test_polynomial_equals_torch_polynomial_lr_with_end_lr_zero() -> None:
    torch = pytest.importorskip("torch")
    for steps, power in [(10, 1.0), (37, 2.0), (50, 0.5)]:
        lrs, _ = torch_run(
            lambda o, s=steps, p=power: torch.optim.lr_scheduler.PolynomialLR(o, s, p), 0.1, steps
        )
        got = engine_lrs(PolynomialDecay(decay_steps=steps, end_lr=0.0, power=power), 0.1, steps)
        assert got == pytest.approx(lrs, rel=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_piecewise_equals_keras_piecewise_constant_decay(seed: int) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(seed)
    bounds = sorted(rng.sample(range(0, 150), rng.randint(1, 6)))
    values = [rng.choice([0.1, 0.05, 0.01, 1e-3, 3e-4]) for _ in range(len(bounds) + 1)]
    ref = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    got = engine_lrs(Piecewise(boundaries=bounds, values=values), 0.7, 200)
    for t in range(200):
        assert got[t] == pytest.approx(float(ref(t)), rel=F32), t


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("{type: one_cycle, total_steps: 10, pct_start: 1.5}", "pct_start must be in (0, 1)"),
        ("{type: one_cycle, total_steps: 10, pct_start: 0.05}", "pct_start * total_steps"),
        (
            "{type: one_cycle, total_steps: 10, pct_start: 0.6, three_phase: true}",
            "three_phase needs",
        ),
        ("{type: cyclic, base_lr: 0.1, max_lr: 0.01}", "max_lr must be >= base_lr"),
        ("{type: cyclic, max_lr: 0.01}", "cyclic needs base_lr"),
        ("{type: cyclic, base_lr: 0.001, max_lr: 0.01, mode: sine}", "mode must be one of"),
        ("{type: cosine_restarts, first_decay_steps: 0}", "first_decay_steps must be >= 1"),
        ("{type: cosine_restarts, first_decay_steps: 5, t_mul: 0.5}", "t_mul must be >= 1"),
        ("{type: polynomial, decay_steps: 10, power: 0}", "power must be > 0"),
        ("{type: piecewise, boundaries: [10, 5], values: [0.1, 0.01, 0.001]}", "increasing"),
        ("{type: piecewise, boundaries: [10, 20], values: [0.1, 0.01]}", "values needs 3"),
        ("{type: piecewise, boundaries: [10], values: [0.1, oops]}", "a list of numbers"),
    ],
)
def test_check_reports_each_mistake_with_its_line(policy: str, message: str) -> None:
    text = f"version: 1\ndefaults:\n  policy: {policy}\n"
    with pytest.raises(PolicyError) as err:
        load_text(text, "p.yaml")
    assert "p.yaml:3:" in str(err.value) and message in str(err.value), str(err.value)


def test_find_lr_then_one_cycle_example_end_to_end(tmp_path: Any) -> None:
    """The example policy through `lrpilot simulate`: a sweep, then one cycle up to its pick."""
    import json
    from pathlib import Path

    from conftest import run_cli

    example = Path(__file__).resolve().parent.parent / "policies" / "find-lr-then-one-cycle.yaml"
    assert run_cli("check", str(example)).returncode == 0
    # A loss that falls until step 100 (LR 1e-3 in the sweep), then explodes: a clear valley.
    rows = ["epoch,step,loss"] + [
        f"0,{t},{2.0 - t / 100 if t < 100 else 1.0 * 3 ** (t - 100)}" for t in range(112)
    ]
    rows += [f"0,{t},0.5" for t in range(112, 2200)]
    csv = tmp_path / "history.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = run_cli(
        "simulate", "--policy", str(example), "--job", "demo", "--metrics", str(csv), "--json"
    )
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    sweep = [i for i, r in enumerate(table) if r["event"] and r["event"]["kind"] == "range_test"]
    end = sweep[-1]  # the sweep's last decision restores the weights and starts the cycle
    assert table[end]["event"]["new"] < table[end]["event"]["old"]
    assert all(r["event"] is None or r["event"]["kind"] == "schedule" for r in table[end + 1 :])
    cycle = [r["lr"] for r in table[end : end + 2000]]
    peak = max(cycle)
    assert 1e-6 < peak < 1e-3  # the suggestion: below the LR where the loss blew up
    assert cycle[0] == pytest.approx(peak / 25)
    assert cycle.index(peak) == 599  # pct_start * total_steps - 1
    assert cycle[-1] == pytest.approx(peak / 25 / 1e4, rel=1e-6)


_AS_PHASES = {
    "one_cycle": "{type: one_cycle, total_steps: 12, pct_start: 0.3, cycle_momentum: true,"
    " unit: epoch}",
    "cyclic": "{type: cyclic, base_lr: 0.01, max_lr: 0.1, step_size_up: 4, mode: triangular2,"
    " unit: epoch}",
    "cosine_restarts": "{type: cosine_restarts, first_decay_steps: 4, t_mul: 2.0, m_mul: 0.9,"
    " alpha: 0.01, unit: epoch}",
    "polynomial": "{type: polynomial, decay_steps: 10, end_lr: 0.001, power: 2.0, unit: epoch}",
    "piecewise": "{type: piecewise, boundaries: [4, 9], values: [0.05, 0.02, 0.005], unit: epoch}",
}


def _simulated(tmp_path: Any, name: str, policy: str, csv: Any, *extra: str) -> list[dict]:  # type: ignore[type-arg]
    import json

    from conftest import run_cli

    path = tmp_path / name
    path.write_text(policy)
    assert run_cli("check", str(path)).returncode == 0, run_cli("check", str(path)).stdout
    out = run_cli("simulate", "--policy", str(path), "--job", "j", "--metrics", str(csv), *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if "--json" in extra else []


@pytest.mark.parametrize("kind", sorted(_AS_PHASES))
def test_each_new_type_runs_per_epoch_as_a_phase_after_a_warmup(kind: str, tmp_path: Any) -> None:
    """A phase of `unit: epoch` after a 3-epoch warmup trains, from epoch 3 on, exactly what the
    same policy alone trains from epoch 0 (starting from the LR the warmup left), and
    `simulate --plot` draws it, with a momentum axis where the policy cycles momentum."""
    from matplotlib import image

    csv = tmp_path / "m.csv"
    csv.write_text("epoch,val_loss\n" + "".join(f"{e},{1.0 / (e + 1)}\n" for e in range(24)))
    spec = _AS_PHASES[kind]
    chain = _simulated(
        tmp_path,
        "chain.yaml",
        "version: 1\ndefaults:\n  phases:\n"
        f"    - {{type: warmup, from_lr: 1.0e-3, to_lr: 0.1, epochs: 3}}\n    - {spec}\n",
        csv,
        "--json",
    )
    alone = _simulated(
        tmp_path,
        "alone.yaml",
        f"version: 1\ndefaults:\n  initial_lr: 0.1\n  policy: {spec}\n",
        csv,
        "--json",
    )
    # Row e holds the LR in force from epoch e + 1: the chain's phase starts at epoch 3.
    start = alone[0]["event"]["old"] if alone[0]["event"] else alone[0]["lr"]
    trained_alone = [start] + [r["lr"] for r in alone]
    trained_chain = [r["lr"] for r in chain[2:]]
    assert trained_chain == pytest.approx(trained_alone[: len(trained_chain)], rel=1e-12)
    assert len(set(trained_chain)) > 2  # the schedule moved within the run
    assert ("momentum" in chain[5]) == ("cycle_momentum" in spec)

    png = tmp_path / f"{kind}.png"
    _simulated(
        tmp_path, "plot.yaml", (tmp_path / "chain.yaml").read_text(), csv, "--plot", str(png)
    )
    pixels = image.imread(str(png))[..., :3]
    green = ((abs(pixels - [0.173, 0.627, 0.173]) < 0.05).all(axis=-1)).sum()  # tab:green
    assert (green > 50) == ("cycle_momentum" in spec), green
