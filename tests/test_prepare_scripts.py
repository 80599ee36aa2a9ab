"""Tests of scripts/prepare_imagenet_val.py and scripts/prepare_tinyimagenet_val.py.

Each test builds a small fake dataset in tmp_path and runs a script as a user would, in a
subprocess, then checks what the user relies on: every image ends up in its labelled class
folder, the class order matches the train folder, reruns and dry runs change nothing, and a
mistake in the input is one sentence naming the file, with the data left as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
IMAGENET_SCRIPT = SCRIPTS_DIR / "prepare_imagenet_val.py"
TINYIMAGENET_SCRIPT = SCRIPTS_DIR / "prepare_tinyimagenet_val.py"

# ILSVRC2012_ID → WNID as in the devkit's meta.mat: leaf classes first, then a non-leaf synset
# that no image uses (the real file has 1000 leaves and 860 inner nodes).
SYNSETS = {1: "n01440764", 2: "n01443537", 3: "n01484850", 4: "n00001740"}
# The ILSVRC2012_ID of validation image 1, 2, ... in ground-truth order; deliberately not sorted,
# so an off-by-one or a sort by file name would put images in the wrong class.
GROUND_TRUTH_IDS = [2, 1, 3, 1, 2, 2, 3]
TINY_ANNOTATIONS = {
    "val_0.JPEG": "n03444034",
    "val_1.JPEG": "n01443537",
    "val_2.JPEG": "n03444034",
    "val_3.JPEG": "n04067472",
    "val_4.JPEG": "n01443537",
}


def fake_image_bytes(file_name: str) -> bytes:
    """Return a few JPEG-looking bytes unique to ``file_name``, so a moved file can be identified."""
    return b"\xff\xd8\xff\xe0 fake image " + file_name.encode()


def run_script(script: Path, *arguments: object) -> subprocess.CompletedProcess:
    """Run a preparation script the way a user does and capture its output."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Return every path under ``root`` with its kind and content (or link target and inode)."""
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[relative] = ("symlink", os.readlink(path))
        elif path.is_dir():
            state[relative] = ("dir",)
        else:
            state[relative] = ("file", path.read_bytes(), path.stat().st_ino)
    return state


def class_folders(folder: Path) -> list[str]:
    """Return the sub-folders ImageFolder would take as classes (all of them, hidden ones too)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def sorted_images(val_dir: Path, within_class: str = "") -> dict[str, str]:
    """Return image file name → class folder it sits in, for every file in a class folder."""
    found: dict[str, str] = {}
    for class_name in class_folders(val_dir):
        for image in (val_dir / class_name / within_class).iterdir():
            assert image.read_bytes() == fake_image_bytes(image.name), f"{image} has wrong content"
            found[image.name] = class_name
    return found


def assert_one_sentence_naming(result: subprocess.CompletedProcess, named: Path) -> None:
    """Check the error contract: exit status 2, one stderr line, the file named, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(named) in lines[0]
    assert "Traceback" not in result.stderr


# --- fake ImageNet ----------------------------------------------------------------------------


@dataclass
class FakeImageNet:
    """A miniature ImageNet-1k: a flat val folder, its labels in both formats, and a train folder."""

    root: Path
    val_dir: Path
    devkit: Path
    solution_csv: Path
    labels: dict[str, str]

    @property
    def ground_truth(self) -> Path:
        return self.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"

    @property
    def meta(self) -> Path:
        return self.devkit / "data" / "meta.mat"

    def devkit_arguments(self) -> list[object]:
        return ["--val-dir", self.val_dir, "--devkit", self.devkit]

    def csv_arguments(self) -> list[object]:
        return ["--val-dir", self.val_dir, "--solution-csv", self.solution_csv]


def write_meta_mat(path: Path, synsets: dict[int, str]) -> None:
    """Write a devkit-style meta.mat: a ``synsets`` struct array with ILSVRC2012_ID and WNID."""
    scipy_io = pytest.importorskip("scipy.io")
    numpy = pytest.importorskip("numpy")
    records = numpy.array(
        list(synsets.items()), dtype=[("ILSVRC2012_ID", object), ("WNID", object)]
    )
    scipy_io.savemat(str(path), {"synsets": records})


def make_fake_imagenet(root: Path, with_meta: bool = True) -> FakeImageNet:
    """Build a fake ImageNet under ``root``; ``with_meta`` False skips meta.mat (needs no scipy)."""
    val_dir = root / "imagenet" / "val"
    val_dir.mkdir(parents=True)
    labels: dict[str, str] = {}
    for index, synset_id in enumerate(GROUND_TRUTH_IDS, start=1):
        name = f"ILSVRC2012_val_{index:08d}.JPEG"
        (val_dir / name).write_bytes(fake_image_bytes(name))
        labels[name] = SYNSETS[synset_id]
    # A train folder lists every class, as ImageNet's does; val must end up with the same order.
    for wnid in sorted(set(labels.values())):
        (root / "imagenet" / "train" / wnid).mkdir(parents=True)
        (root / "imagenet" / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(b"\xff\xd8")

    devkit = root / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    ground_truth = "".join(f"{synset_id}\n" for synset_id in GROUND_TRUTH_IDS)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(ground_truth)
    if with_meta:
        write_meta_mat(devkit / "data" / "meta.mat", SYNSETS)

    # Kaggle's file: rows in no particular order, several boxes per image, ImageId without suffix.
    solution_csv = root / "LOC_val_solution.csv"
    rows = [
        f"{name[: -len('.JPEG')]},{wnid} 10 20 110 120 {wnid} 5 5 50 50"
        for name, wnid in sorted(labels.items(), reverse=True)
    ]
    solution_csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return FakeImageNet(root, val_dir, devkit, solution_csv, labels)


@pytest.fixture
def imagenet(tmp_path: Path) -> FakeImageNet:
    """A fake ImageNet without meta.mat, for tests that use Kaggle's CSV."""
    return make_fake_imagenet(tmp_path, with_meta=False)


@pytest.fixture
def imagenet_with_devkit(tmp_path: Path) -> FakeImageNet:
    """A fake ImageNet with a real meta.mat (skipped only if scipy is absent)."""
    return make_fake_imagenet(tmp_path, with_meta=True)


def assert_imagenet_sorted(dataset: FakeImageNet) -> None:
    """Check the finished state: exactly the labelled class folders, each image in its own."""
    assert class_folders(dataset.val_dir) == sorted(set(dataset.labels.values()))
    assert sorted_images(dataset.val_dir) == dataset.labels
    assert (dataset.val_dir / ".prepared").is_file()
    # No staging folder or other leftover next to val.
    assert sorted(path.name for path in dataset.val_dir.parent.iterdir()) == ["train", "val"]


def test_devkit_labels_put_every_image_in_its_class(imagenet_with_devkit: FakeImageNet) -> None:
    result = run_script(IMAGENET_SCRIPT, *imagenet_with_devkit.devkit_arguments())

    assert result.returncode == 0, result.stderr
    assert_imagenet_sorted(imagenet_with_devkit)
    assert not list(imagenet_with_devkit.val_dir.glob("*.JPEG")), "flat images left after a move"
    assert "3 classes, 7 images" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1


def test_kaggle_csv_puts_every_image_in_its_class(imagenet: FakeImageNet) -> None:
    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments())

    assert result.returncode == 0, result.stderr
    assert_imagenet_sorted(imagenet)
    assert "3 classes, 7 images" in result.stdout


def test_image_folder_gives_val_the_train_class_order(imagenet: FakeImageNet) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    assert run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments()).returncode == 0

    train = datasets.ImageFolder(str(imagenet.root / "imagenet" / "train"))
    val = datasets.ImageFolder(str(imagenet.val_dir))

    assert val.class_to_idx == train.class_to_idx
    assert len(val.samples) == len(imagenet.labels)
    for path, target in val.samples:
        assert train.classes[target] == imagenet.labels[Path(path).name]


def test_hardlink_mode_keeps_the_flat_files_and_shares_their_data(imagenet: FakeImageNet) -> None:
    flat_inodes = {path.name: path.stat().st_ino for path in imagenet.val_dir.iterdir()}

    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments(), "--mode", "hardlink")

    assert result.returncode == 0, result.stderr
    assert class_folders(imagenet.val_dir) == sorted(set(imagenet.labels.values()))
    assert sorted_images(imagenet.val_dir) == imagenet.labels
    for name, wnid in imagenet.labels.items():
        assert (imagenet.val_dir / name).stat().st_ino == flat_inodes[name]
        assert (imagenet.val_dir / wnid / name).stat().st_ino == flat_inodes[name]


def test_symlinks_still_resolve_after_the_dataset_folder_moves(imagenet: FakeImageNet) -> None:
    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments(), "--mode", "symlink")
    assert result.returncode == 0, result.stderr
    moved_val_dir = imagenet.root / "elsewhere" / "val"
    moved_val_dir.parent.mkdir()
    shutil.move(str(imagenet.val_dir), str(moved_val_dir))

    for name, wnid in imagenet.labels.items():
        link = moved_val_dir / wnid / name
        assert link.is_symlink()
        assert link.read_bytes() == fake_image_bytes(name)


@pytest.mark.parametrize("mode", ["move", "hardlink", "symlink"])
def test_rerun_on_a_prepared_folder_changes_nothing(imagenet: FakeImageNet, mode: str) -> None:
    assert run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments(), "--mode", mode).returncode == 0
    before = snapshot(imagenet.root)

    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments(), "--mode", mode)

    assert result.returncode == 0, result.stderr
    assert "already prepared" in result.stdout
    assert snapshot(imagenet.root) == before


def interrupt_during_staging(dataset: FakeImageNet) -> None:
    """Leave the state of a run killed while moving images into the staging folder."""
    staging = dataset.val_dir.parent / ".val.prepare-staging"
    for name in sorted(dataset.labels)[:3]:
        (staging / dataset.labels[name]).mkdir(parents=True, exist_ok=True)
        os.rename(dataset.val_dir / name, staging / dataset.labels[name] / name)


def interrupt_during_publishing(dataset: FakeImageNet) -> None:
    """Leave the state of a run killed after staging, with one class already renamed into val."""
    interrupt_during_staging(dataset)
    staging = dataset.val_dir.parent / ".val.prepare-staging"
    for name in sorted(dataset.labels)[3:]:
        (staging / dataset.labels[name]).mkdir(parents=True, exist_ok=True)
        os.rename(dataset.val_dir / name, staging / dataset.labels[name] / name)
    first_class = sorted(set(dataset.labels.values()))[0]
    os.rename(staging / first_class, dataset.val_dir / first_class)


@pytest.mark.parametrize("interrupt", [interrupt_during_staging, interrupt_during_publishing])
def test_a_rerun_finishes_an_interrupted_run(imagenet: FakeImageNet, interrupt) -> None:
    interrupt(imagenet)
    assert not (imagenet.val_dir / ".prepared").exists()

    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments())

    assert result.returncode == 0, result.stderr
    assert_imagenet_sorted(imagenet)


def test_a_run_that_fails_part_way_does_not_look_finished(imagenet: FakeImageNet) -> None:
    # A plain file where the staging folder of the third image's class must go makes the run fail
    # after it has moved the first two images (the scripts work in file-name order).
    staging = imagenet.val_dir.parent / ".val.prepare-staging"
    staging.mkdir()
    blocked_class = imagenet.labels["ILSVRC2012_val_00000003.JPEG"]
    (staging / blocked_class).write_text("in the way\n")

    failed = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments())

    assert failed.returncode == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert "again resumes" in failed.stderr
    # ImageFolder would find no class at all rather than a partial set, and no marker claims success.
    assert class_folders(imagenet.val_dir) == []
    assert not (imagenet.val_dir / ".prepared").exists()

    (staging / blocked_class).unlink()
    resumed = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments())

    assert resumed.returncode == 0, resumed.stderr
    assert_imagenet_sorted(imagenet)


def test_dry_run_changes_nothing(imagenet: FakeImageNet) -> None:
    before = snapshot(imagenet.root)

    result = run_script(IMAGENET_SCRIPT, *imagenet.csv_arguments(), "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "would move 7 of 7 images into 3 class folders" in result.stdout
    assert snapshot(imagenet.root) == before


# Each case breaks the fake dataset the way a user might and returns the script's arguments and
# the file the error message must name.


def missing_val_dir(dataset: FakeImageNet) -> tuple[list[object], Path]:
    missing = dataset.val_dir.parent / "validation"
    return ["--val-dir", missing, "--solution-csv", dataset.solution_csv], missing


def missing_solution_csv(dataset: FakeImageNet) -> tuple[list[object], Path]:
    dataset.solution_csv.unlink()
    return dataset.csv_arguments(), dataset.solution_csv


def missing_ground_truth(dataset: FakeImageNet) -> tuple[list[object], Path]:
    dataset.ground_truth.unlink()
    return dataset.devkit_arguments(), dataset.ground_truth


def missing_meta_mat(dataset: FakeImageNet) -> tuple[list[object], Path]:
    return dataset.devkit_arguments(), dataset.meta


def image_without_label(dataset: FakeImageNet) -> tuple[list[object], Path]:
    extra = "ILSVRC2012_val_00000008.JPEG"
    (dataset.val_dir / extra).write_bytes(fake_image_bytes(extra))
    return dataset.csv_arguments(), dataset.solution_csv


def label_without_image(dataset: FakeImageNet) -> tuple[list[object], Path]:
    (dataset.val_dir / "ILSVRC2012_val_00000004.JPEG").unlink()
    return dataset.csv_arguments(), dataset.solution_csv


def solution_csv_without_header(dataset: FakeImageNet) -> tuple[list[object], Path]:
    rows = dataset.solution_csv.read_text().splitlines()[1:]
    dataset.solution_csv.write_text("\n".join(rows) + "\n")
    return dataset.csv_arguments(), dataset.solution_csv


def ground_truth_shorter_than_folder(dataset: FakeImageNet) -> tuple[list[object], Path]:
    write_meta_mat(dataset.meta, SYNSETS)
    dataset.ground_truth.write_text("".join(f"{i}\n" for i in GROUND_TRUTH_IDS[:-2]))
    return dataset.devkit_arguments(), dataset.ground_truth


def ground_truth_id_unknown_to_meta(dataset: FakeImageNet) -> tuple[list[object], Path]:
    write_meta_mat(dataset.meta, {i: wnid for i, wnid in SYNSETS.items() if i != 3})
    return dataset.devkit_arguments(), dataset.ground_truth


def meta_mat_not_a_mat_file(dataset: FakeImageNet) -> tuple[list[object], Path]:
    pytest.importorskip("scipy.io")
    dataset.meta.write_text("not a MATLAB file\n")
    return dataset.devkit_arguments(), dataset.meta


@pytest.mark.parametrize(
    "break_dataset",
    [
        missing_val_dir,
        missing_solution_csv,
        missing_ground_truth,
        missing_meta_mat,
        image_without_label,
        label_without_image,
        solution_csv_without_header,
        ground_truth_shorter_than_folder,
        ground_truth_id_unknown_to_meta,
        meta_mat_not_a_mat_file,
    ],
)
def test_user_errors_are_one_sentence_and_touch_nothing(
    imagenet: FakeImageNet, break_dataset
) -> None:
    arguments, named_file = break_dataset(imagenet)
    before = snapshot(imagenet.root)

    result = run_script(IMAGENET_SCRIPT, *arguments)

    assert_one_sentence_naming(result, named_file)
    assert snapshot(imagenet.root) == before


# --- fake TinyImageNet ------------------------------------------------------------------------


@dataclass
class FakeTinyImageNet:
    """A miniature TinyImageNet-200: train in class folders, val flat with its annotations."""

    root: Path
    val_dir: Path
    labels: dict[str, str]

    @property
    def annotations(self) -> Path:
        return self.val_dir / "val_annotations.txt"

    @property
    def flat_dir(self) -> Path:
        return self.val_dir / "images"


@pytest.fixture
def tinyimagenet(tmp_path: Path) -> FakeTinyImageNet:
    """A fake TinyImageNet-200 in the layout its zip file unpacks to."""
    root = tmp_path / "tiny-imagenet-200"
    val_dir = root / "val"
    (val_dir / "images").mkdir(parents=True)
    lines = []
    for name, wnid in TINY_ANNOTATIONS.items():
        (val_dir / "images" / name).write_bytes(fake_image_bytes(name))
        lines.append(f"{name}\t{wnid}\t0\t8\t60\t63\n")
    (val_dir / "val_annotations.txt").write_text("".join(lines))
    for wnid in sorted(set(TINY_ANNOTATIONS.values())):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(b"\xff\xd8")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    return FakeTinyImageNet(root, val_dir, dict(TINY_ANNOTATIONS))


def test_tinyimagenet_val_gets_the_train_layout(tinyimagenet: FakeTinyImageNet) -> None:
    result = run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir)

    assert result.returncode == 0, result.stderr
    # The flat images/ folder is gone: ImageFolder would otherwise read it as a 201st class.
    assert class_folders(tinyimagenet.val_dir) == sorted(set(tinyimagenet.labels.values()))
    assert sorted_images(tinyimagenet.val_dir, within_class="images") == tinyimagenet.labels
    assert tinyimagenet.annotations.is_file()
    assert "3 classes, 5 images" in result.stdout
    assert sorted(path.name for path in tinyimagenet.root.iterdir()) == ["train", "val"]


def test_tinyimagenet_image_folder_gives_val_the_train_class_order(
    tinyimagenet: FakeTinyImageNet,
) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    assert run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir).returncode == 0

    train = datasets.ImageFolder(str(tinyimagenet.root / "train"))
    val = datasets.ImageFolder(str(tinyimagenet.val_dir))

    assert val.class_to_idx == train.class_to_idx
    assert {
        Path(path).name: val.classes[target] for path, target in val.samples
    } == tinyimagenet.labels


def test_tinyimagenet_rerun_changes_nothing(tinyimagenet: FakeTinyImageNet) -> None:
    assert run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir).returncode == 0
    before = snapshot(tinyimagenet.root)

    result = run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir)

    assert result.returncode == 0, result.stderr
    assert "already prepared" in result.stdout
    assert snapshot(tinyimagenet.root) == before


def test_tinyimagenet_dry_run_changes_nothing(tinyimagenet: FakeTinyImageNet) -> None:
    before = snapshot(tinyimagenet.root)

    result = run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "would move 5 of 5 images into 3 class folders" in result.stdout
    assert snapshot(tinyimagenet.root) == before


def tiny_missing_annotations(dataset: FakeTinyImageNet) -> Path:
    dataset.annotations.unlink()
    return dataset.annotations


def tiny_missing_images_folder(dataset: FakeTinyImageNet) -> Path:
    shutil.rmtree(dataset.flat_dir)
    return dataset.flat_dir


def tiny_malformed_annotation(dataset: FakeTinyImageNet) -> Path:
    with dataset.annotations.open("a") as annotations:
        annotations.write("val_5.JPEG n01443537 0 8 60 63\n")  # spaces, not tabs
    return dataset.annotations


def tiny_image_without_annotation(dataset: FakeTinyImageNet) -> Path:
    (dataset.flat_dir / "val_9.JPEG").write_bytes(fake_image_bytes("val_9.JPEG"))
    return dataset.annotations


def tiny_annotation_without_image(dataset: FakeTinyImageNet) -> Path:
    (dataset.flat_dir / "val_3.JPEG").unlink()
    return dataset.annotations


def tiny_stray_file_in_images(dataset: FakeTinyImageNet) -> Path:
    (dataset.flat_dir / "notes.txt").write_text("not an image\n")
    return dataset.flat_dir


@pytest.mark.parametrize(
    "break_dataset",
    [
        tiny_missing_annotations,
        tiny_missing_images_folder,
        tiny_malformed_annotation,
        tiny_image_without_annotation,
        tiny_annotation_without_image,
        tiny_stray_file_in_images,
    ],
)
def test_tinyimagenet_user_errors_are_one_sentence_and_touch_nothing(
    tinyimagenet: FakeTinyImageNet, break_dataset
) -> None:
    named_file = break_dataset(tinyimagenet)
    before = snapshot(tinyimagenet.root)

    result = run_script(TINYIMAGENET_SCRIPT, "--val-dir", tinyimagenet.val_dir)

    assert_one_sentence_naming(result, named_file)
    assert snapshot(tinyimagenet.root) == before
