"""Tests of noisynn/inject/hook.py: a noise hooked into a timm model at a site, from the outside.

What a user relies on: the noise acts only where and when it was asked for (the site, the
train/eval mode, ``enabled``), everything before the site is untouched, ``remove()`` gives the
model back bit for bit, batch-axis Q* at batch size 1 is the plain model, test batches joined in one
forward are noised each alone, and the noise acts on the axis it names in each layout a site can see
or refuses it as a user error naming the site.
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
    images,
    images_for,
    logits,
    module_at,
    run_in_mode,
    small_resnet,
    small_vit,
)

from noisynn.errors import UserError
from noisynn.inject.hook import inject, joined_batches
from noisynn.inject.sites import num_prefix_tokens_at
from noisynn.noise import NoiseSpec, linear_transform, mixed_axis_size

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


# --- where and when the noise acts -----------------------------------------------------------


@pytest.mark.parametrize("spec", [GAUSSIAN, OPTIMAL_BATCH], ids=["gaussian", "linear-optimal"])
@pytest.mark.parametrize("family, site, earlier", SITES)
@pytest.mark.parametrize("at_train, at_eval", [(True, False), (False, True)])
def test_noise_changes_the_output_only_in_the_enabled_mode(family, site, earlier, spec, at_train, at_eval):
    model = MODELS[family]()
    x = images_for(family)
    clean = {mode: run_in_mode(model, x, mode, earlier) for mode in (False, True)}

    injection = inject(model, site, spec, at_train=at_train, at_eval=at_eval, seed=3)
    for train_mode, should_change in ((True, at_train), (False, at_eval)):
        y, h = run_in_mode(model, x, train_mode, earlier)
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
        assert torch.equal(run_in_mode(model, x, train_mode)[0], clean[train_mode][0])


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_disabled_injection_gives_the_clean_output_and_reenabling_restores_the_noise(family, site, earlier):
    model = MODELS[family]()
    x = images_for(family)
    clean = run_in_mode(model, x, False)[0]
    injection = inject(model, site, GAUSSIAN, seed=5)
    noisy = run_in_mode(model, x, False)[0]
    injection.enabled = False
    assert torch.equal(run_in_mode(model, x, False)[0], clean)
    injection.enabled = True
    injection.reseed(5)
    assert torch.equal(run_in_mode(model, x, False)[0], noisy)
    injection.remove()


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_remove_restores_the_model_bit_for_bit(family, site, earlier):
    model = MODELS[family]()
    x = images_for(family)
    clean = run_in_mode(model, x, False)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with inject(model, site, OPTIMAL_BATCH):
        assert not torch.allclose(run_in_mode(model, x, False)[0], clean)
    assert torch.equal(run_in_mode(model, x, False)[0], clean)
    # no hook is left behind and no parameter or buffer changed
    assert not module_at(model, site)._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family, site, earlier", SITES)
def test_batch_axis_optimal_q_at_batch_size_one_is_the_clean_model(family, site, earlier):
    model = MODELS[family]()
    x = images_for(family, batch=1)
    clean = run_in_mode(model, x, False)[0]
    with inject(model, site, OPTIMAL_BATCH):
        assert torch.equal(run_in_mode(model, x, False)[0], clean)


def test_batch_axis_optimal_q_makes_a_prediction_depend_on_the_other_images():
    """The leak docs/paper.md §6 is about: image 0's logits change when image 1 is swapped out."""
    model = small_vit()
    x = images(4, seed=1)
    y = x.clone()
    y[1] = images(1, seed=2)[0]
    with inject(model, "blocks.2.attn", OPTIMAL_BATCH):
        out_x, out_y = run_in_mode(model, x, False)[0], run_in_mode(model, y, False)[0]
    assert not torch.allclose(out_x[0], out_y[0])
    # without the noise, each image is classified on its own
    clean_x, clean_y = run_in_mode(model, x, False)[0], run_in_mode(model, y, False)[0]
    torch.testing.assert_close(clean_x[0], clean_y[0])


@pytest.mark.parametrize(
    "family, site, prefix",
    [("vit", "blocks.1", 1), ("vit", "blocks.1.attn", 1), ("vit", "image", 0), ("resnet", "layer3.0", 0)],
)
def test_the_site_receives_the_noised_tensor_with_the_cls_token_untouched(family, site, prefix):
    """What reaches the module at the site is the noise applied to its clean input, CLS kept."""
    model = MODELS[family]()
    x = images_for(family)
    seen = []

    def capture(module, args):
        seen.append(args[0].detach().clone())

    module = module_at(model, site)
    handle = module.register_forward_pre_hook(capture)
    run_in_mode(model, x, False)
    handle.remove()
    clean_input = seen.pop()

    with inject(model, site, OPTIMAL_BATCH):
        assert num_prefix_tokens_at(model, site) == prefix
        # registered after the noise hook, so it sees what the module itself receives
        handle = module.register_forward_pre_hook(capture)
        run_in_mode(model, x, False)
        handle.remove()
    noisy_input = seen.pop()
    expected = linear_transform(clean_input, "optimal", "batch", num_prefix_tokens=prefix)
    torch.testing.assert_close(noisy_input, expected, rtol=0, atol=0)
    if prefix:
        assert torch.equal(noisy_input[:, :prefix], clean_input[:, :prefix])
        assert not torch.allclose(noisy_input[:, prefix:], clean_input[:, prefix:])


def test_attn_site_noises_the_attention_input_not_the_residual_stream():
    """Released ViT code: the noise enters LN(x) → attention only; the residual x stays clean."""
    model = small_vit()
    x = images()
    block = model.blocks[1]
    # the block output with noise at the attention input must equal x + attn(noise(LN(x))) + mlp(...)
    inputs = []
    h = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    with inject(model, "blocks.1.attn", OPTIMAL_BATCH):
        outputs = []
        h2 = block.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
        run_in_mode(model, x, False)
        h2.remove()
    h.remove()
    xin = inputs[-1]
    with torch.no_grad():
        a = block.attn(linear_transform(block.norm1(xin), "optimal", "batch", num_prefix_tokens=1))
        mid = xin + block.ls1(a)
        expected = mid + block.ls2(block.mlp(block.norm2(mid)))
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-6, atol=1e-6)


def test_random_noise_is_reproducible_by_seed_and_fresh_for_each_batch():
    model = small_vit()
    x = images()
    injection = inject(model, "blocks.1", GAUSSIAN, seed=7)
    first = run_in_mode(model, x, False)[0]
    second = run_in_mode(model, x, False)[0]
    assert not torch.equal(first, second)  # the stream advances: each batch gets new noise
    injection.reseed(7)
    assert torch.equal(run_in_mode(model, x, False)[0], first)
    state = injection.get_rng_state()
    third = run_in_mode(model, x, False)[0]
    injection.set_rng_state(state)
    assert torch.equal(run_in_mode(model, x, False)[0], third)  # a resumed evaluation continues the same stream
    injection.reseed(8)
    assert not torch.equal(run_in_mode(model, x, False)[0], first)
    injection.remove()

    # a new injection with the same seed on a fresh model gives the same noisy outputs
    other = small_vit()
    with inject(other, "blocks.1", GAUSSIAN, seed=7):
        assert torch.equal(run_in_mode(other, x, False)[0], first)


@pytest.mark.parametrize("spec", [OPTIMAL_BATCH, NoiseSpec("linear-shift", axis="batch", alpha=0.3, neighbour="next"), GAUSSIAN],
                         ids=["optimal-batch", "shift-next", "gaussian"])
@pytest.mark.parametrize("site", ["image", "blocks.1.attn"])
def test_test_batches_joined_in_one_forward_are_noised_each_alone(spec, site):
    """What the evaluation's chunked forward relies on: inside joined_batches, the site receives
    exactly what batch-by-batch forwards give it (the batch axis mixes only within a test batch, the
    random stream advances batch after batch), and the logits agree up to float rounding."""
    sizes = [3, 5, 1, 7]
    x = images(sum(sizes), seed=3)
    model = small_vit()
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
        with joined_batches(model, sizes):
            joined = model(x)
        # outside the block, one forward is one batch again, also inside another model's block
        injection.reseed(5)
        whole = model(x)
        with joined_batches(small_resnet(), sizes):
            injection.reseed(5)
            assert torch.equal(model(x), whole)
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
    if spec.kind.startswith("linear"):  # a whole-batch mix is not the joined batches' (a Gaussian's stream is the same)
        assert not torch.allclose(whole, joined, atol=1e-3)


def test_none_noise_leaves_the_model_clean():
    model = small_resnet()
    x = images_for("resnet")
    clean = run_in_mode(model, x, False)[0]
    with inject(model, "layer3.0", NoiseSpec("none")):
        assert torch.equal(run_in_mode(model, x, False)[0], clean)


def test_rows_axis_on_a_non_square_grid_fails_at_the_site_as_a_user_error():
    """vit_tiny at 16 px has a 4×4 grid; with the CLS token counted it would not be square."""
    model = small_vit()
    with inject(model, "blocks.0", NoiseSpec("linear-optimal", axis="rows", skip_prefix_tokens=False)):
        with pytest.raises(UserError) as e:
            run_in_mode(model, images(), False)
    assert_user_error(e, "rows", "square", "num_prefix_tokens")
    with inject(model, "blocks.0", NoiseSpec("linear-optimal", axis="rows")):
        run_in_mode(model, images(), False)  # counted correctly, the 4×4 grid is found


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_batch_axis_optimal_q_at_the_released_site_is_the_identity_at_batch_size_one(name):
    model = family_model(name)
    x = family_images(name, batch=1)
    clean = logits(model, x)
    site = FAMILY_MODELS[name][4]
    with inject(model, site, OPTIMAL_BATCH) as handle:
        assert torch.equal(logits(model, x), clean)
        assert handle.last_input_shape[0] == 1
        # the same noise on a batch of 4 does act
        assert not torch.allclose(logits(model, family_images(name))[:1], clean)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_remove_restores_every_family_and_leaves_no_hook(name):
    model = family_model(name)
    x = family_images(name)
    clean = logits(model, x)
    for site in (FAMILY_MODELS[name][4], "image", EXTRA_SITES[name][0]):
        handle = inject(model, site, GAUSSIAN, seed=2)
        assert not torch.allclose(logits(model, x), clean)
        handle.remove()
        assert torch.equal(logits(model, x), clean)
        assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("neighbour", ["previous", "next"])
def test_swin_nhwc_maps_rows_mix_h_and_features_mix_c(neighbour):
    model = family_model("swin")
    site = "layers.0.blocks.1"  # (B, 8, 8, 16)
    module = model.get_submodule(site)
    x = family_images("swin")
    seen = []
    capture = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    for axis in ("rows", "features"):
        spec = NoiseSpec("linear-shift", axis=axis, alpha=0.25, neighbour=neighbour)
        with inject(model, site, spec) as handle:
            # registered after the noise: sees what the block receives
            inner = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
            logits(model, x)
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
    model = family_model("swin")
    x = family_images("swin")
    site = "layers.0.blocks.0.attn"  # (4 windows × 4 images, 16 tokens, 16)
    clean = logits(model, x)
    with inject(model, site, OPTIMAL_BATCH):
        with pytest.raises(UserError) as e:
            logits(model, x)
    assert_user_error(e, repr(site), "(16, 16, 16)", "batch", "windows", "layers.0.blocks.0")
    with inject(model, site, NoiseSpec("linear-optimal", axis="features")) as handle:
        assert not torch.allclose(logits(model, x), clean)
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
    model = family_model(name)
    x = family_images(name)
    seen = []
    h = module_at(model, site).register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    logits(model, x)
    h.remove()
    with inject(model, site, NoiseSpec("linear-shift", axis=axis, alpha=0.3)):
        with pytest.raises(UserError) as e:
            logits(model, x)
    assert_user_error(e, repr(site), str(seen[0]), axis, fragment)
    # the batch axis acts on any layout
    with inject(model, site, NoiseSpec("linear-shift", axis="batch", alpha=0.3)):
        logits(model, x)


# --- the released ResNet-18 gradient at stage 4 ----------------------------------------------------


@pytest.mark.parametrize("site, detach", [("layer4.0", False), ("layer4.1", "partner")])
def test_released_resnet18_shift_gradient_at_the_first_and_a_later_sub_block(site, detach):
    """The released ResNet-18 mixes the next sample into sub-block ``--sub_noisy_layer`` of stage 4 as
    ``x + alpha·(x_copy - x)`` (NoisyCNN_CircularShiftQ/CNNs.py line 565, github.com/Shawey94/NoisyNN
    @719ccf6). Before the first sub-block ``x_copy`` is the shifted ``x.clone()`` (line 560), in the
    graph: the gradient is the whole (I + Q)ᵀ g, g_i·(1 - alpha) + g_(i-1)·alpha (``detach: false``).
    Before a later sub-block it is the shifted ``x.detach()`` of the previous sub-block's output (line
    575), and only ``x`` keeps its gradient: (1 - alpha)·g (``detach: partner``). Checked on the input
    of the sub-block, against g, the gradient at the noised tensor the sub-block receives."""
    alpha = 0.3
    model = timm.create_model("resnet18", num_classes=3).eval()
    block = model.get_submodule(site)
    seen = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            seen[name] = args[0]
        return hook

    before = block.register_forward_pre_hook(keep("input"))  # hooks run in the order they are registered
    handle = inject(model, site, NoiseSpec("linear-shift", alpha=alpha, neighbour="next", detach=detach))
    after = block.register_forward_pre_hook(keep("noised"))
    model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).logsumexp(-1).sum().backward()
    for h in (before, handle, after):
        h.remove()
    g = seen["noised"].grad
    expected = (1 - alpha) * g + (alpha * torch.roll(g, 1, dims=0) if detach is False else 0)
    torch.testing.assert_close(seen["input"].grad, expected)
    assert not torch.allclose(expected, g)  # neither is the identity that detach: true gives
