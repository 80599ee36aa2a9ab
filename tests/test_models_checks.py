"""Tests of noisynn/models/checks.py: what a model must take and run, checked before any real work.

What a user relies on: a model that cannot take the data is refused naming both.
"""

from __future__ import annotations

import pytest
from conftest import RESNET_MODEL, VIT_MODEL

from noisynn.errors import UserError
from noisynn.models.build import build_model
from noisynn.models.checks import check_model_fits_data


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
