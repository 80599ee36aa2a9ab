"""Weights files as they enter: safetensors only (never a pickle), the header and every tensor
checked, and the JSON sidecar beside each file that noisynn writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noisynn.errors import UserError
from noisynn.io.safetensors_header import read_safetensors_header


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def sidecar_model_name(path: Path) -> str | None:
    """The timm name that the sidecar beside a weights file gives, if it has a readable one."""
    side = sidecar_path(path)
    if side.is_file():
        try:
            name = json.loads(side.read_text()).get("model", {}).get("timm_name")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None
        return name if isinstance(name, str) else None
    return None


def load_weights_file(path: Path, what: str) -> dict:
    """The tensors of a safetensors file, checked as a file where it enters: its size and header
    (``read_safetensors_header``), then every floating tensor finite (a NaN or inf weight makes every
    later number meaningless, so it is refused here rather than evaluated to chance accuracy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path, what)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable safetensors file ({e}).") from None
    _refuse_non_finite(state.items(), path, what)
    return state


def _refuse_non_finite(tensors, path: Path, what: str) -> None:
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{what} {path} holds {bad} non-finite value(s) (NaN or inf) in tensor {name}; "
                            "such weights cannot be evaluated or trained (a diverged training?).")


def check_weights_finite(path: Path, what: str) -> None:
    """Refuse a safetensors file holding a NaN or inf weight, one tensor in memory at a time (the
    config check reads a large pretrained file this way, before any job)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        _refuse_non_finite(((name, fh.get_tensor(name)) for name in fh.keys()), path, what)

