"""Writing results so that nothing half-written ever looks finished, and recording provenance."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; results are shared files, so give them the umask's usual mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
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


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that ran (``-dirty`` when the tree had changes), or ``unknown``."""
    here = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """Versions of what decides the numbers."""
    import numpy
    import timm
    import torch

    from noisynn import __version__

    return {
        "noisynn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def provenance(seed: int | None = None) -> dict:
    """Seed, commit and versions; the scheduler's job id too when SLURM ran the job."""
    record = {"seed": seed, "git_commit": git_commit(), "versions": versions()}
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record
