"""Datasets given as list files, read in the order they are listed, and the class make-up of the
test batches such an order gives.

A list file holds one image a line, ``<path> <label>`` (the path relative to a root folder, the
label an integer class index): the format of FFTAT's lists (github.com/Shawey94/WACV2025-FFTAT
@eafc4aa, ``data/office-home/*.txt``) and of most domain-adaptation repositories. Their test
loaders read the list with ``shuffle=False``, so the test batches are the list cut in sequence,
and what those batches hold is a property of the list: ``one_class_batches`` counts, at each batch
size, how many hold a single class. The ``released`` protocol reads a test set class-sorted, a
stable sort by label, which is the list's own order exactly when the list is sorted by class
(``listed_in_class_order``; true of every Office-31 and Office-Home list of that repository).

Numpy only here; ``prepare_list`` imports the dataset machinery (torch) when it runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noisynn.errors import UserError

# the batch sizes of the one-class table: the released ViT and CNN codes' 10 and 512 (ImageNet
# script), FFTAT's 16, InterLUDE's 128, and powers of two between
ONE_CLASS_BATCH_SIZES = (2, 4, 8, 10, 16, 32, 64, 128)


def read_list(path: Path) -> list[tuple[str, int]]:
    """The (path, label) lines of a list file, in order; a malformed line is named by its number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"list file {path} does not exist (expected one `<path> <label>` line per image).")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"list file {path} is not text (expected one `<path> <label>` line per image).") from None
    samples, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"list file {path}, line {number}: expected `<path> <label>` with an integer label >= 0; "
                            f"got {line.strip()[:80]!r}.")
        rel = parts[0].strip()
        if rel in seen:
            raise UserError(f"list file {path}, line {number}: {rel} is listed twice (first on line {seen[rel]}).")
        seen[rel] = number
        samples.append((rel, int(parts[1])))
    if not samples:
        raise UserError(f"list file {path} lists no image (expected one `<path> <label>` line per image).")
    return samples


def listed_in_class_order(labels) -> bool:
    """Whether the labels never decrease along the list (the class-sorted order is then the list's)."""
    labels = np.asarray(labels)
    return bool(np.all(labels[1:] >= labels[:-1]))


def one_class_batches(labels, batch_sizes=ONE_CLASS_BATCH_SIZES) -> list[dict]:
    """For each batch size, the sequential batches of ``labels`` in their given order that hold one
    class (the last, smaller batch counts too, as a loader without ``drop_last`` yields it)."""
    labels = np.asarray(labels)
    rows = []
    for k in batch_sizes:
        if int(k) < 1:
            raise UserError(f"batch sizes must be positive integers; got {k}.")
        batches = [labels[i : i + k] for i in range(0, len(labels), k)]
        pure = sum(1 for b in batches if np.all(b == b[0]))
        rows.append({"batch_size": int(k), "batches": len(batches), "one_class": pure,
                     "share": pure / len(batches) if batches else float("nan")})
    return rows


def one_class_table(lists: dict[str, list[int]], batch_sizes=ONE_CLASS_BATCH_SIZES) -> str:
    """A Markdown table: one row per list, ``one-class batches / batches`` at each batch size."""
    head = "| list | images | classes | class-sorted | " + " | ".join(f"batch {k}" for k in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (4 + len(batch_sizes))]
    for name, labels in lists.items():
        cells = [f"{r['one_class']}/{r['batches']} ({100 * r['share']:.0f} %)" for r in one_class_batches(labels, batch_sizes)]
        lines.append(f"| {name} | {len(labels)} | {len(set(labels))} | {'yes' if listed_in_class_order(labels) else 'no'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def list_samples(manifest: dict, split: str) -> list[tuple[str, int]]:
    """The (path, label) samples of a prepared list dataset's split, in the list's order."""
    files, labels = list(manifest["files"][split]), manifest["labels"].get(split)
    if not isinstance(labels, list) or len(labels) != len(files):
        raise UserError(f"dataset manifest of {manifest['root']}: key labels.{split} must hold one label per file of "
                        f"files.{split}; prepare the dataset again.")
    return [(str(Path(manifest["root"]) / rel), int(label)) for rel, label in zip(files, labels)]


def prepare_list(out_dir: Path, root: Path, train_list: Path, test_list: Path, image_size: int = 224,
                 hash_mode: str = "fast", verify_images: bool = True, name: str = "list") -> dict:
    """Check the images two list files name and write the manifest (``kind: list``).

    The test list is the evaluation's test set (and its validation split, as an ImageFolder's val
    folder is), kept in the list's order; the train list is the training set.
    """
    import os

    from noisynn.data import _file_hash, _fingerprint, _image_readable
    from noisynn.io.atomic import atomic_write_json

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist (the folder the list files' paths are relative to).")
    splits = {"train": read_list(train_list), "val": read_list(test_list)}
    num_classes = 1 + max(label for samples in splits.values() for _, label in samples)
    files, stats, labels = {}, {}, {}
    for split, samples in splits.items():
        files[split], stats[split] = {}, {}
        for rel, _ in samples:
            path = root / rel
            if not path.is_file():
                raise UserError(f"image {path} (listed in {train_list if split == 'train' else test_list}) does not exist.")
            if verify_images and not _image_readable(str(path)):
                raise UserError(f"image {path} cannot be read (corrupt or not an image); remove it from the list.")
            files[split][rel] = _file_hash(str(path), hash_mode)
            st = os.stat(path)
            stats[split][rel] = [st.st_size, st.st_mtime_ns]
        labels[split] = [label for _, label in samples]
    manifest = {
        "dataset": name,
        "kind": "list",
        "root": str(root),
        "lists": {"train": str(train_list), "val": str(test_list)},
        "image_size": image_size,
        "in_chans": 3,
        "num_classes": num_classes,
        "classes": [str(c) for c in range(num_classes)],
        "counts": {s: len(v) for s, v in splits.items()},
        "class_counts": {s: np.bincount(v, minlength=num_classes).tolist() for s, v in labels.items()},
        "test_listed_in_class_order": listed_in_class_order(labels["val"]),
        "hash_mode": hash_mode,
        "files": files,
        "labels": labels,
        "file_stats": stats,
    }
    manifest["fingerprint"] = _fingerprint({k: manifest[k] for k in ("classes", "class_counts", "files", "labels")})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
