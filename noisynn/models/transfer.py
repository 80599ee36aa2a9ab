"""Transfer: a checkpoint's model rebuilt for another dataset (classes, channels, image size), its
weights carried over where they fit."""

from __future__ import annotations

from torch import nn

from noisynn.models.build import build_model
from noisynn.models.pretrained import classifier_keys


def data_kwargs(model_cfg: dict, model: nn.Module, num_classes: int, in_chans: int, image_size: int) -> dict:
    """The kwargs that rebuild ``model`` (built from ``model_cfg``) for a dataset: its classes and
    channels, and its image size where the model has one (a ViT's patch grid)."""
    kwargs = {**(model_cfg.get("kwargs") or {}), "num_classes": num_classes, "in_chans": in_chans}
    if "img_size" in kwargs or hasattr(model, "patch_embed"):
        kwargs["img_size"] = image_size
    return kwargs


def adapt_to_data(model: nn.Module, meta: dict, num_classes: int, in_chans: int, image_size: int) -> tuple[nn.Module, dict, list[str]]:
    """The model of a checkpoint rebuilt for another dataset (transfer), its weights carried over.

    The classifier is new (the new dataset's classes); a ViT's position embedding is resampled to the
    new patch grid and a first convolution summed or repeated over the new input channels (timm's
    helpers); any other tensor whose shape changed is left at its initialization and named.
    Returns (model, its model config, what was adapted).
    """
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    cfg = dict(meta["model"])
    cfg = {**cfg, "kwargs": data_kwargs(cfg, model, num_classes, in_chans, image_size), "pretrained": None}
    new = build_model(cfg, num_classes, in_chans)
    old_state, own = model.state_dict(), new.state_dict()
    head = classifier_keys(new)
    load, fresh = {}, []
    for key, target in own.items():
        value = old_state.get(key)
        if key in head or value is None:
            fresh.append(key)
        elif value.shape == target.shape:
            load[key] = value
        elif key.endswith("pos_embed") and value.dim() == 3:
            prefix = 0 if getattr(new, "no_embed_class", False) else int(getattr(new, "num_prefix_tokens", 0))
            grid = new.patch_embed.grid_size
            load[key] = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)
        elif value.dim() == 4 and value.shape[1] != target.shape[1] and value.shape[0] == target.shape[0]:
            load[key] = adapt_input_conv(target.shape[1], value)
        else:
            fresh.append(key)
    new.load_state_dict(load, strict=False)
    adapted = [f"classifier for {num_classes} classes"]
    if meta.get("image_size") != image_size:
        adapted.append(f"input {meta.get('image_size')} → {image_size} px")
    if meta.get("in_chans") != in_chans:
        adapted.append(f"{meta.get('in_chans')} → {in_chans} input channels")
    others = [k for k in fresh if k not in head]
    if others:
        adapted.append(f"{len(others)} tensors re-initialized ({', '.join(others[:3])})")
    return new, cfg, adapted
