"""The GPU check: what a person with one GPU runs before the ImageNet audit (under 5 minutes, no downloads).

    python benchmarks/gpu_check.py                       # or .venv/bin/python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --throughput-out my-gpu.csv --report gpu_check.json
    python benchmarks/gpu_check.py --tiny --device cpu   # every step at a tiny size (what the tests run)

Random weights of ViT-B/16 and ResNet-50 and a generated ImageFolder of JPEGs (1,000 classes, three
validation images each, one training image each), nothing downloaded:

1. noisynn's six-protocol evaluation through its command line (one setting, optimal Q on the batch
   axis at the last block, the prefix cache under bf16 autocast) against a bare timm forward loop
   over the same decoded images at the same batch size and dtype, run six times (once per
   protocol, as a naive audit would), as a ratio of wall times. Its limit: one full pass plus six
   passes of the part after the cache point against six full passes, (1 + 6 s) / 6 for a suffix
   share s of the FLOPs (``noisynn.pipeline.cost.measure_split``);
2. cached against uncached predictions (``--no-prefix-cache``) at an early and the last site;
3. bf16 fine-tuning steps of ResNet-50 with the released CNN shift on the batch axis (k = 16);
4. the same fine-tuning under a one-process ``torchrun`` (NCCL on a GPU, gloo on the CPU);
5. the bare loop's images per second at 256 images a call, a CSV for ``noisynn cost --throughput``.

It prints each figure and, with ``--report``, writes them as JSON. Without CUDA the full-size check
says so in one line and exits 0; ``--tiny`` shrinks the models and the folder so that every step
runs on a CPU in well under a minute.
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

PROTOCOLS = "clean,released,shuffled,batch1,class_pure,class_mixed"
BATCH = 10  # the released test batch size
FORWARD_BATCH = 256  # evaluate.forward_batch_size's default
NOISE = {"kind": "linear-optimal", "axis": "batch"}
SHIFT = {"kind": "linear-shift", "alpha": 0.3, "axis": "batch", "neighbour": "next", "detach": True}
CACHE_FLIPS_ALLOWED = 2  # tests/test_evaluate.py's tolerance for cached against uncached under bf16

# name: (model config, early site, last site); the tiny ones keep each architecture, smaller
FULL = {
    "vit_base_patch16_224": ({"timm_name": "vit_base_patch16_224"}, "blocks.0.attn", "blocks.11.attn"),
    "resnet50": ({"timm_name": "resnet50"}, "layer1.0", "layer4.2"),
}
TINY = {
    "vit_base_patch16_224": ({"timm_name": "vit_base_patch16_224",
                              "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
                             "blocks.0.attn", "blocks.1.attn"),
    "resnet50": ({"timm_name": "resnet50", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64],
                                                     "stem_width": 8}}, "layer1.0", "layer4.0"),
}


def _cli(*args: str, log: Path) -> None:
    """``noisynn <args>`` in this process, its own printout appended to ``log``."""
    import contextlib

    from noisynn.cli import main

    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        code = main(list(args))
    _release_workers()
    if code != 0:
        raise SystemExit(f"gpu_check: `noisynn {args[0]}` exited {code}; its output is in {log}")


def _release_workers() -> None:
    """End the DataLoader workers of the splits a step has finished with (a loader and its iterator
    refer to each other, so only the cycle collector frees them), before the next step starts its own."""
    import gc

    gc.collect()


def _image_folder(root: Path, classes: int, per_class: int, train_per_class: int, size: int) -> Path:
    """``train/`` and ``val/`` of random JPEGs in class folders (``train_per_class``, ``per_class`` a class)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def _checkpoint(out: Path, model_cfg: dict, data: Path) -> Path:
    """Random weights of ``model_cfg`` as a checkpoint of the prepared folder (``stage: imported``)."""
    from noisynn.io.provenance import provenance
    from noisynn.models.build import build_model
    from noisynn.models.checkpoints import save_checkpoint

    manifest = json.loads((data / "manifest.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_cfg, manifest["num_classes"], 3)
    meta = {"stage": "imported", "model": {"kwargs": {}, **model_cfg}, "num_classes": manifest["num_classes"],
            "in_chans": 3, "image_size": manifest["image_size"], "data_fingerprint": manifest["fingerprint"],
            "init_checkpoint": None, "train_args": None, **provenance(0)}
    save_checkpoint(model, out / "model.safetensors", meta)
    return out / "model.safetensors"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _bare_loop(model_cfg: dict, data: Path, device: torch.device, passes: int, batch: int, workers: int) -> float:
    """Seconds for ``passes`` plain timm forward passes (bf16 autocast) over the test images, ``batch`` a call."""
    import timm

    from noisynn.data import load_dataset

    test = load_dataset(data, model_cfg, train_augment=False, splits=("val",)).test
    num_classes = json.loads((data / "manifest.json").read_text())["num_classes"]
    model = timm.create_model(model_cfg["timm_name"], num_classes=num_classes, **model_cfg.get("kwargs", {}))
    model = model.to(device).eval()
    batches = [np.arange(i, min(i + batch, len(test))) for i in range(0, len(test), batch)]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(passes):
        for x, _y in test.batches(batches, workers):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                model(x.to(device, non_blocking=True)).float().argmax(-1).cpu()
    _sync(device)
    seconds = time.perf_counter() - t0
    del test
    _release_workers()
    return seconds


def _suffix_share(model_cfg: dict, site: str, size: int) -> float:
    from noisynn.models.build import meta_model
    from noisynn.pipeline.cost import measure_split

    return measure_split(meta_model(model_cfg, 1000, 3), site, 3, size).share


def check_evaluation(work: Path, data: Path, models: dict, device: torch.device, workers: int) -> tuple[dict, list]:
    """Figures 1 and 2 per model; and the throughput rows of figure 5."""
    report, rows = {}, []
    log = work / "noisynn.log"
    size = json.loads((data / "manifest.json").read_text())["image_size"]
    for name, (model_cfg, early, last) in models.items():
        ckpt = _checkpoint(work / f"ckpt-{name}", model_cfg, data)
        common = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--noise", json.dumps(NOISE),
                  "--test-batch-size", str(BATCH), "--device", str(device), "--amp", "--amp-dtype", "bfloat16",
                  "--num-workers", str(workers)]
        out = work / f"eval-{name}"
        _cli(*common, "--site", last, "--protocols", "clean", "--out", str(out / "warm-up.json"), log=log)
        _sync(device)
        t0 = time.perf_counter()
        _cli(*common, "--site", last, "--protocols", PROTOCOLS, "--out", str(out / "six.json"), log=log)
        _sync(device)
        ours = time.perf_counter() - t0
        six = json.loads((out / "six.json").read_text())
        _bare_loop(model_cfg, data, device, 1, BATCH, workers)  # warm-up
        bare = _bare_loop(model_cfg, data, device, 6, BATCH, workers)
        share = _suffix_share(model_cfg, last, size)
        limit = (1 + 6 * share) / 6
        n = six["evaluations"][0]["protocols"]["clean"]["n"]
        print(f"[1] {name}: {n} images, batch {BATCH}, bf16 on {device}: noisynn's six protocols {ours:.2f} s "
              f"(prefix cache: {six['prefix_cache']}, {six['prefix_cache_dtype']}), a bare timm loop ×6 {bare:.2f} s "
              f"-> ratio {ours / bare:.2f} (limit (1 + 6 × {share:.3f}) / 6 = {limit:.2f})", flush=True)

        flips = {}
        for site in (early, last):
            for cached in (True, False):
                tag = f"{site}-{'cached' if cached else 'full'}"
                _cli(*common, "--site", site, "--protocols", "clean,released,shuffled", "--out", str(out / f"{tag}.json"),
                     "--predictions", str(out / f"{tag}.npz"), *([] if cached else ["--no-prefix-cache"]), log=log)
            a, b = np.load(out / f"{site}-cached.npz"), np.load(out / f"{site}-full.npz")
            flips[site] = {k.split("/")[-2]: int((a[k] != b[k]).sum()) for k in a.files if k.endswith("/pred")}
        worst = max(max(v.values()) for v in flips.values())
        print(f"[2] {name}: cached against uncached predictions, bf16: {flips} differ of {n} "
              f"(tolerance {CACHE_FLIPS_ALLOWED})", flush=True)

        _bare_loop(model_cfg, data, device, 1, FORWARD_BATCH, workers)  # warm-up
        joined = 3 * n / _bare_loop(model_cfg, data, device, 3, FORWARD_BATCH, workers)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rows.append({"model": model_cfg["timm_name"], "infer_img_size": size, "infer_samples_per_sec": round(joined, 2),
                     "infer_batch_size": FORWARD_BATCH, "source": f"benchmarks/gpu_check.py on {where}"})
        report[name] = {"images": n, "noisynn_seconds": ours, "bare_seconds": bare, "ratio": ours / bare,
                        "limit": limit, "suffix_share": share, "prefix_cache": six["prefix_cache"],
                        "prefix_cache_dtype": six["prefix_cache_dtype"], "cached_vs_uncached_flips": flips,
                        "flips_within_tolerance": worst <= CACHE_FLIPS_ALLOWED, "bare_images_per_second": joined}
    return report, rows


def check_training(work: Path, data: Path, models: dict, device: torch.device, workers: int, batch: int) -> dict:
    """Figures 3 and 4: bf16 fine-tuning with a batch-axis noise, in this process and under torchrun."""
    _, _, last = models["resnet50"]
    log = work / "noisynn.log"
    init = work / "ckpt-resnet50" / "model.safetensors"
    section = {"epochs": 1, "batch_size": batch, "noise_batch": batch, "lr": 1e-5, "warmup_epochs": 0,
               "num_workers": workers}
    args = ["--data", str(data), "--init", str(init), "--train", json.dumps(section), "--noise", json.dumps(SHIFT),
            "--site", last]
    _sync(device)
    t0 = time.perf_counter()
    _cli("finetune", *args, "--out", str(work / "ft"), log=log)
    _sync(device)
    seconds = time.perf_counter() - t0
    sidecar = json.loads((work / "ft" / "model.json").read_text())
    print(f"[3] resnet50: one epoch of fine-tuning (batch {batch}, bf16 autocast "
          f"{'on' if device.type == 'cuda' else 'off (CPU)'}) with the released CNN shift, k = {sidecar['noise_batch']}, "
          f"plus validation: {seconds:.2f} s", flush=True)

    out = work / "ft-torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "noisynn",
           "finetune", *args, "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo, as on a machine without a GPU
    t0 = time.perf_counter()
    ran = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    torchrun = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else {}
    backend = "nccl" if device.type == "cuda" else "gloo"
    print(f"[4] one-process torchrun ({backend}) fine-tuning: exit {ran.returncode} in {time.perf_counter() - t0:.1f} s, "
          f"world_size {torchrun.get('world_size')}, k = {torchrun.get('noise_batch')}", flush=True)
    if ran.returncode != 0:
        print(ran.stderr[-2000:], flush=True)
    return {"finetune_seconds": seconds, "finetune_noise_batch": sidecar["noise_batch"],
            "torchrun_exit": ran.returncode, "torchrun_backend": backend, "torchrun_world_size": torchrun.get("world_size"),
            "torchrun_noise_batch": torchrun.get("noise_batch")}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import csv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-out", type=Path,
                        help="also write the measured images per second as a CSV for `noisynn cost --throughput`")
    parser.add_argument("--report", type=Path, help="also write every figure as JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny models and folder (10 classes of 32 px images)")
    parser.add_argument("--device", default=None, help="cuda (the default where there is one) or cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU).")
        return 0
    models = TINY if args.tiny else FULL
    # (classes, val images a class, train images a class, px, fine-tuning batch = k)
    classes, per_class, train_per_class, size, batch = (10, 3, 2, 32, 8) if args.tiny else (1000, 3, 1, 224, 16)
    workers = 0 if args.tiny else min(8, os.cpu_count() or 1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {where}, torch {torch.__version__}{' (tiny)' if args.tiny else ''}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from noisynn.data import prepare_image_folder

        _image_folder(work / "folder", classes, per_class, train_per_class, size)
        data = work / "data"
        prepare_image_folder(data, work / "folder", image_size=size, verify_images=False, name="gpu-check")
        evaluation, rows = check_evaluation(work, data, models, device, workers)
        training = check_training(work, data, models, device, workers, batch)
    report = {"device": where, "torch": torch.__version__, "tiny": args.tiny, "evaluation": evaluation,
              "training": training, "seconds": time.perf_counter() - t0}
    print(f"gpu_check: done in {report['seconds']:.0f} s", flush=True)
    if args.throughput_out:
        with open(args.throughput_out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"gpu_check: wrote {args.throughput_out} (`noisynn cost --throughput {args.throughput_out}` scales "
              "the other models of each family by their FLOPs)", flush=True)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
