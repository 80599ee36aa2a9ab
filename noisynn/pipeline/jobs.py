"""How the workflow's jobs find this Python and this copy of noisynn (no torch import here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def job_environment(repo: Path) -> None:
    """Let workflow jobs find this Python first on PATH and import noisynn from ``repo``.

    Jobs inherit the environment (locally, and through sbatch's default --export=ALL on SLURM).
    """
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    paths = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(repo)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
