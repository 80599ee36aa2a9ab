"""Every table of the report, and its writers: CSV, Markdown and LaTeX booktabs.

No torch import here (nor ``noisynn.evaluate``). A table is a DataFrame of text cells (its CSV is the
same text), except the machine-read ones: ``cells.csv`` (``noisynn compare`` reads it) and the CSV of
``changes``, which hold fractions. Shown accuracies are top-1 in percent with the 95 %
interval in brackets, ``81.2 [79.0, 83.4]``; a changed accuracy is in percentage points, signed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from noisynn.entropy import delta_entropy_optimal
from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path, atomic_write_text
from noisynn.orders import SWEEP_ORDERS
from noisynn.report import stats
from noisynn.report.compare import CELLS_COLUMNS, seeds_text
from noisynn.report.results import FAMILIES, NO_DATA, Results, Setting, read_table
from noisynn.vocab import ADDITIVE_NOISE_KINDS, NOISE_KINDS, NOISY_PROTOCOLS, PROTOCOLS

NOT_RUN = "not run at this scale"
POOLING_PROTOCOLS = ("released", "shuffled", "class_pure", "class_mixed")
PAPER_COLUMNS = ["claim_id", "model", "dataset", "resolution", "noise", "protocol", "metric", "value", "source"]
PAPER_REQUIRED = ("claim_id", "dataset", "protocol", "metric", "value", "source")  # a claim may name no model
SETTING = ["model", "noise", "apply", "site"]
CHANGES_COLUMNS = [*SETTING, "protocol", "change", "ci_low", "ci_high", "mde", "n_seeds", "n_units", "unit",
                   "improved", "worsened", "test", "pvalue", "family", "adjustment", "adjusted_pvalue", "verdict",
                   "batch_dependence", "transductive"]


def load_paper(path: Path) -> pd.DataFrame:
    """The paper's numbers (config/paper_results.csv), refused when cut short: a file that does not
    end with a line break, or a row without one of PAPER_REQUIRED or with a value that is no number."""
    paper = read_table(Path(path), "paper results", PAPER_COLUMNS, "the columns of config/paper_results.csv")
    if not Path(path).read_bytes().endswith(b"\n"):
        raise UserError(f"paper results {path} does not end with a line break: the file was cut short; restore it "
                        "(git checkout config/paper_results.csv).")
    value = pd.to_numeric(paper["value"], errors="coerce")
    for i, row in paper.iterrows():
        empty = [c for c in PAPER_REQUIRED if pd.isna(row[c]) or not str(row[c]).strip()]
        if empty or not math.isfinite(value[i]):
            why = f"no {empty[0]}" if empty else f"value {row['value']!r}, not a number"
            raise UserError(f"paper results {path}: line {i + 2} has {why}; the file is cut short or damaged.")
    return paper


def seed_mean(values: dict[int, float]) -> float:
    """The mean over seeds of a value per seed (NaN without seeds)."""
    return float(np.mean(list(values.values()))) if values else math.nan


def pct(x: float, sign: bool = False, decimals: int = 1) -> str:
    return "" if x != x else f"{x * 100 + 0.0:+.{decimals}f}" if sign else f"{x * 100 + 0.0:.{decimals}f}"


def interval_text(estimate: float, low: float, high: float, sign: bool = False, decimals: int = 1) -> str:
    """``estimate [low, high]`` in percent (points when ``sign``); the estimate alone without bounds."""
    bounds = "" if low != low else f" [{pct(low, sign, decimals)}, {pct(high, sign, decimals)}]"
    return pct(estimate, sign, decimals) + bounds


def accuracy_text(r: Results, s: Setting, protocol: str) -> str:
    """Top-1 with its interval; the mean over seeds alone when the predictions are missing."""
    iv = r.accuracy(s, protocol)
    return interval_text(iv.estimate, iv.low, iv.high) if iv else pct(seed_mean(r.values(s, protocol)))


def transductive_text(r: Results, s: Setting) -> tuple[str, str]:
    """(largest share of images changed from batch1, in percent; yes / no / no (random draw))."""
    shares = [x for x in (r.batch_dependence(s, p) for p in NOISY_PROTOCOLS) if x is not None]
    if not shares:
        return "", ""
    return f"{100 * max(shares):.1f} %", "yes" if r.is_transductive(s) else "no (random draw)" if max(shares) else "no"


def protocol_cells(r: Results, s: Setting, protocols=PROTOCOLS) -> dict[str, str]:
    return {p: accuracy_text(r, s, p) for p in protocols}


def audit_table(r: Results) -> pd.DataFrame:
    """Top-1 of every setting at the default site under each protocol, and whether it is transductive."""
    rows = [[s.model, s.noise, s.apply, s.site, *protocol_cells(r, s).values(), *transductive_text(r, s), r.n_seeds(s)]
            for s in r.at_default_site()]
    return pd.DataFrame(rows, columns=[*SETTING, *PROTOCOLS, "batch dependence", "transductive", "n_seeds"])


def strength_settings(r: Results) -> list[Setting]:
    return r.at_default_site(kinds=("gaussian", "impulse", "linear-shift"), apply="eval")


def strength_table(r: Results) -> pd.DataFrame:
    """Top-1 against noise strength (Gaussian s, impulse p, shift alpha), noise at eval only."""
    rows = [{"model": s.model, "family": s.family, "parameter": {"gaussian": "s", "impulse": "p"}.get(s.kind, "alpha"),
             "value": f"{s.strength_x:g}", "noise": s.noise, "site": s.site, **protocol_cells(r, s),
             "n_seeds": r.n_seeds(s)} for s in strength_settings(r)]
    return pd.DataFrame(rows, columns=["model", "family", "parameter", "value", "noise", "site", *PROTOCOLS, "n_seeds"])


def layers_table(r: Results) -> pd.DataFrame:
    """Top-1 of the layer-sweep setting at each injection site, in module order."""
    rows = [[s.model, s.noise, s.apply, s.site, *protocol_cells(r, s).values(), r.n_seeds(s)]
            for sweep in r.layer_sweeps() for s in sweep]
    return pd.DataFrame(rows, columns=[*SETTING, *PROTOCOLS, "n_seeds"])


def _fmt_delta_s(kind: str, value: float) -> str:
    if value != value:
        return ""
    if kind in ADDITIVE_NOISE_KINDS:
        return f"<= {value:g} (bound)"
    if math.isinf(value):
        return "+inf (I+Q singular)" if value > 0 else "-inf"
    return f"{value + 0.0:.4g}"  # + 0.0 turns -0.0 (the shift at k = 1) into 0


def entropy_points(r: Results) -> list[dict]:
    """Per (setting, noisy protocol) at the default site: k, theory ΔS, and the change vs its own clean."""
    return [{"setting": s, "protocol": p, "k": r.theory(s, p)[0], "theory_delta_S": r.theory(s, p)[1],
             "change": r.change(s, p, True)}
            for s in r.at_default_site(kinds=NOISE_KINDS[1:]) for p in NOISY_PROTOCOLS if r.values(s, p)]


def entropy_table(r: Results) -> pd.DataFrame:
    """Per setting and k: the theory's ΔS and the change of top-1 (pp) vs the same checkpoint's clean."""
    cols = [f"Δtop1 {p} (pp)" for p in NOISY_PROTOCOLS]
    rows: dict[tuple, dict] = {}
    for pt in entropy_points(r):
        s, k, ch = pt["setting"], pt["k"], pt["change"]
        row = rows.setdefault((s.key, -1 if k is None else k), {
            "model": s.model, "noise": s.noise, "apply": s.apply, "k": "" if k is None else k,
            "theory ΔS": _fmt_delta_s(s.kind, pt["theory_delta_S"]), **{c: "" for c in cols}})
        row[f"Δtop1 {pt['protocol']} (pp)"] = "" if ch is None else interval_text(
            ch.interval.estimate, ch.interval.low, ch.interval.high, sign=True)
    return pd.DataFrame([rows[key] for key in sorted(rows)], columns=["model", "noise", "apply", "k", "theory ΔS", *cols])


_PAPER_METRICS = {"top1_percent": "top1", "top5_percent": "top5", "top1_gain_points": "top1"}


def paper_lookup(r: Results, row: dict, dataset: str) -> tuple[str, str, int, str] | None:
    """Ours for one paper row: (value, interval, n_seeds, filter) in percent (points for gains); None if none.

    Match: model == timm_name without its weight tag, dataset, noise kind, protocol (paper ``unknown`` → our
    ``released``, noise ``none`` → ``clean``); under ``released`` with the metric the model's released code reports
    (top-1 or top-5). Preferred among several settings of that kind: the released code's preprocessing (the
    paper's numbers were made with it), apply eval, the batch axis, alpha 0.3.
    """
    if not row["model"] or not row["noise"] or row["metric"] not in _PAPER_METRICS or row["dataset"] != dataset:
        return None
    protocol = "clean" if row["noise"] == "none" else (row["protocol"] if row["protocol"] in PROTOCOLS else "released")
    candidates = [s for s in r.at_default_site(kinds=(row["noise"],))
                  if r.timm_names.get(s.model, "").split(".")[0] == row["model"]]
    metric = _PAPER_METRICS[row["metric"]]
    if candidates and protocol == "released":
        metric = r.reported_metric(candidates[0].model, top=5 if metric == "top5" else 1)
    candidates = [s for s in candidates if r.values(s, protocol, metric)]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: (r.preprocesses.get(s.model) != "released", s.apply != "eval", s.axis != "batch",
                                          0.0 if s.alpha != s.alpha else abs(s.alpha - 0.3), s.key))
    where = best.where(protocol=protocol, metric=metric)
    values, iv = r.values(best, protocol, metric), r.accuracy(best, protocol) if metric == "top1" else None
    if row["metric"] == "top1_gain_points":
        v = r.vanilla(best.model)
        vanilla = r.values(v, "clean", metric) if v is not None else {}
        values = {seed: x - vanilla[seed] for seed, x in values.items() if seed in vanilla}
        ch = r.change(best, protocol) if metric == "top1" else None
        iv = None if ch is None else ch.interval
        where += f" minus model={best.model}, noise=none, protocol=clean, metric={metric} (paired by seed)"
    mean, n = seed_mean(values), len(values)
    return pct(mean, decimals=2), "" if iv is None else f"[{pct(iv.low, decimals=2)}, {pct(iv.high, decimals=2)}]", n, where


def paper_vs_ours_table(r: Results, paper: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Every paper number with ours beside it (mean over seeds and its 95 % interval), or ``not run at this scale``."""
    rows = [[*(row[c] for c in PAPER_COLUMNS[:-1]), *(paper_lookup(r, row, dataset) or (NOT_RUN, "", "", "")),
             row["source"]] for row in paper.to_dict("records")]
    return pd.DataFrame(rows, columns=[*PAPER_COLUMNS[:7], "paper", "ours", "ours_ci95", "ours_n_seeds", "ours_filter",
                                       "source"])


def cells_table(r: Results) -> pd.DataFrame:
    """Per setting and protocol: top-1 (mean over seeds) with its interval and seeds; the table `noisynn compare` reads."""
    rows = [[s.model, s.noise, s.apply, s.site, p, "top1", seed_mean(r.values(s, p)), iv.low, iv.high, iv.n_seeds,
             iv.n_units, seeds_text(r.values(s, p))]
            for s in r.settings for p in PROTOCOLS if (iv := r.accuracy(s, p)) is not None]
    return pd.DataFrame(rows, columns=CELLS_COLUMNS)


def changes_table(r: Results) -> pd.DataFrame:
    """Per noisy setting and protocol: the change vs the vanilla model, its test, family, adjusted p and verdict.

    ``mde``: the smallest change the test could detect (80 % power at 5 %, the seeds' models as given); ``improved`` /
    ``worsened``: images (over seeds) the setting alone / the reference alone gets right; ``adjusted_pvalue``:
    the test's p-value adjusted within its family (``adjustment``), which the verdict follows.
    """
    rows = []
    for s, p in ((s, p) for s in r.settings if s.kind != "none" for p in PROTOCOLS if r.values(s, p)):
        ch, share, v = r.change(s, p), r.batch_dependence(s, p), r.verdict(s, p)
        if ch is None:
            numbers = [math.nan] * 4 + [0, 0, "", "", "", "", math.nan, "", "", math.nan, "no data"]
        else:
            iv, t = ch.interval, ch.test
            tested = not ch.by_construction
            numbers = [iv.estimate, iv.low, iv.high, iv.mde if tested else math.nan, iv.n_seeds, iv.n_units,
                       r.unit(s, p), t.b, t.c, stats.TEST_NAME if tested else "", t.pvalue if tested else math.nan,
                       v.family, FAMILIES.get(v.family, ""), v.adjusted_pvalue, v.word]
        rows.append([s.model, s.noise, s.apply, s.site, p, *numbers, math.nan if share is None else share,
                     "" if share is None else bool(r.is_transductive(s, p))])
    return pd.DataFrame(rows, columns=CHANGES_COLUMNS)


def _p_text(p: float) -> str:
    """Two significant digits; below 1e-12 the exact test's FFT rounding, so only the bound."""
    return "" if p != p else "< 1e-12" if p < 1e-12 else f"{p:.2g}"


def changes_display(changes: pd.DataFrame) -> pd.DataFrame:
    """The changes table as text: percentage points with the interval and MDE, p to 2 significant digits."""
    out = changes[["model", "noise", "apply", "site", "protocol"]].copy()
    out["Δtop1 (pp) [95 % CI]"] = [interval_text(c, lo, hi, sign=True) for c, lo, hi in
                                   zip(changes["change"], changes["ci_low"], changes["ci_high"])]
    out["MDE (pp)"] = [pct(x) for x in changes["mde"]]
    out["improved / worsened"] = [f"{b} / {c}" if b != "" else "" for b, c in zip(changes["improved"],
                                                                                 changes["worsened"])]
    out["units"] = [f"{n} {'batches' if u == 'batch' else 'images'}" if u else "" for n, u in zip(changes["n_units"],
                                                                                                changes["unit"])]
    out["sign-flip p"] = [_p_text(p) for p in changes["pvalue"]]
    out["adjusted p"] = [f"{_p_text(q)} ({a})" if a else "" for q, a in zip(changes["adjusted_pvalue"],
                                                                           changes["adjustment"])]
    out["verdict"] = changes["verdict"]
    out["batch dependence"] = ["" if x != x else f"{100 * x:.1f} %" for x in changes["batch_dependence"]]
    out["transductive"] = ["" if t == "" else "yes" if t else "no" for t in changes["transductive"]]
    return out


def _where(pts: pd.DataFrame, **where) -> pd.DataFrame:
    for k, v in where.items():
        pts = pts[pts[k] == v]
    return pts


def _point_text(pts: pd.DataFrame, **where) -> str:
    pts = _where(pts, **where)
    return "" if pts.empty else interval_text(*pts[["value", "ci_low", "ci_high"]].iloc[0])


def _n_seeds(pts: pd.DataFrame, **where) -> int:
    pts = _where(pts, **where)
    return int(pts["n_seeds"].max()) if len(pts) else 0


def _sweep_rows(r: Results, experiment: str, variant: str | None = None):
    """(setting's four keys, that setting's points) per sweep setting of ``experiment``."""
    pts = r.sweep_points()
    pts = pts[(pts["experiment"] == experiment) & ((pts["variant"] == variant) if variant else True)]
    return pts.groupby(["model", "noise", "apply", "site"], sort=True)


def batch_size_table(r: Results) -> pd.DataFrame:
    """Top-1 against the test batch size k per order: the noise, the pooling control, and ΔS*(k)."""
    rows = [[*key, order, int(k), _point_text(g, order=order, batch_size=k, variant="noise"),
             _point_text(g, order=order, batch_size=k, variant="pooling_control"), f"{delta_entropy_optimal(int(k)):.4g}",
             _n_seeds(g, order=order, batch_size=k)]
            for key, g in _sweep_rows(r, "batch_size") for order in SWEEP_ORDERS
            for k in sorted(set(g.loc[g["order"] == order, "batch_size"]))]
    return pd.DataFrame(rows, columns=[*SETTING, "order", "k", "noise top-1", "pooling control top-1", "theory ΔS*(k)",
                                       "n_seeds"])


def purity_table(r: Results) -> pd.DataFrame:
    """Top-1 of the m images of one class in a batch, against m (the rest of the batch: other classes)."""
    rows = [[*key, int(m), int(g.loc[g["m"] == m, "batch_size"].iloc[0]), _point_text(g, m=m, variant="noise"),
             _point_text(g, m=m, variant="pooling_control"), _n_seeds(g, m=m)]
            for key, g in _sweep_rows(r, "purity") for m in sorted(set(g["m"]))]
    return pd.DataFrame(rows, columns=[*SETTING, "m", "batch size", "noise top-1", "pooling control top-1", "n_seeds"])


def pooling_control_table(r: Results) -> pd.DataFrame:
    """The noise-free control (each image takes its batch's mean logits) beside the noise, per protocol."""
    rows = []
    for key, g in _sweep_rows(r, "protocol", "pooling_control"):
        s, v = r.setting(*key), r.vanilla(key[0])
        rows += [[*key, p, _point_text(g, order=p), "" if s is None else accuracy_text(r, s, p),
                  "" if v is None else accuracy_text(r, v, "clean"), _n_seeds(g, order=p)]
                 for p in POOLING_PROTOCOLS]
    return pd.DataFrame(rows, columns=[*SETTING, "protocol", "pooling control top-1", "noise top-1",
                                       "vanilla clean top-1", "n_seeds"])


# --- writers -------------------------------------------------------------------------------------

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
    lines += [" & ".join(tex_escape(v) for v in rec) + r" \\" for rec in table.itertuples(index=False, name=None)]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    text = table.to_markdown(index=False, disable_numparse=True) + "\n"
    return text + f"\n_{NO_DATA}._\n" if table.empty else text


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def write_table(table: pd.DataFrame, stem: Path, display: pd.DataFrame | None = None) -> None:
    """``stem``.csv (header only when empty) of ``table``; ``stem``.md and ``stem``.tex of ``display`` (or it)."""
    shown = table if display is None else display
    write_csv(table, stem.with_suffix(".csv"))
    atomic_write_text(stem.with_suffix(".md"), to_markdown(shown))
    atomic_write_text(stem.with_suffix(".tex"), to_booktabs(shown))


TABLES = {"audit": audit_table, "strength": strength_table, "layers": layers_table, "entropy": entropy_table,
          "changes": changes_table, "batch_size": batch_size_table, "purity": purity_table,
          "pooling_control": pooling_control_table}  # and paper_vs_ours, which needs the paper's table
