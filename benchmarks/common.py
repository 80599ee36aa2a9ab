"""Shared set-up for the benchmarks: a prepared digits split and a ViT-Tiny-shaped model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from noisynn.data import prepare_digits


def vit(image_size: int) -> dict:
    """ViT-Tiny's depth, width and heads, on digits cut into 4 px patches."""
    return {
        "timm_name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": image_size, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3},
    }


def prepared_digits(workdir: Path, image_size: int = 32) -> Path:
    data = workdir / "data"
    if not (data / "manifest.json").is_file():
        prepare_digits(data, image_size=image_size, seed=0)
    return data


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def header(title: str) -> None:
    print(f"== {title} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
