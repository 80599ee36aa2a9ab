"""Every figure of the report, drawn with matplotlib (Agg) and written as PNG and PDF without timestamps.

No torch import here (nor ``noisynn.evaluate``); matplotlib is imported only when a figure is drawn.
Error bars and bands are the 95 % intervals of ``noisynn.report.results`` (the mean over seeds
alone where a setting has no per-image predictions). A figure without data says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from noisynn.entropy import delta_entropy_optimal
from noisynn.io.atomic import atomic_path
from noisynn.orders import SWEEP_ORDERS
from noisynn.report.results import NO_DATA, Results, Setting
from noisynn.report.tables import entropy_points, seed_mean, strength_settings
from noisynn.vocab import ADDITIVE_NOISE_KINDS, NOISY_PROTOCOLS, PROTOCOLS, RELEASED_NOISE

STRENGTH_PROTOCOLS = ("clean", "released", "shuffled", "batch1")
_COLORS = {"clean": "#4d4d4d", "released": "#d62728", "shuffled": "#1f77b4", "batch1": "#2ca02c",
           "class_pure": "#ff7f0e", "class_mixed": "#9467bd"}
_KIND_MARKERS = {"gaussian": "^", "impulse": "v", "linear-optimal": "o", "linear-shift": "s"}
_RC = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": 100, "savefig.dpi": 130,
       "pdf.fonttype": 42, "axes.grid": True, "grid.linewidth": 0.3}


def write_figure(name: str, r: Results, dataset: str, out_dir: Path) -> None:
    """Draw figure ``name`` and write ``out_dir``/figures/``name``.{png,pdf}."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(rc=_RC):
        fig = DRAW[name](r, dataset)
        for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Creator": None, "Producer": None})):
            with atomic_path(Path(out_dir) / "figures" / f"{name}.{fmt}") as tmp:
                fig.savefig(tmp, format=fmt, metadata=meta)


def _say_no_data(ax, title: str = "") -> None:
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", fontsize=11, transform=ax.transAxes)


def _panels(title: str, n_rows: int, n_cols: int, width: float, height: float):
    """A titled figure of n_rows × n_cols panels of width × height inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols + 0.4, height * n_rows + 0.6), layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _no_data_figure(title: str):
    fig, axes = _panels(title, 1, 1, 5.6, 1.4)
    _say_no_data(axes[0, 0])
    return fig


def _legend(fig, axes, twin=None, **kw) -> None:
    """One legend for the figure, from the first panel that has lines (and a twin axis's lines)."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            more = ([], []) if twin is None else twin.get_legend_handles_labels()
            fig.legend(handles + more[0], labels + more[1], **({"loc": "outside right upper"} | kw))
            return


def _accuracy(r: Results, settings: list[Setting], protocol: str) -> tuple[np.ndarray, ...]:
    """Top-1 (%) per setting, its interval's bounds (NaN without predictions), and the error bars they give."""
    out = [(iv.estimate, iv.low, iv.high) if (iv := r.accuracy(s, protocol)) else (seed_mean(r.values(s, protocol)),
                                                                                   math.nan, math.nan) for s in settings]
    y, low, high = (np.array(col, dtype=float) * 100 for col in zip(*out))
    return y, low, high, np.nan_to_num(np.vstack([y - low, high - y]), nan=0.0)


def _vanilla(ax, r: Results, model: str) -> None:
    """The vanilla model's clean top-1: a dashed line, its interval a grey band."""
    v = r.vanilla(model)
    if v is None or not r.values(v, "clean"):
        return
    y, low, high, _ = (a[..., 0] for a in _accuracy(r, [v], "clean"))
    if low == low:
        ax.axhspan(low, high, color="grey", alpha=0.15, linewidth=0)
    ax.axhline(y, color="black", linestyle="--", linewidth=1, label="vanilla (noise none, clean)")


def _protocol_lines(ax, r: Results, xs, settings: list[Setting], protocols) -> None:
    for p in protocols:
        y, low, high, yerr = _accuracy(r, settings, p)
        if np.all(np.isnan(y)):
            continue
        ax.errorbar(xs, y, yerr=yerr, marker="o", markersize=3, color=_COLORS[p], label=p, capsize=2,
                    elinewidth=0.6, linestyle=":" if p == "clean" else "-")
        ax.fill_between(xs, low, high, color=_COLORS[p], alpha=0.12, linewidth=0)


def audit_figure(r: Results, dataset: str):
    """Grouped bars: each setting's top-1 under the six protocols, one panel per model."""
    title = f"{dataset}: top-1 of every noise setting at the default site, under each protocol (95 % intervals)"
    settings = r.at_default_site()
    models = sorted({s.model for s in settings})
    if not models:
        return _no_data_figure(title)
    fig, axes = _panels(title, len(models), 1, 12.0, 3.6)
    width = 0.8 / len(PROTOCOLS)
    for ax, model in zip(axes[:, 0], models, strict=True):
        ms = [s for s in settings if s.model == model]
        x = np.arange(len(ms))
        for i, p in enumerate(PROTOCOLS):
            y, _, _, yerr = _accuracy(r, ms, p)
            ax.bar(x + (i - (len(PROTOCOLS) - 1) / 2) * width, y, width, yerr=yerr, color=_COLORS[p],
                   label=p, error_kw={"linewidth": 0.6, "capsize": 1.0})
        _vanilla(ax, r, model)
        ax.set_xticks(x, [f"{s.noise} ({s.apply})" for s in ms], rotation=30, ha="right", fontsize=6)
        ax.set(xlim=(-0.6, len(ms) - 0.4), ylim=(0, 102), ylabel="top-1 (%)",
               title=f"{model} (default site {r.sites.get(model, 'none')})")
        ax.grid(axis="x", visible=False)
    _legend(fig, axes[:1, 0], ncol=8, loc="outside lower center")
    return fig


def strength_figure(r: Results, dataset: str):
    """Top-1 against strength, one panel per model × noise family, noise at eval only."""
    title = f"{dataset}: top-1 against noise strength (noise at eval only, default site)"
    settings = strength_settings(r)
    if not settings:
        return _no_data_figure(title)
    models = sorted({s.model for s in settings})
    families = sorted({s.family for s in settings}, key=lambda f: min(s.key[1:] for s in settings if s.family == f))
    fig, axes = _panels(title, len(models), len(families), 3.4, 2.8)
    for (i, model), (j, family) in ((a, b) for a in enumerate(models) for b in enumerate(families)):
        ax, fs = axes[i, j], sorted((s for s in settings if s.model == model and s.family == family),
                                    key=lambda s: s.strength_x)
        if not fs:
            _say_no_data(ax, f"{model}: {family}")
            continue
        _protocol_lines(ax, r, [s.strength_x for s in fs], fs, STRENGTH_PROTOCOLS)
        _vanilla(ax, r, model)
        ax.set(title=f"{model}: {family}", ylabel="top-1 (%)",
               xlabel={"gaussian": "strength s", "impulse": "probability p"}.get(fs[0].kind, "alpha"))
    _legend(fig, axes.flat)
    return fig


def layers_figure(r: Results, dataset: str):
    """Top-1 of the sweep setting against the injection site (module order), one panel per model."""
    title = f"{dataset}: top-1 against the injection site (layer sweep)"
    sweeps = r.layer_sweeps()
    if not sweeps:
        return _no_data_figure(title)
    fig, axes = _panels(title, 1, len(sweeps), 4.2, 3.4)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        xs = np.arange(len(sweep))
        _protocol_lines(ax, r, xs, sweep, PROTOCOLS)
        _vanilla(ax, r, sweep[0].model)
        ax.set_xticks(xs, [s.site for s in sweep], rotation=30, ha="right")
        ax.set(ylabel="top-1 (%)", title=f"{sweep[0].model}: {sweep[0].noise} ({sweep[0].apply})")
    _legend(fig, axes[0])
    return fig


def entropy_figure(r: Results, dataset: str):
    """Measured change of top-1 (vs the same checkpoint's clean) against the theory's ΔS, per model."""
    from matplotlib.lines import Line2D

    title = f"{dataset}: change of top-1 vs the same checkpoint's clean, against the theory's ΔS"
    points = [pt for pt in entropy_points(r) if pt["theory_delta_S"] == pt["theory_delta_S"] and pt["change"]]
    if not points:
        return _no_data_figure(title)
    finite = [pt["theory_delta_S"] for pt in points if math.isfinite(pt["theory_delta_S"])]
    edge = 10 ** (math.ceil(math.log10(max([1.0, *finite]))) + 1)  # where +inf is drawn
    models = sorted({pt["setting"].model for pt in points})
    fig, axes = _panels(title, 1, len(models), 5.0, 4.0)
    for ax, model in zip(axes[0], models, strict=True):
        mp = [pt for pt in points if pt["setting"].model == model]
        for pt in mp:
            s, ds, iv = pt["setting"], pt["theory_delta_S"], pt["change"].interval
            color, y = _COLORS[pt["protocol"]], iv.estimate * 100
            ax.errorbar(edge if math.isinf(ds) else ds, y, yerr=[[y - iv.low * 100], [iv.high * 100 - y]],
                        fmt=">" if math.isinf(ds) else _KIND_MARKERS[s.kind], color=color, markersize=5, linewidth=0.6,
                        markerfacecolor="none" if s.kind in ADDITIVE_NOISE_KINDS else color,  # ΔS there is a bound
                        alpha=0.85 if s.apply == "eval" else 0.45)
        if any(math.isinf(pt["theory_delta_S"]) for pt in mp):
            ax.axvline(edge, color="grey", linewidth=0.5, linestyle=":")
            ax.annotate("ΔS = +∞\n(I+Q singular)", (edge, 1.0), xycoords=("data", "axes fraction"), ha="right",
                        va="top", fontsize=6)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(-0.5, edge * 2)
        ticks = [0.0] + [10.0**i for i in range(round(math.log10(edge)))]
        ax.set_xticks([*ticks, edge], ["0"] + [f"$10^{{{i}}}$" for i in range(len(ticks) - 1)] + ["+∞"])
        ax.set(xlabel="theory ΔS (nats, symlog)", ylabel="Δ top-1 vs same checkpoint's clean (pp)",
               title=f"{model} (default site; faded: noise also in training)")
    bound = {k: k in ADDITIVE_NOISE_KINDS for k in _KIND_MARKERS}
    handles = [Line2D([], [], color=_COLORS[p], marker="o", linestyle="", label=p) for p in NOISY_PROTOCOLS]
    handles += [Line2D([], [], color="black", marker=m, linestyle="", markerfacecolor="none" if bound.get(k) else "black",
                       label=k + (" (ΔS ≤ 0 bound)" if bound.get(k) else "")) for k, m in [*_KIND_MARKERS.items(), ("ΔS = +∞", ">")]]
    fig.legend(handles=handles, loc="outside right upper")
    return fig


def _sweep_groups(r: Results, experiment: str) -> list[tuple[tuple, pd.DataFrame]]:
    pts = r.sweep_points()
    return list(pts[pts["experiment"] == experiment].groupby(["model", "noise", "apply", "site"], sort=True))


def _batch_size_panel(ax, pts: pd.DataFrame, theory: bool):
    """Top-1 against k (log2 x) per order: the noise solid with its band, the pooling control dashed."""
    for order in SWEEP_ORDERS:
        for variant, style, label in (("noise", "-", order), ("pooling_control", "--", f"{order}, pooling control")):
            g = pts[(pts["order"] == order) & (pts["variant"] == variant)].sort_values("batch_size")
            if not g.empty:
                ax.plot(g["batch_size"], g["value"] * 100, style, marker="o", markersize=3, color=_COLORS[order],
                        label=label, linewidth=1.0 if variant == "noise" else 0.8)
                ax.fill_between(g["batch_size"], g["ci_low"] * 100, g["ci_high"] * 100, color=_COLORS[order],
                                alpha=0.12, linewidth=0)
    ks = sorted(set(pts["batch_size"]))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k:g}" for k in ks])
    ax.set(xlabel="test batch size k", ylabel="top-1 (%)")
    if not theory:
        return None
    twin = ax.twinx()
    twin.plot(ks, [delta_entropy_optimal(int(k)) for k in ks], ":", color="grey", label="theory ΔS*(k) = (k−1)·ln(k+1)")
    twin.set_ylabel("theory ΔS* (nats)")
    twin.grid(False)
    return twin


def batch_size_figure(r: Results, dataset: str):
    """Per model: top-1 against the test batch size for three orders, the pooling control, and ΔS*(k)."""
    title = f"{dataset}: top-1 against the test batch size (noise solid, pooling control dashed)"
    groups = _sweep_groups(r, "batch_size")
    if not groups:
        return _no_data_figure(title)
    fig, axes = _panels(title, 1, len(groups), 4.6, 3.6)
    twins = [_batch_size_panel(ax, pts, theory=True) for ax, (_, pts) in zip(axes[0], groups, strict=True)]
    for ax, ((model, noise, apply, site), _) in zip(axes[0], groups, strict=True):
        ax.set_title(f"{model}: {noise} ({apply}) at {site}")
    _legend(fig, axes[0][:1], twin=twins[0])
    return fig


def purity_figure(r: Results, dataset: str):
    """Per model: top-1 of the m images of one class against m (the rest of the batch: other classes)."""
    title = f"{dataset}: top-1 of the m images of one class in a test batch, against m"
    groups = _sweep_groups(r, "purity")
    if not groups:
        return _no_data_figure(title)
    fig, axes = _panels(title, 1, len(groups), 4.2, 3.4)
    for ax, ((model, noise, apply, site), pts) in zip(axes[0], groups, strict=True):
        for variant, style, color in (("noise", "-", _COLORS["released"]), ("pooling_control", "--", "black")):
            g = pts[pts["variant"] == variant].sort_values("m")
            if not g.empty:
                ax.plot(g["m"], g["value"] * 100, style, marker="o", markersize=3, color=color, label=variant)
                ax.fill_between(g["m"], g["ci_low"] * 100, g["ci_high"] * 100, color=color, alpha=0.12, linewidth=0)
        _vanilla(ax, r, model)
        ax.set(xlabel=f"m: images of one class in a batch of {pts['batch_size'].max():g}", ylabel="top-1 (%)",
               title=f"{model}: {noise} ({apply}) at {site}")
    _legend(fig, axes[0])
    return fig


def headline_figure(r: Results, dataset: str):
    """Per model: the released recipe under each protocol beside the vanilla model, and the batch-size sweep."""
    title = f"{dataset}: the released recipe ({RELEASED_NOISE}, noise at evaluation only) under each protocol"
    sweeps = {key[0]: pts for key, pts in _sweep_groups(r, "batch_size")}
    models = [m for m in r.models if r.released_recipe(m) or m in sweeps]
    if not models:
        return _no_data_figure(title)
    fig, axes = _panels(title, len(models), 2, 4.8, 3.2)
    for (left, right), model in zip(axes, models, strict=True):
        recipe = r.released_recipe(model)
        if recipe is None:
            _say_no_data(left, f"{model}: released recipe")
        else:
            for i, p in enumerate(PROTOCOLS):
                y, _, _, yerr = _accuracy(r, [recipe], p)
                left.errorbar([i], y, yerr=yerr, fmt="o", color=_COLORS[p], capsize=3, markersize=5)
            _vanilla(left, r, model)
            left.set_xticks(range(len(PROTOCOLS)), PROTOCOLS, rotation=20)
            left.set(ylabel="top-1 (%)", title=f"{model}: released recipe, top-1 (95 % interval)")
        if model in sweeps:
            _batch_size_panel(right, sweeps[model], theory=False)
            _vanilla(right, r, model)
            right.set_title(f"{model}: top-1 against the test batch size")
        else:
            _say_no_data(right, f"{model}: batch-size sweep")
    _legend(fig, axes[:, 1], ncol=4, loc="outside lower center")
    return fig


DRAW = {"headline": headline_figure, "audit": audit_figure, "strength": strength_figure, "layers": layers_figure,
        "entropy": entropy_figure, "batch_size": batch_size_figure, "purity": purity_figure}
FIGURES = tuple(DRAW)
