"""Tests of noisynn/models/pretrained.py: local pretrained weights fitted into a model.

What a user relies on: every tensor of a local safetensors file is loaded but a classifier that the
new task replaces; weights of another architecture, a missing file or a pickle are refused in one
sentence naming the file and both models.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESNET_MODEL, VIT_MODEL, state_of

from noisynn.errors import UserError
from noisynn.models.build import build_model


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

