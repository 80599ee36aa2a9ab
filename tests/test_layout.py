"""The README's layout table names every module of the package, in the row of its own package, and
nothing that is not there: a reader finds a module from the table and a file from the names alone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _table_rows() -> dict[str, set[str]]:
    """Each `noisynn…/` row of the README's layout table: the package → the names in backticks."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| `(noisynn/(?:\w+/)?)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rows


def test_the_layout_table_names_each_module_in_its_package_s_row():
    rows = _table_rows()
    packages = {f"{p.relative_to(REPO).as_posix()}/" for p in [REPO / "noisynn", *(REPO / "noisynn").glob("*/")]
                if (p / "__init__.py").is_file()}
    assert set(rows) == packages
    for package, named in rows.items():
        modules = {p.stem for p in (REPO / package).glob("*.py") if not p.stem.startswith("__")}
        assert modules <= named, f"{package}: the README's layout table leaves out {sorted(modules - named)}"
        # a backticked name that is no module here must not be one of another package (a stale row)
        others = {p.stem for p in (REPO / "noisynn").rglob("*.py")} - modules
        assert not (named & others - modules), f"{package}: the row names {sorted(named & others)}, modules elsewhere"
