"""Tests of noisynn/train.py: training reaches a useful model, and an interrupted run resumes exactly.

What a user relies on: the small recipes learn digits (a ViT ≥ 90 %, a ResNet ≥ 95 % clean test
accuracy); a run killed by its scheduler (SIGTERM, exit 143) and started again ends with the same
weights, bit for bit on CPU, as a run that was never interrupted, even with a random noise in the
forward pass; the run folder holds timm's contract (args.yaml, one summary.csv row per epoch,
model.safetensors with a sidecar carrying the provenance) and nothing half-written; and a run
folder is never resumed with other settings than those it was started with.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import assert_same_tensors, cli_env

from noisynn.errors import UserError
from noisynn.evaluate import evaluate_checkpoint
from noisynn.train import EXIT_INTERRUPTED, TrainConfig, train

# a random noise in the forward pass, at train and at eval: its generator must resume exactly too
GAUSSIAN = {"kind": "gaussian", "strength": 0.1}


def _finetune_config(vit_run, digits_dir, out_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        out_dir=str(out_dir),
        data_dir=str(digits_dir),
        stage="finetune",
        init_checkpoint=str(vit_run.checkpoint),
        epochs=2,
        batch_size=32,  # 1077 training images → 34 steps per epoch
        lr=5e-4,
        warmup_epochs=0,
        seed=3,
        noise=GAUSSIAN,
        site=vit_run.last_site,
        apply="train+eval",
    )
    return TrainConfig(**{**settings, **overrides})


def _summary_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]


def _temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


@pytest.fixture(scope="module")
def uninterrupted_finetune(vit_run, digits_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune") / "uninterrupted"
    train(_finetune_config(vit_run, digits_dir, out))
    return out


# --- the models learn ----------------------------------------------------------------------


@pytest.mark.parametrize(("run", "floor"), [("vit_run", 0.90), ("resnet_run", 0.95)])
def test_small_recipe_reaches_its_clean_accuracy(request, digits_dir, run, floor):
    trained = request.getfixturevalue(run)
    result = evaluate_checkpoint(trained.checkpoint, digits_dir, {"kind": "none"}, None, protocols=("clean",))
    clean = result["protocols"]["clean"]
    assert clean["n"] == 360
    assert clean["top1"] >= floor, f"{trained.model_cfg['timm_name']}: clean test top-1 {clean['top1']:.3f} < {floor}"


# --- resuming ----------------------------------------------------------------------------------


def test_resume_after_stop_mid_epoch_equals_an_uninterrupted_run(vit_run, digits_dir, tmp_path, uninterrupted_finetune):
    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stopped:
        train(_finetune_config(vit_run, digits_dir, out), stop_after_steps=50)
    assert stopped.value.code == EXIT_INTERRUPTED
    state = json.loads((out / "recovery" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 50 - 34)  # stopped inside the second epoch
    assert not (out / "model.safetensors").exists()  # an interrupted run never looks finished
    assert not _temp_files(out)

    train(_finetune_config(vit_run, digits_dir, out))
    assert_same_tensors(out / "model.safetensors", uninterrupted_finetune / "model.safetensors")
    assert _without_timing(_summary_rows(out)) == _without_timing(_summary_rows(uninterrupted_finetune))


def test_run_folder_contract(uninterrupted_finetune, vit_run, digits_dir):
    out = uninterrupted_finetune
    args = yaml.safe_load((out / "args.yaml").read_text())
    expected = asdict(_finetune_config(vit_run, digits_dir, out))
    assert args == expected

    rows = _summary_rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0 <= float(row["val_top1_clean"]) <= 1
        assert 0 <= float(row["val_top1_noisy"]) <= 1  # noise applied at eval: the noisy pass is reported
        assert float(row["train_loss"]) > 0

    meta = json.loads((out / "model.json").read_text())
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert meta["seed"] == 3
    assert meta["data_fingerprint"] == manifest["fingerprint"]
    assert meta["init_checkpoint"] == str(vit_run.checkpoint)
    assert meta["stage"] == "finetune"
    assert meta["model"]["timm_name"] == "vit_tiny_patch16_224"
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["timm"] == timm.__version__
    assert meta["git_commit"] and meta["git_commit"] != "unknown"
    assert meta["train_args"]["noise"] == GAUSSIAN
    # k: one process, noise_batch not declared, so each forward pass held the whole batch
    assert meta["noise_batch"] == meta["train_args"]["batch_size"] and meta["train_args"]["noise_batch"] is None
    assert (out / "model.safetensors").is_file()
    assert not _temp_files(out)


def test_pretrain_run_folder_has_one_summary_row_per_epoch(vit_run):
    rows = _summary_rows(vit_run.run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, vit_run.recipe["epochs"] + 1))
    assert float(rows[-1]["val_top1_clean"]) > float(rows[0]["val_top1_clean"])
    meta = json.loads((vit_run.run_dir / "model.json").read_text())
    assert meta["stage"] == "pretrain" and meta["seed"] == 0
    assert not _temp_files(vit_run.run_dir)


def test_rerun_with_other_settings_starts_over_and_same_settings_give_the_same_weights(digits_dir, resnet_run, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(out), data_dir=str(digits_dir), stage="finetune", init_checkpoint=str(resnet_run.checkpoint),
                      epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0)
    train(cfg)
    shutil.copy(out / "model.safetensors", tmp_path / "before.safetensors")
    assert not (out / "recovery").exists()  # a finished run leaves no state for a later run to take up
    train(TrainConfig(**{**asdict(cfg), "num_workers": 0}))  # the same run again: the same weights
    assert_same_tensors(out / "model.safetensors", tmp_path / "before.safetensors")
    assert len(_summary_rows(out)) == 1

    # an interrupted run whose settings then change must not resume the old state (a workflow's rerun:
    # Snakemake deletes the job's outputs first, so the folder holds no finished run)
    for name in ("model.safetensors", "model.json"):
        (out / name).unlink()
    with pytest.raises(SystemExit):
        train(TrainConfig(**{**asdict(cfg), "epochs": 2}), stop_after_steps=20)
    capsys.readouterr()

    # a workflow rerun after a settings change must not hand back the old weights
    changed = TrainConfig(**{**asdict(cfg), "epochs": 2, "lr": 2e-3})
    train(changed)
    log = capsys.readouterr().out
    assert "discarding the resume state" in log and "lr was 0.001, now 0.002" in log
    fresh = tmp_path / "fresh"
    train(TrainConfig(**{**asdict(changed), "out_dir": str(fresh)}))
    assert_same_tensors(out / "model.safetensors", fresh / "model.safetensors")


def test_finetune_on_data_of_another_size_is_a_transfer_said_and_recorded(vit_run, tmp_path, capsys):
    from noisynn.data import prepare_digits

    prepare_digits(tmp_path / "digits8", image_size=8)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "digits8"), stage="finetune",
                      init_checkpoint=str(vit_run.checkpoint), epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0)
    train(cfg)
    assert "transfer from data" in capsys.readouterr().out  # never in silence
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    pretrained = json.loads(vit_run.checkpoint.with_suffix(".json").read_text())
    assert meta["transfer"]["pretrain_data_fingerprint"] == pretrained["data_fingerprint"]
    assert "input 16 → 8 px" in meta["transfer"]["adapted"]
    assert meta["image_size"] == 8


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"noise": {"kind": "gaussian", "sigma": 1.0}, "site": "layer4.0"}, "sigma"),
        ({"noise": {"kind": "gaussian"}, "site": None}, "site"),
        ({"noise": {"kind": "gaussian"}, "site": "blocks.0"}, "layer4.0"),  # lists the valid sites
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"init_checkpoint": None}, "init_checkpoint"),
        ({"batch_size": None}, "batch_size is required"),
        ({"apply": "train"}, "eval, train\\+eval"),
    ],
)
def test_bad_training_settings_are_user_errors(resnet_run, digits_dir, tmp_path, overrides, key):
    settings = dict(out_dir=str(tmp_path / "run"), data_dir=str(digits_dir), stage="finetune",
                    init_checkpoint=str(resnet_run.checkpoint), epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0)
    with pytest.raises(UserError, match=key):
        train(TrainConfig(**{**settings, **overrides}))


@pytest.mark.slow
def test_sigterm_then_rerun_via_cli_ends_with_the_weights_of_an_uninterrupted_run(resnet_run, digits_dir, tmp_path):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "noisynn", "finetune", "--data", str(digits_dir), "--init", str(resnet_run.checkpoint),
                "--out", str(out), "--train", json.dumps({"epochs": 3, "batch_size": 32, "lr": 5e-4, "warmup_epochs": 0}),
                "--seed", "5", "--noise", json.dumps({"kind": "impulse", "strength": 0.05}), "--site", resnet_run.last_site,
                "--apply", "train+eval"]

    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 600
    while not (out / "summary.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the first epoch was summarized"
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "resume state saved" in stdout
    assert "Traceback" not in stderr
    assert not (out / "model.safetensors").exists()
    assert not _temp_files(out)
    state = json.loads((out / "recovery" / "state.json").read_text())
    assert state["epoch"] < 3

    rerun = subprocess.run(command(out), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    assert_same_tensors(out / "model.safetensors", reference / "model.safetensors")
    assert _without_timing(_summary_rows(out)) == _without_timing(_summary_rows(reference))
    assert not _temp_files(out)


def test_interrupted_copy_of_a_run_folder_resumes_elsewhere(vit_run, digits_dir, tmp_path, uninterrupted_finetune):
    # a scheduler may restart the job on another node with the folder synced to another path
    first = tmp_path / "first"
    with pytest.raises(SystemExit):
        train(_finetune_config(vit_run, digits_dir, first), stop_after_steps=20)
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    train(_finetune_config(vit_run, digits_dir, moved))
    assert_same_tensors(moved / "model.safetensors", uninterrupted_finetune / "model.safetensors")


def test_training_on_an_image_folder_end_to_end(tmp_path):
    """The ImageNet path at toy size: prepare, pretrain with timm's augmentation, evaluate."""
    from conftest import write_image_folder

    from noisynn.data import prepare_image_folder
    from noisynn.evaluate import evaluate_checkpoint

    root = tmp_path / "folder"
    write_image_folder(root / "train", {"a": 6, "b": 6}, size=16, seed=0)
    write_image_folder(root / "val", {"a": 3, "b": 3}, size=16, seed=1)
    prepare_image_folder(tmp_path / "prepared", root, image_size=16)
    # the released code's transforms (preprocess: released): its training crop too must replay from the seed
    model = {"timm_name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8},
             "preprocess": "released"}
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "prepared"), model=model, epochs=2,
                      batch_size=4, lr=1e-3, warmup_epochs=0, num_workers=0)
    train(cfg)
    again = tmp_path / "again"
    train(TrainConfig(**{**asdict(cfg), "out_dir": str(again)}))
    assert_same_tensors(tmp_path / "run" / "model.safetensors", again / "model.safetensors")
    result = evaluate_checkpoint(tmp_path / "run" / "model.safetensors", tmp_path / "prepared",
                                 {"kind": "linear-optimal", "axis": "batch"}, "layer4.0", test_batch_size=3)
    assert result["protocols"]["released"]["n"] == 6
    # the evaluation says how its images were fed: the preprocess travelled in the checkpoint's sidecar
    assert result["preprocess"] == "released" and result["test_transform"]["std"] == [0.229, 0.224, 0.225]
    assert (result["predictions"]["batch1"] == result["predictions"]["clean"]).all()


def test_the_recorded_commit_is_dirty_for_changed_code_not_for_rewritten_results(tmp_path):
    """A workflow run rewrites committed results (MNIST's checkpoints' sidecars, say) as it goes;
    the provenance must still name the clean commit then, and say -dirty when code or config differ."""
    import subprocess

    from noisynn.io.provenance import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "noisynn").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "noisynn" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "summary.csv").write_text("epoch\n1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    package = tmp_path / "noisynn"
    clean = git_commit(package)
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "results" / "summary.csv").write_text("epoch\n1\n2\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # dvc repro, between its stages
    assert git_commit(package) == clean
    (tmp_path / "noisynn" / "code.py").write_text("x = 2\n")
    assert git_commit(package) == clean + "-dirty"


def test_a_noise_at_a_batchnorm_still_acts_after_the_syncbatchnorm_conversion():
    """Under torchrun on GPUs every BatchNorm is replaced by a SyncBatchNorm: the noise is hooked in
    afterwards, so a noise at a BatchNorm site keeps acting (checked here on the CPU, in eval mode)."""
    from conftest import RESNET_MODEL

    from noisynn.distributed import Distributed
    from noisynn.models.build import build_model
    from noisynn.noise import NoiseSpec
    from noisynn.train import prepare_model

    model = build_model(RESNET_MODEL, 10, 1).eval()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    spec = NoiseSpec.from_dict({"kind": "linear-optimal", "axis": "batch"})
    cfg = TrainConfig(out_dir="unused", data_dir="unused", stage="finetune", epochs=1, batch_size=4, lr=1e-3,
                      noise=spec.to_dict(), site="layer2.0.bn1")
    model, train_model, handle = prepare_model(model, cfg, spec, Distributed(), torch.device("cpu"), sync_batchnorm=True)
    site = model.get_submodule("layer2.0.bn1")
    assert isinstance(site, torch.nn.SyncBatchNorm)
    assert train_model is model
    received = []
    site.register_forward_hook(lambda module, args, output: received.append(args[0].clone()))
    with torch.no_grad():
        handle.enabled = False
        model.eval()(x)
        handle.enabled = True
        model(x)
    clean, noised = received
    assert handle.last_input_shape is not None and handle.last_input_shape[0] == 4, "the hook never fired"
    # the SyncBatchNorm receives every image averaged with the others of its batch (optimal Q)
    assert not torch.equal(noised, clean)
    torch.testing.assert_close(noised.mean(0), clean.mean(0))


def test_the_resume_state_holds_the_cuda_generator_where_there_is_one(tmp_path, monkeypatch):
    from noisynn import resume
    from noisynn.distributed import Distributed

    dist = Distributed()  # one process, on this CUDA-less machine
    saved, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a, **k: restored.append(state.clone()))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    resume.save(tmp_path, dist, model, optimizer, None, {"epoch": 0, "step": 3, "rows": []}, {"loss_sum": 1.0})
    assert resume.load(tmp_path, dist, torch.device("cpu"), model, optimizer) is not None
    assert len(restored) == 1 and torch.equal(restored[0], saved)
