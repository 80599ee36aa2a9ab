"""Evaluation cost, measured in one run, both sides interleaved.

    .venv/bin/python benchmarks/bench_evaluate.py

1. In process: all six protocols (with the prefix cache) vs one clean evaluation of the same
   checkpoint, from the loaded model on (`total_seconds` of the result). Goal: at most 2x.
2. The way the workflow runs them, processes included: N = 10 eval-only settings × six protocols
   of one checkpoint at `blocks.11.attn` of its 12-block ViT (one `noisynn evaluate --settings`
   job), against one clean evaluation (one `noisynn evaluate` job with protocol clean), each timed
   from the process start to its exit. Physical limit: one prefix pass plus 60 one-block passes,
   about 5.9x the clean evaluation's forward work (12 blocks); process start-up (importing torch
   and timm) is paid once on both sides. Goal: at most 7x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, prepared_digits, vit  # noqa: E402

from noisynn.evaluate import PROTOCOLS, evaluate_checkpoint  # noqa: E402
from noisynn.train import TrainConfig, train  # noqa: E402

VIT = vit(32)  # 64 tokens
SITE = "blocks.11.attn"
SETTINGS = [{"kind": "linear-optimal", "axis": "batch"}, {"kind": "linear-optimal", "axis": "features"},
            {"kind": "linear-optimal", "axis": "rows"}, {"kind": "linear-shift", "alpha": 0.1, "axis": "batch"},
            {"kind": "linear-shift", "alpha": 0.3, "axis": "batch"}, {"kind": "gaussian", "strength": 0.1},
            {"kind": "gaussian", "strength": 1.0}, {"kind": "impulse", "strength": 0.05},
            {"kind": "impulse", "strength": 0.1}, {"kind": "impulse", "strength": 0.2}]


def _job(args: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "noisynn", "evaluate", *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    header("evaluation benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_digits(Path(tmp))
        run = Path(tmp) / "run"
        train(TrainConfig(out_dir=str(run), data_dir=str(data_dir), model=VIT, epochs=1, batch_size=64, lr=1e-3,
                          warmup_epochs=0))
        ckpt = run / "model.safetensors"
        noise = SETTINGS[0]
        clean, six, six_plain = [], [], []
        for _ in range(3):
            clean.append(evaluate_checkpoint(ckpt, data_dir, noise, SITE, protocols=("clean",), use_prefix_cache=False)["total_seconds"])
            six.append(evaluate_checkpoint(ckpt, data_dir, noise, SITE, protocols=PROTOCOLS)["total_seconds"])
            six_plain.append(evaluate_checkpoint(ckpt, data_dir, noise, SITE, protocols=PROTOCOLS, use_prefix_cache=False)["total_seconds"])
        c, s, p = float(np.median(clean)), float(np.median(six)), float(np.median(six_plain))
        print(f"in process, 360 test images, ViT-Tiny shape (12 blocks), noise at {SITE}: one clean evaluation {c:.3f} s, "
              f"six protocols with the prefix cache {s:.3f} s -> six/clean = {s / c:.2f} "
              f"(goal <= 2; limit: one prefix pass + six one-block passes ~ 1.4); "
              f"six protocols without the cache {p:.3f} s ({p / c:.2f}x)")

        settings = json.dumps([{"noise": f"s{i}", "apply": "eval", "site": SITE, "seed": 0, "noise_params": n}
                               for i, n in enumerate(SETTINGS)])
        base = ["--checkpoint", str(ckpt), "--data", str(data_dir)]
        one, group = [], []
        for _ in range(3):
            one.append(_job([*base, "--out", f"{tmp}/clean.json", "--protocols", "clean", "--no-prefix-cache"]))
            group.append(_job([*base, "--out", f"{tmp}/group.json", "--predictions", f"{tmp}/group.npz",
                               "--site", SITE, "--settings", settings]))
        o, g = float(np.median(one)), float(np.median(group))
        print(f"as the workflow runs them (processes included): one clean evaluation job {o:.2f} s, "
              f"{len(SETTINGS)} settings x 6 protocols in one job {g:.2f} s -> {g / o:.2f}x "
              f"(goal <= 7; limit: one prefix pass + 60 one-block passes ~ 5.9x of the forward work, "
              f"start-up paid once on each side)")


if __name__ == "__main__":
    main()
