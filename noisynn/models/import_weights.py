"""Pretrained weights (the hub's or a local safetensors file) wrapped as a noisynn checkpoint, unchanged."""

from __future__ import annotations

from pathlib import Path

from noisynn.errors import UserError
from noisynn.models.build import build_model
from noisynn.models.checkpoints import save_checkpoint
from noisynn.models.checks import check_model_fits_data
from noisynn.models.pretrained import classifier_keys
from noisynn.models.weights import load_weights_file


def import_weights(model_cfg: dict, data_dir: Path, out_dir: Path, allow_new_head: bool = False) -> Path:
    """Wrap pretrained weights (hub or a local .safetensors) as a noisynn checkpoint, unchanged.

    This is the start of the released recipe (timm's ImageNet weights) and the whole of an audit
    of released weights: no optimizer step runs. The weights must classify the dataset as they
    are, classifier included; weights whose classifier does not fit are refused.
    """
    from noisynn.data import load_dataset
    from noisynn.io.provenance import provenance

    if model_cfg.get("pretrained") in (None, ""):
        raise UserError(f"import-weights needs pretrained weights for model {model_cfg.get('timm_name')} "
                        "(pretrained: hub or a .safetensors path).")
    data = load_dataset(Path(data_dir), model_cfg, train_augment=False, splits=("val",))
    model = build_model(model_cfg, data.num_classes, data.in_chans)
    pre = model_cfg["pretrained"]
    new_head = False
    if pre != "hub":
        state = load_weights_file(Path(pre), "pretrained weights file")
        head = classifier_keys(model)
        own = model.state_dict()
        unfit = sorted(k for k in head if k not in state or state[k].shape != own[k].shape)
        new_head = bool(unfit)
        if unfit and not allow_new_head:
            raise UserError(f"pretrained weights {pre} have no classifier for the {data.num_classes} classes of "
                            f"{data_dir} (tensor {unfit[0]}); weights imported as loaded must classify the dataset.")
    else:
        hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        new_head = hub_classes not in (None, data.num_classes)
        if new_head and not allow_new_head:
            raise UserError(f"hub weights of {model_cfg.get('timm_name')} classify {hub_classes} classes, not the "
                            f"{data.num_classes} of {data_dir}; weights imported as loaded must classify the dataset.")
    check_model_fits_data(model, f"model {model_cfg.get('timm_name')}", data_dir, data.num_classes, data.in_chans,
                          data.image_size)
    meta = {
        "stage": "imported",
        "new_head": new_head,
        "model": {k: v for k, v in model_cfg.items()},
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "image_size": data.image_size,
        "data_fingerprint": data.fingerprint,
        "init_checkpoint": None,
        "train_args": None,
        **provenance(None),
    }
    weights = Path(out_dir) / "model.safetensors"
    save_checkpoint(model, weights, meta)
    return weights
