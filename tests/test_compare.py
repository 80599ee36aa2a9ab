"""noisynn.report.compare: a regeneration agrees when each new value lies in the reference's interval."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import report_fixture as fx

from noisynn.errors import UserError
from noisynn.report import compare
from noisynn.report.summary import make_report

ROWS = [
    # model, noise, apply, site, protocol, metric, value, ci_low, ci_high, n_seeds, n_units, seeds
    ("vit", "none", "none", "", "clean", "top1", 0.812, 0.801, 0.823, 3, 30000, "0 1 2"),
    ("vit", "linear-optimal", "train,eval", "blocks.3.attn", "released", "top1", 0.955, 0.947, 0.962, 3, 3000, "0 1 2"),
    ("vit", "linear-optimal", "train,eval", "blocks.3.attn", "batch1", "top1", 0.420, 0.405, 0.436, 3, 30000, "0 1 2"),
]


def _write(path: Path, rows=ROWS, columns=compare.CELLS_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r[: len(columns)] for r in rows], columns=columns).to_csv(path, index=False)
    return path


def _run(ref: Path, new: Path, same_machine: bool = True) -> tuple[int, list[str]]:
    out = io.StringIO()
    rc = compare.main(ref, new, out=out, same_machine=same_machine)
    return rc, out.getvalue().splitlines()


def _moved(row: tuple, value, seeds: str | None = None) -> tuple:
    """The row with a new value, its interval moved along with it."""
    shift = value - row[6] if isinstance(value, float) else 0.0
    return row[:6] + (value, row[7] + shift, row[8] + shift) + row[9:11] + ((row[11] if seeds is None else seeds),)


ALL_SAME = "consistent with the reference: 3 of 3 cells (3 with same seeds)"


def test_key_is_the_leading_columns():
    assert compare.KEY == compare.CELLS_COLUMNS[:6]
    assert compare.CELLS_COLUMNS[6:] == ["value", "ci_low", "ci_high", "n_seeds", "n_units", "seeds"]


def test_identical_tables_are_consistent(tmp_path):
    ref = _write(tmp_path / "ref.csv")
    new = _write(tmp_path / "new.csv")
    rc, lines = _run(ref, new)
    assert rc == 0
    assert lines == [ALL_SAME]


def test_same_seeds_are_judged_against_the_drift_not_the_interval(tmp_path):
    ref = _write(tmp_path / "ref.csv")
    # half a point: within the floating-point drift the README measured across machines
    rc, lines = _run(ref, _write(tmp_path / "drift.csv", [_moved(ROWS[0], 0.817), *ROWS[1:]]))
    assert rc == 0 and lines == [ALL_SAME]
    # two points: inside the reference's interval of 1.1 points? no matter: the same seeds cannot move that far
    moved = [ROWS[0], _moved(ROWS[1], 0.975), ROWS[2]]
    rc, lines = _run(ref, _write(tmp_path / "new.csv", moved))
    key = "vit/linear-optimal/train,eval/blocks.3.attn/released/top1"
    assert rc == 1 and len(lines) == 2 and key in lines[0] and "1.0-point floating-point drift" in lines[0]
    assert lines[-1] == f"consistent with the reference: 2 of 3 cells (3 with same seeds); differing: {key}"
    # a move inside the reference interval is still a difference for the same seeds
    rc, _ = _run(ref, _write(tmp_path / "inside.csv", [_moved(ROWS[0], 0.8225), *ROWS[1:]]))
    assert rc == 1


def test_other_seeds_are_judged_by_both_intervals(tmp_path):
    ref = _write(tmp_path / "ref.csv")
    # other seeds: the difference of two independent estimates may reach √(1.1² + 1.1²) ≈ 1.56 points here
    inside = [_moved(ROWS[0], 0.827, "3 4 5"), *(_moved(r, r[6], "3 4 5") for r in ROWS[1:])]
    assert 0.827 > ROWS[0][8]  # outside the reference's own interval, yet consistent
    rc, lines = _run(ref, _write(tmp_path / "new.csv", inside))
    assert rc == 0 and lines == ["consistent with the reference: 3 of 3 cells (3 with other seeds)"]
    outside = [_moved(ROWS[0], 0.835, "3 4 5"), *(_moved(r, r[6], "3 4 5") for r in ROWS[1:])]
    rc, lines = _run(ref, _write(tmp_path / "far.csv", outside))
    assert rc == 1 and "two independent estimates allow" in lines[0]
    # a table without the seeds column (written before it existed) is read as seeds unknown
    old = tmp_path / "old.csv"
    pd.DataFrame([r[:11] for r in ROWS], columns=compare.CELLS_COLUMNS[:11]).to_csv(old, index=False)
    assert _run(old, ref) == (0, ["consistent with the reference: 3 of 3 cells (3 with other seeds)"])


def test_the_seed_rules_match_their_formulas():
    row = pd.Series({"value": 0.8, "ci_low": 0.78, "ci_high": 0.81, "seeds": "0"})
    new = pd.Series({"value": 0.79, "ci_low": 0.76, "ci_high": 0.83, "seeds": "1"})
    mode, low, high = compare.allowed_difference(row, new)
    assert mode == compare.OTHER_SEEDS
    assert low == pytest.approx(-np.hypot(0.02, 0.04)) and high == pytest.approx(np.hypot(0.01, 0.03))
    assert compare.allowed_difference(row, row, same_machine=True) == (compare.SAME_SEEDS, -compare.DRIFT, compare.DRIFT)
    # on another machine the same seeds are another draw of the models: both intervals decide
    assert compare.allowed_difference(row, row)[0] == compare.OTHER_SEEDS


def test_a_regeneration_on_another_machine_is_judged_as_an_independent_estimate(tmp_path):
    """The same seeds on another CPU train other models (measured: up to 5.7 points on a cell), so by
    default the same seeds are judged by both intervals, and the per-image predictions are not paired."""
    ref = _write(tmp_path / "ref.csv")
    moved = [_moved(ROWS[0], 0.825), *ROWS[1:]]  # 1.3 points: over the drift, within √(1.1² + 1.1²) ≈ 1.56
    assert _run(ref, _write(tmp_path / "new.csv", moved), same_machine=True)[0] == 1
    rc, lines = _run(ref, tmp_path / "new.csv", same_machine=False)
    assert rc == 0 and lines == ["consistent with the reference: 3 of 3 cells (3 with other seeds)"]
    far = [_moved(ROWS[0], 0.835), *ROWS[1:]]
    rc, lines = _run(ref, _write(tmp_path / "far.csv", far), same_machine=False)
    assert rc == 1 and "two independent estimates allow" in lines[0]


def test_folders_are_accepted(tmp_path):
    _write(tmp_path / "ref" / "tables" / "cells.csv")
    _write(tmp_path / "new" / "tables" / "cells.csv")
    assert _run(tmp_path / "ref", tmp_path / "new") == (0, [ALL_SAME])
    assert _run(tmp_path / "ref", tmp_path / "new" / "tables" / "cells.csv")[0] == 0


def test_a_cell_missing_from_new_differs(tmp_path):
    ref = compare.read_cells(_write(tmp_path / "ref.csv"))
    new = compare.read_cells(_write(tmp_path / "new.csv", ROWS[:2]))
    result = compare.compare(ref, new)
    assert result.consistent == 2 and len(result.differing) == 1
    assert result.differing[0].missing and result.only_in_reference == [tuple(ROWS[2][:6])]
    rc, lines = _run(tmp_path / "ref.csv", tmp_path / "new.csv")
    assert rc == 1 and "missing" in lines[0]
    assert lines[-1].startswith("consistent with the reference: 2 of 3 cells (2 with same seeds); differing: ")


def test_a_cell_only_in_new_is_listed_not_counted(tmp_path):
    extra = ("vit", "gaussian", "eval", "blocks.3.attn", "clean", "top1", 0.5, 0.49, 0.51, 3, 30000, "0 1 2")
    ref = compare.read_cells(_write(tmp_path / "ref.csv"))
    new = compare.read_cells(_write(tmp_path / "new.csv", ROWS + [extra]))
    result = compare.compare(ref, new)
    assert result.all_consistent and result.n_cells == 3
    assert result.only_in_new == [extra[:6]]
    assert _run(tmp_path / "ref.csv", tmp_path / "new.csv")[0] == 0


def test_many_differences_show_only_the_first_keys(tmp_path):
    rows = [(f"m{i}", "none", "none", "", "clean", "top1", 0.5, 0.49, 0.51, 1, 100, "0") for i in range(5)]
    new = [_moved(r, 0.1) for r in rows]
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
    rows = [r[:8] + r[9:] for r in ROWS]  # ci_high left out
    path = tmp_path / "cells.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    with pytest.raises(UserError, match="ci_high"):
        compare.read_cells(path)


def test_bad_tables_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare.read_cells(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="more than once"):
        compare.read_cells(_write(tmp_path / "dup.csv", ROWS + [ROWS[0]]))
    bad = [_moved(ROWS[0], "n/a")] + ROWS[1:]
    with pytest.raises(UserError, match="value"):
        compare.read_cells(_write(tmp_path / "bad.csv", bad))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="cannot be read"):
        compare.read_cells(tmp_path / "empty.csv")


def _results_folder(root: Path, altered: tuple | None = None, record: bool = True) -> Path:
    """A synthetic results folder (evaluations.csv, predictions, tables/cells.csv); ``altered``: (model, noise,
    protocol, images) whose predictions are turned wrong for that many right images in every seed, and
    (``record``) its recorded top-1 with them."""
    paths = fx.build(root, sweeps=False)
    if altered is not None:
        model, noise, protocol, images = altered
        site = fx.MODELS[model][1][-1]
        table = pd.read_csv(paths["evaluations"], dtype=str, keep_default_na=False)
        for seed in fx.SEEDS:
            npz = root / f"results/{fx.DATASET}/{model}/evaluate/train~none/site~{site}/seed~{seed}/predictions.npz"
            arrays = dict(np.load(npz))
            name = f"{noise}|eval|{site}/{protocol}/pred"
            pred = arrays[name]
            right = np.flatnonzero(pred == fx.LABELS)[:images]
            pred[right] = (fx.LABELS[right] + 1) % fx.N_CLASSES
            np.savez(npz, **arrays)
            row = ((table["model"] == model) & (table["noise"] == noise) & (table["protocol"] == protocol)
                   & (table["metric"] == "top1") & (table["seed"] == str(seed)))
            table.loc[row, "value"] = str(float((pred == fx.LABELS).mean()))
        if record:
            table.to_csv(paths["evaluations"], index=False)
    make_report(paths["evaluations"], None, paths["paper"], root, fx.DATASET, only="summary")
    return root


def test_per_image_predictions_are_compared_paired_and_a_two_point_change_is_found_at_its_cell(tmp_path):
    ref = _results_folder(tmp_path / "ref")
    same = _results_folder(tmp_path / "same")
    rc, lines = _run(ref, same)
    assert rc == 0 and len(lines) == 1
    assert "with same seeds" in lines[0] and "0.0 % of a cell's images predicted otherwise" in lines[0]
    paired = compare.paired_cells(ref, same)
    assert len(paired) == len(compare.read_cells(ref)) and all(p.changed == 0 for p in paired.values())
    # four of the 200 images of one cell turned wrong in both seeds: two points
    altered = _results_folder(tmp_path / "altered", ("vit", "gaussian_s0.5", "shuffled", 4))
    rc, lines = _run(ref, altered)
    key = f"vit/gaussian_s0.5/eval/{fx.MODELS['vit'][1][-1]}/shuffled/top1"
    assert rc == 1 and len(lines) == 2 and key in lines[0]
    assert "2.0 % of the images predicted otherwise, paired change -2.0" in lines[0]
    assert lines[-1].endswith(f"differing: {key}")
    p = compare.paired_cells(ref, altered)[tuple(key.split("/"))]
    # the same four images in both seeds: 200 images of evidence, so the paired interval alone would not
    # flag it; the drift rule does, since the same seeds cannot move two points
    assert p.estimate == pytest.approx(-0.02) and p.low < -0.02 < p.high
    # the predictions altered after the evaluation recorded its top-1: the recorded values agree, the images do not
    unrecorded = _results_folder(tmp_path / "unrecorded", ("vit", "gaussian_s0.5", "shuffled", 4), record=False)
    assert compare.compare(compare.read_cells(ref), compare.read_cells(unrecorded)).all_consistent
    rc, lines = _run(ref, unrecorded)
    assert rc == 1 and lines[-1].endswith(f"differing: {key}")


def test_without_predictions_the_cells_alone_are_compared(tmp_path):
    ref = _results_folder(tmp_path / "ref")
    cells_only = tmp_path / "cells-only" / "tables"
    cells_only.mkdir(parents=True)
    (cells_only / "cells.csv").write_bytes((ref / "tables" / "cells.csv").read_bytes())
    assert compare.paired_cells(ref, cells_only.parent) == {}
    rc, lines = _run(ref, cells_only.parent)
    assert rc == 0 and "paired" not in lines[0]
