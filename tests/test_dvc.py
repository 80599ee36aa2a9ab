"""DVC shares the workflow's costly results, and a second lab regenerates nothing after pulling them.

The fast tests read dvc.yaml, .dvc/config and what git tracks under results/. The slow ones play
two labs with real DVC and a real local remote, on two configs cut from the tiny one (lab_config):
one on its digits (written as config/config.yaml, so the demo stage's paths follow its dataset
name, digits-tiny) and one on MNIST-5k (written as config/mnist.yaml, whose stage names the
dataset mnist). Lab one runs `dvc repro` of those two stages in a copy of this working tree and
pushes; lab two clones lab one's repository, runs scripts/sync-results.sh, and must find every
file identical and Snakemake with nothing to do for either config. Corrupt bytes, in the remote or
in a cache, must never reach a workspace or a remote unnoticed.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder
from workflow_helpers import BIN, REPO, copy_repo, job_counts

TINY = "digits-tiny"
SECOND = "mnist"  # the tiny MNIST-5k config's dataset, the name the workflow-mnist stage writes out
CACHED = ("data", "vit", "resnet", "evaluations.csv")  # what DVC stores; the rest is in git
COMMITTED = ("figures", "tables", "SUMMARY.md", "metrics.json")
EMBEDDED_KINDS = ("digits", "mnist")  # data the repository's packages hold: no download, no folder to point at


def embedded_configs() -> set[str]:
    """The shipped configs that run on embedded data alone (the tests' tiny config aside): each needs its stage."""
    found = set()
    for path in sorted((REPO / "config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        datasets = [config.get("dataset"), config.get("pretrain_dataset")]
        if path.name != "tiny.yaml" and isinstance(config.get("models"), dict) and all(
                d is None or d.get("kind") in EMBEDDED_KINDS for d in datasets) and datasets[0]:
            found.add(f"config/{path.name}")
    return found


# --- the files as written ------------------------------------------------------------------------


def dvc_stages() -> dict[str, dict]:
    """The workflow stages of dvc.yaml (those that run Snakemake), by the config each runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {next(iter(s["params"][0])): s for s in stages.values() if "snakemake" in s["cmd"]}


def dvc_stage() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["workflow"]


def out_entries(stage: dict, key: str = "outs") -> dict[str, dict]:
    entries = {}
    for item in stage[key]:
        path, options = next(iter(item.items())) if isinstance(item, dict) else (item, {})
        entries[path] = options or {}
    return entries


def stage_root(config_file: str) -> str:
    """The results folder a stage names: the demo's from vars, the others' written out."""
    return "results/${dataset.name}" if config_file == "config/config.yaml" else \
        f"results/{yaml.safe_load((REPO / config_file).read_text())['dataset']['name']}"


def test_every_embedded_config_runs_under_dvc_with_its_own_config():
    stages = dvc_stages()
    assert set(stages) == embedded_configs()
    assert {"config/config.yaml", "config/mnist.yaml", "config/transfer.yaml", "config/architectures.yaml"} <= set(stages)
    for config_file, stage in stages.items():
        assert stage["cmd"].endswith(f"snakemake --cores all --configfile {config_file}"), config_file
        assert stage["params"] == [{config_file: None}], "the params are the whole config Snakemake reads"


def test_stage_caches_data_checkpoints_and_evaluations_and_never_deletes_them():
    for config_file, stage in dvc_stages().items():
        outs, root = out_entries(stage), stage_root(config_file)
        models = yaml.safe_load((REPO / config_file).read_text())["models"]
        for name in ("data", *models, "evaluations.csv", "sweeps.csv"):
            assert outs[f"{root}/{name}"].get("cache", True), name
            assert outs[f"{root}/{name}"].get("persist") is True, f"DVC would delete {name} before Snakemake runs"
        for name in ("figures", "tables", "SUMMARY.md"):
            assert outs[f"{root}/{name}"].get("cache") is False, f"{name} is committed to git, DVC must not cache it"
        metrics = out_entries(stage, "metrics")
        assert metrics[f"{root}/metrics.json"].get("cache") is False


def test_stage_names_the_dataset_and_model_folders_of_the_config_it_runs():
    """Each stage lists its config's dataset folder, one folder per model and the prepared data; a
    model added to a config must be added there."""
    for config_file, stage in dvc_stages().items():
        config = yaml.safe_load((REPO / config_file).read_text())
        root = stage_root(config_file)
        assert {str(Path(p).parent) for p in out_entries(stage)} | {str(Path(p).parent) for p in
                                                                      out_entries(stage, "metrics")} == {root}
        folders = {Path(p).name for p in out_entries(stage)} - {"evaluations.csv", "sweeps.csv", *COMMITTED}
        data = {"data", "pretrain-data"} if config.get("pretrain_dataset") else {"data"}
        assert folders == set(config["models"]) | data, config_file


def test_plots_name_the_demo_dataset():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    paths = [p if isinstance(p, str) else next(iter(next(iter(p.values()))["y"])) for p in plots]
    assert all(p.startswith("results/${dataset.name}/") for p in paths), paths


def test_stage_depends_on_code_workflow_and_the_config_it_runs():
    for stage in dvc_stages().values():
        # the code enters as its per-step digests (noisynn/pipeline/codedigest.py), which the code stage writes from noisynn/
        assert set(stage["deps"]) >= {"Snakefile", "workflow", "results/code-digest.json", "config/paper_results.csv"}
    code = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["code"]
    assert code["deps"] == ["noisynn"] and "noisynn.pipeline.codedigest --out results/code-digest.json" in code["cmd"]
    assert yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"] == ["config/config.yaml:dataset"]


def test_git_tracks_no_checkpoint_prediction_or_prepared_data():
    """What DVC caches is ignored by git in every dataset folder, and git holds none of it."""
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    heavy = [p for p in tracked if p.endswith((".safetensors", ".npz", "model.json")) or re.search(r"/(pretrain-)?data/", p)]
    assert not heavy, heavy[:5]
    for config_file, stage in dvc_stages().items():
        root = stage_root(config_file).replace("${dataset.name}", "digits")
        cached = [Path(p).name for p, o in out_entries(stage).items() if o.get("cache", True)]
        ignored = subprocess.run(["git", "check-ignore", *(f"{root}/{name}" for name in cached)], cwd=REPO,
                                 capture_output=True, text=True).stdout.split()
        assert ignored == [f"{root}/{name}" for name in cached], config_file


def test_default_remote_is_local_and_verifies_what_it_downloads():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    remote = config[f"'remote \"{config['core']['remote']}\"'"]
    assert "://" not in remote["url"], "the default remote must work on one machine, without credentials"
    assert remote.getboolean("verify"), "without verify, `dvc pull` hands over corrupt remote bytes unchecked"


def test_snakemake_bookkeeping_is_tracked_by_neither_git_nor_dvc():
    ignored = subprocess.run(["git", "check-ignore", ".snakemake/x", "logs/x"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert ignored == [".snakemake/x", "logs/x"]
    assert {".snakemake/", "logs/", "__pycache__/"} <= set((REPO / ".dvcignore").read_text().split())


# --- two labs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """This venv's dvc and snakemake first on PATH; DVC's user and site state kept out of $HOME."""
    state = tmp_path_factory.mktemp("dvc-state")
    e = dict(os.environ)
    e.update(
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="1",
        DVC_GLOBAL_CONFIG_DIR=str(state / "global"),
        DVC_SYSTEM_CONFIG_DIR=str(state / "system"),
        DVC_SITE_CACHE_DIR=str(state / "site"),
        GIT_AUTHOR_NAME="noisynn tests",
        GIT_AUTHOR_EMAIL="tests@noisynn.invalid",
        GIT_COMMITTER_NAME="noisynn tests",
        GIT_COMMITTER_EMAIL="tests@noisynn.invalid",
    )
    return e


def run(env: dict, cwd: Path, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def checksums(repo: Path) -> dict[str, str]:
    """sha256 of every file of the two stages' outputs, by path relative to the repository."""
    files = []
    for dataset in (TINY, SECOND):
        for name in (*CACHED, *COMMITTED):
            path = repo / "results" / dataset / name
            files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def clone(env: dict, lab_one: Path, dest: Path, remote: Path) -> Path:
    """A fresh clone of lab one's repository whose default remote points at ``remote``."""
    run(env, dest.parent, "git", "clone", "--quiet", str(lab_one), str(dest))
    run(env, dest, "dvc", "remote", "modify", "--local", "store", "url", str(remote))
    return dest


def written_logs(repo: Path) -> list[str]:
    """Job logs with content: every job that ran wrote one (`snakemake --touch` leaves them empty)."""
    return sorted(str(p) for p in (repo / "logs").rglob("*") if p.is_file() and p.stat().st_size)


def dry_run_jobs(env: dict, repo: Path, config: str = "config/config.yaml") -> dict[str, int]:
    out = run(env, repo, "snakemake", "--dry-run", "--configfile", config)
    return job_counts(out.stdout + out.stderr)


def lab_config(dataset: dict) -> dict:
    """The tiny config cut to what DVC's wiring needs, on ``dataset``: both models, the noise-free
    and the optimal-Q noise at evaluation, one epoch each, no layer sweep (what each noise and the
    sweep compute is the tiny workflow test's part)."""
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    config["dataset"] = dataset
    config["noises"] = [{"kind": "none"}, {"kind": "linear-optimal", "axis": ["batch"]}]
    config.pop("layer_sweep")
    for model in config["models"].values():
        model.pop("layer_sweep_sites")
    config["pretrain"].update(epochs=1, warmup_epochs=0)
    config["finetune"]["epochs"] = 1
    return config


STAGES = ("workflow", "workflow-mnist")  # what lab one reproduces; the other configs' stages stay unrun


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def lab_one(tmp_path_factory, env, remote) -> Path:
    """This working tree with two tiny configs (lab_config), reproduced by DVC, committed, and pushed."""
    repo = copy_repo(tmp_path_factory.mktemp("lab-one"))
    (repo / "dvc.lock").unlink(missing_ok=True)  # the demo's lock; the tiny run writes its own
    tiny = yaml.safe_load((REPO / "config/tiny.yaml").read_text())["dataset"]
    (repo / "config/config.yaml").write_text(yaml.safe_dump(lab_config(tiny), sort_keys=False))
    mnist = {"name": SECOND, "kind": "mnist", "image_size": 8, "split_seed": 0}  # the prepared file is mnist.npz
    (repo / "config/mnist.yaml").write_text(yaml.safe_dump(lab_config(mnist), sort_keys=False))
    run(env, repo, "git", "init", "--quiet")
    run(env, repo, "git", "add", "--all")
    run(env, repo, "git", "commit", "--quiet", "-m", "noisynn with two tiny configs")
    # the documented way to point a checkout at another store without editing a tracked file
    run(env, repo, "dvc", "remote", "modify", "--local", "store", "url", str(remote))
    run(env, repo, "dvc", "repro", *STAGES, timeout=1500)
    run(env, repo, "git", "add", "--all")
    run(env, repo, "git", "commit", "--quiet", "-m", "tiny results")
    run(env, repo, "dvc", "push")
    return repo


@pytest.fixture(scope="module")
def lab_two(tmp_path_factory, env, lab_one, remote) -> Path:
    """A clone of lab one's repository, then `scripts/sync-results.sh` as the README says."""
    repo = clone(env, lab_one, tmp_path_factory.mktemp("lab-two") / "repo", remote)
    assert not (repo / "results" / TINY / "vit").exists(), "checkpoints must come from DVC, not git"
    assert not (repo / "results" / SECOND / "data").exists(), "prepared data must come from DVC, not git"
    synced = run(env, repo, "scripts/sync-results.sh")
    assert "workflow-transfer (config/transfer.yaml) has no results in dvc.lock yet; skipped" in synced.stderr
    return repo


@pytest.mark.slow
def test_git_holds_the_summary_and_dvc_holds_the_checkpoints(env, lab_one):
    for stage, dataset in zip(STAGES, (TINY, SECOND)):
        tracked = run(env, lab_one, "git", "ls-files", f"results/{dataset}").stdout.split()
        assert f"results/{dataset}/SUMMARY.md" in tracked and f"results/{dataset}/metrics.json" in tracked
        assert any(p.startswith(f"results/{dataset}/figures/") for p in tracked)
        assert not [p for p in tracked if p.endswith((".safetensors", ".npz")) or "/data/" in p
                    or p.endswith("evaluations.csv")]
        lock = yaml.safe_load((lab_one / "dvc.lock").read_text())["stages"][stage]
        assert {o["path"] for o in lock["outs"]} >= {f"results/{dataset}/{name}" for name in CACHED}
    # the prepared data is named for its dataset
    assert (lab_one / "results" / SECOND / "data" / "mnist.npz").is_file()
    assert (lab_one / "results" / TINY / "data" / "digits.npz").is_file()
    status = run(env, lab_one, "dvc", "status", "--cloud", "--json")
    assert json.loads(status.stdout) == {}, "everything DVC caches is in the remote"


@pytest.mark.slow
def test_second_lab_pulls_identical_files_and_retrains_nothing(env, lab_one, lab_two):
    assert checksums(lab_two) == checksums(lab_one)
    assert len([p for p in checksums(lab_two) if f"/{SECOND}/" in p]) > 20
    assert dry_run_jobs(env, lab_two) == {}
    assert dry_run_jobs(env, lab_two, "config/mnist.yaml") == {}
    assert json.loads(run(env, lab_two, "dvc", "status", "--json", "code", *STAGES).stdout) == {}
    assert written_logs(lab_two) == [], "no workflow job ran in lab two"


@pytest.mark.slow
def test_sync_handles_pulled_files_in_the_worst_order(env, lab_one, lab_two):
    """Checkpoints older than the data they were trained on: Snakemake would retrain everything."""
    hour_ago = time.time() - 3600
    for dataset in (TINY, SECOND):
        for name in ("vit", "resnet", "evaluations.csv"):
            path = lab_two / "results" / dataset / name
            for p in [path, *path.rglob("*")]:
                os.utime(p, (hour_ago, hour_ago))
    for config in ("config/config.yaml", "config/mnist.yaml"):
        planned = dry_run_jobs(env, lab_two, config)
        assert planned.get("pretrain") == 2 and planned.get("finetune"), planned

    run(env, lab_two, "scripts/sync-results.sh")

    assert dry_run_jobs(env, lab_two) == {}
    assert dry_run_jobs(env, lab_two, "config/mnist.yaml") == {}
    assert checksums(lab_two) == checksums(lab_one)


@pytest.mark.slow
def test_sync_refuses_to_bless_results_of_another_config(env, lab_one, remote, tmp_path):
    """Touching would make Snakemake accept any files; results of other params must be recomputed."""
    lab = clone(env, lab_one, tmp_path / "lab", remote)
    config = yaml.safe_load((lab / "config/config.yaml").read_text())
    config["finetune"]["epochs"] += 1
    (lab / "config/config.yaml").write_text(yaml.safe_dump(config))

    synced = run(env, lab, "scripts/sync-results.sh", check=False)

    assert synced.returncode == 1
    assert "run `dvc repro`" in synced.stderr and re.search(r"modified:\s+finetune", synced.stderr)
    assert not (lab / ".snakemake").exists(), "Snakemake never ran, so nothing was touched"


@pytest.mark.slow
def test_metrics_and_plots_show_the_pulled_results(env, lab_one, lab_two, tmp_path):
    shown = json.loads(run(env, lab_two, "dvc", "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"][f"results/{TINY}/metrics.json"]["data"]
    assert metrics == json.loads((lab_one / "results" / TINY / "metrics.json").read_text())

    run(env, lab_two, "dvc", "plots", "show", "--out", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Top-1 of every setting under every evaluation protocol" in html  # the audit plot
    assert "Top-1 against noise strength" in html
    for name in ("headline", "audit", "strength", "layers", "entropy", "batch_size", "purity"):
        assert f"figures_{name}.png" in html


@pytest.mark.slow
def test_a_corrupt_object_in_the_remote_never_reaches_a_workspace(env, lab_one, remote, tmp_path):
    damaged = shutil.copytree(remote, tmp_path / "damaged-remote")
    obj = object_of(lab_one, f"results/{TINY}/resnet", "pretrain/model.safetensors")
    corrupt(damaged / obj)
    bad_sha = hashlib.sha256((damaged / obj).read_bytes()).hexdigest()

    lab = clone(env, lab_one, tmp_path / "lab-three", damaged)
    pulled = run(env, lab, "dvc", "pull", *STAGES, check=False)

    assert pulled.returncode != 0
    assert f"results/{TINY}/resnet" in pulled.stderr
    assert not (lab / ".dvc/cache" / obj).exists()
    assert bad_sha not in checksums(lab).values()
    assert (lab / "results" / TINY / "vit").is_dir(), "the undamaged outputs are still pulled"

    # Why .dvc/config sets `verify`: without it DVC trusts the remote and hands the bytes over.
    trusting = clone(env, lab_one, tmp_path / "lab-four", damaged)
    run(env, trusting, "dvc", "remote", "modify", "--local", "store", "verify", "false")
    run(env, trusting, "dvc", "pull", *STAGES)
    assert bad_sha in checksums(trusting).values()


@pytest.mark.slow
def test_a_corrupt_object_in_the_cache_is_reported_and_not_pushed(env, lab_one, remote, tmp_path):
    lab = clone(env, lab_one, tmp_path / "lab", remote)
    run(env, lab, "dvc", "pull", *STAGES)
    obj = lab / ".dvc/cache" / object_of(lab_one, f"results/{TINY}/resnet", "pretrain/model.safetensors")
    corrupt(obj)

    status = json.loads(run(env, lab, "dvc", "status", "--json", *STAGES).stdout)
    assert status == {"workflow": [{"changed outs": {f"results/{TINY}/resnet": "not in cache"}}]}

    run(env, lab, "dvc", "remote", "add", "--local", "fresh", str(tmp_path / "fresh-remote"))
    pushed = run(env, lab, "dvc", "push", "--remote", "fresh")
    assert obj.name not in {p.name for p in (tmp_path / "fresh-remote").rglob("*")}
    assert "missing cache files" in (pushed.stdout + pushed.stderr).lower()


@pytest.mark.slow
def test_experiment_with_a_params_override_reuses_the_pulled_checkpoints(env, lab_one, lab_two):
    """`dvc exp run -S` writes the config Snakemake reads; the same seeds mean no job at all."""
    before = checksums(lab_two)
    ran = run(env, lab_two, "dvc", "exp", "run", "workflow", "-S", "config/config.yaml:seeds=[0]")
    assert "Ran experiment" in ran.stdout + ran.stderr
    assert yaml.safe_load((lab_two / "config/config.yaml").read_text())["seeds"] == [0]
    assert checksums(lab_two) == before
    assert written_logs(lab_two) == [], "no workflow job ran"


@pytest.mark.slow
def test_an_image_folder_outside_the_repository_is_versioned_without_a_copy(env, tmp_path):
    """The README's way to record which ImageNet a result used: its hash in git, the images in place."""
    images = write_image_folder(tmp_path / "imagenet" / "train", {"n01440764": 2, "n01443537": 2})
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    run(env, repo, "git", "init", "--quiet")
    run(env, repo, "dvc", "init", "--quiet")
    run(env, repo, "dvc", "import-url", "--no-download", str(images.parent), "data/imagenet")

    def folder_hash() -> str:
        return yaml.safe_load((repo / "data/imagenet.dvc").read_text())["deps"][0]["md5"]

    first = folder_hash()
    assert first.endswith(".dir")
    assert not (repo / "data/imagenet").exists() and not (repo / ".dvc/cache").exists(), "nothing was copied"
    write_image_folder(images / "n01440764", {"extra": 1}, seed=5)
    run(env, repo, "dvc", "update", "--no-download", "data/imagenet.dvc")
    assert folder_hash() != first


# --- helpers for the corruption tests -----------------------------------------------------------


def object_of(repo: Path, out: str, relpath: str) -> Path:
    """The cache path (files/md5/xx/yyyy) of one file inside a directory output, from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["workflow"]
    dir_md5 = next(o["md5"] for o in lock["outs"] if o["path"] == out)
    listing = json.loads((repo / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == relpath)
    return Path("files/md5") / md5[:2] / md5[2:]


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of a file (same size), as a failing disk or transfer would."""
    path.chmod(0o644)  # DVC's cache objects are read-only
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_claims_stage_depends_on_every_result_the_ledger_reads():
    """results/CLAIMS.md is current only if each results folder the ledger names is one of its inputs."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["claims"]
    ledger = yaml.safe_load((REPO / "config/claims.yaml").read_text())["claims"]
    deps = set(stage["deps"])
    assert {"config/claims.yaml", "results/code-digest.json"} <= deps
    for claim in ledger:
        ours = claim.get("ours") or {}
        if ours.get("results"):
            assert f"{ours['results']}/evaluations.csv" in deps, claim["id"]
        if ours.get("selection"):  # per-epoch scores inside the run folders of a model
            assert any(ours["selection"].startswith(d + "/") for d in deps), claim["id"]
    assert stage["outs"] == [{"results/CLAIMS.md": {"cache": False}}]
