"""noisynn.report.compare: a regeneration agrees when each new value lies in the reference's interval."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from noisynn.errors import UserError
from noisynn.report import compare

ROWS = [
    # model, noise, apply, site, protocol, metric, value, ci_low, ci_high, n_seeds, n_units
    ("vit", "none", "none", "", "clean", "top1", 0.812, 0.801, 0.823, 3, 30000),
    ("vit", "linear-optimal", "train,eval", "blocks.3.attn", "released", "top1", 0.955, 0.947, 0.962, 3, 3000),
    ("vit", "linear-optimal", "train,eval", "blocks.3.attn", "batch1", "top1", 0.420, 0.405, 0.436, 3, 30000),
]


def _write(path: Path, rows=ROWS, columns=compare.CELLS_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r[: len(columns)] for r in rows], columns=columns).to_csv(path, index=False)
    return path


def _run(ref: Path, new: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    rc = compare.main(ref, new, out=out)
    return rc, out.getvalue().splitlines()


def test_key_is_the_leading_columns():
    assert compare.KEY == compare.CELLS_COLUMNS[:6]
    assert compare.CELLS_COLUMNS[6:] == ["value", "ci_low", "ci_high", "n_seeds", "n_units"]


def test_identical_tables_are_consistent(tmp_path):
    ref = _write(tmp_path / "ref.csv")
    new = _write(tmp_path / "new.csv")
    rc, lines = _run(ref, new)
    assert rc == 0
    assert lines == ["consistent with the reference: 3 of 3 cells"]


def test_a_value_inside_the_interval_is_consistent(tmp_path):
    moved = [ROWS[0][:6] + (0.823,) + ROWS[0][7:], ROWS[1][:6] + (0.95,) + ROWS[1][7:], ROWS[2]]
    rc, lines = _run(_write(tmp_path / "ref.csv"), _write(tmp_path / "new.csv", moved))
    assert rc == 0 and lines[-1] == "consistent with the reference: 3 of 3 cells"


def test_a_value_outside_the_interval_is_named(tmp_path):
    moved = [ROWS[0], ROWS[1][:6] + (0.90,) + ROWS[1][7:], ROWS[2]]
    rc, lines = _run(_write(tmp_path / "ref.csv"), _write(tmp_path / "new.csv", moved))
    assert rc == 1
    key = "vit/linear-optimal/train,eval/blocks.3.attn/released/top1"
    assert lines[-1] == f"consistent with the reference: 2 of 3 cells; differing: {key}"
    assert len(lines) == 2 and key in lines[0]
    assert "90.0 %" in lines[0] and "95.5 %" in lines[0] and "94.7 %" in lines[0]


def test_folders_are_accepted(tmp_path):
    _write(tmp_path / "ref" / "tables" / "cells.csv")
    _write(tmp_path / "new" / "tables" / "cells.csv")
    assert _run(tmp_path / "ref", tmp_path / "new") == (0, ["consistent with the reference: 3 of 3 cells"])
    assert _run(tmp_path / "ref", tmp_path / "new" / "tables" / "cells.csv")[0] == 0


def test_a_cell_missing_from_new_differs(tmp_path):
    ref = compare.read_cells(_write(tmp_path / "ref.csv"))
    new = compare.read_cells(_write(tmp_path / "new.csv", ROWS[:2]))
    result = compare.compare(ref, new)
    assert result.consistent == 2 and len(result.differing) == 1
    assert result.differing[0].missing and result.only_in_reference == [tuple(ROWS[2][:6])]
    rc, lines = _run(tmp_path / "ref.csv", tmp_path / "new.csv")
    assert rc == 1 and "missing" in lines[0]
    assert lines[-1].startswith("consistent with the reference: 2 of 3 cells; differing: ")


def test_a_cell_only_in_new_is_listed_not_counted(tmp_path):
    extra = ("vit", "gaussian", "eval", "blocks.3.attn", "clean", "top1", 0.5, 0.49, 0.51, 3, 30000)
    ref = compare.read_cells(_write(tmp_path / "ref.csv"))
    new = compare.read_cells(_write(tmp_path / "new.csv", ROWS + [extra]))
    result = compare.compare(ref, new)
    assert result.all_consistent and result.n_cells == 3
    assert result.only_in_new == [extra[:6]]
    assert _run(tmp_path / "ref.csv", tmp_path / "new.csv")[0] == 0


def test_many_differences_show_only_the_first_keys(tmp_path):
    rows = [(f"m{i}", "none", "none", "", "clean", "top1", 0.5, 0.49, 0.51, 1, 100) for i in range(5)]
    new = [r[:6] + (0.1,) + r[7:] for r in rows]
    rc, lines = _run(_write(tmp_path / "ref.csv", rows), _write(tmp_path / "new.csv", new))
    assert rc == 1 and len(lines) == 6
    assert lines[-1].endswith("differing: m0/none/none//clean/top1, m1/none/none//clean/top1, "
                              "m2/none/none//clean/top1 and 2 more")


def test_keys_stay_text(tmp_path):
    cells = compare.read_cells(_write(tmp_path / "ref.csv"))
    assert cells.loc[0, "site"] == "" and cells.loc[0, "noise"] == "none"
    assert cells["value"].dtype == float


def test_a_missing_column_is_named(tmp_path):
    columns = [c for c in compare.CELLS_COLUMNS if c != "ci_high"]
    rows = [r[:8] + r[9:] for r in ROWS]
    path = tmp_path / "cells.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    with pytest.raises(UserError, match="ci_high"):
        compare.read_cells(path)


def test_bad_tables_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare.read_cells(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="more than once"):
        compare.read_cells(_write(tmp_path / "dup.csv", ROWS + [ROWS[0]]))
    bad = [ROWS[0][:6] + ("n/a",) + ROWS[0][7:]] + ROWS[1:]
    with pytest.raises(UserError, match="value"):
        compare.read_cells(_write(tmp_path / "bad.csv", bad))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="cannot be read"):
        compare.read_cells(tmp_path / "empty.csv")
