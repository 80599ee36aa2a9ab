"""The results of one dataset: the tidy evaluations, the per-image predictions, and their intervals.

No torch import here (nor ``noisynn.evaluate``): the report runs on a machine without a GPU stack.
Inputs: ``evaluations.csv`` and ``sweeps.csv`` (``noisynn aggregate``) and the ``predictions.npz`` each
row names. A *setting* is a noise, the moment it applies (``apply``) and a site; its evaluations differ
only by seed. The unit of dependence is the test batch when the protocol's noise mixes a batch (noise
applied, and impulse noise or a linear noise on the batch axis), else the image. A *change* pairs the
same images and seed: the setting under a protocol minus the vanilla model under ``clean``. *Batch
dependence* is the share of images predicted otherwise than by the same setting under ``batch1``.

One family, one error rate: the *primary* contrasts are the paper's claims, the released recipe
(``RELEASED_NOISE`` at evaluation only, default site) under ``PRIMARY_PROTOCOLS`` against the vanilla
model under ``clean``, for each model; their family-wise error is held at 5 % (Holm). Every other
tested change forms the second family, whose false discovery rate is held at 5 %
(Benjamini–Hochberg). A change that is zero by construction (see ``Results.identity``) is not tested.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from noisynn.errors import UserError
from noisynn.noise_batch import mixes_batch
from noisynn.report import stats
from noisynn.report.aggregate import COLUMNS, KEY, SWEEP_COLUMNS
from noisynn.vocab import (
    LINEAR_NOISE_KINDS,
    NOISE_KINDS,
    NOISY_PROTOCOLS,
    PROTOCOLS,
    RELEASED_NOISE,
    batch_size_stem,
    pooling_stem,
    purity_stem,
    setting_key,
)

CONFIDENCE = 0.95
PRIMARY_PROTOCOLS = ("released", "batch1", "shuffled", "class_mixed")
FAMILIES = {"primary": stats.PRIMARY_ADJUSTMENT, "other": stats.OTHER_ADJUSTMENT}  # family → its adjustment
BY_CONSTRUCTION = "zero by construction"
NO_DATA = "no data in this config"
# a Gaussian draw depends on an image's place in the random stream, not on the other images
RANDOM_DRAW_KINDS = ("gaussian",)
# reported_metric → the metric it reports, of top-1 or top-5 (the ViT code logs both as running means)
REPORTED = {"running": "released_metric_top", "plain": "top"}

_OPEN_FILES = 32
_NUMERIC = ("strength", "alpha", "seed", "batch_size", "value", "n", "mixed_axis_size", "theory_delta_S")
_BOOLEAN = ("noise_applied", "default_site")


def read_table(path: Path, what: str, columns, hint: str, numeric=(), dataset: str | None = None, required=()) -> pd.DataFrame:
    """A CSV as text (``numeric`` columns as numbers), checked for ``columns``; only ``dataset``'s rows if given."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{what} {path} cannot be read ({e}).") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{what} {path} lacks the column(s) {', '.join(missing)}; expected {hint}.")
    for c in numeric:
        df[c] = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
    df = df if dataset is None else df[df["dataset"].isin([dataset, ""])].copy()
    if any(df[c].isna().any() for c in required):
        raise UserError(f"{what} {path} has rows without a {' or a '.join(required)}.")
    if "seed" in required:
        df["seed"] = df["seed"].astype(int)
    return df.reset_index(drop=True)


def load_evaluations(path: Path, dataset: str) -> pd.DataFrame:
    """The tidy CSV with typed columns; rows of other datasets are dropped."""
    every = read_table(path, "evaluations table", COLUMNS, "the output of `noisynn aggregate`", _NUMERIC, None,
                       ("seed", "value"))
    df = every[every["dataset"].isin([dataset, ""])].reset_index(drop=True)
    if df.empty and not every.empty:
        # a report of nothing would look finished (an empty SUMMARY.md, metrics.json {}); a table without
        # any row (a config without evaluations) still gets its report, each section saying so
        held = ", ".join(repr(d) for d in sorted(set(every["dataset"])))
        raise UserError(f"evaluations table {path} holds no rows of dataset {dataset!r} (report --dataset); it "
                        f"holds {held}.")
    for c in _BOOLEAN:
        df[c] = df[c].str.lower().isin(["true", "1"])
    # the noise's gradient: false, true, or partner (vocab.DETACH)
    df["detach"] = [v if v == "partner" else v.lower() in ("true", "1") for v in df["detach"]]
    dup = df.duplicated(list(KEY))
    if dup.any():
        raise UserError(f"evaluations table {path} has more than one row for {df.loc[dup, list(KEY)].iloc[0].to_dict()}.")
    return df


def load_sweeps(path: Path, dataset: str) -> pd.DataFrame:
    """The batch-size, purity and pooling-control points, one row per seed; other datasets dropped."""
    return read_table(path, "sweeps table", SWEEP_COLUMNS, "the --sweeps-out table of `noisynn aggregate`",
                     ("seed", "batch_size", "m", "top1"), dataset, ("seed", "top1"))


def site_key(site: str) -> tuple:
    """Module order of a timm module name: numbers compared as numbers (blocks.2 < blocks.10)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", site) if p)


@dataclass(frozen=True)
class Setting:
    """One noise setting of one model at one site, as its evaluation records describe it."""

    model: str
    noise: str
    apply: str
    site: str
    kind: str
    strength: float = math.nan
    alpha: float = math.nan
    axis: str = ""
    neighbour: str = ""
    detach: bool | str = False
    default_site: bool = True

    @property
    def strength_x(self) -> float:
        """The number a strength sweep varies: Gaussian s, impulse p, shift alpha."""
        return self.alpha if self.kind == "linear-shift" else self.strength

    @property
    def key(self) -> tuple:
        """none, gaussian, impulse, linear-optimal, linear-shift; by strength; eval first; module order."""
        x = self.strength_x
        kind = NOISE_KINDS.index(self.kind) if self.kind in NOISE_KINDS else len(NOISE_KINDS)
        return self.model, kind, 0.0 if x != x else x, self.noise, self.apply != "eval", self.apply, site_key(self.site)

    @property
    def key4(self) -> tuple[str, str, str, str]:
        """(model, noise, apply, site): the setting's name in the evaluations table."""
        return self.model, self.noise, self.apply, self.site

    @property
    def family(self) -> str:
        """The line a strength sweep draws: the kind, axis and variant, whatever the strength."""
        return "_".join([self.kind, *([self.axis] if self.axis else []), *(["next"] if self.neighbour == "next" else []),
                         *({True: ["detach"], "partner": ["detach-partner"]}.get(self.detach, []))])

    def where(self, **more) -> str:
        """The filter on evaluations.csv that selects this setting's rows."""
        return ", ".join(f"{k}={v}" for k, v in dict(model=self.model, noise=self.noise, apply=self.apply,
                                                      site=self.site, **more).items())

    def mixes_batch(self, noise_applied: bool) -> bool:
        """Whether the setting's noise, when applied, makes a prediction depend on the rest of its test batch."""
        return bool(noise_applied) and mixes_batch({"kind": self.kind, "axis": self.axis})


# a paired change of top-1: its interval, its sign-flip test, and whether it is zero by construction (untested)
Change = NamedTuple("Change", [("interval", stats.Interval), ("test", stats.PairedTest), ("by_construction", bool)])
# a change's place among the verdicts: its family ("primary", "other", "" when untested), adjusted p, verdict word
Verdict = NamedTuple("Verdict", [("family", str), ("adjusted_pvalue", float), ("word", str)])


# --- the evaluations table, by setting ------------------------------------------------------------


class SettingTable:
    """What the evaluations table records of each setting: its values per seed under each protocol and
    metric, and per evaluation whether the noise was on, the theory's k and ΔS, the checkpoint and the
    predictions file."""

    def __init__(self, df: pd.DataFrame):
        self.df = df
        self.timm_names = dict(zip(df["model"], df["timm_name"]))
        self.reported_metrics = dict(zip(df["model"], df["reported_metric"]))
        self.preprocesses = dict(zip(df["model"], df["preprocess"]))  # timm, released, or "" (embedded data)
        self._cells: dict[tuple, dict[int, float]] = {}
        self._theory, self._applied, self._paths = {}, {}, {}
        self._checkpoints: dict[tuple, str] = {}
        cols = ["model", "noise", "apply", "site", "protocol", "metric", "seed", "value", "mixed_axis_size",
                "theory_delta_S", "noise_applied", "predictions", "checkpoint"]
        for m, n, a, s, p, metric, seed, v, k, ds, applied, path, ckpt in zip(*(df[c].tolist() for c in cols)):
            self._cells.setdefault((m, n, a, s, p, metric), {})[seed] = v
            self._applied[(m, n, a, s, p)] = applied
            self._checkpoints[(m, n, a, s, seed)] = ckpt
            if path:
                self._paths[(m, n, a, s, seed)] = path
            if metric == "top1":
                self._theory[(m, n, a, s, p)] = (None if k != k else int(k), math.nan if ds is None else ds)
        self.settings = _settings(df)
        self._by_name = {s.key4: s for s in self.settings}
        self.models = sorted(set(df["model"]))
        self.sites = {m: max((s.site for s in self.settings if s.model == m and s.default_site and s.site != "none"),
                             key=site_key, default="none") for m in self.models}

    def values(self, s: Setting, protocol: str, metric: str = "top1") -> dict[int, float]:
        return self._cells.get((*s.key4, protocol, metric), {})

    def theory(self, s: Setting, protocol: str) -> tuple:  # (k, theory ΔS); (None, nan) when not recorded
        return self._theory.get((*s.key4, protocol), (None, math.nan))

    def noise_applied(self, s: Setting, protocol: str) -> bool:
        return self._applied.get((*s.key4, protocol), False)

    def n_seeds(self, s: Setting) -> int:
        return len({seed for p in PROTOCOLS for seed in self.values(s, p)})

    def setting(self, model: str, noise: str, apply: str, site: str) -> Setting | None:
        return self._by_name.get((model, noise, apply, site))

    def vanilla(self, model: str) -> Setting | None:
        return next((s for s in self.settings if s.model == model and s.kind == "none"), None)

    def reported_metric(self, model: str, top: int = 1) -> str:
        """The metric the released code of this model's family reports under ``released`` (top-1 or top-5)."""
        return REPORTED.get(self.reported_metrics.get(model, "running"), "released_metric_top") + str(top)

    def at_default_site(self, kinds=None, apply=None) -> list[Setting]:
        """Settings at their model's default site (and the vanilla ones), optionally of some kinds/apply."""
        return [s for s in self.settings if (s.default_site or s.site == "none")
                and (kinds is None or s.kind in kinds) and (apply is None or s.apply == apply)]

    def released_recipe(self, model: str) -> Setting | None:
        return next((s for s in self.at_default_site(apply="eval") if s.model == model and s.noise == RELEASED_NOISE),
                    None)

    def layer_sweeps(self) -> list[list[Setting]]:
        """The settings evaluated at more than one site, each as its list of sites in module order."""
        groups: dict[tuple, list[Setting]] = {}
        for s in (s for s in self.settings if s.site != "none"):
            groups.setdefault((s.model, s.noise, s.apply), []).append(s)
        return sorted((sorted(g, key=lambda x: site_key(x.site)) for g in groups.values() if len(g) > 1),
                      key=lambda g: g[0].key)


def _settings(df: pd.DataFrame) -> list[Setting]:
    """Each setting of the table once, as its first row describes it, in ``Setting.key`` order."""
    first = df.drop_duplicates(["model", "noise", "apply", "site"])
    fields = ["model", "noise", "apply", "site", "noise_kind", "strength", "alpha", "axis", "neighbour", "detach",
              "default_site"]
    return sorted((Setting(*row[:9], row[9], bool(row[10])) for row in zip(*(first[c].tolist() for c in fields))),
                  key=lambda x: x.key)


# --- the per-image predictions ----------------------------------------------------------------------


class PredictionFiles:
    """The arrays of the predictions files the evaluations name, each file opened once (a few at a time)."""

    def __init__(self, paths: dict[tuple, str]):
        self._paths = paths  # (model, noise, apply, site, seed) → its group's predictions.npz
        self._open: dict[str, np.lib.npyio.NpzFile] = {}

    def array(self, s: Setting, seed: int, name: str) -> np.ndarray | None:
        """``labels``, or ``<name>`` under the setting's key, from its group's predictions; None if absent."""
        path = self._paths.get((*s.key4, seed))
        if not path:
            return None
        if path not in self._open:
            if len(self._open) >= _OPEN_FILES:  # a large grid has more groups than a process may hold files open
                self._open.pop(next(iter(self._open))).close()
            try:
                self._open[path] = np.load(path)
            except (OSError, ValueError) as e:
                raise UserError(f"predictions file {path} (named in evaluations.csv) cannot be read as .npz ({e}); "
                                "the report runs from the workflow's root, where those paths start.") from None
        key = name if name == "labels" else f"{setting_key(s.noise, s.apply, s.site)}/{name}"
        return self._open[path][key] if key in self._open[path] else None


# --- what the predictions say: intervals, changes, verdicts, batch dependence, sweeps ---------------


def _memo(method):  # caches a method's results on its instance: a report computes each interval once
    @functools.wraps(method)
    def cached(self, *args, **kwargs):
        key = (method.__name__, args, tuple(sorted(kwargs.items())))
        if key not in self._memo:
            self._memo[key] = method(self, *args, **kwargs)
        return self._memo[key]
    return cached


class Results(SettingTable):
    """The evaluations by setting, protocol and metric (values per seed), with the intervals, changes,
    verdicts and batch dependence their per-image predictions give (each computed once)."""

    def __init__(self, df: pd.DataFrame, sweeps: pd.DataFrame | None = None):
        super().__init__(df)
        self.sweep_df = pd.DataFrame(columns=SWEEP_COLUMNS) if sweeps is None else sweeps
        self.predictions = PredictionFiles(self._paths)
        self._memo: dict[tuple, object] = {}

    def outcomes(self, s: Setting, protocol: str) -> dict[int, tuple]:
        """Per seed with predictions: (correct, units, pred, labels) of the setting under the protocol."""
        out, mixes = {}, s.mixes_batch(self.noise_applied(s, protocol))
        for seed in sorted(self.values(s, protocol)):
            labels, pred = self.predictions.array(s, seed, "labels"), self.predictions.array(s, seed, f"{protocol}/pred")
            if labels is None or pred is None:
                continue
            if pred.shape != labels.shape:
                raise UserError(f"predictions of {s.where(seed=seed, protocol=protocol)} hold {pred.size} images, "
                                f"their labels {labels.size}.")
            batch = self.predictions.array(s, seed, f"{protocol}/batch") if mixes else None
            out[seed] = (pred == labels, stats.units(batch, labels.size, mixes), pred, labels)
        return out

    @_memo
    def accuracy(self, s: Setting, protocol: str) -> stats.Interval | None:
        o = list(self.outcomes(s, protocol).values())
        return stats.accuracy_interval([x[0] for x in o], [x[1] for x in o], CONFIDENCE) if o else None

    def unit(self, s: Setting, protocol: str) -> str:
        """The unit of dependence of the setting under ``protocol``: ``batch`` or ``image``."""
        return "batch" if s.mixes_batch(self.noise_applied(s, protocol)) else "image"

    def identity(self, s: Setting, protocol: str, own: bool = False) -> bool:
        """The setting is its reference by construction under ``protocol``: the same checkpoint in every seed (``own``,
        or the vanilla model's, as the evaluations record it) with the noise off, or a batch-axis linear noise at
        batch size 1."""
        v = self.vanilla(s.model)
        if not own and (v is None or any(self._checkpoints.get((*v.key4, seed)) != self._checkpoints[(*s.key4, seed)]
                                         for seed in self.values(s, protocol))):
            return False
        applied, k = self.noise_applied(s, protocol), self.theory(s, protocol)[0]
        return not applied or (s.kind in LINEAR_NOISE_KINDS and s.axis == "batch" and k == 1)

    @_memo
    def change(self, s: Setting, protocol: str, own: bool = False) -> Change | None:
        """The setting under ``protocol`` minus the vanilla model under ``clean`` (``own``: minus itself under clean)."""
        ref = s if own else self.vanilla(s.model)
        if ref is None:
            return None
        mine, theirs = self.outcomes(s, protocol), self.outcomes(ref, "clean")
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            return None
        for seed in seeds:
            if not np.array_equal(mine[seed][3], theirs[seed][3]):
                raise UserError(f"the predictions of {s.where(seed=seed)} and of {ref.where(seed=seed)} hold different "
                                "test images (their labels differ); both must come from the same test set.")
        a, b, u = [mine[x][0] for x in seeds], [theirs[x][0] for x in seeds], [mine[x][1] for x in seeds]
        identity = self.identity(s, protocol, own)
        iv = stats.change_interval(a, b, u, CONFIDENCE, identity=identity)
        return Change(iv, stats.sign_flip_test(a, b, u), identity and iv.low == iv.high == 0)

    def primary(self, s: Setting, protocol: str) -> bool:
        """One of the paper's claims: the released recipe under a primary protocol (against the vanilla model)."""
        return protocol in PRIMARY_PROTOCOLS and s == self.released_recipe(s.model)

    def tested_changes(self) -> list[tuple[Setting, str]]:
        """Every (noise setting, protocol) with a change against the vanilla model, in table order."""
        return [(s, p) for s in self.settings if s.kind != "none" for p in PROTOCOLS
                if self.values(s, p) and self.change(s, p) is not None]

    @_memo
    def verdicts(self) -> dict[tuple, Verdict]:
        """Per (setting, protocol) tested against the vanilla model: the family, the adjusted p-value and the verdict word (see the module's doc)."""
        return family_verdicts({(s, p): (self.change(s, p), self.primary(s, p)) for s, p in self.tested_changes()})

    def verdict(self, s: Setting, protocol: str) -> Verdict | None:
        return self.verdicts().get((s, protocol))

    @_memo
    def batch_dependence(self, s: Setting, protocol: str) -> float | None:
        """Share of images predicted otherwise than under ``batch1``; None where the noise is on in one only."""
        if self.noise_applied(s, protocol) != self.noise_applied(s, "batch1"):
            return None
        mine, one = self.outcomes(s, protocol), self.outcomes(s, "batch1")
        seeds = sorted(set(mine) & set(one))
        return stats.batch_dependence([mine[x][2] for x in seeds], [one[x][2] for x in seeds]) if seeds else None

    def is_transductive(self, s: Setting, protocol: str | None = None) -> bool | None:
        """share > 0 under the protocol (any noisy protocol if None), unless the noise is a random draw."""
        shares = [x for x in (self.batch_dependence(s, p) for p in ([protocol] if protocol else NOISY_PROTOCOLS))
                  if x is not None]
        return None if not shares else stats.is_transductive(max(shares)) and s.kind not in RANDOM_DRAW_KINDS

    @_memo
    def sweep_points(self) -> pd.DataFrame:
        """Each sweep point: mean top-1 over seeds, its interval where the predictions allow, n_seeds."""
        keys, rows = ["model", "noise", "apply", "site", "experiment", "variant", "order", "batch_size", "m"], []
        for key, g in self.sweep_df.groupby(keys, sort=True, dropna=False):
            point = dict(zip(keys, key))
            iv = self._sweep_interval(point, sorted(g["seed"]))
            rows.append({**point, "value": float(g["top1"].mean()), "ci_low": iv.low if iv else math.nan,
                         "ci_high": iv.high if iv else math.nan, "n_seeds": int(g["seed"].nunique())})
        return pd.DataFrame(rows, columns=[*keys, "value", "ci_low", "ci_high", "n_seeds"])

    def _sweep_interval(self, p: dict, seeds: list[int]) -> stats.Interval | None:
        stem = _sweep_stem(p)
        s = self.setting(p["model"], p["noise"], p["apply"], p["site"])
        names = ("labels", f"{stem}/batch", f"{stem}/correct", f"{stem}/pred")
        arrays = [[self.predictions.array(s, seed, n) for n in names] for seed in seeds] if s and stem else []
        if not arrays or any(a[0] is None or a[1] is None or (a[2] is None and a[3] is None) for a in arrays):
            return None
        mixes = p["variant"] == "pooling_control" or s.mixes_batch(True)  # pooling mixes a batch by construction
        return stats.accuracy_interval([a[2].astype(bool) if a[2] is not None else a[3] == a[0] for a in arrays],
                                       [stats.units(a[1], a[0].size, mixes) for a in arrays], CONFIDENCE)


def family_verdicts(tested: dict[tuple, tuple[Change, bool]]) -> dict[tuple, Verdict]:
    """The verdict of each tested change (key → (change, whether primary)): a change zero by construction
    is untested; the primary ones are adjusted together by Holm, the others by Benjamini–Hochberg."""
    out, families = {}, {"primary": [], "other": []}
    for key, (change, primary) in tested.items():
        if change.by_construction:
            out[key] = Verdict("", math.nan, BY_CONSTRUCTION)
        else:
            families["primary" if primary else "other"].append(key)
    for family, keys in families.items():
        pvalues = [tested[key][0].test.pvalue for key in keys]
        adjusted = stats.holm(pvalues) if family == "primary" else stats.benjamini_hochberg(pvalues)
        for key, q in zip(keys, adjusted, strict=True):
            out[key] = Verdict(family, float(q), stats.verdict(tested[key][0].interval.estimate, q))
    return out


def _sweep_stem(p: dict) -> str | None:
    """Where a sweep point's arrays lie in its predictions file; None for the pooled batch-size sweep,
    which keeps no batch index (no unit of dependence), so has no interval."""
    stem = {("batch_size", "noise"): lambda: batch_size_stem(p["order"], p["batch_size"]),
            ("purity", "noise"): lambda: purity_stem(p["m"]),
            ("protocol", "pooling_control"): lambda: pooling_stem(p["order"])}.get((p["experiment"], p["variant"]))
    return stem() if stem else None
