"""Tests of config/claims.yaml and noisynn/report/claims.py: the NoisyNN family's claims beside ours.

What a user relies on: the shipped ledger holds every claim of issue 21's table and the paper's own
(each with its public source at a commit, its recipe, a run here and a command for its own scale,
every config it names shipped), a mistake in the ledger is one sentence naming the file and the key,
CLAIMS.md shows for each claim our top-1 and change with their intervals under every protocol when
the run is there and the command to make it when it is not, and the report needs no torch.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from noisynn.errors import UserError
from noisynn.report.claims import claims_markdown, load_claims

REPO = Path(__file__).resolve().parents[1]
LEDGER, PAPER = REPO / "config" / "claims.yaml", REPO / "config" / "paper_results.csv"


def test_the_ledger_holds_every_claim_of_the_family():
    claims = load_claims(LEDGER, PAPER)
    works = {c["work"].split(" (")[0] for c in claims}
    assert {"NoisyNN", "NoisyViT_Food", "FFTAT", "InterLUDE", "InformationEntropySeries"} <= works
    values = {(c["work"].split(" (")[0], c["value"]) for c in claims}
    # issue 21's table and the paper's ImageNet numbers (the latter read from config/paper_results.csv)
    for expected in [("NoisyViT_Food", 99.5), ("NoisyViT_Food", 95.0), ("NoisyViT_Food", 96.6), ("FFTAT", 91.4),
                     ("FFTAT", 97.6), ("InterLUDE", 3.2), ("InformationEntropySeries", 97.2),
                     ("InformationEntropySeries", 93), ("NoisyNN", 95.65), ("NoisyNN", 93.87)]:
        assert expected in values
    for c in claims:
        assert re.fullmatch(r"[0-9a-f]{7,40}", c["source"]["commit"])


def test_every_config_the_ledger_names_is_shipped():
    for c in load_claims(LEDGER, PAPER):
        for command in (c["ours"]["command"], c["full_scale"]["command"] or ""):
            for config in re.findall(r"--configfile (config/\S+\.yaml)", command):
                assert (REPO / config).is_file(), f"{c['id']}: {config} is not in the repository"


def _ledger(tmp_path, edit) -> Path:
    doc = yaml.safe_load(LEDGER.read_text())
    edit(doc["claims"])
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("edit, key, expected", [
    (lambda c: c[0].update(value=1.0), "claims.0", "not both"),  # a number both here and in the paper's CSV
    (lambda c: c[0].update(paper_claim="nope"), "claims.0.paper_claim", "not a claim_id"),
    (lambda c: c[4]["source"].update(commit="main"), "claims.4.source.commit", "does not match"),
    (lambda c: c[4]["recipe"].update(apply="always"), "claims.4.recipe.apply", "eval"),
    (lambda c: c.append(dict(c[4])), "claims.12.id", "used twice"),
])
def test_each_ledger_mistake_is_one_sentence_naming_file_and_key(tmp_path, edit, key, expected):
    path = _ledger(tmp_path, edit)
    with pytest.raises(UserError) as e:
        load_claims(path, PAPER)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"claims ledger {path}: key {key}") and expected in msg


def test_claims_md_shows_our_intervals_or_the_command_that_makes_them(tmp_path):
    claims = [c for c in load_claims(LEDGER, PAPER) if c["id"] in ("noisyvit_food_food101", "interlude_stl10_40")]
    food = claims[0]
    tables = tmp_path / food["ours"]["results"] / "tables"
    tables.mkdir(parents=True)
    cell = food["ours"]["cell"]
    pd.DataFrame([{**cell, "protocol": p, "metric": "top1", "value": v, "ci_low": v - 0.02, "ci_high": v + 0.02,
                   "n_seeds": 2, "n_units": 200} for p, v in (("released", 0.9), ("batch1", 0.75))]
                 ).to_csv(tables / "cells.csv", index=False)
    pd.DataFrame([{**cell, "protocol": "released", "change": 0.15, "ci_low": 0.1, "ci_high": 0.2, "verdict": "raised"}]
                 ).to_csv(tables / "changes.csv", index=False)
    text = claims_markdown(claims, tmp_path)
    assert ("| 90.0 [88.0, 92.0] | 75.0 [73.0, 77.0] | raised: 15.0 [10.0, 20.0] | raised only through the test batch: "
            "not at batch size 1 |") in text
    assert "github.com/Tonmoy-Ghosh/NoisyViT_Food @2584c4d, README.md line 60" in text
    # InterLUDE's run is not in tmp_path: its section says how to make it
    assert "not run yet; `snakemake --configfile config/interlude-mnist.yaml --cores all`" in text


def test_claims_md_gives_the_optimism_of_fftat_style_selection(tmp_path):
    import numpy as np

    fftat = next(c for c in load_claims(LEDGER, PAPER) if c["id"] == "fftat_office_home_average")
    assert "not run yet" in claims_markdown([fftat], tmp_path).split("Model selection on the test set")[1]
    run = tmp_path / fftat["ours"]["selection"].replace("*", "0") / "selection"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for epoch, p in enumerate((0.5, 0.8, 0.6), start=1):  # val picks epoch 1; the test set, epoch 2
        np.savez(run / f"epoch_{epoch:04d}.npz", val_correct=rng.random(100) < (0.9 if epoch == 1 else 0.4),
                 test_correct=rng.random(320) < p, test_batch=np.arange(320) // 16)
    text = claims_markdown([fftat], tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| results/fftat-digits"))
    assert "| 3 |" in row and "(2) |" in row and "(1) |" in row


def test_the_claims_report_needs_no_torch():
    code = "import sys, noisynn.report.claims, noisynn.report.selection; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
