"""Plans against a real controller: the trainer evaluates the schedule itself.

A client of this version says `plans: true`; the controller answers with the schedule as a
function (`lr.plan`) and audits and logs it once; the torch scheduler then sets the plan's
LR at every step with no message, and goes on exactly when the controller is SIGKILLed.
A peer without `plans` still gets one `lr` per report, as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from conftest import Clock, Controller, Wire, wait_for

from lrpilot.client import plans

Factory = Callable[..., Controller]

EXPONENTIAL = """\
version: 1
defaults:
  policy: {type: exponential, unit: step, decay_rate: 0.99, decay_steps: 1}
"""

RANGE_TEST = """\
version: 1
defaults:
  policy: {type: range_test, start_lr: 1.0e-5}
"""

WARMUP_COSINE = """\
version: 1
defaults:
  phases:
    - {type: warmup, unit: step, to_lr: 0.1, epochs: 100, from_lr: 0.001}
    - {type: cosine, unit: step, decay_steps: 4900}
"""


def lr_lines(c: Controller, job: str) -> list[str]:
    return [line for line in c.log().splitlines() if f"job {job}: lr " in line]


def test_a_plan_goes_on_exactly_while_the_controller_is_down(controller_factory: Factory) -> None:
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    c = controller_factory(EXPONENTIAL)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LRPilotScheduler(
        opt, job="plan-kill", endpoint=c.bind, unit="step", report_every=10, timeout=1.0
    )
    x = torch.randn(16, 4)
    used = []
    try:
        for t in range(300):
            used.append(opt.param_groups[0]["lr"])
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step(loss.item())
            if t == 119:
                client = sched.client
                assert client.plan is not None and client.plan["kind"] == "exponential"
                assert client.flush(10)  # the controller decided on the 12 reports so far
                assert client.stats["replies"] >= 13  # the hello's answer and the reports'
                # One audit row and one log line for the plan, not one per decision.
                assert len(lr_lines(c, "plan-kill")) == 1, c.log()
                c.kill()
    finally:
        sched.close()
    expected = [0.1 * float(0.99**t) for t in range(300)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[150:] != [used[120]] * 150  # not frozen at its last value


def test_a_phase_chain_of_5000_steps_is_audited_once_per_phase(
    controller_factory: Factory,
) -> None:
    c = controller_factory(WARMUP_COSINE)
    peer = Wire(c.bind, "plan-phases")
    try:
        first = peer.hello(lr=0.001, plans=True)
        assert first.plan is not None and first.plan["kind"] == "warmup"
        assert first.plan["from"] == 0 and first.plan["until"] == 100
        plan = first.plan
        seen = []
        for t in range(49, 5000, 50):  # a report every 50 steps, as report_every=50
            answer = peer.report(0, {"loss": 1.0}, lr=plans.lr_at(plan, t), step=t)
            assert answer.plan is not None
            plan = answer.plan
            seen.append(plan["kind"])
            assert plans.lr_at(plan, t + 1) == answer.lr  # the plan gives the decision's LR
        assert seen[0] == "warmup" and seen[-1] == "cosine" and set(seen) == {"warmup", "cosine"}
        lines = lr_lines(c, "plan-phases")
        assert len(lines) == 2, lines  # the warmup's plan at hello, the cosine's at the phase
        assert "(initial," in lines[0] and "(phase," in lines[1]
    finally:
        peer.close()


def test_a_peer_without_plans_gets_one_lr_per_report(controller_factory: Factory) -> None:
    c = controller_factory(EXPONENTIAL)
    peer = Wire(c.bind, "plan-old")
    try:
        first = peer.hello(lr=0.1)
        assert first.plan is None and first.lr == 0.1
        for t in range(40):
            answer = peer.report(0, {"loss": 1.0}, lr=0.1 * float(0.99**t), step=t)
            assert answer.plan is None
            assert answer.apply_from_step == t + 1
            assert answer.lr == pytest.approx(0.1 * float(0.99 ** (t + 1)), rel=1e-15)
    finally:
        peer.close()


ONE_CYCLE = """\
version: 1
defaults:
  policy: {type: one_cycle, unit: step, max_lr: 0.1, total_steps: 120, pct_start: 0.25,
           cycle_momentum: true, base_momentum: 0.8, max_momentum: 0.95}
"""


@pytest.mark.parametrize("adam", [False, True])
def test_cycle_momentum_equals_torch_one_cycle_lr(controller_factory: Factory, adam: bool) -> None:
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    c = controller_factory(ONE_CYCLE)

    def optimizer() -> torch.optim.Optimizer:
        params = [torch.zeros(3, requires_grad=True)]
        if adam:
            return torch.optim.Adam(params, lr=0.004, betas=(0.9, 0.99))
        return torch.optim.SGD(params, lr=0.004, momentum=0.9)

    ours, ref_opt = optimizer(), optimizer()
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, 0.1, total_steps=120, pct_start=0.25, base_momentum=0.8, max_momentum=0.95
    )
    sched = LRPilotScheduler(ours, job=f"plan-momentum-{adam}", endpoint=c.bind, unit="step")
    key = "betas" if adam else "momentum"

    def state(opt: torch.optim.Optimizer) -> tuple[float, float]:
        group = opt.param_groups[0]
        return group["lr"], group["betas"][0] if adam else group["momentum"]

    try:
        assert sched.client.plan is not None  # the hello's answer: the plan, from step 0
        got, want = [], []
        for _ in range(120):
            got.append(state(ours))
            want.append(state(ref_opt))
            ours.step()
            ref_opt.step()
            sched.step()
            ref.step()
        if adam:
            assert ours.param_groups[0]["betas"][1] == 0.99  # only beta1 cycles
    finally:
        sched.close()
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-12)
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-12), key
    assert len({g[1] for g in got}) > 50  # it did cycle


@pytest.mark.parametrize(("policy", "every"), [(EXPONENTIAL, 0.1), (RANGE_TEST, 0.01)])
def test_with_a_schedules_plan_reports_go_out_every_100_ms_else_every_10(
    controller_factory: Factory, policy: str, every: float
) -> None:
    """A loop reporting every millisecond (on the client's clock) with `wait=False`: while a
    schedule runs as a plan its reports go out in bursts 100 ms apart (no LR waits for an
    answer, and each burst costs the trainer a wake of libzmq's thread); during a range
    test's sweep, whose end the trainer must hear of soon, 10 ms apart."""
    from lrpilot.client import Client

    c = controller_factory(policy)
    clock = Clock()
    client = Client(
        c.bind, "cadence", initial_lr=0.1, clock=clock,
        snapshot_fn=lambda: None, restore_fn=lambda: None,
    )  # fmt: skip
    try:
        # The hello's answer (the controller's own time): the plan in force.
        wait_for(lambda: client.poll(step=0) > 0 and client.plan is not None, "the plan")
        bursts: list[int] = []  # the step of each report that went out with a burst
        for step in range(300):
            sent = client.stats["sent"]
            client.report(0, {"loss": 1.0}, step=step, wait=False)
            if client.stats["sent"] > sent:
                bursts.append(step)
            clock.t += 0.001
        gaps = {b - a for a, b in itertools.pairwise(bursts)}
        expected = round(every * 1000)  # steps of 1 ms (the clock's sum may round one over)
        assert len(bursts) > 2 and gaps <= {expected, expected + 1}, bursts
        assert client.flush(timeout=10)
    finally:
        client.close()
