"""The workflow on a real one-node SLURM cluster: the same results as a local run, cancelled
training that resumes, and sbatch requests that match the config.

Run with `python -m pytest tests/test_slurm_workflow.py -m slurm`; needs root and apt-get (the
fixture starts the cluster of scripts/slurm-localhost.sh and stops it after the last test).

Each SLURM job costs about 10-30 s here: sbatch, a Snakemake that starts an `srun` step, a second
Snakemake inside it, then the `noisynn` command; and the plugin looks at the queue 1 s, 12 s,
33 s, 64 s ... after its last finished job. The whole tiny config (23 SLURM jobs in ~12 waves of
two) took 6-8 min on the 2-CPU CI machine, so the end-to-end test runs a smaller copy of it: the
ViT alone, with the noise-free and the optimal-Q noises (9 SLURM jobs, about 2-3 min).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from workflow_helpers import copy_repo, snakemake

try:  # pytest's default import mode puts tests/ itself on sys.path
    from slurm_fixture import slurm_cluster  # noqa: F401
except ImportError:  # --import-mode=importlib, or tests/ made a package
    from tests.slurm_fixture import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_CONFIG = "config/slurm-test.yaml"
DATASET = "results/digits-tiny"
VANILLA_VIT = f"{DATASET}/vit/finetune/noise~none/site~none/seed~0"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
SLURM_RUN_ID = re.compile(r"SLURM run ID: (\S+)")
RUNNING_AS = re.compile(r"noisynn: (\w+) running as SLURM job (\d+) on ")
RESUMING = re.compile(r"noisynn: resuming \S+ at epoch (\d+) step (\d+)")


def write_slurm_test_config(repo: Path, finetune_epochs: int | None = None) -> str:
    """The tiny config cut to the ViT with no noise and the optimal-Q noise (at evaluation, and
    in training too): every rule of the workflow, 7 SLURM jobs (the report's run locally)."""
    config = yaml.safe_load((repo / "config/tiny.yaml").read_text())
    config["models"] = {"vit": {**config["models"]["vit"], "layer_sweep_sites": []}}
    config["noises"] = [
        {"kind": "none"},
        {"kind": "linear-optimal", "axis": ["batch"], "apply": ["eval", "train+eval"]},
    ]
    if finetune_epochs is not None:
        config["finetune"]["epochs"] = finetune_epochs
    (repo / SLURM_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return SLURM_CONFIG


def submitted_jobs(output: str) -> list[tuple[str, str]]:
    """(rule, SLURM job id) of every sbatch submission Snakemake reports, in order. The rule is
    read from the SLURM log path, logs/slurm/rule_<rule>/[<wildcards>/]<id>.log."""
    jobs = []
    for job_id, log in SUBMITTED.findall(output):
        rule = next(part[len("rule_"):] for part in Path(log).parts if part.startswith("rule_"))
        jobs.append((rule, job_id))
    return jobs


def run_log_ids(repo: Path, rule: str) -> dict[Path, str]:
    """The SLURM job id each of the rule's job logs says it ran under."""
    ids = {}
    for log in sorted((repo / "logs" / rule).rglob("*.log")):
        found = RUNNING_AS.findall(log.read_text())
        assert found, f"{log} has no 'running as SLURM job' line"
        assert all(command == rule for command, _ in found), found
        ids[log] = found[-1][1]
    return ids


def assert_same_results(local: Path, cluster: Path) -> None:
    """Both runs produced the same evaluations (every protocol's metrics) and the same weights."""
    groups = sorted(p.relative_to(local) for p in local.glob("results/**/evaluations.json"))
    assert groups == sorted(p.relative_to(cluster) for p in cluster.glob("results/**/evaluations.json"))
    for rel in groups:
        ours, theirs = (json.loads((root / rel).read_text())["evaluations"] for root in (local, cluster))
        assert [e["setting"] for e in ours] == [e["setting"] for e in theirs]
        for mine, other in zip(ours, theirs):
            for protocol in mine["protocols"]:
                for metric in ("top1", "top5", "released_metric_top1", "released_metric_top5"):
                    assert mine["protocols"][protocol][metric] == other["protocols"][protocol][metric], (rel, protocol, metric)
    weights = sorted(p.relative_to(local) for p in local.glob("results/**/model.safetensors"))
    assert weights == sorted(p.relative_to(cluster) for p in cluster.glob("results/**/model.safetensors"))
    for rel in weights:
        ours, theirs = load_file(str(local / rel)), load_file(str(cluster / rel))
        assert ours.keys() == theirs.keys()
        differing = [name for name in ours if not torch.equal(ours[name], theirs[name])]
        assert not differing, f"{rel}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def test_tiny_workflow_on_slurm_equals_a_local_run(slurm_cluster, tmp_path):
    cluster_repo = copy_repo(tmp_path / "on-slurm")
    local_repo = copy_repo(tmp_path / "local")
    config = write_slurm_test_config(cluster_repo)
    write_slurm_test_config(local_repo)

    began = time.monotonic()
    run = slurm_cluster.snakemake(cluster_repo, "--configfile", config, timeout=900)
    seconds = time.monotonic() - began
    assert run.returncode == 0, run.stdout[-5000:]
    print(f"tiny workflow on SLURM: {seconds:.0f} s")

    jobs = submitted_jobs(run.stdout)
    rules = sorted(rule for rule, _ in jobs)
    # the report's jobs are local rules (seconds of plotting); everything else goes through sbatch
    assert rules == sorted(["prepare_data", "pretrain", "finetune", "finetune", "evaluate", "evaluate",
                            "aggregate"]), "not every job went through sbatch"
    assert len({job_id for _, job_id in jobs}) == len(jobs), f"jobs shared a SLURM job: {jobs}"
    for rule, job_id in jobs:
        # the plugin's log of the job (kept by the localhost profile) shows it ran the rule
        slurm_log = next((cluster_repo / "logs/slurm").glob(f"rule_{rule}/**/{job_id}.log"))
        assert f"localrule {rule}:" in slurm_log.read_text(), slurm_log
    # the training and evaluation commands name their SLURM job in the rule's own log
    for rule in ("pretrain", "finetune", "evaluate"):
        ids = run_log_ids(cluster_repo, rule)
        assert sorted(ids.values()) == sorted(job_id for r, job_id in jobs if r == rule)
    # and the evaluations record it
    evaluate_ids = {job_id for r, job_id in jobs if r == "evaluate"}
    recorded = {json.loads(p.read_text())["slurm_job_id"] for p in cluster_repo.glob("results/**/evaluations.json")}
    assert recorded == evaluate_ids

    # The same seeds locally. Snakemake gives every job OMP_NUM_THREADS = its threads (1 here)
    # in both executors, which is what makes the weights bit-identical.
    snakemake(local_repo, "--cores", "2", "--workflow-profile", "none", "--configfile", config, timeout=900)
    assert_same_results(local_repo, cluster_repo)


def read_progress(recovery: Path) -> int:
    """Epochs a training has finished, from its resume state (0 before the first one)."""
    try:
        return json.loads((recovery / "state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_cancelled_training_job_is_retried_and_resumes(slurm_cluster, tmp_path):
    repo = copy_repo(tmp_path / "on-slurm")
    # Enough epochs (about 0.3 s each) to cancel the job mid-way.
    config = write_slurm_test_config(repo, finetune_epochs=60)
    target = f"{VANILLA_VIT}/model.safetensors"
    # The data and the pretraining it starts from are made locally: this test is about the fine-tuning.
    snakemake(repo, f"{DATASET}/vit/pretrain/model.safetensors", "--cores", "2", "--workflow-profile", "none",
              "--configfile", config)
    uninterrupted = Path(shutil.copytree(repo, tmp_path / "uninterrupted", symlinks=True))

    output = tmp_path / "snakemake.out"
    run = slurm_cluster.start_snakemake(repo, target, "--configfile", config, output=output, timeout=600)
    try:
        recovery = repo / VANILLA_VIT / "recovery"
        deadline = time.monotonic() + 300
        while read_progress(recovery) < 1:
            assert run.poll() is None, f"Snakemake ended before the first epoch:\n{output.read_text()[-5000:]}"
            assert time.monotonic() < deadline, "no epoch finished within 300 s"
            time.sleep(0.2)
        run_id = SLURM_RUN_ID.search(output.read_text()).group(1)
        running = [job for job in slurm_cluster.jobs() if job["name"] == run_id and job["state"] == "RUNNING"]
        assert [job["comment"] for job in running] == ["rule_finetune_wildcards_vit_none_none_0"], running
        cancelled = running[0]["id"]
        subprocess.run(["scancel", cancelled], check=True)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    text = output.read_text()
    assert run.returncode == 0, text[-5000:]

    submissions = submitted_jobs(text)
    assert [rule for rule, _ in submissions] == ["finetune", "finetune"], "expected the job and one retry"
    (_, first), (_, retry) = submissions
    assert first == cancelled
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in text
    assert slurm_cluster.job_state(cancelled) == "CANCELLED"
    assert slurm_cluster.job_state(retry) == "COMPLETED"
    # Snakemake empties a job's log before each attempt, so the log is the retry's alone.
    log = next((repo / "logs/finetune").rglob("*.log")).read_text()
    assert RUNNING_AS.findall(log) == [("finetune", retry)]
    resumed = RESUMING.findall(log)
    assert resumed, f"the retry started over instead of resuming:\n{log[-3000:]}"
    epoch, step = map(int, resumed[0])
    assert epoch >= 1
    # A state saved at the end of an epoch says step 0; a later step means the training caught
    # SLURM's SIGTERM and saved where it was, so the signal reached the Python process.
    assert step >= 1, "the retry resumed from the last end-of-epoch state: SIGTERM never reached the training"
    run_dir = repo / VANILLA_VIT
    assert len((run_dir / "summary.csv").read_text().splitlines()) == 1 + 60
    assert json.loads((run_dir / "model.json").read_text())["slurm_job_id"] == retry

    # Cancelled and resumed, it ends with the weights of a run that was never interrupted.
    snakemake(uninterrupted, target, "--cores", "2", "--workflow-profile", "none", "--configfile", config)
    ours, theirs = load_file(str(uninterrupted / target)), load_file(str(repo / target))
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


FAKE_SBATCH = """#!/bin/sh
# Stands in for sbatch: records its arguments as a JSON file of its own and submits nothing.
# One file per call: the plugin runs many sbatch at once, and their appends to one file interleave.
"{python}" -c 'import json, sys, tempfile; f = tempfile.NamedTemporaryFile("w", dir=sys.argv[1], suffix=".json", delete=False); json.dump(sys.argv[2:], f)' "{record}" "$@"
echo "sbatch: error: recorded by the test, nothing submitted" >&2
exit 1
"""
TARGET_JOB = re.compile(r"--target-jobs '(\w+):model=([^,']+)")


def sbatch_calls(record: Path) -> list[dict]:
    """Each recorded sbatch call as {rule, model, args}."""
    calls = []
    for path in sorted(record.glob("*.json")):
        args = json.loads(path.read_text())
        wrapped = next(a for a in args if a.startswith("--wrap="))
        rule, model = TARGET_JOB.search(wrapped).groups()
        calls.append({"rule": rule, "model": model, "args": args})
    return calls


def option(args: list[str], name: str) -> list[str]:
    """Every value of an sbatch option, given as `name value` or `name=value`."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return values + [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]


def test_paper_config_training_jobs_request_the_declared_resources(slurm_cluster, tmp_path):
    """The real plugin with profiles/slurm alone (as on a real cluster), against the test cluster
    for its partition lookups; only sbatch is replaced by a recorder, since no job of the paper's
    size fits this node."""
    repo = copy_repo(tmp_path / "repo")
    imagenet = tmp_path / "fake-imagenet"
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (imagenet / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(imagenet / split / cls / "img.png")
    paper = yaml.safe_load((repo / "config/paper-imagenet.yaml").read_text())
    models = paper["models"]
    dataset_root = f"dataset={{root: {imagenet}}}"
    snakemake(repo, "results/imagenet1k/data", "--cores", "1", "--workflow-profile", "none",
              "--configfile", "config/paper-imagenet.yaml", "--config", dataset_root)

    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable, record=record))
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def submit_all(*args: str) -> None:
        """Every ready job tried once: each sbatch call fails, so nothing waits on SLURM."""
        run = slurm_cluster.snakemake(repo, *args, "--retries", "0", "--keep-going", "--jobs", "200",
                                      "--slurm-status-command", "squeue",
                                      "--slurm-init-seconds-before-status-checks", "1",
                                      "--config", dataset_root, workflow_profile="none", env=env, timeout=300)
        assert run.returncode == 1 and "SLURM sbatch failed" in run.stdout, run.stdout[-3000:]

    # Fine-tuning: stand-ins for the imported weights make every fine-tuning ready at once.
    stand_ins = [repo / f"results/imagenet1k/{m}/imported/{name}" for m in models for name in ("model.safetensors", "model.json")]
    for path in stand_ins:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    submit_all("--configfile", "config/paper-imagenet.yaml")
    for path in stand_ins:
        path.unlink()
    # Pretraining is a training job only for models that do not skip it; the paper's all do.
    pretraining = {**paper, "models": {m: {**c, "skip_pretrain": False} for m, c in models.items()}}
    (repo / "config/paper-pretraining.yaml").write_text(yaml.safe_dump(pretraining, sort_keys=False))
    submit_all(*(f"results/imagenet1k/{m}/pretrain/model.safetensors" for m in models),
               "--configfile", "config/paper-pretraining.yaml")

    calls = sbatch_calls(record)
    # one pretraining and 8 fine-tunings per model (vanilla, optimal-Q, 2 shifts, 2 Gaussian, 2 impulse)
    assert Counter((c["rule"], c["model"]) for c in calls) == Counter(
        {**{("pretrain", m): 1 for m in models}, **{("finetune", m): 8 for m in models}})
    profile = yaml.safe_load((repo / "profiles/slurm/config.yaml").read_text())
    for call in calls:
        args, declared = call["args"], models[call["model"]]["resources"]
        where = f"{call['rule']} {call['model']}: {' '.join(a for a in args if not a.startswith('--wrap'))}"
        assert option(args, "--gpus") == [str(declared["gpu"])], where
        assert option(args, "--gres") == [], where
        cpus_per_gpu = profile["set-resources"][call["rule"]]["cpus_per_gpu"]
        assert option(args, "--cpus-per-gpu") == [str(cpus_per_gpu)], where
        assert option(args, "--cpus-per-task") == [], where
        assert option(args, "--mem") == [str(declared["mem_mb"])], where
        assert option(args, "-t") == [str(declared["runtime"])], where
        assert "--requeue" in args, where
        # the profile leaves the partition empty: the plugin asks the cluster for its default
        assert option(args, "-p") == ["debug"], where
