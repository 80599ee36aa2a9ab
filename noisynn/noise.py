"""The noises of NoisyNN as pure tensor functions, and small callables built from a spec.

Tensor layouts understood by the operators (the same layouts a timm model passes between blocks):

* ``(B, N, D)`` tokens of a ViT (layout ``tokens``), the first ``num_prefix_tokens`` of them
  class/register tokens;
* ``(B, C, H, W)`` feature maps of a CNN, or a normalized image batch (layout ``nchw``);
* ``(B, H, W, C)`` feature maps as Swin passes them between blocks (layout ``nhwc``);
* ``(B, D)`` flat features (layout ``features``).

Without an explicit ``layout`` the rank decides (2: features, 3: tokens, 4: nchw), so ``nhwc``
must be named.

Every random operator takes an explicit ``torch.Generator`` so that a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from noisynn.errors import UserError
from noisynn.vocab import AXES, DETACH, NEIGHBOURS, NOISE_KINDS, noise_problem

LINEAR_KINDS = ("optimal", "shift")
LAYOUTS = ("tokens", "nchw", "nhwc", "features")
# what an injection site may report (Injection.layout): the operator layouts, Swin's attention
# windows (tokens of all windows of all images, no prefix) and unknown (only the batch axis is known)
SITE_LAYOUTS = (*LAYOUTS, "windows", "unknown")
_LAYOUT_RANK = {"tokens": 3, "nchw": 4, "nhwc": 4, "features": 2}
_RANK_LAYOUT = {2: "features", 3: "tokens", 4: "nchw"}


def _check_alpha(alpha: float) -> None:
    if not (0.0 <= float(alpha) <= 1.0):
        raise UserError(f"alpha must lie in [0, 1] (the weight of the shifted neighbour); got {alpha}.")


def _check_probability(p: float) -> None:
    if not (0.0 <= float(p) <= 1.0):
        raise UserError(f"p (the impulse probability) must lie in [0, 1]; got {p}.")


def _check_neighbour(neighbour: str) -> None:
    if neighbour not in NEIGHBOURS:
        raise UserError(
            f"neighbour must be one of {', '.join(NEIGHBOURS)} (the sample the shift takes alpha from); got {neighbour!r}."
        )


def _check_layout(layout: str | None, rank: int | None = None) -> str | None:
    if layout is None:
        return None
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}.")
    if rank is not None and _LAYOUT_RANK[layout] != rank:
        raise UserError(f"layout {layout} needs a tensor of rank {_LAYOUT_RANK[layout]}; got rank {rank}.")
    return layout


def _check_rank(x: torch.Tensor, allowed: tuple[int, ...], what: str) -> None:
    if x.dim() not in allowed:
        ranks = " or ".join(str(r) for r in allowed)
        raise UserError(f"{what} expects a tensor of rank {ranks} (batch first); got shape {tuple(x.shape)}.")


def quality_matrix(
    kind: str, k: int, alpha: float = 0.3, dtype=torch.float64, neighbour: str = "previous"
) -> torch.Tensor:
    """The explicit k×k quality matrix Q of the linear-transform noise (X' = (I + Q) X).

    ``optimal`` (paper eq. 19): Q* = -k/(k+1)·I + 1/(k+1)·11ᵀ (``neighbour`` is irrelevant).
    ``shift`` (paper eq. 17): Q = -alpha·I + alpha·P with, for ``neighbour='previous'``,
    P[(i+1) mod k, i] = 1 (x'_i takes alpha of x_(i-1)); for ``'next'`` (the released NoisyCNN code)
    P[i, (i+1) mod k] = 1, the transpose (x'_i takes alpha of x_(i+1)). Both have the same
    determinant, hence the same ΔS.
    """
    _check_neighbour(neighbour)
    if kind not in LINEAR_KINDS:
        raise UserError(f"kind must be one of {', '.join(LINEAR_KINDS)}; got {kind!r}.")
    if int(k) != k or k < 1:
        # a fractional k would otherwise be truncated silently to a smaller matrix
        raise UserError(f"k (the size of the mixed axis) must be a positive integer; got {k}.")
    k = int(k)
    eye = torch.eye(k, dtype=dtype)
    if kind == "optimal":
        return -k / (k + 1) * eye + torch.ones(k, k, dtype=dtype) / (k + 1)
    _check_alpha(alpha)
    shift = torch.roll(eye, shifts=1, dims=0)  # column i has its 1 in row (i+1) mod k
    if neighbour == "next":
        shift = shift.T  # row i has its 1 in column (i+1) mod k
    return -alpha * eye + alpha * shift


def _mix_along(x: torch.Tensor, dim: int, kind: str, alpha: float, neighbour: str = "previous") -> torch.Tensor:
    """(I + Q) applied along ``dim`` without forming the matrix."""
    if kind == "optimal":
        k = x.shape[dim]
        return (x + x.sum(dim=dim, keepdim=True)) / (k + 1)
    # (I + Q_shift) x: element i becomes (1 - alpha)·x_i + alpha·x_(i-1 mod k) (previous)
    # or (1 - alpha)·x_i + alpha·x_(i+1 mod k) (next)
    return (1.0 - alpha) * x + alpha * torch.roll(x, shifts=1 if neighbour == "previous" else -1, dims=dim)


def straight_through(x: torch.Tensor, noised: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``noised`` in the forward pass, ``weight`` times the identity in the backward pass.

    The value is f(x).detach() + weight·(x - x.detach()) with f(x) = ``noised``: the added term is
    exactly 0, so the forward value is bit-identical to f(x); its gradient is weight·g.
    """
    return noised.detach() + weight * (x - x.detach())


def own_weight(kind: str, k: int, alpha: float) -> float:
    """(I + Q)_ii, what an element keeps of itself: 1 - alpha for the shift, 2/(k+1) for the optimal Q."""
    return 1.0 - alpha if kind == "shift" else 2.0 / (k + 1)


def _check_detach(detach) -> None:
    if not any(detach is d or (isinstance(d, str) and detach == d) for d in DETACH):
        raise UserError(f"noise detach must be false, true or partner (the gradient: through, identity, or the "
                        f"own term only); got {detach!r}.")


def _with_gradient(x: torch.Tensor, noised: torch.Tensor, kind: str, axis: str, alpha: float, detach, layout: str):
    """``noised`` with the backward pass ``detach`` names (see ``DETACH``)."""
    if detach is False:
        return noised
    if detach is True:
        return straight_through(x, noised)
    k = mixed_axis_size(NoiseSpec("linear-" + kind, axis=axis, alpha=alpha, skip_prefix_tokens=False), tuple(x.shape),
                        layout=layout)
    return straight_through(x, noised, own_weight(kind, k, alpha))


def linear_transform(
    x: torch.Tensor,
    kind: str = "optimal",
    axis: str = "batch",
    alpha: float = 0.3,
    num_prefix_tokens: int = 0,
    neighbour: str = "previous",
    detach: bool | str = False,
    layout: str | None = None,
) -> torch.Tensor:
    """Linear-transform noise X' = X + QX = (I + Q)X along one axis.

    ``axis='batch'`` mixes the samples of the batch (the released code; k = batch size);
    ``'rows'`` mixes the rows of the spatial grid within one image (k = grid height);
    ``'features'`` mixes channels / embedding features (k = D or C).
    For token tensors the first ``num_prefix_tokens`` tokens (CLS) are left untouched, as the
    released ViT code does.

    ``neighbour`` picks the sample the shift takes alpha from: ``'previous'`` (paper eq. 17,
    x'_i = (1 - alpha)·x_i + alpha·x_(i-1 mod k)) or ``'next'`` (the released NoisyCNN code,
    x_(i+1 mod k)); the optimal Q ignores it. ``detach`` keeps the forward value and sets the backward
    pass: ``False`` through (I + Q)ᵀ; ``True`` the identity, x' = x + (f(x) - x).detach(), as the
    released NoisyCNN code mostly does; ``'partner'`` the own term only, (1 + Q_ii)·g ((1 - alpha)·g for
    the shift), as the released ResNet-18 does after the first sub-block of stage 4.
    ``layout`` (``tokens``, ``nchw``, ``nhwc``, ``features``) says which dimension is which; without
    it the rank decides (2: features, 3: tokens, 4: nchw).
    """
    if kind not in LINEAR_KINDS:
        raise UserError(f"kind must be one of {', '.join(LINEAR_KINDS)}; got {kind!r}.")
    if axis not in AXES:
        raise UserError(f"axis must be one of {', '.join(AXES)}; got {axis!r}.")
    _check_alpha(alpha)
    _check_neighbour(neighbour)
    _check_detach(detach)
    _check_rank(x, (2, 3, 4), "linear_transform")
    layout = _check_layout(layout, x.dim()) or _RANK_LAYOUT[x.dim()]
    if num_prefix_tokens < 0:
        raise UserError(f"num_prefix_tokens must be >= 0; got {num_prefix_tokens}.")

    if layout == "tokens" and num_prefix_tokens:
        prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        mixed = _linear_on_layout(tokens, kind, axis, alpha, neighbour, layout)
        return torch.cat([prefix, _with_gradient(tokens, mixed, kind, axis, alpha, detach, layout)], dim=1)
    out = _linear_on_layout(x, kind, axis, alpha, neighbour, layout)
    return _with_gradient(x, out, kind, axis, alpha, detach, layout)


def _linear_on_layout(x: torch.Tensor, kind: str, axis: str, alpha: float, neighbour: str, layout: str) -> torch.Tensor:
    if axis == "batch":
        return _mix_along(x, 0, kind, alpha, neighbour)
    if axis == "features":
        return _mix_along(x, 1 if layout == "nchw" else x.dim() - 1, kind, alpha, neighbour)
    # rows
    if layout == "nchw":
        return _mix_along(x, 2, kind, alpha, neighbour)
    if layout == "nhwc":
        return _mix_along(x, 1, kind, alpha, neighbour)
    if layout == "features":
        raise UserError("axis 'rows' needs a spatial grid (tokens or feature maps); got flat (B, D) features.")
    b, n, d = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(
            f"axis 'rows' needs a square token grid; got {n} patch tokens "
            "(set num_prefix_tokens to the number of class/register tokens)."
        )
    grid = x.reshape(b, side, side, d)
    return _mix_along(grid, 1, kind, alpha, neighbour).reshape(b, n, d)


def gaussian(
    x: torch.Tensor,
    strength: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Additive Gaussian noise X' = X + s·N(mean, std²), prefix tokens untouched."""
    if std < 0:
        raise UserError(f"std must be >= 0; got {std}.")
    _check_rank(x, (2, 3, 4), "gaussian")
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std + mean
    noise = strength * noise
    if x.dim() == 3 and num_prefix_tokens:
        noise[:, :num_prefix_tokens] = 0
    return x + noise


def impulse(
    x: torch.Tensor,
    p: float = 0.1,
    generator: torch.Generator | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Salt-and-pepper noise: with u ~ U(0,1) per element, max(X) where u < p/2, min(X) where u > 1 - p/2.

    max/min are taken over the whole tensor (the whole batch), as the released code does, and are
    constants of the backward pass as there (``.detach()``: NoisyViT-OptimalQ/ViT.py lines 55-56,
    NoisyCNN_CircularShiftQ/CNNs.py lines 25-26): a salted or peppered element passes no gradient.
    """
    _check_probability(p)
    _check_rank(x, (2, 3, 4), "impulse")
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    body = x[:, num_prefix_tokens:] if (x.dim() == 3 and num_prefix_tokens) else x
    hi, lo = body.max().detach(), body.min().detach()
    out = torch.where(u < p / 2, hi, torch.where(u > 1 - p / 2, lo, x))
    if x.dim() == 3 and num_prefix_tokens:
        out[:, :num_prefix_tokens] = x[:, :num_prefix_tokens]
    return out


@dataclass(frozen=True)
class NoiseSpec:
    """One noise setting, as a config names it.

    ``strength`` is s for gaussian, p for impulse and unused by the linear kinds (whose strength
    is alpha for the shift and fixed for the optimal Q).

    ``neighbour`` (``previous``: paper eq. 17; ``next``: the released NoisyCNN code) is the sample
    the shift takes alpha from; the other kinds ignore it. ``detach`` sets the backward pass of a
    linear kind (``DETACH``: false through, true the identity as the released NoisyCNN code,
    ``partner`` the own term only as its ResNet-18 at stage 4); the forward value is unchanged.
    ``detach: true`` also makes gaussian and impulse the identity in the backward pass.
    """

    kind: str = "none"
    strength: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    alpha: float = 0.3
    axis: str = "batch"
    skip_prefix_tokens: bool = True
    neighbour: str = "previous"
    detach: bool | str = False

    def __post_init__(self):
        for name in ("strength", "mean", "std", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"noise {name} must be a number; got {value!r}.")
        if self.kind not in NOISE_KINDS:
            raise UserError(f"noise kind must be one of {', '.join(NOISE_KINDS)}; got {self.kind!r}.")
        if not isinstance(self.neighbour, str) or self.neighbour not in NEIGHBOURS:
            raise UserError(
                f"noise neighbour must be one of {', '.join(NEIGHBOURS)} (the sample the shift takes alpha from); "
                f"got {self.neighbour!r}."
            )
        _check_detach(self.detach)
        if self.detach == "partner" and not self.kind.startswith("linear"):
            raise UserError(f"noise detach: partner (the partner's term without gradient) applies to the linear "
                            f"kinds; got kind {self.kind}.")
        if self.kind.startswith("linear") and self.axis not in AXES:
            raise UserError(f"noise axis must be one of {', '.join(AXES)}; got {self.axis!r}.")
        if self.kind == "linear-shift":
            _check_alpha(self.alpha)
        if self.kind == "impulse" and not (0.0 <= float(self.strength) <= 1.0):
            # the spec's key is strength, so the message names it rather than the operator's p
            raise UserError(f"noise strength (the impulse probability p) must lie in [0, 1]; got {self.strength}.")
        if self.kind == "gaussian" and self.std < 0:
            raise UserError(f"noise std must be >= 0; got {self.std}.")
        problem = noise_problem(asdict(self))
        if problem:
            raise UserError(f"noise {self.kind}: key {problem[0]} {problem[1]}.")

    @classmethod
    def from_dict(cls, noise: dict) -> "NoiseSpec":
        """The NoiseSpec a config's noise mapping describes; an unknown key is named, not a TypeError."""
        if not isinstance(noise, dict):
            raise UserError(f"noise must be a mapping such as {{'kind': 'linear-optimal', 'axis': 'batch'}}; got {noise!r}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(noise) - set(known))
        if unknown:
            raise UserError(f"noise has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}.")
        return cls(**noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_random(self) -> bool:
        return self.kind in ("gaussian", "impulse")


def apply_noise(
    spec: NoiseSpec,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    num_prefix_tokens: int = 0,
    layout: str | None = None,
) -> torch.Tensor:
    """Apply the noise ``spec`` describes to ``x`` (``layout`` as for ``linear_transform``).

    Prefix tokens are skipped only in the ``tokens`` layout. With ``spec.detach`` true the backward
    pass sees the identity whatever the kind (for the additive gaussian that is already the case).
    """
    _check_layout(layout)
    prefix = num_prefix_tokens if spec.skip_prefix_tokens else 0
    if layout not in (None, "tokens"):
        prefix = 0
    if spec.kind == "none":
        return x
    if spec.kind in ("gaussian", "impulse"):
        if spec.kind == "gaussian":
            out = gaussian(x, spec.strength, spec.mean, spec.std, generator, prefix)
        else:
            out = impulse(x, spec.strength, generator, prefix)
        return straight_through(x, out) if spec.detach is True else out
    kind = "optimal" if spec.kind == "linear-optimal" else "shift"
    return linear_transform(x, kind, spec.axis, spec.alpha, prefix, spec.neighbour, spec.detach, layout)


def mixed_axis_size(
    spec: NoiseSpec, shape: tuple[int, ...], num_prefix_tokens: int = 0, layout: str | None = None
) -> int | None:
    """k, the size of the axis a linear noise mixes for an input of ``shape`` (None for other kinds).

    ``layout`` as for ``linear_transform`` (without it the rank decides, so a Swin (B, H, W, C) map
    needs ``layout='nhwc'``), or a site layout (``Injection.layout``): ``windows`` counts as tokens
    without prefix, ``unknown`` has only the batch axis. An axis the layout lacks (``rows`` on flat
    (B, D) features) is a UserError.
    """
    if not spec.kind.startswith("linear"):
        return None
    if layout == "windows":
        layout, num_prefix_tokens = "tokens", 0
    if layout == "unknown":
        if spec.axis == "batch":
            return shape[0]
        raise UserError(f"a tensor of shape {tuple(shape)} in an unknown layout has no {spec.axis} axis.")
    rank = len(shape)
    if layout is None:
        if rank not in _RANK_LAYOUT:
            raise UserError(f"a linear noise acts on a tensor of rank 2, 3 or 4 (batch first); got shape {tuple(shape)}.")
        layout = _RANK_LAYOUT[rank]
    _check_layout(layout, rank)
    if spec.axis == "batch":
        return shape[0]
    if spec.axis == "features":
        return shape[1] if layout == "nchw" else shape[-1]
    if layout == "nchw":
        return shape[2]
    if layout == "nhwc":
        return shape[1]
    if layout == "features":
        raise UserError(f"axis 'rows' needs a spatial grid (tokens or feature maps); got flat features of shape {tuple(shape)}.")
    return math.isqrt(shape[1] - (num_prefix_tokens if spec.skip_prefix_tokens else 0))
