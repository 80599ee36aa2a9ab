"""Datasets, their fingerprints, and the test orders the evaluation protocols use.

Two sources:

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes, no download),
  split deterministically (stratified) from a seed and materialized once as ``digits.npz`` plus a
  ``manifest.json`` with per-sample hashes, so every later job sees one fingerprint;
* ``imagefolder``: any torchvision ImageFolder layout (ImageNet, TinyImageNet) at a path, with
  timm's transforms and a manifest (class → count, file hashes) that training checks against.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noisynn.errors import UserError
from noisynn.io import atomic_write_json, atomic_path

ORDERS = ("shuffled", "class_sorted", "class_pure", "class_mixed")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --- test orders -----------------------------------------------------------------------------


def test_batches(labels: np.ndarray, order: str, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Split the indices 0..N-1 into test batches in the named order; every index appears once.

    ``shuffled``: a seeded permutation, cut into batches;
    ``class_sorted``: sequential over the class-sorted samples (the released code's
    SequentialSampler over ImageFolder), cut into batches that may straddle two classes;
    ``class_pure``: every batch holds one class (a class's last batch may be smaller);
    ``class_mixed``: every batch holds distinct classes as far as the remaining classes allow.
    """
    labels = np.asarray(labels)
    if order not in ORDERS:
        raise UserError(f"test order must be one of {', '.join(ORDERS)}; got {order!r}.")
    if int(batch_size) < 1:
        raise UserError(f"test batch size must be a positive integer; got {batch_size}.")
    n = len(labels)
    if order == "shuffled":
        perm = np.random.default_rng(seed).permutation(n)
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    if order == "class_sorted":
        seq = np.concatenate([by_class[c] for c in sorted(by_class)]) if n else np.array([], dtype=int)
        return [seq[i : i + batch_size] for i in range(0, n, batch_size)]
    if order == "class_pure":
        return [idx[i : i + batch_size] for c in sorted(by_class) for idx in [by_class[c]] for i in range(0, len(idx), batch_size)]
    return _class_mixed(by_class, batch_size)


def _class_mixed(by_class: dict, batch_size: int) -> list[np.ndarray]:
    """Batches of the test batch size (the last may be smaller) with the fewest repeated labels.

    With B = ceil(N / batch_size) batches, a class of n samples can sit in at most min(n, B) of
    them. Classes are placed largest demand first, one sample into each of the min(n, B) batches
    with the most room left (Havel–Hakimi on the class–batch bipartite graph, which reaches the
    max-flow optimum); what remains (samples of classes larger than B) fills the room left over.
    A batch-by-batch greedy is not optimal: it spends the room of early batches on repeats of
    small classes that later batches then lack.
    """
    n = sum(len(idx) for idx in by_class.values())
    if n == 0:
        return []
    num_batches = -(-n // batch_size)
    room = np.full(num_batches, batch_size, dtype=np.int64)
    room[-1] = n - batch_size * (num_batches - 1)
    batches: list[list[int]] = [[] for _ in range(num_batches)]
    queues = {c: list(map(int, idx)) for c, idx in by_class.items()}
    for c in sorted(queues, key=lambda c: (-min(len(queues[c]), num_batches), c)):
        # most room first, ties by batch position (a stable sort keeps it deterministic)
        targets = np.argsort(-room, kind="stable")[: min(len(queues[c]), num_batches)]
        for j in targets[room[targets] > 0]:
            batches[j].append(queues[c].pop(0))
            room[j] -= 1
    j = 0
    for c in sorted(queues):
        for i in queues[c]:
            while room[j] == 0:
                j += 1
            batches[j].append(i)
            room[j] -= 1
    return [np.array(b, dtype=np.int64) for b in batches]


def released_metric(correct_per_batch: list[int], batch_sizes: list[int]) -> float:
    """The released code's reported accuracy: the mean over batches of the running accuracy.

    After batch t the running accuracy is (correct in batches 1..t) / (samples in batches 1..t);
    the metric averages those running values over t. It equals the plain accuracy only by chance.
    """
    if len(correct_per_batch) != len(batch_sizes) or not batch_sizes:
        raise ValueError("released_metric needs one correct count per batch and at least one batch")
    correct = np.cumsum(np.asarray(correct_per_batch, dtype=np.float64))
    seen = np.cumsum(np.asarray(batch_sizes, dtype=np.float64))
    return float(np.mean(correct / seen))


# --- splits ------------------------------------------------------------------------------------


@dataclass
class ArraySplit:
    """A split held in memory as a normalized float tensor (N, C, H, W) and int labels."""

    images: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches, num_workers: int = 0, seed: int = 0):
        targets = torch.as_tensor(self.labels, dtype=torch.long)
        for idx in index_batches:
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            yield self.images[idx], targets[idx]


class _ImageFiles(torch.utils.data.Dataset):
    """The manifest's (path, label) samples, read with PIL; an unreadable file is named, not a traceback."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform
        self.seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import random

        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise UserError(f"image {path} cannot be read ({type(e).__name__}); fix or remove it, or prepare the "
                            "dataset with verify_images: true and on_bad_image: skip.") from None
        # the augmentation of a sample is a function of (seed, sample) alone: the same after a
        # resume and for any number of workers; the caller's random streams are left untouched
        # (timm's transforms draw from random, numpy and torch)
        state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            sample_seed = (self.seed * 1_000_003 + i) % 2**32
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            out = self.transform(image)
        random.setstate(state)
        np.random.set_state(np_state)
        return out, label


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: the scheduler signals every process of a job, and the
    training process (not a dying worker) must be the one to react, by saving its resume state."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class FolderSplit:
    """A split read from image files with timm's transforms, in the order of the manifest."""

    def __init__(self, transform, samples: list[tuple[str, int]]):
        self.dataset = _ImageFiles(samples, transform)
        self.labels = np.asarray([t for _, t in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches, num_workers: int = 0, seed: int = 0):
        """Batches of (images, labels); random augmentation is seeded from ``seed`` (e.g. per epoch)."""
        from torch.utils.data import DataLoader

        self.dataset.seed = seed
        loader = DataLoader(
            self.dataset,
            batch_sampler=[list(map(int, b)) for b in index_batches],
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_quiet_worker,
        )
        yield from loader


@dataclass
class Dataset:
    """The splits of one prepared dataset, with what a model needs to know about it."""

    train: object
    val: object
    test: object
    num_classes: int
    in_chans: int
    image_size: int
    fingerprint: str
    classes: list


# --- digits ----------------------------------------------------------------------------------


def _digits_arrays(image_size: int):
    from sklearn.datasets import load_digits

    if image_size not in (8, 16, 32):
        raise UserError(f"dataset.image_size for digits must be 8, 16 or 32; got {image_size}.")
    bunch = load_digits()
    raw = bunch.images.astype(np.uint8)  # values 0..16
    labels = bunch.target.astype(np.int64)
    images = torch.as_tensor(raw, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return raw, images, labels


def prepare_digits(out_dir: Path, image_size: int = 16, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict:
    """Materialize the digits split under ``out_dir`` (``digits.npz`` + ``manifest.json``)."""
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    raw, images, labels = _digits_arrays(image_size)
    idx = np.arange(len(labels))
    trainval, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        trainval, test_size=val_fraction / (1 - test_fraction), stratify=labels[trainval], random_state=seed
    )
    train, val, test = np.sort(train), np.sort(val), np.sort(test)
    mean = float(images[train].mean())
    std = float(images[train].std())
    normalized = ((images - mean) / std).numpy().astype(np.float32)

    sample_hashes = [hashlib.sha256(raw[i].tobytes() + bytes([labels[i]])).hexdigest()[:16] for i in idx]
    fingerprint = _fingerprint(
        {"source": "sklearn.load_digits", "image_size": image_size, "seed": seed, "train": train.tolist(),
         "val": val.tolist(), "test": test.tolist(), "samples": sample_hashes}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "digits.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=normalized, labels=labels, train=train, val=val, test=test)
    manifest = {
        "dataset": "digits",
        "kind": "digits",
        "image_size": image_size,
        "in_chans": 1,
        "num_classes": 10,
        "classes": [str(c) for c in range(10)],
        "split_seed": seed,
        "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "class_counts": {s: np.bincount(labels[ix], minlength=10).tolist() for s, ix in [("train", train), ("val", val), ("test", test)]},
        "normalization": {"mean": mean, "std": std},
        "sample_sha256_16": sample_hashes,
        "fingerprint": fingerprint,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- image folders ---------------------------------------------------------------------------


def scan_image_folder(root: Path, on_bad_image: str = "error", verify_images: bool = False) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Classes, samples and skipped files of an ImageFolder tree, with every user error named."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist (expected one sub-folder per class).")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise UserError(f"dataset folder {root} has no class sub-folders (expected the ImageFolder layout root/<class>/<image>).")
    samples, skipped = [], []
    for ci, cls in enumerate(classes):
        files = sorted(
            os.path.join(dp, f)
            for dp, _, fs in os.walk(root / cls, followlinks=True)
            for f in fs
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise UserError(f"class folder {root / cls} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)}).")
        for f in files:
            if verify_images and not _image_readable(f):
                if on_bad_image == "skip":
                    skipped.append(f)
                    continue
                raise UserError(f"image {f} cannot be read (corrupt or not an image); set dataset.on_bad_image: skip to skip such files.")
            samples.append((f, ci))
    return classes, samples, skipped


def _image_readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.convert("RGB").load()
        return True
    except Exception:
        return False


def _file_hash(path: str, mode: str) -> str:
    """Content hash: the whole file (``full``), or its size and first and last 4 KiB (``fast``).

    ``fast`` reads 8 KiB of each file however large it is: enough to notice a missing, truncated
    or replaced image, at a fraction of the cost of reading ImageNet's 150 GB.
    """
    h = hashlib.blake2b(digest_size=8)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if mode == "full" or size <= 8192:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(fh.read(4096))
            fh.seek(size - 4096)
            h.update(fh.read(4096))
    h.update(str(size).encode())
    return h.hexdigest()


def prepare_image_folder(out_dir: Path, root: Path, train_dir: str = "train", val_dir: str = "val", image_size: int = 224,
                         hash_mode: str = "fast", on_bad_image: str = "error", verify_images: bool = True, name: str = "imagefolder") -> dict:
    """Check an ImageFolder dataset and write its manifest (class → count, file hashes)."""
    out_dir = Path(out_dir)
    root = Path(root)
    splits, skipped_all = {}, {}
    for split, sub in (("train", train_dir), ("val", val_dir)):
        classes, samples, skipped = scan_image_folder(root / sub, on_bad_image, verify_images)
        splits[split] = (classes, samples)
        skipped_all[split] = [os.path.relpath(s, root) for s in skipped]
    if splits["train"][0] != splits["val"][0]:
        missing = sorted(set(splits["train"][0]) ^ set(splits["val"][0]))[:5]
        raise UserError(f"{root / train_dir} and {root / val_dir} have different class folders (first differences: {', '.join(missing)}).")
    classes = splits["train"][0]
    files = {s: {os.path.relpath(p, root): _file_hash(p, hash_mode) for p, _ in samples} for s, (_, samples) in splits.items()}
    manifest = {
        "dataset": name,
        "kind": "imagefolder",
        "root": str(root),
        "train_dir": train_dir,
        "val_dir": val_dir,
        "image_size": image_size,
        "in_chans": 3,
        "num_classes": len(classes),
        "classes": classes,
        "counts": {s: len(v[1]) for s, v in splits.items()},
        "class_counts": {s: np.bincount([t for _, t in v[1]], minlength=len(classes)).tolist() for s, v in splits.items()},
        "hash_mode": hash_mode,
        "skipped_unreadable": skipped_all,
        "files": files,
    }
    manifest["fingerprint"] = _fingerprint({k: manifest[k] for k in ("classes", "class_counts", "files")})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# --- loading -----------------------------------------------------------------------------------


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"dataset manifest {path} is missing (run the prepare_data step, `noisynn prepare`, first).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"dataset manifest {path} is not valid JSON ({e.msg}); prepare the dataset again.") from None


def load_dataset(data_dir: Path, model_cfg: dict | None = None, train_augment: bool = True,
                 splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """Load a prepared dataset; its fingerprint travels into every checkpoint and evaluation."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest["kind"] == "digits":
        npz_path = data_dir / "digits.npz"
        if not npz_path.is_file():
            raise UserError(f"dataset file {npz_path} is missing; prepare the dataset again.")
        with np.load(npz_path) as z:
            images, labels = torch.from_numpy(z["images"]), z["labels"]
            parts = {s: z[s] for s in ("train", "val", "test")}
        split = {s: ArraySplit(images[torch.as_tensor(ix)], labels[ix]) for s, ix in parts.items()}
        return Dataset(split["train"], split["val"], split["test"], manifest["num_classes"], 1, manifest["image_size"],
                       manifest["fingerprint"], manifest["classes"])
    return _load_folder_dataset(manifest, model_cfg or {}, train_augment, splits)


def _normalization(model_cfg: dict) -> tuple[tuple, tuple, str]:
    """Mean, std and interpolation the model's timm weights expect (overridable by ``augment``)."""
    import timm

    aug = model_cfg.get("augment") or {}
    cfg = timm.models.get_pretrained_cfg(model_cfg.get("timm_name", "")) if model_cfg.get("timm_name") else None
    mean = tuple(aug.get("mean", getattr(cfg, "mean", None) or (0.5, 0.5, 0.5)))
    std = tuple(aug.get("std", getattr(cfg, "std", None) or (0.5, 0.5, 0.5)))
    interpolation = aug.get("interpolation", getattr(cfg, "interpolation", None) or "bicubic")
    return mean, std, interpolation


def _load_folder_dataset(manifest: dict, model_cfg: dict, train_augment: bool, splits: tuple[str, ...]) -> Dataset:
    from timm.data import create_transform
    from torchvision import transforms

    root = Path(manifest["root"])
    class_index = {c: i for i, c in enumerate(manifest["classes"])}
    # the model's input size: its config's image_size, else its img_size kwarg, else the dataset's
    size = int(model_cfg.get("image_size") or (model_cfg.get("kwargs") or {}).get("img_size") or manifest["image_size"])
    aug = model_cfg.get("augment") or {}
    mean, std, interpolation = _normalization(model_cfg)
    train_tf = create_transform(
        size,
        is_training=train_augment,
        auto_augment=aug.get("auto_augment", "rand-m9-mstd0.5"),
        scale=tuple(aug.get("scale", (0.05, 1.0))),
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    # the released test transform: a plain square resize, no crop
    test_tf = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode(interpolation)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    out = {}
    for split, sub in (("train", manifest["train_dir"]), ("val", manifest["val_dir"])):
        if split not in splits:
            continue
        files = manifest["files"][split]
        for rel in list(files)[:1]:
            if not (root / rel).exists():
                raise UserError(f"dataset file {root / rel} listed in the manifest is missing; was the dataset moved? Prepare it again.")
        samples = [(str(root / rel), class_index[Path(rel).relative_to(sub).parts[0]]) for rel in files]
        out[split] = FolderSplit(train_tf if split == "train" else test_tf, samples)
    # ImageNet practice (and the released code): the val folder is the test set
    return Dataset(out.get("train"), out.get("val"), out.get("val"), manifest["num_classes"], 3, size,
                   manifest["fingerprint"], manifest["classes"])
