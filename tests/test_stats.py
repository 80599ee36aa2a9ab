"""Intervals, verdicts and controls of noisynn.report.stats on data whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from noisynn.errors import UserError
from noisynn.report import stats

N, BATCH = 400, 10


def _reference() -> np.ndarray:
    """Reference correctness: a fixed half of the 400 images right."""
    correct = np.zeros(N, dtype=bool)
    correct[np.random.default_rng(7).permutation(N)[: N // 2]] = True
    return correct


def _flip(correct: np.ndarray, to: bool, count: int) -> np.ndarray:
    """The first ``count`` images not already ``to`` become ``to``."""
    out = correct.copy()
    out[np.flatnonzero(correct != to)[:count]] = to
    return out


def _image_units() -> np.ndarray:
    return stats.units(None, N, mixes_batch=False)


def _batch_units() -> np.ndarray:
    return stats.units(np.arange(N) // BATCH, N, mixes_batch=True)


def test_units_follow_the_protocol():
    batch = np.arange(N) // BATCH
    assert np.array_equal(stats.units(batch, N, mixes_batch=False), np.arange(N))
    assert np.array_equal(stats.units(batch, N, mixes_batch=True), batch)
    with pytest.raises(UserError, match="batch"):
        stats.units(None, N, mixes_batch=True)
    with pytest.raises(UserError, match="batch"):
        stats.units(batch[:-1], N, mixes_batch=True)


@pytest.mark.parametrize("units", [_image_units, _batch_units])
def test_identical_setting_is_no_evidence(units):
    ref = _reference()
    iv = stats.change_interval([ref.copy()], [ref], [units()])
    assert iv.estimate == 0 and iv.low <= 0 <= iv.high
    assert not iv.excludes_zero
    assert stats.verdict(iv) == "no evidence"
    assert stats.mcnemar(ref.copy(), ref) == {"b": 0, "c": 0, "pvalue": 1.0}


def test_balanced_flips_are_no_evidence():
    ref = _reference()
    setting = ref.copy()
    setting[np.flatnonzero(~ref)[:30]] = True
    setting[np.flatnonzero(ref)[:30]] = False
    iv = stats.change_interval([setting], [ref], [_image_units()])
    assert iv.estimate == 0 and iv.low < 0 < iv.high
    assert stats.verdict(iv) == "no evidence"
    m = stats.mcnemar(setting, ref)
    assert (m["b"], m["c"], m["pvalue"]) == (30, 30, 1.0)


@pytest.mark.parametrize("units", [_image_units, _batch_units])
def test_known_effect_is_raised_and_its_mirror_lowered(units):
    ref = _reference()
    better = _flip(ref, True, 60)
    iv = stats.change_interval([better], [ref], [units()])
    assert iv.estimate == 60 / 400
    assert iv.low > 0 and iv.excludes_zero
    assert stats.verdict(iv) == "raised"
    assert (iv.n_units, iv.n_seeds) == (len(np.unique(units())), 1)

    worse = _flip(ref, False, 60)
    iv = stats.change_interval([worse], [ref], [units()])
    assert iv.estimate == -60 / 400
    assert iv.high < 0
    assert stats.verdict(iv) == "lowered"


def test_mcnemar_matches_a_hand_count():
    setting = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    reference = np.array([0, 0, 1, 1, 0, 0, 0, 0, 1, 0], dtype=bool)
    # setting right, reference wrong: images 0, 1, 5, 7, 9; the reverse: image 3 only.
    # Exact two-sided p with B ~ Bin(6, 1/2): 2 · P(B ≤ 1) = 2 · (1 + 6) / 64 = 7/32.
    m = stats.mcnemar(setting, reference)
    assert (m["b"], m["c"]) == (5, 1)
    assert m["pvalue"] == pytest.approx(7 / 32)
    assert m["pvalue"] == pytest.approx(min(1.0, 2 * sps.binom.cdf(1, 6, 0.5)))
    # Per-seed lists are concatenated: two copies double both counts.
    m2 = stats.mcnemar([setting, setting], [reference, reference])
    assert (m2["b"], m2["c"]) == (10, 2)
    assert m2["pvalue"] == pytest.approx(2 * sum(sps.binom.pmf(k, 12, 0.5) for k in range(3)))


def test_verdict_rule_is_stated():
    rule = stats.VERDICT_RULE.lower()
    for phrase in ("95 %", "paired bootstrap", "batch", "seeds", "mcnemar", "zero"):
        assert phrase in rule


def test_accuracy_interval_has_binomial_width():
    correct = np.zeros(N, dtype=bool)
    correct[: 3 * N // 4] = True
    iv = stats.accuracy_interval([correct], [_image_units()])
    assert iv.estimate == 0.75 and iv.low < 0.75 < iv.high
    # Normal approximation: 2 · 1.96 · sqrt(0.75 · 0.25 / 400) ≈ 0.085.
    assert 0.07 < iv.high - iv.low < 0.10


def test_batch_level_effect_needs_batch_resampling():
    ref = np.zeros(N, dtype=bool)
    setting = ref.copy()
    setting[: 8 * BATCH] = True  # 8 of the 40 batches flipped whole, nothing else changes
    per_image = stats.change_interval([setting], [ref], [_image_units()])
    per_batch = stats.change_interval([setting], [ref], [_batch_units()])
    assert per_image.estimate == per_batch.estimate == 0.2
    # Forty independent units instead of 400: about √10 ≈ 3.2 times wider.
    assert per_batch.high - per_batch.low > 2 * (per_image.high - per_image.low)
    assert (per_image.n_units, per_batch.n_units) == (400, 40)


def test_fixed_random_state_is_deterministic():
    ref = _reference()
    better = _flip(ref, True, 60)
    for n_seeds in (1, 2):
        args = ([better] * n_seeds, [ref] * n_seeds, [_batch_units()] * n_seeds)
        assert stats.change_interval(*args, random_state=3) == stats.change_interval(*args, random_state=3)
        acc = ([better] * n_seeds, [_image_units()] * n_seeds)
        assert stats.accuracy_interval(*acc, random_state=3) == stats.accuracy_interval(*acc, random_state=3)


def test_disagreeing_seeds_widen_the_interval():
    ref = _reference()
    up, down = _flip(ref, True, 60), _flip(ref, False, 60)
    u = _image_units()
    one = stats.change_interval([up], [ref], [u])
    agreeing = stats.change_interval([up, up], [ref, ref], [u, u])
    disagreeing = stats.change_interval([up, down], [ref, ref], [u, u])
    assert disagreeing.n_seeds == 2 and disagreeing.estimate == 0
    width = {k: iv.high - iv.low for k, iv in {"one": one, "agree": agreeing, "disagree": disagreeing}.items()}
    assert width["disagree"] > 2 * width["one"]
    assert width["disagree"] > 2 * width["agree"]
    # Agreeing seeds are two replicates of the same effect: the interval does not widen.
    assert width["agree"] <= width["one"] * 1.1
    assert stats.verdict(agreeing) == "raised"
    assert stats.verdict(disagreeing) == "no evidence"


def test_inputs_are_checked():
    ref = _reference()
    with pytest.raises(UserError, match="units_by_seed"):
        stats.change_interval([ref], [ref], [_image_units()[:-1]])
    with pytest.raises(UserError, match="reference_correct_by_seed"):
        stats.change_interval([ref, ref], [ref], [_image_units()] * 2)
    with pytest.raises(UserError, match="confidence"):
        stats.accuracy_interval([ref], [_image_units()], confidence=95)
    with pytest.raises(UserError, match="correct_by_seed"):
        stats.accuracy_interval([np.full(N, 2)], [_image_units()])


def test_batch_dependence_counts_changed_predictions():
    pred = [np.array([0, 1, 2, 3]), np.array([1, 1, 1, 1])]
    pred1 = [np.array([0, 1, 2, 0]), np.array([1, 2, 1, 1])]
    share = stats.batch_dependence(pred, pred1)
    assert share == 2 / 8
    assert stats.is_transductive(share)
    assert stats.batch_dependence(pred, pred) == 0.0
    assert not stats.is_transductive(0.0)


def test_logit_pooling_takes_each_batch_mean():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [4.0, 0.0]])
    assert np.array_equal(logits.argmax(axis=1), [0, 1, 1, 0])  # what the images say alone
    # batch {0, 1}: mean (1, 0.5) → 0; batch {2, 3}: mean (2, 1.5) → 0.
    assert np.array_equal(stats.logit_pooling(logits, [np.array([0, 1]), np.array([2, 3])]), [0, 0, 0, 0])
    # batch {0, 2}: mean (1, 1.5) → 1; batch {1, 3}: mean (2, 0.5) → 0.
    assert np.array_equal(stats.logit_pooling(logits, [np.array([0, 2]), np.array([1, 3])]), [1, 0, 1, 0])
    # Batches of one leave every image its own prediction.
    assert np.array_equal(stats.logit_pooling(logits, [np.array([i]) for i in range(4)]), [0, 1, 1, 0])
    with pytest.raises(UserError, match="exactly one batch"):
        stats.logit_pooling(logits, [np.array([0, 1]), np.array([1, 2, 3])])


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
except ImportError:  # hypothesis is a test extra; the explicit cases above stand on their own
    pass
else:
    @settings(max_examples=25, deadline=None)
    @given(arrays(bool, st.integers(2, 60)), st.data())
    def test_change_interval_brackets_the_paired_difference(setting, data):
        reference = data.draw(arrays(bool, setting.shape))
        batch = data.draw(arrays(np.int64, setting.shape, elements=st.integers(0, 5)))
        u = stats.units(batch, setting.size, mixes_batch=True)
        iv = stats.change_interval([setting], [reference], [u], n_resamples=200)
        assert iv.estimate == pytest.approx(setting.mean() - reference.mean())
        assert -1 <= iv.low <= iv.high <= 1
        m = stats.mcnemar(setting, reference)
        assert m["b"] - m["c"] == int(setting.sum()) - int(reference.sum())
        if m["b"] + m["c"] == 0:  # no image changes: nothing to resample
            assert iv.low == iv.high == 0
