"""Models by timm name, and checkpoints as safetensors plus a JSON sidecar (never a pickle).

A model config is a small dict: ``{"timm_name": "vit_tiny_patch16_224", "kwargs": {...},
"pretrained": null | "hub" | "path/to/weights.safetensors"}``. ``kwargs`` go to
``timm.create_model`` (num_classes, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
layers, channels …) so small ViTs and ResNets train on 8–32 px digits.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from noisynn.errors import UserError
from noisynn.io import atomic_path, atomic_write_json

CHECKPOINT_FORMAT = "noisynn-checkpoint/1"


def build_model(model_cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """Create the timm model a config names (random init unless ``pretrained`` says otherwise)."""
    import timm

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
        raise
    if pretrained not in (None, "hub"):
        load_pretrained_weights(model, Path(pretrained), name)
    return model


def check_model_fits_data(model: nn.Module, what: str, data_dir, num_classes: int, in_chans: int, image_size: int) -> None:
    """Refuse a model that cannot take a dataset's images or predict its classes, naming both.

    Caught here, these mismatches are one sentence; left alone they surface as a shape error deep
    in a forward pass (or, for the classes, as a silently meaningless accuracy).
    """
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != int(num_classes):
        raise UserError(f"{what} predicts {model_classes} classes but dataset {data_dir} has {num_classes}.")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != in_chans:
        raise UserError(
            f"{what} takes {first_conv.in_channels}-channel images but dataset {data_dir} has {in_chans}-channel images."
        )
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
    if fixed is not None and tuple(fixed) != (image_size, image_size):
        raise UserError(
            f"{what} takes {fixed[0]}×{fixed[1]} px images but dataset {data_dir} has {image_size}×{image_size} px images."
        )


def load_pretrained_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a local safetensors file (timm's or ours) into ``model``; a new classifier is kept fresh."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist (model {model_name}).")
    if path.suffix != ".safetensors":
        raise UserError(f"pretrained weights file {path} must be a .safetensors file (pickled checkpoints are never loaded).")
    state = load_file(str(path))
    own = model.state_dict()
    head_keys = _classifier_keys(model)
    missing = [k for k in own if k not in state and k not in head_keys]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape and k not in head_keys]
    if missing or mismatched:
        saved = _sidecar_model_name(path)
        bad = (missing + mismatched)[:3]
        raise UserError(
            f"pretrained weights {path} (model {saved or 'unknown'}) do not fit model {model_name}: "
            f"{len(missing)} missing and {len(mismatched)} mis-shaped tensors, e.g. {', '.join(bad)}."
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if clf is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(clf))
    return {f"{prefix}.{k}" for k in clf.state_dict()} if prefix else set()


def _sidecar_model_name(path: Path) -> str | None:
    side = sidecar_path(path)
    if side.is_file():
        try:
            return json.loads(side.read_text()).get("model", {}).get("timm_name")
        except json.JSONDecodeError:
            return None
    return None


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(model: nn.Module, weights: Path, meta: dict) -> None:
    """Write ``weights`` (safetensors) and its sidecar JSON atomically; sidecar last, as the seal."""
    from safetensors.torch import save_file

    weights = Path(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        # one metadata key only: safetensors writes several in a random order, and equal weights
        # must give equal bytes (content hashes of DVC and Snakemake); the model name is in the sidecar
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_json(sidecar_path(weights), {"format": CHECKPOINT_FORMAT, **meta})


def read_sidecar(weights: Path) -> dict:
    weights = Path(weights)
    side = sidecar_path(weights)
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} does not exist.")
    if not side.is_file():
        raise UserError(f"checkpoint {weights} has no sidecar {side.name} (expected the JSON written with every noisynn checkpoint).")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint sidecar {side} is not valid JSON ({e.msg}).") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint sidecar {side} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}.")
    return meta


def load_checkpoint(weights: Path, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint's sidecar names and load its weights (no unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_sidecar(weights)
    name = meta["model"]["timm_name"]
    if expect_model and expect_model != name:
        raise UserError(f"checkpoint {weights} holds model {name}, but {expect_model} was expected.")
    cfg = dict(meta["model"], pretrained=None)
    model = build_model(cfg, meta["num_classes"], meta["in_chans"])
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {weights} is not a readable safetensors file ({e}).") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {weights} does not match model {name} described by its sidecar ({first}).") from None
    return model, meta
