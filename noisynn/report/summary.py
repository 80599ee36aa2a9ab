"""SUMMARY.md, metrics.json, and ``make_report``: the entry point that writes every report file.

No torch import here (nor ``noisynn.evaluate``). Under ``out_dir`` the report always writes the same
files (a section without data still gets its figure and table, saying so), in output groups that a
workflow can run as separate jobs (``only``):

    summary      tables/<table>.{csv,md,tex} for each of TABLE_NAMES, tables/cells.csv, SUMMARY.md, metrics.json
    <figure>     figures/<figure>.{png,pdf}, for each of plots.FIGURES

Every file is written atomically and without timestamps, and no statistic here draws random numbers,
so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_write_json, atomic_write_text
from noisynn.io.guards import check_not_an_input, check_output_folder
from noisynn.io.provenance import file_sha256
from noisynn.report import results, stats, tables
from noisynn.report.plots import FIGURES, write_figure
from noisynn.report.results import NO_DATA, Results, Setting, load_evaluations, load_sweeps
from noisynn.vocab import ADDITIVE_NOISE_KINDS, LINEAR_NOISE_KINDS, NOISY_PROTOCOLS, PROTOCOLS, RELEASED_NOISE

TABLE_NAMES = (*tables.TABLES, "paper_vs_ours")
GROUPS = ("summary", *FIGURES)


def declared_files(only: str | None = None) -> list[str]:
    """The files ``make_report`` writes (all, or those of one group), relative to ``out_dir``."""
    files = []
    for group in GROUPS if only is None else (only,):
        if group == "summary":
            files += [f"tables/{n}.{e}" for n in TABLE_NAMES for e in ("csv", "md", "tex")]
            files += ["tables/cells.csv", "SUMMARY.md", "metrics.json"]
        else:
            files += [f"figures/{group}.png", f"figures/{group}.pdf"]
    return files


def make_report(evaluations_csv: Path, sweeps_csv: Path | None, paper_csv: Path | None, out_dir: Path, dataset: str,
                only: str | None = None, stages: dict | None = None) -> None:
    """Write every table, figure, SUMMARY.md and metrics.json of one dataset (or the group ``only``).

    ``stages``: which data each stage of the workflow used ({"pretraining": "...", ...}), said in SUMMARY.md.
    """
    if only is not None and only not in GROUPS:
        raise UserError(f"--only must name one output group of the report ({', '.join(GROUPS)}); got {only!r}.")
    if only in (None, "summary") and paper_csv is None:
        raise UserError("report needs --paper (config/paper_results.csv) to write the summary and its tables.")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "report --out-dir")
    sources = {"the evaluations table (--evaluations)": evaluations_csv, "the sweeps table (--sweeps)": sweeps_csv,
               "the paper's numbers (--paper)": paper_csv}
    for name in declared_files(only):
        check_not_an_input(out_dir / name, "report --out-dir", sources)
    sweeps = None if sweeps_csv is None else load_sweeps(Path(sweeps_csv), dataset)
    r = Results(load_evaluations(Path(evaluations_csv), dataset), sweeps)
    # every input is read before the first file is written
    paper = tables.load_paper(Path(paper_csv)) if only in (None, "summary") else None
    for name in FIGURES:
        if only in (None, name):
            write_figure(name, r, dataset, out_dir)
    if only not in (None, "summary"):
        return
    built = {name: build(r) for name, build in tables.TABLES.items()}
    built["paper_vs_ours"] = tables.paper_vs_ours_table(r, paper, dataset)
    for name, table in built.items():
        shown = tables.changes_display(table) if name == "changes" else None
        tables.write_table(table, out_dir / "tables" / name, shown)
    tables.write_csv(tables.cells_table(r), out_dir / "tables" / "cells.csv")
    inputs = {"evaluations table": evaluations_csv, "sweeps table": sweeps_csv, "paper numbers": paper_csv}
    atomic_write_text(out_dir / "SUMMARY.md", summary_markdown(r, built, dataset, inputs, stages))
    atomic_write_json(out_dir / "metrics.json", headline_metrics(r))


def _unique(df: pd.DataFrame, column: str) -> str:
    vals = sorted({str(v) for v in df[column] if str(v) != ""})
    return ", ".join(f"`{v}`" for v in vals) if vals else "(none recorded)"


def _md(table: pd.DataFrame) -> str:
    return tables.to_markdown(table).rstrip("\n")


# --- the SUMMARY's own tables ----------------------------------------------------------------------


def _change_text(r: Results, s: Setting, protocol: str) -> str:
    if not r.values(s, protocol):
        return "no data"
    ch = r.change(s, protocol)
    if ch is None:
        return "no data (no per-image predictions)"
    return (f"{tables.interval_text(ch.interval.estimate, ch.interval.low, ch.interval.high, sign=True)} "
            f"{r.verdict(s, protocol).word}")


def family_text(r: Results) -> str:
    """The families of verdicts, their sizes and adjustments, and how many verdicts each holds, in one paragraph."""
    verdicts = list(r.verdicts().values())
    size = {f: sum(v.family == f for v in verdicts) for f in results.FAMILIES}
    called = {f: sum(v.family == f and v.word in ("raised", "lowered") for v in verdicts) for f in results.FAMILIES}
    untested = sum(v.word == results.BY_CONSTRUCTION for v in verdicts)
    protocols = ", ".join(f"`{p}`" for p in results.PRIMARY_PROTOCOLS)
    level = f"{stats.ALPHA * 100:g} %"
    return (f"**One family, one error rate.** The primary family is the paper's claims: the released recipe "
            f"(`{RELEASED_NOISE}`, noise at evaluation only, default site) under {protocols}, each against the "
            f"vanilla model under `clean`, per model: {size['primary']} tested contrasts here, whose family-wise "
            f"error rate is held at {level} by {stats.PRIMARY_ADJUSTMENT}'s step-down adjustment. The "
            f"other {size['other']} tested changes of `tables/changes` form the second family, whose false discovery "
            f"rate is held at {level} ({stats.OTHER_ADJUSTMENT}): in expectation at most {level} of its 'raised' "
            f"and 'lowered' words are false. {untested} changes are zero by construction (the noise off on the "
            "vanilla checkpoint, or a batch-axis linear noise at batch size 1) and are not tested. A verdict follows "
            "the adjusted p-value (`adjusted_pvalue` in `tables/changes`); the intervals are the unadjusted 95 % ones. "
            f"Verdicts of raised or lowered: {called['primary']} of {size['primary']} primary contrasts, "
            f"{called['other']} of {size['other']} others.")


def headline_table(r: Results) -> pd.DataFrame:
    """The released recipe and the vanilla model per model; ``released, as reported``: the code's own metric."""
    rows = []
    for model, s in ((m, s) for m in r.models for s in (r.vanilla(m), r.released_recipe(m)) if s is not None):
        metric = r.reported_metric(model)
        reported = (tables.accuracy_text(r, s, "released") if metric == "top1"
                    else tables.pct(tables.seed_mean(r.values(s, "released", metric))))
        top5 = tables.pct(tables.seed_mean(r.values(s, "released", r.reported_metric(model, top=5))))
        rows.append([model, s.noise, s.apply, s.site, *tables.protocol_cells(r, s).values(), reported, top5,
                     "plain top-1 (top1)" if metric == "top1" else "running accuracy (released_metric_top1)",
                     r.n_seeds(s)])
    return pd.DataFrame(rows, columns=[*tables.SETTING, *PROTOCOLS, "released, as reported", "top-5, as reported",
                                       "reported metric", "n_seeds"])


def claims_table(r: Results, kinds: tuple[str, ...]) -> pd.DataFrame:
    """Per setting of ``kinds`` at the default site: the change vs vanilla under each protocol, with its verdict."""
    rows = [[s.model, s.noise, s.apply, *(_change_text(r, s, p) for p in PROTOCOLS),
             f"`{s.where(metric='top1')}` minus `model={s.model}, noise=none, protocol=clean, metric=top1`, "
             "paired by seed and image"] for s in r.at_default_site(kinds=kinds)]
    return pd.DataFrame(rows, columns=["model", "noise", "apply", *PROTOCOLS, "filter (protocol = column)"])


def _stages_text(stages: dict | None) -> list[str]:
    if not stages:
        return []
    order = ["pretraining", "fine-tuning", "evaluation"]
    ordered = sorted(stages.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    return ["Data of each stage: " + "; ".join(f"{stage}: {what}" for stage, what in ordered) + ".", ""]


# --- SUMMARY.md, section by section --------------------------------------------------------------


def summary_markdown(r: Results, built: dict[str, pd.DataFrame], dataset: str, inputs: dict,
                     stages: dict | None = None) -> str:
    """SUMMARY.md: its sections in order, each a list of lines ending with a blank one."""
    sections = [
        _introduction(dataset, stages),
        _released_recipe_section(r),
        _verdict_section(r),
        _claims_section(r),
        _batch_dependence_section(r),
        _batch_leak_section(built["pooling_control"]),
        _audit_section(),
        _provenance_section(r, inputs),
        _files_section(built["paper_vs_ours"]),
    ]
    return "\n".join(line for section in sections for line in section)


def _introduction(dataset: str, stages: dict | None) -> list[str]:
    """The title, what the numbers are, the data of each stage and Figure 1."""
    return [
        f"# NoisyNN audit: {dataset}",
        "",
        "Generated by `noisynn report` from the evaluations table and the per-image predictions of every "
        "evaluation; each number below names the rows of `evaluations.csv` behind it. Accuracies are top-1 in "
        "percent, with their 95 % interval in brackets; changes are in percentage points.",
        "",
        *_stages_text(stages),
        "![The released recipe's top-1 under each protocol, and against the test batch size](figures/headline.png)",
        "",
        f"**Figure 1** (`figures/headline`). Left, per model: top-1 of the released recipe (`{RELEASED_NOISE}`, "
        "noise at evaluation only, default site) under each protocol, with its 95 % interval; the dashed line and "
        "the grey band are the vanilla model's clean top-1 and its interval. Right: top-1 against the test batch "
        "size k, for batches of one class (`class_pure`), in a random order (`shuffled`) and of distinct classes "
        "(`class_mixed`); dashed, the noise-free pooling control. A gain that appears only when the test batches "
        "hold one class is a property of the evaluation, not of the model.",
        "",
    ]


def _released_recipe_section(r: Results) -> list[str]:
    """The released recipe and the vanilla model under each protocol."""
    return [
        "## The released recipe",
        "",
        f"Noise `{RELEASED_NOISE}` (optimal Q mixing the samples of a test batch) at evaluation only, at the default "
        "site, beside the vanilla model (noise `none`). Protocols: `clean` noise off; `released` class-sorted test "
        "batches, as the official code; `shuffled` the same batch size in a seeded random order; `batch1` batch "
        "size 1; `class_pure` / `class_mixed` batches of one class / of distinct classes, same batch size. The "
        "column `released, as reported` is the number the model family's released code prints under `released` "
        "(column `reported metric`): the mean over batches of the running accuracy for the ViT code "
        "(`released_metric_top1`), the plain top-1 for the CNN code (`top1`); `top-5, as reported` the same for "
        "top-5 (`released_metric_top5`: the ViT code logs its top-5 as a running mean too; `top5`). Filter: `model=<model>, "
        "noise=<noise>, apply=eval, site=<site>, protocol=<column>, metric=top1`.",
        "",
        _md(headline_table(r)),
        "",
    ]


def _verdict_section(r: Results) -> list[str]:
    """How a change becomes a verdict, and the families of verdicts."""
    return [
        "## How a verdict is reached",
        "",
        stats.VERDICT_RULE + " The reference is the vanilla model under `clean`: the same model and seed, the same "
        "test images, the noise nowhere.",
        "",
        family_text(r),
        "",
    ]


def _claims_section(r: Results) -> list[str]:
    """The change of every setting at the default site against the vanilla model, by claim."""
    return [
        "## Which claims held under which protocol",
        "",
        "Each cell is the change of top-1 (percentage points) of the setting under the column's protocol against "
        "the vanilla model under `clean`, its 95 % interval, and the verdict. The filter column names the rows of "
        "the evaluations table behind each cell, with `protocol` set to the cell's column; `tables/changes` adds "
        "the images improved and worsened, the minimum detectable effect, the test's p-value and its adjusted "
        "p-value. For `apply=eval` the setting's checkpoint is the vanilla one, so its `clean` "
        "column is zero by construction; for `apply=train+eval` it is the effect of the noisy fine-tuning alone.",
        "",
        "At batch size 1 (`batch1`) a batch-axis linear noise is the identity by construction (k = 1: the optimal "
        "Q gives x' = (x + x)/2 = x, the shift gives (1 - a)·x + a·x = x), so under `batch1` a batch-axis setting "
        "with `apply=eval` is the vanilla model, up to floating-point rounding.",
        "",
        "### Claim: linear-transform (positive) noise raises accuracy",
        "",
        _md(claims_table(r, LINEAR_NOISE_KINDS)),
        "",
        "### Claim: Gaussian and impulse noise lower accuracy",
        "",
        _md(claims_table(r, ADDITIVE_NOISE_KINDS)),
        "",
    ]


def _transductive_count(r: Results) -> str:
    rows = [(s, *tables.transductive_text(r, s)) for s in r.at_default_site() if s.kind != "none"]
    named = [f"{s.model} `{s.noise}` ({s.apply}, {share} of images)" for s, share, verdict in rows if verdict == "yes"]
    return (f"Transductive here: {len(named)} of {len(rows)} noise settings at the default site"
            + (": " + "; ".join(named) + "." if named else "."))


def _batch_dependence_section(r: Results) -> list[str]:
    """What a transductive prediction is, and which settings made them."""
    return [
        "## Batch dependence",
        "",
        "A prediction is *transductive* (the test-time-adaptation literature's term) when it depends on the other "
        "images of its test batch. We measure it as the share of test images whose prediction under a protocol "
        "differs from the same image's prediction under `batch1`, for the same setting (noisy protocols: "
        f"{', '.join(f'`{p}`' for p in NOISY_PROTOCOLS if p != 'batch1')}); a setting with a share above 0 is "
        "labelled transductive (`tables/audit`, per protocol in `tables/changes`). Gaussian noise is the "
        "exception: its random draw follows an image's place in the random stream, so a share above 0 there "
        "reflects the draw, not the other images (`no (random draw)`). " + _transductive_count(r),
        "",
    ]


def _batch_leak_section(pooling: pd.DataFrame) -> list[str]:
    """The batch-size and purity sweeps and the noise-free pooling control."""
    return [
        "## The batch leak: batch size, purity and a noise-free control",
        "",
        "The theory's entropy change of the optimal Q, ΔS*(k) = (k − 1)·ln(k + 1), grows with the batch size k "
        "whatever the batch holds; a leak of information between the images of a batch follows what it holds. "
        "`figures/batch_size` (table `tables/batch_size`) sweeps k for three orders; `figures/purity` (table "
        "`tables/purity`) scores m images of one class in a batch of otherwise distinct classes; the pooling "
        "control gives each image the mean logits of its batch, with no noise at all:",
        "",
        _md(pooling) if not pooling.empty else f"_{NO_DATA}._",
        "",
    ]


def _audit_section() -> list[str]:
    """Every setting under every protocol: the audit figure."""
    return [
        "## Every setting under every protocol",
        "",
        "![Top-1 of every setting at the default site under each protocol](figures/audit.png)",
        "",
        "Table `tables/audit` holds the same numbers, with each setting's batch dependence.",
        "",
    ]


def _provenance_section(r: Results, inputs: dict) -> list[str]:
    """Where the numbers come from: the inputs and their hashes, the code, the models, seeds, data and sites."""
    df = r.df
    files = [f"- {what}: `{p}` (sha256 `{file_sha256(p)}`)" for what, p in inputs.items() if p is not None]
    predictions = sorted({p for p in df["predictions"] if p})
    combined = hashlib.sha256("".join(f"{p}\0{file_sha256(p)}\n" for p in predictions).encode()).hexdigest()
    return [
        "## Provenance",
        "",
        *files,
        f"- evaluations: {len(df)} rows from {df['evaluation'].nunique()} evaluation groups; per-image predictions "
        f"from {len(predictions)} files (sha256 of their paths and hashes `{combined}`)",
        f"- git commit(s) of the evaluations: {_unique(df, 'git_commit')}",
        f"- versions: noisynn {_unique(df, 'noisynn')}; torch {_unique(df, 'torch')}; timm {_unique(df, 'timm')}",
        "- models (timm): " + (", ".join(f"{m} = `{t}`" for m, t in sorted(r.timm_names.items())) or "(none)"),
        "- seeds: " + (", ".join(str(s) for s in sorted(set(df["seed"]))) or "(none)"),
        f"- data fingerprint(s): {_unique(df, 'data_fingerprint')}",
        "- default injection site per model: " + (", ".join(f"{m}: `{s}`" for m, s in sorted(r.sites.items()))
                                                  or "(none)") + ", as each evaluation records it (`default_site`)",
        f"- intervals: {results.CONFIDENCE * 100:g} % Wilson score at the effective sample size of the crossed "
        f"seeds × units variance (changes: Newcombe's hybrid); test: {stats.TEST_NAME}; no random numbers drawn",
        "",
    ]


def _files_section(paper_vs_ours: pd.DataFrame) -> list[str]:
    """What each file of the report holds."""
    matched = int((paper_vs_ours["ours"] != tables.NOT_RUN).sum())
    return [
        "## Files",
        "",
        "- `figures/headline`: the released recipe under each protocol and against the batch size (Figure 1).",
        "- `figures/audit`: every setting at the default site under each protocol (table `tables/audit`).",
        "- `figures/strength`: top-1 against noise strength (table `tables/strength`).",
        "- `figures/layers`: top-1 against the injection site (table `tables/layers`).",
        "- `figures/entropy`: change of top-1 against the theory's ΔS; there the reference is the same "
        "checkpoint's `clean` protocol, not the vanilla model (table `tables/entropy`).",
        "- `figures/batch_size`, `figures/purity`: the sweeps (tables `tables/batch_size`, `tables/purity`, "
        "`tables/pooling_control`).",
        "- `tables/changes`: every change against the vanilla model, its interval, minimum detectable effect, "
        "sign-flip test, family, adjusted p-value and verdict.",
        "- `tables/cells.csv`: every setting under every protocol with its interval, the table `noisynn compare` "
        "reads.",
        f"- `tables/paper_vs_ours`: each number of the paper table beside ours, or `{tables.NOT_RUN}`; {matched} of "
        f"{len(paper_vs_ours)} paper numbers have a counterpart here.",
        "- `metrics.json`: the headline numbers as fractions (means over seeds, intervals pooled over seeds).",
        "",
    ]


def headline_metrics(r: Results) -> dict:
    """Per model: vanilla clean top-1 and the released recipe under each protocol (means over seeds, fractions),
    with the clean interval and the recipe's changes against the vanilla model."""
    out = {}
    for model in r.models:
        entry, v, recipe = {}, r.vanilla(model), r.released_recipe(model)
        if v is not None and r.values(v, "clean"):
            entry["clean_top1"] = round(tables.seed_mean(r.values(v, "clean")), 4)
            if (iv := r.accuracy(v, "clean")) is not None:
                entry.update(clean_top1_ci_low=round(iv.low, 4), clean_top1_ci_high=round(iv.high, 4))
        if recipe is not None:
            wanted = [(f"{p}_top1", p, "top1") for p in PROTOCOLS if p != "clean"]
            wanted += [("released_metric_top1", "released", "released_metric_top1"),
                       ("released_metric_top5", "released", "released_metric_top5"),
                       ("released_reported", "released", r.reported_metric(model)),
                       ("released_reported_top5", "released", r.reported_metric(model, top=5))]
            numbers = {key: round(tables.seed_mean(r.values(recipe, p, metric)), 4) for key, p, metric in wanted
                       if r.values(recipe, p, metric)}
            changes = {p: c.interval for p in PROTOCOLS if p != "clean" and (c := r.change(recipe, p)) is not None}
            if changes:
                numbers["change_vs_vanilla"] = {p: {"change": round(iv.estimate, 4), "ci_low": round(iv.low, 4),
                                                    "ci_high": round(iv.high, 4)} for p, iv in changes.items()}
            if numbers:
                entry["released_recipe"] = numbers
        if entry:
            out[model] = entry
    return out
