"""The Injection: a noise hooked into a model at one site, from the outside.

The noise is applied to the site module's input (a forward pre-hook on its first positional
argument); ``remove()`` unregisters the hook and leaves the model exactly as it was. No model code
is copied or forked.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.inject.registry import family_of
from noisynn.inject.sites import being_traced, check_site, layout_at, num_prefix_tokens_at, site_module
from noisynn.noise import NoiseSpec, apply_noise, mixed_axis_size


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
        self.family = family_of(model)
        self.at_train = at_train
        self.at_eval = at_eval
        self.enabled = True
        self.seed = seed
        self.num_prefix_tokens = num_prefix_tokens_at(model, site)  # for a (B, N, D) tensor there
        self._generator: torch.Generator | None = None
        self.last_input_shape: tuple[int, ...] | None = None  # what the noise last acted on
        self.layout: str | None = None  # its layout, one of noise.SITE_LAYOUTS
        self._handle = site_module(model, site).register_forward_pre_hook(self._hook)

    def active(self) -> bool:
        if not self.enabled or self.spec.kind == "none" or being_traced(self.model):
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
        layout = layout_at(self.family, self.site, module, x)
        self.last_input_shape = tuple(x.shape)
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens_at(self.model, self.site, x.shape[1]) if layout == "tokens" else 0
        prefix = self.num_prefix_tokens
        gen = self.generator(x.device) if self.spec.is_random else None
        # nhwc is the one layout the operators cannot tell from the rank
        extra = {"layout": "nhwc"} if layout == "nhwc" else {}
        parts = [x]
        sizes = self.model.__dict__.get(_JOINED)
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
        what the hook does in a forward pass, for arguments obtained otherwise (``split.site_input``)."""
        return self._hook(module, args)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


_JOINED = "_noisynn_joined_batches"  # set on a model inside joined_batches: the sizes of its test batches


@contextlib.contextmanager
def joined_batches(model: nn.Module, sizes: list[int]):
    """Run several test batches in one forward call of ``model``, each noised on its own.

    Inside the block, the batch of every forward call of ``model`` is the concatenation of test
    batches of these sizes (in images; a Swin attention input has several rows per image): every
    Injection into it cuts its input at the boundaries, applies the noise to each part in order (the
    random stream advances as it would batch after batch) and joins the parts again. In eval mode
    the rest of the network treats each image alone, so the logits are those of batch-by-batch
    forwards up to float rounding, which depends on the number of rows of a matrix product (a few
    1e-7 on CPU).
    """
    outer = model.__dict__.get(_JOINED)
    model.__dict__[_JOINED] = [int(n) for n in sizes]
    try:
        yield
    finally:
        if outer is None:
            del model.__dict__[_JOINED]
        else:
            model.__dict__[_JOINED] = outer


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


