"""Figures, tables, SUMMARY.md and metrics.json from the tidy evaluations CSV (PAPER.md §5-6).

Input: ``results/<dataset>/evaluations.csv`` (``noisynn aggregate``), one row per checkpoint ×
protocol × metric, and ``config/paper_results.csv``. Output, under ``out_dir``, always the same
set of files (a section without data still gets its figure, saying so, and its table header):

    figures/{audit,strength,layers,entropy}.{png,pdf}
    tables/{audit,strength,layers,entropy,paper_vs_ours}.{csv,md,tex}
    SUMMARY.md, metrics.json

Definitions used throughout:

* a *setting* is a noise token with the moment it applies (``apply``: eval | train+eval) at a site;
* a model's *default site* is where its settings evaluated at one site only were injected (every
  setting but the layer sweep's); a model with no such setting takes its last site in module
  order, where the released recipe injects. Settings evaluated at several sites form the sweep;
* accuracies are top-1 in percent, mean ± sample standard deviation (n - 1) over seeds;
* a *change* is paired by seed: a setting's accuracy minus a reference of the same seed. The
  entropy section subtracts the same checkpoint's ``clean`` protocol; the claims of SUMMARY.md
  subtract the vanilla model (noise none, protocol clean), the paper's baseline.

Everything is written atomically and without timestamps, so the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noisynn.errors import UserError
from noisynn.evaluate import PROTOCOLS
from noisynn.io import atomic_path, atomic_write_json, atomic_write_text

NOISY_PROTOCOLS = PROTOCOLS[1:]
STRENGTH_PROTOCOLS = ("clean", "released", "shuffled", "batch1")
KIND_ORDER = ("none", "gaussian", "impulse", "linear-optimal", "linear-shift")
LINEAR_KINDS = ("linear-optimal", "linear-shift")
ADDITIVE_KINDS = ("gaussian", "impulse")
RELEASED_NOISE = "linear-optimal_batch"  # the released recipe: optimal Q over the batch, at eval only
FIGURES = ("audit", "strength", "layers", "entropy")
TABLES = ("audit", "strength", "layers", "entropy", "paper_vs_ours")
NO_DATA = "no data in this config"
NOT_RUN = "not run at this scale"

_NUMERIC_COLUMNS = ("strength", "alpha", "seed", "value", "mixed_axis_size", "theory_delta_S")
_PROTOCOL_COLORS = {"clean": "#4d4d4d", "released": "#d62728", "shuffled": "#1f77b4", "batch1": "#2ca02c",
                    "class_pure": "#ff7f0e", "class_mixed": "#9467bd"}
_KIND_MARKERS = {"gaussian": "^", "impulse": "v", "linear-optimal": "o", "linear-shift": "s"}
_RC = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": 100, "savefig.dpi": 130,
       "pdf.fonttype": 42}


def make_figures(evaluations_csv: Path, paper_csv: Path, out_dir: Path, dataset: str) -> None:
    """Write every figure, table, SUMMARY.md and metrics.json of one dataset's evaluations."""
    import matplotlib

    matplotlib.use("Agg")

    evaluations_csv, paper_csv, out_dir = Path(evaluations_csv), Path(paper_csv), Path(out_dir)
    r = Results(load_evaluations(evaluations_csv, dataset))
    paper = load_paper(paper_csv)

    tables = {
        "audit": audit_table(r),
        "strength": strength_table(r),
        "layers": layers_table(r),
        "entropy": entropy_table(r),
        "paper_vs_ours": paper_vs_ours_table(r, paper, dataset),
    }
    for name, table in tables.items():
        write_table(table, out_dir / "tables" / name)

    with matplotlib.rc_context(rc=_RC):
        for name, draw in (("audit", audit_figure), ("strength", strength_figure), ("layers", layers_figure),
                           ("entropy", entropy_figure)):
            _save_figure(draw(r, dataset), out_dir / "figures" / name)

    atomic_write_text(out_dir / "SUMMARY.md", summary_markdown(r, tables, dataset, evaluations_csv, paper_csv))
    atomic_write_json(out_dir / "metrics.json", headline_metrics(r))


# --- input ---------------------------------------------------------------------------------------


def load_evaluations(path: Path, dataset: str) -> pd.DataFrame:
    """The tidy CSV with typed columns; rows of other datasets are dropped."""
    from noisynn.report import COLUMNS

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"evaluations table {path} cannot be read ({e}).") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"evaluations table {path} lacks the columns {', '.join(missing)}; "
                        "expected the output of `noisynn aggregate`.")
    for c in _NUMERIC_COLUMNS:
        df[c] = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
    df = df[df["dataset"].isin([dataset, ""])].copy()
    if df["seed"].isna().any() or df["value"].isna().any():
        raise UserError(f"evaluations table {path} has rows without a seed or a value.")
    df["seed"] = df["seed"].astype(int)
    key = ["model", "noise", "apply", "site", "seed", "protocol", "metric"]
    dup = df.duplicated(key)
    if dup.any():
        first = df.loc[dup, key].iloc[0].to_dict()
        raise UserError(f"evaluations table {path} has more than one row for {first}.")
    return df.reset_index(drop=True)


def load_paper(path: Path) -> pd.DataFrame:
    try:
        paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"paper results {path} cannot be read ({e}).") from None
    needed = ["claim_id", "model", "dataset", "resolution", "noise", "protocol", "metric", "value", "source"]
    missing = [c for c in needed if c not in paper.columns]
    if missing:
        raise UserError(f"paper results {path} lacks the columns {', '.join(missing)}.")
    return paper


# --- orderings, settings and the default site -----------------------------------------------------------


def site_key(site: str) -> tuple:
    """Module order of a timm module name: numbers compared as numbers (blocks.2 < blocks.10)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", site) if p)


def setting_key(noise: str, apply: str) -> tuple:
    """none, gaussian, impulse, linear-optimal, linear-shift; by strength; eval before train+eval."""
    kind = noise.split("_")[0]
    number = re.search(r"_[spa]([-+0-9.e]+)", noise)
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),
            float(number.group(1)) if number else 0.0, noise, apply != "eval", apply)


def default_sites(df: pd.DataFrame) -> dict[str, str]:
    """Per model, the site of its settings evaluated at one site only (see the module docstring).

    Ties (several such sites equally often) and models with only sweep settings take the last site
    in module order.
    """
    sites = {}
    for model, g in df[df["site"] != "none"].groupby("model", sort=True):
        per_setting = g.groupby(["noise", "apply"])["site"].unique()
        single = [s[0] for s in per_setting if len(s) == 1]
        if single:
            counts = pd.Series(single).value_counts()
            sites[model] = max(counts[counts == counts.max()].index, key=site_key)
        else:
            sites[model] = max(g["site"].unique(), key=site_key)
    return sites


@dataclass(frozen=True)
class Setting:
    """One noise setting of one model at one site (its checkpoints differ only by seed)."""

    model: str
    noise: str
    apply: str
    site: str
    kind: str
    strength: float
    alpha: float
    axis: str

    @property
    def key(self) -> tuple:
        return self.model, setting_key(self.noise, self.apply), site_key(self.site)

    @property
    def strength_x(self) -> float:
        """The strength a sweep varies: Gaussian s, impulse p, shift alpha."""
        return self.alpha if self.kind == "linear-shift" else self.strength

    @property
    def family(self) -> str:
        """The noise token with its strength replaced by ``*``: the line a strength sweep draws."""
        return re.sub(r"_([spa])[-+0-9.e]+", r"_\1*", self.noise, count=1)

    def where(self, **more) -> str:
        """The filter on evaluations.csv that selects this setting's rows."""
        items = dict(model=self.model, noise=self.noise, apply=self.apply, site=self.site, **more)
        return ", ".join(f"{k}={v}" for k, v in items.items())


class Results:
    """The evaluations table indexed by setting, protocol and metric, with values per seed."""

    def __init__(self, df: pd.DataFrame):
        self.df = df
        self.sites = default_sites(df)
        self.timm_names = dict(zip(df["model"], df["timm_name"]))
        self._cells: dict[tuple, dict[int, float]] = {}
        self._theory: dict[tuple, tuple] = {}
        cols = ["model", "noise", "apply", "site", "protocol", "metric", "seed", "value", "mixed_axis_size",
                "theory_delta_S"]
        for m, n, a, s, p, metric, seed, v, k, ds in zip(*(df[c].tolist() for c in cols)):
            self._cells.setdefault((m, n, a, s, p, metric), {})[seed] = v
            if metric == "top1":
                self._theory[(m, n, a, s, p)] = (None if k != k else int(k), ds)
        first = df.drop_duplicates(["model", "noise", "apply", "site"])
        self.settings = sorted(
            (Setting(m, n, a, s, kind, st, al, ax) for m, n, a, s, kind, st, al, ax in zip(
                *(first[c].tolist() for c in ["model", "noise", "apply", "site", "noise_kind", "strength", "alpha",
                                              "axis"]))),
            key=lambda x: x.key)
        self.models = sorted(set(df["model"]))

    def values(self, s: Setting, protocol: str, metric: str = "top1") -> dict[int, float]:
        return self._cells.get((s.model, s.noise, s.apply, s.site, protocol, metric), {})

    def theory(self, s: Setting, protocol: str) -> tuple:
        """(k, theory ΔS) of a setting under a protocol; (None, nan) when not recorded."""
        k, ds = self._theory.get((s.model, s.noise, s.apply, s.site, protocol), (None, math.nan))
        return k, (math.nan if ds is None else ds)

    def n_seeds(self, s: Setting) -> int:
        return len({seed for p in PROTOCOLS for seed in self.values(s, p)})

    def vanilla(self, model: str) -> Setting | None:
        """The model without noise (noise none)."""
        return next((s for s in self.settings if s.model == model and s.kind == "none"), None)

    def vanilla_values(self, model: str, metric: str = "top1") -> dict[int, float]:
        v = self.vanilla(model)
        return {} if v is None else self.values(v, "clean", metric)

    def at_default_site(self, kinds=None, apply=None) -> list[Setting]:
        """Settings at their model's default site (and the vanilla ones), optionally of some kinds/apply."""
        return [s for s in self.settings
                if (s.site == "none" or s.site == self.sites.get(s.model))
                and (kinds is None or s.kind in kinds) and (apply is None or s.apply == apply)]

    def sweeps(self) -> list[list[Setting]]:
        """The settings evaluated at more than one site, each as its list of sites in module order."""
        groups: dict[tuple, list[Setting]] = {}
        for s in self.settings:
            if s.site != "none":
                groups.setdefault((s.model, s.noise, s.apply), []).append(s)
        out = [sorted(g, key=lambda x: site_key(x.site)) for g in groups.values() if len(g) > 1]
        return sorted(out, key=lambda g: g[0].key)


# --- statistics ---------------------------------------------------------------------------------------


def seed_stats(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; NaN for one seed) and the number of seeds."""
    v = np.asarray(list(values.values()) if isinstance(values, dict) else values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def fmt_mean_std(mean: float, std: float, decimals: int = 1, scale: float = 100.0, sign: bool = False) -> str:
    """``mean ± std`` in percent; the mean alone when the spread is undefined; empty without data."""
    if mean != mean:
        return ""
    m = f"{mean * scale:+.{decimals}f}" if sign else f"{mean * scale:.{decimals}f}"
    return m if std != std else f"{m} ± {std * scale:.{decimals}f}"


def paired_change(values: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """Per seed, a value minus the reference of the same seed (seeds present in both)."""
    return {seed: v - reference[seed] for seed, v in sorted(values.items()) if seed in reference}


def verdict(mean: float, std: float) -> str:
    """raised / lowered when the mean change lies beyond one seed standard deviation, else unchanged."""
    if mean != mean:
        return "no data"
    if std != std:
        return "n/a (one seed)"
    if mean > std:
        return "raised"
    if mean < -std:
        return "lowered"
    return "unchanged"


# --- tables ------------------------------------------------------------------------------------------


def _protocol_cells(r: Results, s: Setting, protocols=PROTOCOLS, metric: str = "top1") -> dict[str, str]:
    return {p: fmt_mean_std(*seed_stats(r.values(s, p, metric))[:2]) for p in protocols}


def audit_table(r: Results) -> pd.DataFrame:
    """Top-1 of every setting at the default site under each protocol (rows model × noise × apply)."""
    rows = [{"model": s.model, "noise": s.noise, "apply": s.apply, "site": s.site, **_protocol_cells(r, s),
             "n_seeds": r.n_seeds(s)} for s in r.at_default_site()]
    return pd.DataFrame(rows, columns=["model", "noise", "apply", "site", *PROTOCOLS, "n_seeds"])


def _strength_settings(r: Results) -> list[Setting]:
    return r.at_default_site(kinds=("gaussian", "impulse", "linear-shift"), apply="eval")


def strength_table(r: Results) -> pd.DataFrame:
    """Top-1 against noise strength (Gaussian s, impulse p, shift alpha), noise at eval only."""
    rows = [{"model": s.model, "family": s.family,
             "parameter": {"gaussian": "s", "impulse": "p"}.get(s.kind, "alpha"), "value": f"{s.strength_x:g}",
             "noise": s.noise, "site": s.site, **_protocol_cells(r, s), "n_seeds": r.n_seeds(s)}
            for s in _strength_settings(r)]
    return pd.DataFrame(rows, columns=["model", "family", "parameter", "value", "noise", "site", *PROTOCOLS,
                                       "n_seeds"])


def layers_table(r: Results) -> pd.DataFrame:
    """Top-1 of the layer-sweep setting at each injection site, in module order."""
    rows = [{"model": s.model, "noise": s.noise, "apply": s.apply, "site": s.site, **_protocol_cells(r, s),
             "n_seeds": r.n_seeds(s)} for sweep in r.sweeps() for s in sweep]
    return pd.DataFrame(rows, columns=["model", "noise", "apply", "site", *PROTOCOLS, "n_seeds"])


def entropy_points(r: Results) -> list[dict]:
    """Per (setting, noisy protocol): k, theory ΔS, and the change vs the same checkpoint's clean."""
    points = []
    for s in r.at_default_site(kinds=(*ADDITIVE_KINDS, *LINEAR_KINDS)):
        clean = r.values(s, "clean")
        for p in NOISY_PROTOCOLS:
            values = r.values(s, p)
            if not values:
                continue
            k, ds = r.theory(s, p)
            mean, std, n = seed_stats(paired_change(values, clean))
            points.append({"setting": s, "protocol": p, "k": k, "theory_delta_S": ds, "mean": mean, "std": std,
                           "n_seeds": n})
    return points


def _fmt_delta_s(kind: str, value: float) -> str:
    if value != value:
        return ""
    if kind in ADDITIVE_KINDS:
        return f"<= {value:g} (bound)"
    if math.isinf(value):
        return "+inf (I+Q singular)" if value > 0 else "-inf"
    return f"{value + 0.0:.4g}"  # + 0.0 turns -0.0 (the shift at k = 1) into 0


def entropy_table(r: Results) -> pd.DataFrame:
    """Per setting and k: the theory's ΔS and the change of top-1 (pp) vs the same checkpoint's clean.

    A protocol's column is filled on the row of the k it runs at (batch1 has k = 1 on the batch axis).
    """
    cols = [f"Δtop1 {p} (pp)" for p in NOISY_PROTOCOLS]
    rows: dict[tuple, dict] = {}
    for pt in entropy_points(r):
        s, k = pt["setting"], pt["k"]
        row = rows.setdefault((s.key, -1 if k is None else k), {
            "model": s.model, "noise": s.noise, "apply": s.apply, "k": "" if k is None else k,
            "theory ΔS": _fmt_delta_s(s.kind, pt["theory_delta_S"]), **{c: "" for c in cols}})
        row[f"Δtop1 {pt['protocol']} (pp)"] = fmt_mean_std(pt["mean"], pt["std"], sign=True)
    return pd.DataFrame([rows[key] for key in sorted(rows)], columns=["model", "noise", "apply", "k", "theory ΔS",
                                                                       *cols])


_PAPER_METRICS = {"top1_percent": "top1", "top5_percent": "top5", "top1_gain_points": "top1"}


def paper_lookup(r: Results, row: dict, dataset: str) -> tuple[dict[int, float], str] | None:
    """Our values (per seed, fractions) for one paper row, and the filter that gives them; None if none.

    Match: model == timm_name, dataset, noise kind, protocol (an ``unknown`` paper protocol is read
    as our ``released``, the official code's evaluation; noise ``none`` as ``clean``). The paper's
    ``released`` top-1 is the released metric, so it is compared with ``released_metric_top1``.
    Among several of our settings of that kind: apply eval, the batch axis, alpha 0.3 come first.
    """
    if not row["model"] or not row["noise"] or row["metric"] not in _PAPER_METRICS or row["dataset"] != dataset:
        return None
    protocol = "clean" if row["noise"] == "none" else (row["protocol"] if row["protocol"] in PROTOCOLS else "released")
    metric = _PAPER_METRICS[row["metric"]]
    if protocol == "released" and metric == "top1":
        metric = "released_metric_top1"
    candidates = [s for s in r.at_default_site(kinds=(row["noise"],))
                  if r.timm_names.get(s.model) == row["model"] and r.values(s, protocol, metric)]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: (s.apply != "eval", s.axis != "batch",
                                          0.0 if s.alpha != s.alpha else abs(s.alpha - 0.3), s.key))
    values = r.values(best, protocol, metric)
    where = best.where(protocol=protocol, metric=metric)
    if row["metric"] == "top1_gain_points":
        values = paired_change(values, r.vanilla_values(best.model, metric))
        where += f" minus model={best.model}, noise=none, protocol=clean, metric={metric} (paired by seed)"
    return values, where


def paper_vs_ours_table(r: Results, paper: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Every paper number with ours beside it (percent or points, 2 decimals), or ``not run at this scale``."""
    rows = []
    for row in paper.to_dict("records"):
        out = {c: row[c] for c in ["claim_id", "model", "dataset", "resolution", "noise", "protocol", "metric"]}
        out["paper"] = row["value"]
        found = paper_lookup(r, row, dataset)
        if found is None:
            out.update(ours=NOT_RUN, ours_n_seeds="", ours_filter="")
        else:
            values, where = found
            mean, std, n = seed_stats(values)
            out.update(ours=fmt_mean_std(mean, std, decimals=2), ours_n_seeds=n, ours_filter=where)
        out["source"] = row["source"]
        rows.append(out)
    return pd.DataFrame(rows, columns=["claim_id", "model", "dataset", "resolution", "noise", "protocol", "metric",
                                       "paper", "ours", "ours_n_seeds", "ours_filter", "source"])


# --- writing tables ------------------------------------------------------------------------------------


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$", "Δ": r"$\Delta$", "<=": r"$\leq$", "≤": r"$\leq$", "–": "--", "→": r"$\to$",
                "∞": r"$\infty$", "×": r"$\times$", "−": "-", "|": r"\textbar{}"}
_TEX_PATTERN = re.compile("|".join(re.escape(k) for k in sorted(_TEX_ESCAPES, key=len, reverse=True)))


def tex_escape(text) -> str:
    return _TEX_PATTERN.sub(lambda m: _TEX_ESCAPES[m.group(0)], str(text))


def to_booktabs(table: pd.DataFrame) -> str:
    """A booktabs ``tabular`` of the table (every cell as text); a note row when it has no rows."""
    cols = list(table.columns)
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
             " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    if table.empty:
        lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{{NO_DATA}}} \\")
    for rec in table.itertuples(index=False, name=None):
        lines.append(" & ".join(tex_escape(v) for v in rec) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    text = table.to_markdown(index=False, disable_numparse=True) + "\n"
    return text + f"\n_{NO_DATA}._\n" if table.empty else text


def write_table(table: pd.DataFrame, stem: Path) -> None:
    """``stem``.csv (header only when empty), ``stem``.md and ``stem``.tex."""
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    atomic_write_text(stem.with_suffix(".md"), to_markdown(table))
    atomic_write_text(stem.with_suffix(".tex"), to_booktabs(table))


# --- figures -------------------------------------------------------------------------------------------


def _save_figure(fig, stem: Path) -> None:
    """PNG and PDF, without timestamps or software stamps, each written atomically."""
    for fmt, meta in (("png", {"Software": None}),
                      ("pdf", {"CreationDate": None, "Creator": None, "Producer": None})):
        with atomic_path(stem.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _no_data_figure(title: str):
    fig = _figure(6.0, 2.0)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", fontsize=11, transform=ax.transAxes)
    return fig


def _figure_legend(fig, axes) -> None:
    """One legend for the figure, right of the panels, from the first panel that has lines."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right upper")
            return


def _vanilla_line(ax, r: Results, model: str) -> None:
    mean, _, n = seed_stats(r.vanilla_values(model))
    if n:
        ax.axhline(mean * 100, color="black", linestyle="--", linewidth=1, label="vanilla (noise none, clean)")


def _protocol_lines(ax, r: Results, xs, settings: list[Setting], protocols) -> None:
    """One line per protocol across ``settings`` (one per x): mean over seeds, a band of ± one std."""
    for p in protocols:
        stats = [seed_stats(r.values(s, p)) for s in settings]
        m = np.array([st[0] for st in stats]) * 100
        sd = np.nan_to_num(np.array([st[1] for st in stats])) * 100
        if np.all(np.isnan(m)):
            continue
        color = _PROTOCOL_COLORS[p]
        ax.errorbar(xs, m, yerr=sd, marker="o", markersize=3, color=color, label=p, capsize=2, elinewidth=0.6,
                    linestyle=":" if p == "clean" else "-")
        ax.fill_between(xs, m - sd, m + sd, color=color, alpha=0.12, linewidth=0)


def audit_figure(r: Results, dataset: str):
    """Grouped bars: each setting's top-1 under the six protocols, one panel per model."""
    title = f"{dataset}: top-1 of every noise setting at the default site, under each protocol"
    settings = r.at_default_site()
    models = sorted({s.model for s in settings})
    if not models:
        return _no_data_figure(title)
    fig = _figure(12.0, 3.6 * len(models) + 0.6)
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    width = 0.8 / len(PROTOCOLS)
    for ax, model in zip(axes, models):
        ms = [s for s in settings if s.model == model]
        x = np.arange(len(ms))
        for i, p in enumerate(PROTOCOLS):
            stats = [seed_stats(r.values(s, p)) for s in ms]
            mean = np.array([st[0] for st in stats]) * 100
            sd = np.nan_to_num(np.array([st[1] for st in stats])) * 100
            ax.bar(x + (i - (len(PROTOCOLS) - 1) / 2) * width, mean, width, yerr=sd, color=_PROTOCOL_COLORS[p],
                   label=p, error_kw={"linewidth": 0.6, "capsize": 1.0})
        _vanilla_line(ax, r, model)
        ax.set_xticks(x, [f"{s.noise} ({s.apply})" for s in ms], rotation=30, ha="right", fontsize=6)
        ax.set_xlim(-0.6, len(ms) - 0.4)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 102)
        ax.set_title(f"{model} (default site {r.sites.get(model, 'none')}); mean ± std over seeds")
        ax.grid(axis="y", linewidth=0.3)
    fig.suptitle(title)
    fig.legend(*axes[0].get_legend_handles_labels(), ncol=7, loc="outside lower center")
    return fig


def strength_figure(r: Results, dataset: str):
    """Top-1 against strength, one panel per model × noise family, noise at eval only."""
    title = f"{dataset}: top-1 against noise strength (noise at eval only, default site)"
    settings = _strength_settings(r)
    if not settings:
        return _no_data_figure(title)
    models = sorted({s.model for s in settings})
    families = sorted({s.family for s in settings}, key=lambda f: setting_key(f, "eval"))
    fig = _figure(3.4 * len(families) + 0.4, 2.8 * len(models) + 0.6)
    axes = fig.subplots(len(models), len(families), squeeze=False)
    for i, model in enumerate(models):
        for j, family in enumerate(families):
            ax = axes[i, j]
            fs = sorted((s for s in settings if s.model == model and s.family == family), key=lambda s: s.strength_x)
            ax.set_title(f"{model}: {family}")
            if not fs:
                ax.set_axis_off()
                ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes)
                continue
            _protocol_lines(ax, r, [s.strength_x for s in fs], fs, STRENGTH_PROTOCOLS)
            _vanilla_line(ax, r, model)
            ax.set_xlabel({"gaussian": "strength s", "impulse": "probability p"}.get(fs[0].kind, "alpha"))
            ax.set_ylabel("top-1 (%)")
            ax.grid(linewidth=0.3)
    fig.suptitle(title)
    _figure_legend(fig, axes.flat)
    return fig


def layers_figure(r: Results, dataset: str):
    """Top-1 of the sweep setting against the injection site (module order), one panel per model."""
    title = f"{dataset}: top-1 against the injection site (layer sweep)"
    sweeps = r.sweeps()
    if not sweeps:
        return _no_data_figure(title)
    fig = _figure(4.2 * len(sweeps) + 0.4, 3.4)
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, sweep in zip(axes, sweeps):
        xs = np.arange(len(sweep))
        _protocol_lines(ax, r, xs, sweep, PROTOCOLS)
        _vanilla_line(ax, r, sweep[0].model)
        ax.set_xticks(xs, [s.site for s in sweep], rotation=30, ha="right")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{sweep[0].model}: {sweep[0].noise} ({sweep[0].apply})")
        ax.grid(linewidth=0.3)
    fig.suptitle(title)
    _figure_legend(fig, axes)
    return fig


def entropy_figure(r: Results, dataset: str):
    """Measured change of top-1 (vs the same checkpoint's clean) against the theory's ΔS, per model."""
    from matplotlib.lines import Line2D

    title = f"{dataset}: change of top-1 vs the same checkpoint's clean, against the theory's ΔS"
    points = [pt for pt in entropy_points(r) if pt["theory_delta_S"] == pt["theory_delta_S"]]
    if not points:
        return _no_data_figure(title)
    finite = [pt["theory_delta_S"] for pt in points if math.isfinite(pt["theory_delta_S"])]
    edge = 10 ** (math.ceil(math.log10(max([1.0, *finite]))) + 1)  # where +inf is drawn
    models = sorted({pt["setting"].model for pt in points})
    fig = _figure(5.0 * len(models) + 0.4, 4.0)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        mp = [pt for pt in points if pt["setting"].model == model]
        for pt in mp:
            s, ds = pt["setting"], pt["theory_delta_S"]
            infinite = math.isinf(ds)
            hollow = s.kind in ADDITIVE_KINDS  # ΔS there is an upper bound, not a value
            color = _PROTOCOL_COLORS[pt["protocol"]]
            ax.errorbar(edge if infinite else ds, pt["mean"] * 100,
                        yerr=0.0 if pt["std"] != pt["std"] else pt["std"] * 100,
                        fmt=">" if infinite else _KIND_MARKERS[s.kind], color=color,
                        markerfacecolor="none" if hollow else color, markersize=5, linewidth=0.6,
                        alpha=0.85 if s.apply == "eval" else 0.45)
        if any(math.isinf(pt["theory_delta_S"]) for pt in mp):
            ax.axvline(edge, color="grey", linewidth=0.5, linestyle=":")
            ax.annotate("ΔS = +∞\n(I+Q singular)", (edge, 1.0), xycoords=("data", "axes fraction"),
                        ha="right", va="top", fontsize=6)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(-0.5, edge * 2)
        ticks = [0.0] + [10.0**i for i in range(round(math.log10(edge)))]
        labels = ["0"] + [f"$10^{{{i}}}$" for i in range(len(ticks) - 1)]
        ax.set_xticks([*ticks, edge], [*labels, "+∞"])
        ax.set_xlabel("theory ΔS (nats, symlog)")
        ax.set_ylabel("Δ top-1 vs same checkpoint's clean (pp)")
        ax.set_title(f"{model} (default site; faded: noise also in training)")
        ax.grid(linewidth=0.3)
    handles = [Line2D([], [], color=_PROTOCOL_COLORS[p], marker="o", linestyle="", label=p) for p in NOISY_PROTOCOLS]
    for kind, marker in _KIND_MARKERS.items():
        bound = kind in ADDITIVE_KINDS
        handles.append(Line2D([], [], color="black", marker=marker, linestyle="",
                              markerfacecolor="none" if bound else "black",
                              label=kind + (" (ΔS ≤ 0 bound)" if bound else "")))
    handles.append(Line2D([], [], color="black", marker=">", linestyle="", label="ΔS = +∞"))
    fig.suptitle(title)
    fig.legend(handles=handles, loc="outside right upper")
    return fig


# --- SUMMARY.md and metrics.json ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _unique(df: pd.DataFrame, column: str) -> str:
    vals = sorted({str(v) for v in df[column] if str(v) != ""})
    return ", ".join(f"`{v}`" for v in vals) if vals else "(none recorded)"


def claims_table(r: Results, kinds: tuple[str, ...]) -> pd.DataFrame:
    """Per setting of ``kinds`` at the default site: the change vs vanilla under each protocol, with a verdict."""
    rows = []
    for s in r.at_default_site(kinds=kinds):
        reference = r.vanilla_values(s.model)
        row = {"model": s.model, "noise": s.noise, "apply": s.apply}
        for p in PROTOCOLS:
            values = r.values(s, p)
            mean, std, n = seed_stats(paired_change(values, reference))
            if not reference:
                row[p] = "no data (no vanilla evaluation)"
            elif not values:
                row[p] = "no data"
            elif not n:
                row[p] = "no data (no seed shared with the vanilla evaluation)"
            else:
                row[p] = f"{fmt_mean_std(mean, std, sign=True)} {verdict(mean, std)}"
        row["filter (protocol = column)"] = (f"`{s.where(metric='top1')}` minus "
                                             f"`model={s.model}, noise=none, protocol=clean, metric=top1`, "
                                             "paired by seed")
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "noise", "apply", *PROTOCOLS, "filter (protocol = column)"])


def _released_recipe(r: Results, model: str) -> Setting | None:
    return next((s for s in r.at_default_site(apply="eval") if s.model == model and s.noise == RELEASED_NOISE),
                None)


def headline_table(r: Results) -> pd.DataFrame:
    """The released recipe (optimal Q over the batch, at eval only) and the vanilla model, per model."""
    rows = []
    for model in r.models:
        for s in (r.vanilla(model), _released_recipe(r, model)):
            if s is None:
                continue
            released_metric = fmt_mean_std(*seed_stats(r.values(s, "released", "released_metric_top1"))[:2])
            rows.append({"model": model, "noise": s.noise, "apply": s.apply, "site": s.site, **_protocol_cells(r, s),
                         "released (released metric)": released_metric, "n_seeds": r.n_seeds(s)})
    return pd.DataFrame(rows, columns=["model", "noise", "apply", "site", *PROTOCOLS, "released (released metric)",
                                       "n_seeds"])


def summary_markdown(r: Results, tables: dict[str, pd.DataFrame], dataset: str, evaluations_csv: Path,
                     paper_csv: Path) -> str:
    df = r.df
    seeds = ", ".join(str(s) for s in sorted(set(df["seed"]))) or "(none)"
    site_text = ", ".join(f"{m}: `{s}`" for m, s in sorted(r.sites.items())) or "(none)"
    timm_text = ", ".join(f"{m} = `{t}`" for m, t in sorted(r.timm_names.items())) or "(none)"
    matched = int((tables["paper_vs_ours"]["ours"] != NOT_RUN).sum())
    lines = [
        f"# NoisyNN audit: {dataset}",
        "",
        "Generated by `noisynn figures` from the evaluations table; every number below can be recomputed "
        "from it with the filter printed beside it. Accuracies are top-1 in percent, mean ± sample standard "
        "deviation (n - 1) over seeds.",
        "",
        "## Provenance",
        "",
        f"- evaluations table: `{evaluations_csv}` (sha256 `{_sha256(evaluations_csv)}`), "
        f"{len(df)} rows from {df['evaluation'].nunique()} evaluations",
        f"- paper numbers: `{paper_csv}` (sha256 `{_sha256(paper_csv)}`)",
        f"- git commit(s) of the evaluations: {_unique(df, 'git_commit')}",
        f"- versions: noisynn {_unique(df, 'noisynn')}; torch {_unique(df, 'torch')}; timm {_unique(df, 'timm')}",
        f"- models (timm): {timm_text}",
        f"- seeds: {seeds}",
        f"- data fingerprint(s): {_unique(df, 'data_fingerprint')}",
        f"- default injection site per model: {site_text}. A model's default site is the site of its settings "
        "evaluated at one site only (every setting except the layer sweep); a model without such a setting takes "
        "its last site in module order, where the released recipe injects.",
        "",
        "## The released recipe",
        "",
        f"Noise `{RELEASED_NOISE}` (optimal Q mixing the samples of a test batch) applied at evaluation only, at "
        "the default site, beside the vanilla model (noise `none`). Protocols: `clean` noise off; `released` "
        "class-sorted test batches, as the official code; `shuffled` the same batch size in a seeded random "
        "order; `batch1` batch size 1; `class_pure` / `class_mixed` batches of one class / of distinct classes, "
        "same batch size. The column `released (released metric)` is the number the official code reports: the "
        "mean over batches of the running accuracy. Filter: `model=<model>, noise=<noise>, apply=eval, "
        "site=<site>, protocol=<column>, metric=top1` (`protocol=released, metric=released_metric_top1` for the "
        "released-metric column).",
        "",
        to_markdown(headline_table(r)).rstrip("\n"),
        "",
        "## Which claims held under which protocol",
        "",
        "Each cell is a change of top-1 in percentage points: per seed, the setting's top-1 under the column's "
        "protocol minus the same seed's vanilla top-1 (`noise=none, protocol=clean`); then the mean ± sample "
        "standard deviation of those per-seed changes. Verdict: `raised` when the mean change is larger than "
        "one standard deviation, `lowered` when it is smaller than minus one standard deviation, `unchanged` "
        "otherwise (|mean| ≤ std); `n/a (one seed)` when only one seed exists, so no spread can be measured. "
        "The filter column names the rows of the evaluations table behind each cell, with `protocol` set to "
        "the cell's column. For `apply=eval` the setting's checkpoint is the vanilla one, so its `clean` "
        "column is zero by construction; for `apply=train+eval` the `clean` column is the effect of the noisy "
        "fine-tuning alone.",
        "",
        "At batch size 1 (`batch1`) a batch-axis linear noise is the identity by construction (k = 1: the "
        "optimal Q gives x' = (x + x)/2 = x, the shift gives (1 - a)·x + a·x = x), so under `batch1` a "
        "batch-axis setting with `apply=eval` is the vanilla model, up to floating-point rounding.",
        "",
        "### Claim: linear-transform (positive) noise raises accuracy",
        "",
        to_markdown(claims_table(r, LINEAR_KINDS)).rstrip("\n"),
        "",
        "### Claim: Gaussian and impulse noise lower accuracy",
        "",
        to_markdown(claims_table(r, ADDITIVE_KINDS)).rstrip("\n"),
        "",
        "## Files",
        "",
        "- `figures/audit`: every setting at the default site under each protocol (table `tables/audit`).",
        "- `figures/strength`: top-1 against noise strength (table `tables/strength`).",
        "- `figures/layers`: top-1 against the injection site (table `tables/layers`).",
        "- `figures/entropy`: change of top-1 against the theory's ΔS; there the reference is the same "
        "checkpoint's `clean` protocol, not the vanilla model (table `tables/entropy`).",
        f"- `tables/paper_vs_ours`: each number of the paper table beside ours, or `{NOT_RUN}`; "
        f"{matched} of {len(tables['paper_vs_ours'])} paper numbers have a counterpart here.",
        "- `metrics.json`: the headline numbers as fractions (means over seeds).",
        "",
    ]
    return "\n".join(lines)


def headline_metrics(r: Results) -> dict:
    """Per model: vanilla clean top-1 and the released recipe under each protocol (means over seeds)."""

    def mean(values: dict) -> float | None:
        m, _, n = seed_stats(values)
        return round(m, 4) if n else None

    keys = [("released_top1", "released", "top1"), ("released_metric_top1", "released", "released_metric_top1")]
    keys += [(f"{p}_top1", p, "top1") for p in ("shuffled", "batch1", "class_pure", "class_mixed")]
    out = {}
    for model in r.models:
        entry = {}
        clean = mean(r.vanilla_values(model))
        if clean is not None:
            entry["clean_top1"] = clean
        recipe_setting = _released_recipe(r, model)
        if recipe_setting is not None:
            recipe = {key: mean(r.values(recipe_setting, p, metric)) for key, p, metric in keys}
            recipe = {k: v for k, v in recipe.items() if v is not None}
            if recipe:
                entry["released_recipe"] = recipe
        if entry:
            out[model] = entry
    return out
