"""The shared argument checks in splitkv/_checks.py: what each accepts, what it
refuses, and that every refusal names the argument."""

import fractions
import math

import numpy as np
import pytest
import torch

from splitkv._checks import expect_bool, expect_count, expect_scale


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_expect_bool_accepts_bools(value):
    result = expect_bool("causal", value)
    assert type(result) is bool and result == bool(value)


@pytest.mark.parametrize("value", ["False", "True", "", 0, 1, 1.0, None, torch.tensor(True), [True]])
def test_expect_bool_refuses_everything_else(value):
    with pytest.raises(TypeError, match=r"^causal must be a bool"):
        expect_bool("causal", value)


@pytest.mark.parametrize(
    "value, expected",
    [(0.125, 0.125), (2, 2.0), (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.float16(1.5), 1.5),
     (np.int64(3), 3.0), (fractions.Fraction(1, 8), 0.125), (1e-30, 1e-30)],
)  # fmt: skip
def test_expect_scale_accepts_finite_positive_reals(value, expected):
    result = expect_scale("softmax_scale", value)
    assert type(result) is float and result == expected


def test_expect_scale_passes_none_through():
    assert expect_scale("softmax_scale", None) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -0.0, -0.5, np.float32("nan"),
                                   np.float64(-1.0)])  # fmt: skip
def test_expect_scale_refuses_non_finite_and_non_positive(value):
    with pytest.raises(ValueError, match=r"^softmax_scale must be a finite positive float"):
        expect_scale("softmax_scale", value)


@pytest.mark.parametrize("value", ["0.1", True, False, np.True_, 1j, torch.tensor(0.5), [0.5]])
def test_expect_scale_refuses_non_reals(value):
    with pytest.raises(TypeError, match=r"^softmax_scale must be a positive float or None"):
        expect_scale("softmax_scale", value)


@pytest.mark.parametrize("value, minimum", [(0, 0), (5, 0), (1, 1), (np.int32(7), 1), (np.int64(2**40), 0)])
def test_expect_count_accepts_ints_at_or_above_minimum(value, minimum):
    result = expect_count("num_splits", value, minimum)
    assert type(result) is int and result == int(value)


def test_expect_count_minimum_defaults_to_zero():
    assert expect_count("num_splits", 0) == 0
    with pytest.raises(ValueError, match=r"^num_splits must be an int >= 0, got -1$"):
        expect_count("num_splits", -1)


@pytest.mark.parametrize("value, minimum", [(-1, 0), (0, 1), (np.int64(-3), 0), (4, 5)])
def test_expect_count_refuses_values_below_minimum(value, minimum):
    with pytest.raises(ValueError, match=rf"^num_splits must be an int >= {minimum}, got {int(value)}$"):
        expect_count("num_splits", value, minimum)


@pytest.mark.parametrize("value", [True, False, np.True_, 2.0, 2.5, math.inf, "3", None, torch.tensor(3)])
def test_expect_count_refuses_non_ints(value):
    with pytest.raises(TypeError, match=r"^num_splits must be an int"):
        expect_count("num_splits", value, 0)
