"""The experiment grid: readable unique paths, and eval-only noise reusing the vanilla training."""

from __future__ import annotations

from pathlib import Path

from noisynn.config import load_config
from noisynn.grid import Grid, noise_token

REPO = Path(__file__).resolve().parents[1]


def test_noise_tokens_are_readable_and_distinct():
    assert noise_token({"kind": "gaussian", "strength": 0.5, "mean": 0.0, "std": 1.0}) == "gaussian_s0.5"
    assert noise_token({"kind": "linear-shift", "alpha": 0.3, "axis": "rows"}) == "linear-shift_a0.3_rows"
    grid = Grid(load_config(REPO / "config/config.yaml"))
    tokens = list(grid.noises)
    assert len(tokens) == len(set(tokens))
    assert all("/" not in t and " " not in t for t in tokens)


def test_eval_only_noise_reuses_the_vanilla_checkpoint():
    grid = Grid(load_config(REPO / "config/config.yaml"))
    for e in grid.evaluations:
        ckpt = grid.checkpoint(e)
        if e.apply == "eval" or e.noise == "none":
            assert "/finetune/noise~none/site~none/" in ckpt
        else:
            assert f"/finetune/noise~{e.noise}/site~{e.site}/seed~{e.seed}/" in ckpt
    # the vanilla fine-tuning of a seed is shared by every eval-only setting of that model
    vanilla = {grid.checkpoint(e) for e in grid.evaluations if e.apply == "eval"}
    assert len(vanilla) == len(grid.config["models"]) * len(grid.config["seeds"])


def test_every_evaluation_has_a_distinct_path_and_the_layer_sweep_adds_sites():
    cfg = load_config(REPO / "config/config.yaml")
    grid = Grid(cfg)
    paths = grid.evaluation_files()
    assert len(paths) == len(set(paths))
    for model, m in cfg["models"].items():
        swept = {e.site for e in grid.evaluations if e.model == model and e.noise == "linear-optimal_batch" and e.apply == "eval"}
        assert swept == set(m["layer_sweep_sites"]) | {m["site"]}
