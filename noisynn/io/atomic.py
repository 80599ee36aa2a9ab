"""Writing results so that nothing half-written ever looks finished.

A file is written beside its final name and renamed onto it only when complete (``atomic_path``);
the temp files a killed process left are removed by ``remove_stale_temp_files``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

# atomic_path's temp files: "." + the final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp$")


def shared_file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0666 less the umask (0644 with umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    The file gets the umask's usual mode just before the rename, whatever wrote it: mkstemp
    creates 0600, and writers such as safetensors' ``save_file`` replace the file (and its mode).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # results are shared files (a lab's results folder): readable by the group as the rest are
        os.chmod(tmp, shared_file_mode())
        # on disk before the rename, so a node crash cannot leave an empty file under the final name
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(final: Path, obj) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def remove_stale_temp_files(folder: Path, finals: list[str] | None = None) -> list[Path]:
    """Delete the temp files ``atomic_path`` left in ``folder`` (a process killed mid-write).

    Only names of atomic_path's pattern (``.<final>.<8 characters>.tmp``), and, with ``finals``,
    only those of these final names. Call it where no other process writes the same files (a run
    folder under its lock, an output file about to be written). Returns what was deleted.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        m = _TEMP_NAME.match(entry.name)
        if m and (finals is None or m.group("final") in finals) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
