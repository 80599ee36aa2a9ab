"""Tests of noisynn/listfile.py: datasets named by list files, kept in the list's order, and the
count of one-class test batches that such an order gives.

What a user relies on: a list is read as written (paths with spaces, line order kept, every malformed
line named), the count of one-class batches is what a sequential loader without drop_last yields
(checked against the class sizes of FFTAT's Art list, read from the public repository), a prepared
list dataset is evaluated in the list's order with the list's labels, and an image changed after
prepare is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from noisynn import orders
from noisynn.cli import main
from noisynn.errors import UserError
from noisynn.listfile import listed_in_class_order, one_class_batches, read_list

# github.com/Shawey94/WACV2025-FFTAT @eafc4aa, data/office-home/Art.txt: the list is sorted by class
# and these are its 65 classes' sizes in list order (2,427 images)
ART_CLASS_SIZES = [15, 21, 99, 40, 44, 22, 42, 20, 41, 51, 46, 20, 18, 46, 26, 40, 40, 43, 40, 75, 19, 49, 16, 23, 44,
                   79, 18, 20, 42, 32, 46, 21, 41, 74, 24, 19, 27, 47, 45, 15, 19, 30, 21, 18, 20, 18, 40, 69, 20, 33,
                   90, 49, 46, 76, 25, 20, 40, 40, 46, 40, 16, 72, 20, 49, 20]


def test_office_home_art_at_batch_16_has_91_one_class_batches_of_152():
    labels = np.repeat(np.arange(len(ART_CLASS_SIZES)), ART_CLASS_SIZES)
    row = one_class_batches(labels, (16,))[0]
    assert (row["one_class"], row["batches"]) == (91, 152)  # the figure of noisynn issue 21


def test_a_list_sorted_by_class_is_the_class_sorted_order():
    # the released protocol reads the test set class-sorted: for a sorted list, that is the list itself
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, 7, size=300))
    assert listed_in_class_order(labels)
    for k in (10, 16, 128):
        theirs = [labels[b] for b in orders.batches_in_order(labels, "class_sorted", k)]
        pure = sum(1 for b in theirs if len(set(b)) == 1)
        assert one_class_batches(labels, (k,))[0]["one_class"] == pure
    shuffled = rng.permutation(labels)
    assert not listed_in_class_order(shuffled)
    assert one_class_batches(shuffled, (16,))[0]["one_class"] == 0


def test_one_class_batches_counts_the_last_short_batch():
    rows = one_class_batches([0] * 10 + [1] * 5, (10, 4))
    assert [(r["one_class"], r["batches"]) for r in rows] == [(2, 2), (3, 4)]


def test_read_list_keeps_order_and_paths_with_spaces(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("b/x 1.jpg 3\n\na/y.jpg 0\n")
    assert read_list(f) == [("b/x 1.jpg", 3), ("a/y.jpg", 0)]


@pytest.mark.parametrize("text, expected", [("a.jpg\n", "line 1"), ("a.jpg x\n", "integer label"),
                                            ("a.jpg 1\na.jpg 2\n", "listed twice"), ("\n", "lists no image")])
def test_read_list_names_the_malformed_line(tmp_path, text, expected):
    f = tmp_path / "l.txt"
    f.write_text(text)
    with pytest.raises(UserError, match=expected) as e:
        read_list(f)
    assert str(f) in str(e.value)


def _image_list(root, name, labels, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for i, label in enumerate(labels):
        rel = f"images/{name}/{label}/{i} img.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / rel)
        lines.append(f"{rel} {label}")
    (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root / f"{name}.txt"


def test_a_prepared_list_is_read_in_its_order_with_its_labels(tmp_path, capsys):
    from noisynn.data import load_dataset

    root = tmp_path / "root"
    train = _image_list(root, "source", [0, 1, 2, 0, 1, 2], 0)
    test_labels = [2, 2, 0, 1, 1, 0, 2]  # not sorted by class: the order must survive
    test = _image_list(root, "target", test_labels, 1)
    out = tmp_path / "data"
    assert main(["prepare", "--kind", "list", "--root", str(root), "--train-list", str(train), "--test-list", str(test),
                 "--out", str(out), "--image-size", "8", "--name", "toy"]) == 0
    assert "is not sorted by class" in capsys.readouterr().out
    data = load_dataset(out, {"timm_name": "resnet18"}, train_augment=False, splits=("val",))
    assert data.test.labels.tolist() == test_labels and data.num_classes == 3
    assert [p for p, _ in data.test.dataset.samples] == [str(root / rel) for rel, _ in read_list(test)]
    # an image replaced after prepare is refused where the data is read again
    first = root / read_list(test)[0][0]
    Image.new("RGB", (9, 9)).save(first)
    with pytest.raises(UserError, match="has changed since the dataset was prepared"):
        load_dataset(out, {"timm_name": "resnet18"}, train_augment=False, splits=("val",))
    capsys.readouterr()
    assert main(["batches", str(test), "--batch-sizes", "2", "3"]) == 0
    table = capsys.readouterr().out
    assert "| 7 | 3 | no | 2/4 (50 %) | 1/3 (33 %) |" in table


def test_prepare_list_needs_its_lists(tmp_path, capsys):
    assert main(["prepare", "--kind", "list", "--root", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "needs --root, --train-list and --test-list" in capsys.readouterr().err
