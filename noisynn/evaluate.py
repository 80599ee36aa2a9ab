"""One checkpoint at one site: every noise setting under every evaluation protocol, in one pass.

The protocols are defined in ``noisynn.vocab`` (docs/paper.md §6): ``clean`` (the noise off),
``released`` (class-sorted order, the released code), ``shuffled``, ``batch1``, ``class_pure`` and
``class_mixed``. Each reports top-1, top-5 and the released ViT code's running-accuracy metric, of
top-1 and of top-5 (NoisyViT-OptimalQ/Main.py logs both as running means: its "99.9 % top-5").

Cost: in eval mode the network up to the injection site is a deterministic function of each image,
so it runs once per image for the whole group of settings (the *prefix*, kept in memory or in a
memory-mapped file); each setting and protocol then runs only the part of the network after the
site (the *suffix*). The cache holds the activations in the dtype the forward pass itself carries
there (under bf16 autocast: float32 in a ViT's residual stream, bfloat16 between a ResNet's
blocks), so the suffix computes exactly what the uncached forward computes from that point on. Consecutive test batches share a forward call of the
suffix (``forward_batch_size`` images), each still noised alone, so that a test batch of 10 images
costs a tenth of a forward call's fixed cost, not all of it. The group can also run the experiments that separate the
batch leak from the entropy theory: a batch-size sweep, a purity sweep and a noise-free control that
averages the logits of each batch (``SWEEPS``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noisynn.data import load_dataset
from noisynn.entropy import delta_entropy_for
from noisynn.errors import UserError
from noisynn.inject.hook import inject, joined_batches
from noisynn.inject.sites import check_site
from noisynn.inject.split import cache_point, forward_prefix, forward_suffix
from noisynn.io.provenance import provenance
from noisynn.models.build import meta_model
from noisynn.models.checkpoints import load_checkpoint
from noisynn.models.checks import check_model_fits_data, check_noises_act
from noisynn.noise import NoiseSpec
from noisynn.orders import PURITY_BATCH_SIZE, SWEEP_BATCH_SIZES, SWEEP_ORDERS, batches_in_order, forward_calls, purity_batches
from noisynn.vocab import (
    PROTOCOL_DEFS,
    PROTOCOLS,
    REPORTED_METRICS,
    batch_size_stem,
    pooling_batch_size_stem,
    pooling_stem,
    purity_stem,
    released_metric,
    setting_key,
)

__all__ = ["PROTOCOLS", "PROTOCOL_DEFS", "evaluate_group", "evaluate_checkpoint", "prediction_arrays"]

class _NoRoom(Exception):
    pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class PrefixCache:
    """The cache-point activations of every test image, in RAM or in a memory-mapped temp file.

    Kept in the dtype the prefix produced (``dtype``): a cache rounded to bfloat16 where the
    uncached forward carries float32 would run every later residual addition in bfloat16, a
    different network. The file goes to $SLURM_TMPDIR (a job's node-local disk) when set, else to
    $TMPDIR or /tmp.
    """

    def __init__(self, n: int, sample_shape: tuple[int, ...], dtype: torch.dtype, max_bytes: int):
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = n * int(np.prod(sample_shape)) * itemsize
        self.on_disk = self.nbytes > max_bytes
        # numpy has no bfloat16: such a cache holds the raw 16-bit words
        np_dtype = np.uint16 if dtype == torch.bfloat16 else {torch.float16: np.float16}.get(dtype, np.float32)
        if self.on_disk:
            where = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
            free = shutil.disk_usage(where).free
            if free < self.nbytes * 1.05:
                raise _NoRoom(f"the prefix cache needs {self.nbytes / 2**30:.1f} GiB but {where} has {free / 2**30:.1f} GiB free")
            self._tmp = tempfile.TemporaryDirectory(prefix="noisynn-prefix-", dir=where)
            self.array = np.lib.format.open_memmap(Path(self._tmp.name) / "prefix.npy", mode="w+", dtype=np_dtype,
                                                   shape=(n, *sample_shape))
        else:
            self.array = np.empty((n, *sample_shape), dtype=np_dtype)

    def put(self, idx: np.ndarray, values: torch.Tensor) -> None:
        if values.dtype != self.dtype:
            raise RuntimeError(f"the prefix pass produced {values.dtype} after {self.dtype}")
        values = values.cpu()
        self.array[idx] = (values.view(torch.int16).numpy().view(np.uint16) if self.dtype == torch.bfloat16
                           else values.numpy())

    def get(self, idx: np.ndarray) -> torch.Tensor:
        raw = torch.from_numpy(np.ascontiguousarray(self.array[idx]))
        return raw.view(torch.bfloat16) if self.dtype == torch.bfloat16 else raw

    def close(self) -> None:
        if self.on_disk:
            del self.array
            self._tmp.cleanup()


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_for(device: str | None, amp: bool | None, amp_dtype: str = "bfloat16"):
    """(the device, a context manager for the forward passes, the name of the dtype they compute in).

    timm's ``validate.py`` conventions: ``--device``, ``--amp``, ``--amp-dtype``; ``amp`` None
    turns the autocast on for CUDA only.
    """
    import contextlib
    import functools

    if amp_dtype not in AMP_DTYPES:
        raise UserError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}; got {amp_dtype!r}.")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for CUDA, but torch sees no CUDA device here; use --device cpu.")
    if not (dev.type == "cuda" if amp is None else amp):
        return dev, contextlib.nullcontext, "float32"
    return dev, functools.partial(torch.autocast, dev.type, dtype=AMP_DTYPES[amp_dtype]), amp_dtype


def _describe_cache(n: int, shape: tuple[int, ...], dtype: torch.dtype, point: str) -> str:
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = n * int(np.prod(shape)) * itemsize
    return (f"noisynn: prefix cache at {point}: {n} images × {tuple(shape)} in {_dtype_name(dtype)} = "
            f"{size / 2**30:.2f} GiB")


class _Runner:
    """Runs test batches through the suffix (from the cache) or the whole network, and counts images.

    Consecutive test batches share a forward call, up to ``forward_batch_size`` images (a larger
    batch runs alone): the noise still acts on each test batch alone (``inject.hook.joined_batches``),
    and the Python cost of a forward call is paid once per chunk instead of once per test batch.
    """

    def __init__(self, model, site, test, labels, cache, device, autocast, num_workers, forward_batch_size):
        self.model, self.site, self.test, self.labels = model, site, test, labels
        self.cache, self.device, self.autocast, self.num_workers = cache, device, autocast, num_workers
        self.forward_batch_size = forward_batch_size
        self.images = 0

    def logits(self, batches: list[np.ndarray]):
        """Yields (the test batches of a chunk, their indices joined, their logits as float32 on CPU)."""
        chunks = forward_calls(batches, self.forward_batch_size)
        joined = [np.concatenate(c) for c in chunks]
        if self.cache is not None:
            source = ((self.cache.get(j), None) for j in joined)
        else:
            source = self.test.batches(joined, self.num_workers)
        for chunk, idx, (x, _) in zip(chunks, joined, source):
            x = x.to(self.device, non_blocking=True)
            with joined_batches(self.model, [len(b) for b in chunk]), self.autocast():
                out = forward_suffix(self.model, self.site, x) if self.cache is not None else self.model(x)
            self.images += len(idx)
            yield chunk, idx, out.float().cpu()


def _score(runner: _Runner, batches: list[np.ndarray], labels: np.ndarray, keep_logits: bool = False) -> dict:
    n = len(labels)
    pred = np.full(n, -1, dtype=np.int64)
    batch_of = np.full(n, -1, dtype=np.int64)
    correct5 = np.zeros(n, dtype=bool)
    per_batch, per_batch5, sizes = [], [], []
    logits_all = None
    for chunk, idx, logits in runner.logits(batches):
        y = torch.as_tensor(labels[idx])
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = (top[:, 0] == y).numpy()
        pred[idx] = top[:, 0].numpy()
        lengths = [len(b) for b in chunk]
        batch_of[idx] = np.repeat(np.arange(len(sizes), len(sizes) + len(chunk)), lengths)
        hit5 = (top == y[:, None]).any(dim=-1).numpy()
        correct5[idx] = hit5
        starts = np.cumsum([0, *lengths[:-1]])
        per_batch.extend(int(c) for c in np.add.reduceat(hit.astype(np.int64), starts))
        per_batch5.extend(int(c) for c in np.add.reduceat(hit5.astype(np.int64), starts))
        sizes.extend(lengths)
        if keep_logits:
            if logits_all is None:
                logits_all = np.zeros((n, logits.shape[-1]), dtype=np.float32)
            logits_all[idx] = logits.numpy()
    correct = pred == labels
    return {"pred": pred, "batch": batch_of, "top1": float(correct.mean()), "top5": float(correct5.mean()),
            "released_metric_top1": released_metric(per_batch, sizes),
            "released_metric_top5": released_metric(per_batch5, sizes), "num_batches": len(batches),
            "logits": logits_all}


def _sweeps(runner: _Runner, handle, labels: np.ndarray, seed: int, noise_on: bool) -> dict:
    """The batch-size and purity sweeps of one setting (noise on), and its predictions."""
    handle.enabled = noise_on
    out = {"batch_size": [], "purity": []}
    arrays = {}
    single = None
    for order in SWEEP_ORDERS:
        for k in SWEEP_BATCH_SIZES:
            handle.reseed(seed)
            if k == 1 and single is not None and not handle.spec.is_random:
                r = single  # a batch of one image is the same batch in every order
            else:
                r = _score(runner, batches_in_order(labels, order, k, seed), labels)
            if k == 1:
                single = r
            out["batch_size"].append({"order": order, "batch_size": k, "top1": r["top1"], "n": len(labels)})
            arrays[f"{batch_size_stem(order, k)}/pred"] = r["pred"]
            arrays[f"{batch_size_stem(order, k)}/batch"] = r["batch"]
    for m in range(1, PURITY_BATCH_SIZE + 1):
        handle.reseed(seed)
        pairs = purity_batches(labels, m, PURITY_BATCH_SIZE, seed)
        hits, batch_of = np.zeros(len(labels), dtype=bool), np.full(len(labels), -1, dtype=np.int64)
        batches = [p[0] for p in pairs]
        pred = np.concatenate([logits.argmax(-1).numpy() for _, _, logits in runner.logits(batches)])
        starts = np.cumsum([0, *map(len, batches[:-1])])  # each batch's first row in the joined order
        for j, ((_, targets), start) in enumerate(zip(pairs, starts)):
            # the targets lead their batch (purity_batches puts them first)
            hits[targets] = pred[start : start + len(targets)] == labels[targets]
            batch_of[targets] = j
        out["purity"].append({"m": m, "batch_size": PURITY_BATCH_SIZE, "top1": float(hits.mean()), "n": len(labels)})
        arrays[f"{purity_stem(m)}/correct"] = hits
        arrays[f"{purity_stem(m)}/batch"] = batch_of
    return out, arrays


def _pooling_control(clean_logits: np.ndarray, labels: np.ndarray, seed: int, test_batch_size: int) -> tuple[dict, dict]:
    """The noise-free control: each image takes the mean logits of its batch (evidence pooled, no operator)."""
    from noisynn.report.stats import logit_pooling

    out, arrays = {"protocols": {}, "batch_size": []}, {}

    def pooled(batches):
        batch_of = np.empty(len(labels), dtype=np.int64)
        for j, b in enumerate(batches):
            batch_of[b] = j
        return logit_pooling(clean_logits, batches), batch_of

    for name in ("released", "shuffled", "class_pure", "class_mixed"):
        p = PROTOCOL_DEFS[name]
        pred, batch_of = pooled(batches_in_order(labels, p.order, test_batch_size, seed))
        out["protocols"][name] = {"order": p.order, "batch_size": test_batch_size, "top1": float((pred == labels).mean())}
        arrays[f"{pooling_stem(name)}/pred"], arrays[f"{pooling_stem(name)}/batch"] = pred, batch_of
    for order in SWEEP_ORDERS:
        for k in SWEEP_BATCH_SIZES:
            pred, batch_of = pooled(batches_in_order(labels, order, k, seed))
            out["batch_size"].append({"order": order, "batch_size": k, "top1": float((pred == labels).mean())})
            arrays[f"{pooling_batch_size_stem(order, k)}/pred"] = pred
    return out, arrays


def _setting_key(setting: dict) -> str:
    return setting_key(setting["noise"], setting["apply"], setting["site"])


@torch.no_grad()
def evaluate_group(
    checkpoint: Path,
    data_dir: Path,
    site: str,
    settings: list[dict],
    protocols: tuple[str, ...] = PROTOCOLS,
    test_batch_size: int = 10,
    reported_metric: str = "running",
    seed: int = 0,
    split: str = "test",
    use_prefix_cache: bool = True,
    forward_batch_size: int = 256,
    max_cache_bytes: int = 4 << 30,
    num_workers: int = 0,
    device: str | None = None,
    amp: bool | None = None,
    amp_dtype: str = "bfloat16",
    progress: bool = True,
    allow_other_data: bool = False,
) -> tuple[dict, dict]:
    """Evaluate every setting of a group (same checkpoint, same site) under each protocol.

    ``settings``: dicts with ``noise_params`` (a noise mapping) and, from the grid, the setting's
    record (``vocab.Evaluation`` fields); ``sweeps: true`` also runs the sweeps and the control.
    Returns (the group's JSON-ready result, the per-image arrays for its predictions file).
    ``forward_batch_size``: images per forward call, in the prefix pass and in the suffix (where test
    batches are joined, each noised alone); the results do not depend on it beyond float rounding.
    ``device`` (default: CUDA where there is one, else the CPU); ``amp``: autocast to ``amp_dtype``
    (``bfloat16`` or ``float16``), on any device; None (the default) means on CUDA only, so that
    CPU results are float32 unless asked otherwise.

    Everything a user can get wrong is refused before the prefix pass: the settings, the
    checkpoint and the data (each checked as it is read), data other than the checkpoint's (its
    fingerprint; ``allow_other_data`` accepts it and records ``other_data: true``), and a noise that
    the site makes the identity (a dry forward on the meta device, ``models.checks.check_noises_act``).
    """
    protocols = tuple(protocols)
    if not protocols:
        raise UserError(f"no protocol to evaluate; name one or more of {', '.join(PROTOCOLS)}.")
    unknown = [p for p in protocols if p not in PROTOCOL_DEFS]
    if unknown:
        raise UserError(f"unknown protocol(s) {', '.join(unknown)}; protocols are {', '.join(PROTOCOLS)}.")
    if isinstance(test_batch_size, bool) or not isinstance(test_batch_size, int) or test_batch_size < 1:
        raise UserError(f"test_batch_size must be a positive integer; got {test_batch_size}.")
    if reported_metric not in REPORTED_METRICS:
        raise UserError(f"reported_metric must be one of {', '.join(REPORTED_METRICS)}; got {reported_metric!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be an integer >= 0 (it seeds the test orders and the noise); got {seed!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an integer >= 0; got {num_workers!r}.")
    if isinstance(forward_batch_size, bool) or not isinstance(forward_batch_size, int) or forward_batch_size < 1:
        raise UserError(f"forward_batch_size must be a positive integer (images per forward call); got {forward_batch_size!r}.")
    if split not in ("test", "val"):
        raise UserError(f"split must be test or val; got {split!r}.")
    specs = [NoiseSpec.from_dict(s["noise_params"]) for s in settings]
    if any(sp.kind != "none" for sp in specs) and (not site or site == "none"):
        raise UserError("a noise needs a site (e.g. blocks.3.attn or layer4.1; `noisynn sites` lists them).")
    site = site if site and site != "none" else "image"
    dev, autocast, dtype_name = autocast_for(device, amp, amp_dtype)
    model, meta = load_checkpoint(Path(checkpoint))
    check_site(model, site)  # without a noise too: the site decides the prefix cache and the records
    data = load_dataset(Path(data_dir), meta["model"], train_augment=False, splits=("val",))
    check_model_fits_data(model, f"checkpoint {checkpoint}", data_dir, data.num_classes, data.in_chans, data.image_size)
    trained_on = meta.get("data_fingerprint")
    other_data = trained_on != data.fingerprint
    if other_data and not allow_other_data:
        then = f"data with fingerprint {str(trained_on)[:12]}" if trained_on else "data its sidecar does not record"
        raise UserError(f"checkpoint {checkpoint} was made on {then}, but dataset {data_dir} has fingerprint "
                        f"{data.fingerprint[:12]} (another split or dataset, whose test images may be its training "
                        "images); evaluate on the checkpoint's data, or pass --allow-other-data if this is intended.")
    test = {"test": data.test, "val": data.val}[split]
    labels = np.asarray(test.labels)
    handles = [inject(model, site, sp, at_train=False, at_eval=True, seed=seed) for sp in specs]
    for h in handles:
        h.enabled = False
    point = cache_point(model, site)
    if any(sp.kind.startswith("linear") for sp in specs):
        dry = meta_model(meta["model"], meta["num_classes"], meta["in_chans"])
        batch_sizes = sorted({PROTOCOL_DEFS[p].batch_size or test_batch_size for p in protocols if PROTOCOL_DEFS[p].noise_on})
        for bs in batch_sizes:
            check_noises_act(dry, site, specs, (bs, data.in_chans, data.image_size, data.image_size),
                             f"checkpoint {checkpoint} at site {site}")
    model.to(dev).eval()

    t0 = time.time()
    cache = None
    prefix_images = 0
    if use_prefix_cache and point != "image":
        order = np.arange(len(labels))
        chunks = [order[i : i + forward_batch_size] for i in range(0, len(order), forward_batch_size)]
        for idx, (x, _) in zip(chunks, test.batches(chunks, num_workers)):
            with autocast():
                h = forward_prefix(model, site, x.to(dev))
            if cache is None:
                print(_describe_cache(len(labels), tuple(h.shape[1:]), h.dtype, point), flush=True)
                try:
                    cache = PrefixCache(len(labels), tuple(h.shape[1:]), h.dtype, max_cache_bytes)
                except _NoRoom as e:
                    print(f"noisynn: {e}; every protocol runs the whole network instead", flush=True)
                    break
            cache.put(idx, h)
            prefix_images += len(idx)
    prefix_seconds = time.time() - t0
    runner = _Runner(model, site, test, labels, cache, dev, autocast, num_workers, forward_batch_size)

    from tqdm import tqdm

    bar = tqdm(total=len(settings) * len(protocols), desc=f"evaluate {Path(checkpoint).parent.name} at {site}",
               disable=not progress, mininterval=2, file=sys.stderr)
    evaluations, arrays = [], {"labels": labels}
    clean_cache: dict = {}
    for setting, spec, handle in zip(settings, specs, handles):
        handle.enabled = False
        key = _setting_key(setting)
        results = {}
        for name in protocols:
            p = PROTOCOL_DEFS[name]
            bs = p.batch_size or test_batch_size
            t1 = time.time()
            handle.enabled = p.noise_on
            handle.reseed(seed)
            if not p.noise_on and name in clean_cache:
                # the noise off: every setting of the group predicts what the plain model predicts
                r = clean_cache[name]
            else:
                r = _score(runner, batches_in_order(labels, p.order, bs, seed), labels, keep_logits=name == "clean")
                if not p.noise_on:
                    clean_cache[name] = r
            k = handle.mixed_axis_size(bs) if p.noise_on and handle.last_input_shape else None
            results[name] = {
                "order": p.order,
                "batch_size": bs,
                "noise_applied": bool(p.noise_on and spec.kind != "none"),
                "n": len(labels),
                "num_batches": r["num_batches"],
                "top1": r["top1"],
                "top5": r["top5"],
                "released_metric_top1": r["released_metric_top1"],
                "released_metric_top5": r["released_metric_top5"],
                "mixed_axis_size": k,
                "theory_delta_S": delta_entropy_for(spec, k) if p.noise_on else None,
                "seconds": round(time.time() - t1, 4),
            }
            arrays[f"{key}/{name}/pred"] = r["pred"]
            arrays[f"{key}/{name}/batch"] = r["batch"]
            bar.update(1)
        handle.enabled = False
        record = {"setting": {k: v for k, v in setting.items() if k != "sweeps"}, "noise": spec.to_dict(),
                  "protocols": results}
        if setting.get("sweeps"):
            sweep, sweep_arrays = _sweeps(runner, handle, labels, seed, noise_on=True)
            handle.enabled = False
            if "clean" not in clean_cache:
                clean_cache["clean"] = _score(runner, batches_in_order(labels, "shuffled", test_batch_size, seed), labels,
                                              keep_logits=True)
            control, control_arrays = _pooling_control(clean_cache["clean"]["logits"], labels, seed, test_batch_size)
            record["sweeps"] = {**sweep, "pooling_control": control}
            arrays.update({f"{key}/{k}": v for k, v in {**sweep_arrays, **control_arrays}.items()})
        evaluations.append(record)
    bar.close()
    for h in handles:
        h.remove()
    if cache is not None:
        cache.close()
    total = time.time() - t0
    result = {
        "checkpoint": str(checkpoint),
        "model": meta["model"]["timm_name"],
        "data_dir": str(data_dir),
        "data_fingerprint": data.fingerprint,
        "split": split,
        "site": site,
        "cache_point": point,
        "prefix_cache": ("off" if not use_prefix_cache else "full-forward fallback" if point == "image" and site != "image"
                         else "memory-mapped" if cache is not None and cache.on_disk else "memory" if cache is not None
                         else "none (no room)" if point != "image" else "not needed (noise at the image)"),
        "dtype": dtype_name,  # of the autocast, float32 without one
        "prefix_cache_dtype": _dtype_name(cache.dtype) if cache is not None else None,
        "device": dev.type,
        "test_batch_size": test_batch_size,
        "forward_batch_size": forward_batch_size,
        "reported_metric": reported_metric,
        # how the test images were fed (an image folder's preprocess; None: embedded data, normalized when prepared)
        "preprocess": (data.test_transform or {}).get("preprocess"),
        "test_transform": data.test_transform,
        "prefix_seconds": round(prefix_seconds, 4),
        "total_seconds": round(total, 4),
        "images_per_second": round((runner.images + prefix_images) / max(total, 1e-9), 1),
        # through the network up to the cache point, and from it on (every image of a full pass, without the cache)
        "forward_images": {"prefix": prefix_images, "suffix": runner.images},
        "other_data": other_data,
        "checkpoint_data_fingerprint": trained_on,
        "checkpoint_train_args": meta.get("train_args"),
        # k of the checkpoint's fine-tuning (each protocol's own k is its batch_size)
        "checkpoint_noise_batch": meta.get("noise_batch"),
        "evaluations": evaluations,
        **provenance(seed),
    }
    return result, arrays


def prediction_arrays(arrays: dict, setting: dict) -> dict:
    """The arrays of one setting from a group's predictions (keys without the setting prefix)."""
    prefix = _setting_key(setting) + "/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, noise: dict, site: str | None,
                        protocols: tuple[str, ...] = PROTOCOLS, test_batch_size: int = 10, seed: int = 0,
                        **kwargs) -> dict:
    """One noise setting of one checkpoint under each protocol (a group of one); with ``predictions``."""
    spec = NoiseSpec.from_dict(noise)
    if spec.kind != "none" and not site:
        raise UserError(f"noise kind {spec.kind} needs a site (e.g. blocks.3.attn or layer4.1; `noisynn sites` lists them).")
    setting = {"noise": spec.kind, "apply": "eval", "site": site or "none", "seed": seed, "noise_params": noise}
    group, arrays = evaluate_group(checkpoint, data_dir, site or "image", [setting], protocols=protocols,
                                   test_batch_size=test_batch_size, seed=seed, progress=False, **kwargs)
    ev = group.pop("evaluations")[0]
    mine = prediction_arrays(arrays, setting)
    return {**group, "noise": ev["noise"], "protocols": ev["protocols"], "seed": seed,
            "predictions": {p: mine[f"{p}/pred"] for p in protocols}}
