"""The experiment grid: readable unique paths, eval-only noise reusing the vanilla training, and the
evaluation groups (one job, one pass up to the site, per checkpoint and site)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noisynn.pipeline.config import load_config, validate_config
from noisynn.pipeline.grid import Grid
from noisynn.pipeline.model_checks import model_checks
from noisynn.vocab import RELEASED_NOISE, noise_token

REPO = Path(__file__).resolve().parents[1]


def test_noise_tokens_are_readable_and_distinct():
    assert noise_token({"kind": "gaussian", "strength": 0.5, "mean": 0.0, "std": 1.0}) == "gaussian_s0.5"
    assert noise_token({"kind": "linear-shift", "alpha": 0.3, "axis": "rows"}) == "linear-shift_a0.3_rows"
    # the released CNN variant is its own setting; the eq. 17 defaults keep the old token
    assert noise_token({"kind": "linear-shift", "alpha": 0.3, "axis": "batch", "neighbour": "next", "detach": True}) \
        == "linear-shift_a0.3_batch_next_detach"
    assert noise_token({"kind": "linear-shift", "alpha": 0.3, "axis": "batch", "neighbour": "previous",
                        "detach": False}) == "linear-shift_a0.3_batch"
    grid = Grid(load_config(REPO / "config/config.yaml"))
    assert all("/" not in t and " " not in t for t in grid.noises)


def test_two_settings_that_one_path_token_would_name_are_refused_at_the_config_check():
    import pytest

    from noisynn.errors import UserError

    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    gaussian = next(i for i, n in enumerate(cfg["noises"]) if n["kind"] == "gaussian")
    cfg["noises"][gaussian]["strength"] = [0.1, 0.1000001]  # both gaussian_s0.1: one would overwrite the other
    with pytest.raises(UserError, match=rf"my.yaml: key noises.{gaussian}: the noise settings strength = 0.1 and "
                                        r"0.1000001 share the path token gaussian_s0.1"):
        validate_config(cfg, "my.yaml", check_folders=False)
    cfg["noises"][gaussian]["strength"] = [0.1, 0.100001]  # distinct within 6 digits: distinct tokens
    assert {"gaussian_s0.1", "gaussian_s0.100001"} <= set(Grid(validate_config(cfg, "my.yaml", check_folders=False)).noises)


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


def test_every_evaluation_has_a_distinct_record_and_the_layer_sweep_adds_sites():
    cfg = load_config(REPO / "config/config.yaml")
    grid = Grid(cfg)
    keys = [e.key for e in grid.evaluations]
    assert len(keys) == len(set(keys))
    for model, m in cfg["models"].items():
        swept = {e.site for e in grid.evaluations if e.model == model and e.noise == "linear-optimal_batch" and e.apply == "eval"}
        assert swept == set(m["layer_sweep_sites"]) | {m["site"]}
        # only the evaluations at the configured site are the model's default-site ones
        assert all(e.default_site == (e.site in (m["site"], "none")) for e in grid.evaluations if e.model == model)


@pytest.mark.parametrize("sweep", [
    {"kind": "linear-optimal"},
    {"kind": "linear-shift"},
    {"kind": "linear-shift", "alpha": 0.5, "axis": "rows", "neighbour": "next", "detach": "partner"},
    {"kind": "linear-optimal", "axis": "features", "neighbour": "previous", "detach": True},
])
def test_the_layer_sweep_evaluates_the_noise_the_config_check_tried_at_each_site(sweep):
    """A sweep noise the model check tried is the one the sweep's evaluations inject, default
    alpha, neighbour and detach included: else a noise that is the identity at a site could pass."""
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["layer_sweep"] = sweep
    config = validate_config(cfg, "tiny.yaml", check_folders=False)
    grid = Grid(config)
    evaluated = {(e.model, e.site): grid.noises[e.noise] for e in grid.evaluations if not e.default_site}
    tried = {(c["name"], site): noise for c in model_checks(config, "tiny.yaml")
             for key, site, noise in c["noises"] if key == "layer_sweep.axis" and site != config["models"][c["name"]]["site"]}
    assert evaluated and tried == evaluated


def test_groups_share_one_checkpoint_and_one_site_and_cover_every_evaluation_once():
    cfg = load_config(REPO / "config/config.yaml")
    grid = Grid(cfg)
    members = [e for g in grid.groups for e in g.evaluations]
    assert sorted(members, key=repr) == sorted(grid.evaluations, key=repr)
    assert len(grid.group_files()) == len(set(grid.group_files())) == len(grid.groups)
    for g in grid.groups:
        assert {grid.checkpoint(e) for e in g.evaluations} == {g.checkpoint}
        assert {e.site for e in g.evaluations} <= {g.site, "none"}
        assert len({e.seed for e in g.evaluations}) == 1
    # the vanilla model is evaluated in the pass of its default site, with every eval-only setting there
    for model, m in cfg["models"].items():
        vanilla = [g for g in grid.groups if g.model == model and any(e.noise == "none" for e in g.evaluations)]
        assert all(g.site == m["site"] and g.train == "none" for g in vanilla)
        assert all(len(g.evaluations) > 5 for g in vanilla)
    # 2 seeds × (vit: default site + 3 more sweep sites + 5 noise-trained checkpoints;
    # resnet: default + 3 + 4) = 2 × (9 + 8) = 34 jobs for the 76 evaluations
    assert len(grid.evaluations) == 76 and len(grid.groups) == 34


def test_sweeps_go_with_the_released_recipe_at_the_default_site_only():
    cfg = load_config(REPO / "config/config.yaml")
    cfg["evaluate"]["sweeps"] = True
    grid = Grid(cfg)
    flagged = [s for g in grid.groups for s in grid.settings(g) if s.get("sweeps")]
    assert len(flagged) == len(cfg["models"]) * len(cfg["seeds"])
    assert all(s["noise"] == RELEASED_NOISE and s["apply"] == "eval" and s["site"] == cfg["models"][s["model"]]["site"]
               for s in flagged)
    cfg["evaluate"]["sweeps"] = False
    assert not any(s.get("sweeps") for g in Grid(cfg).groups for s in Grid(cfg).settings(g))


def test_without_finetuning_every_evaluation_uses_the_weights_as_loaded(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))  # a readable file: the grid does not look inside
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["finetune"] = None
    cfg["pretrain"] = None
    for m in cfg["models"].values():
        m.update(pretrained=str(weights), skip_pretrain=True)
    for entry in cfg["noises"]:
        entry.pop("apply", None)
    grid = Grid(validate_config(cfg, "tiny-audit"))
    assert {grid.checkpoint(e) for e in grid.evaluations} == {
        f"results/digits-tiny/{m}/imported/model.safetensors" for m in cfg["models"]}
    assert not any(e.trains_with_noise for e in grid.evaluations)


def test_the_groups_of_a_checkpoint_make_one_job_over_its_sites_and_its_seeds_where_they_share_it():
    import re

    grid = Grid(load_config(REPO / "config/config.yaml"))
    jobs = grid.evaluation_jobs("checkpoint")
    # every group in one job, on that job's checkpoint: the jobs write exactly the per-group files
    assert sorted(g.path for j in jobs for g in j.groups) == sorted(grid.group_files())
    assert all(j.checkpoints == [g.checkpoint for g in j.groups][:1] for j in jobs)
    # one job per checkpoint (the 22 fine-tunings), each with a distinct rule name
    assert len(jobs) == len({j.checkpoints[0] for j in jobs}) == len(grid.checkpoint_files()) == 22
    assert len({j.name for j in jobs}) == len(jobs) and all(re.fullmatch(r"\w+", j.name) for j in jobs)
    # a seed's vanilla fine-tuning: the default site's pass and the three other layer-sweep sites
    vanilla = next(j for j in jobs if j.folder == "vit/finetune/noise~none/site~none/seed~0")
    assert [g.site for g in vanilla.groups] == ["blocks.3.attn", "blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]

    # without fine-tuning every seed evaluates the same weights: one job per model, over its sites and seeds;
    # model names that differ in punctuation alone still name distinct jobs
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["finetune"] = None
    cfg["seeds"] = [0, 1]
    cfg["models"] = {"vit-a": cfg["models"]["vit"], "vit_a": cfg["models"]["vit"]}
    for entry in cfg["noises"]:
        entry.pop("apply", None)
    grid = Grid(validate_config(cfg, "my.yaml", check_folders=False))
    jobs = grid.evaluation_jobs("checkpoint")
    assert [j.checkpoints for j in jobs] == [[f"results/digits-tiny/{m}/pretrain/model.safetensors"] for m in ("vit-a", "vit_a")]
    assert [j.name for j in jobs] == ["vit_a_pretrain", "vit_a_pretrain_2"]
    assert {(g.site, g.seed) for g in jobs[0].groups} == {(site, seed) for site in ("blocks.1.attn", "blocks.0.attn")
                                                          for seed in (0, 1)}


def test_the_groups_of_a_model_make_one_job_over_all_its_checkpoints():
    """evaluate.jobs: model (the local profile's): one job per model, holding every group of that model
    and only those, so the jobs write exactly the per-group files; names stay word characters."""
    grid = Grid(load_config(REPO / "config/config.yaml"))
    jobs = grid.evaluation_jobs("model")
    assert [j.name for j in jobs] == list(grid.config["models"]) == ["vit", "resnet"]
    assert sorted(g.path for j in jobs for g in j.groups) == sorted(grid.group_files())
    for job in jobs:
        assert {g.model for g in job.groups} == {job.model}
        # each checkpoint once, every checkpoint of the model that an evaluation reads
        assert sorted(job.checkpoints) == sorted({g.checkpoint for g in grid.groups if g.model == job.model})
    assert sum(len(j.checkpoints) for j in jobs) == 22
    with pytest.raises(ValueError, match="per checkpoint or per model"):
        grid.evaluation_jobs("site")
