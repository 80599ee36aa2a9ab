"""A synthetic dataset's evaluations, per-image predictions and sweeps, shaped like the workflow's.

The effects are built in, so the right answers are known:

* the released recipe (``linear-optimal_batch``, eval) makes whole batches right under ``released``
  and ``class_pure`` (raised) and one image per batch wrong in half the batches under ``shuffled``
  and ``class_mixed`` (lowered); at batch size 1 it is the vanilla model, image for image;
* ``linear-shift_a0.3_batch`` is a null effect: one image right in even batches, one wrong in odd
  ones (no evidence), yet its predictions differ from ``batch1`` (transductive);
* ``linear-shift_a0.3_features`` (per image) predicts the same under every noisy protocol;
* ``gaussian_s0.5`` flips a fresh random 30 % of the right images under every noisy protocol;
* a noise-trained checkpoint's own clean top-1 is 3 points above the vanilla one;
* the batch-size sweep rises with k for one-class batches and falls for mixed ones; purity rises with m.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from noisynn.report.aggregate import COLUMNS, SWEEP_COLUMNS
from noisynn.report.summary import make_report
from noisynn.vocab import PROTOCOL_DEFS, PROTOCOLS, released_metric

REPO = Path(__file__).resolve().parents[1]
DATASET = "digits"
N_CLASSES, PER_CLASS, BATCH = 10, 20, 10
N = N_CLASSES * PER_CLASS
LABELS = np.repeat(np.arange(N_CLASSES), PER_CLASS)  # image i has class i // 20: index order is class-sorted
SEEDS = (0, 1)
# model → (timm name, sites in module order (the last is the default), vanilla top-1, reported metric)
MODELS = {"vit": ("vit_tiny_patch16_224", [f"blocks.{i}.attn" for i in range(4)], 0.80, "running"),
          "resnet": ("resnet18", [f"layer{i}.0" for i in range(1, 5)], 0.70, "plain")}
# token → (kind, strength, alpha, axis, neighbour, detach, applies)
NOISES = {
    "none": ("none", None, None, None, None, None, ("eval",)),
    "gaussian_s0.5": ("gaussian", 0.5, None, None, None, None, ("eval",)),
    "impulse_p0.1": ("impulse", 0.1, None, None, None, None, ("eval",)),
    "linear-optimal_batch": ("linear-optimal", None, None, "batch", None, False, ("eval", "train+eval")),
    "linear-shift_a0.3_batch": ("linear-shift", None, 0.3, "batch", "previous", False, ("eval",)),
    "linear-shift_a0.3_features": ("linear-shift", None, 0.3, "features", "previous", False, ("eval",)),
}
RECIPE = "linear-optimal_batch"
SWEEP_KS = (1, 2, 4, 8, 10, 16, 32, 64)


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def batches(order: str, k: int, seed: int) -> np.ndarray:
    """The batch index of each image when the test set in ``order`` is cut into batches of k."""
    if order in ("class_sorted", "class_pure"):
        position = np.arange(N)
    elif order == "class_mixed":
        position = (np.arange(N) % PER_CLASS) * N_CLASSES + LABELS  # batch j: image j of every class
    else:
        position = np.empty(N, dtype=np.int64)
        position[_rng("order", seed).permutation(N)] = np.arange(N)
    return (position // k).astype(np.int64)


def _pred(correct: np.ndarray) -> np.ndarray:
    return np.where(correct, LABELS, (LABELS + 1) % N_CLASSES).astype(np.int64)


def _per_batch(correct: np.ndarray, batch: np.ndarray, pick) -> np.ndarray:
    """Apply ``pick(j, members, correct)`` → new correctness of the batch's members, batch by batch."""
    out = correct.copy()
    for j in np.unique(batch):
        members = np.flatnonzero(batch == j)
        out[members] = pick(j, members, correct[members])
    return out


def _one(value: bool):
    def pick(j, members, c):
        c = c.copy()
        hit = np.flatnonzero(c != value)
        if hit.size:
            c[hit[0]] = value
        return c
    return pick


def vanilla_correct(model: str, seed: int) -> np.ndarray:
    return _rng("vanilla", model, seed).random(N) < MODELS[model][2]


def setting_correct(model, noise, apply, site, seed, protocol) -> tuple[np.ndarray, np.ndarray]:
    """(correct, batch) of one setting under one protocol, from the built-in effects."""
    p = PROTOCOL_DEFS[protocol]
    batch = batches(p.order, p.batch_size or BATCH, seed)
    clean = vanilla_correct(model, seed)
    if apply == "train+eval":
        clean = clean.copy()
        clean[np.flatnonzero(~clean)[: N * 3 // 100]] = True
    if protocol == "clean" or noise == "none":
        return clean, batch
    sites = MODELS[model][1]
    share = (1 + sites.index(site)) / len(sites)  # deeper sites act more
    if noise == RECIPE:
        if protocol in ("released", "class_pure"):
            cut = math.ceil(6 * share)
            return _per_batch(clean, batch, lambda j, m, c: np.ones_like(c) if j % 10 < cut else c), batch
        if protocol in ("shuffled", "class_mixed"):
            return _per_batch(clean, batch, lambda j, m, c: _one(False)(j, m, c) if j % 2 else c), batch
        return clean, batch  # batch1: the identity
    if noise == "linear-shift_a0.3_batch":
        if protocol == "batch1":
            return clean, batch
        return _per_batch(clean, batch, lambda j, m, c: _one(j % 2 == 0)(j, m, c)), batch
    if noise == "linear-shift_a0.3_features":
        out = clean.copy()
        out[np.flatnonzero(clean)[:4]] = False
        return out, batch
    if noise == "gaussian_s0.5":
        return clean & (_rng("gaussian", model, seed, protocol).random(N) >= 0.3), batch
    return _per_batch(clean, batch, lambda j, m, c: _one(False)(j, m, c)), batch  # impulse: one image per batch


def sweep_arrays(model: str, seed: int) -> dict[str, np.ndarray]:
    """The released recipe's batch-size and purity sweeps and the pooling control (keys without the setting)."""
    clean, out = vanilla_correct(model, seed), {}
    for order in ("class_pure", "shuffled", "class_mixed"):
        for k in SWEEP_KS:
            batch = batches(order, k, seed)
            step = int(math.log2(k)) if order != "shuffled" else 0
            if order == "class_pure":
                correct = clean | (batch % 8 < step)
            else:
                correct = clean & ~(batch % 8 < step // 2)
            out[f"batch_size/{order}/k{k}/pred"], out[f"batch_size/{order}/k{k}/batch"] = _pred(correct), batch
            pooled = _per_batch(clean, batch, lambda j, m, c: np.full_like(c, c.mean() >= 0.5)) if order == "class_pure" \
                else _per_batch(clean, batch, lambda j, m, c: np.r_[c[:1], np.zeros(c.size - 1, bool)])
            out[f"pooling/batch_size/{order}/k{k}/pred"] = _pred(pooled)
    for m in range(1, BATCH + 1):
        batch = np.arange(N) // m
        out[f"purity/m{m}/correct"], out[f"purity/m{m}/batch"] = clean | (np.arange(N) % 10 < m - 1), batch
    for name in ("released", "shuffled", "class_pure", "class_mixed"):
        batch = batches(PROTOCOL_DEFS[name].order, BATCH, seed)
        pure = name in ("released", "class_pure")
        pooled = _per_batch(clean, batch, (lambda j, m, c: np.full_like(c, c.mean() >= 0.5)) if pure
                            else (lambda j, m, c: np.r_[c[:1], np.zeros(c.size - 1, bool)]))
        out[f"pooling/{name}/pred"], out[f"pooling/{name}/batch"] = _pred(pooled), batch
    return out


def _theory(kind: str, alpha, k: int | None):
    if kind in ("gaussian", "impulse"):
        return 0.0
    if k is None:
        return None
    if kind == "linear-optimal":
        return (k - 1) * math.log(k + 1)
    det = (1 - alpha) ** k - (-alpha) ** k
    return math.inf if det == 0 else -math.log(abs(det))


def _settings(models) -> list[tuple[str, str, str, str, bool]]:
    """(model, noise, apply, site, default_site): every noise at the default site, the recipe at every site."""
    out = []
    for model in models:
        sites = MODELS[model][1]
        for noise, spec in NOISES.items():
            for apply in spec[6]:
                out.append((model, noise, apply, "none" if noise == "none" else sites[-1], True))
        out += [(model, RECIPE, "eval", site, False) for site in sites[:-1]]
    return out


def build(root: Path, sweeps: bool = True, predictions: bool = True, models=tuple(MODELS)) -> dict[str, Path]:
    """Write evaluations.csv, sweeps.csv, the predictions files and a paper table under ``root`` (no models: empty)."""
    root = Path(root)
    rows, sweep_rows, groups = [], [], {}
    for model, noise, apply, site, default in _settings(models):
        kind, strength, alpha, axis, neighbour, detach, _ = NOISES[noise]
        train = noise if apply == "train+eval" else "none"
        group_site = MODELS[model][1][-1] if site == "none" else site
        for seed in SEEDS:
            folder = root / f"results/{DATASET}/{model}/evaluate/train~{train}/site~{group_site}/seed~{seed}"
            arrays = groups.setdefault(folder, {"labels": LABELS})
            key = f"{noise}|{apply}|{site}"
            for protocol in PROTOCOLS:
                correct, batch = setting_correct(model, noise, apply, site, seed, protocol)
                arrays[f"{key}/{protocol}/pred"], arrays[f"{key}/{protocol}/batch"] = _pred(correct), batch
                p, noise_on = PROTOCOL_DEFS[protocol], protocol != "clean" and kind != "none"
                bs = p.batch_size or BATCH
                k = bs if noise_on and axis == "batch" else None
                counts = np.bincount(batch, weights=correct)
                metric_values = {"top1": correct.mean(), "top5": min(1.0, correct.mean() + 0.1),
                                 "released_metric_top1": released_metric(counts, np.bincount(batch)),
                                 "released_metric_top5": min(1.0, released_metric(counts, np.bincount(batch)) + 0.1)}
                for metric, value in metric_values.items():
                    row = {"dataset": DATASET, "model": model, "timm_name": MODELS[model][0], "noise": noise,
                           "noise_kind": kind, "strength": strength, "alpha": alpha, "axis": axis,
                           "neighbour": neighbour, "detach": detach, "apply": apply, "site": site,
                           "default_site": default, "seed": seed, "protocol": protocol, "order": p.order,
                           "batch_size": bs, "noise_applied": noise_on, "metric": metric, "value": round(float(value), 6),
                           "n": N, "mixed_axis_size": k, "theory_delta_S": _theory(kind, alpha, k) if noise_on else None,
                           "reported_metric": MODELS[model][3], "preprocess": "",
                           "checkpoint": f"ckpt/{model}/{train}/{seed}",
                           "evaluation": str(folder / "evaluations.json"),
                           "predictions": str(folder / "predictions.npz") if predictions else "",
                           "data_fingerprint": "sha256:feed", "git_commit": "abc123", "noisynn": "0.1.0",
                           "torch": "2.14.1", "timm": "1.0.31"}
                    row["row_id"] = "|".join(str(row[c]) for c in ("model", "noise", "apply", "site", "seed", "protocol",
                                                                  "metric"))
                    rows.append(row)
            if sweeps and noise == RECIPE and apply == "eval" and default:
                found = sweep_arrays(model, seed)
                arrays.update({f"{key}/{name}": a for name, a in found.items()})
                base = {"dataset": DATASET, "model": model, "noise": noise, "apply": apply, "site": site, "seed": seed,
                        "evaluation": str(folder / "evaluations.json")}
                sweep_rows += _sweep_rows(base, found)
    for folder, arrays in groups.items():
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "predictions.npz", **arrays)
    paths = {"evaluations": root / "evaluations.csv", "sweeps": root / "sweeps.csv", "paper": root / "paper.csv"}
    pd.DataFrame(rows, columns=COLUMNS).sort_values("row_id", kind="stable").to_csv(paths["evaluations"], index=False)
    pd.DataFrame(sweep_rows, columns=SWEEP_COLUMNS).to_csv(paths["sweeps"], index=False)
    _paper(paths["paper"])
    return paths


def _sweep_rows(base: dict, a: dict) -> list[dict]:
    rows = []
    for order in ("class_pure", "shuffled", "class_mixed"):
        for k in SWEEP_KS:
            top1 = float((a[f"batch_size/{order}/k{k}/pred"] == LABELS).mean())
            pooled = float((a[f"pooling/batch_size/{order}/k{k}/pred"] == LABELS).mean())
            rows.append({**base, "experiment": "batch_size", "variant": "noise", "order": order, "batch_size": k,
                         "m": None, "top1": top1, "n": N})
            rows.append({**base, "experiment": "batch_size", "variant": "pooling_control", "order": order,
                         "batch_size": k, "m": None, "top1": pooled, "n": None})
    for m in range(1, BATCH + 1):
        rows.append({**base, "experiment": "purity", "variant": "noise", "order": "purity", "batch_size": BATCH, "m": m,
                     "top1": float(a[f"purity/m{m}/correct"].mean()), "n": N})
    for name in ("released", "shuffled", "class_pure", "class_mixed"):
        rows.append({**base, "experiment": "protocol", "variant": "pooling_control", "order": name, "batch_size": BATCH,
                     "m": None, "top1": float((a[f"pooling/{name}/pred"] == LABELS).mean()), "n": None})
    return rows


def _paper(path: Path) -> None:
    """The real paper table plus rows the synthetic data matches (timm names, dataset digits)."""
    paper = pd.read_csv(REPO / "config" / "paper_results.csv", dtype=str, keep_default_na=False)
    extra = []
    for claim, model, metric in (("synthetic_vit", "vit_tiny_patch16_224", "top1_percent"),
                                 ("synthetic_vit_top5", "vit_tiny_patch16_224", "top5_percent"),
                                 ("synthetic_resnet", "resnet18", "top1_percent"),
                                 ("synthetic_gain", "resnet18", "top1_gain_points")):
        row = {c: "" for c in paper.columns}
        row.update(claim_id=claim, model=model, dataset=DATASET, noise="linear-optimal", protocol="released",
                   metric=metric, value="50.0", source="test")
        extra.append(row)
    pd.concat([paper, pd.DataFrame(extra)]).to_csv(path, index=False)


_INPUTS: dict[str, dict] = {}
_REPORTS: set[tuple] = set()
# the inputs the tests share, by name: two models with sweeps; one model without sweeps; no evaluation at all
INPUTS = {"both_models": {}, "no_sweeps": {"sweeps": False, "models": ("vit",)}, "empty": {"models": ()}}


def shared_inputs(tmp_path_factory, name: str) -> dict[str, Path]:
    """The shared inputs ``name``, built once a session."""
    if name not in _INPUTS:
        root = tmp_path_factory.mktemp(name)
        _INPUTS[name] = {**build(root, **INPUTS[name]), "root": root}
    return _INPUTS[name]


def report_run(tmp_path_factory, name: str, only: str | None = "summary", out: str = "out") -> dict[str, Path]:
    """The shared inputs ``name`` and their report group ``only`` (None: every file) in ``root/out``, made once."""
    paths = {**shared_inputs(tmp_path_factory, name)}
    paths["out"] = paths["root"] / out
    if (name, only, out) not in _REPORTS:
        make_report(paths["evaluations"], paths["sweeps"], paths["paper"], paths["out"], DATASET, only=only)
        _REPORTS.add((name, only, out))
    return paths
