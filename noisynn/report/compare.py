"""Does my regeneration agree? Check a new results folder (or cells table) against a reference, cell by cell.

No torch import here: it reads two ``cells.csv`` tables (written by the report step) with pandas, and,
where both sides are results folders whose ``evaluations.csv`` names per-image predictions that exist,
those predictions too. Each cell is judged by what could make it move:

* *same seeds on the same machine* (``same_machine``, and both tables list the same seeds for the
  cell): the same computation again, which moves only by floating-point rounding (on one machine it
  is bit for bit). The cell agrees when |v_new − v_ref| ≤ ``DRIFT`` (one point of top-1); the sampling
  interval plays no part, since the same seeds score the same images.
* *other seeds, or another machine* (the default; or a table that does not say its seeds): an
  independent estimate. The same seeds on another CPU do not give the same models: training's
  floating-point path differs by CPU and the differences grow over the epochs (measured between two
  machines of one kind: up to 5.7 points on a cell, 47 of the demo's 228 cells more than a point
  apart). The cell agrees when
  the interval of the difference of two independent estimates, built from both cells' intervals
  (MOVER, Zou & Donner 2008), holds 0: −√((v_ref − lo_ref)² + (hi_new − v_new)²) ≤ v_new − v_ref ≤
  √((hi_ref − v_ref)² + (v_new − lo_new)²). The reference's interval alone is no prediction interval
  for a new estimate; it would flag about twice as many cells as its level says.

* *the same seeds' predictions* (``same_machine``, and both sides are results folders with the
  per-image predictions of a cell's seeds): the cell agrees when the paired change of top-1 on those images, and the change of
  the recorded values, both stay within ``DRIFT``; a prediction file altered after its evaluation
  shows here even where the recorded values agree. Beside a differing cell: the share of images
  predicted otherwise and the paired interval of the top-1 difference (``stats.change_interval`` on
  the cell's units).

A reference cell absent from the new table counts as differing.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from noisynn.errors import UserError
from noisynn.report import stats
from noisynn.report.results import Results, load_evaluations
from noisynn.vocab import PROTOCOLS

CELLS_COLUMNS = ["model", "noise", "apply", "site", "protocol", "metric", "value", "ci_low", "ci_high", "n_seeds",
                 "n_units", "seeds"]
KEY = ["model", "noise", "apply", "site", "protocol", "metric"]
_NUMERIC = ["value", "ci_low", "ci_high", "n_seeds", "n_units"]
_OPTIONAL = ("seeds",)  # a table written before the cells listed their seeds: seeds unknown, judged as other seeds
DRIFT = 0.01  # the floating-point drift a same-seed regeneration may show, as a fraction (README: up to 0.9 points)
SAME_SEEDS, OTHER_SEEDS, PAIRED = "same seeds", "other seeds", "same seeds' predictions"
# Values are fractions written as decimal text; a round trip through CSV may move the last bit.
_SLACK = 1e-12
_SHOWN_KEYS = 3


def cells_path(path: Path) -> Path:
    """The cells table itself, or ``<folder>/tables/cells.csv`` for a results folder."""
    path = Path(path)
    return path / "tables" / "cells.csv" if path.is_dir() else path


def seeds_text(seeds) -> str:
    """The ``seeds`` cell of a cells table: the seeds behind a value, sorted, space-separated."""
    return " ".join(str(s) for s in sorted(seeds))


def read_cells(path: Path) -> pd.DataFrame:
    """Read a cells table (a file, or a results folder) and check its columns, keys and numbers."""
    path = cells_path(path)
    if not path.is_file():
        raise UserError(f"cells table {path} does not exist (expected a cells.csv file, or a results folder "
                        "holding tables/cells.csv).")
    try:
        # Keys stay text ('none', '' for no site): pandas would otherwise turn them into NaN.
        cells = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"cells table {path} cannot be read as CSV ({e}).") from None
    missing = [c for c in CELLS_COLUMNS if c not in cells.columns and c not in _OPTIONAL]
    if missing:
        raise UserError(f"cells table {path} lacks the column(s) {', '.join(missing)} "
                        f"(expected {', '.join(CELLS_COLUMNS)}).")
    if cells.empty:
        # "consistent: 0 of 0 cells" would read as agreement
        raise UserError(f"cells table {path} holds no cells (only its header); nothing can be compared with it.")
    for c in _OPTIONAL:
        if c not in cells.columns:
            cells[c] = ""
    cells = cells[CELLS_COLUMNS].copy()
    for col in _NUMERIC:
        numbers = pd.to_numeric(cells[col], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"cells table {path}: column {col} must hold numbers; "
                            f"row {row + 2} has {cells[col].iloc[row]!r}.")
        cells[col] = numbers.astype(float)
    dup = cells.duplicated(KEY, keep=False)
    if dup.any():
        key = tuple(cells.loc[dup, KEY].iloc[0])
        raise UserError(f"cells table {path} holds the cell {_show_key(key)} more than once (each key must be unique).")
    inverted = cells["ci_low"] > cells["ci_high"]
    if inverted.any():
        key = tuple(cells.loc[inverted, KEY].iloc[0])
        raise UserError(f"cells table {path}: cell {_show_key(key)} has ci_low above ci_high.")
    return cells.reset_index(drop=True)


@dataclass(frozen=True)
class Paired:
    """A cell compared image by image over the seeds both sides hold: share predicted otherwise, Δ top-1 interval."""

    changed: float
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """One reference cell the new table does not reproduce; ``new_value`` is None when it is missing.

    ``allowed``: the (lowest, highest) v_new − v_ref the cell's ``mode`` accepts.
    """

    key: tuple
    value: float
    ci_low: float
    ci_high: float
    new_value: float | None
    mode: str = ""
    allowed: tuple[float, float] = (math.nan, math.nan)

    @property
    def missing(self) -> bool:
        return self.new_value is None


@dataclass
class CompareResult:
    """Consistent and differing reference cells; cells only in the new table are listed, not counted."""

    consistent: int = 0
    differing: list[Difference] = field(default_factory=list)
    only_in_reference: list[tuple] = field(default_factory=list)
    only_in_new: list[tuple] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # mode → cells judged by it
    paired: dict[tuple, Paired] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return self.consistent + len(self.differing)

    @property
    def all_consistent(self) -> bool:
        return not self.differing


def allowed_difference(ref, new, same_machine: bool = False) -> tuple[str, float, float]:
    """(mode, lowest, highest v_new − v_ref) for one cell: the drift for the same seeds on the same
    machine, else MOVER of both intervals."""
    if same_machine and ref.seeds and ref.seeds == new.seeds:
        return SAME_SEEDS, -DRIFT, DRIFT
    return (OTHER_SEEDS, -math.hypot(ref.value - ref.ci_low, new.ci_high - new.value),
            math.hypot(ref.ci_high - ref.value, new.value - new.ci_low))


def compare(reference: pd.DataFrame, new: pd.DataFrame, paired: dict[tuple, Paired] | None = None,
            same_machine: bool = False) -> CompareResult:
    """Cell by cell: consistent iff lowest − 1e-12 ≤ Δ ≤ highest + 1e-12 (``allowed_difference``).

    Δ = v_new − v_ref; for a cell in ``paired`` (predictions of the same seeds on both sides), the paired
    change of top-1 on those images, judged against the drift: an altered prediction file shows there even
    where the recorded values agree.
    """
    paired = paired or {}
    new_rows = {tuple(getattr(row, c) for c in KEY): row for row in new.itertuples(index=False)}
    ref_keys = set()
    result = CompareResult(paired=paired)
    for row in reference.itertuples(index=False):
        key = tuple(getattr(row, c) for c in KEY)
        ref_keys.add(key)
        other = new_rows.get(key)
        if other is None:
            result.differing.append(Difference(key, float(row.value), float(row.ci_low), float(row.ci_high), None))
            result.only_in_reference.append(key)
            continue
        if key in paired:  # the same seeds' predictions on both sides: the images and the recorded values
            mode, lowest, highest = PAIRED, -DRIFT, DRIFT
            deltas = (paired[key].estimate, other.value - row.value)
        else:
            mode, lowest, highest = allowed_difference(row, other, same_machine)
            deltas = (other.value - row.value,)
        result.modes[mode] = result.modes.get(mode, 0) + 1
        if all(lowest - _SLACK <= d <= highest + _SLACK for d in deltas):
            result.consistent += 1
        else:
            result.differing.append(Difference(key, float(row.value), float(row.ci_low), float(row.ci_high),
                                               float(other.value), mode, (lowest, highest)))
    result.only_in_new = [k for k in new_rows if k not in ref_keys]
    return result


def _with_predictions(folder: Path):
    """The folder's results with absolute prediction paths, or None when it has no evaluations or they lack files."""
    table = folder / "evaluations.csv"
    if not folder.is_dir() or not table.is_file():
        return None
    datasets = pd.read_csv(table, usecols=["dataset"], dtype=str, keep_default_na=False)["dataset"].unique()
    if len(datasets) != 1:
        return None
    df = load_evaluations(table, datasets[0])
    named = [p for p in df["predictions"].unique() if p]
    # a results folder is results/<name> under its workflow's root, where the recorded paths start
    for root in (folder.resolve().parent.parent, Path.cwd()):
        if named and all((root / p).is_file() for p in named):
            df["predictions"] = [str(root / p) if p else "" for p in df["predictions"]]
            return Results(df)
    return None


def paired_cells(reference: Path, new: Path) -> dict[tuple, Paired]:
    """Per top-1 cell that both folders hold predictions of, for the same seeds: share changed, paired Δ top-1."""
    ref, other = _with_predictions(Path(reference)), _with_predictions(Path(new))
    if ref is None or other is None:
        return {}
    out = {}
    for s in ref.settings:
        twin = other.setting(s.model, s.noise, s.apply, s.site)
        for protocol in [p for p in PROTOCOLS if ref.values(s, p)] if twin else ():
            mine, theirs = ref.outcomes(s, protocol), other.outcomes(twin, protocol)
            seeds = [x for x in sorted(mine) if x in theirs and np.array_equal(mine[x][3], theirs[x][3])]
            if not seeds:
                continue
            changed = sum(int((mine[x][2] != theirs[x][2]).sum()) for x in seeds) / sum(mine[x][2].size for x in seeds)
            iv = stats.change_interval([theirs[x][0] for x in seeds], [mine[x][0] for x in seeds],
                                       [mine[x][1] for x in seeds])
            out[(s.model, s.noise, s.apply, s.site, protocol, "top1")] = Paired(changed, iv.estimate, iv.low, iv.high)
    return out


def _show_key(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _points(x: float) -> str:
    return f"{100 * x + 0.0:+.1f}"


def main(reference: Path, new: Path, out: TextIO | None = None, same_machine: bool = False) -> int:
    """Print the differing cells and one summary line; 0 when every reference cell is consistent, else 1.
    ``same_machine``: the new results were computed on the reference's machine (the same seeds then
    repeat the computation, and the per-image predictions are compared pair by pair)."""
    out = sys.stdout if out is None else out
    paired = paired_cells(reference, new) if same_machine else {}
    result = compare(read_cells(reference), read_cells(new), paired, same_machine)
    for d in result.differing:
        ref = f"reference {_pct(d.value)} [{_pct(d.ci_low)}, {_pct(d.ci_high)}]"
        if d.missing:
            print(f"missing from the new table: {_show_key(d.key)} ({ref})", file=out)
            continue
        low, high = d.allowed
        why = (f"outside the [{_points(low)}, {_points(high)}] points two independent estimates allow"
               if d.mode == OTHER_SEEDS else
               f"more than the {100 * DRIFT:.1f}-point floating-point drift allowed for the same seeds on one machine")
        line = f"differs: {_show_key(d.key)}: new {_pct(d.new_value)} against {ref}, {why}"
        if (p := result.paired.get(d.key)) is not None:
            line += (f"; {_pct(p.changed)} of the images predicted otherwise, paired change {_points(p.estimate)} "
                     f"[{_points(p.low)}, {_points(p.high)}] points")
        print(line, file=out)
    line = f"consistent with the reference: {result.consistent} of {result.n_cells} cells"
    if result.modes:
        line += " (" + ", ".join(f"{n} with {mode}" for mode, n in sorted(result.modes.items())) + ")"
    if result.paired:
        line += (f"; {len(result.paired)} paired on per-image predictions, at most "
                 f"{_pct(max(p.changed for p in result.paired.values()))} of a cell's images predicted otherwise")
    if result.differing:
        shown = [_show_key(d.key) for d in result.differing[:_SHOWN_KEYS]]
        more = len(result.differing) - len(shown)
        line += "; differing: " + ", ".join(shown) + (f" and {more} more" if more else "")
    print(line, file=out)
    return 0 if result.all_consistent else 1
