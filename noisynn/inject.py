"""Injection of a noise into a timm model, from the outside, at a named site.

A site is ``image`` (the normalized input batch) or any module path of the model
(``model.get_submodule(path)``); the noise is applied to that module's input (a forward pre-hook on
its first positional argument). ``remove()`` unregisters the hook and leaves the model exactly as it
was. No model code is copied or forked.

``valid_sites(model)`` lists the *named* sites of the model's family, in forward order, the ones
the protocols are written for; ``all_sites(model)`` lists every module path the forward pass calls:

* ViT-like (``vit``: timm ``VisionTransformer`` incl. DeiT and distilled DeiT, ``Beit``,
  ``ConVit``): ``blocks.{i}`` (the block's input, the residual stream) and ``blocks.{i}.attn``
  (the attention's input, i.e. after the block's first norm: where the released code adds it);
* ResNet (``resnet``): ``layer{s}.{b}``, the input of sub-block ``b`` (0-based) of stage ``s``
  (the released ResNet script's stage 4, sub-block 3 (1-based) is ``layer4.2``);
* Swin (``swin``: ``SwinTransformer``, ``SwinTransformerV2``): ``layers.{s}.blocks.{b}``, a
  block's (B, H, W, C) input. A Swin block's ``attn`` receives window-partitioned, cyclically
  shifted tokens (num_windows·B, window_area, C), not one image per row, so it is not a named
  site (it is in ``all_sites``; the batch axis is refused there);
* EfficientNet (``efficientnet``): ``blocks.{s}.{b}``, block ``b`` of stage ``s`` (NCHW);
* any other timm model (``generic``, e.g. ConvNeXt, CaiT, Eva): the top-level modules and the
  elements of top-level sequences (``stages.{s}.blocks.{b}`` where stages hold ``blocks``); such a
  model always runs its full forward (``can_split`` is False).

At hook time the tensor's layout is recognised (``Injection.layout``): ``tokens`` (B, N, D) with
``Injection.num_prefix_tokens`` class/distillation tokens leading (per family and block: ConViT
prepends its class token only at block ``local_up_to_layer``), ``nchw`` maps, ``nhwc`` maps (Swin),
``features`` (B, D), ``windows`` (Swin attention) and ``unknown`` (e.g. the 4-d attention internals
of a ViT block: only the batch axis and the element-wise kinds act there).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.noise import SITE_LAYOUTS, NoiseSpec, apply_noise, mixed_axis_size

FAMILIES = ("vit", "resnet", "swin", "efficientnet", "generic")
INJECTION_LAYOUTS = SITE_LAYOUTS

_BLOCK_OF = {
    "vit": re.compile(r"^(blocks\.(\d+))(\..+)?$"),
    "resnet": re.compile(r"^(layer([1-4])\.(\d+))(\..+)?$"),
    "swin": re.compile(r"^(layers\.(\d+)\.blocks\.(\d+))(\..+)?$"),
    "efficientnet": re.compile(r"^(blocks\.(\d+)\.(\d+))(\..+)?$"),
}
_SWIN_WINDOWS = re.compile(r"^layers\.\d+\.blocks\.\d+\.attn(\..+)?$")


def _timm_class(module: str, name: str):
    """A timm model class, or None when this timm has no such class."""
    import importlib

    try:
        return getattr(importlib.import_module(f"timm.models.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _isinstance(model: nn.Module, *classes) -> bool:
    return any(c is not None and isinstance(model, c) for c in classes)


def _vit_kind(model: nn.Module) -> str | None:
    """``vit`` (VisionTransformer and subclasses), ``beit`` or ``convit``; None for other models."""
    if _isinstance(model, _timm_class("vision_transformer", "VisionTransformer")):
        return "vit"
    if _isinstance(model, _timm_class("beit", "Beit")):
        return "beit"
    if _isinstance(model, _timm_class("convit", "ConVit")):
        return "convit"
    return None


def model_family(model: nn.Module) -> str:
    """``vit``, ``resnet``, ``swin``, ``efficientnet`` or ``generic`` (any other timm model)."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed") and _vit_kind(model):
        return "vit"
    if all(hasattr(model, f"layer{s}") for s in (1, 2, 3, 4)) and hasattr(model, "conv1"):
        return "resnet"
    if _isinstance(model, _timm_class("swin_transformer", "SwinTransformer"),
                   _timm_class("swin_transformer_v2", "SwinTransformerV2")):
        return "swin"
    if _isinstance(model, _timm_class("efficientnet", "EfficientNet")) and isinstance(model.blocks, nn.Sequential):
        return "efficientnet"
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return "generic"
    raise UserError(
        "noise injection supports timm models (named sites for ViT/DeiT/BEiT/ConViT, ResNet, Swin and "
        f"EfficientNet, any module path for the others); got {type(model).__name__}, which is not a timm model."
    )


def valid_sites(model: nn.Module) -> list[str]:
    """The named sites of this model's family, in forward order (``image`` first)."""
    family = model_family(model)
    sites = ["image"]
    if family == "vit":
        for i, block in enumerate(model.blocks):
            sites.append(f"blocks.{i}")
            if isinstance(getattr(block, "attn", None), nn.Module):
                sites.append(f"blocks.{i}.attn")
    elif family == "resnet":
        for s in (1, 2, 3, 4):
            for b in range(len(getattr(model, f"layer{s}"))):
                sites.append(f"layer{s}.{b}")
    elif family == "swin":
        for s, stage in enumerate(model.layers):
            sites += [f"layers.{s}.blocks.{b}" for b in range(len(stage.blocks))]
    elif family == "efficientnet":
        for s, stage in enumerate(model.blocks):
            sites += [f"blocks.{s}.{b}" for b in range(len(stage))]
    else:
        sites += _generic_sites(model)
    return sites


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


_TRACING = False  # an Injection's hook stands aside while all_sites traces the forward order


def _example_input(model: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    if input_size is None:
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        cfg_size = tuple(cfg.get("input_size", (3, 224, 224)))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(img, int):
            img = (img, img)
        hw = tuple(img) if img else cfg_size[1:]
        input_size = (in_chans or cfg_size[0], *hw)
    return torch.zeros(1, *input_size, device=device, dtype=dtype)


def all_sites(model: nn.Module, input_size: tuple[int, ...] | None = None) -> list[str]:
    """``image`` and every module path the forward pass calls, in the order it first calls them.

    The order is traced by one batch-1 forward (eval mode, no autograd, model state restored; on
    the model's device, so a meta-device model costs nothing) with an input of ``input_size``
    (C, H, W), by default the model's own (``patch_embed.img_size`` or its ``pretrained_cfg``).
    Modules the forward never calls are left out (a noise there would never act). Should the
    traced forward fail, the modules' registration order is returned instead.
    """
    global _TRACING
    order: list[str] = []
    seen: set[str] = set()

    def record(name):
        def hook(module, args):
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record(n)) for n, m in named]
    _TRACING = True
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, input_size))
    except Exception:  # noqa: BLE001 - an untraceable model still has its registration order
        order = [n for n, _ in named]
    finally:
        _TRACING = False
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return ["image", *order]


def _has_module(model: nn.Module, path: str) -> bool:
    if not path or path != path.strip():
        return False
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_site(model: nn.Module, site: str) -> None:
    """A site is ``image`` or any module path of ``model``; otherwise a UserError naming the sites."""
    model_family(model)
    if site == "image" or (isinstance(site, str) and _has_module(model, site)):
        return
    sites = valid_sites(model)
    raise UserError(
        f"site {site!r} is not a module of this {type(model).__name__}; its named sites are {', '.join(sites)} "
        "(any module path of the model is accepted too, see all_sites)."
    )


def _site_module(model: nn.Module, site: str) -> nn.Module:
    return model if site == "image" else model.get_submodule(site)


def _block_index(site: str) -> int | None:
    m = _BLOCK_OF["vit"].match(site)
    return int(m.group(2)) if m else None


def _generic_prefix(model: nn.Module, n_tokens: int) -> int:
    """Prefix tokens of a (B, N, D) tensor in a model of no named family: the tokens beyond the
    patch grid, up to the model's ``num_prefix_tokens`` (CaiT's blocks, say, see patches only)."""
    declared = int(getattr(model, "num_prefix_tokens", 0) or 0)
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if declared and isinstance(num_patches, int):
        extra = n_tokens - num_patches
        return extra if 0 <= extra <= declared else 0
    return declared


def num_prefix_tokens_at(model: nn.Module, site: str) -> int:
    """How many class/register/distillation tokens lead a token tensor at ``site``.

    0 outside the token stream of a ViT-like model (the image, the patch embedding, CNNs, Swin).
    ConViT prepends its class token only before block ``local_up_to_layer``, so the blocks before
    it see none.
    """
    if site == "image":
        return 0
    family = model_family(model)
    if family == "generic":
        return int(getattr(model, "num_prefix_tokens", 0) or 0)
    if family != "vit" or site.split(".")[0] == "patch_embed":
        return 0
    if _vit_kind(model) == "convit":
        if getattr(model, "cls_token", None) is None:
            return 0
        start = int(model.local_up_to_layer)
        i = _block_index(site)
        if i is None:  # after the blocks: the class token is there if some block prepended it
            return 1 if start < len(model.blocks) else 0
        return 1 if i >= start else 0
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    return 1 if getattr(model, "cls_token", None) is not None else 0


def _layout_at(model: nn.Module, family: str, site: str, module: nn.Module, x: torch.Tensor) -> str:
    """The layout of the tensor ``x`` that reaches ``site`` (see the module docstring)."""
    rank = x.dim()
    if rank == 2:
        return "features"
    if family == "swin" and _SWIN_WINDOWS.match(site):
        return "windows" if rank == 3 else "unknown"
    if rank == 3:
        return "tokens"
    if rank != 4:
        return "unknown"
    if site == "image" or family in ("resnet", "efficientnet"):
        return "nchw"
    if family in ("vit", "swin"):
        if site in ("patch_embed", "patch_embed.proj"):
            return "nchw"
        return "nhwc" if family == "swin" else "unknown"
    # generic: a Linear or a plain LayerNorm on the last dim of a 4-d tensor sees (B, H, W, C)
    last = x.shape[-1]
    if isinstance(module, nn.Linear) and module.in_features == last:
        return "nhwc"
    if type(module) is nn.LayerNorm and tuple(module.normalized_shape) == (last,):
        return "nhwc"
    return "nchw"


class Injection:
    """A noise hooked into a model at one site; ``remove()`` restores the model.

    ``at_train`` / ``at_eval`` say in which mode (``model.training``) the noise applies;
    ``enabled`` switches it off without removing it (the clean protocol). ``layout`` and
    ``last_input_shape`` describe the tensor the noise last acted on; ``num_prefix_tokens`` how
    many of its leading tokens it leaves alone.
    """

    def __init__(
        self,
        model: nn.Module,
        site: str,
        spec: NoiseSpec,
        at_train: bool = True,
        at_eval: bool = True,
        seed: int = 0,
    ):
        check_site(model, site)
        self.model = model
        self.site = site
        self.spec = spec
        self.family = model_family(model)
        self.at_train = at_train
        self.at_eval = at_eval
        self.enabled = True
        self.seed = seed
        self._prefix_at_site = num_prefix_tokens_at(model, site)  # for a (B, N, D) tensor there
        self.num_prefix_tokens = self._prefix_at_site
        self._generator: torch.Generator | None = None
        self.last_input_shape: tuple[int, ...] | None = None  # what the noise last acted on
        self.layout: str | None = None  # its layout, one of INJECTION_LAYOUTS
        self._handle = _site_module(model, site).register_forward_pre_hook(self._hook)

    def active(self) -> bool:
        if not self.enabled or self.spec.kind == "none" or _TRACING:
            return False
        return self.at_train if self.model.training else self.at_eval

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart the noise's random stream (each evaluation protocol starts from the same state)."""
        self.seed = seed
        self._generator = None

    def get_rng_state(self) -> torch.Tensor | None:
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor | None, device: torch.device | str = "cpu") -> None:
        if state is not None:
            self.generator(torch.device(device)).set_state(state)

    def mixed_axis_size(self, batch_size: int | None = None) -> int | None:
        """k of the last noised input (its batch dimension replaced by ``batch_size`` if given)."""
        if self.last_input_shape is None:
            return None
        shape = self.last_input_shape if batch_size is None else (batch_size, *self.last_input_shape[1:])
        return mixed_axis_size(self.spec, shape, self.num_prefix_tokens, self.layout)

    def _check_axis(self, shape: tuple[int, ...], layout: str) -> None:
        """A linear noise whose axis this layout lacks (or has of size 1) is a UserError."""
        spec = self.spec
        if not spec.kind.startswith("linear"):
            return
        where = f"at site {self.site!r} the input has shape {shape} ({layout} layout)"
        if spec.axis == "batch":
            if layout == "windows":
                raise UserError(
                    f"{where}, whose first dimension is the windows of all images, so axis 'batch' would mix "
                    "windows rather than samples; put the noise on the block instead (e.g. "
                    f"{self.site.rsplit('.attn', 1)[0]})."
                )
            return
        if layout == "unknown" or (layout == "features" and spec.axis == "rows"):
            raise UserError(f"{where}, which has no {spec.axis} axis for a linear noise to mix; use axis 'batch' or another site.")
        if layout == "tokens" and spec.axis == "rows":
            # k = the side of the square grid; a grid that is not square is the operator's error
            n = shape[1] - (self.num_prefix_tokens if spec.skip_prefix_tokens else 0)
            k = 1 if n == 1 else None
        else:
            k = mixed_axis_size(spec, shape, self.num_prefix_tokens, layout)
        if k == 1:
            raise UserError(
                f"{where}, whose {spec.axis} axis has size 1, so the linear noise would be the identity; "
                "pick another axis or site."
            )

    def _hook(self, module, args):
        if not self.active():
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise UserError(
                f"the module at site {self.site!r} is not called with a tensor as its first positional argument, "
                "so no noise can be put on its input."
            )
        x = args[0]
        layout = _layout_at(self.model, self.family, self.site, module, x)
        self.last_input_shape = tuple(x.shape)
        self.layout = layout
        if layout != "tokens":
            self.num_prefix_tokens = 0
        elif self.family == "generic":
            self.num_prefix_tokens = _generic_prefix(self.model, x.shape[1])
        else:
            self.num_prefix_tokens = self._prefix_at_site
        prefix = self.num_prefix_tokens
        gen = self.generator(x.device) if self.spec.is_random else None
        # nhwc is the one layout the operators cannot tell from the rank
        extra = {"layout": "nhwc"} if layout == "nhwc" else {}
        parts = [x]
        sizes = _SEGMENTS
        if sizes is not None:
            # several test batches in one forward call: the noise acts on each alone, in order
            images = sum(sizes)
            if x.shape[0] % images:
                raise RuntimeError(f"at site {self.site!r} the input has {x.shape[0]} rows for {images} images")
            rows = x.shape[0] // images
            parts = x.split([n * rows for n in sizes])
        out = []
        for part in parts:
            self.last_input_shape = tuple(part.shape)
            self._check_axis(self.last_input_shape, layout)
            try:
                out.append(apply_noise(self.spec, part, gen, prefix, **extra))
            except UserError as e:
                raise UserError(f"at site {self.site!r} (input shape {tuple(part.shape)}): {e}") from None
        return (out[0] if len(out) == 1 else torch.cat(out), *args[1:])

    def apply(self, module: nn.Module, args: tuple) -> tuple | None:
        """The site module's arguments with the noise applied, its checks run (None when inactive):
        what the hook does in a forward pass, for arguments obtained otherwise (``site_input``)."""
        return self._hook(module, args)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


_SEGMENTS: list[int] | None = None  # the test batches of the forward call under way, if joined


@contextlib.contextmanager
def joined_batches(sizes: list[int]):
    """Run several test batches in one forward call, each noised on its own.

    Inside the block, the batch of every forward call is the concatenation of test batches of these
    sizes (in images; a Swin attention input has several rows per image): every Injection cuts its
    input at the boundaries, applies the noise to each part in order (the random stream advances as
    it would batch after batch) and joins the parts again. In eval mode the rest of the network
    treats each image alone, so the logits are those of batch-by-batch forwards up to float rounding,
    which depends on the number of rows of a matrix product (a few 1e-7 on CPU).
    """
    global _SEGMENTS
    outer, _SEGMENTS = _SEGMENTS, [int(n) for n in sizes]
    try:
        yield
    finally:
        _SEGMENTS = outer


def inject(
    model: nn.Module,
    site: str,
    noise: NoiseSpec,
    at_train: bool = True,
    at_eval: bool = True,
    seed: int = 0,
) -> Injection:
    """Hook ``noise`` into ``model`` at ``site``; returns the handle (``.remove()`` undoes it)."""
    return Injection(model, site, noise, at_train=at_train, at_eval=at_eval, seed=seed)


# --- running a model in two halves, for evaluation that reuses the part before the site ---------


def _splittable(model: nn.Module, family: str) -> bool:
    """Whether this model runs the standard forward of its family, so that it can be resumed."""
    cls = type(model)
    if family == "vit":
        kind = _vit_kind(model)
        if kind is None:
            return False
        base = {
            "vit": _timm_class("vision_transformer", "VisionTransformer"),
            "beit": _timm_class("beit", "Beit"),
            "convit": _timm_class("convit", "ConVit"),
        }[kind]
        return cls.forward_features is base.forward_features and cls.forward is base.forward
    if family == "resnet":
        base = _timm_class("resnet", "ResNet")
        return base is not None and isinstance(model, base) and cls.forward_features is base.forward_features and cls.forward is base.forward
    if family == "swin":
        for base in (_timm_class("swin_transformer", "SwinTransformer"), _timm_class("swin_transformer_v2", "SwinTransformerV2")):
            if base is not None and isinstance(model, base):
                return cls.forward_features is base.forward_features and cls.forward is base.forward
        return False
    if family == "efficientnet":
        base = _timm_class("efficientnet", "EfficientNet")
        return cls.forward_features is base.forward_features and cls.forward is base.forward
    return False


def cache_point(model: nn.Module, site: str) -> str:
    """The module whose input is cached: the block or sub-block that holds the site.

    ``image`` for the image site, for sites outside the blocks and for models whose forward cannot
    be resumed (``can_split`` is False): the caller then runs the full forward
    (``forward_prefix`` returns the images, ``forward_suffix`` is the whole model).
    """
    check_site(model, site)
    if site == "image":
        return "image"
    family = model_family(model)
    pattern = _BLOCK_OF.get(family)
    m = pattern.match(site) if pattern else None
    if m is None or not _splittable(model, family):
        return "image"
    return m.group(1)


# Bytes per value of the prefix cache under a 16-bit autocast: the cache keeps the dtype the forward
# carries at the cache point (evaluate.PrefixCache), measured by a test for every family: a ViT's
# residual stream stays float32 (its LayerNorms run in float32 and promote each residual sum); a
# CNN's maps, and Swin's (its patch merging ends in a Linear), are in the autocast dtype.
_STREAM_BYTES = {"vit": 4, "swin": 2, "resnet": 2, "efficientnet": 2}


def cache_bytes_per_value(model: nn.Module) -> int:
    """Bytes per cached value under bf16/fp16 autocast (4, float32, for a family not in the table)."""
    return _STREAM_BYTES.get(model_family(model), 4)


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
    module = _site_module(model, site)
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
    family = model_family(model)
    m = _BLOCK_OF[family].match(point)
    x = hidden
    if family == "vit":
        start = int(m.group(2))
        kind = _vit_kind(model)
        if kind == "beit":
            rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
            for block in model.blocks[start:]:
                x = block(x, shared_rel_pos_bias=rel_pos_bias)
        elif kind == "convit":
            for u in range(start, len(model.blocks)):
                if u == model.local_up_to_layer and u > start and model.cls_token is not None:
                    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
                x = model.blocks[u](x)
        else:
            for block in model.blocks[start:]:
                x = block(x)
        return model.forward_head(model.norm(x))
    if family == "resnet":
        stage, start = int(m.group(2)), int(m.group(3))
        for sub in getattr(model, f"layer{stage}")[start:]:
            x = sub(x)
        for s in range(stage + 1, 5):
            x = getattr(model, f"layer{s}")(x)
        return model.forward_head(x)
    stage, start = int(m.group(2)), int(m.group(3))
    if family == "swin":
        # a Swin stage downsamples first, then runs its blocks: the cached block input is past the
        # stage's downsample, and each later stage brings its own
        for block in model.layers[stage].blocks[start:]:
            x = block(x)
        for layer in model.layers[stage + 1 :]:
            x = layer(x)
        return model.forward_head(model.norm(x))
    # efficientnet
    for block in model.blocks[stage][start:]:
        x = block(x)
    for blocks in model.blocks[stage + 1 :]:
        x = blocks(x)
    return model.forward_head(model.bn2(model.conv_head(x)))
