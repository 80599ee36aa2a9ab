"""Tests of noisynn/entropy.py: the closed forms of ΔS (docs/paper.md §3) against the explicit matrices.

Every closed form must agree with ΔS = -log|det(I + Q)| computed by slogdet from the quality
matrix that the noise operators themselves use, over the range of k a user meets (2…64), and
the singular alpha-shift (alpha = 1/2, even k) must be +inf in both.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_user_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from noisynn.entropy import (
    delta_entropy,
    delta_entropy_for,
    delta_entropy_optimal,
    delta_entropy_shift,
    det_shift,
    entropy_table,
    gaussian_delta_entropy_bound,
)
from noisynn.errors import UserError
from noisynn.noise import NoiseSpec, quality_matrix

KS = range(2, 65)
ALPHAS = [0.0, 0.1, 0.3, 0.49, 0.5, 0.51, 0.7, 0.9, 1.0]


def test_optimal_closed_form_equals_slogdet_for_k_2_to_64():
    for k in KS:
        assert delta_entropy_optimal(k) == pytest.approx(delta_entropy(quality_matrix("optimal", k)), rel=1e-10), k


@pytest.mark.parametrize("alpha", ALPHAS)
def test_shift_closed_form_equals_slogdet_for_k_2_to_64(alpha):
    for k in KS:
        closed = delta_entropy_shift(k, alpha)
        explicit = delta_entropy(quality_matrix("shift", k, alpha))
        if math.isinf(closed) or math.isinf(explicit):
            assert closed == explicit == math.inf, (k, alpha, closed, explicit)
        else:
            assert closed == pytest.approx(explicit, rel=1e-8, abs=1e-10), (k, alpha)


def test_shift_is_singular_exactly_at_alpha_half_with_even_k():
    for k in KS:
        closed = delta_entropy_shift(k, 0.5)
        explicit = delta_entropy(quality_matrix("shift", k, 0.5))
        if k % 2 == 0:
            assert closed == math.inf and explicit == math.inf, k
        else:
            # odd k: det = 2·(1/2)^k, so ΔS = (k - 1)·log 2, finite
            assert closed == pytest.approx((k - 1) * math.log(2), rel=1e-12)
            assert explicit == pytest.approx((k - 1) * math.log(2), rel=1e-9)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(k=st.integers(2, 64), alpha=st.floats(0.0, 1.0))
def test_property_shift_closed_form_equals_slogdet(k, alpha):
    # within 1e-3 of the singular point both sides lose digits to cancellation; the exact
    # singular case has its own test above
    assume(k % 2 == 1 or abs(alpha - 0.5) > 1e-3)
    closed = delta_entropy_shift(k, alpha)
    explicit = delta_entropy(quality_matrix("shift", k, alpha))
    assert closed == pytest.approx(explicit, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("k", [2, 3, 8, 33])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_det_shift_equals_the_determinant_of_the_explicit_matrix(k, alpha):
    det = torch.linalg.det(torch.eye(k, dtype=torch.float64) + quality_matrix("shift", k, alpha))
    assert det_shift(k, alpha) == pytest.approx(float(det), abs=1e-12)


def test_optimal_gain_grows_with_k_and_is_zero_at_k_one():
    values = [delta_entropy_optimal(k) for k in range(1, 65)]
    assert values[0] == 0.0
    assert all(b > a for a, b in zip(values, values[1:]))


def test_shift_has_no_effect_at_alpha_zero_and_one():
    """alpha = 0 is the identity, alpha = 1 a permutation: neither changes the entropy."""
    for k in (2, 3, 10, 64):
        assert delta_entropy_shift(k, 0.0) == 0.0
        assert delta_entropy_shift(k, 1.0) == pytest.approx(0.0, abs=1e-15)
        assert delta_entropy(quality_matrix("shift", k, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_delta_entropy_for_a_spec_matches_the_explicit_matrix():
    for k in (2, 10, 16):
        assert delta_entropy_for(NoiseSpec("linear-optimal"), k) == pytest.approx(
            delta_entropy(quality_matrix("optimal", k)), rel=1e-10
        )
        assert delta_entropy_for(NoiseSpec("linear-shift", alpha=0.3), k) == pytest.approx(
            delta_entropy(quality_matrix("shift", k, 0.3)), rel=1e-8
        )
    assert delta_entropy_for(NoiseSpec("none"), 4) is None
    # additive noise independent of (Y, Z) can only raise S: the reported value is an upper bound 0
    for kind in ("gaussian", "impulse"):
        assert delta_entropy_for(NoiseSpec(kind, strength=0.1), None) == gaussian_delta_entropy_bound() == 0.0


def test_entropy_table_rows_agree_between_closed_form_and_slogdet():
    rows = entropy_table([2, 5, 16], [0.3, 0.5])
    assert len(rows) == 3 * (1 + 2)
    for row in rows:
        a, b = row["delta_S_closed_form"], row["delta_S_slogdet"]
        if math.isinf(a) or math.isinf(b):
            assert a == b == math.inf
        else:
            assert a == pytest.approx(b, rel=1e-8, abs=1e-12)


# --- user errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_k_must_be_a_positive_integer(bad):
    with pytest.raises(UserError) as e:
        delta_entropy_optimal(bad)
    assert_user_error(e, "k", "positive integer")
    with pytest.raises(UserError) as e:
        delta_entropy_shift(bad, 0.3)
    assert_user_error(e, "k", "positive integer")


@pytest.mark.parametrize("bad", [-0.5, 1.2, float("nan")])
def test_alpha_out_of_range_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        delta_entropy_shift(4, bad)
    assert_user_error(e, "alpha", "[0, 1]")


def test_non_square_q_is_a_user_error():
    with pytest.raises(UserError) as e:
        delta_entropy(torch.zeros(3, 4))
    assert_user_error(e, "Q", "square", "(3, 4)")


def test_linear_noise_without_k_is_a_user_error():
    with pytest.raises(UserError) as e:
        delta_entropy_for(NoiseSpec("linear-optimal"), None)
    assert_user_error(e, "k")
