"""benchmarks/gpu_check.py at a tiny size on the CPU: every step the GPU check runs, so it cannot rot.

On a GPU the same script runs ViT-B/16 and ResNet-50 on 3,000 JPEGs; here the models keep their
architectures, shrunk, on 30 images of 32 px, and torchrun uses gloo instead of NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noisynn.pipeline.cost import read_throughput

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_a_tiny_size_on_the_cpu(tmp_path):
    report, table = tmp_path / "report.json", tmp_path / "throughput.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    ran = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--report", str(report), "--throughput-out", str(table)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    figures = [line[:3] for line in ran.stdout.splitlines() if line.startswith("[")]
    assert figures == ["[1]", "[2]", "[1]", "[2]", "[3]", "[4]"], ran.stdout
    result = json.loads(report.read_text())
    for name, stream in (("vit_base_patch16_224", "float32"), ("resnet50", "bfloat16")):
        ev = result["evaluation"][name]
        assert ev["images"] == 30 and ev["prefix_cache"] == "memory"
        assert ev["prefix_cache_dtype"] == stream  # what the forward carries at the cache point under bf16
        assert 0 < ev["suffix_share"] < 1 and ev["limit"] == pytest.approx((1 + 6 * ev["suffix_share"]) / 6)
        assert ev["ratio"] > 0 and ev["flips_within_tolerance"], ev["cached_vs_uncached_flips"]
        assert len(ev["cached_vs_uncached_flips"]) == 2  # an early and the last site
    training = result["training"]
    assert training["finetune_noise_batch"] == 8 == training["torchrun_noise_batch"]
    assert (training["torchrun_exit"], training["torchrun_backend"], training["torchrun_world_size"]) == (0, "gloo", 1)
    rows = read_throughput(table)  # what `noisynn cost --throughput` reads
    assert set(rows) == {("vit_base_patch16_224", 32), ("resnet50", 32)} and all(v > 0 for v in rows.values())
