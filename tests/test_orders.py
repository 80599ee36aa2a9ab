"""Tests of noisynn/orders.py: each evaluation order is what its name says (docs/paper.md §6: class-pure
against class-mixed batches, the released class-sorted order, a seeded shuffle) and covers every test
image exactly once; class-mixed batches repeat as few labels as any split can."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noisynn.errors import UserError
from noisynn.orders import batches_in_order as order_batches
from noisynn.vocab import ORDERS

BALANCED = np.repeat(np.arange(10), 7)  # 10 classes × 7 samples, interleaved below
UNBALANCED = np.repeat(np.arange(5), [23, 9, 4, 1, 13])


def _interleave(labels: np.ndarray, seed: int = 3) -> np.ndarray:
    """The same labels in a scrambled order, so that no order is right by accident of the input."""
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def _repeats(labels: np.ndarray, batches) -> int:
    """Samples whose label already occurred earlier in the same batch."""
    return sum(len(b) - len(set(labels[b].tolist())) for b in batches)


def _min_repeats(counts: list[int], batch_size: int) -> int:
    """The fewest repeats any split into full batches of ``batch_size`` (the last one smaller) can have.

    Repeats = N - Σ_batches (distinct labels). Placing each class at most once per batch is a flow
    from classes (supply n_c) to batches (capacity s_j), one unit per class–batch pair; by max-flow
    = min-cut, the most distinct placements are min over t of (the t smallest capacities +
    Σ_c min(n_c, B - t)). With t = 0 this is the simple bound Σ_c max(0, n_c - B).
    """
    n = sum(counts)
    num_batches = -(-n // batch_size)
    sizes = sorted([batch_size] * (num_batches - 1) + [n - batch_size * (num_batches - 1)])
    best = min(sum(sizes[:t]) + sum(min(c, num_batches - t) for c in counts) for t in range(num_batches + 1))
    return n - best


# --- test orders -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
@pytest.mark.parametrize("labels", [_interleave(BALANCED), _interleave(UNBALANCED)], ids=["balanced", "unbalanced"])
def test_every_order_covers_each_index_exactly_once(order, batch_size, labels):
    batches = order_batches(labels, order, batch_size, seed=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(labels)))
    assert all(1 <= len(b) <= batch_size for b in batches)


@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
def test_class_pure_batches_hold_one_label(batch_size):
    labels = _interleave(UNBALANCED)
    for b in order_batches(labels, "class_pure", batch_size):
        assert len(set(labels[b].tolist())) == 1


def test_class_pure_uses_full_batches_within_a_class():
    labels = _interleave(UNBALANCED)
    batches = order_batches(labels, "class_pure", 10)
    # per class: ceil(n_c / 10) batches, so a class of 23 gives 10, 10, 3
    assert len(batches) == sum(-(-n // 10) for n in (23, 9, 4, 1, 13))


def test_class_mixed_with_balanced_classes_repeats_no_label():
    labels = _interleave(BALANCED)
    batches = order_batches(labels, "class_mixed", 10)
    assert len(batches) == 7
    for b in batches:
        assert sorted(labels[b].tolist()) == list(range(10))


def test_class_mixed_with_unbalanced_classes_repeats_as_little_as_possible():
    labels = _interleave(UNBALANCED)
    batches = order_batches(labels, "class_mixed", 10)
    # 50 samples → 5 batches, so a class sits in at most 5 of them: class 0 (23 samples) repeats
    # at least 23 - 5 = 18 times, class 1 (9) 4 times, class 4 (13) 8 times: 30 repeats at the least
    assert _min_repeats([23, 9, 4, 1, 13], 10) == 18 + 4 + 8
    assert _repeats(labels, batches) == 30
    assert [len(b) for b in batches] == [10] * 5


def test_class_mixed_keeps_room_for_the_large_class():
    # 4 samples of class 1, 2 of class 0, batch size 4 → batches of 4 and 2. Best: {1, 1, 1, 0}
    # and {1, 0}, 2 repeats; filling the first batch round-robin ({1, 0, 1, 0}) leaves {1, 1}: 3.
    labels = np.array([1, 1, 1, 1, 0, 0])
    batches = order_batches(labels, "class_mixed", 4)
    assert [len(b) for b in batches] == [4, 2]
    assert _repeats(labels, batches) == 2


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=12),
    batch_size=st.integers(min_value=1, max_value=16),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_class_mixed_is_optimal_for_any_class_counts(counts, batch_size, seed):
    labels = _interleave(np.repeat(np.arange(len(counts)), counts), seed)
    batches = order_batches(labels, "class_mixed", batch_size)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(labels)))
    # same batch size as the other protocols: all batches full but the last
    assert all(len(b) == batch_size for b in batches[:-1])
    assert _repeats(labels, batches) == _min_repeats(counts, batch_size)


def test_class_sorted_is_sorted_by_label():
    labels = _interleave(UNBALANCED)
    flat = np.concatenate(order_batches(labels, "class_sorted", 10))
    assert np.all(np.diff(labels[flat]) >= 0)
    # batches straddle classes as the released SequentialSampler does: 50 samples → 5 batches
    assert len(order_batches(labels, "class_sorted", 10)) == 5


def test_shuffled_is_a_seeded_permutation():
    labels = _interleave(BALANCED)
    first = np.concatenate(order_batches(labels, "shuffled", 10, seed=5))
    again = np.concatenate(order_batches(labels, "shuffled", 10, seed=5))
    other = np.concatenate(order_batches(labels, "shuffled", 10, seed=6))
    assert sorted(first.tolist()) == list(range(len(labels)))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, np.arange(len(labels)))


def test_bad_order_or_batch_size_is_a_user_error():
    with pytest.raises(UserError, match="order"):
        order_batches(BALANCED, "sorted", 10)
    with pytest.raises(UserError, match="batch size"):
        order_batches(BALANCED, "shuffled", 0)
