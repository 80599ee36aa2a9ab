"""One checkpoint at one site: every noise setting under every evaluation protocol, in one pass.
Several such groups of one checkpoint (its sites, its seeds) can run in one process, which reads the
checkpoint and the data once (``evaluate_groups``).

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
averages the logits of each batch. ``pass_schedule`` lists the passes a group runs (the cost tool,
noisynn/pipeline/cost.py, counts the same).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

__all__ = ["PROTOCOLS", "PROTOCOL_DEFS", "evaluate_group", "evaluate_groups", "evaluate_checkpoint", "logit_pooling",
           "pass_schedule", "prediction_arrays"]

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


# the largest prefix cache kept in RAM (max_cache_bytes, which the workflow leaves as it is); a
# larger one is memory-mapped on the node's disk (the cost tool says where that needs room)
RAM_CACHE_BYTES = 4 << 30

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


def _score_purity(runner: _Runner, labels: np.ndarray, m: int, seed: int) -> dict:
    """The purity sweep at ``m``: top-1 of the images scored as the m images of one class in their batch."""
    pairs = purity_batches(labels, m, PURITY_BATCH_SIZE, seed)
    hits, batch_of = np.zeros(len(labels), dtype=bool), np.full(len(labels), -1, dtype=np.int64)
    batches = [p[0] for p in pairs]
    pred = np.concatenate([logits.argmax(-1).numpy() for _, _, logits in runner.logits(batches)])
    starts = np.cumsum([0, *map(len, batches[:-1])])  # each batch's first row in the joined order
    for j, ((_, targets), start) in enumerate(zip(pairs, starts)):
        # the targets lead their batch (purity_batches puts them first)
        hits[targets] = pred[start : start + len(targets)] == labels[targets]
        batch_of[targets] = j
    return {"correct": hits, "batch": batch_of, "top1": float(hits.mean())}


def logit_pooling(logits: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Noise-free control: ŷ_i = argmax_c mean_{j ∈ batch(i)} z_jc, every image takes its batch's pooled logits.

    ``batches`` holds the image indices of each batch and must cover every image exactly once.
    """
    logits = np.asarray(logits, dtype=float)
    if logits.ndim != 2:
        raise UserError(f"`logits` must be a 2-D (images × classes) array; got shape {logits.shape}.")
    n = logits.shape[0]
    index = [np.asarray(b, dtype=np.int64).ravel() for b in batches]
    members = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    if members.size and (members.min() < 0 or members.max() >= n):
        raise UserError(f"`batches` must hold image indices in 0..{n - 1}; got {members.min()}..{members.max()}.")
    if not np.array_equal(np.bincount(members, minlength=n), np.ones(n, dtype=np.int64)):
        raise UserError(f"`batches` must place each of the {n} images in exactly one batch.")
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[members] = np.repeat(np.arange(len(index)), [b.size for b in index])
    sums = np.zeros((len(index), logits.shape[1]))
    np.add.at(sums, batch_of, logits)
    counts = np.maximum(np.bincount(batch_of, minlength=len(index)), 1)  # an empty batch pools nothing
    return (sums / counts[:, None]).argmax(axis=1)[batch_of]


def _pooling_control(clean_logits: np.ndarray, labels: np.ndarray, seed: int, test_batch_size: int) -> tuple[dict, dict]:
    """The noise-free control: each image takes the mean logits of its batch (evidence pooled, no operator)."""
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


# --- the pass schedule: what a group runs, in order (noisynn.pipeline.cost counts the same passes) --


@dataclass(frozen=True)
class Pass:
    """One pass of test batches through the network from the cache point on (the whole network
    without the cache), and the part of one setting's record it fills.

    ``part``: a protocol's name; ``batch_size`` or ``purity`` (the sweeps; the purity sweep's
    batches hold ``m`` images of one class, ``orders.purity_batches``); or ``pooling_control``,
    whose pass is the clean protocol's (the control pools its logits). ``batch_size`` None means
    the evaluation's test batch size. ``result`` names what the pass computes: a pass whose result
    an earlier pass of the schedule computed takes it (``runs`` False) and sends no image through.
    """

    setting: int  # the index of the setting whose record it fills
    part: str
    order: str | None
    batch_size: int | None
    noise_on: bool
    m: int | None
    result: tuple
    runs: bool
    images: int  # through the network: every image of its batches once, 0 where it reuses a result


@dataclass(frozen=True)
class Schedule:
    """What an evaluation group runs: one pass of the test images up to the cache point (none
    without the cache), then its passes in order."""

    prefix_images: int
    passes: tuple[Pass, ...]

    @property
    def forward_images(self) -> dict:
        """Images through the prefix and through the suffix (the whole network, without the cache)."""
        return {"prefix": self.prefix_images, "suffix": sum(p.images for p in self.passes)}


@functools.lru_cache(maxsize=64)
def _purity_images(labels: bytes, m: int, seed: int) -> int:
    """Images in the purity sweep's batches at ``m`` (memoized: every model of a config has the same test split)."""
    y = np.frombuffer(labels, dtype=np.int64)
    return sum(len(batch) for batch, _ in purity_batches(y, m, PURITY_BATCH_SIZE, seed))


def pass_schedule(settings: list[dict], protocols, labels: np.ndarray, seed: int, cached: bool) -> Schedule:
    """The passes of an evaluation group, in the order ``evaluate_group`` runs them.

    Each setting runs every protocol; the noise-off protocols run once per group (every setting
    predicts there what the plain model predicts). A setting with ``sweeps`` adds the batch-size
    sweep (a batch of one image is the same batch in every order: run once for a noise that draws
    no random numbers), the purity sweep and the pooling control, whose clean pass runs only if the
    group has not run it yet. Without the cache (noise at the image) no prefix pass runs and every
    pass runs the whole network.
    """
    n = len(labels)
    labels_bytes = np.asarray(labels, dtype=np.int64).tobytes()
    passes: list[Pass] = []
    done: set[tuple] = set()

    def add(setting, part, order, batch_size, noise_on, result, m=None):
        runs = result not in done
        done.add(result)
        images = (_purity_images(labels_bytes, m, seed) if part == "purity" else n) if runs else 0
        passes.append(Pass(setting, part, order, batch_size, noise_on, m, result, runs, images))

    for i, setting in enumerate(settings):
        for name in protocols:
            p = PROTOCOL_DEFS[name]
            add(i, name, p.order, p.batch_size, p.noise_on, (i, name) if p.noise_on else ("noise off", name))
        if setting.get("sweeps"):
            deterministic = not NoiseSpec.from_dict(setting["noise_params"]).is_random
            for order in SWEEP_ORDERS:
                for k in SWEEP_BATCH_SIZES:
                    same = SWEEP_ORDERS[0] if k == 1 and deterministic else order
                    add(i, "batch_size", order, k, True, (i, "batch_size", same, k))
            for m in range(1, PURITY_BATCH_SIZE + 1):
                add(i, "purity", None, PURITY_BATCH_SIZE, True, (i, "purity", m), m=m)
            clean = PROTOCOL_DEFS["clean"]
            add(i, "pooling_control", clean.order, clean.batch_size, clean.noise_on, ("noise off", "clean"))
    return Schedule(n if cached else 0, tuple(passes))


# --- one evaluation call: the checks, the checkpoint and data, then each group at its site ---------


def _check_options(protocols, test_batch_size, reported_metric, num_workers, forward_batch_size, split) -> tuple[str, ...]:
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
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an integer >= 0; got {num_workers!r}.")
    if isinstance(forward_batch_size, bool) or not isinstance(forward_batch_size, int) or forward_batch_size < 1:
        raise UserError(f"forward_batch_size must be a positive integer (images per forward call); got {forward_batch_size!r}.")
    if split not in ("test", "val"):
        raise UserError(f"split must be test or val; got {split!r}.")
    return protocols


@dataclass
class _Group:
    """One group of settings at one site and seed, its noises parsed."""

    site: str  # ``image`` for the input images (a group without a site)
    seed: int
    settings: list[dict]
    specs: list[NoiseSpec]


def _read_group(site: str | None, seed, settings: list[dict]) -> _Group:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be an integer >= 0 (it seeds the test orders and the noise); got {seed!r}.")
    specs = [NoiseSpec.from_dict(s["noise_params"]) for s in settings]
    if any(sp.kind != "none" for sp in specs) and (not site or site == "none"):
        raise UserError("a noise needs a site (e.g. blocks.3.attn or layer4.1; `noisynn sites` lists them).")
    return _Group(site if site and site != "none" else "image", seed, settings, specs)


@dataclass
class _Loaded:
    """The checkpoint and the test split that every group of one call evaluates, read and checked once."""

    checkpoint: Path
    data_dir: Path
    model: torch.nn.Module
    meta: dict
    data: object  # the prepared dataset (data.Dataset)
    test: object  # its split under evaluation
    other_data: bool  # data other than the checkpoint's (allowed by allow_other_data)


def _load(checkpoint: Path, data_dir: Path, groups: list[_Group], split: str, allow_other_data: bool) -> _Loaded:
    """The checkpoint (every group's site checked on it) and the data, refused where the checkpoint
    cannot classify it or was made on other data."""
    model, meta = load_checkpoint(checkpoint)
    for group in groups:
        check_site(model, group.site)  # without a noise too: the site decides the prefix cache and the records
    data = load_dataset(data_dir, meta["model"], train_augment=False, splits=("val",))
    check_model_fits_data(model, f"checkpoint {checkpoint}", data_dir, data.num_classes, data.in_chans, data.image_size)
    trained_on = meta.get("data_fingerprint")
    other_data = trained_on != data.fingerprint
    if other_data and not allow_other_data:
        then = f"data with fingerprint {str(trained_on)[:12]}" if trained_on else "data its sidecar does not record"
        raise UserError(f"checkpoint {checkpoint} was made on {then}, but dataset {data_dir} has fingerprint "
                        f"{data.fingerprint[:12]} (another split or dataset, whose test images may be its training "
                        "images); evaluate on the checkpoint's data, or pass --allow-other-data if this is intended.")
    return _Loaded(checkpoint, data_dir, model, meta, data, {"test": data.test, "val": data.val}[split], other_data)


def _check_noises_act(loaded: _Loaded, group: _Group, protocols, test_batch_size: int) -> None:
    """A linear noise that the site makes the identity, refused at every batch size its protocols feed it."""
    if not any(sp.kind.startswith("linear") for sp in group.specs):
        return
    meta, data = loaded.meta, loaded.data
    dry = meta_model(meta["model"], meta["num_classes"], meta["in_chans"])
    batch_sizes = sorted({PROTOCOL_DEFS[p].batch_size or test_batch_size for p in protocols if PROTOCOL_DEFS[p].noise_on})
    for bs in batch_sizes:
        check_noises_act(dry, group.site, group.specs, (bs, data.in_chans, data.image_size, data.image_size),
                         f"checkpoint {loaded.checkpoint} at site {group.site}")


def _prefix_pass(model, site: str, point: str, test, n: int, device, autocast, forward_batch_size: int,
                 num_workers: int, max_cache_bytes: int) -> tuple[PrefixCache | None, int]:
    """Every test image through the network up to the cache point, once: (the cache, images run).
    No cache (None) where it has no room: every pass then runs the whole network."""
    cache = None
    images = 0
    order = np.arange(n)
    chunks = [order[i : i + forward_batch_size] for i in range(0, n, forward_batch_size)]
    for idx, (x, _) in zip(chunks, test.batches(chunks, num_workers)):
        with autocast():
            h = forward_prefix(model, site, x.to(device))
        if cache is None:
            print(_describe_cache(n, tuple(h.shape[1:]), h.dtype, point), flush=True)
            try:
                cache = PrefixCache(n, tuple(h.shape[1:]), h.dtype, max_cache_bytes)
            except _NoRoom as e:
                print(f"noisynn: {e}; every protocol runs the whole network instead", flush=True)
                break
        cache.put(idx, h)
        images += len(idx)
    return cache, images


def _protocol_record(p: Pass, r: dict, spec: NoiseSpec, handle, n: int, test_batch_size: int, started: float) -> dict:
    """A protocol's numbers for one setting, with the k its noise mixed and the theory's ΔS there."""
    bs = p.batch_size or test_batch_size
    k = handle.mixed_axis_size(bs) if p.noise_on and handle.last_input_shape else None
    return {
        "order": p.order,
        "batch_size": bs,
        "noise_applied": bool(p.noise_on and spec.kind != "none"),
        "n": n,
        "num_batches": r["num_batches"],
        "top1": r["top1"],
        "top5": r["top5"],
        "released_metric_top1": r["released_metric_top1"],
        "released_metric_top5": r["released_metric_top5"],
        "mixed_axis_size": k,
        "theory_delta_S": delta_entropy_for(spec, k) if p.noise_on else None,
        "seconds": round(time.time() - started, 4),
    }


def _run_schedule(runner: _Runner, schedule: Schedule, group: _Group, handles: list, labels: np.ndarray,
                  test_batch_size: int, bar) -> tuple[list[dict], dict]:
    """Follow the schedule: run each pass (or take the result an earlier pass computed) and put it
    in its setting's record; returns (the records, the per-image arrays)."""
    n, seed = len(labels), group.seed
    records = [{"setting": {k: v for k, v in s.items() if k != "sweeps"}, "noise": spec.to_dict(), "protocols": {},
                **({"sweeps": {"batch_size": [], "purity": []}} if s.get("sweeps") else {})}
               for s, spec in zip(group.settings, group.specs)]
    keys = [_setting_key(s) for s in group.settings]
    arrays = {"labels": labels}
    computed: dict[tuple, dict] = {}
    for p in schedule.passes:
        handle, record, key = handles[p.setting], records[p.setting], keys[p.setting]
        started = time.time()
        handle.enabled = p.noise_on
        handle.reseed(seed)  # every pass starts the noise's random stream afresh
        if p.runs:
            computed[p.result] = (_score_purity(runner, labels, p.m, seed) if p.part == "purity" else
                                  _score(runner, batches_in_order(labels, p.order, p.batch_size or test_batch_size, seed),
                                         labels, keep_logits=not p.noise_on))
        r = computed[p.result]
        if p.part in PROTOCOL_DEFS:
            record["protocols"][p.part] = _protocol_record(p, r, group.specs[p.setting], handle, n, test_batch_size, started)
            arrays[f"{key}/{p.part}/pred"], arrays[f"{key}/{p.part}/batch"] = r["pred"], r["batch"]
            bar.update(1)
        elif p.part == "batch_size":
            record["sweeps"]["batch_size"].append({"order": p.order, "batch_size": p.batch_size, "top1": r["top1"], "n": n})
            stem = batch_size_stem(p.order, p.batch_size)
            arrays[f"{key}/{stem}/pred"], arrays[f"{key}/{stem}/batch"] = r["pred"], r["batch"]
        elif p.part == "purity":
            record["sweeps"]["purity"].append({"m": p.m, "batch_size": p.batch_size, "top1": r["top1"], "n": n})
            arrays[f"{key}/{purity_stem(p.m)}/correct"], arrays[f"{key}/{purity_stem(p.m)}/batch"] = r["correct"], r["batch"]
        else:  # the pooling control, from the clean protocol's logits
            control, control_arrays = _pooling_control(r["logits"], labels, seed, test_batch_size)
            record["sweeps"]["pooling_control"] = control
            arrays.update({f"{key}/{k}": v for k, v in control_arrays.items()})
        handle.enabled = False
    return records, arrays


def _cache_mode(use_prefix_cache: bool, site: str, point: str, cache: PrefixCache | None) -> str:
    if not use_prefix_cache:
        return "off"
    if point == "image":
        return "full-forward fallback" if site != "image" else "not needed (noise at the image)"
    if cache is None:
        return "none (no room)"
    return "memory-mapped" if cache.on_disk else "memory"


@dataclass(frozen=True)
class _Options:
    """What every group of one evaluation call shares (checked)."""

    protocols: tuple[str, ...]
    test_batch_size: int
    reported_metric: str
    split: str
    use_prefix_cache: bool
    forward_batch_size: int
    max_cache_bytes: int
    num_workers: int
    device: torch.device
    autocast: object
    dtype_name: str
    progress: bool


@torch.no_grad()
def _evaluate_at_site(loaded: _Loaded, group: _Group, opt: _Options) -> tuple[dict, dict]:
    """One group: its noises hooked in, the prefix pass, its schedule, its record."""
    model, meta, data, test = loaded.model, loaded.meta, loaded.data, loaded.test
    labels = np.asarray(test.labels)
    site = group.site
    handles = [inject(model, site, sp, at_train=False, at_eval=True, seed=group.seed) for sp in group.specs]
    for h in handles:
        h.enabled = False
    point = cache_point(model, site)
    schedule = pass_schedule(group.settings, opt.protocols, labels, group.seed,
                             cached=opt.use_prefix_cache and point != "image")
    t0 = time.time()
    cache, prefix_images = None, 0
    if schedule.prefix_images:
        cache, prefix_images = _prefix_pass(model, site, point, test, len(labels), opt.device, opt.autocast,
                                            opt.forward_batch_size, opt.num_workers, opt.max_cache_bytes)
    prefix_seconds = time.time() - t0
    runner = _Runner(model, site, test, labels, cache, opt.device, opt.autocast, opt.num_workers, opt.forward_batch_size)

    from tqdm import tqdm

    bar = tqdm(total=len(group.settings) * len(opt.protocols), desc=f"evaluate {loaded.checkpoint.parent.name} at {site}",
               disable=not opt.progress, mininterval=2, file=sys.stderr)
    evaluations, arrays = _run_schedule(runner, schedule, group, handles, labels, opt.test_batch_size, bar)
    bar.close()
    for h in handles:
        h.remove()
    if cache is not None:
        cache.close()
    total = time.time() - t0
    trained_on = meta.get("data_fingerprint")
    result = {
        "checkpoint": str(loaded.checkpoint),
        "model": meta["model"]["timm_name"],
        "data_dir": str(loaded.data_dir),
        "data_fingerprint": data.fingerprint,
        "split": opt.split,
        "site": site,
        "cache_point": point,
        "prefix_cache": _cache_mode(opt.use_prefix_cache, site, point, cache),
        "dtype": opt.dtype_name,  # of the autocast, float32 without one
        "prefix_cache_dtype": _dtype_name(cache.dtype) if cache is not None else None,
        "device": opt.device.type,
        "test_batch_size": opt.test_batch_size,
        "forward_batch_size": opt.forward_batch_size,
        "reported_metric": opt.reported_metric,
        # how the test images were fed (an image folder's preprocess; None: embedded data, normalized when prepared)
        "preprocess": (data.test_transform or {}).get("preprocess"),
        "test_transform": data.test_transform,
        "prefix_seconds": round(prefix_seconds, 4),
        "total_seconds": round(total, 4),
        "images_per_second": round((runner.images + prefix_images) / max(total, 1e-9), 1),
        # through the network up to the cache point, and from it on (every image of a full pass, without the cache)
        "forward_images": {"prefix": prefix_images, "suffix": runner.images},
        "other_data": loaded.other_data,
        "checkpoint_data_fingerprint": trained_on,
        "checkpoint_train_args": meta.get("train_args"),
        # k of the checkpoint's fine-tuning (each protocol's own k is its batch_size)
        "checkpoint_noise_batch": meta.get("noise_batch"),
        "evaluations": evaluations,
        **provenance(group.seed),
    }
    return result, arrays


def evaluate_groups(
    checkpoint: Path,
    data_dir: Path,
    groups: list[dict],
    protocols: tuple[str, ...] = PROTOCOLS,
    test_batch_size: int = 10,
    reported_metric: str = "running",
    split: str = "test",
    use_prefix_cache: bool = True,
    forward_batch_size: int = 256,
    max_cache_bytes: int = RAM_CACHE_BYTES,
    num_workers: int = 0,
    device: str | None = None,
    amp: bool | None = None,
    amp_dtype: str = "bfloat16",
    progress: bool = True,
    allow_other_data: bool = False,
) -> Iterator[tuple[dict, dict]]:
    """Evaluate groups of one checkpoint under each protocol, the checkpoint and the data read once.

    ``groups``: dicts with ``site``, ``seed`` and ``settings``, the settings of one site: dicts with
    ``noise_params`` (a noise mapping) and, from the grid, the setting's record (``vocab.Evaluation``
    fields); ``sweeps: true`` also runs the sweeps and the control. Yields, group by group, (the
    group's JSON-ready result, the per-image arrays for its predictions file), each what the group
    evaluated alone gives; the passes of a group are ``pass_schedule``'s.
    ``forward_batch_size``: images per forward call, in the prefix pass and in the suffix (where test
    batches are joined, each noised alone); the results do not depend on it beyond float rounding.
    ``device`` (default: CUDA where there is one, else the CPU); ``amp``: autocast to ``amp_dtype``
    (``bfloat16`` or ``float16``), on any device; None (the default) means on CUDA only, so that
    CPU results are float32 unless asked otherwise.

    Everything a user can get wrong is refused before the first prefix pass: the settings, the
    checkpoint and the data (each checked as it is read), data other than the checkpoint's (its
    fingerprint; ``allow_other_data`` accepts it and records ``other_data: true``), and a noise that
    the site makes the identity (a dry forward on the meta device, ``models.checks.check_noises_act``).
    """
    checked = _check_options(protocols, test_batch_size, reported_metric, num_workers, forward_batch_size, split)
    parsed = [_read_group(g["site"], g["seed"], g["settings"]) for g in groups]
    dev, autocast, dtype_name = autocast_for(device, amp, amp_dtype)
    loaded = _load(Path(checkpoint), Path(data_dir), parsed, split, allow_other_data)
    for group in parsed:
        _check_noises_act(loaded, group, checked, test_batch_size)
    loaded.model.to(dev).eval()
    opt = _Options(checked, test_batch_size, reported_metric, split, use_prefix_cache, forward_batch_size,
                   max_cache_bytes, num_workers, dev, autocast, dtype_name, progress)
    for group in parsed:
        yield _evaluate_at_site(loaded, group, opt)


def evaluate_group(checkpoint: Path, data_dir: Path, site: str, settings: list[dict], seed: int = 0,
                   **options) -> tuple[dict, dict]:
    """Every setting of one group (same checkpoint, same site) under each protocol: ``evaluate_groups``
    of this group alone (``options``: its keyword arguments)."""
    (only,) = evaluate_groups(checkpoint, data_dir, [{"site": site, "seed": seed, "settings": settings}], **options)
    return only


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
