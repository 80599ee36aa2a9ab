"""Tests of noisynn/report/results.py on synthetic evaluations whose effects are known (tests/report_fixture.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import report_fixture as fx
from conftest import assert_user_error

from noisynn.report import stats
from noisynn.report.results import Results, load_evaluations, load_sweeps, site_key


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fx.shared_inputs(tmp_path_factory, "both_models")


@pytest.fixture(scope="module")
def r(run) -> Results:
    return Results(load_evaluations(run["evaluations"], fx.DATASET), load_sweeps(run["sweeps"], fx.DATASET))


def _setting(r: Results, model="vit", noise=fx.RECIPE, apply="eval", site=None):
    return r.setting(model, noise, apply, site or fx.MODELS[model][1][-1])


def test_the_built_in_gain_is_raised_and_its_interval_excludes_zero(r):
    recipe = _setting(r)
    for protocol in ("released", "class_pure"):
        ch = r.change(recipe, protocol)
        assert r.verdict(recipe, protocol).word == "raised" and ch.interval.low > 0, protocol
    shuffled = r.change(recipe, "shuffled")
    assert r.verdict(recipe, "shuffled").word == "lowered" and shuffled.interval.high < 0


def test_a_null_setting_has_no_evidence(r):
    null = _setting(r, noise="linear-shift_a0.3_batch")
    ch = r.change(null, "released")
    assert r.verdict(null, "released").word == "no evidence" and ch.interval.low < 0 < ch.interval.high
    assert ch.interval.mde > abs(ch.interval.estimate)


def test_the_change_is_paired_on_the_images_and_the_test_counts_the_discordant_ones(r):
    recipe = _setting(r)
    ch = r.change(recipe, "released")
    mine = [fx.setting_correct("vit", fx.RECIPE, "eval", recipe.site, s, "released")[0] for s in fx.SEEDS]
    ref = [fx.vanilla_correct("vit", s) for s in fx.SEEDS]
    assert ch.test.b == sum(int((m & ~v).sum()) for m, v in zip(mine, ref))
    assert ch.test.c == sum(int((~m & v).sum()) for m, v in zip(mine, ref)) == 0  # the built-in gain only adds
    assert ch.interval.estimate == pytest.approx(np.mean([m.mean() - v.mean() for m, v in zip(mine, ref)]))


def test_a_batch_mixing_protocol_counts_batches_and_a_per_image_one_images_once_over_the_seeds(r):
    n_batches = fx.N // fx.BATCH
    # the class-sorted batches are the same in every seed: one set of units, shared
    assert r.accuracy(_setting(r), "released").n_units == n_batches
    assert r.unit(_setting(r), "released") == "batch"
    # shuffled batches differ by seed: each seed's batches are its own units
    assert r.accuracy(_setting(r, noise="impulse_p0.1"), "shuffled").n_units == n_batches * len(fx.SEEDS)
    assert r.accuracy(_setting(r), "clean").n_units == fx.N  # the noise off: the images, not images × seeds
    assert r.unit(_setting(r), "clean") == "image"
    assert r.accuracy(_setting(r, noise="gaussian_s0.5"), "released").n_units == fx.N
    assert r.accuracy(_setting(r, noise="linear-shift_a0.3_features"), "released").n_units == fx.N


def test_the_papers_claims_are_one_family_under_holm_and_the_rest_another_under_bh(r):
    verdicts = r.verdicts()
    primary = {(s.model, p) for (s, p), v in verdicts.items() if v.family == "primary"}
    # the released recipe under released, shuffled and class_mixed; under batch1 it is the identity (untested)
    assert primary == {(m, p) for m in fx.MODELS for p in ("released", "shuffled", "class_mixed")}
    for m in fx.MODELS:
        assert verdicts[(r.released_recipe(m), "batch1")].word == "zero by construction"
    for family, adjust in (("primary", stats.holm), ("other", stats.benjamini_hochberg)):
        cells = [(k, v) for k, v in verdicts.items() if v.family == family]
        raw = [r.change(*k).test.pvalue for k, _ in cells]
        assert np.allclose([v.adjusted_pvalue for _, v in cells], adjust(raw))
        for (k, v), p in zip(cells, raw):
            assert v.adjusted_pvalue >= p
            # the verdict word follows the adjusted decision, not the raw p-value
            assert (v.word in ("raised", "lowered")) == (v.adjusted_pvalue < 0.05), k


def test_a_change_is_zero_by_construction_only_where_the_setting_is_its_reference(r):
    gaussian = _setting(r, noise="gaussian_s0.5")
    assert r.change(gaussian, "clean").by_construction  # noise off on the vanilla checkpoint
    assert r.verdict(gaussian, "clean").word == "zero by construction"
    assert not r.change(gaussian, "batch1").by_construction  # a Gaussian draw is no identity at k = 1
    trained = _setting(r, apply="train+eval")
    assert not r.change(trained, "clean").by_construction  # another checkpoint


def test_predictions_that_change_from_batch1_make_a_setting_transductive(r):
    recipe, per_image = _setting(r), _setting(r, noise="linear-shift_a0.3_features")
    assert r.batch_dependence(recipe, "released") > 0 and r.is_transductive(recipe)
    assert r.batch_dependence(per_image, "released") == 0 and r.is_transductive(per_image) is False
    assert r.batch_dependence(r.vanilla("vit"), "released") == 0 and r.is_transductive(r.vanilla("vit")) is False
    gaussian = _setting(r, noise="gaussian_s0.5")
    assert r.batch_dependence(gaussian, "shuffled") > 0 and r.is_transductive(gaussian) is False  # a random draw
    assert r.batch_dependence(recipe, "clean") is None  # noise off there, on under batch1: not comparable


def test_a_noise_trained_checkpoint_is_compared_with_the_vanilla_model_and_with_its_own_clean(r):
    trained = _setting(r, apply="train+eval")
    assert r.change(trained, "clean").interval.estimate == pytest.approx(0.03)
    assert r.change(trained, "clean", True).interval.estimate == 0
    own, vanilla = r.change(trained, "released", True), r.change(trained, "released")
    assert own.interval.estimate == pytest.approx(vanilla.interval.estimate - 0.03)


def test_settings_and_default_sites_come_from_the_recorded_columns(r):
    assert r.sites == {"vit": "blocks.3.attn", "resnet": "layer4.0"}
    shift = _setting(r, noise="linear-shift_a0.3_batch")
    assert (shift.kind, shift.alpha, shift.axis, shift.neighbour, shift.detach) == ("linear-shift", 0.3, "batch",
                                                                                   "previous", False)
    [vit_sweep] = [g for g in r.layer_sweeps() if g[0].model == "vit"]
    assert [s.site for s in vit_sweep] == fx.MODELS["vit"][1] and [s.default_site for s in vit_sweep] == [False] * 3 + [True]
    assert r.reported_metric("vit") == "released_metric_top1" and r.reported_metric("resnet") == "top1"


def test_sites_sort_in_module_order():
    assert sorted(["blocks.10.attn", "blocks.2.attn", "blocks.9.attn"], key=site_key) == [
        "blocks.2.attn", "blocks.9.attn", "blocks.10.attn"]


def test_sweep_points_carry_intervals_where_the_predictions_keep_batches(r):
    pts = r.sweep_points()
    pure = pts[(pts["model"] == "vit") & (pts["experiment"] == "batch_size") & (pts["order"] == "class_pure")]
    pure = pure.sort_values("batch_size")
    noise, pooled = pure[pure["variant"] == "noise"], pure[pure["variant"] == "pooling_control"]
    assert noise["value"].is_monotonic_increasing and noise["value"].iloc[-1] > noise["value"].iloc[0]
    assert (noise["ci_low"] <= noise["value"]).all() and (noise["value"] <= noise["ci_high"]).all()
    assert pooled["ci_low"].isna().all()  # the pooled batch-size sweep keeps no batch index
    purity = pts[(pts["model"] == "vit") & (pts["experiment"] == "purity")].sort_values("m")
    assert len(purity) == 10 and purity["ci_low"].notna().all() and purity["value"].is_monotonic_increasing
    assert set(pts["n_seeds"]) == {len(fx.SEEDS)}


def test_the_same_inputs_give_the_same_intervals(run, r):
    again = Results(load_evaluations(run["evaluations"], fx.DATASET))
    assert again.change(_setting(again), "released") == r.change(_setting(r), "released")


def test_a_missing_predictions_file_is_named(run, tmp_path):
    df = pd.read_csv(run["evaluations"], dtype=str, keep_default_na=False)
    df["predictions"] = str(tmp_path / "gone.npz")
    df.to_csv(tmp_path / "evaluations.csv", index=False)
    r = Results(load_evaluations(tmp_path / "evaluations.csv", fx.DATASET))
    with pytest.raises(ValueError) as excinfo:
        r.accuracy(r.vanilla("vit"), "clean")
    assert_user_error(excinfo, str(tmp_path / "gone.npz"))


def test_an_evaluations_table_without_the_new_columns_is_refused(run, tmp_path):
    df = pd.read_csv(run["evaluations"], dtype=str, keep_default_na=False).drop(columns=["default_site"])
    df.to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(ValueError) as excinfo:
        load_evaluations(tmp_path / "old.csv", fx.DATASET)
    assert_user_error(excinfo, str(tmp_path / "old.csv"), "default_site")
