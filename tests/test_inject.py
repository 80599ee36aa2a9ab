"""Tests of noisynn/inject.py: a noise hooked into a timm model (ViT, DeiT, BEiT, ConViT, ResNet,
Swin, EfficientNet, any other) at a named site or any module path.

What a user relies on: the noise acts only where and when it was asked for (the site, the
train/eval mode, ``enabled``), everything before the site is untouched, ``remove()`` gives the
model back bit for bit, batch-axis Q* at batch size 1 is the plain model, and the two-halves
evaluation (``forward_prefix`` + ``forward_suffix``) is the same forward pass, noise included once,
and the noise acts on the axis it names in each layout a site can see ((B, N, D) tokens with the
right number of class tokens, (B, C, H, W), Swin's (B, H, W, C), (B, D)).
Small randomly initialised timm models keep this fast; the deep standard configurations are built
on the meta device, where only the module structure (and the order of the forward pass) exists.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from conftest import assert_user_error
from torch import nn

import noisynn.inject as inject_module
from noisynn.errors import UserError
from noisynn.inject import (
    all_sites,
    cache_bytes_per_value,
    cache_point,
    can_split,
    check_site,
    forward_prefix,
    forward_suffix,
    inject,
    mixed_axis_size,
    model_family,
    num_prefix_tokens_at,
    valid_sites,
)
from noisynn.noise import NoiseSpec, apply_noise, linear_transform

OPTIMAL_BATCH = NoiseSpec("linear-optimal", axis="batch")
GAUSSIAN = NoiseSpec("gaussian", strength=0.5)


def _small_vit() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # fixed weights, without touching the global stream
        torch.manual_seed(0)
        return _build_small_vit()


def _build_small_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=10,
        in_chans=1,
    ).eval()


def _small_resnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_small_resnet()


def _build_small_resnet() -> nn.Module:
    model = timm.create_model(
        "resnet18",
        pretrained=False,
        layers=(1, 1, 1, 1),
        channels=(8, 16, 32, 64),
        stem_width=8,
        num_classes=10,
        in_chans=1,
        # timm zeroes the last BN of each residual branch by default; with it, a noise at a
        # block's input would reach the output through the shortcut only
        zero_init_last=False,
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # train-mode forwards must not move the running statistics that eval mode uses
            m.momentum = 0.0
    return model.eval()


MODELS = {"vit": _small_vit, "resnet": _small_resnet}


def _images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    """Inputs for the small ViT, built for 16 px."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 16, 16, generator=g)


def _images_for(family: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    if family == "vit":
        return _images(batch, seed)
    # 32 px leaves the small ResNet a 1×1 map in stage 4
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 32, 32, generator=g)


def _module_at(model: nn.Module, site: str) -> nn.Module:
    return model if site == "image" else model.get_submodule(site)


# (family, site, an earlier module whose output must not change, or None for the image site)
SITES = [
    ("vit", "image", None),
    ("vit", "blocks.1", "blocks.0"),
    ("vit", "blocks.1.attn", "blocks.0"),
    ("vit", "blocks.2", "blocks.1"),
    ("resnet", "image", None),
    ("resnet", "layer3.0", "layer2"),
    ("resnet", "layer2.0", "layer1"),
    ("resnet", "layer4.0", "layer3"),
]


def _run(model: nn.Module, x: torch.Tensor, train: bool, earlier: str | None = None):
    """Logits (and the earlier module's output) in the given mode, without autograd."""
    model.train(train)
    captured = {}
    handle = None
    if earlier is not None:
        handle = model.get_submodule(earlier).register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out.detach().clone())
        )
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        if handle is not None:
            handle.remove()
        model.eval()
    return y, captured.get("h")


# --- where and when the noise acts -----------------------------------------------------------


@pytest.mark.parametrize("spec", [GAUSSIAN, OPTIMAL_BATCH], ids=["gaussian", "linear-optimal"])
@pytest.mark.parametrize("family, site, earlier", SITES)
@pytest.mark.parametrize("at_train, at_eval", [(True, False), (False, True)])
def test_noise_changes_the_output_only_in_the_enabled_mode(family, site, earlier, spec, at_train, at_eval):
    model = MODELS[family]()
    x = _images_for(family)
    clean = {mode: _run(model, x, mode, earlier) for mode in (False, True)}

    injection = inject(model, site, spec, at_train=at_train, at_eval=at_eval, seed=3)
    for train_mode, should_change in ((True, at_train), (False, at_eval)):
        y, h = _run(model, x, train_mode, earlier)
        y_clean, h_clean = clean[train_mode]
        if should_change:
            assert not torch.allclose(y, y_clean), f"noise had no effect in {'train' if train_mode else 'eval'} mode"
        else:
            assert torch.equal(y, y_clean), f"noise acted in {'train' if train_mode else 'eval'} mode"
        if earlier is not None:
            # the forward pass before the site is bit-identical, noise or not
            assert torch.equal(h, h_clean)

    injection.remove()
    for train_mode in (False, True):
        assert torch.equal(_run(model, x, train_mode)[0], clean[train_mode][0])


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_disabled_injection_gives_the_clean_output_and_reenabling_restores_the_noise(family, site, earlier):
    model = MODELS[family]()
    x = _images_for(family)
    clean = _run(model, x, False)[0]
    injection = inject(model, site, GAUSSIAN, seed=5)
    noisy = _run(model, x, False)[0]
    injection.enabled = False
    assert torch.equal(_run(model, x, False)[0], clean)
    injection.enabled = True
    injection.reseed(5)
    assert torch.equal(_run(model, x, False)[0], noisy)
    injection.remove()


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_remove_restores_the_model_bit_for_bit(family, site, earlier):
    model = MODELS[family]()
    x = _images_for(family)
    clean = _run(model, x, False)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with inject(model, site, OPTIMAL_BATCH):
        assert not torch.allclose(_run(model, x, False)[0], clean)
    assert torch.equal(_run(model, x, False)[0], clean)
    # no hook is left behind and no parameter or buffer changed
    assert not _module_at(model, site)._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_batch_axis_optimal_q_at_batch_size_one_is_the_clean_model(family, site, earlier):
    model = MODELS[family]()
    x = _images_for(family, batch=1)
    clean = _run(model, x, False)[0]
    with inject(model, site, OPTIMAL_BATCH):
        assert torch.equal(_run(model, x, False)[0], clean)


def test_batch_axis_optimal_q_makes_a_prediction_depend_on_the_other_images():
    """The leak docs/paper.md §6 is about: image 0's logits change when image 1 is swapped out."""
    model = _small_vit()
    x = _images(4, seed=1)
    y = x.clone()
    y[1] = _images(1, seed=2)[0]
    with inject(model, "blocks.2.attn", OPTIMAL_BATCH):
        out_x, out_y = _run(model, x, False)[0], _run(model, y, False)[0]
    assert not torch.allclose(out_x[0], out_y[0])
    # without the noise, each image is classified on its own
    clean_x, clean_y = _run(model, x, False)[0], _run(model, y, False)[0]
    torch.testing.assert_close(clean_x[0], clean_y[0])


@pytest.mark.parametrize(
    "family, site, prefix",
    [("vit", "blocks.1", 1), ("vit", "blocks.1.attn", 1), ("vit", "image", 0), ("resnet", "layer3.0", 0)],
)
def test_the_site_receives_the_noised_tensor_with_the_cls_token_untouched(family, site, prefix):
    """What reaches the module at the site is the noise applied to its clean input, CLS kept."""
    model = MODELS[family]()
    x = _images_for(family)
    seen = []

    def capture(module, args):
        seen.append(args[0].detach().clone())

    module = _module_at(model, site)
    handle = module.register_forward_pre_hook(capture)
    _run(model, x, False)
    handle.remove()
    clean_input = seen.pop()

    with inject(model, site, OPTIMAL_BATCH):
        assert num_prefix_tokens_at(model, site) == prefix
        # registered after the noise hook, so it sees what the module itself receives
        handle = module.register_forward_pre_hook(capture)
        _run(model, x, False)
        handle.remove()
    noisy_input = seen.pop()
    expected = linear_transform(clean_input, "optimal", "batch", num_prefix_tokens=prefix)
    torch.testing.assert_close(noisy_input, expected, rtol=0, atol=0)
    if prefix:
        assert torch.equal(noisy_input[:, :prefix], clean_input[:, :prefix])
        assert not torch.allclose(noisy_input[:, prefix:], clean_input[:, prefix:])


def test_attn_site_noises_the_attention_input_not_the_residual_stream():
    """Released ViT code: the noise enters LN(x) → attention only; the residual x stays clean."""
    model = _small_vit()
    x = _images()
    block = model.blocks[1]
    # the block output with noise at the attention input must equal x + attn(noise(LN(x))) + mlp(...)
    inputs = []
    h = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    with inject(model, "blocks.1.attn", OPTIMAL_BATCH):
        outputs = []
        h2 = block.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
        _run(model, x, False)
        h2.remove()
    h.remove()
    xin = inputs[-1]
    with torch.no_grad():
        a = block.attn(linear_transform(block.norm1(xin), "optimal", "batch", num_prefix_tokens=1))
        mid = xin + block.ls1(a)
        expected = mid + block.ls2(block.mlp(block.norm2(mid)))
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-6, atol=1e-6)


def test_random_noise_is_reproducible_by_seed_and_fresh_for_each_batch():
    model = _small_vit()
    x = _images()
    injection = inject(model, "blocks.1", GAUSSIAN, seed=7)
    first = _run(model, x, False)[0]
    second = _run(model, x, False)[0]
    assert not torch.equal(first, second)  # the stream advances: each batch gets new noise
    injection.reseed(7)
    assert torch.equal(_run(model, x, False)[0], first)
    state = injection.get_rng_state()
    third = _run(model, x, False)[0]
    injection.set_rng_state(state)
    assert torch.equal(_run(model, x, False)[0], third)  # a resumed evaluation continues the same stream
    injection.reseed(8)
    assert not torch.equal(_run(model, x, False)[0], first)
    injection.remove()

    # a new injection with the same seed on a fresh model gives the same noisy outputs
    other = _small_vit()
    with inject(other, "blocks.1", GAUSSIAN, seed=7):
        assert torch.equal(_run(other, x, False)[0], first)


@pytest.mark.parametrize("spec", [OPTIMAL_BATCH, NoiseSpec("linear-shift", axis="batch", alpha=0.3, neighbour="next"), GAUSSIAN],
                         ids=["optimal-batch", "shift-next", "gaussian"])
@pytest.mark.parametrize("site", ["image", "blocks.1.attn"])
def test_test_batches_joined_in_one_forward_are_noised_each_alone(spec, site):
    """What the evaluation's chunked forward relies on: inside joined_batches, the site receives
    exactly what batch-by-batch forwards give it (the batch axis mixes only within a test batch, the
    random stream advances batch after batch), and the logits agree up to float rounding."""
    sizes = [3, 5, 1, 7]
    x = _images(sum(sizes), seed=3)
    model = _small_vit()
    seen = []
    record = model.get_submodule(site) if site != "image" else model
    injection = inject(model, site, spec, seed=5)
    # registered after the noise hook, so it sees the noised input
    recorder = record.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        alone = torch.cat([model(part) for part in x.split(sizes)])
        alone_inputs = torch.cat(seen)
        seen.clear()
        injection.reseed(5)
        with inject_module.joined_batches(sizes):
            joined = model(x)
    recorder.remove()
    injection.remove()
    if site == "image":
        assert torch.equal(seen[0], alone_inputs)
    else:  # the part before the site runs on a larger matrix: float rounding only
        torch.testing.assert_close(seen[0], alone_inputs, rtol=0, atol=1e-5)
    torch.testing.assert_close(joined, alone, rtol=0, atol=1e-5)
    # and the noise did act across images where it mixes the batch axis
    if spec.axis == "batch":
        clean = model(x)
        assert not torch.allclose(clean, joined, atol=1e-3)
    # outside the block, one forward is one batch again
    assert inject_module._SEGMENTS is None


def test_none_noise_leaves_the_model_clean():
    model = _small_resnet()
    x = _images_for("resnet")
    clean = _run(model, x, False)[0]
    with inject(model, "layer3.0", NoiseSpec("none")):
        assert torch.equal(_run(model, x, False)[0], clean)


# --- the model in two halves -----------------------------------------------------------------


def _all_sites():
    return [(family, site) for family, build in MODELS.items() for site in valid_sites(build())]


@pytest.fixture
def count_noise(monkeypatch):
    calls = []

    def counting(spec, x, generator=None, num_prefix_tokens=0, **kwargs):
        calls.append(tuple(x.shape))
        return apply_noise(spec, x, generator, num_prefix_tokens, **kwargs)

    monkeypatch.setattr(inject_module, "apply_noise", counting)
    return calls


@pytest.mark.parametrize("spec", [OPTIMAL_BATCH, GAUSSIAN], ids=["linear-optimal", "gaussian"])
@pytest.mark.parametrize("family, site", _all_sites())
def test_prefix_then_suffix_reproduces_the_full_forward_pass(family, site, spec, count_noise):
    model = MODELS[family]()
    x = _images_for(family)
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
    model = _small_vit()
    assert cache_point(model, "blocks.2.attn") == "blocks.2"
    assert cache_point(model, "blocks.2") == "blocks.2"
    assert cache_point(model, "image") == "image"
    resnet = _small_resnet()
    assert cache_point(resnet, "layer4.0") == "layer4.0"


# --- the sites of the standard, deeper configurations ----------------------------------------


def _meta_model(name: str) -> nn.Module:
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
    model = _meta_model(name)
    assert model_family(model) == family
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
    handles = [_module_at(model, s).register_forward_pre_hook(lambda m, a, s=s: order.append(s)) for s in sites]
    with torch.device("meta"):
        out = model(torch.empty(2, 3, 224, 224))
    for h in handles:
        h.remove()
    assert order == sites
    assert tuple(out.shape) == (2, 1000)

    # an injection can be placed at the deepest site and removed again
    site = sites[-1]
    with inject(model, site, OPTIMAL_BATCH):
        assert len(_module_at(model, site)._forward_pre_hooks) == 1
    assert not _module_at(model, site)._forward_pre_hooks


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
    for fn in (cache_point, lambda m, s: forward_prefix(m, s, _images_for(family))):
        with pytest.raises(UserError):
            fn(model, bad)
    # nothing was hooked on the way to the error
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_unsupported_model_is_a_user_error():
    with pytest.raises(UserError) as e:
        inject(nn.Sequential(nn.Linear(3, 3)), "image", OPTIMAL_BATCH)
    assert_user_error(e, "ViT", "ResNet", "Sequential")


def test_rows_axis_on_a_non_square_grid_fails_at_the_site_as_a_user_error():
    """vit_tiny at 16 px has a 4×4 grid; with the CLS token counted it would not be square."""
    model = _small_vit()
    with inject(model, "blocks.0", NoiseSpec("linear-optimal", axis="rows", skip_prefix_tokens=False)):
        with pytest.raises(UserError) as e:
            _run(model, _images(), False)
    assert_user_error(e, "rows", "square", "num_prefix_tokens")
    with inject(model, "blocks.0", NoiseSpec("linear-optimal", axis="rows")):
        _run(model, _images(), False)  # counted correctly, the 4×4 grid is found


# --- any timm model, at any module path ------------------------------------------------------
#
# DeiT (plain and distilled), BEiT (per-block and shared relative position bias), ConViT (class
# token from block local_up_to_layer on), Swin (NHWC maps, stages that downsample first) and
# EfficientNet (NCHW, blocks in stages), all built from timm's configurations without weights and
# shrunk (small images, few blocks, narrow) so that each forward takes milliseconds.

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
FAMILY_MODELS = {
    # name: (timm name, overrides, image side, family, the released (last-block) site)
    "deit": ("deit_tiny_patch16_224", TINY_VIT, 16, "vit", "blocks.2.attn"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT, 16, "vit", "blocks.2.attn"),
    "beit": ("beit_base_patch16_224", TINY_VIT, 16, "vit", "blocks.2.attn"),
    "beit_shared_bias": ("beit_base_patch16_224", {**TINY_VIT, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True},
                         16, "vit", "blocks.2.attn"),
    "convit": ("convit_tiny", {**TINY_VIT, "local_up_to_layer": 1}, 16, "vit", "blocks.2.attn"),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10),
             32, "swin", "layers.1.blocks.1"),
    "efficientnet": ("tf_efficientnetv2_b0", dict(channel_multiplier=0.25, depth_multiplier=0.34, num_classes=10),
                     32, "efficientnet", "blocks.5.2"),
}
# sites beyond the named ones: inside a block (split at that block) and after the blocks (full forward)
EXTRA_SITES = {
    "deit": ["blocks.1.mlp.fc1", "blocks.0.norm1", "norm", "head"],
    "deit_distilled": ["blocks.1.mlp", "head_dist"],
    "beit": ["blocks.1.mlp.fc2", "fc_norm"],
    "beit_shared_bias": ["blocks.0.attn.proj"],
    "convit": ["blocks.0.mlp", "blocks.1.norm2", "norm"],
    "swin": ["layers.0.blocks.1.norm1", "layers.1.blocks.0.mlp", "layers.1.downsample", "patch_embed.norm", "norm"],
    "efficientnet": ["blocks.3.1.conv_pw", "blocks.3.0.se", "conv_head"],
}
_FAMILY_CACHE: dict[str, nn.Module] = {}


def _family_model(name: str) -> nn.Module:
    """A fresh copy of the small model (built once per session; copies keep tests independent)."""
    import copy

    if name not in _FAMILY_CACHE:
        timm_name, kwargs, _, _, _ = FAMILY_MODELS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _FAMILY_CACHE[name] = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    return copy.deepcopy(_FAMILY_CACHE[name])


def _family_images(name: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    side = FAMILY_MODELS[name][2]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_named_sites_of_each_family_are_accepted_and_listed_in_forward_order(name):
    model = _family_model(name)
    family, last = FAMILY_MODELS[name][3], FAMILY_MODELS[name][4]
    assert model_family(model) == family
    sites = valid_sites(model)
    assert sites[0] == "image" and sites[-1] == last
    for site in sites:
        check_site(model, site)
        assert site == "image" or can_split(model, site)
    # the order a forward pass reaches them, each once
    order = []
    handles = [_module_at(model, s).register_forward_pre_hook(lambda m, a, s=s: order.append(s)) for s in sites]
    _logits(model, _family_images(name, batch=1))
    for h in handles:
        h.remove()
    assert order == sites
    # all_sites: every module path, in the traced forward order, the named sites among them
    every = all_sites(model)
    assert every[0] == "image" and set(sites) <= set(every)
    assert [s for s in every if s in sites] == sites
    assert set(EXTRA_SITES[name]) <= set(every)
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_batch_axis_optimal_q_at_the_released_site_is_the_identity_at_batch_size_one(name):
    model = _family_model(name)
    x = _family_images(name, batch=1)
    clean = _logits(model, x)
    site = FAMILY_MODELS[name][4]
    with inject(model, site, OPTIMAL_BATCH) as handle:
        assert torch.equal(_logits(model, x), clean)
        assert handle.last_input_shape[0] == 1
        # the same noise on a batch of 4 does act
        assert not torch.allclose(_logits(model, _family_images(name))[:1], clean)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_prefix_cache_then_suffix_is_the_full_forward_for_every_family(name, count_noise):
    model = _family_model(name)
    x = _family_images(name)
    clean = _logits(model, x)
    # the class tokens mixed too: after the blocks they are all a token-pooling head reads
    spec = NoiseSpec("linear-optimal", axis="batch", skip_prefix_tokens=False)
    for site in valid_sites(model)[1:] + EXTRA_SITES[name]:
        hidden_clean = forward_prefix(model, site, x)
        torch.testing.assert_close(forward_suffix(model, site, hidden_clean), clean, rtol=1e-5, atol=1e-5)
        with inject(model, site, spec):
            del count_noise[:]
            full = _logits(model, x)
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


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_remove_restores_every_family_and_leaves_no_hook(name):
    model = _family_model(name)
    x = _family_images(name)
    clean = _logits(model, x)
    for site in (FAMILY_MODELS[name][4], "image", EXTRA_SITES[name][0]):
        handle = inject(model, site, GAUSSIAN, seed=2)
        assert not torch.allclose(_logits(model, x), clean)
        handle.remove()
        assert torch.equal(_logits(model, x), clean)
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
    model = _family_model(name)
    x = _family_images(name)
    module = _module_at(model, site)
    seen = []
    capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    _logits(model, x)
    capture.remove()
    noise = NoiseSpec("linear-optimal", axis="features")
    with inject(model, site, noise) as handle:
        capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        _logits(model, x)
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


@pytest.mark.parametrize("neighbour", ["previous", "next"])
def test_swin_nhwc_maps_rows_mix_h_and_features_mix_c(neighbour):
    model = _family_model("swin")
    site = "layers.0.blocks.1"  # (B, 8, 8, 16)
    module = model.get_submodule(site)
    x = _family_images("swin")
    seen = []
    capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    for axis in ("rows", "features"):
        spec = NoiseSpec("linear-shift", axis=axis, alpha=0.25, neighbour=neighbour)
        with inject(model, site, spec) as handle:
            # registered after the noise: sees what the block receives
            inner = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
            _logits(model, x)
            inner.remove()
        clean_in, noisy_in = seen[-2], seen[-1]
        b, h, w, c = clean_in.shape
        assert handle.layout == "nhwc"
        step = -1 if neighbour == "previous" else 1
        expected = torch.empty_like(clean_in)
        for i in range(h if axis == "rows" else c):
            j = (i + step) % (h if axis == "rows" else c)
            if axis == "rows":
                expected[:, i] = 0.75 * clean_in[:, i] + 0.25 * clean_in[:, j]
            else:
                expected[..., i] = 0.75 * clean_in[..., i] + 0.25 * clean_in[..., j]
        torch.testing.assert_close(noisy_in, expected, rtol=1e-6, atol=1e-6)
        assert handle.mixed_axis_size() == (h if axis == "rows" else c)
        assert mixed_axis_size(spec, handle.last_input_shape, 0, "nhwc") == (h if axis == "rows" else c)
        assert handle.mixed_axis_size(batch_size=10) == (h if axis == "rows" else c)
    capture.remove()


def test_swin_window_attention_refuses_the_batch_axis_but_takes_the_features_axis():
    model = _family_model("swin")
    x = _family_images("swin")
    site = "layers.0.blocks.0.attn"  # (4 windows × 4 images, 16 tokens, 16)
    clean = _logits(model, x)
    with inject(model, site, OPTIMAL_BATCH):
        with pytest.raises(UserError) as e:
            _logits(model, x)
    assert_user_error(e, repr(site), "(16, 16, 16)", "batch", "windows", "layers.0.blocks.0")
    with inject(model, site, NoiseSpec("linear-optimal", axis="features")) as handle:
        assert not torch.allclose(_logits(model, x), clean)
        assert handle.layout == "windows" and handle.mixed_axis_size() == 16
    assert mixed_axis_size(OPTIMAL_BATCH, (16, 16, 16), 0, "windows") == 16


@pytest.mark.parametrize(
    "name, site, axis, fragment",
    [
        ("deit", "head", "rows", "no rows axis"),  # (B, D) features
        ("efficientnet", "blocks.5.2", "rows", "size 1"),  # a 1×1 map at 32 px
        ("efficientnet", "conv_head", "rows", "size 1"),
        ("deit", "blocks.0.attn.q_norm", "features", "no features axis"),  # (B, heads, N, d): unknown layout
    ],
)
def test_an_axis_the_site_layout_lacks_is_a_user_error_naming_the_site_and_shape(name, site, axis, fragment):
    model = _family_model(name)
    x = _family_images(name)
    seen = []
    h = _module_at(model, site).register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    _logits(model, x)
    h.remove()
    with inject(model, site, NoiseSpec("linear-shift", axis=axis, alpha=0.3)):
        with pytest.raises(UserError) as e:
            _logits(model, x)
    assert_user_error(e, repr(site), str(seen[0]), axis, fragment)
    # the batch axis acts on any layout
    with inject(model, site, NoiseSpec("linear-shift", axis="batch", alpha=0.3)):
        _logits(model, x)


def test_any_module_path_is_a_site_and_outside_the_blocks_the_full_forward_runs():
    model = _small_vit()
    x = _images()
    for site in ("blocks.0.mlp", "blocks.1.attn.qkv", "norm", "head"):
        check_site(model, site)
    assert cache_point(model, "blocks.1.attn.qkv") == "blocks.1"
    assert cache_point(model, "norm") == "image" and not can_split(model, "norm")
    assert not can_split(model, "image")
    with inject(model, "norm", OPTIMAL_BATCH):
        assert forward_prefix(model, "norm", x) is x
        torch.testing.assert_close(forward_suffix(model, "norm", x), _logits(model, x))
    resnet = _small_resnet()
    check_site(resnet, "fc")
    assert cache_point(resnet, "layer2.0.conv1") == "layer2.0"


def test_a_timm_model_of_no_named_family_takes_any_module_path_with_the_full_forward():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # conv_mlp=False: the MLP is Linear layers on (B, H, W, C); layer scale 1 so that it matters
        model = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                  conv_mlp=False, ls_init_value=1.0, num_classes=10).eval()
    assert model_family(model) == "generic"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clean = _logits(model, x)
    sites = valid_sites(model)
    assert sites[:3] == ["image", "stem.0", "stem.1"] and "stages.3.blocks.0" in sites
    every = all_sites(model)
    assert [s for s in every if s in sites] == sites
    for site in ("stages.2.blocks.0", "stages.1.blocks.0.mlp.fc1"):
        assert cache_point(model, site) == "image" and not can_split(model, site)
        with inject(model, site, OPTIMAL_BATCH):
            assert forward_prefix(model, site, x) is x
            noisy = forward_suffix(model, site, x)
            torch.testing.assert_close(noisy, _logits(model, x))
            assert not torch.allclose(noisy, clean)
        assert torch.equal(_logits(model, x), clean)
    # ConvNeXt's MLP is a Linear on (B, H, W, C): its input is taken as NHWC
    with inject(model, "stages.1.blocks.0.mlp.fc1", NoiseSpec("linear-optimal", axis="features")) as handle:
        _logits(model, x)
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


def _bf16_cases():
    cases = []
    for name, build in [*MODELS.items(), *((n, functools.partial(_family_model, n)) for n in FAMILY_MODELS)]:
        sites = valid_sites(build())[1:]
        # an early and the last site, and the first sub-module site (a block's attention input)
        picked = dict.fromkeys([sites[0], sites[-1], *[s for s in sites if s.endswith(".attn")][:1]])
        cases += [(name, site) for site in picked]
    return cases


@pytest.mark.parametrize("name, site", _bf16_cases())
def test_under_bf16_autocast_the_cached_path_computes_what_the_full_forward_computes(name, site):
    """The cache keeps the dtype the forward carries at the cache point (a ViT's float32 residual
    stream, a ResNet's bfloat16 maps): cut there, the suffix is the same network, bit for bit."""
    model = MODELS[name]() if name in MODELS else _family_model(name)
    x = _images_for(name) if name in MODELS else _family_images(name)
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
