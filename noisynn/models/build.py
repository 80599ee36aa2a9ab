"""Models by timm name: a model config checked, then built (or built on the meta device, for checks).

A model config is a small dict: ``{"timm_name": "vit_tiny_patch16_224", "kwargs": {...},
"pretrained": null | "hub" | "path/to/weights.safetensors"}``. ``kwargs`` go to
``timm.create_model`` (num_classes, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
layers, channels …) so small ViTs and ResNets train on 8–32 px digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.models.pretrained import load_pretrained_weights
from noisynn.vocab import PREPROCESSES

MODEL_KEYS = {"timm_name": (str,), "kwargs": (dict, type(None)), "pretrained": (str, type(None)),
              "augment": (dict, type(None)), "image_size": (int, type(None)), "preprocess": (str, type(None))}


def check_model_config(model_cfg, what: str = "model config", strict: bool = False) -> None:
    """A model config is a mapping of ``MODEL_KEYS`` with values of their types; ``strict`` also
    refuses keys outside them (what a user types on the command line)."""
    if not isinstance(model_cfg, dict):
        raise UserError(f"{what} must be a mapping such as {{'timm_name': 'resnet18', 'kwargs': {{}}}}; got {model_cfg!r}.")
    if not isinstance(model_cfg.get("timm_name"), str) or not model_cfg["timm_name"]:
        raise UserError(f"{what} needs timm_name, the name of a timm model (e.g. 'vit_tiny_patch16_224'); "
                        f"got {model_cfg.get('timm_name')!r}.")
    unknown = sorted(set(model_cfg) - set(MODEL_KEYS))
    if strict and unknown:
        raise UserError(f"{what} has unknown key {unknown[0]!r} (allowed: {', '.join(MODEL_KEYS)}).")
    for key, types in MODEL_KEYS.items():
        value = model_cfg.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "a mapping",
                                                                  "int": "an integer"}[t.__name__] for t in types)
            raise UserError(f"{what} key {key} must be {want}; got {value!r}.")
    if model_cfg.get("preprocess") not in (None, *PREPROCESSES):
        raise UserError(f"{what} key preprocess must be one of {', '.join(PREPROCESSES)}; got {model_cfg['preprocess']!r}.")
    if isinstance(model_cfg.get("image_size"), int) and model_cfg["image_size"] < 1:
        raise UserError(f"{what} key image_size must be a positive integer; got {model_cfg['image_size']}.")


def build_model(model_cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """Create the timm model a config names (random init unless ``pretrained`` says otherwise).

    Under ``with torch.device("meta"):`` the model costs nothing: what the config checks use.
    """
    import timm

    check_model_config(model_cfg)
    name = model_cfg.get("timm_name")
    # is_model, not list_models: a name may carry a weight tag (vit_base_patch16_384.augreg_in21k_ft_in1k)
    if not name or not timm.is_model(name):
        raise UserError(f"model timm_name {name!r} is not a timm model (see timm.list_models()).")
    if "." in name and not timm.list_pretrained(name):
        arch, tag = name.split(".", 1)
        raise UserError(f"model timm_name {name!r}: timm has no weights tagged {tag!r} for {arch} "
                        f"(see timm.list_pretrained('{arch}.*')).")
    kwargs = dict(model_cfg.get("kwargs") or {})
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_chans", in_chans)
    for key in ("layers", "channels"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    pretrained = model_cfg.get("pretrained")
    try:
        model = timm.create_model(name, pretrained=(pretrained == "hub"), **kwargs)
    except TypeError as e:
        raise UserError(f"model kwargs {sorted(kwargs)} are not accepted by timm model {name!r} ({e}).") from None
    except (OSError, RuntimeError) as e:
        if pretrained == "hub":
            raise UserError(
                f"pretrained weights for {name!r} could not be fetched from the hub ({type(e).__name__}); "
                "download them where the network allows and set pretrained: /path/to/weights.safetensors."
            ) from None
        raise _kwargs_refused(name, kwargs, e) from None
    except (AssertionError, ValueError, ZeroDivisionError, IndexError, KeyError, AttributeError) as e:
        # timm's own checks of the kwargs (assertions, divisions, lookups) inside timm's code
        raise _kwargs_refused(name, kwargs, e) from None
    if pretrained not in (None, "hub"):
        load_pretrained_weights(model, Path(pretrained), name)
    return model


def _kwargs_refused(name: str, kwargs: dict, e: Exception) -> UserError:
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    return UserError(f"model kwargs {json.dumps(kwargs, sort_keys=True, default=str)} are not accepted by timm model "
                     f"{name!r} ({type(e).__name__}{': ' + detail if detail else ''}).")


def meta_model(model_cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """The model a config describes, on the meta device (no memory, no weights read): for checks."""
    with torch.device("meta"):
        return build_model({**model_cfg, "pretrained": None}, num_classes, in_chans).eval()

