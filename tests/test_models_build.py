"""Tests of noisynn/models/build.py: models by timm name.

What a user relies on: a tagged timm name builds the model of its architecture; an unknown name,
weight tag or kwarg, or hub weights without a network, are refused in one sentence naming the model.
"""

from __future__ import annotations

import pytest
from conftest import RESNET_MODEL

from noisynn.errors import UserError
from noisynn.models.build import build_model


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
