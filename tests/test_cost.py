"""The cost estimate of a config's evaluations (``noisynn cost``).

What a user relies on: the forward passes it counts are the ones the evaluation runs (held against
the evaluation's own count), the share of a pass after a site is the FLOPs written out by hand for
two models, and the cost quoted in ``config/imagenet-audit.yaml`` is what the tool prints for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from noisynn.evaluate import evaluate_group, pass_schedule
from noisynn.models.build import meta_model
from noisynn.pipeline.config import load_config
from noisynn.pipeline.cost import estimate, measure_split, read_throughput
from noisynn.vocab import PROTOCOLS

REPO = Path(__file__).resolve().parents[1]
AUDIT = REPO / "config" / "imagenet-audit.yaml"
THROUGHPUT = REPO / "config" / "throughput-rtx4090.csv"

OPTIMAL = {"kind": "linear-optimal", "axis": "batch"}
GAUSS = {"kind": "gaussian", "strength": 0.1, "mean": 0.0, "std": 1.0}


def _settings(site: str, *noises_and_sweeps) -> list[dict]:
    return [{"noise": n["kind"], "apply": "eval", "site": site, "seed": 0, "noise_params": n,
             **({"sweeps": True} if sweeps else {})} for n, sweeps in noises_and_sweeps]


@pytest.mark.parametrize("case", ["sweeps of a deterministic noise", "sweeps of a random noise", "at the image"])
def test_the_passes_counted_are_the_passes_the_evaluation_runs(vit_run, digits_dir, case):
    site = "image" if case == "at the image" else vit_run.last_site
    if case == "sweeps of a deterministic noise":
        settings = _settings(site, ({"kind": "none"}, False), (OPTIMAL, True), (GAUSS, False))
        protocols = PROTOCOLS
    elif case == "sweeps of a random noise":
        settings = _settings(site, (GAUSS, True))
        protocols = ("released", "shuffled")  # no clean protocol: the pooling control runs its own clean pass
    else:
        settings = _settings(site, (GAUSS, False), ({"kind": "impulse", "strength": 0.05}, False))
        protocols = PROTOCOLS
    result, arrays = evaluate_group(vit_run.checkpoint, digits_dir, site, settings, protocols=protocols,
                                    progress=False)
    counted = pass_schedule(settings, protocols, arrays["labels"], 0, cached=site != "image").forward_images
    assert counted == result["forward_images"]
    if site != "image":
        assert counted["prefix"] == len(arrays["labels"])


def test_the_share_after_a_site_is_the_flops_written_out():
    # ViT-B/16 at 224 px: N = 197 tokens of D = 768; the cache point of blocks.11.attn is blocks.11.
    # One block: qkv N·D·3D, q·kᵀ and attention·v 2·N²·D, projection N·D², MLP 2·N·D·4D multiply-adds;
    # then the head on the class token, D·1000. Two FLOPs per multiply-add.
    vit = measure_split(meta_model({"timm_name": "vit_base_patch16_224"}, 1000, 3), "blocks.11.attn", 3, 224)
    n, d = 197, 768
    assert vit.cache_point == "blocks.11"
    assert vit.suffix_flops == 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d + d * 1000)
    assert vit.cache_shape == (n, d)
    # ResNet-50's last bottleneck (layer4.2) at 7×7: 1×1 2048→512, 3×3 512→512, 1×1 512→2048; then the fc
    resnet = measure_split(meta_model({"timm_name": "resnet50"}, 1000, 3), "layer4.2", 3, 224)
    assert resnet.suffix_flops == 2 * (49 * 2048 * 512 + 49 * 512 * 512 * 9 + 49 * 512 * 2048 + 2048 * 1000)
    assert resnet.cache_shape == (2048, 7, 7)


def test_the_share_falls_with_the_depth_of_the_site_and_is_whole_at_the_image():
    model = meta_model({"timm_name": "vit_tiny_patch16_224", "kwargs": {"depth": 6}}, 10, 3)
    shares = [measure_split(model, f"blocks.{i}.attn", 3, 224).share for i in range(6)]
    assert all(a > b for a, b in zip(shares, shares[1:]))
    assert measure_split(model, "image", 3, 224).share == 1.0


def test_a_model_without_its_own_throughput_takes_its_family_s_scaled_by_flops(tmp_path):
    table = tmp_path / "one.csv"
    table.write_text("model,infer_img_size,infer_samples_per_sec\nvit_base_patch16_384,384,1000\n")
    config = load_config(AUDIT, check_folders=False)
    keep = ("vit_base_384", "vit_base_224", "resnet50")
    config["models"] = {k: v for k, v in config["models"].items() if k in keep}
    for entry in config["noises"]:
        if entry.get("models"):
            entry["models"] = [m for m in entry["models"] if m in keep]
    config["noises"] = [e for e in config["noises"] if e.get("models") != []]
    labels = np.sort(np.arange(2000) % 1000)  # 1000 classes, as the benchmark's models have
    rows = {r["model"]: r for r in estimate(config, labels, read_throughput(table))}
    assert rows["vit_base_384"]["images_per_second"] == 1000
    ratio = rows["vit_base_384"]["gflops"] / rows["vit_base_224"]["gflops"]
    assert rows["vit_base_224"]["images_per_second"] == pytest.approx(1000 * ratio)
    assert "FLOP ratio" in rows["vit_base_224"]["throughput_source"]
    assert rows["resnet50"]["images_per_second"] is None  # no ResNet row: no guess across architectures
    assert rows["resnet50"]["hours"] is None


def test_a_model_whose_kwargs_change_it_or_a_row_that_cannot_be_built_take_no_row_as_their_own(tmp_path):
    table = tmp_path / "rows.csv"
    table.write_text("model,infer_img_size,infer_samples_per_sec\nvit_base_patch16_224,224,3000\n"
                     "vit_no_such_model,224,5\nvit_base_patch16_384,384,1000\n")
    config = load_config(AUDIT, check_folders=False)
    config["models"] = {"vit_base_224": {**config["models"]["vit_base_224"], "kwargs": {"depth": 6}, "site": "blocks.5.attn"}}
    config["noises"] = [{"kind": "linear-optimal", "axis": ["batch"]}]
    labels = np.sort(np.arange(2000) % 1000)
    (row,) = estimate(config, labels, read_throughput(table))
    # a ViT-B of 6 blocks is not the benchmark's ViT-B/16: the nearest row in FLOPs, scaled
    assert row["throughput_source"].startswith("vit_base_patch16_224@224 × FLOP ratio")
    full = measure_split(meta_model({"timm_name": "vit_base_patch16_224"}, 1000, 3), "image", 3, 224).flops
    assert row["images_per_second"] == pytest.approx(3000 * full / (row["gflops"] * 1e9))


def test_a_transfer_config_counts_the_model_the_evaluation_sees():
    # transfer.yaml pretrains at 28 px on MNIST and evaluates at 16 px on digits
    config = load_config(REPO / "config" / "transfer.yaml")
    labels = np.sort(np.arange(360) % 10)
    rows = {r["model"]: r for r in estimate(config, labels)}
    vit = config["models"]["vit"]
    seen = meta_model({"timm_name": vit["timm_name"], "kwargs": {**vit["kwargs"], "img_size": 16}}, 10, 1)
    assert rows["vit"]["gflops"] * 1e9 == measure_split(seen, "image", 1, 16).flops
    assert rows["vit"]["image_size"] == 16


@pytest.mark.slow
def test_the_audit_config_states_the_cost_the_tool_prints(capsys):
    from noisynn.cli import main

    assert main(["cost", "--config", str(AUDIT), "--images", "50000", "--classes", "1000",
                 "--throughput", str(THROUGHPUT)]) == 0
    out = capsys.readouterr().out
    models = load_config(AUDIT, check_folders=False)["models"]
    table = [line for line in out.splitlines() for m in models if line.startswith(f"| {m} |")]
    # the paper's ten models, each under timm's preprocessing and under the released code's: the second
    # arm is counted as the jobs it adds
    released = [m for m in models if models[m].get("preprocess") == "released"]
    assert len(table) == len(models) == 20 and sorted(released) == sorted(f"{m}_released_prep" for m in models
                                                                          if m not in released)
    # every model: 45 noisy passes (9 settings × 5 protocols), clean once, the sweeps 22 + 30
    assert all("| 98.0 |" in line for line in table), table
    total = re.search(r"Total: ([\d.]+) GPU-hours \((\d+) minutes\) for 20 of 20 models", out)
    assert total, out
    header = AUDIT.read_text().split("\ndataset:")[0]
    assert f"{total.group(1)} GPU-hours" in header, "config/imagenet-audit.yaml's header quotes another total"
    readme = (REPO / "README.md").read_text()
    assert f"{float(total.group(1)):.1f} GPU-hours" in readme, "README.md quotes another total"


def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_0(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check runs for real (benchmarks/gpu_check.py)")
    out = tmp_path / "unused.csv"
    ran = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--throughput-out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0
    assert ran.stdout.strip().splitlines() == ["gpu_check: no CUDA device here; nothing to check (run it on a machine "
                                               "with a GPU)."]
    assert not out.exists()
