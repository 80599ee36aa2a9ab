"""Checkpoints: a model's weights as safetensors plus a JSON sidecar naming the model (never a
pickle), written so that equal weights give equal bytes, and the model rebuilt from them."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path, atomic_write_json
from noisynn.models.build import build_model, check_model_config
from noisynn.models.weights import load_weights_file, sidecar_path

CHECKPOINT_FORMAT = "noisynn-checkpoint/1"


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
    if weights.is_dir():
        raise UserError(f"checkpoint {weights} is a folder; expected its model.safetensors file.")
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} does not exist.")
    if not side.is_file():
        raise UserError(f"checkpoint {weights} has no sidecar {side.name} (expected the JSON written with every noisynn checkpoint).")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint sidecar {side} is not valid JSON ({e.msg}).") from None
    except UnicodeDecodeError:
        raise UserError(f"checkpoint sidecar {side} is not text (expected the JSON written with the checkpoint).") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint sidecar {side} holds a JSON {type(meta).__name__}; expected an object with "
                        "format, model, num_classes and in_chans.")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint sidecar {side} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}.")
    if "model" not in meta:
        raise UserError(f"checkpoint sidecar {side} lacks key model (the timm model the weights belong to).")
    check_model_config(meta["model"], f"checkpoint sidecar {side}: key model")
    for key in ("num_classes", "in_chans"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"checkpoint sidecar {side}: key {key} must be a positive integer; got {value!r}.")
    return meta


def load_checkpoint(weights: Path, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint's sidecar names and load its weights (no unpickling).

    The weights file is checked as a file first (size, header, every tensor finite).
    """
    meta = read_sidecar(weights)
    name = meta["model"]["timm_name"]
    if expect_model and expect_model != name:
        raise UserError(f"checkpoint {weights} holds model {name}, but {expect_model} was expected.")
    state = load_weights_file(Path(weights), "checkpoint")
    cfg = dict(meta["model"], pretrained=None)
    model = build_model(cfg, meta["num_classes"], meta["in_chans"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {weights} does not match model {name} described by its sidecar ({first}).") from None
    return model, meta
