"""Tests of noisynn/inject/split.py: the two-halves evaluation (``forward_prefix`` + ``forward_suffix``)
is the same forward pass, noise included once, cut at the block that holds the site, and the full
forward where the model cannot be cut there.
"""

from __future__ import annotations

import functools

import pytest
import torch
from inject_models import (
    EXTRA_SITES,
    FAMILY_MODELS,
    GAUSSIAN,
    MODELS,
    OPTIMAL_BATCH,
    family_images,
    family_model,
    images,
    images_for,
    logits,
    small_resnet,
    small_vit,
)

import noisynn.inject.hook as hook_module
from noisynn.inject.hook import inject
from noisynn.inject.sites import check_site, valid_sites
from noisynn.inject.split import cache_bytes_per_value, cache_point, can_split, forward_prefix, forward_suffix
from noisynn.noise import NoiseSpec, apply_noise

# --- the model in two halves -----------------------------------------------------------------


def _all_sites():
    return [(family, site) for family, build in MODELS.items() for site in valid_sites(build())]


@pytest.fixture
def count_noise(monkeypatch):
    calls = []

    def counting(spec, x, generator=None, num_prefix_tokens=0, **kwargs):
        calls.append(tuple(x.shape))
        return apply_noise(spec, x, generator, num_prefix_tokens, **kwargs)

    monkeypatch.setattr(hook_module, "apply_noise", counting)
    return calls


@pytest.mark.parametrize("spec", [OPTIMAL_BATCH, GAUSSIAN], ids=["linear-optimal", "gaussian"])
@pytest.mark.parametrize("family, site", _all_sites())
def test_prefix_then_suffix_reproduces_the_full_forward_pass(family, site, spec, count_noise):
    model = MODELS[family]()
    x = images_for(family)
    injection = inject(model, site, spec, seed=11)

    injection.reseed(11)
    with torch.no_grad():
        full = model(x)
    assert len(count_noise) == 1, "the noise hook must fire exactly once per forward"

    injection.reseed(11)
    hidden = forward_prefix(model, site, x)
    assert len(count_noise) == 1, "the cached prefix must be computed without the noise"
    with torch.no_grad():
        split = forward_suffix(model, site, hidden)
    assert len(count_noise) == 2, "the noise hook must fire exactly once in the suffix"

    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.argmax(dim=1), full.argmax(dim=1))

    # the cached prefix is the clean input of the cache point, reusable across noise settings
    injection.remove()
    clean_hidden = forward_prefix(model, site, x)
    assert torch.equal(hidden, clean_hidden)
    with torch.no_grad():
        torch.testing.assert_close(forward_suffix(model, site, clean_hidden), model(x), rtol=1e-5, atol=1e-5)


def test_cache_point_is_the_block_that_holds_the_site():
    model = small_vit()
    assert cache_point(model, "blocks.2.attn") == "blocks.2"
    assert cache_point(model, "blocks.2") == "blocks.2"
    assert cache_point(model, "image") == "image"
    resnet = small_resnet()
    assert cache_point(resnet, "layer4.0") == "layer4.0"


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_prefix_cache_then_suffix_is_the_full_forward_for_every_family(name, count_noise):
    model = family_model(name)
    x = family_images(name)
    clean = logits(model, x)
    # the class tokens mixed too: after the blocks they are all a token-pooling head reads
    spec = NoiseSpec("linear-optimal", axis="batch", skip_prefix_tokens=False)
    for site in valid_sites(model)[1:] + EXTRA_SITES[name]:
        hidden_clean = forward_prefix(model, site, x)
        torch.testing.assert_close(forward_suffix(model, site, hidden_clean), clean, rtol=1e-5, atol=1e-5)
        with inject(model, site, spec):
            del count_noise[:]
            full = logits(model, x)
            hidden = forward_prefix(model, site, x)
            assert torch.equal(hidden, hidden_clean), f"{site}: the cached prefix must be clean"
            with torch.no_grad():
                split = forward_suffix(model, site, hidden)
            assert len(count_noise) == 2, f"{site}: the noise must act once per pass"
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5, msg=site)
        assert not torch.allclose(full, clean), f"{site}: the noise had no effect"
        point = cache_point(model, site)
        if point == "image":
            assert hidden is x and not can_split(model, site)
        else:
            assert site == point or site.startswith(point + ".")


def test_any_module_path_is_a_site_and_outside_the_blocks_the_full_forward_runs():
    model = small_vit()
    x = images()
    for site in ("blocks.0.mlp", "blocks.1.attn.qkv", "norm", "head"):
        check_site(model, site)
    assert cache_point(model, "blocks.1.attn.qkv") == "blocks.1"
    assert cache_point(model, "norm") == "image" and not can_split(model, "norm")
    assert not can_split(model, "image")
    with inject(model, "norm", OPTIMAL_BATCH):
        assert forward_prefix(model, "norm", x) is x
        torch.testing.assert_close(forward_suffix(model, "norm", x), logits(model, x))
    resnet = small_resnet()
    check_site(resnet, "fc")
    assert cache_point(resnet, "layer2.0.conv1") == "layer2.0"


def _bf16_cases():
    cases = []
    for name, build in [*MODELS.items(), *((n, functools.partial(family_model, n)) for n in FAMILY_MODELS)]:
        sites = valid_sites(build())[1:]
        # an early and the last site, and the first sub-module site (a block's attention input)
        picked = dict.fromkeys([sites[0], sites[-1], *[s for s in sites if s.endswith(".attn")][:1]])
        cases += [(name, site) for site in picked]
    return cases


@pytest.mark.parametrize("name, site", _bf16_cases())
def test_under_bf16_autocast_the_cached_path_computes_what_the_full_forward_computes(name, site):
    """The cache keeps the dtype the forward carries at the cache point (a ViT's float32 residual
    stream, a ResNet's bfloat16 maps): cut there, the suffix is the same network, bit for bit."""
    model = MODELS[name]() if name in MODELS else family_model(name)
    x = images_for(name) if name in MODELS else family_images(name)
    injection = inject(model, site, OPTIMAL_BATCH)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model.eval()(x)
        injection.enabled = False
        hidden = forward_prefix(model, site, x)
        injection.enabled = True
        split = forward_suffix(model, site, hidden)
    assert torch.equal(split, full), f"max |difference| {float((split.float() - full.float()).abs().max()):.3g}"
    # what the cost estimate counts per cached value is what the cache holds
    assert hidden.element_size() == cache_bytes_per_value(model), hidden.dtype
