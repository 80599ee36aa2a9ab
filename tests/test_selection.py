"""Tests of test-set model selection as a measured quantity: train.record_epoch and
noisynn/report/selection.py.

What a user relies on: the best of several epochs scored on the test set overstates the model's
accuracy even when every epoch is equally good (by simulation), the validation-selected number does
not, the optimism is zero when every epoch predicts alike and its interval excludes zero when test
selection picks a truly different epoch; and a training with monitor_test records every epoch, so
`noisynn selection` reports last, best-on-test and validation-selected top-1 for it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RESNET_MODEL

from noisynn.cli import main
from noisynn.report.selection import model_selection


def _batches(n, k=10):
    return np.arange(n) // k


def test_selecting_on_the_test_set_overstates_equally_good_epochs():
    # ten epochs of the same true accuracy 0.7, each scored on its own 500 test images' luck
    rng = np.random.default_rng(0)
    best, picked = [], []
    for _ in range(200):
        test = rng.random((10, 500)) < 0.7
        val = rng.random((10, 300)) < 0.7
        r = model_selection(val, test, _batches(500), n_resamples=50)
        best.append(r["best_on_test"])
        picked.append(r["val_selected"])
    assert np.mean(best) - 0.7 > 0.02  # the maximum of ten noisy scores (about 1.5 standard errors up)
    assert abs(np.mean(picked) - 0.7) < 0.005  # val's choice is independent of the test images


def test_identical_epochs_have_no_optimism():
    rng = np.random.default_rng(1)
    test = np.tile(rng.random(400) < 0.8, (5, 1))
    val = rng.random((5, 100)) < 0.8
    r = model_selection(val, test, _batches(400))
    assert r["optimism"] == 0 and (r["optimism_low"], r["optimism_high"]) == (0, 0)
    assert r["best_on_test"] == r["val_selected"] == r["last"]


def test_a_truly_better_epoch_that_val_misses_is_a_clear_optimism():
    rng = np.random.default_rng(2)
    test = np.stack([rng.random(1000) < p for p in (0.6, 0.6, 0.9)])
    val = np.stack([rng.random(300) < p for p in (0.9, 0.5, 0.5)])  # val prefers epoch 1
    r = model_selection(val, test, _batches(1000))
    assert (r["val_epoch"], r["best_epoch"]) == (1, 3)
    assert r["optimism_low"] > 0.2 and r["optimism_low"] <= r["optimism"] <= r["optimism_high"]


def test_best_on_test_bounds_the_other_two():
    rng = np.random.default_rng(3)
    for _ in range(20):
        r = model_selection(rng.random((4, 50)) < 0.5, rng.random((4, 60)) < 0.5, _batches(60, 7), n_resamples=20)
        assert r["best_on_test"] >= max(r["val_selected"], r["last"]) and r["optimism_low"] >= 0


def test_monitor_test_records_every_epoch_for_noisynn_selection(digits_dir, tmp_path, capsys):
    from noisynn.train import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig.from_section({"epochs": 2, "batch_size": 64, "lr": 2e-3, "monitor_test": True}, out_dir=str(out),
                                   data_dir=str(digits_dir), model=RESNET_MODEL)
    train(cfg)
    assert sorted(p.name for p in (out / "selection").iterdir()) == ["epoch_0001.npz", "epoch_0002.npz"]
    assert main(["selection", str(out)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {out} | 2 | ")


def test_selection_of_a_run_without_records_is_one_sentence(tmp_path, capsys):
    assert main(["selection", str(tmp_path)]) == 2
    assert "monitor_test: true" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [np.zeros((2, 5)), np.zeros(5)])
def test_model_selection_refuses_mismatched_epochs(bad):
    with pytest.raises(ValueError):
        model_selection(np.zeros((3, 5)), bad, _batches(5))
