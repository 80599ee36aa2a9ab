"""The models of a config checked on the meta device before any job starts (noisynn/pipeline/model_checks.py):
each refusal names the file and the key, and a model already checked is not checked again."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
from conftest import _digest, config_refused, tiny_config

from noisynn.errors import UserError
from noisynn.pipeline.config import validate_config
from noisynn.pipeline.model_checks import check_models_and_sites


def test_config_site_the_model_lacks():
    cfg = tiny_config()
    cfg["models"]["vit"]["site"] = "blocks.5.attn"  # a 2-block ViT
    config_refused(cfg, "models.vit.site", "'blocks.5.attn'", "blocks.1.attn")


def test_config_layer_sweep_site_the_model_lacks():
    cfg = tiny_config()
    cfg["models"]["resnet"]["layer_sweep_sites"] = ["layer3.0", "layer9.0"]
    config_refused(cfg, "models.resnet.layer_sweep_sites.1", "'layer9.0'", "layer4.0")


def test_config_noise_that_its_site_makes_the_identity():
    cfg = tiny_config()
    cfg["noises"][3]["axis"] = ["batch", "rows"]  # the tiny ResNet's layer4.0 sees 1×1 maps of 8 px digits
    config_refused(cfg, "noises.3.axis", "resnet", "layer4.0", "identity")


def test_config_released_preprocess_of_a_family_the_released_code_lacks(image_folder):
    # the released code has transforms for its ViTs and ResNets only (docs/paper.md §4.1)
    cfg = tiny_config()
    cfg["dataset"] = {"name": "folder", "kind": "imagefolder", "root": str(image_folder), "image_size": 8}
    cfg["models"]["vit"] = {"timm_name": "convnext_atto", "site": "stages.3", "preprocess": "released"}
    config_refused(cfg, "models.vit.preprocess", "convnext_atto", "preprocess: timm")


def test_config_model_that_cannot_take_the_data():
    cfg = tiny_config()
    cfg["models"]["vit"]["kwargs"]["img_size"] = 16  # the dataset is 8 px
    config_refused(cfg, "models.vit.kwargs", "16×16", "8×8")


def test_config_kwargs_that_build_a_broken_model():
    cfg = tiny_config()
    cfg["models"]["resnet"]["kwargs"]["layers"] = [1, 1]
    config_refused(cfg, "models.resnet.kwargs", "cannot run")


def test_config_pretrained_weights_that_do_not_fit_the_model(resnet_run):
    cfg = tiny_config()
    cfg["models"]["vit"]["pretrained"] = str(resnet_run.checkpoint)  # a ResNet's weights for the ViT
    config_refused(cfg, "models.vit.pretrained", str(resnet_run.checkpoint), "do not fit")


def test_config_pretrained_weights_with_a_nan(tmp_path):
    from safetensors.torch import save_file

    from noisynn.models.build import build_model

    cfg = tiny_config()
    model = build_model({k: cfg["models"]["resnet"][k] for k in ("timm_name", "kwargs")}, 10, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.0.conv1.weight"].view(-1)[3] = float("nan")
    weights = tmp_path / "weights.safetensors"
    save_file(state, str(weights))
    before = _digest(weights)
    cfg["models"]["resnet"]["pretrained"] = str(weights)
    config_refused(cfg, "models.resnet.pretrained", str(weights), "non-finite", "layer1.0.conv1.weight")
    assert _digest(weights) == before


def test_config_check_is_cached_and_runs_torch_in_a_subprocess(tmp_path, monkeypatch):
    cache = tmp_path / ".snakemake" / "checked-models.json"
    cfg = validate_config(tiny_config(), "config/tiny.yaml")
    check_models_and_sites(cfg, "config/tiny.yaml", cache, isolate=False)  # both models built once
    assert len(json.loads(cache.read_text())) == 2

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached model was checked again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    check_models_and_sites(cfg, "config/tiny.yaml", cache)  # a no-op workflow run: nothing to check
    monkeypatch.undo()

    wrong = copy.deepcopy(cfg)
    wrong["models"]["vit"]["site"] = "blocks.5.attn"  # a changed site is checked again, in the subprocess
    with pytest.raises(UserError, match=r"^config/tiny.yaml: key models.vit.site: site 'blocks.5.attn'"):
        check_models_and_sites(wrong, "config/tiny.yaml", cache)
