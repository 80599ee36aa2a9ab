"""The model families injection knows, one registration each (``noisynn.inject.registry``).

``vit``, ``resnet``, ``swin`` and ``efficientnet`` name their sites and cut their forward at a
block; ``generic`` takes any other timm model, which always runs its full forward.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import nn

from noisynn.inject.registry import Family, register
from noisynn.inject.sites import all_sites

_PATCH_EMBED = ("patch_embed", "patch_embed.proj")  # a 4-d input there is the image's NCHW map


def _timm_class(module: str, name: str):
    """A timm model class, or None when this timm has no such class."""
    try:
        return getattr(importlib.import_module(f"timm.models.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _isinstance(model: nn.Module, *classes) -> bool:
    return any(c is not None and isinstance(model, c) for c in classes)


def _runs_forward_of(model: nn.Module, base) -> bool:
    """Whether ``model`` runs ``base``'s own forward, so that the suffix rebuilt from it is the forward."""
    cls = type(model)
    return cls.forward_features is base.forward_features and cls.forward is base.forward


# --- vit: timm VisionTransformer incl. DeiT and distilled DeiT, Beit, ConVit --------------------
# Sites: blocks.{i} (the block's input, the residual stream) and blocks.{i}.attn (the attention's
# input, i.e. after the block's first norm: where the released code adds it).

_VIT_CLASSES = {"vit": ("vision_transformer", "VisionTransformer"), "beit": ("beit", "Beit"), "convit": ("convit", "ConVit")}
_VIT_BLOCK = re.compile(r"^(blocks\.(\d+))(\..+)?$")


def _vit_kind(model: nn.Module) -> str | None:
    """``vit`` (VisionTransformer and subclasses), ``beit`` or ``convit``; None for other models."""
    for kind, (module, name) in _VIT_CLASSES.items():
        if _isinstance(model, _timm_class(module, name)):
            return kind
    return None


def _vit_sites(model: nn.Module) -> list[str]:
    sites = []
    for i, block in enumerate(model.blocks):
        sites.append(f"blocks.{i}")
        if isinstance(getattr(block, "attn", None), nn.Module):
            sites.append(f"blocks.{i}.attn")
    return sites


def _vit_prefix(model: nn.Module, site: str, n_tokens: int | None) -> int:
    """0 in the patch embedding; ConViT prepends its class token only before block
    ``local_up_to_layer``, so the blocks before it see none."""
    if site.split(".")[0] == "patch_embed":
        return 0
    if _vit_kind(model) == "convit":
        if getattr(model, "cls_token", None) is None:
            return 0
        start = int(model.local_up_to_layer)
        m = _VIT_BLOCK.match(site)
        if m is None:  # after the blocks: the class token is there if some block prepended it
            return 1 if start < len(model.blocks) else 0
        return 1 if int(m.group(2)) >= start else 0
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    return 1 if getattr(model, "cls_token", None) is not None else 0


def _vit_splittable(model: nn.Module) -> bool:
    kind = _vit_kind(model)
    return kind is not None and _runs_forward_of(model, _timm_class(*_VIT_CLASSES[kind]))


def _vit_suffix(model: nn.Module, block: re.Match, x: torch.Tensor) -> torch.Tensor:
    start = int(block.group(2))
    kind = _vit_kind(model)
    if kind == "beit":
        rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for b in model.blocks[start:]:
            x = b(x, shared_rel_pos_bias=rel_pos_bias)
    elif kind == "convit":
        for u in range(start, len(model.blocks)):
            if u == model.local_up_to_layer and u > start and model.cls_token is not None:
                x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = model.blocks[u](x)
    else:
        for b in model.blocks[start:]:
            x = b(x)
    return model.forward_head(model.norm(x))


register(Family(
    name="vit",
    described="ViT/DeiT/BEiT/ConViT",
    recognises=lambda model: hasattr(model, "blocks") and hasattr(model, "patch_embed") and _vit_kind(model) is not None,
    named_sites=_vit_sites,
    prefix_tokens=_vit_prefix,
    # a 4-d tensor inside a block is an attention internal (B, heads, N, N)
    map_layout=lambda site, module, x: "nchw" if site in _PATCH_EMBED else "unknown",
    block=_VIT_BLOCK,
    splittable=_vit_splittable,
    suffix=_vit_suffix,
    # the residual stream stays float32: the LayerNorms run in float32 and promote each residual sum
    stream_bytes=4,
))


# --- resnet: layer{s}.{b}, the input of sub-block b (0-based) of stage s -------------------------
# (the released ResNet script's stage 4, sub-block 3 (1-based) is layer4.2)


def _resnet_suffix(model: nn.Module, block: re.Match, x: torch.Tensor) -> torch.Tensor:
    stage, start = int(block.group(2)), int(block.group(3))
    for sub in getattr(model, f"layer{stage}")[start:]:
        x = sub(x)
    for s in range(stage + 1, 5):
        x = getattr(model, f"layer{s}")(x)
    return model.forward_head(x)


def _resnet_splittable(model: nn.Module) -> bool:
    base = _timm_class("resnet", "ResNet")
    return base is not None and isinstance(model, base) and _runs_forward_of(model, base)


register(Family(
    name="resnet",
    described="ResNet",
    recognises=lambda model: all(hasattr(model, f"layer{s}") for s in (1, 2, 3, 4)) and hasattr(model, "conv1"),
    named_sites=lambda model: [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in range(len(getattr(model, f"layer{s}")))],
    prefix_tokens=lambda model, site, n_tokens: 0,
    map_layout=lambda site, module, x: "nchw",
    block=re.compile(r"^(layer([1-4])\.(\d+))(\..+)?$"),
    splittable=_resnet_splittable,
    suffix=_resnet_suffix,
    stream_bytes=2,  # the maps are in the autocast dtype
))


# --- swin: SwinTransformer, SwinTransformerV2 ----------------------------------------------------
# Sites: layers.{s}.blocks.{b}, a block's (B, H, W, C) input. A block's attn receives
# window-partitioned, cyclically shifted tokens (num_windows·B, window_area, C), not one image per
# row, so it is not a named site (it is in all_sites; the batch axis is refused there).

_SWIN_CLASSES = (("swin_transformer", "SwinTransformer"), ("swin_transformer_v2", "SwinTransformerV2"))


def _swin_splittable(model: nn.Module) -> bool:
    for base in (_timm_class(*c) for c in _SWIN_CLASSES):
        if base is not None and isinstance(model, base):
            return _runs_forward_of(model, base)
    return False


def _swin_suffix(model: nn.Module, block: re.Match, x: torch.Tensor) -> torch.Tensor:
    stage, start = int(block.group(2)), int(block.group(3))
    # a Swin stage downsamples first, then runs its blocks: the cached block input is past the
    # stage's downsample, and each later stage brings its own
    for b in model.layers[stage].blocks[start:]:
        x = b(x)
    for layer in model.layers[stage + 1 :]:
        x = layer(x)
    return model.forward_head(model.norm(x))


register(Family(
    name="swin",
    described="Swin",
    recognises=lambda model: _isinstance(model, *(_timm_class(*c) for c in _SWIN_CLASSES)),
    named_sites=lambda model: [f"layers.{s}.blocks.{b}" for s, stage in enumerate(model.layers) for b in range(len(stage.blocks))],
    prefix_tokens=lambda model, site, n_tokens: 0,
    map_layout=lambda site, module, x: "nchw" if site in _PATCH_EMBED else "nhwc",
    windows=re.compile(r"^layers\.\d+\.blocks\.\d+\.attn(\..+)?$"),
    block=re.compile(r"^(layers\.(\d+)\.blocks\.(\d+))(\..+)?$"),
    splittable=_swin_splittable,
    suffix=_swin_suffix,
    stream_bytes=2,  # the patch merging ends in a Linear: the maps are in the autocast dtype
))


# --- efficientnet: blocks.{s}.{b}, block b of stage s (NCHW) -------------------------------------


def _efficientnet_suffix(model: nn.Module, block: re.Match, x: torch.Tensor) -> torch.Tensor:
    stage, start = int(block.group(2)), int(block.group(3))
    for b in model.blocks[stage][start:]:
        x = b(x)
    for blocks in model.blocks[stage + 1 :]:
        x = blocks(x)
    return model.forward_head(model.bn2(model.conv_head(x)))


register(Family(
    name="efficientnet",
    described="EfficientNet",
    recognises=lambda model: (_isinstance(model, _timm_class("efficientnet", "EfficientNet"))
                              and isinstance(model.blocks, nn.Sequential)),
    named_sites=lambda model: [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))],
    prefix_tokens=lambda model, site, n_tokens: 0,
    map_layout=lambda site, module, x: "nchw",
    block=re.compile(r"^(blocks\.(\d+)\.(\d+))(\..+)?$"),
    splittable=lambda model: _runs_forward_of(model, _timm_class("efficientnet", "EfficientNet")),
    suffix=_efficientnet_suffix,
    stream_bytes=2,  # the maps are in the autocast dtype
))


# --- generic: any other timm model (ConvNeXt, CaiT, Eva ...) -------------------------------------
# Sites: the top-level modules and the elements of top-level sequences (stages.{s}.blocks.{b}
# where stages hold blocks), in forward order. The forward is never cut.


def _generic_sites(model: nn.Module) -> list[str]:
    candidates = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child):
            for i, sub in enumerate(child):
                inner = getattr(sub, "blocks", None)
                if isinstance(inner, (nn.Sequential, nn.ModuleList)) and len(inner):
                    candidates += [f"{name}.{i}.blocks.{j}" for j in range(len(inner))]
                else:
                    candidates.append(f"{name}.{i}")
        else:
            candidates.append(name)
    order = {p: n for n, p in enumerate(all_sites(model))}
    return sorted((c for c in candidates if c in order), key=order.__getitem__)


def _generic_prefix(model: nn.Module, site: str, n_tokens: int | None) -> int:
    """The model's ``num_prefix_tokens``; in a forward, only the tokens beyond the patch grid, up
    to that number (CaiT's blocks, say, see patches only)."""
    declared = int(getattr(model, "num_prefix_tokens", 0) or 0)
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if n_tokens is not None and declared and isinstance(num_patches, int):
        extra = n_tokens - num_patches
        return extra if 0 <= extra <= declared else 0
    return declared


def _generic_layout(site: str, module: nn.Module, x: torch.Tensor) -> str:
    # a Linear or a plain LayerNorm on the last dim of a 4-d tensor sees (B, H, W, C)
    last = x.shape[-1]
    if isinstance(module, nn.Linear) and module.in_features == last:
        return "nhwc"
    if type(module) is nn.LayerNorm and tuple(module.normalized_shape) == (last,):
        return "nhwc"
    return "nchw"


register(Family(
    name="generic",
    described="any other timm model",
    recognises=lambda model: (callable(getattr(model, "forward_features", None))
                              and callable(getattr(model, "forward_head", None))),
    named_sites=_generic_sites,
    prefix_tokens=_generic_prefix,
    map_layout=_generic_layout,
), fallback=True)
