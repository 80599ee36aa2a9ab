"""Tests of noisynn/noise.py: the three noise kinds of NoisyNN (docs/paper.md §1) as tensor functions.

The linear-transform operators are checked against the explicit matrices (I + Q)X built in float64
from ``quality_matrix``, on every axis a user can pick, and against the released ViT code's own
formula; the released NoisyCNN variant (the next neighbour, the noise term detached) against its
formula written out element by element and its gradient; the random ones against their
distributions and their seeding; every user mistake must be one sentence that names the parameter.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_user_error
from hypothesis import given, settings
from hypothesis import strategies as st

from noisynn.errors import UserError
from noisynn.noise import (
    NoiseSpec,
    apply_noise,
    gaussian,
    impulse,
    linear_transform,
    mixed_axis_size,
    quality_matrix,
)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _apply_matrix(m: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Y = M X along ``dim``: Y[.., i, ..] = Σ_j M[i, j] X[.., j, ..], by an explicit matmul."""
    moved = torch.movedim(x, dim, 0)
    k = moved.shape[0]
    out = (m @ moved.reshape(k, -1)).reshape(moved.shape)
    return torch.movedim(out, 0, dim)


def _explicit(x: torch.Tensor, kind: str, dim: int, alpha: float = 0.3) -> torch.Tensor:
    k = x.shape[dim]
    return _apply_matrix(torch.eye(k, dtype=torch.float64) + quality_matrix(kind, k, alpha), x, dim)


def _explicit_on_token_rows(tokens: torch.Tensor, kind: str, alpha: float = 0.3) -> torch.Tensor:
    b, n, d = tokens.shape
    side = math.isqrt(n)
    grid = tokens.reshape(b, side, side, d)
    return _explicit(grid, kind, 1, alpha).reshape(b, n, d)


# --- the optimal Q* --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 3, 10])
def test_optimal_q_on_batch_equals_explicit_matrix_and_released_vit_formula(batch):
    n_prefix, n_patches, dim = 1, 16, 8
    x = _randn(batch, n_prefix + n_patches, dim, seed=batch)

    out = linear_transform(x, kind="optimal", axis="batch", num_prefix_tokens=n_prefix)

    # (I + Q*) X on the patch tokens, Q* from quality_matrix
    explicit = _explicit(x[:, n_prefix:], "optimal", 0)
    torch.testing.assert_close(out[:, n_prefix:], explicit, rtol=1e-12, atol=1e-12)

    # the released ViT code: x'_b = (2·x_b + Σ_{j≠b} x_j)/(B+1), CLS untouched
    patches = x[:, n_prefix:]
    released = torch.stack(
        [(2 * patches[b] + sum(patches[j] for j in range(batch) if j != b)) / (batch + 1) for b in range(batch)]
    )
    torch.testing.assert_close(out[:, n_prefix:], released, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :n_prefix], x[:, :n_prefix])


@pytest.mark.parametrize(
    "shape, prefix",
    [((1, 17, 8), 1), ((1, 16, 8), 0), ((1, 3, 5, 5), 0), ((1, 7), 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimal_q_on_batch_is_exactly_the_identity_at_batch_size_one(shape, prefix, dtype):
    x = _randn(*shape, seed=1, dtype=dtype)
    assert torch.equal(linear_transform(x, "optimal", "batch", num_prefix_tokens=prefix), x)


def test_optimal_q_mixes_samples_so_one_sample_changes_every_output():
    """The batch reading couples the samples: changing image 0 changes the output for image 1."""
    x = _randn(4, 17, 8, seed=2)
    y = x.clone()
    y[0] += 1.0
    out_x = linear_transform(x, "optimal", "batch", num_prefix_tokens=1)
    out_y = linear_transform(y, "optimal", "batch", num_prefix_tokens=1)
    assert not torch.allclose(out_x[1, 1:], out_y[1, 1:])
    assert torch.equal(out_x[1, :1], out_y[1, :1])


# --- the alpha-shift Q -----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize(
    "shape, axis, prefix, dim",
    [
        ((5, 3, 4, 6), "batch", 0, 0),
        ((5, 3, 4, 6), "rows", 0, 2),
        ((5, 3, 4, 6), "features", 0, 1),
        ((4, 9), "batch", 0, 0),
        ((4, 9), "features", 0, 1),
        ((3, 1 + 16, 8), "batch", 1, 0),
        ((3, 1 + 16, 8), "features", 1, 2),
    ],
)
def test_shift_equals_explicit_matrix_on_each_axis(alpha, shape, axis, prefix, dim):
    x = _randn(*shape, seed=3)
    out = linear_transform(x, "shift", axis, alpha=alpha, num_prefix_tokens=prefix)
    if prefix:
        body = x[:, prefix:]
        torch.testing.assert_close(out[:, prefix:], _explicit(body, "shift", dim, alpha), rtol=1e-12, atol=1e-12)
        assert torch.equal(out[:, :prefix], x[:, :prefix])
    else:
        torch.testing.assert_close(out, _explicit(x, "shift", dim, alpha), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["shift", "optimal"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_rows_on_vit_tokens_mix_the_rows_of_the_square_patch_grid(kind, prefix):
    side, dim = 4, 6
    x = _randn(2, prefix + side * side, dim, seed=4)
    out = linear_transform(x, kind, "rows", alpha=0.3, num_prefix_tokens=prefix)
    torch.testing.assert_close(
        out[:, prefix:], _explicit_on_token_rows(x[:, prefix:], kind, 0.3), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    # rows of one image only: images do not see each other
    y = x.clone()
    y[1] += 1.0
    assert torch.equal(linear_transform(y, kind, "rows", alpha=0.3, num_prefix_tokens=prefix)[0], out[0])


@pytest.mark.parametrize(
    "shape, axis, prefix",
    [((3, 2, 4, 4), "rows", 0), ((3, 1 + 9, 4), "rows", 1), ((3, 5), "features", 0), ((6, 2, 3, 3), "batch", 0)],
)
def test_shift_at_alpha_zero_is_exactly_the_identity(shape, axis, prefix):
    x = _randn(*shape, seed=5, dtype=torch.float32)
    assert torch.equal(linear_transform(x, "shift", axis, alpha=0.0, num_prefix_tokens=prefix), x)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.3, 0.5, 0.8, 1.0])
def test_shift_determinant_matches_closed_form(k, alpha):
    det = torch.linalg.det(torch.eye(k, dtype=torch.float64) + quality_matrix("shift", k, alpha))
    expected = (1 - alpha) ** k - (-alpha) ** k
    assert float(det) == pytest.approx(expected, abs=1e-12)


def test_optimal_determinant_matches_closed_form():
    for k in (1, 2, 5, 10, 16):
        det = torch.linalg.det(torch.eye(k, dtype=torch.float64) + quality_matrix("optimal", k))
        assert float(det) == pytest.approx((k + 1) ** (1 - k), rel=1e-10)


def test_quality_matrices_have_the_papers_structure():
    k = 6
    q = quality_matrix("optimal", k)
    # I + Q* = (I + 11ᵀ)/(k+1): symmetric, rows sum to 1 (a convex mix toward the mean)
    m = torch.eye(k, dtype=torch.float64) + q
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(k, dtype=torch.float64))
    s = quality_matrix("shift", k, 0.3)
    # each row of I + Q_shift keeps 1 - alpha of itself and takes alpha from exactly one neighbour
    ms = torch.eye(k, dtype=torch.float64) + s
    for i in range(k):
        assert ms[i, i] == pytest.approx(0.7)
        assert ms[i, (i - 1) % k] == pytest.approx(0.3)
        assert int((ms[i] != 0).sum()) == 2


_AXIS_DIM = {
    ("batch", 2): 0,
    ("batch", 3): 0,
    ("batch", 4): 0,
    ("features", 2): 1,
    ("features", 3): 2,
    ("features", 4): 1,
    ("rows", 4): 2,
}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    rank=st.sampled_from([2, 3, 4]),
    axis=st.sampled_from(["batch", "rows", "features"]),
    kind=st.sampled_from(["optimal", "shift"]),
    alpha=st.floats(0.0, 1.0),
    dims=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    prefix=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_property_linear_transform_equals_explicit_matrix(rank, axis, kind, alpha, dims, prefix, seed):
    """For random shapes, axes and alphas, the fast operator is (I + Q)X along the chosen axis."""
    b, c, h, w = dims
    if rank == 4:
        shape, prefix = (b, c, h, h), 0
    elif rank == 3:
        shape = (b, prefix + h * h, w)
    else:
        shape, prefix = (b, w), 0
    if rank == 2 and axis == "rows":
        with pytest.raises(UserError):
            linear_transform(_randn(*shape), kind, axis, alpha)
        return
    x = _randn(*shape, seed=seed)
    out = linear_transform(x, kind, axis, alpha=alpha, num_prefix_tokens=prefix)
    body = x[:, prefix:] if rank == 3 else x
    if rank == 3 and axis == "rows":
        expected = _explicit_on_token_rows(body, kind, alpha)
    else:
        expected = _explicit(body, kind, _AXIS_DIM[(axis, rank)], alpha)
    got = out[:, prefix:] if rank == 3 else out
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if rank == 3:
        assert torch.equal(out[:, :prefix], x[:, :prefix])
    # the k the entropy is computed for is the size of the axis actually mixed
    spec = NoiseSpec(kind=f"linear-{kind}", axis=axis)  # k does not depend on alpha (and alpha 0 is no noise)
    k = mixed_axis_size(spec, tuple(shape), num_prefix_tokens=prefix)
    assert k == (h if axis == "rows" and rank == 3 else body.shape[_AXIS_DIM[(axis, rank)]])


# --- impulse (salt and pepper) ---------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 1.0])
def test_impulse_changes_about_p_of_the_elements_to_max_or_min(p):
    x = _randn(8, 4, 16, 16, seed=6, dtype=torch.float32)
    out = impulse(x, p=p, generator=_gen(0))
    changed = out != x
    n = x.numel()
    sd = math.sqrt(n * p * (1 - p)) if p < 1 else 1.0
    assert abs(int(changed.sum()) - n * p) <= 5 * sd + 1
    values = out[changed]
    assert bool(((values == x.max()) | (values == x.min())).all())
    # salt and pepper in equal shares
    n_salt = int((values == x.max()).sum())
    assert abs(n_salt - n * p / 2) <= 5 * math.sqrt(n * p / 2 * (1 - p / 2)) + 1
    assert torch.equal(out[~changed], x[~changed])
    assert out.dtype == x.dtype and out.shape == x.shape


def test_impulse_at_p_zero_changes_nothing():
    x = _randn(4, 3, 8, 8, seed=7, dtype=torch.float32)
    assert torch.equal(impulse(x, p=0.0, generator=_gen(0)), x)


def test_impulse_takes_max_and_min_over_the_whole_batch():
    x = torch.zeros(2, 50, 50)
    x[0] = 1.0  # sample 0 is all 1, sample 1 all 0: per-sample extremes would leave both unchanged
    x[0, 0, 0], x[1, 0, 0] = 5.0, -5.0
    out = impulse(x, p=0.5, generator=_gen(1))
    assert bool((out[1] == 5.0).any()) and bool((out[0] == -5.0).any())


def test_impulse_leaves_prefix_tokens_untouched_and_uses_patch_extremes():
    x = _randn(4, 1 + 16, 8, seed=8, dtype=torch.float32)
    x[:, 0] = 100.0  # a CLS token far outside the patch range must not set the "salt" value
    out = impulse(x, p=1.0, generator=_gen(2), num_prefix_tokens=1)
    assert torch.equal(out[:, 0], x[:, 0])
    patches = x[:, 1:]
    values = out[:, 1:]
    assert bool(((values == patches.max()) | (values == patches.min())).all())


def test_impulse_is_reproducible_with_the_same_seed_and_differs_with_another():
    x = _randn(4, 3, 8, 8, seed=9, dtype=torch.float32)
    a = impulse(x, p=0.2, generator=_gen(11))
    b = impulse(x, p=0.2, generator=_gen(11))
    c = impulse(x, p=0.2, generator=_gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- gaussian --------------------------------------------------------------------------------


@pytest.mark.parametrize("strength, mean, std", [(0.1, 0.0, 1.0), (1.0, 0.5, 2.0), (0.5, -1.0, 4.0)])
def test_gaussian_adds_noise_of_strength_times_mean_and_std(strength, mean, std):
    x = _randn(16, 8, 32, 32, seed=10, dtype=torch.float64)
    out = gaussian(x, strength=strength, mean=mean, std=std, generator=_gen(3))
    diff = (out - x).flatten()
    n = diff.numel()
    sd = strength * std
    # std is a standard deviation, not a variance (the released code's "gau_var" is used as one)
    assert float(diff.std()) == pytest.approx(sd, rel=5 / math.sqrt(2 * n))
    assert abs(float(diff.mean()) - strength * mean) <= 5 * sd / math.sqrt(n)


def test_gaussian_leaves_prefix_tokens_untouched():
    x = _randn(4, 2 + 16, 8, seed=11, dtype=torch.float32)
    out = gaussian(x, strength=1.0, generator=_gen(4), num_prefix_tokens=2)
    assert torch.equal(out[:, :2], x[:, :2])
    assert bool((out[:, 2:] != x[:, 2:]).all())


def test_gaussian_is_reproducible_with_the_same_seed_and_differs_with_another():
    x = _randn(4, 17, 8, seed=12, dtype=torch.float32)
    a = gaussian(x, 0.1, generator=_gen(21), num_prefix_tokens=1)
    b = gaussian(x, 0.1, generator=_gen(21), num_prefix_tokens=1)
    c = gaussian(x, 0.1, generator=_gen(22), num_prefix_tokens=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_functions_do_not_modify_their_input():
    x = _randn(3, 17, 8, seed=13, dtype=torch.float32)
    before = x.clone()
    gaussian(x, generator=_gen(0), num_prefix_tokens=1)
    impulse(x, p=0.5, generator=_gen(0), num_prefix_tokens=1)
    linear_transform(x, "optimal", "batch", num_prefix_tokens=1)
    linear_transform(x, "shift", "rows", num_prefix_tokens=1)
    assert torch.equal(x, before)


# --- NoiseSpec / apply_noise -----------------------------------------------------------------


def test_apply_noise_dispatches_to_the_operator_the_spec_names():
    x = _randn(3, 17, 8, seed=14, dtype=torch.float32)
    assert torch.equal(apply_noise(NoiseSpec("none"), x), x)
    assert torch.equal(
        apply_noise(NoiseSpec("linear-optimal", axis="batch"), x, num_prefix_tokens=1),
        linear_transform(x, "optimal", "batch", num_prefix_tokens=1),
    )
    assert torch.equal(
        apply_noise(NoiseSpec("linear-shift", alpha=0.2, axis="features"), x, num_prefix_tokens=1),
        linear_transform(x, "shift", "features", alpha=0.2, num_prefix_tokens=1),
    )
    assert torch.equal(
        apply_noise(NoiseSpec("gaussian", strength=0.1, std=2.0), x, _gen(5), num_prefix_tokens=1),
        gaussian(x, 0.1, 0.0, 2.0, _gen(5), num_prefix_tokens=1),
    )
    assert torch.equal(
        apply_noise(NoiseSpec("impulse", strength=0.2), x, _gen(6), num_prefix_tokens=1),
        impulse(x, 0.2, _gen(6), num_prefix_tokens=1),
    )


def test_skip_prefix_tokens_false_noises_the_cls_token_too():
    x = _randn(3, 17, 8, seed=15, dtype=torch.float32)
    out = apply_noise(NoiseSpec("gaussian", skip_prefix_tokens=False), x, _gen(0), num_prefix_tokens=1)
    assert bool((out[:, 0] != x[:, 0]).all())


# --- user errors -----------------------------------------------------------------------------


def test_unknown_linear_kind_is_a_user_error():
    x = _randn(2, 3)
    with pytest.raises(UserError) as e:
        linear_transform(x, kind="best")
    assert_user_error(e, "kind", "optimal", "shift", "best")
    with pytest.raises(UserError) as e:
        quality_matrix("best", 3)
    assert_user_error(e, "kind", "optimal", "shift")


def test_unknown_noise_kind_in_a_spec_is_a_user_error():
    with pytest.raises(UserError) as e:
        NoiseSpec(kind="salt-and-pepper")
    assert_user_error(e, "kind", "salt-and-pepper", *["none", "gaussian", "impulse", "linear-optimal", "linear-shift"])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 3), "shift", alpha=bad)
    assert_user_error(e, "alpha", "[0, 1]")
    with pytest.raises(UserError) as e:
        quality_matrix("shift", 3, alpha=bad)
    assert_user_error(e, "alpha", "[0, 1]")
    with pytest.raises(UserError) as e:
        NoiseSpec(kind="linear-shift", alpha=bad)
    assert_user_error(e, "alpha", "[0, 1]")


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_impulse_probability_outside_unit_interval_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        impulse(_randn(2, 3), p=bad)
    assert_user_error(e, "p", "[0, 1]")
    with pytest.raises(UserError) as e:
        NoiseSpec(kind="impulse", strength=bad)
    assert_user_error(e, "strength", "[0, 1]")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize(
    "op",
    [
        lambda x: linear_transform(x, "optimal", "batch"),
        lambda x: gaussian(x),
        lambda x: impulse(x, 0.1),
    ],
    ids=["linear_transform", "gaussian", "impulse"],
)
def test_wrong_tensor_rank_is_a_user_error(shape, op):
    with pytest.raises(UserError) as e:
        op(torch.zeros(shape))
    assert_user_error(e, "rank", "2", "3", "4", str(tuple(shape)))


def test_rows_on_a_non_square_token_grid_is_a_user_error():
    x = _randn(2, 1 + 15, 4)
    with pytest.raises(UserError) as e:
        linear_transform(x, "optimal", "rows", num_prefix_tokens=1)
    assert_user_error(e, "rows", "square", "15")
    # forgetting the CLS token leaves 17 tokens: the message points at num_prefix_tokens
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 17, 4), "optimal", "rows")
    assert_user_error(e, "rows", "num_prefix_tokens")
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 9), "optimal", "rows")
    assert_user_error(e, "rows")


def test_unknown_axis_is_a_user_error():
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 3), "optimal", axis="channels")
    assert_user_error(e, "axis", "channels", "batch", "rows", "features")
    with pytest.raises(UserError) as e:
        NoiseSpec(kind="linear-optimal", axis="samples")
    assert_user_error(e, "axis", "samples", "batch", "rows", "features")


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_quality_matrix_size_must_be_a_positive_integer(bad):
    with pytest.raises(UserError) as e:
        quality_matrix("optimal", bad)
    assert_user_error(e, "k", "positive integer")


def test_negative_std_or_prefix_count_is_a_user_error():
    with pytest.raises(UserError) as e:
        gaussian(_randn(2, 3), std=-1.0)
    assert_user_error(e, "std", ">= 0")
    with pytest.raises(UserError) as e:
        NoiseSpec(kind="gaussian", std=-1.0)
    assert_user_error(e, "std", ">= 0")
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 5, 3), num_prefix_tokens=-1)
    assert_user_error(e, "num_prefix_tokens", ">= 0")


# --- the released NoisyCNN shift: the next neighbour, the noise term detached ----------------


def _by_formula(x: torch.Tensor, dim: int, alpha: float, neighbour: str) -> torch.Tensor:
    """x'_i = (1 - alpha)·x_i + alpha·x_(i∓1 mod k) along ``dim``, element by element."""
    out = torch.empty_like(x)
    k = x.shape[dim]
    step = -1 if neighbour == "previous" else 1
    for index in itertools.product(*(range(n) for n in x.shape)):
        other = list(index)
        other[dim] = (index[dim] + step) % k
        out[index] = (1 - alpha) * x[index] + alpha * x[tuple(other)]
    return out


@pytest.mark.parametrize("neighbour", ["previous", "next"])
@pytest.mark.parametrize(
    "shape, axis, layout, dim",
    [
        ((4, 3), "batch", None, 0),
        ((4, 3), "features", None, 1),
        ((4, 2, 3, 2), "batch", None, 0),
        ((4, 2, 3, 2), "rows", None, 2),
        ((4, 3, 3, 2), "features", None, 1),
        ((4, 3, 2, 3), "batch", "nhwc", 0),
        ((4, 3, 2, 3), "rows", "nhwc", 1),
        ((4, 3, 2, 5), "features", "nhwc", 3),
        ((4, 4, 3), "batch", "tokens", 0),
        ((4, 4, 3), "features", "tokens", 2),
    ],
)
def test_shift_neighbours_follow_their_formulas_element_by_element(neighbour, shape, axis, layout, dim):
    x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) ** 1.5
    out = linear_transform(x, "shift", axis, alpha=0.3, neighbour=neighbour, layout=layout)
    torch.testing.assert_close(out, _by_formula(x, dim, 0.3, neighbour), rtol=1e-12, atol=1e-12)
    # the spec threads the neighbour through, and k is the size of that dimension
    spec = NoiseSpec("linear-shift", axis=axis, alpha=0.3, neighbour=neighbour)
    assert torch.equal(apply_noise(spec, x, layout=layout), out)
    assert mixed_axis_size(spec, shape, layout=layout) == shape[dim]


@pytest.mark.parametrize("neighbour", ["previous", "next"])
def test_shift_neighbours_on_the_rows_of_a_token_grid_with_a_class_token(neighbour):
    b, side, d = 2, 3, 2
    x = _randn(b, 1 + side * side, d, seed=31)
    out = linear_transform(x, "shift", "rows", alpha=0.4, num_prefix_tokens=1, neighbour=neighbour)
    grid = x[:, 1:].reshape(b, side, side, d)
    expected = _by_formula(grid, 1, 0.4, neighbour).reshape(b, side * side, d)
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :1], x[:, :1])


def test_next_neighbour_quality_matrix_is_the_transpose_and_matches_the_operator():
    k, alpha = 5, 0.3
    q_prev = quality_matrix("shift", k, alpha)
    q_next = quality_matrix("shift", k, alpha, neighbour="next")
    torch.testing.assert_close(q_next, q_prev.T)
    eye = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        assert q_next[i, (i + 1) % k] == pytest.approx(alpha)
        assert q_next[i, i] == pytest.approx(-alpha)
        assert int((q_next[i] != 0).sum()) == 2
    x = _randn(k, 7, seed=32)
    torch.testing.assert_close(
        (eye + q_next) @ x, linear_transform(x, "shift", "batch", alpha=alpha, neighbour="next"), rtol=1e-12, atol=1e-12
    )
    # the same determinant, hence the same ΔS, for both neighbours
    assert float(torch.linalg.det(eye + q_next)) == pytest.approx(float(torch.linalg.det(eye + q_prev)), abs=1e-12)
    # the optimal Q has no neighbour: accepted and ignored
    torch.testing.assert_close(quality_matrix("optimal", k, neighbour="next"), quality_matrix("optimal", k))
    assert torch.equal(
        linear_transform(x, "optimal", "batch", neighbour="next"), linear_transform(x, "optimal", "batch")
    )


@pytest.mark.parametrize("kind", ["optimal", "shift"])
@pytest.mark.parametrize("neighbour", ["previous", "next"])
@pytest.mark.parametrize(
    "shape, axis, layout, dim, prefix",
    [((4, 3), "batch", None, 0, 0), ((3, 2, 4, 2), "rows", None, 2, 0), ((3, 2, 2, 4), "features", "nhwc", 3, 0),
     ((4, 1 + 4, 3), "batch", None, 0, 1)],
)
def test_detach_keeps_the_value_and_sets_the_gradient(kind, neighbour, shape, axis, layout, dim, prefix):
    x = _randn(*shape, seed=33)
    w = _randn(*shape, seed=34)
    grads = {}
    for detach in (False, True, "partner"):
        xi = x.clone().requires_grad_(True)
        out = linear_transform(xi, kind, axis, alpha=0.3, num_prefix_tokens=prefix, neighbour=neighbour,
                               detach=detach, layout=layout)
        (w * out).sum().backward()
        grads[detach] = (out.detach(), xi.grad)
    assert torch.equal(grads[True][0], grads[False][0])  # the forward value is bit-identical
    assert torch.equal(grads["partner"][0], grads[False][0])
    assert torch.equal(grads[True][1], w)  # backward sees the identity
    # without detach the gradient is (I + Q)ᵀ w along the mixed axis (prefix tokens: the identity)
    k = shape[dim]
    m = torch.eye(k, dtype=torch.float64) + quality_matrix(kind, k, 0.3, neighbour=neighbour)
    # partner: only the element's own term, (I + Q)_ii · w: 1 - alpha for the shift, 2/(k+1) for Q*
    own = torch.cat([w[:, :prefix], m[0, 0] * w[:, prefix:]], dim=1) if prefix else m[0, 0] * w
    torch.testing.assert_close(grads["partner"][1], own, rtol=1e-12, atol=1e-12)
    if prefix:
        expected = torch.cat([w[:, :prefix], _apply_matrix(m.T, w[:, prefix:], dim)], dim=1)
    else:
        expected = _apply_matrix(m.T, w, dim)
    torch.testing.assert_close(grads[False][1], expected, rtol=1e-12, atol=1e-12)


def test_detach_in_a_spec_reaches_the_operator_for_every_kind():
    x = _randn(4, 5, 3, seed=35)
    w = _randn(4, 5, 3, seed=36)
    for spec in (
        NoiseSpec("linear-shift", alpha=0.3, neighbour="next", detach=True),
        NoiseSpec("linear-optimal", axis="features", detach=True),
        NoiseSpec("impulse", strength=0.5, detach=True),
    ):
        xi = x.clone().requires_grad_(True)
        out = apply_noise(spec, xi, _gen(0), num_prefix_tokens=1)
        (w * out).sum().backward()
        assert torch.equal(xi.grad, w), spec.kind
        plain = apply_noise(NoiseSpec(**{**spec.to_dict(), "detach": False}), x, _gen(0), num_prefix_tokens=1)
        assert torch.equal(out.detach(), plain), spec.kind


def test_spec_neighbour_and_detach_round_trip_and_default_to_the_paper():
    spec = NoiseSpec("linear-shift", alpha=0.2, neighbour="next", detach=True)
    d = spec.to_dict()
    assert d["neighbour"] == "next" and d["detach"] is True
    assert NoiseSpec.from_dict(d) == spec
    old = NoiseSpec.from_dict({"kind": "linear-shift", "alpha": 0.2, "axis": "batch"})
    assert old.neighbour == "previous" and old.detach is False
    x = _randn(4, 3, seed=37)
    torch.testing.assert_close(apply_noise(old, x), _by_formula(x, 0, 0.2, "previous"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["prev", "Next", "", 1, None])
def test_unknown_neighbour_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        NoiseSpec("linear-shift", neighbour=bad)
    assert_user_error(e, "neighbour", "previous", "next", repr(bad))
    with pytest.raises(UserError) as e:
        linear_transform(_randn(3, 2), "shift", neighbour=bad)
    assert_user_error(e, "neighbour", "previous", "next")
    with pytest.raises(UserError) as e:
        quality_matrix("shift", 3, neighbour=bad)
    assert_user_error(e, "neighbour", "previous", "next")


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "Partner"])
def test_unknown_detach_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        NoiseSpec("linear-optimal", detach=bad)
    assert_user_error(e, "detach", "false, true or partner", repr(bad))


@pytest.mark.parametrize("kind", ["gaussian", "impulse"])
def test_partner_detach_of_an_additive_noise_is_a_user_error(kind):
    # an additive noise has no partner term: refusing it beats silently meaning something else
    with pytest.raises(UserError) as e:
        NoiseSpec(kind, strength=0.1, detach="partner")
    assert_user_error(e, "detach: partner", "linear", kind)


@pytest.mark.parametrize("prefix", [0, 1])
def test_impulse_salt_and_pepper_pass_no_gradient_as_released(prefix):
    """The released code takes the batch's max and min with ``.detach()`` (NoisyViT-OptimalQ/ViT.py
    lines 55-56: ``salt=(torch.max(x_clone[:,1:,:])).detach()``, ``pepper=...min...detach()``;
    NoisyCNN_CircularShiftQ/CNNs.py lines 25-26, github.com/Shawey94/NoisyNN @719ccf6): a salted or
    peppered element is a constant, so the gradient is w where an element is kept and 0 elsewhere;
    none of it reaches the element that holds the max or the min."""
    shape, p = (4, 1 + 6, 5), 0.4
    x = _randn(*shape, seed=51).requires_grad_(True)
    w = _randn(*shape, seed=52)
    out = impulse(x, p, _gen(7), num_prefix_tokens=prefix)
    (w * out).sum().backward()
    u = torch.rand(shape, generator=_gen(7))  # the operator's draw, replayed
    kept = (u >= p / 2) & (u <= 1 - p / 2)
    if prefix:
        kept[:, :prefix] = True
    assert (~kept).sum() > 10  # enough salt and pepper for the check to mean something
    assert torch.equal(x.grad, torch.where(kept, w, torch.zeros_like(w)))


# --- layouts ---------------------------------------------------------------------------------


def test_nhwc_layout_mixes_h_for_rows_and_c_for_features_and_k_follows():
    x = _randn(2, 3, 4, 5, seed=38)  # (B, H, W, C)
    for axis, dim in (("rows", 1), ("features", 3), ("batch", 0)):
        out = linear_transform(x, "optimal", axis, layout="nhwc")
        torch.testing.assert_close(out, _explicit(x, "optimal", dim), rtol=1e-12, atol=1e-12)
        spec = NoiseSpec("linear-optimal", axis=axis)
        assert mixed_axis_size(spec, tuple(x.shape), layout="nhwc") == x.shape[dim]
    # without the layout the rank decides: (B, C, H, W)
    assert mixed_axis_size(NoiseSpec("linear-optimal", axis="rows"), (2, 3, 4, 5)) == 4
    assert mixed_axis_size(NoiseSpec("linear-optimal", axis="features"), (2, 3, 4, 5)) == 3


def test_site_layouts_windows_and_unknown_in_mixed_axis_size():
    rows = NoiseSpec("linear-optimal", axis="rows")
    assert mixed_axis_size(rows, (16, 16, 8), num_prefix_tokens=1, layout="windows") == 4  # no prefix in windows
    assert mixed_axis_size(NoiseSpec("linear-optimal", axis="batch"), (6, 2, 3, 4), layout="unknown") == 6
    assert mixed_axis_size(NoiseSpec("gaussian"), (6, 2, 3, 4), layout="unknown") is None
    with pytest.raises(UserError) as e:
        mixed_axis_size(rows, (6, 2, 3, 4), layout="unknown")
    assert_user_error(e, "(6, 2, 3, 4)", "rows")


def test_a_layout_that_does_not_fit_the_tensor_or_lacks_the_axis_is_a_user_error():
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 3, 4), "optimal", "batch", layout="nhwc")
    assert_user_error(e, "nhwc", "rank 4", "rank 3")
    with pytest.raises(UserError) as e:
        linear_transform(_randn(2, 3, 4, 5), "optimal", "batch", layout="nhcw")
    assert_user_error(e, "layout", "nhcw", "tokens", "nchw", "nhwc", "features")
    with pytest.raises(UserError) as e:
        mixed_axis_size(NoiseSpec("linear-optimal", axis="rows"), (4, 9))
    assert_user_error(e, "rows", "(4, 9)")
    with pytest.raises(UserError) as e:
        apply_noise(NoiseSpec("gaussian"), _randn(2, 3), _gen(0), layout="flat")
    assert_user_error(e, "layout", "flat")


def test_gaussian_on_an_nhwc_map_ignores_the_prefix_count():
    x = _randn(2, 3, 3, 4, seed=39, dtype=torch.float32)
    out = apply_noise(NoiseSpec("gaussian"), x, _gen(1), num_prefix_tokens=1, layout="nhwc")
    assert bool((out != x).all())
