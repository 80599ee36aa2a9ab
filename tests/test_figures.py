"""Tests of noisynn/figures.py on a synthetic evaluations table shaped like `noisynn aggregate`'s.

The synthetic effects are chosen so that the right answers are known: the released recipe raises
top-1 under `released` and lowers it under `shuffled`; a noise-trained checkpoint's own clean
accuracy differs from the vanilla one, so a change measured against the wrong reference shows.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noisynn import figures
from noisynn.figures import (
    FIGURES,
    NO_DATA,
    NOT_RUN,
    TABLES,
    default_sites,
    load_evaluations,
    make_figures,
    site_key,
)
from noisynn.report import COLUMNS

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "paper_results.csv"
PROTOCOLS = ("clean", "released", "shuffled", "batch1", "class_pure", "class_mixed")
MODELS = {
    "vit": ("vit_tiny_patch16_224", [f"blocks.{i}.attn" for i in range(4)], 0.80),
    "resnet": ("resnet18", [f"layer{i}.0" for i in range(1, 5)], 0.70),
}
SEEDS = (0, 1)
TEST_BATCH = 10
# noise token → (kind, strength, alpha, axis, applies, models or None for all)
NOISES = {
    "none": ("none", None, None, None, ("eval",), None),
    "gaussian_s0.1": ("gaussian", 0.1, None, None, ("eval",), None),
    "gaussian_s0.5": ("gaussian", 0.5, None, None, ("eval",), None),
    "impulse_p0.1": ("impulse", 0.1, None, None, ("eval",), None),
    "linear-optimal_batch": ("linear-optimal", None, None, "batch", ("eval", "train+eval"), None),
    "linear-shift_a0.3_batch": ("linear-shift", None, 0.3, "batch", ("eval",), None),
    "linear-shift_a0.5_batch": ("linear-shift", None, 0.5, "batch", ("eval",), ("vit",)),  # singular at even k
}
# change of top-1 under each noisy protocol, by noise kind (released raises, shuffled lowers for linear)
LINEAR_EFFECT = {"released": 0.15, "shuffled": -0.10, "batch1": 0.0, "class_pure": 0.18, "class_mixed": -0.12}
TRAIN_WITH_NOISE_CLEAN_SHIFT = 0.03  # a noise-trained checkpoint's own clean top-1 vs the vanilla one


def _jitter(*parts) -> float:
    """A fixed pseudo-random offset in [-0.004, 0.004], different per seed, protocol and setting."""
    return ((zlib.crc32("|".join(map(str, parts)).encode()) % 9) - 4) * 0.001


def _theory(kind, alpha, k):
    if kind in ("gaussian", "impulse"):
        return 0.0
    if kind == "linear-optimal":
        return (k - 1) * math.log(k + 1)
    det = (1 - alpha) ** k - (-alpha) ** k
    return math.inf if det == 0 else -math.log(abs(det))


def _top1(model, noise, apply, site, seed, protocol) -> float:
    kind, strength, alpha = NOISES[noise][:3]
    _, sites, base = MODELS[model]
    clean = base + 0.01 * seed
    if apply == "train+eval":
        clean += TRAIN_WITH_NOISE_CLEAN_SHIFT + 0.004 * seed
    if protocol == "clean" or kind == "none":
        return round(clean, 6)
    if kind == "gaussian":
        effect = -0.2 * strength
    elif kind == "impulse":
        effect = -0.5 * strength
    else:
        scale = 0.5 if kind == "linear-shift" else 1.0
        effect = scale * LINEAR_EFFECT[protocol] * (1 + sites.index(site)) / len(sites)
    return round(clean + effect + _jitter(model, noise, apply, site, seed, protocol), 6)


def synthetic_rows(dataset: str = "digits") -> list[dict]:
    """2 models × noises × apply × sites (default + the sweep) × 2 seeds × 6 protocols × 3 metrics."""
    settings = []
    for model, (timm_name, sites, _) in MODELS.items():
        for noise, (kind, strength, alpha, axis, applies, only) in NOISES.items():
            if only and model not in only:
                continue
            for apply in applies:
                settings.append((model, noise, apply, "none" if kind == "none" else sites[-1]))
        for site in sites[:-1]:  # the layer sweep; its last site is the default one, already there
            settings.append((model, "linear-optimal_batch", "eval", site))
    rows = []
    for model, noise, apply, site in settings:
        kind, strength, alpha, axis = NOISES[noise][:4]
        for seed in SEEDS:
            evaluation = f"results/{dataset}/{model}/evaluate/noise~{noise}/apply~{apply}/site~{site}/seed~{seed}/evaluation.json"
            for protocol in PROTOCOLS:
                bs = 1 if protocol == "batch1" else TEST_BATCH
                noise_on = protocol != "clean" and kind != "none"
                k = bs if (noise_on and kind.startswith("linear")) else None
                top1 = _top1(model, noise, apply, site, seed, protocol)
                for metric, value in (("top1", top1), ("top5", min(1.0, top1 + 0.1)),
                                      ("released_metric_top1", top1 + 0.02)):
                    row = {
                        "dataset": dataset, "model": model, "timm_name": MODELS[model][0], "noise": noise,
                        "noise_kind": kind, "strength": strength, "alpha": alpha, "axis": axis, "apply": apply,
                        "site": site, "seed": seed, "protocol": protocol, "order": "shuffled", "batch_size": bs,
                        "noise_applied": noise_on, "metric": metric, "value": value, "n": 360,
                        "mixed_axis_size": k,
                        "theory_delta_S": _theory(kind, alpha, k or 0) if noise_on and (k or not kind.startswith("linear")) else None,
                        "checkpoint": f"ckpt/{model}/{noise if apply != 'eval' else 'none'}/{seed}",
                        "evaluation": evaluation, "data_fingerprint": "sha256:feed", "git_commit": "abc123",
                        "noisynn": "0.1.0", "torch": "2.14.1", "timm": "1.0.31",
                    }
                    row["row_id"] = "|".join(str(row[c]) for c in ("model", "noise", "apply", "site", "seed", "protocol", "metric"))
                    rows.append(row)
    return rows


def write_synthetic(path: Path, rows: list[dict] | None = None) -> Path:
    pd.DataFrame(synthetic_rows() if rows is None else rows, columns=COLUMNS).to_csv(path, index=False)
    return path


def _paper_with_match(path: Path) -> Path:
    """The real paper table plus one row that the synthetic data matches (model = timm name, dataset digits)."""
    paper = pd.read_csv(PAPER, dtype=str, keep_default_na=False)
    extra = {c: "" for c in paper.columns}
    extra.update(claim_id="synthetic_match", model="vit_tiny_patch16_224", dataset="digits", noise="linear-optimal",
                 protocol="released", metric="top1_percent", value="50.0", source="test")
    pd.concat([paper, pd.DataFrame([extra])]).to_csv(path, index=False)
    return path


def _declared(out: Path) -> list[Path]:
    files = [out / "figures" / f"{n}.{e}" for n in FIGURES for e in ("png", "pdf")]
    files += [out / "tables" / f"{n}.{e}" for n in TABLES for e in ("csv", "md", "tex")]
    return files + [out / "SUMMARY.md", out / "metrics.json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    csv = write_synthetic(root / "evaluations.csv")
    paper = _paper_with_match(root / "paper_results.csv")
    make_figures(csv, paper, root / "out", "digits")
    return {"root": root, "csv": csv, "paper": paper, "out": root / "out", "rows": pd.DataFrame(synthetic_rows())}


def _sel(rows: pd.DataFrame, **where) -> pd.DataFrame:
    for k, v in where.items():
        rows = rows[rows[k] == v]
    return rows


def _fmt(values, sign=False) -> str:
    v = np.asarray(values, dtype=float) * 100
    m = f"{v.mean():+.1f}" if sign else f"{v.mean():.1f}"
    return f"{m} ± {v.std(ddof=1):.1f}"


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
            out.append(dict(zip(header, cells)))
    return out


def test_every_declared_file_exists_and_is_not_empty(run):
    for f in _declared(run["out"]):
        assert f.is_file() and f.stat().st_size > 0, f


def test_default_site_is_where_the_non_sweep_settings_were_injected(run):
    df = load_evaluations(run["csv"], "digits")
    assert default_sites(df) == {"vit": "blocks.3.attn", "resnet": "layer4.0"}
    only_sweep = df[(df["noise"] == "linear-optimal_batch") & (df["apply"] == "eval")]
    assert default_sites(only_sweep) == {"vit": "blocks.3.attn", "resnet": "layer4.0"}  # last in module order


def test_sites_sort_in_module_order():
    assert sorted(["blocks.10.attn", "blocks.2.attn", "blocks.9.attn"], key=site_key) == [
        "blocks.2.attn", "blocks.9.attn", "blocks.10.attn"]
    assert sorted(["layer4.0", "layer1.1", "layer1.0"], key=site_key) == ["layer1.0", "layer1.1", "layer4.0"]


def test_audit_cell_is_mean_and_sample_std_over_seeds(run):
    table = pd.read_csv(run["out"] / "tables" / "audit.csv", dtype=str, keep_default_na=False)
    cell = _sel(table, model="vit", noise="linear-optimal_batch", apply="eval")
    assert len(cell) == 1 and cell["site"].iloc[0] == "blocks.3.attn"  # the sweep's other sites stay out
    values = _sel(run["rows"], model="vit", noise="linear-optimal_batch", apply="eval", site="blocks.3.attn",
                  protocol="released", metric="top1")["value"]
    assert len(values) == 2
    assert cell["released"].iloc[0] == _fmt(values)
    assert cell["n_seeds"].iloc[0] == "2"


def test_entropy_change_is_against_the_same_checkpoints_clean(run):
    table = pd.read_csv(run["out"] / "tables" / "entropy.csv", dtype=str, keep_default_na=False)
    row = _sel(table, model="vit", noise="linear-optimal_batch", apply="train+eval", k="10")
    assert len(row) == 1
    rows = _sel(run["rows"], model="vit", noise="linear-optimal_batch", apply="train+eval", metric="top1")
    own = _sel(rows, protocol="released")["value"].to_numpy() - _sel(rows, protocol="clean")["value"].to_numpy()
    vanilla = _sel(run["rows"], model="vit", noise="none", protocol="clean", metric="top1")["value"].to_numpy()
    wrong = _sel(rows, protocol="released")["value"].to_numpy() - vanilla
    assert row["Δtop1 released (pp)"].iloc[0] == _fmt(own, sign=True)
    assert _fmt(own, sign=True) != _fmt(wrong, sign=True)
    assert row["theory ΔS"].iloc[0] == f"{9 * math.log(11):.4g}"
    batch1 = _sel(table, model="vit", noise="linear-optimal_batch", apply="train+eval", k="1")
    assert batch1["theory ΔS"].iloc[0] == "0" and batch1["Δtop1 released (pp)"].iloc[0] == ""
    singular = _sel(table, model="vit", noise="linear-shift_a0.5_batch", k="10")
    assert singular["theory ΔS"].iloc[0].startswith("+inf")


def test_paper_vs_ours_has_every_paper_row_and_ours_only_where_run(run):
    table = pd.read_csv(run["out"] / "tables" / "paper_vs_ours.csv", dtype=str, keep_default_na=False)
    paper = pd.read_csv(run["paper"], dtype=str, keep_default_na=False)
    assert table["claim_id"].tolist() == paper["claim_id"].tolist()
    real = table[table["claim_id"] != "synthetic_match"]
    assert (real["ours"] == NOT_RUN).all()
    match = table[table["claim_id"] == "synthetic_match"].iloc[0]
    values = _sel(run["rows"], model="vit", noise="linear-optimal_batch", apply="eval", site="blocks.3.attn",
                  protocol="released", metric="released_metric_top1")["value"].to_numpy() * 100
    assert match["ours"] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    assert "metric=released_metric_top1" in match["ours_filter"] and "apply=eval" in match["ours_filter"]


def test_summary_verdicts_follow_the_seed_spread(run):
    text = (run["out"] / "SUMMARY.md").read_text()
    assert text.startswith("# NoisyNN audit: digits")
    linear = text.split("### Claim: linear-transform")[1].split("### Claim: Gaussian")[0]
    row = next(r for r in _md_rows(linear) if (r["model"], r["noise"], r["apply"]) == ("vit", "linear-optimal_batch", "eval"))
    assert row["released"].endswith(" raised")
    assert row["shuffled"].endswith(" lowered")
    assert row["clean"].endswith(" unchanged")  # same checkpoint, noise off: exactly the vanilla numbers
    assert "model=vit, noise=linear-optimal_batch, apply=eval, site=blocks.3.attn, metric=top1" in row["filter (protocol = column)"]
    harmful = text.split("### Claim: Gaussian")[1].split("## Files")[0]
    g = next(r for r in _md_rows(harmful) if (r["model"], r["noise"]) == ("resnet", "gaussian_s0.5"))
    assert all(g[p].endswith(" lowered") for p in PROTOCOLS[1:])
    assert "identity by construction" in text and "`abc123`" in text and "seeds: 0, 1" in text


def test_metrics_json_holds_the_headline_numbers(run):
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    assert set(metrics) == {"vit", "resnet"}
    assert set(metrics["vit"]) == {"clean_top1", "released_recipe"}
    assert set(metrics["vit"]["released_recipe"]) == {"released_top1", "released_metric_top1", "shuffled_top1",
                                                      "batch1_top1", "class_pure_top1", "class_mixed_top1"}
    vanilla = _sel(run["rows"], model="resnet", noise="none", protocol="clean", metric="top1")["value"].mean()
    assert metrics["resnet"]["clean_top1"] == round(vanilla, 4)


def test_a_second_run_gives_the_same_table_bytes(run, monkeypatch):
    monkeypatch.setattr(figures, "_save_figure", lambda fig, stem: None)  # figures: see the empty-config test
    again = run["root"] / "again"
    make_figures(run["csv"], run["paper"], again, "digits")
    for first in _declared(run["out"]):
        if first.suffix in (".csv", ".md", ".tex", ".json"):
            second = again / first.relative_to(run["out"])
            assert first.read_bytes() == second.read_bytes(), first.name
    shutil.rmtree(again)


def test_a_config_without_data_still_writes_every_file_and_the_same_bytes_twice(tmp_path):
    csv = write_synthetic(tmp_path / "evaluations.csv", rows=[])
    for out in (tmp_path / "out", tmp_path / "again"):
        make_figures(csv, PAPER, out, "digits")
    for f in _declared(tmp_path / "out"):
        assert f.is_file() and f.stat().st_size > 0, f
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "out")).read_bytes(), f.name
    assert NO_DATA in (tmp_path / "out" / "tables" / "audit.md").read_text()
    assert pd.read_csv(tmp_path / "out" / "tables" / "audit.csv").empty
    assert (pd.read_csv(tmp_path / "out" / "tables" / "paper_vs_ours.csv")["ours"] == NOT_RUN).all()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {}
