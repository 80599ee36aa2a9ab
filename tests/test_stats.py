"""Intervals, tests, adjustments and controls of noisynn.report.stats: known answers, copies, boundaries, coverage."""

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


def _test(setting, reference, units):
    t = stats.sign_flip_test(setting, reference, units)
    return t, stats.verdict(float(np.mean(np.asarray(setting, float)) - np.mean(np.asarray(reference, float))), t.pvalue)


@pytest.mark.parametrize("units", [_image_units, _batch_units])
def test_identical_setting_is_no_evidence_and_zero_width_only_by_construction(units):
    ref = _reference()
    iv = stats.change_interval([ref.copy()], [ref], [units()])
    # nothing changed in this sample, which does not make the change zero: ± what n units allow
    assert iv.estimate == 0 and iv.low < 0 < iv.high
    assert iv.low <= 0 <= iv.high
    t, word = _test([ref.copy()], [ref], [units()])
    assert (t.b, t.c, t.pvalue, word) == (0, 0, 1.0, "no evidence")
    # the identity by construction (noise off, or k = 1) is the point
    iv = stats.change_interval([ref.copy()], [ref], [units()], identity=True)
    assert iv.low == iv.high == iv.estimate == 0
    # ... but only where nothing changed: a drift is measured, not hidden
    drift = _flip(ref, True, 1)
    assert stats.change_interval([drift], [ref], [units()], identity=True).high > 0


def test_balanced_flips_are_no_evidence():
    ref = _reference()
    setting = ref.copy()
    setting[np.flatnonzero(~ref)[:30]] = True
    setting[np.flatnonzero(ref)[:30]] = False
    iv = stats.change_interval([setting], [ref], [_image_units()])
    assert iv.estimate == 0 and iv.low < 0 < iv.high
    t, word = _test([setting], [ref], [_image_units()])
    assert (t.b, t.c, t.pvalue, word) == (30, 30, 1.0, "no evidence")


@pytest.mark.parametrize("units", [_image_units, _batch_units])
def test_known_effect_is_raised_and_its_mirror_lowered(units):
    ref = _reference()
    better = _flip(ref, True, 60)
    iv = stats.change_interval([better], [ref], [units()])
    assert iv.estimate == 60 / 400
    assert iv.low > 0
    assert _test([better], [ref], [units()])[1] == "raised"
    assert (iv.n_units, iv.n_seeds) == (len(np.unique(units())), 1)

    worse = _flip(ref, False, 60)
    iv = stats.change_interval([worse], [ref], [units()])
    assert iv.estimate == -60 / 400
    assert iv.high < 0
    assert _test([worse], [ref], [units()])[1] == "lowered"


def test_sign_flip_on_single_images_is_mcnemars_exact_test():
    setting = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    reference = np.array([0, 0, 1, 1, 0, 0, 0, 0, 1, 0], dtype=bool)
    # setting right, reference wrong: images 0, 1, 5, 7, 9; the reverse: image 3 only.
    # Exact two-sided p with B ~ Bin(6, 1/2): 2 · P(B ≤ 1) = 2 · (1 + 6) / 64 = 7/32.
    t = stats.sign_flip_test(setting, reference, np.arange(10))
    assert (t.b, t.c, t.n_units) == (5, 1, 6)
    assert t.pvalue == pytest.approx(7 / 32)
    assert t.pvalue == pytest.approx(sps.binomtest(5, 6, 0.5).pvalue)


def test_four_whole_batches_flipping_give_what_four_clusters_allow():
    ref = np.zeros(N, dtype=bool)
    setting = ref.copy()
    setting[: 4 * BATCH] = True  # four whole batches of ten flip together, nothing else moves
    by_batch = stats.sign_flip_test([setting], [ref], [_batch_units()])
    by_image = stats.sign_flip_test([setting], [ref], [_image_units()])
    # four units of equal total: 2 of the 2^4 sign patterns reach |40|
    assert by_batch.pvalue == pytest.approx(2 / 16) and by_batch.n_units == 4
    # read as forty independent images (McNemar), the same data look certain: 2 · 2^-40
    assert by_image.pvalue == pytest.approx(2 * 0.5 ** 40) and by_image.pvalue < 1e-11
    assert _test([setting], [ref], [_batch_units()])[1] == "no evidence"
    # two seeds that are copies: still four clusters
    assert stats.sign_flip_test([setting] * 2, [ref] * 2, [_batch_units()] * 2).pvalue == pytest.approx(2 / 16)


def test_sign_flip_agrees_with_scipys_exact_enumeration():
    rng = np.random.default_rng(5)
    for _ in range(5):
        ref = rng.random(120) < 0.6
        setting = np.where(rng.random(120) < 0.15, ~ref, ref)
        unit = np.arange(120) // 10  # 12 batch units: 4096 sign patterns, which scipy enumerates
        totals = np.bincount(unit, weights=setting.astype(int) - ref.astype(int))
        ours = stats.sign_flip_test([setting], [ref], [unit]).pvalue
        theirs = sps.permutation_test((totals,), lambda x, axis: np.sum(x, axis=axis), vectorized=True,
                                      permutation_type="samples", n_resamples=np.inf).pvalue
        assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("units", [_image_units, _batch_units])
def test_copies_of_one_seed_give_the_interval_and_test_of_one(units):
    rng = np.random.default_rng(11)
    ref = rng.random(N) < 0.75
    setting = np.where(rng.random(N) < 0.2, ~ref, ref)
    setting[: 3 * BATCH] = False
    one = stats.change_interval([setting], [ref], [units()])
    one_acc = stats.accuracy_interval([setting], [units()])
    one_test = stats.sign_flip_test([setting], [ref], [units()])
    for copies in (2, 4):
        iv = stats.change_interval([setting] * copies, [ref] * copies, [units()] * copies)
        acc = stats.accuracy_interval([setting] * copies, [units()] * copies)
        assert iv.high - iv.low == pytest.approx(one.high - one.low, rel=0.05)
        assert acc.high - acc.low == pytest.approx(one_acc.high - one_acc.low, rel=0.05)
        assert stats.sign_flip_test([setting] * copies, [ref] * copies, [units()] * copies).pvalue == pytest.approx(
            one_test.pvalue, rel=0.05)
        assert (iv.n_units, iv.n_seeds) == (one.n_units, copies)  # distinct units, not units × seeds


def test_batches_that_differ_by_seed_are_each_seeds_own_units():
    rng = np.random.default_rng(2)
    ref = [rng.random(N) < 0.7 for _ in range(2)]
    setting = [np.where(rng.random(N) < 0.1, ~r, r) for r in ref]
    shuffled = [np.argsort(np.random.default_rng(s).permutation(N)) // BATCH for s in range(2)]
    iv = stats.change_interval(setting, ref, shuffled)
    assert iv.n_units == 2 * N // BATCH
    # never narrower than the same data read with the image as the only unit
    images = stats.change_interval(setting, ref, [_image_units()] * 2)
    assert iv.high - iv.low >= images.high - images.low
    # the test flips each seed's batches on their own (stratified by seed)
    totals = [np.bincount(u, weights=a.astype(int) - b.astype(int)) for a, b, u in zip(setting, ref, shuffled)]
    assert stats.sign_flip_test(setting, ref, shuffled).n_units == sum(int(np.count_nonzero(t)) for t in totals)


def test_all_right_gives_a_lower_end_below_100_percent():
    correct = np.ones(360, dtype=bool)
    in_batches = stats.accuracy_interval([correct], [np.arange(360) // 10])
    single = stats.accuracy_interval([correct], [np.arange(360)])
    # the Wilson bound of 36 of 36 (36 batches, each possibly one draw): 36 / (36 + 1.96²) = 90.4 %
    assert in_batches.high == 1 and in_batches.low == pytest.approx(36 / (36 + sps.norm.ppf(0.975) ** 2))
    assert in_batches.low == pytest.approx(0.9036, abs=1e-4)
    # 360 independent images: 98.9 %, next to the exact (Clopper–Pearson) 0.025^(1/360) = 98.98 %
    assert single.low == pytest.approx(0.9894, abs=1e-4)
    # and none right mirrors it
    assert stats.accuracy_interval([~correct], [np.arange(360) // 10]).high == pytest.approx(1 - in_batches.low)


def test_every_unit_moving_one_way_keeps_an_interval_off_zero_of_nonzero_width():
    ref = np.zeros(N, dtype=bool)
    setting = ref.copy()
    setting[::7] = True  # 58 images improve, none worsens
    iv = stats.change_interval([setting], [ref], [_image_units()])
    assert 0 < iv.low < iv.estimate < iv.high < 1
    assert iv.mde > 0


def test_verdict_rule_is_stated():
    rule = stats.VERDICT_RULE.lower()
    for phrase in ("95 %", "crossed", "batch", "seeds", "sign-flip", "mcnemar", "family", "minimum detectable"):
        assert phrase in rule


def test_accuracy_interval_has_binomial_width():
    correct = np.zeros(N, dtype=bool)
    correct[: 3 * N // 4] = True
    iv = stats.accuracy_interval([correct], [_image_units()])
    assert iv.estimate == 0.75 and iv.low < 0.75 < iv.high
    # Normal approximation: 2 · 1.96 · sqrt(0.75 · 0.25 / 400) ≈ 0.085.
    assert 0.07 < iv.high - iv.low < 0.10


def test_batch_level_effect_needs_batch_units():
    ref = np.zeros(N, dtype=bool)
    setting = ref.copy()
    setting[: 8 * BATCH] = True  # 8 of the 40 batches flipped whole, nothing else changes
    per_image = stats.change_interval([setting], [ref], [_image_units()])
    per_batch = stats.change_interval([setting], [ref], [_batch_units()])
    assert per_image.estimate == per_batch.estimate == 0.2
    # Forty independent units instead of 400: about √10 ≈ 3.2 times wider.
    assert per_batch.high - per_batch.low > 2 * (per_image.high - per_image.low)
    assert (per_image.n_units, per_batch.n_units) == (400, 40)


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
    assert width["agree"] == pytest.approx(width["one"])
    # two seeds that disagree leave one degree of freedom for the seeds' variance: nearly nothing is known of
    # a third seed, while the test (the seeds' models as given) keeps its power, and so its MDE
    assert width["disagree"] > 10 * width["one"]
    assert disagreeing.mde <= one.mde


# --- coverage by simulation -----------------------------------------------------------------------
# Clustered Bernoulli data with a known truth: 36 batches of 10; each batch's accuracy drawn around
# the truth, each image's own around its batch's (the same image in every seed), outcomes drawn per
# seed. 400 seeded replicates; a 95 % interval should cover the truth in 92–98 % of them.

_U, _M, _REPS = 36, 10, 400


def _clustered(rng, seeds: int, truth: float) -> np.ndarray:
    """(replicates, seeds, images) outcomes; E = truth."""
    pu = rng.beta(truth * 20, (1 - truth) * 20, size=(_REPS, _U, 1))
    pui = rng.beta(np.maximum(2 * pu, 1e-3), np.maximum(2 * (1 - pu), 1e-3), size=(_REPS, _U, _M))
    return rng.random((_REPS, seeds, _U * _M)) < pui.reshape(_REPS, 1, _U * _M)


@pytest.mark.parametrize(("truth", "seeds"), [(0.7, 1), (0.7, 3), (0.99, 1), (0.99, 3)])
def test_accuracy_intervals_cover_the_truth(truth, seeds):
    y = _clustered(np.random.default_rng(0), seeds, truth)
    unit = [np.arange(_U * _M) // _M] * seeds
    covered = [(iv := stats.accuracy_interval(list(y[r]), unit)).low <= truth <= iv.high for r in range(_REPS)]
    assert 0.92 <= np.mean(covered) <= 0.98


@pytest.mark.parametrize(("reference", "up", "down", "seeds", "whole_batches"),
                         [(0.7, 0.1, 0.02, 1, False), (0.7, 0.1, 0.02, 3, True), (0.97, 0.5, 0.005, 1, False),
                          (0.97, 0.5, 0.005, 3, True)])
def test_change_intervals_cover_the_truth(reference, up, down, seeds, whole_batches):
    """A wrong image turns right with probability ``up``, a right one wrong with ``down``, per image or per batch."""
    rng = np.random.default_rng(0)
    ref = _clustered(rng, seeds, reference)
    shape = (_REPS, seeds, _U, 1 if whole_batches else _M)
    gain = np.broadcast_to(rng.random(shape) < up, (_REPS, seeds, _U, _M)).reshape(ref.shape)
    loss = np.broadcast_to(rng.random(shape) < down, (_REPS, seeds, _U, _M)).reshape(ref.shape)
    setting = np.where(ref, ~loss, gain)
    truth = (1 - reference) * up - reference * down
    unit = [np.arange(_U * _M) // _M] * seeds
    covered = [(iv := stats.change_interval(list(setting[r]), list(ref[r]), unit)).low <= truth <= iv.high
               for r in range(_REPS)]
    assert 0.92 <= np.mean(covered) <= 0.98


def test_a_change_of_the_stated_mde_is_detected_about_four_times_in_five():
    """Wrong images turn right with probability 0.065 (Δ = 1.95 points on 400 images); the MDE each replicate
    states sits near that Δ exactly when the test finds Δ about 80 % of the time."""
    rng = np.random.default_rng(3)
    ref = rng.random((_REPS, N)) < 0.7
    setting = ref | (rng.random(ref.shape) < 0.065)
    truth = 0.3 * 0.065
    unit = np.arange(N)
    power = np.mean([stats.sign_flip_test(setting[r], ref[r], unit).pvalue < 0.05 for r in range(_REPS)])
    mde = np.median([stats.change_interval([setting[r]], [ref[r]], [unit]).mde for r in range(_REPS)])
    assert 0.7 <= power <= 0.9
    assert mde == pytest.approx(truth, rel=0.25)


def test_holm_and_benjamini_hochberg_match_their_definitions():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, then running maximum
    assert np.allclose(stats.holm(p)[:4], [0.03, 0.06, 0.06, 0.02]) and np.isnan(stats.holm(p)[4])
    assert np.allclose(stats.benjamini_hochberg(p)[:4], sps.false_discovery_control(p[:4], method="bh"))
    # under the global null, Holm keeps the family-wise error at 5 % (2000 families of 20 uniform p-values)
    nulls = np.random.default_rng(0).random((2000, 20))
    fwer = np.mean([(stats.holm(row) < 0.05).any() for row in nulls])
    assert fwer <= 0.06
    assert np.mean([(row < 0.05).any() for row in nulls]) > 0.5  # unadjusted: most families err


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
    with pytest.raises(UserError, match="same test images"):
        stats.accuracy_interval([ref, ref[:-1]], [_image_units(), _image_units()[:-1]])


def test_batch_dependence_counts_changed_predictions():
    pred = [np.array([0, 1, 2, 3]), np.array([1, 1, 1, 1])]
    pred1 = [np.array([0, 1, 2, 0]), np.array([1, 2, 1, 1])]
    share = stats.batch_dependence(pred, pred1)
    assert share == 2 / 8
    assert stats.is_transductive(share)
    assert stats.batch_dependence(pred, pred) == 0.0
    assert not stats.is_transductive(0.0)


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
        iv = stats.change_interval([setting], [reference], [u])
        assert iv.estimate == pytest.approx(setting.mean() - reference.mean())
        assert -1 <= iv.low <= iv.estimate <= iv.high <= 1 and iv.low < iv.high  # never zero width unless told
        t = stats.sign_flip_test(setting, reference, u)
        assert t.b - t.c == int(setting.sum()) - int(reference.sum())
        assert 0 < t.pvalue <= 1
