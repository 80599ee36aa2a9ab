"""Running a model in two halves, for an evaluation that reuses the part before the site.

The forward is cut at the cache point, the block of the model's family that holds the site
(``noisynn.inject.families``): ``forward_prefix`` computes the block's input once (deterministic),
``forward_suffix`` runs from there on with the noise hook firing on the way.
"""

from __future__ import annotations

import torch
from torch import nn

from noisynn.inject.registry import family_of
from noisynn.inject.sites import check_site, site_module


def cache_point(model: nn.Module, site: str) -> str:
    """The module whose input is cached: the block or sub-block that holds the site.

    ``image`` for the image site, for sites outside the blocks and for models whose forward cannot
    be resumed (``can_split`` is False): the caller then runs the full forward
    (``forward_prefix`` returns the images, ``forward_suffix`` is the whole model).
    """
    check_site(model, site)
    if site == "image":
        return "image"
    family = family_of(model)
    m = family.block.match(site) if family.block else None
    if m is None or not family.splittable(model):
        return "image"
    return m.group(1)


def cache_bytes_per_value(model: nn.Module) -> int:
    """Bytes per cached value under bf16/fp16 autocast: the cache keeps the dtype the forward
    carries at the cache point (evaluate.PrefixCache), the family's ``stream_bytes``."""
    return family_of(model).stream_bytes


def can_split(model: nn.Module, site: str) -> bool:
    """Whether the forward pass can be cut at ``site``'s block (else the full forward runs)."""
    return cache_point(model, site) != "image"


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


def _input_of(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple | None:
    """The positional arguments ``module`` receives when ``model`` runs on ``images``, the forward
    stopping there (None if it never gets there). Prepended: before any noise hook at ``module``."""

    def stop(m, args):
        raise _Stop(args)

    handle = module.register_forward_pre_hook(stop, prepend=True)
    try:
        model(images)
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    return None


def site_input(model: nn.Module, site: str, images: torch.Tensor) -> tuple[nn.Module, tuple] | None:
    """The module at ``site`` and the arguments it receives for ``images`` (None if never called)."""
    module = site_module(model, site)
    args = _input_of(model, module, images)
    return None if args is None else (module, args)


@torch.no_grad()
def forward_prefix(model: nn.Module, site: str, images: torch.Tensor) -> torch.Tensor:
    """The input of the cache point for ``images``: the deterministic part of the forward pass."""
    point = cache_point(model, site)
    if point == "image":
        return images
    args = _input_of(model, model.get_submodule(point), images)
    if args is None:
        raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {point}")
    return args[0]


def forward_suffix(model: nn.Module, site: str, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the cached input of the cache point on (the noise hook fires on the way)."""
    point = cache_point(model, site)
    if point == "image":
        return model(hidden)
    family = family_of(model)
    return family.suffix(model, family.block.match(point), hidden)
