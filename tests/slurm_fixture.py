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

    def jobs(self) -> list[dict[str, str]]:
        """Every job squeue still reports (finished ones for MinJobAge): id, name, comment, state.
        Snakemake's SLURM plugin names each job after its run (the "SLURM run ID" it prints) and
        puts `rule_<rule>_wildcards_<values>` in the comment."""
        result = subprocess.run(
            ["squeue", "-h", "--states=all", "-o", "%i|%j|%k|%T"],
            capture_output=True,
            text=True,
            check=True,
        )
        keys = ("id", "name", "comment", "state")
        return [dict(zip(keys, line.split("|"))) for line in result.stdout.splitlines()]

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

    def snakemake_command(
        self,
        *args: str,
        workflow_profile: Path | str = LOCALHOST_PROFILE,
        timeout: float = SNAKEMAKE_TIMEOUT_S,
    ) -> list[str]:
        """The command line of a Snakemake run on this cluster: profiles/slurm, then
        `workflow_profile` as the workflow profile (the localhost overlay by default; "none" for
        profiles/slurm alone, as on a real cluster). Either way the repository's profiles/default
        stays out of the run."""
        timeout_kill = ["timeout", "-s", "KILL", str(timeout)]
        snakemake = [sys.executable, "-m", "snakemake"]
        profiles = [
            "--profile",
            str(CLUSTER_PROFILE),
            "--workflow-profile",
            str(workflow_profile),
        ]
        return timeout_kill + snakemake + profiles + list(args)

    def snakemake(
        self,
        workdir: Path,
        *args: str,
        timeout: float = SNAKEMAKE_TIMEOUT_S,
        workflow_profile: Path | str = LOCALHOST_PROFILE,
        env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        """Run Snakemake in `workdir` on this cluster and return the finished process (output
        in .stdout)."""
        return subprocess.run(
            self.snakemake_command(
                *args, workflow_profile=workflow_profile, timeout=timeout
            ),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def start_snakemake(
        self,
        workdir: Path,
        *args: str,
        output: Path,
        timeout: float = SNAKEMAKE_TIMEOUT_S,
    ) -> subprocess.Popen:
        """Start Snakemake in `workdir` on this cluster (localhost overlay) in the background,
        its output going to the file `output`; the caller waits for it."""
        with open(output, "w") as sink:
            return subprocess.Popen(
                self.snakemake_command(*args, timeout=timeout),
                cwd=workdir,
                stdout=sink,
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
