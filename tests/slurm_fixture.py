"""A one-node SLURM cluster on localhost for tests, started once per test module.

Use it from a test module with ``from slurm_fixture import slurm_cluster``; every test that asks
for ``slurm_cluster`` then runs against a cluster that `scripts/slurm-localhost.sh` started and
that is stopped after the module's last test, whether the tests passed or not.

The cluster needs root (it installs Debian packages and starts system daemons) and apt-get;
without either the tests are skipped. Everywhere else a cluster that fails to start is a test
failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm-localhost.sh"
CLUSTER_PROFILE = REPO_ROOT / "profiles" / "slurm"
LOCALHOST_PROFILE = REPO_ROOT / "profiles" / "slurm-localhost"

# Installing the packages on a fresh machine takes about 15 s; starting the daemons about 2 s.
START_TIMEOUT_S = 300
# Snakemake ignores SIGTERM while it waits for jobs, so runs are killed with SIGKILL.
SNAKEMAKE_TIMEOUT_S = 300

FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
}


def skip_reason() -> str | None:
    """Why this machine cannot host the test cluster, or None if it can."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it installs packages and starts daemons)"
    if shutil.which("apt-get") is None:
        return "the local SLURM cluster needs apt-get (Debian/Ubuntu) to install SLURM"
    return None


def run_cluster_script(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class SlurmCluster:
    """Handle on the running test cluster, with the few operations tests need."""

    start_seconds: float

    def job_state(self, job_id: str) -> str:
        """The job's state as squeue reports it, finished jobs included (for MinJobAge)."""
        result = subprocess.run(
            ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def wait_for_job(self, job_id: str, timeout: float = 60) -> str:
        """Poll until the job has finished; return its final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINISHED_STATES:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"SLURM job {job_id} still '{state}' after {timeout} s")

    def snakemake(
        self, workdir: Path, *args: str, timeout: float = SNAKEMAKE_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        """Run Snakemake in `workdir` on this cluster and return the finished process (output
        in .stdout). The localhost overlay goes in as the workflow profile, which also keeps
        the repository's profiles/default out of the run."""
        timeout_kill = ["timeout", "-s", "KILL", str(timeout)]
        snakemake = [sys.executable, "-m", "snakemake"]
        profiles = [
            "--profile",
            str(CLUSTER_PROFILE),
            "--workflow-profile",
            str(LOCALHOST_PROFILE),
        ]
        command = timeout_kill + snakemake + profiles + list(args)
        return subprocess.run(
            command,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    began = time.monotonic()
    try:
        started = run_cluster_script("start", timeout=START_TIMEOUT_S)
        if started.returncode != 0:
            pytest.fail(
                f"'{CLUSTER_SCRIPT.name} start' exited with {started.returncode}:\n"
                f"{started.stdout}{started.stderr}",
                pytrace=False,
            )
        yield SlurmCluster(start_seconds=time.monotonic() - began)
    finally:
        stopped = run_cluster_script("stop", timeout=120)
    # Reached only when nothing failed above, so it cannot hide the first error.
    assert (
        stopped.returncode == 0
    ), f"'{CLUSTER_SCRIPT.name} stop' failed:\n{stopped.stderr}"
