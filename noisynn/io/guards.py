"""Guarding outputs before the work that fills them: a path checked to be writable and not an input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from noisynn.errors import UserError


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``folder`` (or, where it does not exist yet, a folder in its
    nearest existing ancestor): the one test that also holds for root and read-only mounts."""
    where = _nearest_existing(folder)
    if not where.is_dir():
        raise UserError(f"{what} {target} cannot be created: {where} is a file, not a folder.")
    try:
        if where == Path(os.path.abspath(folder)):
            fd, probe = tempfile.mkstemp(prefix=".noisynn-write-test.", suffix=".tmp", dir=where)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".noisynn-write-test.", dir=where))
    except OSError as e:
        raise UserError(f"{what} {target} cannot be written ({e.strerror or type(e).__name__} in {where}); "
                        "choose a writable place.") from None


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder of that name, a
    parent that is a file, or a place without write permission."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; expected the path of a file to write.")
    _probe_writable(path.parent, what, path)


def check_output_folder(path: Path, what: str) -> None:
    """Refuse, before any work, a run folder that cannot be written (an existing file of that name,
    a parent that is a file, no write permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is an existing file; expected a folder (it is created if missing).")
    _probe_writable(path, what, path)


def check_not_an_input(output: Path, what: str, inputs: dict[str, Path]) -> None:
    """Refuse an output that would overwrite one of the run's inputs (``inputs``: description → path)."""
    out = os.path.abspath(output)
    for name, path in inputs.items():
        if path is not None and os.path.abspath(path) == out:
            raise UserError(f"{what} {output} is {name}; writing it would destroy an input, choose another path.")
