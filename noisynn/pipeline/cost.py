"""What the evaluations of a config cost before they run: forward passes, and hours at a throughput.

An evaluation group (noisynn/pipeline/grid.py) runs one pass of its test images up to the site's cache point
(the prefix, cached), then, for every setting and protocol and for the sweeps of the released
recipe, the network from the cache point on (the suffix). The images of each kind are those of the
evaluation's own pass schedule (``evaluate.pass_schedule``, which the evaluation follows), and
``suffix_share`` measures the fraction of a forward pass's floating-point operations after the
cache point, with torch's FLOP counter on the meta device (no weights, no memory). Together:

    full-forward equivalents = (prefix images × (1 − share) + suffix images × share) / test images

and, at a model's measured images per second (a CSV in the format of timm's benchmark files,
``model,infer_img_size,infer_samples_per_sec``), its hours. Not counted: reading and decoding the
images for the prefix pass (one read of the test set per group), which bounds the small models.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noisynn.errors import UserError
from noisynn.evaluate import RAM_CACHE_BYTES, pass_schedule
from noisynn.pipeline.grid import Grid


@dataclass
class Split:
    """Where a model's forward pass is cut for one site, measured on the meta device."""

    cache_point: str
    flops: int  # of one image's whole forward (torch's counter: matrix products and convolutions)
    suffix_flops: int  # of the part from the cache point on
    cache_shape: tuple[int, ...]  # one image's activations at the cache point

    @property
    def share(self) -> float:
        return self.suffix_flops / self.flops if self.flops else 1.0


def measure_split(model, site: str, in_chans: int, image_size: int) -> Split:
    """The FLOPs of one image's forward pass, before and after the cache point of ``site``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from noisynn.inject.split import cache_point, forward_prefix

    x = torch.empty(1, in_chans, image_size, image_size, device="meta")
    point = cache_point(model, site)
    with torch.no_grad():
        with FlopCounterMode(display=False) as whole:
            model(x)
        total = whole.get_total_flops()
        if point == "image":
            return Split(point, total, total, tuple(x.shape[1:]))
        with FlopCounterMode(display=False) as before:
            h = forward_prefix(model, site, x)
    return Split(point, total, total - before.get_total_flops(), tuple(h.shape[1:]))


def read_throughput(path: Path) -> dict[tuple[str, int], float]:
    """Images per second by (timm model name, image size), from a CSV in timm's benchmark format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"throughput file {path} {'is not a file' if path.exists() else 'does not exist'}.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"throughput file {path} is not UTF-8 text; expected a CSV in timm's benchmark format "
                        "(model,infer_img_size,infer_samples_per_sec).") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    need = {"model", "infer_img_size", "infer_samples_per_sec"}
    missing = need - set(reader.fieldnames or [])
    if missing:
        raise UserError(f"throughput file {path} lacks the column(s) {', '.join(sorted(missing))}; expected "
                        "timm's benchmark format: model,infer_img_size,infer_samples_per_sec.")
    out = {}
    for i, row in enumerate(reader, start=2):
        try:
            size, ips = int(row["infer_img_size"]), float(row["infer_samples_per_sec"])
        except (TypeError, ValueError):
            raise UserError(f"throughput file {path}, line {i}: infer_img_size must be an integer and "
                            f"infer_samples_per_sec a number; got {row['infer_img_size']!r}, "
                            f"{row['infer_samples_per_sec']!r}.") from None
        if not math.isfinite(ips) or ips <= 0:
            raise UserError(f"throughput file {path}, line {i}: infer_samples_per_sec must be > 0; got {ips}.")
        out[(row["model"].strip(), size)] = ips
    return out


def split_labels(config: dict, data: Path | None, images: int | None, classes: int | None) -> np.ndarray:
    """The labels of the test split: from a prepared dataset folder, or ``images`` spread evenly
    over ``classes`` (ImageNet's val set: 50,000 over 1,000, 50 each)."""
    if data is not None:
        from noisynn.data import load_dataset

        return np.asarray(load_dataset(Path(data), None, train_augment=False, splits=("val",)).test.labels)
    if config["dataset"]["kind"] in ("digits", "mnist") and images is None:
        raise UserError(f"the {config['dataset']['kind']} test split is made by `noisynn prepare`; pass --data with "
                        "the prepared folder (results/<dataset>/data), or --images and --classes.")
    if images is None or classes is None:
        raise UserError("cost needs the test split: --data (a prepared dataset folder), or --images and --classes "
                        "(e.g. --images 50000 --classes 1000 for ImageNet's val set).")
    if images < 1 or classes < 1 or classes > images:
        raise UserError(f"cost --images and --classes must be positive, with at most one class per image; got "
                        f"{images} images and {classes} classes.")
    return np.sort(np.arange(images) % classes)


# kwargs that leave a timm model's architecture as its name says (its own throughput row applies)
_NEUTRAL_KWARGS = {"num_classes", "img_size", "in_chans", "drop_rate", "drop_path_rate"}


def _architecture(timm_name: str) -> str:
    """The architecture word of a timm name: vit_base_patch16_384.augreg → vit, resnet50 → resnet."""
    return timm_name.split(".")[0].split("_")[0].rstrip("0123456789")


def estimate(config: dict, labels: np.ndarray, throughput: dict[tuple[str, int], float] | None = None) -> list[dict]:
    """One row per model of a validated config: its groups' passes, full-forward equivalents and hours.

    A model takes its own throughput row (its timm name without the weight tag, at its image size)
    when its kwargs leave the architecture as named; otherwise the row of the same architecture word
    (vit, resnet, …) nearest in FLOPs, scaled by the FLOP ratio, and it says so (``throughput_source``).
    A transfer config's models are counted as the evaluation sees them: rebuilt for its data.
    """
    from noisynn.inject.split import cache_bytes_per_value
    from noisynn.models.build import meta_model
    from noisynn.models.transfer import data_kwargs
    from noisynn.pipeline.datasets import dataset_geometry

    grid = Grid(config)
    num_classes = len(np.unique(labels))
    protocols = tuple(config["evaluate"]["protocols"])
    n = len(labels)
    references: dict[str, list] = {}  # architecture word → (flops, name@size, ips) of its rows

    def reference_rows(word: str) -> list:
        if word not in references:
            references[word] = []
            for (name, size), ips in (throughput or {}).items():
                if _architecture(name) != word:
                    continue
                try:
                    flops = measure_split(meta_model({"timm_name": name}, 1000, 3), "image", 3, size).flops
                except Exception:  # noqa: BLE001 (a row this timm cannot build or count: not a reference)
                    continue
                if flops:
                    references[word].append((flops, f"{name}@{size}", ips))
        return references[word]

    rows = []
    for key, m in config["models"].items():
        groups = [g for g in grid.groups if g.model == key]
        if not groups:
            continue
        geometry = dataset_geometry(config["dataset"], m, num_classes)
        size, in_chans = geometry["image_size"], geometry["in_chans"]
        cfg = {k: m[k] for k in ("timm_name", "kwargs") if m.get(k) is not None}
        model = meta_model(cfg, num_classes, in_chans)
        if config.get("pretrain_dataset") is not None and not m.get("skip_pretrain"):
            # the fine-tuning rebuilds the model for the evaluation's data (models.transfer.adapt_to_data)
            model = meta_model({**cfg, "kwargs": data_kwargs(cfg, model, num_classes, in_chans, size)},
                               num_classes, in_chans)
        base = m["timm_name"].split(".")[0]
        prefix = suffix = equivalents = 0.0
        cache_gib = 0.0
        sites = []
        split = None
        for g in groups:
            site = g.site if g.site != "none" else "image"
            split = measure_split(model, site, in_chans, size)
            counts = pass_schedule(grid.settings(g), protocols, labels, g.seed, cached=split.cache_point != "image").forward_images
            prefix += counts["prefix"]
            suffix += counts["suffix"]
            equivalents += (counts["prefix"] * (1 - split.share) + counts["suffix"] * split.share) / n
            if split.cache_point != "image":
                cache_gib = max(cache_gib, n * math.prod(split.cache_shape) * cache_bytes_per_value(model) / 2**30)
            label = f"{site} ({split.share:.1%})"
            if label not in sites:
                sites.append(label)
        ips, source = None, "none"
        own_row = not set(m.get("kwargs") or {}) - _NEUTRAL_KWARGS
        if throughput and own_row and (base, size) in throughput:
            ips, source = throughput[(base, size)], f"{base}@{size}"
        elif throughput:
            same = reference_rows(_architecture(m["timm_name"]))
            if same:
                flops, name, ref_ips = min(same, key=lambda r: abs(math.log(r[0] / split.flops)))
                ips, source = ref_ips * flops / split.flops, f"{name} × FLOP ratio {flops / split.flops:.2f}"
        rows.append({
            "model": key, "timm_name": m["timm_name"], "image_size": size, "groups": len(groups),
            "sites": ", ".join(sites), "gflops": split.flops / 1e9, "prefix_images": int(prefix),
            "suffix_images": int(suffix), "equivalents": equivalents, "cache_gib": cache_gib,
            "images_per_second": ips, "throughput_source": source,
            "hours": equivalents * n / ips / 3600 if ips else None,
            # without room for the cache every pass runs the whole network
            "hours_without_cache": suffix / ips / 3600 if ips else None,
        })
    return rows


def format_table(rows: list[dict], n: int, runtime_minutes: float | None = None) -> str:
    """The estimate as a Markdown table with its total, and where a cache needs disk room."""
    lines = [f"Evaluation cost over {n} test images: the GPU time of the forward passes, a lower bound (not counted: "
             "decoding the images, copying the cached activations back to the GPU, the per-batch noise calls).",
             "",
             "| model | timm | px | sites (FLOPs after the cache point) | jobs | GFLOPs/image | suffix passes | "
             "full-forward equivalents | largest prefix cache (bf16 autocast) | images/s | from | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "—"
        minutes = f"{60 * r['hours']:.1f}" if r["hours"] is not None else "—"
        gib = r["cache_gib"]
        cache = f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB" if gib * 1024 >= 0.1 else f"{gib * 2**20:.0f} KiB"
        lines.append(f"| {r['model']} | {r['timm_name']} | {r['image_size']} | {r['sites']} | {r['groups']} | "
                     f"{r['gflops']:.3g} | {r['suffix_images'] / n:.1f} | {r['equivalents']:.1f} | {cache} | {ips} | "
                     f"{r['throughput_source']} | {minutes} |")
    known = [r for r in rows if r["hours"] is not None]
    total = sum(r["hours"] for r in known)
    left = len(rows) - len(known)
    lines.append("")
    if not known:
        lines.append("Time: give the images per second of your device with --throughput (a CSV in timm's benchmark "
                     "format; benchmarks/gpu_check.py --throughput-out writes one).")
    else:
        lines.append(f"Total: {total:.2f} GPU-hours ({60 * total:.0f} minutes) for {len(known)} of {len(rows)} models"
                     + (f" ({left} without a throughput of its own or of its architecture)." if left else "."))
    on_disk = [r for r in rows if r["cache_gib"] * 2**30 > RAM_CACHE_BYTES]
    if on_disk:
        big = max(on_disk, key=lambda r: r["cache_gib"])
        without = big["hours_without_cache"]
        lines.append(f"Prefix caches over {RAM_CACHE_BYTES / 2**30:.0f} GiB ({len(on_disk)} of {len(rows)} models) are "
                     f"memory-mapped in $SLURM_TMPDIR or the node's temp folder: {big['model']}'s needs "
                     f"{big['cache_gib']:.0f} GiB free there; without the room it runs every pass whole"
                     + (f" ({60 * without:.0f} minutes)" if without is not None else "") + ".")
        if runtime_minutes and without is not None and 60 * without > runtime_minutes:
            lines.append(f"That is over the {runtime_minutes:.0f} minutes of the config's evaluate.resources.runtime.")
    return "\n".join(lines)
