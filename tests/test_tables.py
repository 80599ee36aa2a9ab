"""Tests of noisynn/report/tables.py: the tables a reader and `noisynn compare` read, on known synthetic effects."""

from __future__ import annotations

import pandas as pd
import pytest
import report_fixture as fx

from noisynn.report import compare, stats
from noisynn.report.results import NO_DATA
from noisynn.report.summary import make_report
from noisynn.report.tables import CHANGES_COLUMNS, NOT_RUN, to_booktabs
from noisynn.vocab import PROTOCOLS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fx.report_run(tmp_path_factory, "both_models")


def _table(run, name: str) -> pd.DataFrame:
    return pd.read_csv(run["out"] / "tables" / f"{name}.csv", dtype=str, keep_default_na=False)


def _row(table: pd.DataFrame, **where) -> pd.Series:
    for k, v in where.items():
        table = table[table[k] == v]
    assert len(table) == 1, where
    return table.iloc[0]


def test_cells_hold_the_compare_columns_and_every_setting_under_every_protocol(run):
    cells = compare.read_cells(run["out"])
    assert list(cells.columns) == compare.CELLS_COLUMNS and set(cells["metric"]) == {"top1"}
    evaluations = pd.read_csv(run["evaluations"], dtype=str, keep_default_na=False)
    settings = evaluations[["model", "noise", "apply", "site"]].drop_duplicates()
    assert len(cells) == len(settings) * len(PROTOCOLS)
    assert set(map(tuple, cells[compare.KEY[:4]].to_numpy())) == set(map(tuple, settings.to_numpy()))
    assert ((cells["ci_low"] <= cells["value"]) & (cells["value"] <= cells["ci_high"])).all()
    assert set(cells["n_seeds"]) == {len(fx.SEEDS)}
    assert compare.compare(cells, cells).all_consistent


def test_changes_give_the_interval_test_adjusted_p_verdict_and_batch_dependence_of_each_setting(run):
    changes = _table(run, "changes")
    assert list(changes.columns) == CHANGES_COLUMNS
    site = fx.MODELS["vit"][1][-1]
    gain = _row(changes, model="vit", noise=fx.RECIPE, apply="eval", site=site, protocol="released")
    assert gain["verdict"] == "raised" and 0 < float(gain["ci_low"]) < float(gain["change"]) < float(gain["ci_high"])
    assert gain["transductive"] == "True" and float(gain["batch_dependence"]) > 0
    assert int(gain["worsened"]) == 0 and float(gain["pvalue"]) < 0.05 and gain["test"] == stats.TEST_NAME
    # the paper's claim: the primary family, Holm; the adjusted p-value is the one the verdict follows
    assert (gain["family"], gain["adjustment"]) == ("primary", "Holm")
    assert float(gain["pvalue"]) <= float(gain["adjusted_pvalue"]) < 0.05
    assert (gain["unit"], int(gain["n_units"])) == ("batch", fx.N // fx.BATCH)  # distinct batches, not × seeds
    assert 0 < float(gain["mde"]) < float(gain["change"])
    null = _row(changes, model="vit", noise="linear-shift_a0.3_batch", site=site, protocol="class_mixed")
    assert null["verdict"] == "no evidence" and null["family"] == "other" and null["adjustment"] == "Benjamini-Hochberg"
    assert float(null["adjusted_pvalue"]) >= 0.05
    off = _row(changes, model="vit", noise="gaussian_s0.5", site=site, protocol="clean")  # noise off: the vanilla model
    assert (off["verdict"], off["family"], off["test"], off["ci_low"], off["ci_high"]) == (
        "zero by construction", "", "", "0.0", "0.0")
    shown = (run["out"] / "tables" / "changes.md").read_text()
    for header in ("MDE (pp)", "sign-flip p", "adjusted p", "improved / worsened"):
        assert header in shown
    assert "(Holm)" in shown and "(Benjamini-Hochberg)" in shown
    per_image = _row(changes, model="vit", noise="linear-shift_a0.3_features", site=site, protocol="shuffled")
    assert per_image["transductive"] == "False"
    assert "raised" in (run["out"] / "tables" / "changes.md").read_text()


def test_the_audit_table_labels_transductive_settings(run):
    audit = _table(run, "audit")
    assert _row(audit, model="vit", noise=fx.RECIPE, apply="eval")["transductive"] == "yes"
    assert _row(audit, model="vit", noise="linear-shift_a0.3_features")["transductive"] == "no"
    assert _row(audit, model="vit", noise="gaussian_s0.5")["transductive"] == "no (random draw)"
    cell = _row(audit, model="vit", noise=fx.RECIPE, apply="eval")["released"]
    value, bounds = cell.split(" [")
    low, high = (float(x) for x in bounds.rstrip("]").split(", "))
    assert low < float(value) < high
    assert fx.MODELS["vit"][1][0] not in set(audit["site"])  # the layer sweep's other sites stay out


def test_released_reports_the_metric_of_each_models_released_code(run):
    text = (run["out"] / "SUMMARY.md").read_text()
    evaluations = pd.read_csv(run["evaluations"])
    for model, metric, label in (("vit", "released_metric_top1", "running accuracy"), ("resnet", "top1", "plain top-1")):
        rows = evaluations[(evaluations["model"] == model) & (evaluations["noise"] == fx.RECIPE)
                           & (evaluations["apply"] == "eval") & (evaluations["site"] == fx.MODELS[model][1][-1])
                           & (evaluations["protocol"] == "released") & (evaluations["metric"] == metric)]
        line = next(x for x in text.splitlines() if x.startswith(f"| {model} ") and f"| {fx.RECIPE} " in x)
        assert f"| {100 * rows['value'].mean():.1f}" in line and label in line


def test_paper_vs_ours_compares_with_the_reported_metric_and_gives_intervals(run):
    table = _table(run, "paper_vs_ours")
    paper = pd.read_csv(run["paper"], dtype=str, keep_default_na=False)
    assert table["claim_id"].tolist() == paper["claim_id"].tolist()
    assert (table[~table["claim_id"].str.startswith("synthetic")]["ours"] == NOT_RUN).all()
    vit = _row(table, claim_id="synthetic_vit")
    assert "metric=released_metric_top1" in vit["ours_filter"] and vit["ours_ci95"] == ""
    resnet = _row(table, claim_id="synthetic_resnet")
    assert "metric=top1" in resnet["ours_filter"] and resnet["ours_ci95"].startswith("[")
    assert _row(table, claim_id="synthetic_gain")["ours_ci95"].startswith("[")


def test_the_entropy_table_measures_against_the_same_checkpoints_clean(run):
    entropy = _table(run, "entropy")
    trained = _row(entropy, model="vit", noise=fx.RECIPE, apply="train+eval", k="10")
    claims = _table(run, "changes")
    against_vanilla = _row(claims, model="vit", noise=fx.RECIPE, apply="train+eval", protocol="released")
    own = float(trained["Δtop1 released (pp)"].split(" [")[0])
    assert own == pytest.approx(100 * float(against_vanilla["change"]) - 3.0, abs=0.06)
    assert _row(entropy, model="vit", noise=fx.RECIPE, apply="train+eval", k="1")["theory ΔS"] == "0"


def test_the_sweep_tables_hold_each_point_and_say_so_without_sweeps(run, tmp_path_factory):
    batch_size = _table(run, "batch_size")
    assert len(batch_size) == len(fx.MODELS) * 3 * len(fx.SWEEP_KS)
    point = _row(batch_size, model="vit", order="class_pure", k="64")
    assert point["noise top-1"].count("[") == 1 and "[" not in point["pooling control top-1"]
    assert len(_table(run, "purity")) == len(fx.MODELS) * 10
    assert len(_table(run, "pooling_control")) == len(fx.MODELS) * 4
    empty = fx.report_run(tmp_path_factory, "no_sweeps")["out"] / "tables"
    for name in ("batch_size", "purity", "pooling_control"):
        assert pd.read_csv(empty / f"{name}.csv").empty
        assert NO_DATA in (empty / f"{name}.md").read_text() and NO_DATA in (empty / f"{name}.tex").read_text()


def test_without_per_image_predictions_the_tables_keep_the_means_and_claim_nothing(tmp_path):
    paths = fx.build(tmp_path, predictions=False, models=("vit",))
    make_report(paths["evaluations"], paths["sweeps"], paths["paper"], tmp_path / "out", fx.DATASET, only="summary")
    assert pd.read_csv(tmp_path / "out" / "tables" / "cells.csv").empty
    audit = pd.read_csv(tmp_path / "out" / "tables" / "audit.csv", dtype=str, keep_default_na=False)
    assert _row(audit, noise=fx.RECIPE, apply="eval")["released"] == "90.8"  # the mean over seeds, no interval
    assert set(_table({"out": tmp_path / "out"}, "changes")["verdict"]) == {"no data"}


def test_booktabs_escape_what_latex_would_read_as_commands():
    tex = to_booktabs(pd.DataFrame({"Δtop1 (pp)": ["+1.0 [0.5, 1.5]"], "share": ["12.0 %"], "noise": ["a_b"]}))
    assert r"$\Delta$top1" in tex and r"12.0 \%" in tex and r"a\_b" in tex and tex.count(r"\toprule") == 1
