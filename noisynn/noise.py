"""The noises of NoisyNN as pure tensor functions, and small callables built from a spec.

Tensor layouts understood by the operators (the same layouts a timm model passes between blocks):

* ``(B, N, D)`` tokens of a ViT, the first ``num_prefix_tokens`` of them class/register tokens;
* ``(B, C, H, W)`` feature maps of a CNN, or a normalized image batch;
* ``(B, D)`` flat features.

Every random operator takes an explicit ``torch.Generator`` so that a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from noisynn.errors import UserError

LINEAR_KINDS = ("optimal", "shift")
AXES = ("batch", "rows", "features")
NOISE_KINDS = ("none", "gaussian", "impulse", "linear-optimal", "linear-shift")


def _check_alpha(alpha: float) -> None:
    if not (0.0 <= float(alpha) <= 1.0):
        raise UserError(f"alpha must lie in [0, 1] (the weight of the shifted neighbour); got {alpha}.")


def _check_probability(p: float) -> None:
    if not (0.0 <= float(p) <= 1.0):
        raise UserError(f"p (the impulse probability) must lie in [0, 1]; got {p}.")


def _check_rank(x: torch.Tensor, allowed: tuple[int, ...], what: str) -> None:
    if x.dim() not in allowed:
        ranks = " or ".join(str(r) for r in allowed)
        raise UserError(f"{what} expects a tensor of rank {ranks} (batch first); got shape {tuple(x.shape)}.")


def quality_matrix(kind: str, k: int, alpha: float = 0.3, dtype=torch.float64) -> torch.Tensor:
    """The explicit k×k quality matrix Q of the linear-transform noise (X' = (I + Q) X).

    ``optimal`` (paper eq. 19): Q* = -k/(k+1)·I + 1/(k+1)·11ᵀ.
    ``shift`` (paper eq. 17): Q = -alpha·I + alpha·P with P[(i+1) mod k, i] = 1.
    """
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
    return -alpha * eye + alpha * shift


def _mix_along(x: torch.Tensor, dim: int, kind: str, alpha: float) -> torch.Tensor:
    """(I + Q) applied along ``dim`` without forming the matrix."""
    if kind == "optimal":
        k = x.shape[dim]
        return (x + x.sum(dim=dim, keepdim=True)) / (k + 1)
    # (I + Q_shift) x: element i becomes (1 - alpha)·x_i + alpha·x_(i-1 mod k)
    return (1.0 - alpha) * x + alpha * torch.roll(x, shifts=1, dims=dim)


def linear_transform(
    x: torch.Tensor,
    kind: str = "optimal",
    axis: str = "batch",
    alpha: float = 0.3,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Linear-transform noise X' = X + QX = (I + Q)X along one axis.

    ``axis='batch'`` mixes the samples of the batch (the released code; k = batch size);
    ``'rows'`` mixes the rows of the spatial grid within one image (k = grid height);
    ``'features'`` mixes channels / embedding features (k = D or C).
    For token tensors the first ``num_prefix_tokens`` tokens (CLS) are left untouched, as the
    released ViT code does.
    """
    if kind not in LINEAR_KINDS:
        raise UserError(f"kind must be one of {', '.join(LINEAR_KINDS)}; got {kind!r}.")
    if axis not in AXES:
        raise UserError(f"axis must be one of {', '.join(AXES)}; got {axis!r}.")
    _check_alpha(alpha)
    _check_rank(x, (2, 3, 4), "linear_transform")
    if num_prefix_tokens < 0:
        raise UserError(f"num_prefix_tokens must be >= 0; got {num_prefix_tokens}.")

    if x.dim() == 3 and num_prefix_tokens:
        prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        return torch.cat([prefix, _linear_on_layout(tokens, kind, axis, alpha)], dim=1)
    return _linear_on_layout(x, kind, axis, alpha)


def _linear_on_layout(x: torch.Tensor, kind: str, axis: str, alpha: float) -> torch.Tensor:
    if axis == "batch":
        return _mix_along(x, 0, kind, alpha)
    if axis == "features":
        return _mix_along(x, 1 if x.dim() == 4 else x.dim() - 1, kind, alpha)
    # rows
    if x.dim() == 4:
        return _mix_along(x, 2, kind, alpha)
    if x.dim() == 2:
        raise UserError("axis 'rows' needs a spatial grid (tokens or feature maps); got flat (B, D) features.")
    b, n, d = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(
            f"axis 'rows' needs a square token grid; got {n} patch tokens "
            "(set num_prefix_tokens to the number of class/register tokens)."
        )
    grid = x.reshape(b, side, side, d)
    return _mix_along(grid, 1, kind, alpha).reshape(b, n, d)


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

    max/min are taken over the whole tensor (the whole batch), as the released code does.
    """
    _check_probability(p)
    _check_rank(x, (2, 3, 4), "impulse")
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    body = x[:, num_prefix_tokens:] if (x.dim() == 3 and num_prefix_tokens) else x
    hi, lo = body.max(), body.min()
    out = torch.where(u < p / 2, hi, torch.where(u > 1 - p / 2, lo, x))
    if x.dim() == 3 and num_prefix_tokens:
        out[:, :num_prefix_tokens] = x[:, :num_prefix_tokens]
    return out


@dataclass(frozen=True)
class NoiseSpec:
    """One noise setting, as a config names it.

    ``strength`` is s for gaussian, p for impulse and unused by the linear kinds (whose strength
    is alpha for the shift and fixed for the optimal Q).
    """

    kind: str = "none"
    strength: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    alpha: float = 0.3
    axis: str = "batch"
    skip_prefix_tokens: bool = True

    def __post_init__(self):
        for name in ("strength", "mean", "std", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"noise {name} must be a number; got {value!r}.")
        if self.kind not in NOISE_KINDS:
            raise UserError(f"noise kind must be one of {', '.join(NOISE_KINDS)}; got {self.kind!r}.")
        if self.kind.startswith("linear") and self.axis not in AXES:
            raise UserError(f"noise axis must be one of {', '.join(AXES)}; got {self.axis!r}.")
        if self.kind == "linear-shift":
            _check_alpha(self.alpha)
        if self.kind == "impulse" and not (0.0 <= float(self.strength) <= 1.0):
            # the spec's key is strength, so the message names it rather than the operator's p
            raise UserError(f"noise strength (the impulse probability p) must lie in [0, 1]; got {self.strength}.")
        if self.kind == "gaussian" and self.std < 0:
            raise UserError(f"noise std must be >= 0; got {self.std}.")

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
) -> torch.Tensor:
    """Apply the noise ``spec`` describes to ``x``."""
    prefix = num_prefix_tokens if spec.skip_prefix_tokens else 0
    if spec.kind == "none":
        return x
    if spec.kind == "gaussian":
        return gaussian(x, spec.strength, spec.mean, spec.std, generator, prefix)
    if spec.kind == "impulse":
        return impulse(x, spec.strength, generator, prefix)
    kind = "optimal" if spec.kind == "linear-optimal" else "shift"
    return linear_transform(x, kind, spec.axis, spec.alpha, prefix)


def mixed_axis_size(spec: NoiseSpec, shape: tuple[int, ...], num_prefix_tokens: int = 0) -> int | None:
    """k, the size of the axis a linear noise mixes for an input of ``shape`` (None for other kinds)."""
    if not spec.kind.startswith("linear"):
        return None
    if spec.axis == "batch":
        return shape[0]
    if spec.axis == "features":
        return shape[1] if len(shape) == 4 else shape[-1]
    if len(shape) == 4:
        return shape[2]
    return math.isqrt(shape[1] - (num_prefix_tokens if spec.skip_prefix_tokens else 0))
