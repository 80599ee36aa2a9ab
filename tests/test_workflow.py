"""The Snakemake workflow: dry runs of every shipped config, a real tiny run, incremental reruns, lint."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from PIL import Image
from workflow_helpers import BIN, REPO, copy_repo, job_counts, snakemake

from noisynn.vocab import PROTOCOLS

# the report: seven figures, each its own job, and the summary with every table
REPORT = {**{f"figure_{n}": 1 for n in ("headline", "audit", "strength", "layers", "entropy", "batch_size", "purity")},
          "summary": 1}


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
    # resnet: 1 + 3 + 3 + 4 + 4 + 3 = 18) = 76 evaluations, in 34 jobs: per seed and model, one pass
    # at the default site (the vanilla model and every eval-only setting there), one per other sweep
    # site (3), one per noise-trained checkpoint (vit 5, resnet 4): 2 × (9 + 8) = 34.
    # Fine-tunings: 2 seeds × (vit: vanilla + 5 trained with noise; resnet: vanilla + 4) = 22:
    # noise at evaluation only reuses the vanilla fine-tuning.
    assert counts == {"prepare_data": 1, "pretrain": 2, "finetune": 22, "evaluate": 34,
                      "aggregate": 1, **REPORT, "default": 1}


def test_the_local_profile_evaluates_each_model_in_one_job(repo_copy):
    """profiles/default (evaluate.jobs: model): one job per model over all its checkpoints, sites and
    seeds, 2 start-ups for the demo's 34 groups, writing the same files as the per-site jobs, each job
    after every training of its model."""
    local = snakemake(repo_copy, "-n", "-p").stdout
    counts = job_counts(local)
    evaluations = {rule: n for rule, n in counts.items() if rule.startswith("evaluate")}
    assert evaluations == {"evaluate_vit": 1, "evaluate_resnet": 1}
    assert {k: v for k, v in counts.items() if k not in evaluations} == {
        "prepare_data": 1, "pretrain": 2, "finetune": 22, "aggregate": 1, **REPORT, "default": 1}
    per_site = snakemake(repo_copy, "-n", "-p", "--workflow-profile", "none").stdout

    def written(dry: str) -> list[str]:
        return sorted(path for line in dry.splitlines() if line.strip().startswith("output:") and "/evaluate/" in line
                      for path in line.split(":", 1)[1].replace(",", " ").split())

    assert written(local) == written(per_site) and len(written(local)) == 2 * 34
    job = local[local.index("rule evaluate_vit:"):]
    job = job[:job.index("\n\n")]
    read = [p for line in job.splitlines() if line.strip().startswith("input:")
            for p in line.split(":", 1)[1].replace(",", " ").split()]
    # the vanilla fine-tuning and the five noises trained with, for each of the two seeds
    assert sum(p.startswith("results/digits/vit/finetune/") and p.endswith(".safetensors") for p in read) == 12


def test_tiny_config_dry_run_counts(repo_copy):
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", "config/tiny.yaml").stdout
    # 1 seed × (vit: none, gaussian, impulse, optimal eval, optimal train+eval, shift, sweep blocks.0 = 7;
    # resnet likewise with layer3.0 = 7) = 14 evaluations in 6 jobs (per model: the default site's
    # pass, the other sweep site, the optimal-trained checkpoint); fine-tunings: vanilla + optimal-trained
    # per model = 4.
    assert job_counts(out) == {"prepare_data": 1, "pretrain": 2, "finetune": 4, "evaluate": 6,
                               "aggregate": 1, **REPORT, "default": 1}


@pytest.mark.slow  # each config checks its models on the meta device first: 15-20 s of torch per config
@pytest.mark.parametrize(
    "config, counts",
    [
        # 15 models (the paper's ten, DeiT, Swin, BEiT, ConViT, EfficientNetV2-B0) × (none + optimal × 2 modes
        # + shift × 2 axes × 2 modes + gaussian 2 × 2 + impulse 2 × 2 = 15) + layer sweeps (11 + 11 + 4 + 3 × 4
        # = 38) = 263 evaluations in 15 default-site passes + 38 sweep sites + 15 × 7 noise-trained
        # checkpoints = 158 jobs; fine-tunings 15 × 8 = 120; timm's weights are imported as loaded
        ("config/paper-imagenet.yaml", {"import_weights": 15, "finetune": 120, "evaluate": 158}),
        # 4 models × 2 seeds × (none + 3 optimal axes × 2 + 2 shifts × 2 + 3 gaussian + 3 impulse = 17)
        # + sweeps 4 × 3 × 2 = 24 → 160 evaluations in 2 × (4 + 12 + 4 × 5) = 72 jobs; fine-tunings 48
        ("config/tinyimagenet.yaml", {"import_weights": 4, "finetune": 48, "evaluate": 72}),
        # the decisive audit: 10 models × 2 preprocessing arms (timm's, the released code's) × 9 eval-only
        # settings, one pass per model and arm, no training job
        ("config/imagenet-audit.yaml", {"import_weights": 20, "evaluate": 20}),
    ],
)
def test_paper_configs_dry_run_against_fake_imagefolder(repo_copy, fake_imagefolder, config, counts):
    out = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", config,
                    "--config", f"dataset={{root: {fake_imagefolder}}}").stdout
    got = job_counts(out)
    assert {k: got[k] for k in counts} == counts
    assert got["prepare_data"] == 1 and got["aggregate"] == 1 and got["summary"] == 1
    assert "pretrain" not in got
    if "audit" in config:
        assert "finetune" not in got, "the audit of released weights trains nothing"
        # the released code's weights, each imported for both preprocessing arms
        shown = snakemake(repo_copy, "-n", "-p", "--workflow-profile", "none", "--configfile", config, "--config",
                          f"dataset={{root: {fake_imagefolder}}}", "--until", "import_weights").stdout
        for tag in ("vit_base_patch16_224.augreg_in21k_ft_in1k", "resnet50.tv2_in1k", "resnet18.tv_in1k"):
            imports = [line for line in shown.splitlines() if "import-weights" in line and tag in line]
            assert len(imports) == 2 and sum('"preprocess": "released"' in line for line in imports) == 1, tag


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, counts",
    [
        # 2 models × 2 seeds × (default-site pass + the optimal-trained checkpoint) = 8 evaluations jobs
        ("config/mnist.yaml", {"prepare_data": 1, "pretrain": 2, "finetune": 8, "evaluate": 8}),
        # pretraining on MNIST-5k (its own prepare job), fine-tuning and evaluation on digits
        ("config/transfer.yaml", {"prepare_data": 1, "prepare_pretrain_data": 1, "pretrain": 2, "finetune": 8,
                                  "evaluate": 8}),
        # DeiT, Swin, BEiT, ConViT, EfficientNetV2: each pretrained, then audited as it is (no fine-tuning)
        ("config/architectures.yaml", {"prepare_data": 1, "pretrain": 5, "evaluate": 5}),
    ],
)
def test_embedded_data_configs_dry_run(repo_copy, config, counts):
    got = job_counts(snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", config).stdout)
    assert {k: v for k, v in got.items() if k in counts or k in ("finetune", "import_weights")} == counts
    assert got["summary"] == 1


@pytest.mark.slow
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
        (lambda c: c["noises"][4].update(alpha=[0.0]), "noises.4.alpha.0"),  # the shift at alpha 0: the identity
        (lambda c: c["finetune"].update(min_lr=1.0), "finetune.min_lr"),
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
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
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


def _dry_counts(repo, *args) -> dict[str, int]:
    dry = snakemake(repo, "-n", "--workflow-profile", "none", "--configfile", "config/tiny.yaml", *args)
    return job_counts(dry.stdout + dry.stderr)


def _edited(path, old: str, new: str):
    """Edit a file of the copy; returns a function that restores it."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return lambda: path.write_text(text)


@pytest.mark.slow
def test_tiny_workflow_end_to_end_then_noop_then_code_changes_then_incremental(repo_copy):
    snakemake(repo_copy, "--cores", "2", "--workflow-profile", "none", "--configfile", "config/tiny.yaml", timeout=1200)
    out = repo_copy / "results/digits-tiny"
    for name in ("headline", "audit", "strength", "layers", "entropy", "batch_size", "purity"):
        for ext in ("png", "pdf"):
            assert (out / f"figures/{name}.{ext}").stat().st_size > 0
    for name in ("audit", "strength", "layers", "entropy", "changes", "paper_vs_ours"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"tables/{name}.{ext}").stat().st_size > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "released" in summary and "shuffled" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"vit", "resnet"}
    table = (out / "evaluations.csv").read_text().splitlines()
    # 14 evaluations × 6 protocols × 4 metrics (top-1, top-5, their released running means), plus the header
    assert len(table) == 14 * 6 * 4 + 1
    assert "git_commit" in table[0] and "seed" in table[0]
    # every job wrote its own log
    assert len(list((repo_copy / "logs/evaluate").rglob("*.log"))) == 6
    first_cells = repo_copy / "first-cells.csv"
    shutil.copy(out / "tables/cells.csv", first_cells)

    report = repo_copy / "results/report.html"
    snakemake(repo_copy, "--workflow-profile", "none", "--configfile", "config/tiny.yaml", "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 10_000 and "headline" in html

    assert _dry_counts(repo_copy) == {}, "a second run must find nothing to do"

    # Code is an input. A docstring or a comment changes nothing ...
    restore = _edited(repo_copy / "noisynn/noise.py", '"""The noises of NoisyNN', '"""The noises (reworded) of NoisyNN')
    assert _dry_counts(repo_copy) == {}
    restore()
    # ... the reporting code reruns the report only ...
    restore = _edited(repo_copy / "noisynn/report/aggregate.py", 'rows.append(row)', 'rows.append(dict(row))')
    assert _dry_counts(repo_copy) == {"aggregate": 1, **REPORT, "default": 1}
    restore()
    # ... one plotting function redraws its figure alone (the summary links figures, never reads them) ...
    restore = _edited(repo_copy / "noisynn/report/plots.py", "def purity_figure(r: Results, dataset: str):\n",
                      "def purity_figure(r: Results, dataset: str):\n    _unused = 1\n")
    assert _dry_counts(repo_copy) == {"figure_purity": 1}
    restore()
    # ... and the noise code reruns every step that imports it: the trainings (a vanilla one builds a
    # noise record and cuts its validation batches with the injection code), the evaluations, the report
    restore = _edited(repo_copy / "noisynn/noise.py", "return (x + x.sum(dim=dim, keepdim=True)) / (k + 1)",
                      "return (x + x.sum(dim=dim, keepdim=True)) / (k + 1.0)")
    assert _dry_counts(repo_copy) == {"pretrain": 2, "finetune": 4, "evaluate": 6, "aggregate": 1, **REPORT, "default": 1}
    restore()
    assert _dry_counts(repo_copy) == {}

    # one more gaussian strength: it joins each model's default-site pass, which reruns, then the report
    cfg = yaml.safe_load((repo_copy / "config/tiny.yaml").read_text())
    cfg["noises"][1]["strength"] = [0.5, 1.0]
    grown = repo_copy / "config/tiny-grown.yaml"
    grown.write_text(yaml.safe_dump(cfg))
    dry = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", str(grown))
    assert job_counts(dry.stdout) == {"evaluate": 2, "aggregate": 1, **REPORT, "default": 1}
    snakemake(repo_copy, "--cores", "2", "--workflow-profile", "none", "--configfile", str(grown), timeout=600)
    assert len((out / "evaluations.csv").read_text().splitlines()) == 16 * 6 * 4 + 1
    # the reran passes reproduce the first run's cells (same seeds, same machine), and compare says so
    compare = subprocess.run([str(BIN / "noisynn"), "compare", "--same-machine", str(first_cells), str(out)],
                             capture_output=True, text=True)
    assert compare.returncode == 0 and "consistent with the reference:" in compare.stdout, compare.stdout + compare.stderr
    key = ["model", "noise", "apply", "site", "protocol", "metric"]
    first = pd.read_csv(first_cells)
    again = first.merge(pd.read_csv(out / "tables/cells.csv"), on=key, suffixes=("", "_again"))
    assert len(again) == len(first) and (again["value"] == again["value_again"]).all()


@pytest.mark.slow
def test_audit_of_released_weights_runs_end_to_end_without_training(repo_copy, tmp_path):
    """The shape of config/imagenet-audit.yaml on CPU: an ImageFolder, timm weights as a local
    .safetensors file, no pretraining and no fine-tuning; every protocol for every noise."""
    import timm
    from conftest import write_image_folder
    from safetensors.torch import save_file

    root = tmp_path / "imagenet"
    classes = {"n01440764": 2, "n01443537": 2, "n01484850": 2}
    write_image_folder(root / "train", classes, size=16, seed=0)
    write_image_folder(root / "val", {c: 10 for c in classes}, size=16, seed=1)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=3, **kwargs).state_dict(), str(weights))
    cfg = yaml.safe_load((repo_copy / "config/imagenet-audit.yaml").read_text())
    cfg["dataset"].update(name="audit-tiny", root=str(root), image_size=16)
    cfg["models"] = {"vit": {"timm_name": "vit_tiny_patch16_224", "kwargs": kwargs, "pretrained": str(weights),
                             "skip_pretrain": True, "site": "blocks.1.attn"}}
    cfg["noises"] = [n for n in cfg["noises"] if "models" not in n]  # the CNN-only entries name the ResNets
    cfg["evaluate"].update(num_workers=0, resources={})
    config = tmp_path / "audit-tiny.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    dry = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", str(config))
    counts = job_counts(dry.stdout)
    assert counts["import_weights"] == 1 and counts["evaluate"] == 1
    assert not {"pretrain", "finetune"} & set(counts), "an audit of released weights trains nothing"
    snakemake(repo_copy, "--cores", "2", "--workflow-profile", "none", "--configfile", str(config), timeout=900)

    import pandas as pd

    table = pd.read_csv(repo_copy / "results/audit-tiny/evaluations.csv")
    top1 = table[table["metric"] == "top1"]
    noises = set(top1["noise"])
    assert noises == {"none", "linear-optimal_batch", "linear-optimal_rows", "linear-optimal_features",
                      "gaussian_s0.1", "gaussian_s1", "impulse_p0.05", "impulse_p0.1"}
    for noise in noises:
        assert set(top1[top1["noise"] == noise]["protocol"]) == set(PROTOCOLS), noise
    assert (top1["checkpoint"] == "results/audit-tiny/vit/imported/model.safetensors").all()
    assert (repo_copy / "results/audit-tiny/figures/batch_size.png").stat().st_size > 0
