"""Tests of noisynn/report/summary.py: SUMMARY.md, metrics.json and make_report, on known synthetic effects."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import report_fixture as fx
from conftest import assert_user_error

from noisynn.pipeline import codedigest
from noisynn.report.plots import FIGURES
from noisynn.report.results import NO_DATA
from noisynn.report.stats import VERDICT_RULE
from noisynn.report.summary import GROUPS, TABLE_NAMES, declared_files, make_report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fx.report_run(tmp_path_factory, "both_models")


def _md_rows(text: str) -> list[dict]:
    """The rows of the markdown tables in ``text`` as dicts (header → cell)."""
    out, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            out.append(dict(zip(header, cells, strict=True)))
    return out


def test_summary_opens_with_the_headline_figure_and_puts_the_audit_figure_below(run):
    text = (run["out"] / "SUMMARY.md").read_text()
    assert text.startswith(f"# NoisyNN audit: {fx.DATASET}")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["figures/headline.png", "figures/audit.png"]
    assert text.index("figures/headline.png") < text.index("## The released recipe") < text.index("figures/audit.png")
    assert text.index("### Claim: Gaussian") < text.index("figures/audit.png")


def test_summary_explains_the_verdict_rule_and_calls_each_built_in_effect_by_it(run):
    text = (run["out"] / "SUMMARY.md").read_text()
    assert VERDICT_RULE in text and "one standard deviation" not in text
    family = text.split("**One family, one error rate.**")[1].split("\n")[0]
    # two models × released, shuffled, class_mixed (batch1 is the identity there, not tested)
    assert "6 tested contrasts" in family and "Holm" in family and "Benjamini-Hochberg" in family
    assert "family-wise error rate" in family and "false discovery" in family
    linear = text.split("### Claim: linear-transform")[1].split("### Claim: Gaussian")[0]
    rows = {(r["model"], r["noise"], r["apply"]): r for r in _md_rows(linear)}
    recipe = rows[("vit", fx.RECIPE, "eval")]
    assert recipe["released"].endswith(" raised") and recipe["shuffled"].endswith(" lowered")
    low = float(recipe["released"].split("[")[1].split(",")[0])
    assert low > 0
    assert rows[("vit", "linear-shift_a0.3_batch", "eval")]["released"].endswith(" no evidence")
    assert "model=vit, noise=linear-optimal_batch, apply=eval, site=blocks.3.attn, metric=top1" in recipe[
        "filter (protocol = column)"]
    harmful = {(r["model"], r["noise"]): r for r in _md_rows(text.split("### Claim: Gaussian")[1].split("##")[0])}
    assert harmful[("resnet", "gaussian_s0.5")]["shuffled"].endswith(" lowered")
    assert "identity by construction" in text and "`abc123`" in text and "seeds: 0, 1" in text


def test_summary_names_the_transductive_settings(run):
    section = (run["out"] / "SUMMARY.md").read_text().split("## Batch dependence")[1].split("\n## ")[0]
    assert "transductive" in section and f"vit `{fx.RECIPE}` (eval" in section
    assert "linear-shift_a0.3_features" not in section.split("Transductive here")[1]
    assert "gaussian" not in section.split("Transductive here")[1]


def test_metrics_json_holds_the_headline_numbers_with_their_intervals(run):
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    assert set(metrics) == {"vit", "resnet"}
    vit = metrics["vit"]
    assert vit["clean_top1_ci_low"] < vit["clean_top1"] < vit["clean_top1_ci_high"]
    recipe = vit["released_recipe"]
    assert {"released_top1", "released_metric_top1", "released_reported", "shuffled_top1", "batch1_top1",
            "class_pure_top1", "class_mixed_top1", "change_vs_vanilla"} <= set(recipe)
    assert recipe["released_reported"] == recipe["released_metric_top1"]  # the ViT code's running accuracy
    assert metrics["resnet"]["released_recipe"]["released_reported"] == metrics["resnet"]["released_recipe"]["released_top1"]
    assert recipe["change_vs_vanilla"]["released"]["ci_low"] > 0
    vanilla = pd.read_csv(run["evaluations"]).query("model == 'resnet' and noise == 'none' and protocol == 'clean' "
                                                    "and metric == 'top1'")["value"].mean()
    assert metrics["resnet"]["clean_top1"] == round(vanilla, 4)


def test_a_second_run_writes_the_same_bytes(tmp_path_factory):
    for only in ("summary", "headline"):
        first = fx.report_run(tmp_path_factory, "both_models", only=only)["out"]
        second = fx.report_run(tmp_path_factory, "both_models", only=only, out="again")["out"]
        for name in declared_files(only):
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_every_declared_file_is_written_even_without_sweep_data(tmp_path_factory):
    for only in ("summary", "headline", "batch_size", "purity"):
        out = fx.report_run(tmp_path_factory, "no_sweeps", only=only)["out"]
        for name in declared_files(only):
            assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert NO_DATA in (out / "tables" / "batch_size.md").read_text()
    assert (out / "figures" / "headline.png").stat().st_size > (out / "figures" / "purity.png").stat().st_size


def test_a_config_without_evaluations_still_writes_every_file(tmp_path_factory):
    out = fx.report_run(tmp_path_factory, "empty", only=None)["out"]
    again = fx.report_run(tmp_path_factory, "empty", only="summary", out="again")["out"]
    for name in declared_files():
        assert (out / name).stat().st_size > 0, name
    for name in declared_files("summary"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert pd.read_csv(out / "tables" / "cells.csv").empty
    assert json.loads((out / "metrics.json").read_text()) == {}


def test_the_workflow_declares_exactly_the_files_the_report_writes():
    rules = (fx.REPO / "workflow" / "rules" / "report.smk").read_text()
    tables = ast.literal_eval(re.search(r"^TABLES = (\[.*?\])$", rules, re.M | re.S).group(1))
    # the rules read the figures from the plotting module's source (codedigest.figures), not from a copy
    assert re.search(r"^FIGURES = list\(figures\(\)\)", rules, re.M) and codedigest.figures() == FIGURES
    assert set(tables) == set(TABLE_NAMES)
    assert set(GROUPS) == {"summary", *FIGURES}
    assert "tables/cells.csv" in declared_files("summary") and "tables/cells.csv" in rules.replace("{OUT}/", "")


def test_an_unknown_output_group_is_refused(run, tmp_path):
    with pytest.raises(ValueError) as excinfo:
        make_report(run["evaluations"], run["sweeps"], run["paper"], tmp_path, fx.DATASET, only="everything")
    assert_user_error(excinfo, "--only", "summary", "headline", "'everything'")


def test_summary_says_which_data_each_stage_used(run, tmp_path):
    """A transfer config pretrains on other data: the summary says so, in the stages' order."""
    stages = {"evaluation": "digits (digits, 16 px), test split", "pretraining": "mnist (mnist, 28 px)",
              "fine-tuning": "digits (digits, 16 px)"}
    make_report(run["evaluations"], run["sweeps"], run["paper"], tmp_path, fx.DATASET, only="summary", stages=stages)
    line = next(x for x in (tmp_path / "SUMMARY.md").read_text().splitlines() if x.startswith("Data of each stage"))
    assert line == ("Data of each stage: pretraining: mnist (mnist, 28 px); fine-tuning: digits (digits, 16 px); "
                    "evaluation: digits (digits, 16 px), test split.")


def test_the_report_modules_need_neither_torch_nor_the_evaluation_code():
    code = ("import sys, noisynn.report.summary, noisynn.report.results, noisynn.report.tables, noisynn.report.plots; "
            "print(sorted(m for m in ('torch', 'noisynn.evaluate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=fx.REPO)
    assert out.stdout.strip() == "[]"
