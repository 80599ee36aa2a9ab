"""Tests of noisynn/report/aggregate.py: the tidy tables are one row per evaluation × protocol × metric,
carry each evaluation's own record (nothing parsed out of a path), and are the same file whatever the
order of the inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from noisynn.errors import UserError
from noisynn.report.aggregate import METRICS, aggregate


def _protocol(order: str, batch_size: int, top1: float) -> dict:
    return {"order": order, "batch_size": batch_size, "noise_applied": True, "top1": top1, "top5": 1.0,
            "released_metric_top1": top1, "released_metric_top5": 1.0, "n": 360}


def _group(path, seed: int, sweeps: bool = False):
    setting = {"dataset": "digits", "model": "vit", "noise": "linear-shift_a0.3_batch", "apply": "eval",
               "site": "blocks.3.attn", "seed": seed, "default_site": True}
    ev = {"setting": setting, "noise": {"kind": "linear-shift", "alpha": 0.3, "axis": "batch"},
          "protocols": {"released": _protocol("class_sorted", 10, 0.9), "batch1": _protocol("shuffled", 1, 0.8)}}
    if sweeps:
        ev["sweeps"] = {"batch_size": [{"order": "shuffled", "batch_size": k, "top1": 0.8, "n": 360} for k in (1, 2)],
                        "purity": [{"m": m, "batch_size": 10, "top1": 0.8, "n": 360} for m in (1, 10)],
                        "pooling_control": {"batch_size": [{"order": "shuffled", "batch_size": 2, "top1": 0.7}],
                                            "protocols": {"released": {"batch_size": 10, "top1": 0.95}}}}
    group = {"model": "vit_tiny_patch16_224", "site": "blocks.3.attn", "seed": seed, "checkpoint": "c.safetensors",
             "data_fingerprint": "fp", "git_commit": "abc", "reported_metric": "running", "predictions": None,
             "versions": {"noisynn": "0.1.0", "torch": "2.14.1", "timm": "1.0.31"}, "evaluations": [ev]}
    path.write_text(json.dumps(group))
    return path


def test_one_row_per_protocol_and_metric_with_the_settings_own_record(tmp_path):
    aggregate([_group(tmp_path / "a.json", 0)], tmp_path / "e.csv")
    table = pd.read_csv(tmp_path / "e.csv")
    assert len(table) == 2 * len(METRICS)
    assert set(table["protocol"]) == {"released", "batch1"} and set(table["metric"]) == set(METRICS)
    row = table[(table["protocol"] == "released") & (table["metric"] == "top1")].iloc[0]
    assert (row["alpha"], row["axis"], row["order"], row["batch_size"], row["value"]) == (0.3, "batch", "class_sorted", 10, 0.9)
    assert pd.isna(row["predictions"])  # the evaluation wrote none, and says so


def test_the_same_evaluations_in_any_order_give_the_same_file(tmp_path):
    groups = [_group(tmp_path / f"{s}.json", s, sweeps=True) for s in (0, 1, 2)]
    aggregate(groups, tmp_path / "a.csv", tmp_path / "a-sweeps.csv")
    aggregate(groups[::-1], tmp_path / "b.csv", tmp_path / "b-sweeps.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a-sweeps.csv").read_bytes() == (tmp_path / "b-sweeps.csv").read_bytes()
    sweeps = pd.read_csv(tmp_path / "a-sweeps.csv")
    # per seed: 2 batch sizes and 2 purity points with the noise, 1 + 1 pooling-control points
    assert len(sweeps) == 3 * 6
    assert sweeps.groupby(["experiment", "variant"]).size().to_dict() == {
        ("batch_size", "noise"): 6, ("batch_size", "pooling_control"): 3, ("protocol", "pooling_control"): 3,
        ("purity", "noise"): 6}


def test_a_file_that_is_no_evaluation_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x"}')
    with pytest.raises(UserError, match=f"evaluation {bad} has no 'evaluations' list"):
        aggregate([bad], tmp_path / "e.csv")
    assert not (tmp_path / "e.csv").exists()
