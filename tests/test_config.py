"""Config validation: every shipped config passes, every mistake is one sentence naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noisynn.errors import UserError
from noisynn.pipeline.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def tiny() -> dict:
    return yaml.safe_load((REPO / "config/tiny.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml"])
def test_shipped_digits_configs_validate(name):
    cfg = load_config(REPO / "config" / name)
    # defaults are filled in, so the workflow reads every key without .get()
    assert cfg["finetune"]["min_lr"] == 1e-6
    assert cfg["evaluate"]["protocols"][0] == "clean"


@pytest.mark.parametrize("name", ["paper-imagenet.yaml", "tinyimagenet.yaml"])
def test_paper_configs_validate_against_a_dataset_folder(tmp_path, name):
    for sub in ("train", "val"):
        (tmp_path / sub / "n01440764").mkdir(parents=True)
        (tmp_path / sub / "n01440764" / "0.JPEG").write_bytes(b"")  # the check looks for image names, not pixels
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg["dataset"]["root"] = str(tmp_path)
    out = validate_config(cfg, name)
    assert all(m["skip_pretrain"] for m in out["models"].values())


@pytest.mark.parametrize(
    "edit, key, expected",
    [
        (lambda c: c.update(extra=1), "(top level)", "unknown key 'extra'"),
        (lambda c: c["finetune"].update(lr="fast"), "finetune.lr", "expected number"),
        (lambda c: c["finetune"].update(lr=0), "finetune.lr", "> 0"),
        (lambda c: c["noises"][2].update(strength=[1.5]), "noises.2.strength", "[0, 1]"),
        (lambda c: c["noises"][4].pop("alpha"), "noises.4.alpha", "required"),
        (lambda c: c["noises"][3].update(axis=["diagonal"]), "noises.3.axis.0", "batch, rows, features"),
        (lambda c: c["noises"][3].update(models=["mlp"]), "noises.3.models", "not a model"),
        (lambda c: c["dataset"].update(image_size=12), "dataset.image_size", "8, 16 or 32"),
        (lambda c: c["dataset"].update(kind="imagefolder"), "dataset.root", "expected the folder"),
        (lambda c: c["models"]["vit"].update(pretrained="/no/weights.safetensors"), "models.vit.pretrained", "does not exist"),
        (lambda c: c.update(seeds=[0, 0]), "seeds", "non-unique"),
        (lambda c: c.update(finetune=None), "noises.3.apply", "train+eval needs a fine-tuning"),
        (lambda c: c.update(pretrain=None), "models.vit.skip_pretrain", "pretrain is null"),
        (lambda c: c["noises"][1].update(detach=True), "noises.1.detach", "only the linear noises"),
        (lambda c: c["noises"][4].update(neighbour="left"), "noises.4.neighbour", "previous, next"),
        (lambda c: c["models"]["resnet"].update(reported_metric="mean"), "models.resnet.reported_metric", "running, plain"),
    ],
)
def test_each_mistake_is_one_sentence_naming_file_and_key(edit, key, expected):
    cfg = tiny()
    edit(cfg)
    with pytest.raises(UserError) as err:
        validate_config(cfg, "config/mine.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("config/mine.yaml: key ") and key in msg and expected in msg


def test_missing_or_unparsable_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def _on_processes(resources: dict, **finetune) -> dict:
    cfg = tiny()
    cfg["models"]["vit"]["resources"] = resources
    cfg["finetune"].update(finetune)
    return cfg


@pytest.mark.parametrize("resources", [{"nproc": 2}, {"gpu": 4}])
def test_a_world_size_that_changes_k_is_refused_with_its_fixes(resources):
    """tiny's optimal-Q fine-tuning (batch 64) mixes 64 samples on one process; on N it would mix 64 / N."""
    world = next(iter(resources.values()))
    with pytest.raises(UserError) as e:
        validate_config(_on_processes(resources), "tiny.yaml")
    message = str(e.value)
    assert message.startswith(f"tiny.yaml: key finetune.noise_batch: model vit trains on {world} processes")
    assert f"would mix {64 // world}, not the 64" in message
    assert f"batch_size {64 * world} (64 per process)" in message and f"noise_batch {64 // world}" in message


def test_k_declared_for_the_processes_or_no_batch_mixing_noise_in_training_passes():
    assert validate_config(_on_processes({"nproc": 2}, noise_batch=32), "tiny.yaml")
    # 2 processes × 32 a step, each in two forward passes of 16 (gradient accumulation)
    assert validate_config(_on_processes({"nproc": 2}, batch_size=64, noise_batch=16), "tiny.yaml")
    cfg = _on_processes({"nproc": 2})
    for entry in cfg["noises"]:
        entry["apply"] = ["eval"]  # the batch is never mixed in training: k does not matter there
    assert validate_config(cfg, "tiny.yaml")
    with pytest.raises(UserError, match="finetune.noise_batch.*would mix 32, not the 24"):
        validate_config(_on_processes({"nproc": 2}, noise_batch=24), "tiny.yaml")


def test_the_paper_config_declares_the_released_k():
    """The released ViT code fine-tunes at batch 16 on one GPU (runScript.txt: --batch_size 16 --gpu_id 0;
    NoisyViT-OptimalQ/Main.py builds no DataParallel), so its batch-axis noise mixes 16."""
    cfg = yaml.safe_load((REPO / "config/paper-imagenet.yaml").read_text())
    assert cfg["finetune"]["noise_batch"] == cfg["finetune"]["batch_size"] == 16
    assert all(m["resources"]["gpu"] == 1 for m in cfg["models"].values())
