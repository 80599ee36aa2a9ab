"""Small timm models and inputs shared by the tests of noisynn/inject/ (test_inject_hook, test_inject_sites,
test_inject_split, test_inject_families).

Small randomly initialised timm models keep the tests fast: a ViT and a ResNet on 1-channel
images, and one model of each family's variants shrunk from timm's configurations.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from noisynn.noise import NoiseSpec

OPTIMAL_BATCH = NoiseSpec("linear-optimal", axis="batch")
GAUSSIAN = NoiseSpec("gaussian", strength=0.5)


def small_vit() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # fixed weights, without touching the global stream
        torch.manual_seed(0)
        return build_small_vit()


def build_small_vit() -> nn.Module:
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


def small_resnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_small_resnet()


def build_small_resnet() -> nn.Module:
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


MODELS = {"vit": small_vit, "resnet": small_resnet}


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    """Inputs for the small ViT, built for 16 px."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 16, 16, generator=g)


def images_for(family: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    if family == "vit":
        return images(batch, seed)
    # 32 px leaves the small ResNet a 1×1 map in stage 4
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 32, 32, generator=g)


def module_at(model: nn.Module, site: str) -> nn.Module:
    return model if site == "image" else model.get_submodule(site)


def run_in_mode(model: nn.Module, x: torch.Tensor, train: bool, earlier: str | None = None):
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


# --- one small model of each family's variants --------------------------------------------------
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


def family_model(name: str) -> nn.Module:
    """A fresh copy of the small model (built once per session; copies keep tests independent)."""
    import copy

    if name not in _FAMILY_CACHE:
        timm_name, kwargs, _, _, _ = FAMILY_MODELS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _FAMILY_CACHE[name] = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    return copy.deepcopy(_FAMILY_CACHE[name])


def family_images(name: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    side = FAMILY_MODELS[name][2]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)
