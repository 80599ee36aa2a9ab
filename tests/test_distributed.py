"""Data-parallel training under torchrun (gloo on CPU), and the workflow launching it.

A 2-process fine-tuning splits every global batch across the processes, so it follows the same
trajectory as one process up to floating-point summation order: it must end at the same accuracy
(within a point) and leave exactly one checkpoint, written by rank 0.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO, copy_repo, snakemake

from noisynn.errors import UserError

# The tiny config's ViT at 8 px: under a second per epoch on one CPU.
VIT_8PX = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2},
}
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
FINETUNE_ARGS = ["--train", json.dumps({"epochs": 2, "batch_size": 64, "lr": 3e-4, "warmup_epochs": 0}), "--seed", "0"]


def noisynn(*args: str, launcher: list[str] | None = None, timeout: float = 300, script: str | None = None,
            expect: int = 0) -> str:
    """Run `python [launcher] -m noisynn args` (or a script) with the repository importable; return its output."""
    # One thread per process, as Snakemake gives its jobs (and torchrun its workers): on a busy
    # two-core machine, two threads per process make these tiny models several times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, *(launcher or []), *([script] if script else ["-m", "noisynn"]), *args]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert ran.returncode == expect, f"{' '.join(command)} failed ({ran.returncode}):\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    return ran.stdout


def clean_top1(checkpoint: Path, data: Path, out: Path) -> float:
    noisynn("evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--protocols", "clean")
    return json.loads(out.read_text())["evaluations"][0]["protocols"]["clean"]["top1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """Digits at 8 px and a ViT pretrained on them for a few epochs: (data folder, checkpoint)."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    noisynn("prepare", "--kind", "digits", "--image-size", "8", "--seed", "0", "--out", str(data))
    noisynn("pretrain", "--data", str(data), "--out", str(root / "pretrain"), "--model", json.dumps(VIT_8PX),
            "--train", json.dumps({"epochs": 8, "batch_size": 64, "lr": 3e-3, "warmup_epochs": 0}), "--seed", "0")
    return data, root / "pretrain" / "model.safetensors"


@pytest.mark.slow
def test_two_process_finetuning_matches_one_process_and_writes_one_checkpoint(pretrained, tmp_path):
    data, init = pretrained
    single, double = tmp_path / "one-process", tmp_path / "two-processes"
    noisynn("finetune", "--data", str(data), "--init", str(init), "--out", str(single), *FINETUNE_ARGS)
    noisynn("finetune", "--data", str(data), "--init", str(init), "--out", str(double), *FINETUNE_ARGS,
            launcher=TORCHRUN_2)

    files = sorted(str(p.relative_to(double)) for p in double.rglob("*"))
    # the finished run's resume state is removed with it, so no later run can take it up
    assert files == ["args.yaml", "model.json", "model.safetensors", "summary.csv"], "rank 1 wrote files of its own"
    assert json.loads((double / "model.json").read_text())["world_size"] == 2
    assert len((double / "summary.csv").read_text().splitlines()) == 1 + 2, "one summary row per epoch"

    one = clean_top1(single / "model.safetensors", data, tmp_path / "one.json")
    two = clean_top1(double / "model.safetensors", data, tmp_path / "two.json")
    assert one > 0.4, f"the model is too weak for the comparison to mean anything ({one:.3f}; chance is 0.1)"
    assert abs(one - two) <= 0.01, f"clean top-1: {one:.4f} with one process, {two:.4f} with two"


@pytest.mark.slow
def test_two_process_resume_with_training_noise_is_bit_exact(pretrained, tmp_path):
    """Stopped mid-epoch and resumed, a 2-process run with Gaussian training noise ends as an uninterrupted one.

    Each rank draws its own noise and counts its own share of the loss: the resume must restore both
    per rank (weights and summary.csv, including the interrupted epoch's train_loss, bit for bit).
    """
    from conftest import assert_same_tensors

    data, init = pretrained
    script = str(Path(__file__).with_name("distributed_stop.py"))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    noisynn("0", str(data), str(init), str(whole), launcher=TORCHRUN_2, script=script)
    # each process exits 143 after saving; torchrun reports its failed children with exit status 1
    stopped = noisynn("5", str(data), str(init), str(resumed), launcher=TORCHRUN_2, script=script, expect=1)
    assert "interrupted; resume state saved at epoch 0 step 5" in stopped
    assert sorted(p.name for p in (resumed / "recovery").iterdir()) == ["rank-0.safetensors", "rank-1.safetensors",
                                                                        "state.json", "state.safetensors"]
    out = noisynn("0", str(data), str(init), str(resumed), launcher=TORCHRUN_2, script=script)
    assert "resuming" in out and "epoch 0 step 5" in out
    assert_same_tensors(whole / "model.safetensors", resumed / "model.safetensors")

    def rows(run):
        return [{k: v for k, v in r.items() if k != "epoch_seconds"}
                for r in csv.DictReader((run / "summary.csv").read_text().splitlines())]

    assert rows(resumed) == rows(whole)


@pytest.mark.slow
def test_two_process_noise_mixes_exactly_the_declared_k_and_the_sidecar_records_it(pretrained, tmp_path):
    """k is what a batch-axis noise mixes: 2 processes, 64 samples a step, noise_batch 16 → every
    noised training batch holds 16 samples (each process runs its 32 in two passes), on both ranks."""
    data, init = pretrained
    script = str(Path(__file__).with_name("distributed_capture.py"))
    out = tmp_path / "run"
    noisynn(str(data), str(init), str(out), launcher=TORCHRUN_2, script=script)
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["noise_batch"] == 16 and sidecar["world_size"] == 2
    assert sidecar["train_args"]["noise_batch"] == 16
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"hook-rank{rank}.json").read_text())
        training = [rows for is_training, rows in seen if is_training]
        # 1,078 training images: 16 full steps of 64, each rank 2 passes of 16 a step
        assert training == [16] * 32, f"rank {rank}: noised training batches of {sorted(set(training))}"
        assert any(not is_training for is_training, _ in seen), "the noisy validation ran too"


@pytest.mark.slow
def test_validation_sharded_over_two_processes_measures_what_one_process_measures(pretrained):
    data, init = pretrained
    script = str(Path(__file__).with_name("distributed_validate.py"))
    one = json.loads(noisynn(str(data), str(init), script=script).strip().splitlines()[-1])
    two = json.loads(noisynn(str(data), str(init), script=script, launcher=TORCHRUN_2).strip().splitlines()[-1])
    assert (two["clean"], two["noisy"]) == (one["clean"], one["noisy"])
    # each process ran its own whole test batches, twice over the split (clean, then noisy)
    assert one["images"] == [2 * one["n"]]
    assert sum(two["images"]) == 2 * two["n"] and min(two["images"]) > 0 and max(two["images"]) < 2 * two["n"]


def test_a_world_size_that_would_change_k_is_refused_before_any_step(tmp_path, monkeypatch):
    from noisynn.train import TrainConfig, train

    cfg = TrainConfig.from_section({"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0}, out_dir=str(tmp_path / "run"),
                                   data_dir=str(tmp_path / "no-data"), stage="finetune",
                                   init_checkpoint=str(tmp_path / "none.safetensors"),
                                   noise={"kind": "linear-optimal", "axis": "batch"}, site="blocks.1.attn")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match=r"noise_batch.*4 of the 16 samples.*batch_size 64 \(16 per process\)"):
        train(cfg)  # refused before the (missing) data or checkpoint is read
    assert not (tmp_path / "run").exists()


def test_workflow_launches_torchrun_when_a_model_asks_for_two_processes(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    # A config file, not `--config models={vit: {resources: {nproc: 2}}}`: Snakemake reads the
    # nested values of --config as strings, so nproc would be '2'.
    config = yaml.safe_load((repo / "config/tiny.yaml").read_text())
    config["models"]["vit"]["resources"] = {"nproc": 2}
    (repo / "config/tiny-nproc2.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # its optimal-Q fine-tuning would mix 32 samples per process, not the 64 of batch_size: refused
    refused = snakemake(repo, "-n", "--workflow-profile", "none", "--configfile", "config/tiny-nproc2.yaml", check=False)
    assert refused.returncode != 0
    assert "key finetune.noise_batch: model vit trains on 2 processes" in refused.stdout + refused.stderr
    assert "Shell command:" not in refused.stdout + refused.stderr
    config["finetune"]["noise_batch"] = 32  # declared: each process mixes its 32
    (repo / "config/tiny-nproc2.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = snakemake(repo, "-n", "-p", "--workflow-profile", "none", "--configfile", "config/tiny-nproc2.yaml")
    output = dry.stdout + dry.stderr
    commands = [line for line in output.splitlines() if line.startswith("Shell command:")
                and ("-m noisynn pretrain" in line or "-m noisynn finetune" in line)]
    vit = [c for c in commands if "results/digits-tiny/vit/" in c]
    resnet = [c for c in commands if "results/digits-tiny/resnet/" in c]
    assert len(vit) == 3 and len(resnet) == 3, "expected a pretraining and two fine-tunings per model"
    torchrun = "python -m torch.distributed.run --standalone --nproc_per_node=2 -m noisynn"
    assert all(torchrun in c for c in vit), vit
    assert not any("torch.distributed.run" in c for c in resnet), resnet
