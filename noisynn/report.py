"""Gather evaluation JSONs into one tidy table: one row per checkpoint × protocol × metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

from noisynn.errors import UserError
from noisynn.io import atomic_path

METRICS = ("top1", "top5", "released_metric_top1")
COLUMNS = [
    "row_id", "dataset", "model", "timm_name", "noise", "noise_kind", "strength", "alpha", "axis", "apply", "site",
    "seed", "protocol", "order", "batch_size", "noise_applied", "metric", "value", "n", "mixed_axis_size",
    "theory_delta_S", "checkpoint", "evaluation", "data_fingerprint", "git_commit", "noisynn", "torch", "timm",
]
_TOKEN = re.compile(r"^(noise|apply|site|seed)~(.+)$")


def _path_fields(path: Path) -> dict:
    """dataset, model and the ``key~value`` tokens of an evaluation's path."""
    parts = Path(path).parts
    fields = {}
    for part in parts:
        m = _TOKEN.match(part)
        if m:
            fields[m.group(1)] = m.group(2)
    if "evaluate" in parts:
        i = parts.index("evaluate")
        fields["model"] = parts[i - 1]
        fields["dataset"] = parts[i - 2]
    return fields


def evaluation_rows(path: Path) -> list[dict]:
    path = Path(path)
    try:
        ev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"evaluation {path} cannot be read ({e}).") from None
    f = _path_fields(path)
    noise = ev["noise"]
    rows = []
    for protocol, r in ev["protocols"].items():
        for metric in METRICS:
            row = {
                "dataset": f.get("dataset", ""),
                "model": f.get("model", ev["model"]),
                "timm_name": ev["model"],
                "noise": f.get("noise", noise["kind"]),
                "noise_kind": noise["kind"],
                "strength": noise["strength"] if noise["kind"] in ("gaussian", "impulse") else None,
                "alpha": noise["alpha"] if noise["kind"] == "linear-shift" else None,
                "axis": noise["axis"] if noise["kind"].startswith("linear") else None,
                "apply": f.get("apply", "eval"),
                "site": f.get("site", ev["site"]),
                "seed": int(f.get("seed", ev["seed"])),
                "protocol": protocol,
                "order": r["order"],
                "batch_size": r["batch_size"],
                "noise_applied": r["noise_applied"],
                "metric": metric,
                "value": r[metric],
                "n": r["n"],
                "mixed_axis_size": r.get("mixed_axis_size"),
                "theory_delta_S": r.get("theory_delta_S"),
                "checkpoint": ev["checkpoint"],
                "evaluation": str(path),
                "data_fingerprint": ev["data_fingerprint"],
                "git_commit": ev["git_commit"],
                "noisynn": ev["versions"]["noisynn"],
                "torch": ev["versions"]["torch"],
                "timm": ev["versions"]["timm"],
            }
            row["row_id"] = "|".join(str(row[k]) for k in ("model", "noise", "apply", "site", "seed", "protocol", "metric"))
            rows.append(row)
    return rows


def aggregate(evaluations: list[Path], out: Path) -> None:
    """Write the tidy CSV of every evaluation (sorted, so the same inputs give the same file)."""
    import pandas as pd

    rows = [row for p in sorted(map(Path, evaluations)) for row in evaluation_rows(p)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
