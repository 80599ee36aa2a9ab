"""What ran: the seed, the code's commit and the versions that decide the numbers."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that ran, or ``unknown``; ``-dirty`` when a tracked file other than
    the results had changes. A run rewrites committed results as it goes (``results/``, and
    ``dvc.lock``, which ``dvc repro`` updates between its stages): those are not code."""
    here = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results",
                                ":(top,exclude)dvc.lock"], cwd=here,
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


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (a prepared dataset can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
