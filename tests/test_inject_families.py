"""Tests of noisynn/inject/registry.py and families.py: what injection knows of a family of models
comes from the family's registration alone, and every registration is consistent.

A family registered here (a toy token model, no timm class) gets its named sites, its class
token, its layout, its cache point and its suffix from one ``register`` call; each built-in family's
sites, cache points and split agree with the forward of a small model of that family.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import assert_user_error
from inject_models import FAMILY_MODELS, GAUSSIAN, MODELS, OPTIMAL_BATCH, family_model
from torch import nn

import noisynn.inject.registry as registry
from noisynn.errors import UserError
from noisynn.inject.hook import inject
from noisynn.inject.registry import Family, families, family_of, register
from noisynn.inject.sites import all_sites, num_prefix_tokens_at, valid_sites
from noisynn.inject.split import cache_point, can_split, forward_prefix, forward_suffix


class Tower(nn.Module):
    """A token model of no timm family: a class token before three residual MLP blocks."""

    def __init__(self, dim: int = 8, depth: int = 3, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.towers = nn.Sequential(*(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for tower in self.towers:
            x = x + tower(x)
        return self.head(x.mean(1))


def _tower_suffix(model: Tower, block: re.Match, x: torch.Tensor) -> torch.Tensor:
    for tower in model.towers[int(block.group(2)):]:
        x = x + tower(x)
    return model.head(x.mean(1))


TOWER = Family(
    name="tower",
    described="Tower",
    recognises=lambda model: isinstance(model, Tower),
    named_sites=lambda model: [f"towers.{i}" for i in range(len(model.towers))],
    prefix_tokens=lambda model, site, n_tokens: 0 if site == "embed" else 1,
    map_layout=lambda site, module, x: "nchw",
    block=re.compile(r"^(towers\.(\d+))(\..+)?$"),
    splittable=lambda model: type(model).forward is Tower.forward,
    suffix=_tower_suffix,
)


@pytest.fixture
def tower_registered(monkeypatch):
    """The registry with the Tower family added, as it was again after the test."""
    monkeypatch.setattr(registry, "_NAMED", dict(registry._NAMED))
    register(TOWER)


def test_a_model_of_no_registered_family_is_refused_with_the_families_named():
    with pytest.raises(UserError) as e:
        inject(Tower(), "towers.0", GAUSSIAN)
    assert_user_error(e, "ViT/DeiT/BEiT/ConViT, ResNet, Swin and EfficientNet", "Tower")


def test_a_registered_family_gets_sites_prefix_layout_and_split_from_its_registration(tower_registered):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Tower().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert family_of(model) is TOWER
    assert valid_sites(model) == ["image", "towers.0", "towers.1", "towers.2"]
    assert num_prefix_tokens_at(model, "towers.1") == 1 and num_prefix_tokens_at(model, "embed") == 0
    assert cache_point(model, "towers.1.1") == "towers.1" and can_split(model, "towers.1")
    assert cache_point(model, "head") == "image" and not can_split(model, "head")
    seen = []
    with torch.no_grad():
        clean, clean_input = model(x), forward_prefix(model, "towers.1", x)
        with inject(model, "towers.1", OPTIMAL_BATCH) as handle:
            # registered after the noise's hook: sees the noised input
            recorder = model.towers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            full = model(x)
            recorder.remove()
            assert (handle.layout, handle.num_prefix_tokens, handle.last_input_shape) == ("tokens", 1, (4, 5, 8))
            split = forward_suffix(model, "towers.1", forward_prefix(model, "towers.1", x))
    # the noise mixed the images' patch tokens and left the class token alone
    assert torch.equal(seen[0][:, 0], clean_input[:, 0]) and not torch.allclose(seen[0][:, 1:], clean_input[:, 1:])
    assert not torch.allclose(full, clean)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
    # the error for a model of no family names the new one too
    with pytest.raises(UserError) as e:
        family_of(nn.Sequential(nn.Linear(3, 3)))
    assert_user_error(e, "Swin, EfficientNet and Tower", "Sequential")
    with pytest.raises(ValueError):
        register(TOWER)


def _convnext() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                 num_classes=10).eval()


# one small model per variant of every built-in family
EXAMPLES = {**{name: build for name, build in MODELS.items()},
            **{name: (lambda n=name: family_model(n)) for name in FAMILY_MODELS}, "convnext": _convnext}


def test_every_registered_family_has_an_example_model_here():
    assert {family_of(build()).name for build in EXAMPLES.values()} == {f.name for f in families()}


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_family_registration_is_consistent_with_its_models_forward(name):
    model = EXAMPLES[name]()
    family = family_of(model)
    # no other family claims the model (the fallback is asked only when none does)
    assert [f for f in families() if f.recognises(model)][:1] == [family]
    assert sum(f.recognises(model) for f in families()[:-1]) <= 1
    named, every = valid_sites(model), all_sites(model)
    assert named[0] == "image" and [s for s in every if s in named] == named, "named sites in forward order"
    for site in every:
        point = cache_point(model, site)
        # a cache point is a named site of its own, the block the site is in
        assert point in named and cache_point(model, point) == point, (site, point)
        assert can_split(model, site) == (point != "image")
    if family.block is None:
        assert not any(can_split(model, s) for s in every)
    else:
        assert family.splittable(model)
        assert all(can_split(model, s) for s in named[1:]), "every named site of a splittable family is cut at its block"
    assert family.stream_bytes in (2, 4)
