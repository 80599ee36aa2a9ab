"""The claims ledger (config/claims.yaml) beside our numbers: ``results/CLAIMS.md`` (no torch import).

Each claim of the NoisyNN family names the recipe that produced it and a cell of one of our results
folders that runs that recipe at small scale. For that cell the report gives top-1 with its 95 %
interval under every protocol and the change against the vanilla model with its verdict (read
from the folder's ``tables/cells.csv`` and ``tables/changes.csv``, which the report step wrote),
or the command that produces the folder when it is not there yet, and the command for the claim's
own scale.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from noisynn.errors import UserError
from noisynn.report.tables import to_markdown
from noisynn.vocab import PROTOCOL_DEFS, PROTOCOLS

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "claims.schema.yaml"
_METRIC_WORDS = {"top1_percent": "% top-1", "top5_percent": "% top-5", "error_percent": "% error",
                 "top1_gain_points": "points of top-1 gained"}


def load_claims(ledger: Path, paper_csv: Path) -> list[dict]:
    """The ledger's claims, schema-checked, each with its number (``value``, ``metric``) resolved."""
    from noisynn.pipeline.schema import check_against_schema, read_yaml

    source = f"claims ledger {ledger}"
    doc = read_yaml(Path(ledger), "claims ledger")
    check_against_schema(doc, yaml.safe_load(SCHEMA.read_text()), source)
    paper = pd.read_csv(paper_csv).set_index("claim_id")
    claims, seen = [], set()
    for i, c in enumerate(doc["claims"]):
        if c["id"] in seen:
            raise UserError(f"{source}: key claims.{i}.id: {c['id']!r} is used twice; ids are unique.")
        seen.add(c["id"])
        if ("paper_claim" in c) == ("value" in c or "metric" in c) or ("value" in c) != ("metric" in c):
            raise UserError(f"{source}: key claims.{i}: give value and metric, or paper_claim (a claim_id "
                            f"of {paper_csv}), not both; the number is written once.")
        if "paper_claim" in c:
            if c["paper_claim"] not in paper.index:
                raise UserError(f"{source}: key claims.{i}.paper_claim: {c['paper_claim']!r} is not a "
                                f"claim_id of {paper_csv}.")
            row = paper.loc[c["paper_claim"]]
            c = {**c, "value": float(row["value"]), "metric": row["metric"], "claim_source": row["source"]}
        claims.append(c)
    return claims


def _interval(value, low, high) -> str:
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def our_numbers(claim: dict, repo: Path) -> pd.DataFrame | None:
    """Per protocol: top-1 and its interval, the change against the vanilla model and the verdict
    (None when the results folder or the cell is not there)."""
    folder = Path(repo) / claim["ours"]["results"] / "tables"
    if not (folder / "cells.csv").is_file() or not (folder / "changes.csv").is_file():
        return None
    cell = claim["ours"]["cell"]
    cells, changes = pd.read_csv(folder / "cells.csv"), pd.read_csv(folder / "changes.csv")

    def pick(df):
        keep = (df["model"] == cell["model"]) & (df["noise"] == cell["noise"]) & (df["apply"] == cell["apply"]) & \
               (df["site"] == cell["site"])
        return df[keep].set_index("protocol")

    top1 = pick(cells[cells["metric"] == "top1"])
    if top1.empty:
        return None
    change = pick(changes)
    rows = []
    for p in PROTOCOLS:
        if p not in top1.index:
            continue
        t = top1.loc[p]
        row = {"protocol": p, "test order": PROTOCOL_DEFS[p].description, "top-1 % [95 % CI]": _interval(t["value"], t["ci_low"], t["ci_high"])}
        if p in change.index:
            ch = change.loc[p]
            row["change vs vanilla, points [95 % CI]"] = _interval(ch["change"], ch["ci_low"], ch["ci_high"])
            row["verdict"] = ch["verdict"]
        rows.append(row)
    return pd.DataFrame(rows)


def _source_link(s: dict) -> str:
    where = f"{s['path']}" + (f" line {s['line']}" if s.get("line") else "")
    text = f"github.com/{s['repo']} @{s['commit']}, {where}"
    return text + (f"; {s['paper']}" if s.get("paper") else "")


def _claimed(c: dict) -> str:
    return f"{c['value']:g} {_METRIC_WORDS[c['metric']]}"


def verdict(by_protocol: dict) -> str:
    """One phrase: whether the noise raises top-1 under the released protocol, and whether it still
    does at batch size 1 (where each of these operators is the identity)."""
    released, single = by_protocol.get("released", {}).get("verdict"), by_protocol.get("batch1", {}).get("verdict")
    if released is None:
        return "not run yet"
    if released != "raised":
        return f"not raised as released ({released})"
    if single == "raised":
        return "raised as released and at batch size 1"
    return "raised only through the test batch: not at batch size 1"


def summary_table(claims: list[dict], repo: Path) -> pd.DataFrame:
    """One row per claim: the claim, the recipe's batch facts, our released and batch-1 top-1."""
    rows = []
    for c in claims:
        ours = our_numbers(c, repo)
        got = {} if ours is None else ours.set_index("protocol").to_dict("index")
        released = got.get("released", {})
        r = c["recipe"]
        rows.append({
            "work": c["work"], "claim": c["claim"], "claimed": _claimed(c),
            "noise at; test batch": f"{r['apply']}; {r['test_batch_size']}",
            "ours: released": released.get("top-1 % [95 % CI]", "not run yet"),
            "ours: batch 1": got.get("batch1", {}).get("top-1 % [95 % CI]", "not run yet"),
            "released vs vanilla": (f"{released['verdict']}: {released['change vs vanilla, points [95 % CI]']}"
                                    if "verdict" in released else "not run yet"),
            "our verdict": verdict(got),
            "our run": c["ours"]["results"],
        })
    return pd.DataFrame(rows)


def _selection_text(ours: dict, repo: Path) -> str:
    """The model-selection table of the run folders ``ours.selection`` names, or how to make them."""
    from noisynn.report.selection import model_selection, read_epochs, selection_table

    runs = sorted(p for p in repo.glob(ours["selection"]) if (p / "selection").is_dir())
    if not runs:
        return f"**Model selection on the test set:** not run yet; `{ours['command']}` records it."
    results = {}
    for run in runs:
        r = read_epochs(run)
        results[str(run.relative_to(repo))] = model_selection(r["val"], r["test"], r["test_batch"])
    return ("**Model selection on the test set** (top-1 %, the test split scored after every epoch; the optimism is "
            "best-on-test minus validation-selected):\n\n" + selection_table(results))


def claims_markdown(claims: list[dict], repo: Path) -> str:
    lines = [
        "# The NoisyNN family: public claims beside our audit",
        "",
        "Written by `noisynn claims` from config/claims.yaml (the ledger: each claim, its public source and the recipe",
        "read from the public code) and the results folders it names. Our numbers are top-1 in % with the 95 % intervals",
        "of each folder's tables/cells.csv, under each protocol of noisynn/vocab.py, at the scale named; the change and",
        "its verdict (tables/changes.csv) are against the vanilla model's top-1 under the same protocol. At batch size 1",
        "every operator here is the identity, so `batch1` is the backbone alone and `released` minus `batch1` is what",
        "the composition of the test batch adds.",
        "",
        "## Summary",
        "",
        to_markdown(summary_table(claims, repo)).rstrip(),
        "",
    ]
    for c in claims:
        r = c["recipe"]
        lines += [
            f"## {c['work']}: {c['claim']}",
            "",
            f"* **Claimed:** {_claimed(c)} on {c['dataset']}"
            + (f" (config/paper_results.csv `{c['paper_claim']}`, from {c['claim_source']})" if "paper_claim" in c else ""),
            f"* **Source:** {_source_link(c['source'])}",
            f"* **Recipe:** {r['operator']}; site: {r['site']}; noise at {r['apply']}; test batch {r['test_batch_size']}; "
            f"test order: {r['test_order']}; model selection: {r['model_selection']}.",
            "* **Read in the public code:** " + "; ".join(r["evidence"]) + ".",
            "",
        ]
        ours = our_numbers(c, repo)
        cell = c["ours"]["cell"]
        what = f"`{c['ours']['results']}`, model {cell['model']}, noise {cell['noise']} ({cell['apply']}) at {cell['site']}"
        if ours is None:
            lines += [f"**Ours ({c['ours']['scale']}):** not run yet; `{c['ours']['command']}` writes {what}.", ""]
        else:
            lines += [f"**Ours ({c['ours']['scale']}):** {what} (`{c['ours']['command']}`).", "",
                      to_markdown(ours).rstrip(), ""]
        if "selection" in c["ours"]:
            lines += [_selection_text(c["ours"], Path(repo)), ""]
        full = c["full_scale"]
        lines += [f"**At the claim's scale:** needs {full['needs']}"
                  + (f"; `{full['command']}`." if full["command"] else "; no config here runs it."), ""]
    return "\n".join(lines)


def write_claims(ledger: Path, paper_csv: Path, repo: Path, out: Path) -> None:
    from noisynn.io.atomic import atomic_write_text

    claims = load_claims(ledger, paper_csv)
    atomic_write_text(Path(out), claims_markdown(claims, repo))
