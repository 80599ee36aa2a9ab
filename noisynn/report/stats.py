"""Uncertainty for every compared number: cluster-bootstrap intervals, McNemar, batch dependence.

No torch import here: everything works on numpy arrays of per-image outcomes (``correct``, ``pred``,
``batch``) indexed 0..n-1 identically across protocols and seeds, so the report step can run on a
machine without a GPU stack.

The unit of dependence is the whole test batch under a protocol whose noise mixes the images of a
batch (their outcomes are coupled), and a single image otherwise. Intervals resample those units,
never single images of a mixed batch; several seeds are resampled first, then units within each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from noisynn.errors import UserError

VERDICT_RULE = (
    "A setting is said to have raised (or lowered) top-1 accuracy only when the 95 % paired bootstrap "
    "interval of its change against the reference (the same test images, the same seed) lies entirely "
    "above (or below) zero; otherwise the summary says 'no evidence'. The interval resamples the unit "
    "of dependence: whole test batches under a protocol whose noise mixes the images of a batch, "
    "single images otherwise; with several seeds it resamples the seeds first and then the units "
    "within each chosen seed, so seed-to-seed variation widens it. McNemar's exact test on the paired "
    "per-image predictions (images the setting alone gets right against images the reference alone "
    "gets right) is reported beside it as a second, image-level view."
)

# Bootstrap resamples are drawn in chunks of at most this many unit draws, so a per-image bootstrap
# of ImageNet (50 000 units × 2 000 resamples) stays within tens of megabytes.
_MAX_DRAWS_PER_CHUNK = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval [low, high] at ``confidence``.

    ``n_units`` counts the resampling units summed over the ``n_seeds`` seeds.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_units: int
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


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
    return out


def _as_correct(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise UserError(f"`{what}` must be boolean (or 0/1) per image; got values other than 0 and 1.")
    return a.astype(bool, copy=False)


def _clusters(values: np.ndarray, unit_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the sum of the image values and the number of images."""
    _, inv = np.unique(unit_ids, return_inverse=True)
    return np.bincount(inv, weights=values).astype(float), np.bincount(inv).astype(float)


def _ratio_of_sums(num, den, axis=-1):
    return np.sum(num, axis=axis) / np.sum(den, axis=axis)


def _check_options(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise UserError(f"`confidence` must lie strictly between 0 and 1; got {confidence!r}.")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise UserError(f"`n_resamples` must be a positive integer; got {n_resamples!r}.")


def _ratio_interval(clusters: list[tuple[np.ndarray, np.ndarray]], confidence: float, n_resamples: int,
                    random_state) -> Interval:
    """Bootstrap interval of E = Σ num / Σ den over units (and seeds).

    One seed: ``scipy.stats.bootstrap`` on the units (paired, percentile). Several seeds: scipy has
    no hierarchical bootstrap, so seeds are resampled, then units within each chosen seed
    (vectorised over resamples with one numpy Generator), and the percentile interval is taken.
    """
    _check_options(confidence, n_resamples)
    n_resamples = int(n_resamples)
    num_all = np.concatenate([num for num, _ in clusters])
    den_all = np.concatenate([den for _, den in clusters])
    estimate = float(num_all.sum() / den_all.sum())
    n_units, n_seeds = int(num_all.size), len(clusters)

    # Every resample of units that share one ratio has that ratio: the interval is the point, and
    # scipy would only warn about degenerate data.
    if np.allclose(num_all / den_all, estimate, rtol=0, atol=1e-12):
        return Interval(estimate, estimate, estimate, confidence, n_units, n_seeds)

    rng = np.random.default_rng(random_state)
    if n_seeds == 1:
        num, den = clusters[0]
        # Percentile rather than BCa: BCa's jackknife is O(units²) (hours for 50 000 single images),
        # and the several-seed path below is percentile too, so all cells use one method.
        res = sps.bootstrap((num, den), _ratio_of_sums, n_resamples=n_resamples, paired=True, vectorized=True,
                            confidence_level=confidence, method="percentile", rng=rng,
                            batch=max(1, _MAX_DRAWS_PER_CHUNK // num.size))
        low, high = (float(x) for x in res.confidence_interval)
    else:
        picks = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
        times_picked = (picks[:, :, None] == np.arange(n_seeds)).sum(axis=1)  # (resamples, seeds)
        num_tot = np.zeros(n_resamples)
        den_tot = np.zeros(n_resamples)
        for s, (num, den) in enumerate(clusters):
            # k independent resamples of m units, summed, are one multinomial of k·m draws over the
            # units; units with equal (num, den) are interchangeable, so draw over distinct pairs:
            # same distribution, and a per-image bootstrap costs a handful of categories, not n.
            pairs, freq = np.unique(np.column_stack([num, den]), axis=0, return_counts=True)
            weights = rng.multinomial(times_picked[:, s] * num.size, freq / num.size)
            num_tot += weights @ pairs[:, 0]
            den_tot += weights @ pairs[:, 1]
        tail = (1 - confidence) / 2
        low, high = (float(x) for x in np.quantile(num_tot / den_tot, [tail, 1 - tail]))
    return Interval(estimate, low, high, confidence, n_units, n_seeds)


def _check_units(units_by_seed: list[np.ndarray], lengths: list[int]) -> None:
    if len(units_by_seed) != len(lengths):
        raise UserError(f"`units_by_seed` must hold one array per seed ({len(lengths)}); got {len(units_by_seed)}.")
    for s, (u, n) in enumerate(zip(units_by_seed, lengths, strict=True)):
        if u.shape != (n,):
            raise UserError(f"`units_by_seed[{s}]` must give a unit for each of the seed's {n} images; "
                            f"got shape {u.shape}.")


def accuracy_interval(correct_by_seed: list[np.ndarray], units_by_seed: list[np.ndarray], confidence: float = 0.95,
                      n_resamples: int = 2000, random_state=0) -> Interval:
    """Top-1 as a fraction, A = Σ correct / n (pooled over seeds), with a cluster-bootstrap interval.

    One seed: ``scipy.stats.bootstrap`` over units (percentile); several seeds: a two-stage
    percentile bootstrap (seeds, then units within each seed), vectorised numpy. Deterministic
    given ``random_state``.
    """
    correct = [_as_correct(c, "correct_by_seed") for c in _by_seed(correct_by_seed, "correct_by_seed")]
    unit_ids = _by_seed(units_by_seed, "units_by_seed")
    _check_units(unit_ids, [c.size for c in correct])
    clusters = [_clusters(c.astype(float), u) for c, u in zip(correct, unit_ids, strict=True)]
    return _ratio_interval(clusters, confidence, n_resamples, random_state)


def change_interval(setting_correct_by_seed: list[np.ndarray], reference_correct_by_seed: list[np.ndarray],
                    units_by_seed: list[np.ndarray], confidence: float = 0.95, n_resamples: int = 2000,
                    random_state=0) -> Interval:
    """Paired change of top-1, Δ = Σ (correct_setting − correct_reference) / n on the same images.

    Units are those of the setting's protocol; a resampled unit brings the same images to both
    sides. One seed: ``scipy.stats.bootstrap`` (paired, percentile); several seeds: a two-stage
    percentile bootstrap (seeds, then units within each seed), vectorised numpy. Deterministic
    given ``random_state``.
    """
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
    unit_ids = _by_seed(units_by_seed, "units_by_seed")
    _check_units(unit_ids, [c.size for c in setting])
    clusters = [_clusters(a.astype(float) - b.astype(float), u)
                for a, b, u in zip(setting, reference, unit_ids, strict=True)]
    return _ratio_interval(clusters, confidence, n_resamples, random_state)


def _flat_correct(arrays, what: str) -> np.ndarray:
    return np.concatenate([_as_correct(a, what) for a in _by_seed(arrays, what)])


def mcnemar(setting_correct, reference_correct) -> dict:
    """Exact two-sided McNemar: p = P(|B − (b+c)/2| ≥ |b − (b+c)/2|), B ~ Binomial(b + c, ½).

    b = setting right & reference wrong, c = setting wrong & reference right; arrays or per-seed
    lists of arrays (concatenated). p = 1 when b + c = 0.
    """
    s = _flat_correct(setting_correct, "setting_correct")
    r = _flat_correct(reference_correct, "reference_correct")
    if s.shape != r.shape:
        raise UserError(f"setting and reference must cover the same images; got {s.size} and {r.size}.")
    b = int(np.sum(s & ~r))
    c = int(np.sum(~s & r))
    pvalue = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "pvalue": pvalue}


def verdict(interval: Interval) -> str:
    """'raised' if low > 0, 'lowered' if high < 0, else 'no evidence' (see ``VERDICT_RULE``)."""
    if interval.low > 0:
        return "raised"
    if interval.high < 0:
        return "lowered"
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


def logit_pooling(logits: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Noise-free control: ŷ_i = argmax_c mean_{j ∈ batch(i)} z_jc, every image takes its batch's pooled logits.

    ``batches`` holds the image indices of each batch and must cover every image exactly once.
    """
    logits = np.asarray(logits, dtype=float)
    if logits.ndim != 2:
        raise UserError(f"`logits` must be a 2-D (images × classes) array; got shape {logits.shape}.")
    n = logits.shape[0]
    index = [np.asarray(b, dtype=np.int64).ravel() for b in batches]
    members = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    if members.size and (members.min() < 0 or members.max() >= n):
        raise UserError(f"`batches` must hold image indices in 0..{n - 1}; got {members.min()}..{members.max()}.")
    if not np.array_equal(np.bincount(members, minlength=n), np.ones(n, dtype=np.int64)):
        raise UserError(f"`batches` must place each of the {n} images in exactly one batch.")
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[members] = np.repeat(np.arange(len(index)), [b.size for b in index])
    sums = np.zeros((len(index), logits.shape[1]))
    np.add.at(sums, batch_of, logits)
    counts = np.maximum(np.bincount(batch_of, minlength=len(index)), 1)  # an empty batch pools nothing
    return (sums / counts[:, None]).argmax(axis=1)[batch_of]
