"""The entropy argument of NoisyNN as code (docs/paper.md §3).

Task complexity S = H(Y | Z); a noise is *positive* when it lowers S, i.e. when
ΔS = S_before - S_after > 0. Under the paper's definitions:

* linear transform X' = (I + Q)X: ΔS = -log|det(I + Q)|, whatever the labels;
* alpha-shift Q: det(I + Q) = (1 - alpha)^k - (-alpha)^k;
* optimal Q*: det(I + Q*) = (k + 1)^(1 - k), so ΔS* = (k - 1)·log(k + 1);
* additive Gaussian noise independent of (Y, Z): ΔS <= 0.

The closed forms need no torch, so the torch-free report draws the theory from here too; torch is
imported where an explicit Q is built or its determinant taken.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from noisynn.errors import UserError

if TYPE_CHECKING:
    import torch

    from noisynn.noise import NoiseSpec


def delta_entropy(q: torch.Tensor) -> float:
    """ΔS = -log|det(I + Q)| for an explicit square Q (in nats), via slogdet.

    Returns +inf when I + Q is singular (the transform destroys information; the formula diverges).
    """
    import torch

    if q.dim() != 2 or q.shape[0] != q.shape[1]:
        raise UserError(f"Q must be a square matrix; got shape {tuple(q.shape)}.")
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    sign, logabsdet = torch.linalg.slogdet(eye + q.to(torch.float64))
    if sign == 0:
        return math.inf
    return -float(logabsdet)


def delta_entropy_optimal(k: int) -> float:
    """Closed form for Q* (paper eq. 19): ΔS* = (k - 1)·log(k + 1)."""
    _check_k(k)
    return (k - 1) * math.log(k + 1)


def det_shift(k: int, alpha: float) -> float:
    """det(I + Q) for the alpha-shift Q: (1 - alpha)^k - (-alpha)^k."""
    _check_k(k)
    return (1 - alpha) ** k - (-alpha) ** k


def delta_entropy_shift(k: int, alpha: float) -> float:
    """Closed form for the alpha-shift Q (paper eq. 17): ΔS = -log|(1 - alpha)^k - (-alpha)^k|."""
    if not 0 <= alpha <= 1:
        raise UserError(f"alpha must lie in [0, 1]; got {alpha}.")
    det = det_shift(k, alpha)
    return math.inf if det == 0 else -math.log(abs(det))


def gaussian_delta_entropy_bound() -> float:
    """Upper bound on ΔS for additive noise independent of (Y, Z).

    Y → Z → Z + N is a Markov chain, so H(Y | Z + N) >= H(Y | Z) (data processing): ΔS <= 0.
    """
    return 0.0


def delta_entropy_for(spec: NoiseSpec, k: int | None) -> float | None:
    """The theory's ΔS for a noise setting acting on an axis of size k.

    Returns the exact value for the linear kinds, the bound (0, an upper bound) for the additive
    kinds, and None for no noise. Impulse noise replaces values rather than adding independent
    noise; the paper groups it with the harmful kinds and the same bound is reported for it.
    """
    if spec.kind == "none":
        return None
    if spec.kind in ("gaussian", "impulse"):
        return gaussian_delta_entropy_bound()
    if k is None:
        raise UserError("the size k of the mixed axis is needed for a linear noise's ΔS.")
    if spec.kind == "linear-optimal":
        return delta_entropy_optimal(k)
    return delta_entropy_shift(k, spec.alpha)


def entropy_table(ks: list[int], alphas: list[float]) -> list[dict]:
    """Rows of ΔS (closed form and slogdet) against k and alpha, for ``noisynn entropy``."""
    from noisynn.noise import quality_matrix

    rows = []
    for k in ks:
        rows.append(
            {
                "k": k,
                "Q": "optimal",
                "alpha": None,
                "delta_S_closed_form": delta_entropy_optimal(k),
                "delta_S_slogdet": delta_entropy(quality_matrix("optimal", k)),
            }
        )
        for a in alphas:
            rows.append(
                {
                    "k": k,
                    "Q": "shift",
                    "alpha": a,
                    "delta_S_closed_form": delta_entropy_shift(k, a),
                    "delta_S_slogdet": delta_entropy(quality_matrix("shift", k, a)),
                }
            )
    return rows


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise UserError(f"k (the size of the mixed axis) must be a positive integer; got {k}.")
