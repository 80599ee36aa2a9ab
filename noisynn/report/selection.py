"""What choosing the best epoch on the test set adds (no torch import).

FFTAT reports the best of its periodic evaluations on the target list, which is also its test list
(github.com/Shawey94/WACV2025-FFTAT @eafc4aa, main.py lines 334-337); NoisyViT_Food keeps the checkpoint
whose test metric is the best so far (github.com/Tonmoy-Ghosh/NoisyViT_Food @2584c4d, Main.py line
218). A training run with ``monitor_test: true`` records, after every epoch, each val and test image's
correctness (``train.record_epoch``); from those this module gives the three numbers a reader should
see side by side: the last epoch's test top-1, the best over epochs of the test top-1 (test-set
selection), and the test top-1 of the epoch the validation split selects; and the optimism, best-on-test
minus validation-selected, with a 95 % interval from a bootstrap over test batches that redoes the
selection in every resample (the maximum's own upward bias is what is being measured).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noisynn.errors import UserError


def read_epochs(run_dir: Path) -> dict[str, np.ndarray]:
    """The per-epoch records of a run folder: (epochs, images) correctness of val and test, and the
    test images' batch ids (the clusters of the bootstrap)."""
    files = sorted((Path(run_dir) / "selection").glob("epoch_*.npz"))
    if not files:
        raise UserError(f"run folder {run_dir} has no selection/epoch_*.npz; train with monitor_test: true "
                        "(the training section's key) to record the test split after every epoch.")
    epochs = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                epochs.append({k: z[k] for k in ("val_correct", "test_correct", "test_batch")})
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"selection record {f} cannot be read ({type(e).__name__}); train the run again.") from None
    return {"val": np.stack([e["val_correct"] for e in epochs]), "test": np.stack([e["test_correct"] for e in epochs]),
            "test_batch": epochs[-1]["test_batch"]}


def _first_best(scores: np.ndarray) -> int:
    """The epoch a strict-improvement rule keeps (``if acc > best``): the first of the maxima."""
    return int(np.argmax(scores))


def model_selection(val: np.ndarray, test: np.ndarray, test_batch: np.ndarray, confidence: float = 0.95,
                    n_resamples: int = 2000, seed: int = 0) -> dict:
    """Last, best-on-test and validation-selected test top-1 of a run's epochs, and the optimism
    (best-on-test minus validation-selected) with its bootstrap interval over test batches."""
    val, test = np.asarray(val, dtype=float), np.asarray(test, dtype=float)
    if val.ndim != 2 or test.ndim != 2 or len(val) != len(test) or not len(test):
        raise ValueError("model_selection needs (epochs, images) arrays of val and test with the same epochs")
    picked = _first_best(val.mean(axis=1))
    ids, inverse = np.unique(np.asarray(test_batch), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(ids)).astype(float)
    hits = np.stack([np.bincount(inverse, weights=t, minlength=len(ids)) for t in test])  # (epochs, batches)
    acc = hits.sum(axis=1) / sizes.sum()
    best = _first_best(acc)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_resamples, len(ids)))
    counts = np.stack([np.bincount(d, minlength=len(ids)) for d in draws])  # how often each batch is drawn
    resampled = (counts @ hits.T) / (counts @ sizes)[:, None]  # (resamples, epochs)
    optimism = resampled.max(axis=1) - resampled[:, picked]
    low, high = np.quantile(optimism, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"epochs": len(test), "last": float(acc[-1]), "best_on_test": float(acc[best]), "best_epoch": best + 1,
            "val_selected": float(acc[picked]), "val_epoch": picked + 1, "optimism": float(acc[best] - acc[picked]),
            "optimism_low": float(low), "optimism_high": float(high), "test_batches": len(ids)}


def selection_table(runs: dict[str, dict]) -> str:
    """A Markdown table of ``model_selection`` results, one row per run."""
    lines = ["| run | epochs | last epoch | best on test (epoch) | selected on val (epoch) | optimism, points [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['epochs']} | {100 * r['last']:.1f} | {100 * r['best_on_test']:.1f} ({r['best_epoch']}) | "
                     f"{100 * r['val_selected']:.1f} ({r['val_epoch']}) | {100 * r['optimism']:.1f} "
                     f"[{100 * r['optimism_low']:.1f}, {100 * r['optimism_high']:.1f}] |")
    return "\n".join(lines)
