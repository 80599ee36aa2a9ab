"""The GPU check: what a person with one GPU runs before the ImageNet audit (under 5 minutes, no downloads).

    python benchmarks/gpu_check.py            # or .venv/bin/python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --throughput-out my-gpu.csv   # and its images/s for `noisynn cost`

Synthetic images and random weights of the ViT-B/16-384 and ResNet-50 shapes (no hub, no dataset):

1. noisynn's six-protocol evaluation (one setting, optimal Q on the batch at the last block, prefix
   cache in bf16) against a bare timm forward loop over the same images at the same batch size and
   dtype, six times (once per protocol, as a naive audit would run it), as a ratio of wall times.
   Physical limit: one full pass plus six last-block passes against six full passes, about
   (1 + 6/12)/6 = 0.25 for ViT-B (12 blocks); the bare loop's images per second are the number the
   audit's cost estimate needs (config/imagenet-audit.yaml).
2. a few bf16 fine-tuning steps with the noise injected (steps per second);
3. a one-GPU NCCL `torchrun` fine-tuning that writes one checkpoint.

It prints each figure and exits 0; on a machine without CUDA it says so in one line and exits 0.
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
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # name: (timm model, image size, test images)
    "vit_base_patch16_384": ("vit_base_patch16_384", 384, 1000),
    "resnet50": ("resnet50", 224, 2000),
}
SITES = {"vit_base_patch16_384": "blocks.11.attn", "resnet50": "layer4.2"}
BATCH = 10
NOISE = {"kind": "linear-optimal", "axis": "batch"}
FORWARD_BATCH = 256  # evaluate.forward_batch_size's default


def _dataset(root: Path, size: int, n: int) -> Path:
    from noisynn.data import prepare_arrays

    rng = np.random.default_rng(0)
    images = rng.standard_normal((n + 64, 3, size, size), dtype=np.float32)
    labels = np.arange(n + 64) % 1000
    splits = {"train": np.arange(n, n + 64), "val": np.arange(n, n + 64), "test": np.arange(n)}
    prepare_arrays(root, images, labels, splits, f"synthetic{size}")
    return root


def _checkpoint(root: Path, timm_name: str, data: Path) -> Path:
    from noisynn.io.provenance import provenance
    from noisynn.models import build_model, save_checkpoint

    model = build_model({"timm_name": timm_name}, 1000, 3)
    meta = {"stage": "imported", "model": {"timm_name": timm_name, "kwargs": {}}, "num_classes": 1000, "in_chans": 3,
            "image_size": int(json.loads((data / "manifest.json").read_text())["image_size"]),
            "data_fingerprint": json.loads((data / "manifest.json").read_text())["fingerprint"],
            "init_checkpoint": None, "train_args": None, **provenance(0)}
    save_checkpoint(model, root / "model.safetensors", meta)
    return root / "model.safetensors"


@torch.no_grad()
def _bare_loop(timm_name: str, data: Path, passes: int, batch: int = BATCH) -> float:
    """Seconds for ``passes`` plain bf16 forward passes over the test images at ``batch`` images a call."""
    import timm

    from noisynn.data import load_dataset

    test = load_dataset(data).test
    model = timm.create_model(timm_name, num_classes=1000).cuda().eval()
    batches = [np.arange(i, min(i + batch, len(test))) for i in range(0, len(test), batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(passes):
        for x, _y in test.batches(batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x.cuda(non_blocking=True)).float().argmax(-1).cpu()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def check_evaluation(work: Path) -> list[dict]:
    """Prints figure 1; returns each shape's throughput in the format `noisynn cost --throughput` reads."""
    from noisynn.evaluate import evaluate_group

    rows = []
    for name, (timm_name, size, n) in SHAPES.items():
        data = _dataset(work / f"data-{name}", size, n)
        ckpt = _checkpoint(work / f"ckpt-{name}", timm_name, data)
        setting = {"noise": "linear-optimal_batch", "apply": "eval", "site": SITES[name], "seed": 0, "noise_params": NOISE}
        evaluate_group(ckpt, data, SITES[name], [setting], test_batch_size=BATCH, progress=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result, _ = evaluate_group(ckpt, data, SITES[name], [setting], test_batch_size=BATCH, progress=False)
        torch.cuda.synchronize()
        ours = time.perf_counter() - t0
        _bare_loop(timm_name, data, 1)  # warm-up
        bare = _bare_loop(timm_name, data, 6)
        print(f"[1] {name}: {n} images, batch {BATCH}, bf16: noisynn six protocols {ours:.2f} s "
              f"(prefix cache: {result['prefix_cache']}), bare timm loop x6 {bare:.2f} s -> ratio {ours / bare:.2f} "
              f"(limit ~ (1 + 6 x suffix share) / 6); bare loop {6 * n / bare:.0f} images/s", flush=True)
        # the audit's forward calls join test batches up to evaluate.forward_batch_size images
        _bare_loop(timm_name, data, 1, FORWARD_BATCH)  # warm-up
        joined = 3 * n / _bare_loop(timm_name, data, 3, FORWARD_BATCH)
        print(f"[1] {name}: bare bf16 forward at {FORWARD_BATCH} images a call: {joined:.0f} images/s", flush=True)
        rows.append({"model": timm_name, "infer_img_size": size, "infer_samples_per_sec": round(joined, 2),
                     "infer_batch_size": FORWARD_BATCH, "source": f"benchmarks/gpu_check.py on {torch.cuda.get_device_name(0)}"})
    return rows


def check_training(work: Path) -> None:
    from noisynn.train import TrainConfig, train

    name = "resnet50"
    data, init = work / "data-resnet50", work / "ckpt-resnet50" / "model.safetensors"
    section = {"epochs": 1, "batch_size": 16, "lr": 1e-5, "warmup_epochs": 0}
    cfg = TrainConfig.from_section(section, out_dir=str(work / "ft"), data_dir=str(data), stage="finetune",
                                   init_checkpoint=str(init), noise={"kind": "linear-shift", "alpha": 0.3, "axis": "batch",
                                                                     "neighbour": "next", "detach": True},
                                   site=SITES[name])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    train(cfg)
    torch.cuda.synchronize()
    print(f"[2] {name}: 4 bf16 fine-tuning steps of 16 images with the released CNN shift, plus validation: "
          f"{time.perf_counter() - t0:.2f} s; checkpoint {(work / 'ft' / 'model.safetensors').is_file()}", flush=True)

    out = work / "ft-torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "noisynn", "finetune",
           "--data", str(data), "--init", str(init), "--out", str(out), "--train", json.dumps(section),
           "--noise", json.dumps(NOISE), "--site", SITES[name]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    ran = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    world = json.loads((out / "model.json").read_text()).get("world_size") if (out / "model.json").is_file() else None
    print(f"[3] 1-GPU NCCL torchrun fine-tuning: exit {ran.returncode} in {time.perf_counter() - t0:.1f} s, "
          f"world_size {world}, files {files}", flush=True)
    if ran.returncode != 0:
        print(ran.stderr[-2000:], flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import csv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-out", type=Path,
                        help="also write the measured images per second as a CSV for `noisynn cost --throughput`")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU).")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = check_evaluation(Path(tmp))
        if args.throughput_out:
            with open(args.throughput_out, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            print(f"gpu_check: wrote {args.throughput_out} (`noisynn cost --throughput {args.throughput_out}` scales "
                  "the other models of each family by their FLOPs)", flush=True)
        check_training(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
