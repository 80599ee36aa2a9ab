"""Gather evaluation groups into one tidy table: one row per evaluation × protocol × metric.

Each row is read from the evaluation's own record (its setting travels in the JSON; nothing is
parsed out of a path). No torch import here.
"""

from __future__ import annotations

import json
from pathlib import Path

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path
from noisynn.io.guards import check_not_an_input, check_output_file
from noisynn.io.provenance import file_sha256
from noisynn.vocab import noise_strength

METRICS = ("top1", "top5", "released_metric_top1", "released_metric_top5")
COLUMNS = [
    "row_id", "dataset", "model", "timm_name", "noise", "noise_kind", "strength", "alpha", "axis", "neighbour",
    "detach", "apply", "site", "default_site", "seed", "protocol", "order", "batch_size", "noise_applied", "metric",
    "value", "n", "mixed_axis_size", "theory_delta_S", "reported_metric", "preprocess", "checkpoint", "evaluation", "predictions",
    "data_fingerprint", "git_commit", "noisynn", "torch", "timm",
]
KEY = ("model", "noise", "apply", "site", "seed", "protocol", "metric")


def read_group(path: Path) -> dict:
    path = Path(path)
    try:
        group = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"evaluation {path} cannot be read ({e}).") from None
    if not isinstance(group, dict) or not isinstance(group.get("evaluations"), list):
        raise UserError(f"evaluation {path} has no 'evaluations' list; expected the output of `noisynn evaluate`.")
    return group


def predictions_file(path: Path, group: dict) -> Path | None:
    """The predictions file an evaluation names (relative to its JSON), checked to be the file it
    wrote; None where it wrote none. A named file that is missing or changed is refused."""
    record = group.get("predictions")
    if not record:
        return None
    file = path.parent / record["file"]
    if not file.is_file():
        raise UserError(f"evaluation {path} names its predictions file {file}, which does not exist; "
                        "restore it (dvc pull) or evaluate again.")
    if file_sha256(file) != record["sha256"]:
        raise UserError(f"evaluation {path}: its predictions file {file} is not the one it wrote (sha256 differs); "
                        "evaluate again or restore the file.")
    return file


def evaluation_rows(path: Path) -> list[dict]:
    path = Path(path)
    group = read_group(path)
    predictions = predictions_file(path, group)
    rows = []
    for ev in group["evaluations"]:
        s, noise = ev["setting"], ev["noise"]
        linear = noise["kind"].startswith("linear")
        for protocol, r in ev["protocols"].items():
            for metric in METRICS:
                row = {
                    "dataset": s.get("dataset", ""),
                    "model": s.get("model", group["model"]),
                    "timm_name": group["model"],
                    "noise": s["noise"],
                    "noise_kind": noise["kind"],
                    "strength": noise_strength(noise) if noise["kind"] in ("gaussian", "impulse") else None,
                    "alpha": noise["alpha"] if noise["kind"] == "linear-shift" else None,
                    "axis": noise["axis"] if linear else None,
                    "neighbour": noise.get("neighbour", "previous") if noise["kind"] == "linear-shift" else None,
                    "detach": noise.get("detach", False) if linear else None,  # false, true or partner
                    "apply": s.get("apply", "eval"),
                    "site": s.get("site", group["site"]),
                    "default_site": bool(s.get("default_site", True)),
                    "seed": int(s.get("seed", group["seed"])),
                    "protocol": protocol,
                    "order": r["order"],
                    "batch_size": r["batch_size"],
                    "noise_applied": r["noise_applied"],
                    "metric": metric,
                    "value": r[metric],
                    "n": r["n"],
                    "mixed_axis_size": r.get("mixed_axis_size"),
                    "theory_delta_S": r.get("theory_delta_S"),
                    "reported_metric": group.get("reported_metric", "running"),
                    "preprocess": group.get("preprocess") or "",  # empty: embedded data, normalized when prepared
                    "checkpoint": group["checkpoint"],
                    "evaluation": str(path),
                    "predictions": str(predictions) if predictions else "",
                    "data_fingerprint": group["data_fingerprint"],
                    "git_commit": group["git_commit"],
                    "noisynn": group["versions"]["noisynn"],
                    "torch": group["versions"]["torch"],
                    "timm": group["versions"]["timm"],
                }
                row["row_id"] = "|".join(str(row[k]) for k in KEY)
                rows.append(row)
    return rows


def sweep_rows(path: Path) -> list[dict]:
    """The batch-size sweep, the purity sweep and the pooling control of a group, one row per point."""
    group = read_group(path)
    rows = []
    for ev in group["evaluations"]:
        sweeps = ev.get("sweeps")
        if not sweeps:
            continue
        s = ev["setting"]
        base = {"dataset": s.get("dataset", ""), "model": s["model"], "noise": s["noise"], "apply": s["apply"],
                "site": s["site"], "seed": int(s["seed"]), "evaluation": str(path)}
        for p in sweeps["batch_size"]:
            rows.append({**base, "experiment": "batch_size", "variant": "noise", "order": p["order"],
                         "batch_size": p["batch_size"], "m": None, "top1": p["top1"], "n": p["n"]})
        for p in sweeps["purity"]:
            rows.append({**base, "experiment": "purity", "variant": "noise", "order": "purity",
                         "batch_size": p["batch_size"], "m": p["m"], "top1": p["top1"], "n": p["n"]})
        control = sweeps["pooling_control"]
        for p in control["batch_size"]:
            rows.append({**base, "experiment": "batch_size", "variant": "pooling_control", "order": p["order"],
                         "batch_size": p["batch_size"], "m": None, "top1": p["top1"], "n": None})
        for name, p in control["protocols"].items():
            rows.append({**base, "experiment": "protocol", "variant": "pooling_control", "order": name,
                         "batch_size": p["batch_size"], "m": None, "top1": p["top1"], "n": None})
    return rows


SWEEP_COLUMNS = ["dataset", "model", "noise", "apply", "site", "seed", "experiment", "variant", "order", "batch_size",
                 "m", "top1", "n", "evaluation"]


def aggregate(evaluations: list[Path], out: Path, sweeps_out: Path | None = None) -> None:
    """Write the tidy CSV of every evaluation (sorted, so the same inputs give the same file)."""
    import pandas as pd

    paths = sorted(map(Path, evaluations))
    inputs = {f"the evaluation {p}": p for p in paths}
    outputs = [("--out", Path(out))] + ([("--sweeps-out", Path(sweeps_out))] if sweeps_out is not None else [])
    for flag, path in outputs:
        check_output_file(path, f"aggregate {flag}")
        check_not_an_input(path, f"aggregate {flag}", inputs)
    if sweeps_out is not None:
        check_not_an_input(Path(sweeps_out), "aggregate --sweeps-out", {"the path given to --out": Path(out)})
    rows = [row for p in paths for row in evaluation_rows(p)]
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values("row_id", kind="stable")
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    if sweeps_out is not None:
        sweep = pd.DataFrame([r for p in paths for r in sweep_rows(p)], columns=SWEEP_COLUMNS)
        with atomic_path(sweeps_out) as tmp:
            sweep.to_csv(tmp, index=False)
