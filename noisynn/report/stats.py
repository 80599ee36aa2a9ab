"""Uncertainty for every compared number: crossed intervals, a cluster sign-flip test, one family per error rate.

No torch import here: everything works on numpy arrays of per-image outcomes (``correct``, ``pred``,
``batch``) indexed 0..n-1 identically across protocols and seeds, so the report step can run on a
machine without a GPU stack.

Two factors make a number uncertain, and they are crossed: the seeds (each trains and scores its own
model) and the test images, which are *the same images in every seed*. Within a seed the unit of
dependence is the whole test batch under a protocol whose noise mixes the images of a batch (their
outcomes move together), and a single image otherwise. Where every seed cuts the test set into the
same batches (``released``'s class-sorted order, ``class_pure``, ``class_mixed``, the purity
targets) or the unit is the image, the unit is one factor shared by all seeds; a seed that is a copy
of another then adds nothing, and the intervals and tests here give two copies of a seed exactly the
answer of one. Where the batches differ by seed (``shuffled``: a seeded permutation), no unit smaller
than the test set is shared; there the image is the shared factor and each seed's batches a second,
crossed one (two-way clustering), which is conservative rather than narrow (simulated, shuffled
batches with batch-level failures: 93–95 % coverage with one seed, 97–99 % with two or three). A seed
that makes a better or worse model overall is a third source; two or three seeds estimate it poorly
(simulated seed effect of 3 points: 93 % coverage with two or three seeds, 95 % with five).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal
from scipy import stats as sps

from noisynn.errors import UserError

ALPHA = 0.05  # the error rate of each family (below)
POWER = 0.80  # the power at which a verdict row states its minimum detectable effect
TEST_NAME = "exact sign-flip test on unit totals"
PRIMARY_ADJUSTMENT = "Holm"
OTHER_ADJUSTMENT = "Benjamini-Hochberg"

VERDICT_RULE = (
    "Each change of top-1 against the reference (the same test images, the same seed) has a 95 % interval "
    "that respects how the data hang together: the seeds score the same test images, so seeds and images "
    "are crossed factors (a seed that copies another adds nothing), and under a protocol whose noise mixes "
    "the images of a batch the whole batch is one unit. The interval is a Wilson-score interval of the "
    "share of images improved and of the share worsened at the effective number of independent images "
    "(the number of images divided by the design effect of the crossed variance), combined into their "
    "difference (Newcombe's hybrid method); at zero, where no variance can be estimated, the effective "
    "number is the number of units, so no interval has zero width unless the change is zero by "
    "construction. The test is an exact sign-flip test: under no effect each unit's total change "
    "(summed over the seeds where the unit is shared, per seed's batch where the batches differ by "
    "seed) is as likely positive as negative; with single images as units it is McNemar's exact test. "
    "A setting is said to have raised (or lowered) top-1 accuracy only when that test rejects at 5 % "
    "after the adjustment for its family; otherwise the verdict is 'no evidence', and the minimum "
    "detectable effect (80 % power at 5 %, before the family's adjustment) says how large a change the test set and seeds could have seen. "
    "The test treats the seeds' models as given (the images are its random part), while the interval also "
    "counts the seed-to-seed variation, with the few degrees of freedom a few seeds give: where the seeds disagree, a verdict can stand beside an interval "
    "that reaches zero, meaning the change is there for these models and its size for another seed is "
    "uncertain."
)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval [low, high] at ``confidence``.

    ``n_units``: the distinct units of dependence (shared by the seeds, not counted once per seed;
    where the batches differ by seed, each seed's batches). ``n_effective``: the number of
    independent images the interval is worth (the images of all seeds over the design effect).
    ``mde`` (a change only): the smallest change the test of a change detects with 80 % power at
    1 − ``confidence`` (``change_interval``).
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_units: int
    n_seeds: int
    n_effective: float
    mde: float = float("nan")


@dataclass(frozen=True)
class PairedTest:
    """The sign-flip test of a paired change: images improved (``b``), worsened (``c``), and the p-value.

    ``n_units``: units whose total change is not zero (those a sign flip moves).
    """

    b: int
    c: int
    pvalue: float
    n_units: int


def units(batch: np.ndarray | None, n: int, mixes_batch: bool) -> np.ndarray:
    """Unit id per image: u_i = batch_i when the protocol mixes a batch, else u_i = i."""
    if not mixes_batch:
        return np.arange(n)
    if batch is None:
        raise UserError("a batch-mixing protocol needs `batch` (the test-batch index of every image); got None.")
    batch = np.asarray(batch)
    if batch.shape != (n,) or not np.issubdtype(batch.dtype, np.integer):
        raise UserError(f"`batch` must be an integer array of {n} batch indices; "
                        f"got {batch.dtype} of shape {batch.shape}.")
    return batch.astype(np.int64, copy=False)


def _by_seed(arrays, what: str) -> list[np.ndarray]:
    # A bare 1-D array is one seed; anything else is a sequence of per-seed arrays.
    if isinstance(arrays, np.ndarray) and arrays.ndim == 1:
        arrays = [arrays]
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise UserError(f"`{what}` must hold one array per seed; got none.")
    for a in out:
        if a.ndim != 1 or a.size == 0:
            raise UserError(f"`{what}` must hold non-empty 1-D arrays (one per seed); got shape {a.shape}.")
    if len({a.size for a in out}) > 1:
        raise UserError(f"`{what}`: every seed must score the same test images; got {sorted({a.size for a in out})} "
                        "images.")
    return out


def _as_correct(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise UserError(f"`{what}` must be boolean (or 0/1) per image; got values other than 0 and 1.")
    return a.astype(bool, copy=False)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise UserError(f"`confidence` must lie strictly between 0 and 1; got {confidence!r}.")


@dataclass(frozen=True)
class _Design:
    """Seeds × images, and the units of dependence: ``unit`` (S, n) ids, ``shared`` when one partition serves all seeds."""

    unit: np.ndarray
    shared: bool

    @classmethod
    def of(cls, units_by_seed: list[np.ndarray], n: int) -> _Design:
        if any(u.shape != (n,) for u in units_by_seed):
            bad = next(s for s, u in enumerate(units_by_seed) if u.shape != (n,))
            raise UserError(f"`units_by_seed[{bad}]` must give a unit for each of the seed's {n} images; "
                            f"got shape {units_by_seed[bad].shape}.")
        # label units by first appearance, so that the same partition has the same labels in every seed
        relabelled = []
        for u in units_by_seed:
            _, first, inverse = np.unique(u, return_index=True, return_inverse=True)
            relabelled.append(np.argsort(np.argsort(first))[inverse])
        unit = np.stack(relabelled)
        return cls(unit, bool((unit == unit[0]).all()))

    @property
    def n_seeds(self) -> int:
        return self.unit.shape[0]

    @property
    def n_units(self) -> int:
        """Distinct units: shared ones once; else every seed's own."""
        per_seed = self.unit.max(axis=1) + 1
        return int(per_seed[0] if self.shared else per_seed.sum())

    @property
    def fewest_units(self) -> int:
        """The number of independent units when every unit's outcome is one draw: the boundary's effective n."""
        return int(self.unit.max(axis=1).min() + 1)

    def variance_of_mean(self, x: np.ndarray) -> tuple[float, float]:
        """Var of the mean of x (S, n) over seeds and images, for crossed seeds × units (moment estimator),
        as its two parts: (the units' term, the seeds' term).

        Shared units: with Z_su the unit sums of x − x̄, a_u their mean over seeds, b_s over units and
        r = Z − a − b, Var(ΣZ) = (SU)² [Σa²/(U(U−1)) + max(0, MS_seed − MS_residual)/(SU)], the unbiased
        estimator of a two-way crossed random-effects design with the seed term kept only where the
        seeds differ more than their units explain. A copy of a seed has MS_seed = MS_residual = 0,
        so copies give the variance of one. Batches that differ by seed: the unit term is the two-way
        cluster-robust variance over images (shared) and each seed's batches (Cameron, Gelbach &
        Miller 2011), never below either one-way term.

        Why not the crossed bootstrap (seeds with replacement × one set of unit weights shared by the
        chosen seeds): its variance counts the seed × unit interaction twice (McCullagh 2000; Owen
        2007), the more so the more outcomes vary by seed beyond what the image explains. In a
        simulation of clustered Bernoulli data (36 batches of 10, 300 replicates, 2–4 seeds) its 95 %
        percentile intervals covered the truth in 96–98 % of replicates when each image keeps its
        difficulty in every seed (the data of tests/test_stats.py) and in 98.7–100 % when outcomes
        were drawn afresh per seed; and a percentile interval cannot leave 0 or 100 %. The moment
        estimator is what that resampling approximates, without the excess and without Monte Carlo
        noise.
        """
        s_count, n = x.shape
        z = x - x.mean()
        if self.shared:
            n_u = int(self.unit[0].max() + 1)
            cells = np.stack([np.bincount(self.unit[0], weights=z[s], minlength=n_u) for s in range(s_count)])
            a = cells.mean(axis=0)
            within = (s_count * n_u) ** 2 * float(a @ a) / (n_u * (n_u - 1)) if n_u > 1 else 0.0
        else:
            cells = z  # the image is the shared factor
            by_image = z.sum(axis=0)
            offsets = np.concatenate([[0], np.cumsum(self.unit.max(axis=1) + 1)])
            g = int(offsets[-1])
            by_batch = np.bincount((self.unit + offsets[:-1, None]).ravel(), weights=z.ravel(), minlength=g)
            v_image = n / (n - 1) * float(by_image @ by_image)
            v_batch = g / (g - 1) * float(by_batch @ by_batch)
            v_obs = z.size / (z.size - 1) * float((z * z).sum())
            within = max(v_image + v_batch - v_obs, v_image, v_batch)
        return within / (s_count * n) ** 2, self._seed_excess(cells) / (s_count * n) ** 2

    @staticmethod
    def _seed_excess(cells: np.ndarray) -> float:
        s_count, n_u = cells.shape
        if s_count < 2 or n_u < 2:
            return 0.0
        a, b = cells.mean(axis=0), cells.mean(axis=1)
        r = cells - a[None, :] - b[:, None]
        ms_seed = n_u * float(b @ b) / (s_count - 1)
        ms_residual = float((r * r).sum()) / ((n_u - 1) * (s_count - 1))
        return (s_count * n_u) ** 2 * max(0.0, ms_seed - ms_residual) / (n_u * s_count)

    def n_effective(self, parts: tuple[float, float], iid_variance: float, confidence: float) -> float:
        """Images over the design effect, n* = N · v_iid / v ≤ N with v = v_units + v_seeds, shrunk for the
        degrees of freedom (Korn & Graubard 1998: × (z/t_df)²), df by Satterthwaite from units − 1 and
        seeds − 1, so that a seed term estimated from two seeds counts as the one degree of freedom it has;
        the number of units where v = 0 or v_iid = 0."""
        n_obs, variance = self.unit.size, sum(parts)
        if variance <= 0 or iid_variance <= 0:
            return float(self.fewest_units)
        tail = 1 - (1 - confidence) / 2
        dfs = (max(self.fewest_units - 1, 1), max(self.n_seeds - 1, 1))
        df = variance ** 2 / sum(v ** 2 / d for v, d in zip(parts, dfs, strict=True))
        return min(float(n_obs), n_obs * iid_variance / variance) * (sps.norm.ppf(tail) / sps.t.ppf(tail, df)) ** 2


def _wilson(p: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson's score interval of p at a (possibly fractional) sample size n."""
    z = sps.norm.ppf(1 - (1 - confidence) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval holds p; at p = 0 or 1 rounding would otherwise leave it a hair off
    return min(p, max(0.0, float(centre - half))), max(p, min(1.0, float(centre + half)))


def accuracy_interval(correct_by_seed: list[np.ndarray], units_by_seed: list[np.ndarray],
                      confidence: float = 0.95) -> Interval:
    """Top-1 as a fraction, A = Σ correct / (S·n) over seeds and images, with a score interval.

    Wilson's score interval at the effective sample size n* (the images of all seeds over the design
    effect of the crossed variance, Kott & Carr 1997; shrunk for the units' degrees of freedom as Korn
    & Graubard 1998 do). A score interval leaves the boundary, where a percentile bootstrap cannot; in
    the simulation of tests/test_stats.py it covered the truth in 92.5–97.5 % of replicates from 70 %
    to 99 % accuracy, one seed or three, while the exact (Clopper–Pearson) interval at the same n* covered
    98.3–98.8 % near 100 % with one seed (its discreteness). At A = 0 or 1 no design effect can be
    estimated; n* is then the number of units (the worst case: each unit one draw), so 360 of 360
    right in 36 batches of a batch-mixing protocol gives [90.4 %, 100 %], and 360 single images
    [98.9 %, 100 %].
    """
    _check_confidence(confidence)
    correct = np.stack([_as_correct(c, "correct_by_seed") for c in _by_seed(correct_by_seed, "correct_by_seed")])
    design = _Design.of(_by_seed(units_by_seed, "units_by_seed"), correct.shape[1])
    _check_seeds(design, correct, "units_by_seed")
    x = correct.astype(float)
    p = float(x.mean())
    n_star = design.n_effective(design.variance_of_mean(x), p * (1 - p) / x.size, confidence)
    low, high = _wilson(p, n_star, confidence)
    return Interval(p, low, high, confidence, design.n_units, design.n_seeds, float(n_star))


def _check_seeds(design: _Design, values: np.ndarray, what: str) -> None:
    if design.n_seeds != values.shape[0]:
        raise UserError(f"`{what}` must hold one array per seed ({values.shape[0]}); got {design.n_seeds}.")


def _paired(setting_correct_by_seed, reference_correct_by_seed, units_by_seed) -> tuple[np.ndarray, _Design]:
    """(d = setting − reference per seed and image, as integers; the design)."""
    setting = [_as_correct(c, "setting_correct_by_seed")
               for c in _by_seed(setting_correct_by_seed, "setting_correct_by_seed")]
    reference = [_as_correct(c, "reference_correct_by_seed")
                 for c in _by_seed(reference_correct_by_seed, "reference_correct_by_seed")]
    if len(reference) != len(setting):
        raise UserError(f"`reference_correct_by_seed` must hold one array per seed ({len(setting)}); "
                        f"got {len(reference)}.")
    for s, (a, b) in enumerate(zip(setting, reference, strict=True)):
        if a.shape != b.shape:
            raise UserError(f"seed {s}: setting and reference must cover the same images; got {a.size} and {b.size}.")
    d = np.stack(setting).astype(np.int64) - np.stack(reference).astype(np.int64)
    design = _Design.of(_by_seed(units_by_seed, "units_by_seed"), d.shape[1])
    _check_seeds(design, d, "units_by_seed")
    return d, design


def change_interval(setting_correct_by_seed: list[np.ndarray], reference_correct_by_seed: list[np.ndarray],
                    units_by_seed: list[np.ndarray], confidence: float = 0.95, identity: bool = False) -> Interval:
    """Paired change of top-1, Δ = p₊ − p₋ on the same images: p₊ the share the setting alone gets right, p₋ the reverse.

    Newcombe's hybrid score interval (MOVER, Newcombe 1998; Zou & Donner 2008) from Wilson intervals
    of p₊ and p₋ at the effective sample size n* of Δ (its crossed variance against the variance of
    independent images, (p₊ + p₋ − Δ²)/N), with their multinomial correlation. Score components keep
    the interval valid where every unit moves one way (p₋ = 0) and near nothing changing; exact
    (Clopper–Pearson) components made it conservative (97–100 % coverage in a simulation like that
    of tests/test_stats.py). With no image changed it is ±(the Wilson bound of 0 in as many draws as
    units), unless ``identity``: the setting is the reference by construction (its noise off on the same
    checkpoint, or a batch-axis linear noise at batch size 1), where no change at all is the point [0, 0].
    """
    _check_confidence(confidence)
    d, design = _paired(setting_correct_by_seed, reference_correct_by_seed, units_by_seed)
    x = d.astype(float)
    delta, up, down = float(x.mean()), float((d > 0).mean()), float((d < 0).mean())
    if identity and not d.any():
        return Interval(0.0, 0.0, 0.0, confidence, design.n_units, design.n_seeds, float(d.size), 0.0)
    iid = (up + down - delta ** 2) / d.size
    units_term, seeds_term = design.variance_of_mean(x)
    n_star = design.n_effective((units_term, seeds_term), iid, confidence)
    low, high = _newcombe(up, down, n_star, confidence)
    # The test takes the seeds' models as given, so its power follows the units' term alone: the MDE is
    # (z_{1−α/2} + z_{0.8})·SE, SE read off the interval without the seeds' term (same boundary rule).
    n_test = design.n_effective((units_term, 0.0), iid, confidence)
    test_low, test_high = _newcombe(up, down, n_test, confidence)
    z = sps.norm.ppf(1 - (1 - confidence) / 2)
    mde = (z + sps.norm.ppf(POWER)) * (test_high - test_low) / (2 * z)
    return Interval(delta, low, high, confidence, design.n_units, design.n_seeds, float(n_star), float(mde))


def _newcombe(up: float, down: float, n: float, confidence: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p₊ − p₋ at sample size n (MOVER on Wilson intervals, multinomial ρ)."""
    (l_up, u_up), (l_down, u_down) = _wilson(up, n, confidence), _wilson(down, n, confidence)
    rho = -np.sqrt(up * down / ((1 - up) * (1 - down))) if 0 < up < 1 and 0 < down < 1 else 0.0
    delta = up - down
    low = delta - np.sqrt(max(0.0, (up - l_up) ** 2 + (u_down - down) ** 2 - 2 * rho * (up - l_up) * (u_down - down)))
    high = delta + np.sqrt(max(0.0, (u_up - up) ** 2 + (down - l_down) ** 2 - 2 * rho * (u_up - up) * (down - l_down)))
    return max(-1.0, float(low)), min(1.0, float(high))


def sign_flip_test(setting_correct_by_seed: list[np.ndarray], reference_correct_by_seed: list[np.ndarray],
                   units_by_seed: list[np.ndarray]) -> PairedTest:
    """Exact two-sided sign-flip test of no paired change, on the totals of the units of dependence.

    Under no effect the setting and the reference are exchangeable within each unit, so each unit's
    total T_u = Σ (correct_setting − correct_reference) is as likely −T_u as T_u; p = P(|Σ ±T_u| ≥ |Σ T_u|)
    over all 2^U sign patterns. A unit shared by the seeds is flipped as one (its total summed over the
    seeds: a copied seed adds nothing); where the batches differ by seed, each seed's batches flip on
    their own (stratified by seed). The null distribution is exact for any number of units: units with
    equal |T| form binomial groups, convolved (``scipy.stats.permutation_test`` enumerates the same
    patterns only up to ~20 units and samples beyond; tests/test_stats.py checks the two agree). A long
    support is convolved by FFT, whose rounding (~1e-16) makes p-values below 1e-12 rounding noise: they
    are shown as "< 1e-12". With single images as units this is McNemar's exact test.
    """
    d, design = _paired(setting_correct_by_seed, reference_correct_by_seed, units_by_seed)
    if design.shared:
        totals = np.bincount(design.unit[0], weights=d.sum(axis=0))
    else:
        offsets = np.concatenate([[0], np.cumsum(design.unit.max(axis=1) + 1)])
        totals = np.bincount((design.unit + offsets[:-1, None]).ravel(), weights=d.ravel())
    totals = np.rint(totals).astype(np.int64)
    return PairedTest(int((d > 0).sum()), int((d < 0).sum()), _sign_flip_pvalue(totals),
                      int(np.count_nonzero(totals)))


def _sign_flip_pvalue(totals: np.ndarray) -> float:
    magnitudes = np.abs(totals[totals != 0])
    if magnitudes.size == 0:
        return 1.0
    pmf = np.ones(1)  # the null distribution of Σ ±T_u, on the integers −Σ|T_u| … Σ|T_u|
    for v, k in zip(*np.unique(magnitudes, return_counts=True)):
        # k units of magnitude v: v·(2X − k) with X ~ Binomial(k, ½), on a grid of step 1
        group = np.zeros(2 * v * k + 1)
        group[:: 2 * v] = sps.binom.pmf(np.arange(k + 1), k, 0.5)
        pmf = signal.convolve(pmf, group, method="auto")  # FFT for long supports: rounding ~1e-16
    pmf = np.clip(pmf, 0.0, None)
    reach = (pmf.size - 1) // 2
    observed = abs(int(totals.sum()))
    return float(min(1.0, pmf[np.abs(np.arange(-reach, reach + 1)) >= observed].sum()))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error): p̃_(i) = max_{j≤i} min(1, (m − j + 1)·p_(j)); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        stepped = np.maximum.accumulate((ok.size - np.arange(ok.size)) * p[order])
        out[order] = np.minimum(1.0, stepped)
    return out


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate), ``scipy.stats.false_discovery_control``; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out


def verdict(estimate: float, adjusted_pvalue: float, alpha: float = ALPHA) -> str:
    """'raised' / 'lowered' (the sign of the change) when the family-adjusted p-value is below ``alpha``, else 'no evidence'."""
    if adjusted_pvalue < alpha and estimate != 0:
        return "raised" if estimate > 0 else "lowered"
    return "no evidence"


def batch_dependence(pred_by_seed: list[np.ndarray], pred_batch1_by_seed: list[np.ndarray]) -> float:
    """Share of images, over all seeds, whose prediction changes from batch size 1: Σ [p_i ≠ p1_i] / Σ n."""
    pred = _by_seed(pred_by_seed, "pred_by_seed")
    pred1 = _by_seed(pred_batch1_by_seed, "pred_batch1_by_seed")
    if len(pred) != len(pred1):
        raise UserError(f"`pred_batch1_by_seed` must hold one array per seed ({len(pred)}); got {len(pred1)}.")
    for s, (a, b) in enumerate(zip(pred, pred1, strict=True)):
        if a.shape != b.shape:
            raise UserError(f"seed {s}: predictions at both batch sizes must cover the same images; "
                            f"got {a.size} and {b.size}.")
    differ = sum(int(np.sum(a != b)) for a, b in zip(pred, pred1, strict=True))
    return differ / sum(a.size for a in pred)


def is_transductive(share: float) -> bool:
    """A prediction depends on the other images of its batch for some image: share > 0."""
    if not 0 <= share <= 1:
        raise UserError(f"a batch-dependence share must lie in [0, 1]; got {share!r}.")
    return share > 0
