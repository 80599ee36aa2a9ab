"""Sites: where in a model a noise can be put, what a site is called, and what reaches it.

A site is ``image`` (the normalized input batch) or any module path of the model
(``model.get_submodule(path)``); the noise acts on that module's input. ``valid_sites(model)`` lists
the *named* sites of the model's family (``noisynn.inject.families``), in forward order, the ones the
protocols are written for; ``all_sites(model)`` lists every module path the forward pass calls.

The tensor at a site has a layout (``layout_at``): ``tokens`` (B, N, D) with
``num_prefix_tokens_at`` class/distillation tokens leading, ``nchw`` maps, ``nhwc`` maps (Swin),
``features`` (B, D), ``windows`` (Swin attention) and ``unknown`` (e.g. the 4-d attention internals
of a ViT block: only the batch axis and the element-wise kinds act there).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.inject.registry import Family, family_of

_TRACED = "_noisynn_traced"  # set on a model while all_sites runs its forward, for its Injections to read


def being_traced(model: nn.Module) -> bool:
    """Whether ``all_sites`` is running ``model``'s forward to see its order (a noise then stands aside)."""
    return model.__dict__.get(_TRACED, False)


@contextlib.contextmanager
def _tracing(model: nn.Module):
    model.__dict__[_TRACED] = True
    try:
        yield
    finally:
        del model.__dict__[_TRACED]


def valid_sites(model: nn.Module) -> list[str]:
    """The named sites of this model's family, in forward order (``image`` first)."""
    return ["image", *family_of(model).named_sites(model)]


def example_input(model: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    """A batch of one zero image of ``input_size`` (C, H, W), by default the model's own, on its device."""
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
    try:
        model.eval()
        with torch.no_grad(), _tracing(model):
            model(example_input(model, input_size))
    except (RuntimeError, NotImplementedError, AssertionError, ValueError):
        # a model whose example forward fails (an input size it refuses, an op without a meta
        # kernel) still has its registration order; an error of ours is not swallowed here
        order = [n for n, _ in named]
    finally:
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
    family_of(model)
    if site == "image" or (isinstance(site, str) and _has_module(model, site)):
        return
    sites = valid_sites(model)
    raise UserError(
        f"site {site!r} is not a module of this {type(model).__name__}; its named sites are {', '.join(sites)} "
        "(any module path of the model is accepted too, see all_sites)."
    )


def site_module(model: nn.Module, site: str) -> nn.Module:
    return model if site == "image" else model.get_submodule(site)


def num_prefix_tokens_at(model: nn.Module, site: str, n_tokens: int | None = None) -> int:
    """How many class/register/distillation tokens lead a token tensor at ``site``.

    0 at the image and wherever the family has no token stream (CNNs, Swin); ``n_tokens``, the N of
    the (B, N, D) tensor that reached the site in a forward under way, where the family's rule
    depends on it.
    """
    if site == "image":
        return 0
    return family_of(model).prefix_tokens(model, site, n_tokens)


def layout_at(family: Family, site: str, module: nn.Module, x: torch.Tensor) -> str:
    """The layout of the tensor ``x`` that reaches ``site`` (see the module docstring)."""
    rank = x.dim()
    if rank == 2:
        return "features"
    if family.windows is not None and family.windows.match(site):
        return "windows" if rank == 3 else "unknown"
    if rank == 3:
        return "tokens"
    if rank != 4:
        return "unknown"
    if site == "image":
        return "nchw"
    return family.map_layout(site, module, x)
