"""Pretrained weights from a local safetensors file (timm's or ours) fitted into a model: every
tensor must fit but the classifier, which a new task may replace."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from noisynn.errors import UserError
from noisynn.io.safetensors_header import read_safetensors_header
from noisynn.models.weights import load_weights_file, sidecar_model_name


def check_pretrained_file(path: Path, model_name: str) -> dict:
    """A local pretrained weights file must exist, be named ``.safetensors`` and have a readable
    header; returns the header's tensors (name → (dtype, shape)). Reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist (model {model_name}).")
    if path.suffix != ".safetensors":
        raise UserError(f"pretrained weights file {path} must be a .safetensors file (pickled checkpoints are never loaded).")
    return read_safetensors_header(path, "pretrained weights file")


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's classifier (timm's ``get_classifier``)."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if clf is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(clf))
    return {f"{prefix}.{k}" for k in clf.state_dict()} if prefix else set()


def unfit_tensors(model: nn.Module, shapes: dict[str, tuple]) -> tuple[list[str], list[str]]:
    """The model's tensors (classifier aside) that ``shapes`` lacks, and those it has in another shape."""
    own = model.state_dict()
    head_keys = classifier_keys(model)
    missing = [k for k in own if k not in shapes and k not in head_keys]
    mismatched = [k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k].shape) and k not in head_keys]
    return missing, mismatched


def refuse_unfit_weights(model: nn.Module, shapes: dict[str, tuple], path: Path, model_name: str) -> None:
    missing, mismatched = unfit_tensors(model, shapes)
    if missing or mismatched:
        saved = sidecar_model_name(path)
        bad = (missing + mismatched)[:3]
        raise UserError(
            f"pretrained weights {path} (model {saved or 'unknown'}) do not fit model {model_name}: "
            f"{len(missing)} missing and {len(mismatched)} mis-shaped tensors, e.g. {', '.join(bad)}."
        )


def load_pretrained_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a local safetensors file (timm's or ours) into ``model``; a new classifier is kept fresh."""
    check_pretrained_file(path, model_name)
    state = load_weights_file(path, "pretrained weights file")
    refuse_unfit_weights(model, {k: tuple(v.shape) for k, v in state.items()}, path, model_name)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
