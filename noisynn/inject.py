"""Injection of a noise into any timm ViT or ResNet, from the outside, at a named site.

Sites are named by timm module path, so they read the same in every depth of a family:

* ``image``: the normalized input batch;
* ViT (``vit_*``): ``blocks.{i}`` (the block's input, the residual stream) and ``blocks.{i}.attn``
  (the attention's input, i.e. after the block's first norm: where the released code adds it);
* ResNet (``resnet*``): ``layer{s}.{b}``, the input of sub-block ``b`` (0-based) of stage ``s``
  (the released ResNet script's stage 4, sub-block 3 (1-based) is ``layer4.2``).

The noise is a forward pre-hook on the module at the site; ``remove()`` unregisters it and leaves
the model exactly as it was. No model code is copied or forked.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.noise import NoiseSpec, apply_noise


def model_family(model: nn.Module) -> str:
    """``vit`` or ``resnet``, recognised by the modules timm builds."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return "vit"
    if all(hasattr(model, f"layer{s}") for s in (1, 2, 3, 4)) and hasattr(model, "conv1"):
        return "resnet"
    raise UserError(
        f"noise injection supports timm ViT (vit_*) and ResNet (resnet*) models; got {type(model).__name__}."
    )


def valid_sites(model: nn.Module) -> list[str]:
    """Every site name this model accepts, in forward order."""
    sites = ["image"]
    if model_family(model) == "vit":
        for i in range(len(model.blocks)):
            sites += [f"blocks.{i}", f"blocks.{i}.attn"]
    else:
        for s in (1, 2, 3, 4):
            for b in range(len(getattr(model, f"layer{s}"))):
                sites.append(f"layer{s}.{b}")
    return sites


def check_site(model: nn.Module, site: str) -> None:
    sites = valid_sites(model)
    if site not in sites:
        raise UserError(f"site {site!r} is not a site of this {type(model).__name__}; valid sites: {', '.join(sites)}.")


def _site_module(model: nn.Module, site: str) -> nn.Module:
    return model if site == "image" else model.get_submodule(site)


def num_prefix_tokens_at(model: nn.Module, site: str) -> int:
    """How many class/register tokens lead the tensor at ``site`` (0 outside a ViT's blocks)."""
    if site == "image" or model_family(model) != "vit":
        return 0
    return int(getattr(model, "num_prefix_tokens", 1))


class Injection:
    """A noise hooked into a model at one site; ``remove()`` restores the model.

    ``at_train`` / ``at_eval`` say in which mode (``model.training``) the noise applies;
    ``enabled`` switches it off without removing it (the clean protocol).
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
        self.at_train = at_train
        self.at_eval = at_eval
        self.enabled = True
        self.seed = seed
        self.num_prefix_tokens = num_prefix_tokens_at(model, site)
        self._generator: torch.Generator | None = None
        self.last_input_shape: tuple[int, ...] | None = None  # what the noise last acted on
        self._handle = _site_module(model, site).register_forward_pre_hook(self._hook)

    def active(self) -> bool:
        if not self.enabled or self.spec.kind == "none":
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

    def _hook(self, module, args):
        if not self.active():
            return None
        x = args[0]
        self.last_input_shape = tuple(x.shape)
        gen = self.generator(x.device) if self.spec.is_random else None
        return (apply_noise(self.spec, x, gen, self.num_prefix_tokens), *args[1:])

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


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

_VIT_SITE = re.compile(r"^blocks\.(\d+)(\.attn)?$")
_RESNET_SITE = re.compile(r"^layer([1-4])\.(\d+)$")


def cache_point(model: nn.Module, site: str) -> str:
    """The module whose input is cached: the block or sub-block that holds the site (or the image)."""
    check_site(model, site)
    if site == "image":
        return "image"
    m = _VIT_SITE.match(site)
    return f"blocks.{m.group(1)}" if m else site


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


@torch.no_grad()
def forward_prefix(model: nn.Module, site: str, images: torch.Tensor) -> torch.Tensor:
    """The input of the cache point for ``images``: the deterministic part of the forward pass."""
    point = cache_point(model, site)
    if point == "image":
        return images

    def stop(module, args):
        raise _Stop(args[0])

    # prepend: capture the input before any noise hook at the same module changes it
    handle = model.get_submodule(point).register_forward_pre_hook(stop, prepend=True)
    try:
        model(images)
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {point}")


def forward_suffix(model: nn.Module, site: str, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the cached input of the cache point on (the noise hook fires on the way)."""
    point = cache_point(model, site)
    if point == "image":
        return model(hidden)
    if model_family(model) == "vit":
        start = int(_VIT_SITE.match(point).group(1))
        x = hidden
        for block in model.blocks[start:]:
            x = block(x)
        x = model.norm(x)
        return model.forward_head(x)
    m = _RESNET_SITE.match(point)
    stage, start = int(m.group(1)), int(m.group(2))
    x = hidden
    for sub in getattr(model, f"layer{stage}")[start:]:
        x = sub(x)
    for s in range(stage + 1, 5):
        x = getattr(model, f"layer{s}")(x)
    return model.forward_head(x)
