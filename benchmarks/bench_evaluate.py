"""Evaluation cost: all six protocols (with the prefix cache) vs one clean evaluation.

    .venv/bin/python benchmarks/bench_evaluate.py

Goal (issue 3): six protocols with last-block injection cost at most 2x one clean evaluation.
Both are timed in this process, interleaved, from the loaded model on (model and data loading,
the same for both, are excluded: the result JSON's total_seconds).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, prepared_digits, vit  # noqa: E402

from noisynn.evaluate import PROTOCOLS, evaluate_checkpoint  # noqa: E402
from noisynn.train import TrainConfig, train  # noqa: E402

VIT = vit(32)  # 64 tokens


def main() -> None:
    header("evaluation benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_digits(Path(tmp))
        run = Path(tmp) / "run"
        train(TrainConfig(out_dir=str(run), data_dir=str(data_dir), model=VIT, epochs=1, batch_size=64, lr=1e-3,
                          warmup_epochs=0))
        ckpt = run / "model.safetensors"
        noise = {"kind": "linear-optimal", "axis": "batch"}
        site = "blocks.11.attn"
        clean, six, six_plain = [], [], []
        for _ in range(3):
            clean.append(evaluate_checkpoint(ckpt, data_dir, noise, site, protocols=("clean",), use_prefix_cache=False)["total_seconds"])
            six.append(evaluate_checkpoint(ckpt, data_dir, noise, site, protocols=PROTOCOLS)["total_seconds"])
            six_plain.append(evaluate_checkpoint(ckpt, data_dir, noise, site, protocols=PROTOCOLS, use_prefix_cache=False)["total_seconds"])
        c, s, p = float(np.median(clean)), float(np.median(six)), float(np.median(six_plain))
        print(f"360 test images, ViT-Tiny shape (12 blocks), noise at blocks.11.attn: one clean evaluation {c:.3f} s, "
              f"six protocols with the prefix cache {s:.3f} s -> six/clean = {s / c:.2f} (goal <= 2); "
              f"six protocols without the cache {p:.3f} s ({p / c:.2f}x)")


if __name__ == "__main__":
    main()
