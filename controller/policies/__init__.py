"""The policy engine: one module per policy type, all pure (no sockets, files, clocks, threads)."""

from __future__ import annotations

from .base import REASONS, Decision, Event, Policy, State, fingerprint, float32, parameters
from .constant import Constant
from .cosine import CosineDecay
from .cosine_restarts import CosineRestarts
from .cyclic import Cyclic
from .exponential import ExponentialDecay
from .formula import Formula, FormulaError, FormulaState
from .inverse_time import InverseTimeDecay
from .multistep import MultiStep
from .one_cycle import OneCycle
from .phases import Phase, Phases, PhasesState
from .piecewise import Piecewise
from .plateau import Plateau, PlateauState, resolve_mode
from .polynomial import PolynomialDecay
from .range_test import RangeTest, RangeTestState
from .schedule import Schedule, ScheduleState
from .step import StepDecay
from .warmup import Warmup

__all__ = [
    "POLICY_TYPES",
    "REASONS",
    "Constant",
    "CosineDecay",
    "CosineRestarts",
    "Cyclic",
    "Decision",
    "Event",
    "ExponentialDecay",
    "Formula",
    "FormulaError",
    "FormulaState",
    "InverseTimeDecay",
    "MultiStep",
    "OneCycle",
    "Phase",
    "Phases",
    "PhasesState",
    "Piecewise",
    "Plateau",
    "PlateauState",
    "Policy",
    "PolynomialDecay",
    "RangeTest",
    "RangeTestState",
    "Schedule",
    "ScheduleState",
    "State",
    "StepDecay",
    "Warmup",
    "fingerprint",
    "float32",
    "parameters",
    "resolve_mode",
]

#: Policy classes by their YAML `type`.
POLICY_TYPES: dict[str, type[Policy]] = {
    cls.type: cls
    for cls in (
        Plateau,
        StepDecay,
        MultiStep,
        ExponentialDecay,
        InverseTimeDecay,
        CosineDecay,
        Warmup,
        Constant,
        RangeTest,
        Formula,
        OneCycle,
        Cyclic,
        CosineRestarts,
        PolynomialDecay,
        Piecewise,
    )
}
