"""One checkpoint, every evaluation protocol, one JSON (PAPER.md §6).

Protocols (noise applied at evaluation in all but ``clean``):

* ``clean``: the noise off: the plain model;
* ``released``: the released code's evaluation: class-sorted order, test batch size 10 by default;
  reports both the plain accuracy and the released metric (mean over batches of the running accuracy);
* ``shuffled``: the same batch size, a seeded random order;
* ``batch1``: batch size 1 (a batch-axis linear noise is then the identity);
* ``class_pure`` / ``class_mixed``: batches of one class / of distinct classes, same batch size.

Cost: in eval mode the network up to the injection site is a deterministic function of each image,
so it runs once per image and its output is reused by every protocol (in memory, or in a
memory-mapped file when it is large); only the part after the site runs once per protocol.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noisynn.data import load_dataset, released_metric, test_batches
from noisynn.entropy import delta_entropy_for
from noisynn.errors import UserError
from noisynn.inject import forward_prefix, forward_suffix, inject
from noisynn.io import provenance
from noisynn.models import check_model_fits_data, load_checkpoint
from noisynn.noise import NoiseSpec, mixed_axis_size

PROTOCOLS = ("clean", "released", "shuffled", "batch1", "class_pure", "class_mixed")

# protocol → (order, batch size (None = the test batch size), noise on)
PROTOCOL_DEFS = {
    "clean": ("shuffled", None, False),
    "released": ("class_sorted", None, True),
    "shuffled": ("shuffled", None, True),
    "batch1": ("shuffled", 1, True),
    "class_pure": ("class_pure", None, True),
    "class_mixed": ("class_mixed", None, True),
}


class _NoRoom(Exception):
    pass


class PrefixCache:
    """The cache-point activations of every test image, in RAM or in a memory-mapped temp file.

    The file goes to $SLURM_TMPDIR (a job's node-local disk) when set, else to $TMPDIR or /tmp.
    """

    def __init__(self, n: int, sample_shape: tuple[int, ...], max_bytes: int):
        nbytes = n * int(np.prod(sample_shape)) * 4
        self.on_disk = nbytes > max_bytes
        if self.on_disk:
            where = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
            free = shutil.disk_usage(where).free
            if free < nbytes * 1.05:
                raise _NoRoom(f"the prefix cache needs {nbytes / 2**30:.1f} GiB but {where} has {free / 2**30:.1f} GiB free")
            self._tmp = tempfile.TemporaryDirectory(prefix="noisynn-prefix-", dir=where)
            self.array = np.lib.format.open_memmap(Path(self._tmp.name) / "prefix.npy", mode="w+", dtype=np.float32,
                                                   shape=(n, *sample_shape))
        else:
            self.array = np.empty((n, *sample_shape), dtype=np.float32)

    def put(self, idx: np.ndarray, values: torch.Tensor) -> None:
        self.array[idx] = values.float().cpu().numpy()

    def get(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[idx]))

    def close(self) -> None:
        if self.on_disk:
            del self.array
            self._tmp.cleanup()


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return top[:, 0] == y, (top == y[:, None]).any(dim=-1)


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: Path,
    data_dir: Path,
    noise: dict,
    site: str | None,
    protocols: tuple[str, ...] = PROTOCOLS,
    test_batch_size: int = 10,
    seed: int = 0,
    split: str = "test",
    use_prefix_cache: bool = True,
    prefix_batch_size: int = 256,
    max_cache_bytes: int = 4 << 30,
    num_workers: int = 0,
    device: str | None = None,
) -> dict:
    """Evaluate one checkpoint under each protocol; returns the results dict (with predictions)."""
    unknown = [p for p in protocols if p not in PROTOCOL_DEFS]
    if unknown:
        raise UserError(f"unknown protocol(s) {', '.join(unknown)}; protocols are {', '.join(PROTOCOLS)}.")
    if int(test_batch_size) < 1:
        raise UserError(f"test_batch_size must be a positive integer; got {test_batch_size}.")
    spec = NoiseSpec.from_dict(noise)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(Path(checkpoint))
    if spec.kind != "none" and not site:
        raise UserError(f"noise kind {spec.kind} needs a site (e.g. blocks.3.attn or layer4.1; `noisynn sites` lists them).")
    data = load_dataset(Path(data_dir), meta["model"], train_augment=False, splits=("val",))
    check_model_fits_data(model, f"checkpoint {checkpoint}", data_dir, data.num_classes, data.in_chans, data.image_size)
    test = {"test": data.test, "val": data.val}[split]
    labels = np.asarray(test.labels)
    model.to(dev).eval()
    site = site or "image"
    handle = inject(model, site, spec, at_train=False, at_eval=True, seed=seed)

    t0 = time.time()
    cache = None
    if use_prefix_cache:
        order = np.arange(len(labels))
        chunks = [order[i : i + prefix_batch_size] for i in range(0, len(order), prefix_batch_size)]
        for idx, (x, _) in zip(chunks, test.batches(chunks, num_workers)):
            h = forward_prefix(model, site, x.to(dev))
            if cache is None:
                try:
                    cache = PrefixCache(len(labels), tuple(h.shape[1:]), max_cache_bytes)
                except _NoRoom as e:
                    print(f"noisynn: {e}; every protocol runs the whole network instead", flush=True)
                    break
            cache.put(idx, h)
    prefix_seconds = time.time() - t0

    results, predictions = {}, {}
    for name in protocols:
        order, bs, noise_on = PROTOCOL_DEFS[name]
        bs = bs or test_batch_size
        batches = test_batches(labels, order, bs, seed)
        handle.enabled = noise_on
        handle.reseed(seed)
        t1 = time.time()
        pred = np.empty(len(labels), dtype=np.int64)
        top1_per_batch, sizes, top1_all, top5_all = [], [], 0, 0
        source = ((cache.get(b), torch.as_tensor(labels[b])) for b in batches) if cache else test.batches(batches, num_workers)
        for b, (x, y) in zip(batches, source):
            x = x.to(dev)
            logits = forward_suffix(model, site, x) if cache else model(x)
            c1, c5 = _topk_correct(logits.float().cpu(), y.cpu(), 5)
            pred[b] = logits.argmax(-1).cpu().numpy()
            top1_per_batch.append(int(c1.sum()))
            sizes.append(len(b))
            top1_all += int(c1.sum())
            top5_all += int(c5.sum())
        n = int(sum(sizes))
        # k as the operator saw it at the site (for the batch axis: the full batch size)
        seen = handle.last_input_shape
        k = mixed_axis_size(spec, (bs, *seen[1:]), handle.num_prefix_tokens) if noise_on and seen else None
        results[name] = {
            "order": order,
            "batch_size": bs,
            "noise_applied": bool(noise_on and spec.kind != "none"),
            "n": n,
            "num_batches": len(batches),
            "top1": top1_all / n,
            "top5": top5_all / n,
            "released_metric_top1": released_metric(top1_per_batch, sizes),
            "mixed_axis_size": k,
            "theory_delta_S": delta_entropy_for(spec, k) if noise_on else None,
            "seconds": round(time.time() - t1, 4),
        }
        predictions[name] = pred
    handle.remove()
    if cache is not None:
        cache.close()
    return {
        "checkpoint": str(checkpoint),
        "model": meta["model"]["timm_name"],
        "data_dir": str(data_dir),
        "data_fingerprint": data.fingerprint,
        "split": split,
        "noise": spec.to_dict(),
        "site": site,
        "test_batch_size": test_batch_size,
        "protocols": results,
        "prefix_cache": bool(use_prefix_cache),
        "prefix_seconds": round(prefix_seconds, 4),
        "total_seconds": round(time.time() - t0, 4),
        "checkpoint_train_args": meta.get("train_args"),
        "predictions": predictions,
        **provenance(seed),
    }
