"""The local SLURM test cluster and the SLURM profiles work, before any real workflow uses them.

Run with `python -m pytest tests/test_slurm_cluster.py -m slurm`; needs root and apt-get.
"""

import re
import socket
import subprocess
import textwrap

import pytest

try:  # pytest's default import mode puts tests/ itself on sys.path
    from slurm_fixture import slurm_cluster  # noqa: F401
except ImportError:  # --import-mode=importlib, or tests/ made a package
    from tests.slurm_fixture import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sbatch_job_completes_and_writes_its_output(slurm_cluster, tmp_path):
    output = tmp_path / "job.out"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--output",
            str(output),
            "--wrap",
            "echo noisynn on $SLURM_JOB_ID",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip()

    assert slurm_cluster.wait_for_job(job_id) == "COMPLETED"
    assert output.read_text() == f"noisynn on {job_id}\n"


def test_srun_runs_two_tasks(slurm_cluster):
    ran = subprocess.run(
        ["srun", "-n", "2", "hostname"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert ran.stdout.split() == [socket.gethostname()] * 2


# Each SLURM status check that finds nothing finished delays the next one by 10 s more, so a
# test workflow costs about 15-30 s per wave of jobs: keep it to a few waves.
WORKFLOW = """
rule all:
    input:
        expand("out/{sample}.txt", sample=["a", "b"]),
        "out/model.txt",
        "out/retried.txt",


rule prepare_data:
    output:
        "out/{sample}.txt",
    shell:
        "echo $SLURM_JOB_ID > {output}"


# Named like a training rule, so that the profiles' GPU settings for it apply: on the localhost
# overlay it must run without a GPU, and with no more CPUs than the node has.
rule pretrain:
    input:
        expand("out/{sample}.txt", sample=["a", "b"]),
    output:
        "out/model.txt",
    threads: 8
    shell:
        "echo $SLURM_JOB_ID $SLURM_CPUS_PER_TASK > {output}"


# Fails on its first attempt; the retry only succeeds if mem_mb grew with `attempt`.
rule evaluate:
    output:
        "out/retried.txt",
    shell:
        "test {resources.mem_mb} -ge 2000 && echo $SLURM_JOB_ID {resources.mem_mb} > {output}"
"""


def test_snakemake_runs_each_job_as_a_slurm_job(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(textwrap.dedent(WORKFLOW))

    run = slurm_cluster.snakemake(tmp_path)

    assert run.returncode == 0, run.stdout
    job_ids = []
    for name in ["a", "b", "model", "retried"]:
        job_id = (tmp_path / "out" / f"{name}.txt").read_text().split()[0]
        assert re.fullmatch(r"\d+", job_id), f"out/{name}.txt holds no job id: {job_id}"
        assert slurm_cluster.job_state(job_id) == "COMPLETED"
        job_ids.append(job_id)
    assert len(set(job_ids)) == len(job_ids), f"jobs shared a SLURM job: {job_ids}"
    model = (tmp_path / "out" / "model.txt").read_text().split()
    assert model[1] == "1", "pretrain asked SLURM for more CPUs than max-threads allows"
    retried = (tmp_path / "out" / "retried.txt").read_text().split()
    assert retried[1] == "2000", "evaluate's retry did not get 1000 * attempt MB"
