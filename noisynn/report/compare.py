"""Does my regeneration agree? Check a new cells table against a reference one, cell by cell.

No torch import here: it reads two ``cells.csv`` tables (written by the report step) with pandas.
A cell agrees when the new value lies inside the reference's interval: ci_low ≤ v_new ≤ ci_high
(with 1e-12 float slack). A reference cell absent from the new table counts as differing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from noisynn.errors import UserError

CELLS_COLUMNS = ["model", "noise", "apply", "site", "protocol", "metric", "value", "ci_low", "ci_high", "n_seeds",
                 "n_units"]
KEY = ["model", "noise", "apply", "site", "protocol", "metric"]
_NUMERIC = [c for c in CELLS_COLUMNS if c not in KEY]
# Values are fractions written as decimal text; a round trip through CSV may move the last bit.
_SLACK = 1e-12
_SHOWN_KEYS = 3


def cells_path(path: Path) -> Path:
    """The cells table itself, or ``<folder>/tables/cells.csv`` for a results folder."""
    path = Path(path)
    return path / "tables" / "cells.csv" if path.is_dir() else path


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
    missing = [c for c in CELLS_COLUMNS if c not in cells.columns]
    if missing:
        raise UserError(f"cells table {path} lacks the column(s) {', '.join(missing)} "
                        f"(expected {', '.join(CELLS_COLUMNS)}).")
    if cells.empty:
        # "consistent: 0 of 0 cells" would read as agreement
        raise UserError(f"cells table {path} holds no cells (only its header); nothing can be compared with it.")
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
class Difference:
    """One reference cell the new table does not reproduce; ``new_value`` is None when it is missing."""

    key: tuple
    value: float
    ci_low: float
    ci_high: float
    new_value: float | None

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

    @property
    def n_cells(self) -> int:
        return self.consistent + len(self.differing)

    @property
    def all_consistent(self) -> bool:
        return not self.differing


def compare(reference: pd.DataFrame, new: pd.DataFrame) -> CompareResult:
    """Cell by cell: consistent iff ci_low_ref − 1e-12 ≤ v_new ≤ ci_high_ref + 1e-12."""
    new_value = {tuple(k): v for k, v in zip(new[KEY].itertuples(index=False, name=None), new["value"], strict=True)}
    ref_keys = set()
    result = CompareResult()
    for row in reference.itertuples(index=False):
        key = tuple(getattr(row, c) for c in KEY)
        ref_keys.add(key)
        v = new_value.get(key)
        if v is not None and row.ci_low - _SLACK <= v <= row.ci_high + _SLACK:
            result.consistent += 1
            continue
        result.differing.append(Difference(key, float(row.value), float(row.ci_low), float(row.ci_high),
                                           None if v is None else float(v)))
        if v is None:
            result.only_in_reference.append(key)
    result.only_in_new = [k for k in new_value if k not in ref_keys]
    return result


def _show_key(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def main(reference: Path, new: Path, out: TextIO | None = None) -> int:
    """Print the differing cells and one summary line; 0 when every reference cell is consistent, else 1."""
    out = sys.stdout if out is None else out
    result = compare(read_cells(reference), read_cells(new))
    for d in result.differing:
        ref = f"reference {_pct(d.value)} [{_pct(d.ci_low)}, {_pct(d.ci_high)}]"
        if d.missing:
            print(f"missing from the new table: {_show_key(d.key)} ({ref})", file=out)
        else:
            print(f"differs: {_show_key(d.key)}: new {_pct(d.new_value)} outside {ref}", file=out)
    line = f"consistent with the reference: {result.consistent} of {result.n_cells} cells"
    if result.differing:
        shown = [_show_key(d.key) for d in result.differing[:_SHOWN_KEYS]]
        more = len(result.differing) - len(shown)
        line += "; differing: " + ", ".join(shown) + (f" and {more} more" if more else "")
    print(line, file=out)
    return 0 if result.all_consistent else 1
