"""Tests of noisynn/data.py: digits splits and ImageFolder datasets (the test orders: test_orders.py;
the released metric: test_vocab.py).

What a user relies on: a prepared dataset is the same dataset every time, and a broken ImageFolder
is reported as one sentence naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from noisynn.data import load_dataset, prepare_digits, prepare_image_folder
from noisynn.errors import UserError
from noisynn.orders import batches_in_order as order_batches

# --- digits ------------------------------------------------------------------------------------


def test_prepare_digits_is_deterministic_and_seeded(tmp_path):
    a = prepare_digits(tmp_path / "a", image_size=8, seed=0)
    b = prepare_digits(tmp_path / "b", image_size=8, seed=0)
    c = prepare_digits(tmp_path / "c", image_size=8, seed=1)
    assert a["fingerprint"] == b["fingerprint"]
    assert (tmp_path / "a" / "digits.npz").read_bytes() == (tmp_path / "b" / "digits.npz").read_bytes()
    assert c["fingerprint"] != a["fingerprint"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["fingerprint"] == a["fingerprint"]


def test_prepared_arrays_are_named_for_their_dataset(tmp_path):
    from noisynn.data import prepare_mnist

    prepare_mnist(tmp_path / "mnist", image_size=8, seed=0)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["manifest.json", "mnist.npz"]
    assert len(load_dataset(tmp_path / "mnist").train) == 3000
    # a folder prepared before the arrays were named for their dataset: its manifest has no arrays_file
    prepare_digits(tmp_path / "old", image_size=8, seed=0)
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert manifest.pop("arrays_file") == "digits.npz"
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_dataset(tmp_path / "old").test) == manifest["counts"]["test"]  # read from digits.npz


def test_digits_splits_are_stratified_and_disjoint(digits_dir):
    with np.load(digits_dir / "digits.npz") as z:
        labels, parts = z["labels"], {s: z[s] for s in ("train", "val", "test")}
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(set(everything.tolist())) == len(labels)  # disjoint and complete
    overall = np.bincount(labels, minlength=10) / len(labels)
    for split, idx in parts.items():
        share = np.bincount(labels[idx], minlength=10) / len(idx)
        assert np.all(share > 0), f"{split} lacks a class"
        assert np.abs(share - overall).max() < 0.02, f"{split} is not stratified"


def test_loaded_digits_match_the_manifest(digits_dir):
    data = load_dataset(digits_dir)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert data.fingerprint == manifest["fingerprint"]
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 1, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    x, y = next(data.test.batches([np.arange(5)]))
    assert tuple(x.shape) == (5, 1, 16, 16)
    assert y.tolist() == data.test.labels[:5].tolist()
    # normalized with the training split's statistics
    assert abs(float(data.train.images.mean())) < 1e-3
    assert abs(float(data.train.images.std()) - 1) < 1e-2


# --- image folders -----------------------------------------------------------------------------


def test_image_folder_prepares_and_loads(image_folder, tmp_path):
    manifest = prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    assert manifest["classes"] == ["cat", "dog", "emu"]
    assert manifest["counts"] == {"train": 9, "val": 6}
    assert manifest["class_counts"]["train"] == [4, 3, 2]
    data = load_dataset(tmp_path / "prepared", train_augment=False)
    assert (data.num_classes, data.in_chans, data.image_size) == (3, 3, 8)
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = next(data.test.batches([np.array([0, 3, 5])], num_workers=0))
    assert tuple(x.shape) == (3, 3, 8, 8)
    assert y.tolist() == [0, 1, 2]


def test_image_folder_fingerprint_follows_the_content(image_folder, tmp_path):
    first = prepare_image_folder(tmp_path / "p1", image_folder, image_size=8)
    again = prepare_image_folder(tmp_path / "p2", image_folder, image_size=8)
    assert first["fingerprint"] == again["fingerprint"]
    write_image_folder(image_folder / "val", {"cat": 1}, seed=9)  # overwrites val/cat/0.png
    changed = prepare_image_folder(tmp_path / "p3", image_folder, image_size=8)
    assert changed["fingerprint"] != first["fingerprint"]


def test_missing_image_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere" / "train")):
        prepare_image_folder(tmp_path / "out", tmp_path / "nowhere")


def test_missing_val_folder_is_named(image_folder, tmp_path):
    with pytest.raises(UserError, match=str(image_folder / "validation")):
        prepare_image_folder(tmp_path / "out", image_folder, val_dir="validation")


def test_empty_class_folder_is_named(image_folder, tmp_path):
    (image_folder / "train" / "fox").mkdir()
    (image_folder / "train" / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=str(image_folder / "train" / "fox")):
        prepare_image_folder(tmp_path / "out", image_folder)


def test_corrupt_image_is_named(image_folder, tmp_path):
    bad = image_folder / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a png")
    with pytest.raises(UserError, match=str(bad)):
        prepare_image_folder(tmp_path / "out", image_folder)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_truncated_image_is_named(image_folder, tmp_path):
    victim = image_folder / "train" / "cat" / "1.png"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(UserError, match=str(victim)):
        prepare_image_folder(tmp_path / "out", image_folder)


def test_corrupt_image_is_skipped_and_counted_on_request(image_folder, tmp_path):
    bad = image_folder / "val" / "dog" / "broken.png"
    bad.write_bytes(b"garbage")
    manifest = prepare_image_folder(tmp_path / "out", image_folder, image_size=8, on_bad_image="skip")
    assert manifest["skipped_unreadable"] == {"train": [], "val": ["val/dog/broken.png"]}
    assert manifest["counts"]["val"] == 6
    data = load_dataset(tmp_path / "out", train_augment=False)
    assert len(data.test) == 6
    loaded = [x for x, _ in data.test.batches([np.arange(6)], num_workers=0)]
    assert tuple(loaded[0].shape) == (6, 3, 8, 8)


def test_different_class_folders_are_named(image_folder, tmp_path):
    write_image_folder(image_folder / "val", {"yak": 1})
    with pytest.raises(UserError, match="yak"):
        prepare_image_folder(tmp_path / "out", image_folder)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "manifest.json")):
        load_dataset(tmp_path)



def test_image_folder_augmentation_is_a_function_of_seed_and_sample(image_folder, tmp_path):
    """Resuming mid-epoch, or another number of workers, must not change what a sample looks like."""
    import random

    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    data = load_dataset(tmp_path / "prepared", {"timm_name": "resnet18"}, train_augment=True)
    everything = [np.arange(9)]
    first, _ = next(data.train.batches(everything, num_workers=0, seed=5))
    random.random(), torch.rand(3)  # other draws in between change nothing
    again, _ = next(data.train.batches(everything, num_workers=0, seed=5))
    tail, _ = next(data.train.batches([np.arange(4, 9)], num_workers=2, seed=5))
    other, _ = next(data.train.batches(everything, num_workers=0, seed=6))
    assert torch.equal(first, again)
    assert torch.equal(first[4:], tail)  # the same samples, resumed half-way, in worker processes
    assert not torch.equal(first, other)


def test_workers_kept_alive_between_passes_augment_each_pass_with_its_own_seed(image_folder, tmp_path):
    """One loader serves every epoch (persistent workers): the second epoch must not reuse the first's seed."""
    import torch

    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    data = load_dataset(tmp_path / "prepared", {"timm_name": "resnet18"}, train_augment=True)
    everything = [np.arange(9)]
    in_workers = [next(data.train.batches(everything, num_workers=2, seed=seed))[0] for seed in (5, 6)]
    in_process = [next(data.train.batches(everything, num_workers=0, seed=seed))[0] for seed in (5, 6)]
    loader = data.train._loaders[2]
    assert loader.persistent_workers and loader._iterator is not None, "the workers were not kept"
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_process))
    assert not torch.equal(in_workers[0], in_workers[1])


def test_loading_an_augmented_batch_touches_no_global_random_state(image_folder, tmp_path, monkeypatch):
    """Dropout, drop-path and a training noise draw from the global torch generators (CPU and
    CUDA): loading data must neither advance them nor reseed them, or they restart every batch."""
    import random

    import torch

    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    data = load_dataset(tmp_path / "prepared", {"timm_name": "resnet18"}, train_augment=True)
    seeding = []
    for owner, name in ((torch, "manual_seed"), (torch.random, "manual_seed"), (torch.cuda, "manual_seed"),
                        (torch.cuda, "manual_seed_all"), (torch, "seed"), (torch.cuda, "seed_all")):
        monkeypatch.setattr(owner, name, lambda *a, _n=f"{owner.__name__}.{name}", **k: seeding.append(_n))
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    x, _ = next(data.train.batches([np.arange(9)], num_workers=0, seed=5))
    assert x.shape[0] == 9
    assert seeding == [], f"loading a batch called {seeding}"
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_image_folder_uses_the_normalization_of_the_models_weights(image_folder, tmp_path):
    import timm

    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    for name in ("resnet18", "vit_tiny_patch16_224"):
        expected = timm.models.get_pretrained_cfg(name)
        data = load_dataset(tmp_path / "prepared", {"timm_name": name}, train_augment=False)
        normalize = data.test.dataset.transform.transforms[-1]
        assert tuple(normalize.mean) == tuple(expected.mean) and tuple(normalize.std) == tuple(expected.std)


def test_corrupt_image_met_while_loading_is_named(image_folder, tmp_path):
    (image_folder / "val" / "dog" / "1.png").write_bytes(b"not a png")
    # prepared without opening every image, the broken file is first met when a batch reads it
    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8, verify_images=False)
    data = load_dataset(tmp_path / "prepared", train_augment=False)
    with pytest.raises(UserError, match=r"image .*dog/1\.png cannot be read"):
        list(data.test.batches([np.arange(6)], num_workers=0))


def test_released_order_walks_nested_class_folders_as_torchvision_imagefolder(tmp_path):
    """The released loaders read ``datasets.ImageFolder`` through a SequentialSampler
    (NoisyViT-OptimalQ/Accdataloader.py lines 92 and 102, NoisyCNN_CircularShiftQ/dataloader.py lines
    225 and 235, github.com/Shawey94/NoisyNN @719ccf6). torchvision lists a class's folders in sorted
    order and then each folder's files (``make_dataset``: ``sorted(os.walk(...))``, ``sorted(fnames)``);
    on a class folder with sub-folders that differs from a sort of whole paths. The `released` order
    here is the ImageFolder's, image for image."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = tmp_path / "nested"
    layout = ["cat/b.png", "cat/a/x.png", "cat/a-b/y.png", "cat/a/b/w.png", "cat/A/z.png", "cat/c.PNG",
              "dog/0.png", "dog/sub/1.png", "dog/sub.d/2.png", "dog/z/3.png"]
    for split in ("train", "val"):
        for i, rel in enumerate(layout):
            (root / split / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(root / split / rel)
    prepare_image_folder(tmp_path / "prepared", root, image_size=8)
    data = load_dataset(tmp_path / "prepared", {"timm_name": "resnet18"}, train_augment=False, splits=("val",))
    order = np.concatenate(order_batches(data.test.labels, "class_sorted", 3))
    ours = [data.test.dataset.samples[i] for i in order]
    theirs = [(str(Path(p)), t) for p, t in ImageFolder(str(root / "val")).samples]
    assert ours == theirs
    assert [p for p, _ in ours] != sorted(p for p, _ in ours)  # the layout tells the two walks apart


@pytest.mark.parametrize("timm_name, size", [
    # the ViT code resizes to --res (NoisyViT-OptimalQ/parameters.py line 23: default 384; runScript.txt)
    ("vit_base_patch16_384.augreg_in21k_ft_in1k", 384),
    ("resnet50.tv2_in1k", 224),  # the CNN code's test resize is 224 (NoisyCNN_CircularShiftQ/dataloader.py line 216)
])
def test_released_preprocess_feeds_what_the_released_test_transform_computes(tmp_path, timm_name, size):
    """The released test transforms (github.com/Shawey94/NoisyNN @719ccf6): NoisyViT-OptimalQ/Accdataloader.py
    lines 82-86 and NoisyCNN_CircularShiftQ/dataloader.py lines 215-219 are ``transforms.Resize((res, res))``
    with torchvision's default interpolation (bilinear, which on a PIL image is PIL's bilinear resize),
    ``ToTensor()`` (/255), and ``Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])``.
    Computed here from those numbers on a generated non-square image; the `timm` arm (timm's config of
    the same weights) feeds other tensors, which is what the audit's two arms measure."""
    from PIL import Image

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(37, 50, 3), dtype=np.uint8)
    for split in ("train", "val"):
        (tmp_path / "folder" / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "folder" / split / "a" / "0.png")
    prepare_image_folder(tmp_path / "prepared", tmp_path / "folder", image_size=size)
    model = {"timm_name": timm_name, "image_size": size}
    released = load_dataset(tmp_path / "prepared", {**model, "preprocess": "released"}, train_augment=False, splits=("val",))
    got, _ = next(released.test.batches([np.arange(1)]))

    resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1).copy())
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    assert released.test_transform == {"preprocess": "released", "interpolation": "bilinear", "resize": [size, size],
                                       "crop": None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    timm_arm = load_dataset(tmp_path / "prepared", model, train_augment=False, splits=("val",))
    other, _ = next(timm_arm.test.batches([np.arange(1)]))
    assert timm_arm.test_transform["preprocess"] == "timm" and not torch.allclose(other, got, atol=1e-2)
