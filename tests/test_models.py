"""Tests of noisynn/models.py: models by timm name, checkpoints as safetensors plus a JSON sidecar.

What a user relies on: a saved checkpoint comes back as the same function (identical logits);
a checkpoint of the wrong model, a missing or foreign sidecar, a damaged weights file, local
pretrained weights of another architecture, or hub weights without a network are each refused in
one sentence naming the file and the models involved, never unpickled and never a traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import RESNET_MODEL, VIT_MODEL, state_of

from noisynn.errors import UserError
from noisynn.models import (
    CHECKPOINT_FORMAT,
    build_model,
    check_model_fits_data,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
    sidecar_path,
)


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


def test_pretrained_weights_of_another_architecture_name_both_models(vit_run):
    cfg = {**RESNET_MODEL, "pretrained": str(vit_run.checkpoint)}
    with pytest.raises(UserError) as err:
        build_model(cfg, num_classes=10, in_chans=1)
    message = str(err.value)
    assert "resnet18" in message
    assert "vit_tiny_patch16_224" in message
    assert str(vit_run.checkpoint) in message


def test_pretrained_weights_load_everything_but_a_new_classifier(vit_run):
    trained = state_of(vit_run.checkpoint)
    cfg = {**VIT_MODEL, "pretrained": str(vit_run.checkpoint)}
    model = build_model(cfg, num_classes=3, in_chans=1)  # a 3-class task: the 10-class head cannot be reused
    state = model.state_dict()
    assert tuple(state["head.weight"].shape) == (3, 64)
    for key, value in state.items():
        if not key.startswith("head."):
            assert torch.equal(value, trained[key]), key


def test_pretrained_weights_must_be_an_existing_safetensors_file(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "missing.safetensors")):
        build_model({**VIT_MODEL, "pretrained": str(tmp_path / "missing.safetensors")}, 10, 1)
    pickle = tmp_path / "weights.pth"
    pickle.write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(UserError, match=str(pickle)):
        build_model({**VIT_MODEL, "pretrained": str(pickle)}, 10, 1)


def test_hub_weights_without_network_are_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the library reads the variable once at import; the running session needs the constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # empty caches, so that weights downloaded earlier on this machine cannot stand in for the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="resnet18") as err:
        build_model({**RESNET_MODEL, "pretrained": "hub"}, num_classes=10, in_chans=1)
    assert "hub" in str(err.value)


def test_unknown_model_name_or_kwarg_is_a_user_error():
    with pytest.raises(UserError, match="vit_nonexistent"):
        build_model({"timm_name": "vit_nonexistent"}, 10, 1)
    with pytest.raises(UserError, match="no_such_kwarg"):
        build_model({**RESNET_MODEL, "kwargs": {**RESNET_MODEL["kwargs"], "no_such_kwarg": 1}}, 10, 1)


def test_model_name_with_a_weight_tag_is_accepted_and_a_wrong_tag_named():
    # the paper's backbone is a tagged timm name (ImageNet-21k weights fine-tuned on ImageNet-1k)
    tagged = build_model({**RESNET_MODEL, "timm_name": "resnet18.a1_in1k"}, num_classes=10, in_chans=1)
    plain = build_model(RESNET_MODEL, num_classes=10, in_chans=1)
    assert type(tagged) is type(plain)
    with pytest.raises(UserError, match="no_such_tag"):
        build_model({**RESNET_MODEL, "timm_name": "resnet18.no_such_tag"}, num_classes=10, in_chans=1)


def test_model_that_cannot_take_the_data_is_refused_naming_both():
    vit = build_model(VIT_MODEL, num_classes=10, in_chans=1)
    check_model_fits_data(vit, "model vit", "D", 10, 1, 16)  # fits
    with pytest.raises(UserError, match=r"10 classes.*D has 3"):
        check_model_fits_data(vit, "model vit", "D", 3, 1, 16)
    with pytest.raises(UserError, match=r"1-channel.*3-channel"):
        check_model_fits_data(vit, "model vit", "D", 10, 3, 16)
    with pytest.raises(UserError, match=r"16×16 px.*8×8 px"):
        check_model_fits_data(vit, "model vit", "D", 10, 1, 8)
    # a ResNet pools globally: another image size is legitimate
    resnet = build_model(RESNET_MODEL, num_classes=10, in_chans=1)
    check_model_fits_data(resnet, "model resnet", "D", 10, 1, 32)


@pytest.mark.parametrize("timm_name", ["vit_tiny_patch16_224.augreg_in21k_ft_in1k", "resnet18.tv_in1k"])
def test_released_weights_tags_load_from_a_local_safetensors_file(tmp_path, timm_name):
    """The ImageNet configs name the released code's weights by timm tag (config/imagenet-audit.yaml); a
    node without network loads the downloaded file instead (pretrained: <file>). Random weights of the
    same shapes stand in for the download: every tensor is the file's, none is timm's random init."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model(timm_name.split(".")[0], num_classes=1000).state_dict()
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    model = build_model({"timm_name": timm_name, "pretrained": str(weights), "preprocess": "released"}, 1000, 3)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
