"""Training speed: noisy vs clean fine-tuning steps, and our trainer vs a bare PyTorch loop.

    .venv/bin/python benchmarks/bench_train.py

Goals (issue 3): noisy/clean step time <= 1.05; our trainer's throughput >= 0.95 of a bare loop's.
Both sides of each ratio run in this one process, interleaved, on the same model and data
(ViT-Tiny's shape on 16 px digits: 16 tokens, so a run takes minutes on 2 cores).
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, prepared_digits, timed, vit  # noqa: E402

from noisynn.data import load_dataset  # noqa: E402
from noisynn.inject.hook import inject  # noqa: E402
from noisynn.models.build import build_model  # noqa: E402
from noisynn.noise import NoiseSpec  # noqa: E402
from noisynn.train import TrainConfig, epoch_batches, train  # noqa: E402

VIT = vit(16)


def step_time_ratio(data_dir: Path, steps: int = 10, rounds: int = 9) -> tuple[float, float, float]:
    data = load_dataset(data_dir)
    torch.manual_seed(0)
    model = build_model(VIT, data.num_classes, data.in_chans)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = next(data.train.batches([np.arange(64)]))
    handle = inject(model, "blocks.11.attn", NoiseSpec(kind="linear-optimal", axis="batch"), at_train=True, at_eval=True)
    model.train()

    def run():
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    clean, noisy = [], []
    run()  # warm-up
    for _ in range(rounds):  # interleaved, so drift hits both sides alike
        handle.enabled = False
        clean.append(timed(run, 1) / steps)
        handle.enabled = True
        noisy.append(timed(run, 1) / steps)
    c, n = float(np.median(clean)), float(np.median(noisy))
    return c, n, n / c


def bare_loop(data_dir: Path, epochs: int, batch_size: int, seed: int) -> float:
    """The same training as ``train()`` (model, batches, optimizer, loss), stripped to the loop."""
    data = load_dataset(data_dir)
    torch.manual_seed(seed)
    model = build_model(VIT, data.num_classes, data.in_chans)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in data.train.batches(epoch_batches(len(data.train), batch_size, seed, epoch)):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def trainer(data_dir: Path, out: Path, epochs: int, batch_size: int, seed: int) -> tuple[float, float]:
    """Wall time of ``train()`` end to end, and of its training loops alone (summary.csv's
    epoch_seconds: the batches of each epoch, before that epoch's validation and state saving)."""
    cfg = TrainConfig(out_dir=str(out), data_dir=str(data_dir), stage="pretrain", model=VIT, epochs=epochs,
                      batch_size=batch_size, lr=1e-3, warmup_epochs=0, seed=seed)
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    with open(out / "summary.csv") as fh:
        loops = sum(float(row["epoch_seconds"]) for row in csv.DictReader(fh))
    return total, loops


def main() -> None:
    header("training benchmarks")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_digits(Path(tmp), image_size=16)
        c, n, ratio = step_time_ratio(data_dir)
        print(f"fine-tuning step, batch 64: clean {c * 1e3:.1f} ms, noisy (optimal Q, batch axis, last block) "
              f"{n * 1e3:.1f} ms -> noisy/clean = {ratio:.3f} (goal <= 1.05)")
        epochs, bs = 3, 64
        bare, ours, loops = [], [], []
        for r in range(3):
            bare.append(bare_loop(data_dir, epochs, bs, seed=0))
            total, loop = trainer(data_dir, Path(tmp) / f"run{r}", epochs, bs, seed=0)
            ours.append(total)
            loops.append(loop)
        n_samples = epochs * 1077
        b, o, lp = float(np.median(bare)), float(np.median(loops)), float(np.median(ours))
        print(f"training {epochs} epochs ({n_samples} samples): bare loop {n_samples / b:.0f} samples/s, "
              f"noisynn.train's loop {n_samples / o:.0f} samples/s -> throughput ratio = {b / o:.3f} (goal >= 0.95); "
              f"end to end, with each epoch's validation (360 images), summary and resume state: "
              f"{n_samples / lp:.0f} samples/s ({b / lp:.3f})")


if __name__ == "__main__":
    main()
