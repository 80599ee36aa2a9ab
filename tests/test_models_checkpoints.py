"""Tests of noisynn/models/checkpoints.py (and the weights files of noisynn/models/weights.py it reads).

What a user relies on: a saved checkpoint comes back as the same function (identical logits), and
equal weights give equal bytes; a checkpoint of the wrong model, a missing or foreign sidecar or a
damaged weights file is refused in one sentence naming the file and the models involved, never
unpickled and never a traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import RESNET_MODEL, VIT_MODEL, state_of

from noisynn.errors import UserError
from noisynn.models.build import build_model
from noisynn.models.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, read_sidecar, save_checkpoint
from noisynn.models.weights import sidecar_path


def _copy_checkpoint(src, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "model.safetensors"
    shutil.copy(src, dst)
    shutil.copy(sidecar_path(src), sidecar_path(dst))
    return dst


def _images(n=6, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_cfg", [VIT_MODEL, RESNET_MODEL], ids=["vit", "resnet"])
def test_checkpoint_round_trips_to_identical_logits(model_cfg, tmp_path):
    torch.manual_seed(1)
    model = build_model(model_cfg, num_classes=10, in_chans=1).eval()
    # move the batch-norm statistics off their defaults, so that buffers are checked too
    model.train()
    with torch.no_grad():
        model(_images(8, seed=2))
    model.eval()
    weights = tmp_path / "model.safetensors"
    save_checkpoint(model, weights, {"model": model_cfg, "num_classes": 10, "in_chans": 1})
    loaded, meta = load_checkpoint(weights)
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta["format"] == CHECKPOINT_FORMAT
    assert meta["model"]["timm_name"] == model_cfg["timm_name"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_equal_weights_give_equal_checkpoint_bytes(tmp_path):
    # content-hashing tools (DVC, Snakemake's checksums) must see a re-saved checkpoint as unchanged
    torch.manual_seed(0)
    model = build_model(RESNET_MODEL, num_classes=10, in_chans=1)
    meta = {"model": RESNET_MODEL, "num_classes": 10, "in_chans": 1}
    saved = set()
    for i in range(8):
        save_checkpoint(model, tmp_path / f"{i}.safetensors", meta)
        saved.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(saved) == 1


def test_trained_checkpoint_loads_with_the_expected_model(vit_run):
    model, meta = load_checkpoint(vit_run.checkpoint, expect_model="vit_tiny_patch16_224")
    assert meta["num_classes"] == 10
    saved = state_of(vit_run.checkpoint)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_vit_checkpoint_where_a_resnet_is_expected_names_both(vit_run):
    with pytest.raises(UserError) as err:
        load_checkpoint(vit_run.checkpoint, expect_model="resnet18")
    assert "vit_tiny_patch16_224" in str(err.value)
    assert "resnet18" in str(err.value)
    assert str(vit_run.checkpoint) in str(err.value)


def test_weights_that_do_not_match_their_sidecar_are_refused(vit_run, resnet_run, tmp_path):
    # a ResNet's sidecar beside a ViT's weights (a file copied into the wrong folder)
    weights = tmp_path / "model.safetensors"
    shutil.copy(vit_run.checkpoint, weights)
    shutil.copy(sidecar_path(resnet_run.checkpoint), sidecar_path(weights))
    with pytest.raises(UserError, match=str(weights)) as err:
        load_checkpoint(weights)
    assert "resnet18" in str(err.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nothing.safetensors")):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_missing_sidecar_is_named(vit_run, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copy(vit_run.checkpoint, weights)
    with pytest.raises(UserError, match="model.json") as err:
        load_checkpoint(weights)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize(
    "sidecar_text",
    [
        json.dumps({"format": "timm-checkpoint/9", "model": {"timm_name": "vit_tiny_patch16_224"}}),
        json.dumps({"model": {"timm_name": "vit_tiny_patch16_224"}}),
        "{ not json",
    ],
    ids=["foreign-format", "no-format", "not-json"],
)
def test_sidecar_of_the_wrong_format_is_named(vit_run, tmp_path, sidecar_text):
    weights = _copy_checkpoint(vit_run.checkpoint, tmp_path)
    sidecar_path(weights).write_text(sidecar_text)
    with pytest.raises(UserError, match=str(sidecar_path(weights))):
        read_sidecar(weights)
    with pytest.raises(UserError, match=str(sidecar_path(weights))):
        load_checkpoint(weights)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # header intact, tensor data cut short
        lambda b: b[:100],  # header cut short
        lambda b: b"",  # empty file
        lambda b: b"PK\x03\x04 a zip, e.g. a torch.save pickle renamed" * 10,
        lambda b: b[:8] + b"\x00" * (len(b) - 8),  # header wiped
    ],
    ids=["half", "first-100-bytes", "empty", "not-safetensors", "zeroed-header"],
)
def test_damaged_weights_file_is_a_user_error(vit_run, tmp_path, damage):
    weights = _copy_checkpoint(vit_run.checkpoint, tmp_path)
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UserError, match=str(weights)):
        load_checkpoint(weights)
