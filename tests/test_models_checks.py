"""Tests of noisynn/models/checks.py: what a model must take and run, checked before any real work.

What a user relies on: a model that cannot take the data is refused naming both; a model whose forward
fails (a shape bug) is refused by the forward check and by the noise check alike, while an op that
only the meta device cannot run leaves both checks to the real forward instead of refusing a model
that works; and an error of our own noise code is never taken for the meta device's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESNET_MODEL, VIT_MODEL
from torch import nn

from noisynn.errors import UserError
from noisynn.models.build import build_model, meta_model
from noisynn.models.checks import check_forward, check_model_fits_data, check_noises_act
from noisynn.noise import NoiseSpec

# an operator with a CPU kernel and no meta kernel, as some models' ops have
_LIBRARY = torch.library.Library("noisynn_test_checks", "DEF")
_LIBRARY.define("twice(Tensor x) -> Tensor")
_LIBRARY.impl("twice", lambda x: x * 2, "CPU")

SITE = "layer4.0"  # its input is a 1×1 feature map at 16 px
SHAPE = (2, 1, 16, 16)
LINEAR = [NoiseSpec.from_dict({"kind": "linear-optimal", "axis": "rows"})]  # the identity over one row: refused


class _NoMetaKernel(nn.Module):
    def forward(self, x):
        return torch.ops.noisynn_test_checks.twice(x)


def _resnet_with(module_after_layer1: nn.Module) -> nn.Module:
    """The tiny ResNet with ``module_after_layer1`` run before the site, on the device it was made on."""
    model = build_model(RESNET_MODEL, num_classes=10, in_chans=1).eval()
    model.layer1 = nn.Sequential(model.layer1, module_after_layer1)
    return model


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


def test_noise_check_refuses_a_noise_the_site_makes_the_identity():
    # what the skipped check below would have found, had the meta device run the forward
    model = meta_model(RESNET_MODEL, 10, 1)
    check_forward(model, SHAPE, "model resnet")
    with pytest.raises(UserError, match=r"^model resnet at layer4\.0: noise linear-optimal on axis rows: .*size 1"):
        check_noises_act(model, SITE, LINEAR, SHAPE, "model resnet at layer4.0")


def test_an_op_without_a_meta_kernel_leaves_both_checks_to_the_real_forward():
    with torch.device("meta"):
        model = _resnet_with(_NoMetaKernel())
    check_forward(model, SHAPE, "model resnet")
    check_noises_act(model, SITE, LINEAR, SHAPE, "model resnet at layer4.0")
    # the model itself is sound: the real forward runs it
    with torch.no_grad():
        assert _resnet_with(_NoMetaKernel())(torch.randn(SHAPE)).shape == (2, 10)


def test_a_shape_bug_in_the_forward_is_refused_by_both_checks():
    with torch.device("meta"):
        model = _resnet_with(nn.Linear(5, 5))  # the feature map's last axis is 4 wide there, not 5
    with pytest.raises(UserError, match=r"^model resnet cannot run on a batch of shape \(2, 1, 16, 16\) \(RuntimeError: "):
        check_forward(model, SHAPE, "model resnet")
    with pytest.raises(UserError, match=r"^model resnet at layer4\.0 cannot run on a batch of shape \(2, 1, 16, 16\) "
                                        r"\(RuntimeError: "):
        check_noises_act(model, SITE, LINEAR, SHAPE, "model resnet at layer4.0")


def test_an_error_of_the_noise_code_is_not_taken_for_the_meta_device(monkeypatch):
    from noisynn.inject.hook import Injection

    def broken(self, module, args):
        raise RuntimeError("index 3 is out of bounds for dimension 0 with size 2")

    monkeypatch.setattr(Injection, "apply", broken)
    with pytest.raises(RuntimeError, match="out of bounds"):
        check_noises_act(meta_model(RESNET_MODEL, 10, 1), SITE, LINEAR, SHAPE, "model resnet at layer4.0")
