"""What a model must take and run, checked before any real work: the data's classes, channels and
image size, a forward pass, and each noise at its site, the last two on the meta device (no memory,
nothing computed)."""

from __future__ import annotations

import torch
from torch import nn

from noisynn.errors import UserError

# what a forward pass raises when a model's own code cannot handle its configuration or input
_CONFIG_FAILURES = (AttributeError, TypeError, ValueError, AssertionError, IndexError, KeyError, ZeroDivisionError)


def meta_cannot_run(error: BaseException) -> bool:
    """Whether ``error`` says only that the meta device cannot run an op (no meta kernel, a value read
    out of a meta tensor, a tensor of another device met): nothing is proven then, the real forward
    checks it. Torch names the meta device in each such message (a ``NotImplementedError`` is a
    ``RuntimeError``); any other error, a shape bug of the model or a bug of ours, is not this."""
    return isinstance(error, RuntimeError) and "meta" in str(error).lower()


def _meta_forward(run, input_shape: tuple[int, ...], what: str):
    """``run`` on a meta batch of ``input_shape``: its result, None where the meta device cannot run
    it, and a ``UserError`` naming ``what`` where the model's own code fails on such a batch."""
    try:
        with torch.no_grad():
            return run(torch.empty(*input_shape, device="meta"))
    except UserError:
        raise
    except (*_CONFIG_FAILURES, RuntimeError) as e:
        if meta_cannot_run(e):
            return None
        # a shape the model's ops cannot take (a kernel larger than the image, mismatched matrices) is a
        # RuntimeError on the meta device as on a real one
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{what} cannot run on a batch of shape {tuple(input_shape)} "
                        f"({type(e).__name__}: {detail}); check its kwargs and the data's image size.") from None


def _require_meta(model: nn.Module, check: str) -> None:
    if next(iter(model.parameters()), torch.empty(0)).device.type != "meta":
        raise ValueError(f"{check} needs a meta-device model (see meta_model)")


def check_forward(model: nn.Module, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse a model whose forward pass fails on a batch of ``input_shape`` (a meta-device model,
    so nothing is computed): kwargs that timm accepts but that build a model that cannot run,
    such as fewer ResNet ``layers`` than stages."""
    _require_meta(model, "check_forward")
    _meta_forward(model, input_shape, what)


def check_noises_act(model: nn.Module, site: str, specs, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse, before any real work, a noise that cannot act at ``site`` or that the site makes the
    identity (a linear noise over an axis of size 1, e.g. ``rows`` on a 1×1 feature map).

    One forward of a meta-device batch of ``input_shape`` up to the site, then each deterministic
    noise's hook on what the site received: its own checks run on the shapes the real batch will
    have, at no cost. The random kinds
    act on any tensor and are not run (their generators need a real device). A model whose forward
    the meta device cannot run is left to the hook's checks at the first real batch.
    """
    from noisynn.inject.hook import inject
    from noisynn.inject.split import site_input

    specs = [sp for sp in specs if sp.kind.startswith("linear")]
    if not specs:
        return
    _require_meta(model, "check_noises_act")
    # one forward up to the site, whose input each noise's hook then checks (a noise keeps the shape,
    # so what follows the site cannot fail because of it)
    reached = _meta_forward(lambda images: site_input(model, site, images), input_shape, what)
    if reached is None:
        return  # the meta device cannot run the forward, or it never reached the site: the real forward's hook will say so
    module, args = reached
    for spec in specs:
        injection = inject(model, site, spec, at_train=True, at_eval=True)
        try:
            injection.apply(module, args)
        except UserError as e:
            raise UserError(f"{what}: noise {spec.kind} on axis {spec.axis}: {e}") from None
        except RuntimeError as e:
            if not meta_cannot_run(e):
                raise
            # this noise is left to the real forward; the others are still checked
        finally:
            injection.remove()


def check_model_fits_data(model: nn.Module, what: str, data_dir, num_classes: int, in_chans: int, image_size: int) -> None:
    """Refuse a model that cannot take a dataset's images or predict its classes, naming both.

    Caught here, these mismatches are one sentence; left alone they surface as a shape error deep
    in a forward pass (or, for the classes, as a silently meaningless accuracy).
    """
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != int(num_classes):
        raise UserError(f"{what} predicts {model_classes} classes but dataset {data_dir} has {num_classes}.")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != in_chans:
        raise UserError(
            f"{what} takes {first_conv.in_channels}-channel images but dataset {data_dir} has {in_chans}-channel images."
        )
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
    if fixed is not None and tuple(fixed) != (image_size, image_size):
        raise UserError(
            f"{what} takes {fixed[0]}×{fixed[1]} px images but dataset {data_dir} has {image_size}×{image_size} px images."
        )

