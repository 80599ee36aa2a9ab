"""The Snakemake workflow: dry runs of every shipped config, a real tiny run, incremental reruns, lint."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from PIL import Image

from workflow_helpers import BIN, REPO, copy_repo, job_counts, snakemake


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def fake_imagefolder(tmp_path_factory):
    """A two-class ImageFolder with train/ and val/, standing in for ImageNet in dry runs."""
    root = tmp_path_factory.mktemp("fake-imagenet")
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / cls / "img.png")
    return root


def test_demo_config_dry_run_counts(repo_copy):
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none").stdout
    counts = job_counts(out)
    # config/config.yaml, by hand: 2 seeds × (vit: none + 3 gaussian + 3 impulse + 2 axes × 2 modes
    # + rows × 2 modes + 2 alphas × 2 modes + 3 more layer-sweep sites = 20;
    # resnet: 1 + 3 + 3 + 4 + 4 + 3 = 18) = 76 evaluations.
    # Fine-tunings: 2 seeds × (vit: vanilla + 5 trained with noise; resnet: vanilla + 4) = 22:
    # noise at evaluation only reuses the vanilla fine-tuning.
    assert counts == {"prepare_data": 1, "pretrain": 2, "finetune": 22, "evaluate": 76,
                      "aggregate": 1, "figures": 1, "default": 1}


def test_tiny_config_dry_run_counts(repo_copy):
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", "config/tiny.yaml").stdout
    # 1 seed × (vit: none, gaussian, impulse, optimal eval, optimal train+eval, shift, sweep blocks.0 = 7;
    # resnet likewise with layer3.0 = 7) = 14; fine-tunings: vanilla + optimal-trained per model = 4.
    assert job_counts(out) == {"prepare_data": 1, "pretrain": 2, "finetune": 4, "evaluate": 14,
                               "aggregate": 1, "figures": 1, "default": 1}


@pytest.mark.parametrize(
    "config, counts",
    [
        # 10 models × (none + optimal × 2 modes + shift × 2 axes × 2 modes + gaussian 2 × 2 + impulse 2 × 2
        # = 15) + layer sweeps (11 + 11 + 4 + 3 × 4 = 38) = 188; fine-tunings 10 × (1 + 1 + 2 + 2 + 2) = 80
        ("config/paper-imagenet.yaml", {"pretrain": 10, "finetune": 80, "evaluate": 188}),
        # 4 models × 2 seeds × (none + 3 optimal axes × 2 + 2 shifts × 2 + 3 gaussian + 3 impulse = 17)
        # + sweeps 4 × 3 × 2 = 24 → 160; fine-tunings 4 × 2 × (1 + 3 + 2) = 48
        ("config/tinyimagenet.yaml", {"pretrain": 4, "finetune": 48, "evaluate": 160}),
    ],
)
def test_paper_configs_dry_run_against_fake_imagefolder(repo_copy, fake_imagefolder, config, counts):
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", config,
                    "--config", f"dataset={{root: {fake_imagefolder}}}").stdout
    got = job_counts(out)
    assert {k: got[k] for k in counts} == counts
    assert got["prepare_data"] == 1 and got["aggregate"] == 1 and got["figures"] == 1


def test_paper_config_requests_gpus_declared(repo_copy, fake_imagefolder):
    """The training jobs carry the GPU, memory and runtime resources the config declares."""
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", "config/paper-imagenet.yaml",
                    "--config", f"dataset={{root: {fake_imagefolder}}}").stdout
    cfg = yaml.safe_load((repo_copy / "config/paper-imagenet.yaml").read_text())
    block = out.split("rule finetune:")[1].split("\n\n")[0]
    model = block.split("wildcards: model=")[1].split(",")[0]
    res = cfg["models"][model]["resources"]
    assert f"gpu={res['gpu']}" in block
    assert f"mem_mb={res['mem_mb']}" in block
    assert f"runtime={res['runtime']}" in block


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["pretrain"].update(epochs="four"), "pretrain.epochs"),
        (lambda c: c.update(colour="blue"), "colour"),
        (lambda c: c["models"]["vit"].update(timm_name="vit_does_not_exist"), "models.vit.timm_name"),
        (lambda c: c["noises"][1].update(kind="pink"), "noises.1.kind"),
        (lambda c: c["dataset"].update(kind="imagefolder", root="/no/such/dataset"), "dataset.root"),
        (lambda c: c["evaluate"].update(protocols=["clean", "sorted"]), "evaluate.protocols.1"),
    ],
)
def test_broken_config_stops_before_any_job(repo_copy, tmp_path, edit, key):
    cfg = yaml.safe_load((repo_copy / "config/tiny.yaml").read_text())
    edit(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake(repo_copy, "--cores", "1", "--workflow-profile", "none", "--configfile", str(bad),
                     "--directory", str(work), check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("noisynn: error: ") and str(bad) in lines[0] and key in lines[0]
    assert not (work / "results").exists() and not (work / "logs").exists()


def test_lint_has_no_findings():
    proc = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_snakefiles_are_snakefmt_formatted():
    files = ["Snakefile", "workflow/Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow/rules").glob("*.smk"))]
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_tiny_workflow_end_to_end_then_noop_then_incremental(repo_copy):
    snakemake(repo_copy, "--cores", "2", "--workflow-profile", "none", "--configfile", "config/tiny.yaml", timeout=1200)
    out = repo_copy / "results/digits-tiny"
    for name in ("audit", "strength", "layers", "entropy"):
        for ext in ("png", "pdf"):
            assert (out / f"figures/{name}.{ext}").stat().st_size > 0
    for name in ("audit", "strength", "layers", "entropy", "paper_vs_ours"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"tables/{name}.{ext}").stat().st_size > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "released" in summary and "shuffled" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"vit", "resnet"}
    table = (out / "evaluations.csv").read_text().splitlines()
    # 14 evaluations × 6 protocols × 3 metrics, plus the header
    assert len(table) == 14 * 6 * 3 + 1
    assert "git_commit" in table[0] and "seed" in table[0]
    # every job wrote its own log
    assert len(list((repo_copy / "logs/evaluate").rglob("*.log"))) == 14

    report = repo_copy / "results/report.html"
    snakemake(repo_copy, "--workflow-profile", "none", "--configfile", "config/tiny.yaml", "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 10_000 and "audit" in html

    again = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr

    # one more gaussian strength: two new evaluations (one per model), the tables, nothing else
    cfg = yaml.safe_load((repo_copy / "config/tiny.yaml").read_text())
    cfg["noises"][1]["strength"] = [0.5, 1.0]
    grown = repo_copy / "config/tiny-grown.yaml"
    grown.write_text(yaml.safe_dump(cfg))
    dry = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", str(grown))
    assert job_counts(dry.stdout) == {"evaluate": 2, "aggregate": 1, "figures": 1, "default": 1}
    snakemake(repo_copy, "--cores", "2", "--workflow-profile", "none", "--configfile", str(grown), timeout=600)
    assert len((out / "evaluations.csv").read_text().splitlines()) == 16 * 6 * 3 + 1
