"""The one LR bound every entry point uses: finite, in [1e-12, 10], also as float32."""

from __future__ import annotations

import math

import pytest

from lrpilot.client.vocabulary import (
    LR_MESSAGE,
    MAX_LR,
    MIN_LR,
    as_lr,
    clamp_lr,
    float32,
    lr_ok,
    lr_problem,
)


@pytest.mark.parametrize(
    "value", [MIN_LR, float32(MIN_LR), 1e-8, 0.1, 1, 9.999999, MAX_LR, float32(MAX_LR)]
)
def test_lrs_in_range_pass_as_they_are(value: float) -> None:
    assert lr_ok(value) and lr_problem(value) is None and as_lr(value) == float(value)


@pytest.mark.parametrize(
    "value",
    [0.0, -0.1, 1e-300, 5e-13, math.nextafter(MAX_LR, 11), 11, math.inf, -math.inf, math.nan],
)
def test_lrs_out_of_range_are_refused(value: float) -> None:
    # 1e-300 is 0.0 in float32: the hello of issue 15 that left a job at LR 0.
    assert not lr_ok(value) and lr_problem(value) == LR_MESSAGE and as_lr(value) is None


@pytest.mark.parametrize("value", [True, None, "0.1", [0.1]])
def test_what_is_not_a_number_is_refused(value: object) -> None:
    assert lr_problem(value) == "must be a finite number in [1e-12, 10]" and as_lr(value) is None


def test_clamp_gives_the_nearest_lr_in_range() -> None:
    assert [clamp_lr(x) for x in (0.0, -1.0, math.nan, 1e-300, 0.5, 12.0, math.inf)] == [
        MIN_LR,
        MIN_LR,
        MIN_LR,
        MIN_LR,
        0.5,
        MAX_LR,
        MAX_LR,
    ]
    assert all(lr_ok(float32(clamp_lr(x))) for x in (0.0, 1e-13, 1e-12, 11.0))
