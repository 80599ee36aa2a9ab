"""Tests of noisynn/inject/sites.py: the named sites of each family in forward order, every module
path the forward calls, the layout and class tokens of the tensor at a site, and a site the model
lacks as a user error naming the sites.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_user_error
from inject_models import (
    EXTRA_SITES,
    FAMILY_MODELS,
    GAUSSIAN,
    MODELS,
    OPTIMAL_BATCH,
    family_images,
    family_model,
    images_for,
    logits,
    module_at,
)
from torch import nn

from noisynn.errors import UserError
from noisynn.inject.hook import inject
from noisynn.inject.registry import family_of
from noisynn.inject.sites import all_sites, check_site, num_prefix_tokens_at, valid_sites
from noisynn.inject.split import cache_point, can_split, forward_prefix, forward_suffix
from noisynn.noise import NoiseSpec

# --- the sites of the standard, deeper configurations ----------------------------------------


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize(
    "name, family, expected_blocks",
    [
        ("resnet50", "resnet", {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}),
        ("resnet34", "resnet", {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}),
        ("vit_base_patch16_224", "vit", {"blocks": 12}),
        ("vit_large_patch16_224", "vit", {"blocks": 24}),
    ],
)
def test_valid_sites_cover_a_standard_deep_model_in_forward_order(name, family, expected_blocks):
    model = meta_model(name)
    assert family_of(model).name == family
    sites = valid_sites(model)
    if family == "vit":
        depth = expected_blocks["blocks"]
        expected = ["image"] + [s for i in range(depth) for s in (f"blocks.{i}", f"blocks.{i}.attn")]
        # the released default (--layer 11) is the last block of ViT-B and a middle one of ViT-L
        assert "blocks.11.attn" in sites
    else:
        expected = ["image"] + [f"{stage}.{b}" for stage, n in expected_blocks.items() for b in range(n)]
        # the released ResNet script's stage 4, sub-block 3 (1-based)
        assert "layer4.2" in sites
    assert sites == expected

    # each site is reached exactly once by a forward pass, in the listed order (meta: no compute)
    order = []
    handles = [module_at(model, s).register_forward_pre_hook(lambda m, a, s=s: order.append(s)) for s in sites]
    with torch.device("meta"):
        out = model(torch.empty(2, 3, 224, 224))
    for h in handles:
        h.remove()
    assert order == sites
    assert tuple(out.shape) == (2, 1000)

    # an injection can be placed at the deepest site and removed again
    site = sites[-1]
    with inject(model, site, OPTIMAL_BATCH):
        assert len(module_at(model, site)._forward_pre_hooks) == 1
    assert not module_at(model, site)._forward_pre_hooks


# --- user errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, bad",
    [("vit", "blocks.3"), ("vit", "blocks.0.mlpx"), ("resnet", "layer4.1"), ("resnet", "layer5.0"), ("resnet", "fc2"),
     ("vit", ""), ("vit", "blocks.0."), ("resnet", " layer4.0")],
)
def test_unknown_site_is_a_user_error_listing_the_valid_sites(family, bad):
    model = MODELS[family]()
    with pytest.raises(UserError) as e:
        inject(model, bad, OPTIMAL_BATCH)
    assert_user_error(e, "site", repr(bad), *valid_sites(model))
    for fn in (cache_point, lambda m, s: forward_prefix(m, s, images_for(family))):
        with pytest.raises(UserError):
            fn(model, bad)
    # nothing was hooked on the way to the error
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_named_sites_of_each_family_are_accepted_and_listed_in_forward_order(name):
    model = family_model(name)
    family, last = FAMILY_MODELS[name][3], FAMILY_MODELS[name][4]
    assert family_of(model).name == family
    sites = valid_sites(model)
    assert sites[0] == "image" and sites[-1] == last
    for site in sites:
        check_site(model, site)
        assert site == "image" or can_split(model, site)
    # the order a forward pass reaches them, each once
    order = []
    handles = [module_at(model, s).register_forward_pre_hook(lambda m, a, s=s: order.append(s)) for s in sites]
    logits(model, family_images(name, batch=1))
    for h in handles:
        h.remove()
    assert order == sites
    # all_sites: every module path, in the traced forward order, the named sites among them
    every = all_sites(model)
    assert every[0] == "image" and set(sites) <= set(every)
    assert [s for s in every if s in sites] == sites
    assert set(EXTRA_SITES[name]) <= set(every)
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "name, site, layout, prefix",
    [
        ("deit", "blocks.0", "tokens", 1),
        ("deit", "blocks.2.attn", "tokens", 1),
        ("deit", "patch_embed.proj", "nchw", 0),
        ("deit", "head", "features", 0),
        ("deit_distilled", "blocks.1.attn", "tokens", 2),
        ("beit", "blocks.1", "tokens", 1),
        ("convit", "blocks.0", "tokens", 0),  # before local_up_to_layer: no class token yet
        ("convit", "blocks.0.attn", "tokens", 0),
        ("convit", "blocks.1", "tokens", 1),
        ("convit", "blocks.2.attn", "tokens", 1),
        ("convit", "norm", "tokens", 1),
        ("swin", "layers.0.blocks.0", "nhwc", 0),
        ("swin", "layers.1.blocks.1", "nhwc", 0),
        ("swin", "layers.1.blocks.0.mlp", "tokens", 0),
        ("swin", "layers.0.blocks.0.attn", "windows", 0),
        ("swin", "image", "nchw", 0),
        ("efficientnet", "blocks.3.1", "nchw", 0),
    ],
)
def test_layout_and_prefix_tokens_at_a_site_and_the_prefix_is_left_untouched(name, site, layout, prefix):
    model = family_model(name)
    x = family_images(name)
    module = module_at(model, site)
    seen = []
    capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    logits(model, x)
    capture.remove()
    noise = NoiseSpec("linear-optimal", axis="features")
    with inject(model, site, noise) as handle:
        capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        logits(model, x)
        capture.remove()
        assert handle.layout == layout
        assert handle.num_prefix_tokens == prefix
        if layout == "tokens":
            assert num_prefix_tokens_at(model, site) == prefix
        assert handle.last_input_shape == tuple(seen[0].shape)
    clean_in, noisy_in = seen
    if prefix:
        assert torch.equal(noisy_in[:, :prefix], clean_in[:, :prefix])
        assert not torch.allclose(noisy_in[:, prefix:], clean_in[:, prefix:])
    # features: (I + Q*) along D / C, the last dimension except for NCHW maps
    dim = 1 if layout == "nchw" else -1
    body_clean, body_noisy = (clean_in[:, prefix:], noisy_in[:, prefix:]) if prefix else (clean_in, noisy_in)
    expected = (body_clean + body_clean.sum(dim=dim, keepdim=True)) / (body_clean.shape[dim] + 1)
    torch.testing.assert_close(body_noisy, expected, rtol=1e-6, atol=1e-6)
    assert handle.mixed_axis_size() == clean_in.shape[dim]


def test_a_timm_model_of_no_named_family_takes_any_module_path_with_the_full_forward():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # conv_mlp=False: the MLP is Linear layers on (B, H, W, C); layer scale 1 so that it matters
        model = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                  conv_mlp=False, ls_init_value=1.0, num_classes=10).eval()
    assert family_of(model).name == "generic"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clean = logits(model, x)
    sites = valid_sites(model)
    assert sites[:3] == ["image", "stem.0", "stem.1"] and "stages.3.blocks.0" in sites
    every = all_sites(model)
    assert [s for s in every if s in sites] == sites
    for site in ("stages.2.blocks.0", "stages.1.blocks.0.mlp.fc1"):
        assert cache_point(model, site) == "image" and not can_split(model, site)
        with inject(model, site, OPTIMAL_BATCH):
            assert forward_prefix(model, site, x) is x
            noisy = forward_suffix(model, site, x)
            torch.testing.assert_close(noisy, logits(model, x))
            assert not torch.allclose(noisy, clean)
        assert torch.equal(logits(model, x), clean)
    # ConvNeXt's MLP is a Linear on (B, H, W, C): its input is taken as NHWC
    with inject(model, "stages.1.blocks.0.mlp.fc1", NoiseSpec("linear-optimal", axis="features")) as handle:
        logits(model, x)
        assert handle.layout == "nhwc" and handle.mixed_axis_size() == 16


def test_all_sites_of_a_meta_model_are_traced_without_compute_and_without_noise():
    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    with inject(model, "layers.3.blocks.1", GAUSSIAN, seed=4) as handle:
        every = all_sites(model)
        assert handle.last_input_shape is None and handle.get_rng_state() is None  # the noise stood aside
    assert every.index("layers.2.downsample") < every.index("layers.2.blocks.0") < every.index("norm")
    assert valid_sites(model)[-1] == "layers.3.blocks.1" and len(valid_sites(model)) == 1 + 2 + 2 + 6 + 2
    model.train()
    all_sites(model)
    assert model.training and all(m.training for m in model.modules())


def test_an_untraceable_forward_gives_the_registration_order_and_a_bug_is_not_swallowed():
    class Model(nn.Module):
        def __init__(self, error):
            super().__init__()
            self.second, self.first, self.error = nn.Linear(2, 2), nn.Linear(2, 2), error

        def forward(self, x):
            raise self.error("no trace")

    # what a model refusing its example input raises: the modules' registration order instead
    assert all_sites(Model(RuntimeError), (2,)) == ["image", "second", "first"]
    # what a bug raises (in our hooks or the model's code) reaches the user as itself
    with pytest.raises(NameError):
        all_sites(Model(NameError), (2,))
