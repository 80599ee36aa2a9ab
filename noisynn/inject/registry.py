"""The registry of model families: what injection knows of each kind of timm model, one record each.

A family says how to recognise its models, which sites it names, how many class tokens lead a token
tensor at a site, how a 4-d tensor at a site is laid out, and where and how its forward can be cut
in two (``noisynn.inject.split``). Code asks ``family_of(model)``; adding a family is one
``register(Family(...))`` (the built-in ones are in ``noisynn.inject.families``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from noisynn.errors import UserError


def _never(model: nn.Module) -> bool:
    return False


def _no_suffix(model: nn.Module, block: re.Match, hidden: torch.Tensor) -> torch.Tensor:
    raise AssertionError("a family whose forward is never split has no suffix")


@dataclass(frozen=True)
class Family:
    """What injection knows of one family of timm models.

    ``recognises(model)``: whether a model is of this family. ``described``: its models in the
    error for a model of no family (``ViT/DeiT/BEiT/ConViT``). ``named_sites(model)``: the sites
    the protocols are written for, after ``image``, in forward order. ``prefix_tokens(model, site,
    n_tokens)``: the class/register/distillation tokens that lead a (B, N, D) tensor at a module
    site (``n_tokens``: its N when a forward is under way, None before). ``map_layout(site, module,
    x)``: ``nchw``, ``nhwc`` or ``unknown`` for a 4-d ``x`` reaching a module site. ``windows``: the
    sites whose input is window-partitioned tokens (Swin's attention), if any. ``block``: the sites
    inside a block, group 1 the block (the cache point), further groups its indices; None where
    the forward is never cut. ``splittable(model)``: whether the model runs its family's standard
    forward, so that ``suffix(model, block_match, hidden)`` reproduces it from a block's input.
    ``stream_bytes``: bytes per value of a block's input under a 16-bit autocast (measured by a
    test: the dtype the forward carries there).
    """

    name: str
    described: str
    recognises: Callable[[nn.Module], bool]
    named_sites: Callable[[nn.Module], list[str]]
    prefix_tokens: Callable[[nn.Module, str, int | None], int]
    map_layout: Callable[[str, nn.Module, torch.Tensor], str]
    windows: re.Pattern | None = None
    block: re.Pattern | None = None
    splittable: Callable[[nn.Module], bool] = _never
    suffix: Callable[[nn.Module, re.Match, torch.Tensor], torch.Tensor] = _no_suffix
    stream_bytes: int = 4


_NAMED: dict[str, Family] = {}  # the families with named sites, asked in registration order
_FALLBACK: list[Family] = []  # the family of any other timm model, asked last


def register(family: Family, fallback: bool = False) -> None:
    """Add ``family`` (``fallback``: the one asked when no other recognises a model)."""
    if family.name in _NAMED or any(f.name == family.name for f in _FALLBACK):
        raise ValueError(f"a model family named {family.name!r} is registered already")
    if fallback:
        if _FALLBACK:
            raise ValueError(f"{_FALLBACK[0].name!r} is the fallback family already")
        _FALLBACK.append(family)
    else:
        _NAMED[family.name] = family


def families() -> list[Family]:
    """Every registered family, in the order ``family_of`` asks them."""
    return [*_NAMED.values(), *_FALLBACK]


def family_of(model: nn.Module) -> Family:
    """The first registered family that recognises ``model``; a UserError for a model of none."""
    for family in families():
        if family.recognises(model):
            return family
    named = [f.described for f in _NAMED.values()]
    listed = ", ".join(named[:-1]) + f" and {named[-1]}" if len(named) > 1 else "".join(named)
    raise UserError(
        f"noise injection supports timm models (named sites for {listed}, any module path for the others); "
        f"got {type(model).__name__}, which is not a timm model."
    )
