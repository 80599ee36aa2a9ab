#!/usr/bin/env python3
"""Sort ImageNet-1k's flat validation folder into one sub-folder per class (WNID).

ImageNet-1k ships its 50,000 validation images in one flat folder
(``ILSVRC2012_val_00000001.JPEG`` ...), while torchvision's ``ImageFolder`` needs
``val/<wnid>/<image>``. Because ``ImageFolder`` numbers classes by the sorted folder names, the
sorted WNIDs give the validation folder the same class order as the train folder.

Labels come from either
  * the ILSVRC2012 devkit (``--devkit ILSVRC2012_devkit_t12``): line i of
    ``data/ILSVRC2012_validation_ground_truth.txt`` is the 1-based ILSVRC2012_ID of image i, and
    the ``synsets`` struct of ``data/meta.mat`` maps ILSVRC2012_ID to WNID (needs scipy); or
  * Kaggle's ``LOC_val_solution.csv`` (``--solution-csv``): columns ImageId,PredictionString,
    the WNID being the first token of PredictionString.

Safety rules, in order of the run:
  1. Everything is checked before a single file is touched; a mistake in the input is reported as
     one sentence on stderr with exit status 2.
  2. The class folders are built in a hidden staging folder next to ``--val-dir``
     (``.<name>.prepare-staging``), so while the slow part runs, ``--val-dir`` has no class
     folders and ``ImageFolder`` fails loudly instead of reading a partial set.
  3. The class folders are then renamed into ``--val-dir`` (one cheap rename each) and the marker
     file ``.prepared`` is written last. Only a folder with that marker is finished.
  4. A rerun of a finished folder says so and exits 0; a rerun after an interruption (or on a
     folder sorted by some other tool) picks up every image wherever it already is and finishes.

``prepare_tinyimagenet_val.py`` reuses the machinery below, so the two scripts share one
implementation of these rules. Only the standard library is needed, plus scipy for meta.mat.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER_NAME = ".prepared"
MODES = ("move", "hardlink", "symlink")
# The extensions torchvision's ImageFolder accepts; anything else in the flat folder is not an image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID_PATTERN = re.compile(r"^n\d{8}$")

GROUND_TRUTH_RELATIVE = Path("data") / "ILSVRC2012_validation_ground_truth.txt"
META_RELATIVE = Path("data") / "meta.mat"

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 1


class UserError(Exception):
    """A mistake in the user's input, described in one sentence that names the file."""


@dataclass(frozen=True)
class Placement:
    """One image and the class folder it belongs in."""

    file_name: str
    class_name: str


@dataclass(frozen=True)
class ClassTreeLayout:
    """Where images live before, during and after the preparation of one validation folder.

    ``flat_dir`` holds the unsorted images; the result is
    ``val_dir/<class>/<within_class>/<file>``; the work is done in a hidden sibling of ``val_dir``.
    """

    val_dir: Path
    flat_dir: Path
    within_class: str = ""

    @property
    def staging_dir(self) -> Path:
        """The hidden sibling folder in which the class folders are built."""
        return self.val_dir.parent / f".{self.val_dir.name}.prepare-staging"

    @property
    def marker(self) -> Path:
        """The file whose presence means the folder is completely prepared."""
        return self.val_dir / MARKER_NAME

    def class_image_dir(self, root: Path, class_name: str) -> Path:
        """Return the folder that holds a class's images under ``root`` (val or staging folder)."""
        return root / class_name / self.within_class if self.within_class else root / class_name


def is_image_name(name: str) -> bool:
    """Return whether ``name`` is a visible file name with an extension ImageFolder reads."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_flat_images(flat_dir: Path) -> set[str]:
    """Return the names of the image files directly inside ``flat_dir`` (none if it is absent)."""
    if not flat_dir.is_dir():
        return set()
    with os.scandir(flat_dir) as entries:
        return {
            entry.name
            for entry in entries
            if is_image_name(entry.name) and entry.is_file(follow_symlinks=False)
        }


def list_sorted_images(layout: ClassTreeLayout, root: Path) -> set[tuple[str, str]]:
    """Return the (class, file) pairs already sorted under ``root`` (the val or staging folder).

    Only folders named like a WNID count, so a flat folder inside ``val_dir`` is never mistaken for
    a class. Directory listings also count staged symlinks, which dangle until their class folder
    is renamed into ``val_dir``.
    """
    found: set[tuple[str, str]] = set()
    if not root.is_dir():
        return found
    with os.scandir(root) as class_entries:
        class_names = [
            entry.name
            for entry in class_entries
            if WNID_PATTERN.match(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
    for class_name in class_names:
        image_dir = layout.class_image_dir(root, class_name)
        if not image_dir.is_dir():
            continue
        with os.scandir(image_dir) as image_entries:
            found.update((class_name, entry.name) for entry in image_entries)
    return found


@dataclass
class ImageLocations:
    """Which images are still flat, which are staged and which are already in place."""

    flat: set[str]
    staged: set[tuple[str, str]]
    final: set[tuple[str, str]]

    @classmethod
    def scan(cls, layout: ClassTreeLayout) -> "ImageLocations":
        """Read the three locations from disk (one directory listing each, no per-file stat)."""
        return cls(
            flat=list_flat_images(layout.flat_dir),
            staged=list_sorted_images(layout, layout.staging_dir),
            final=list_sorted_images(layout, layout.val_dir),
        )

    def is_placed(self, placement: Placement) -> bool:
        """Return whether the image is already in its class folder (staged or final)."""
        key = (placement.class_name, placement.file_name)
        return key in self.final or key in self.staged


def describe_examples(names: list[str]) -> str:
    """Return the first few names, sorted, for a one-sentence message about many files."""
    shown = sorted(names)[:3]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def plan_placements(
    layout: ClassTreeLayout,
    labels: dict[str, str],
    label_file: Path,
    locations: ImageLocations,
) -> list[Placement]:
    """Pair every labelled image with its class, checking that labels and images match one to one.

    Raises UserError when a flat image has no label or a label names an image found nowhere.
    """
    unlabelled = sorted(locations.flat - labels.keys())
    if unlabelled:
        raise UserError(
            f"{label_file} labels {len(labels)} images but {layout.flat_dir} holds "
            f"{len(locations.flat)}, {len(unlabelled)} of them without a label "
            f"({describe_examples(unlabelled)}); expected one label per image, so check that the "
            f"label file belongs to this folder."
        )
    placements = [Placement(name, labels[name]) for name in sorted(labels)]
    missing = [
        placement.file_name
        for placement in placements
        if placement.file_name not in locations.flat and not locations.is_placed(placement)
    ]
    if missing:
        raise UserError(
            f"{label_file} labels {len(placements)} images but {len(missing)} of them are not in "
            f"{layout.flat_dir} ({describe_examples(missing)}); expected every labelled image to "
            f"be there, so the folder may be incomplete."
        )
    return placements


def check_writable(layout: ClassTreeLayout) -> None:
    """Check that the folders can be changed and that renames between them stay on one device.

    Raises UserError when ``val_dir`` or its parent is read-only, or when ``val_dir`` is a mount
    point (its staging sibling would then be on another file system, turning every rename into a
    copy and making hardlinks impossible).
    """
    for folder in {layout.val_dir, layout.flat_dir, layout.val_dir.parent}:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(
                f"{folder} is not writable; expected write access to sort its images in place."
            )
    if layout.val_dir.stat().st_dev != layout.val_dir.parent.stat().st_dev:
        raise UserError(
            f"{layout.val_dir} is a mount point, so its staging folder {layout.staging_dir} would "
            f"be on another file system; expected the validation folder to be an ordinary folder."
        )


def place_into_staging(
    layout: ClassTreeLayout, placement: Placement, mode: str, created_dirs: set[Path]
) -> None:
    """Move or link one flat image into its class folder inside the staging folder."""
    source = layout.flat_dir / placement.file_name
    staged_dir = layout.class_image_dir(layout.staging_dir, placement.class_name)
    if staged_dir not in created_dirs:
        staged_dir.mkdir(parents=True, exist_ok=True)
        created_dirs.add(staged_dir)
    target = staged_dir / placement.file_name
    if mode == "move":
        os.rename(source, target)
    elif mode == "hardlink":
        os.link(source, target)
    else:
        # Relative to the FINAL class folder, so the link resolves once the class folder has been
        # renamed into val_dir, and still resolves after the whole dataset folder is moved.
        final_dir = layout.class_image_dir(layout.val_dir, placement.class_name)
        os.symlink(os.path.relpath(source, final_dir), target)


def publish_staged_classes(layout: ClassTreeLayout) -> None:
    """Move every staged class folder into ``val_dir`` and remove the emptied staging folder.

    A class folder that is not yet in ``val_dir`` is moved with one rename; one that is already
    there (a folder sorted earlier by hand or by another tool) receives the staged files one by one.
    """
    staging = layout.staging_dir
    if not staging.is_dir():
        return
    for class_dir in sorted(path for path in staging.iterdir() if path.is_dir()):
        final_class_dir = layout.val_dir / class_dir.name
        if not final_class_dir.exists():
            os.rename(class_dir, final_class_dir)
            continue
        staged_images = layout.class_image_dir(staging, class_dir.name)
        final_images = layout.class_image_dir(layout.val_dir, class_dir.name)
        final_images.mkdir(parents=True, exist_ok=True)
        for image in staged_images.iterdir():
            os.rename(image, final_images / image.name)
        remove_empty_tree(class_dir)
    remove_empty_tree(staging)


def remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` and its sub-folders, which must hold no files (never deletes a file)."""
    for sub_folder in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        sub_folder.rmdir()
    folder.rmdir()


def write_marker(layout: ClassTreeLayout, summary: str) -> None:
    """Write the ``.prepared`` marker atomically, so it exists only complete and only at the end."""
    temporary = layout.marker.with_name(MARKER_NAME + ".tmp")
    temporary.write_text(summary + "\n", encoding="utf-8")
    os.replace(temporary, layout.marker)


def count_classes(placements: list[Placement]) -> int:
    """Return how many distinct classes the placements use."""
    return len({placement.class_name for placement in placements})


def prepare(
    layout: ClassTreeLayout,
    placements: list[Placement],
    locations: ImageLocations,
    mode: str,
    dry_run: bool,
) -> str:
    """Sort the images into class folders (or only describe it, for a dry run); return a summary.

    The order keeps the rule that only a folder with the marker is finished: staging first, then
    the renames into ``val_dir``, then removing a separate flat folder that is now empty (it would
    otherwise be read as one more class), then the marker.
    """
    to_place = [placement for placement in placements if not locations.is_placed(placement)]
    counts = f"{count_classes(placements)} classes, {len(placements)} images"
    if dry_run:
        return (
            f"dry run: would {mode} {len(to_place)} of {len(placements)} images into "
            f"{count_classes(placements)} class folders under {layout.val_dir}; nothing changed."
        )
    created_dirs: set[Path] = set()
    for placement in to_place:
        place_into_staging(layout, placement, mode, created_dirs)
    publish_staged_classes(layout)
    if layout.flat_dir != layout.val_dir and layout.flat_dir.is_dir():
        layout.flat_dir.rmdir()
    summary = f"prepared {layout.val_dir}: {counts} ({len(to_place)} sorted now by {mode})"
    write_marker(layout, summary)
    return summary


def check_separate_flat_dir(layout: ClassTreeLayout, locations: ImageLocations) -> None:
    """Check a flat folder that sits inside ``val_dir`` (TinyImageNet's ``val/images``).

    It must exist unless every image is already sorted, and hold nothing but images, because it is
    removed at the end: left in place, ImageFolder would read it as one more class.
    """
    if layout.flat_dir == layout.val_dir:
        return
    if not layout.flat_dir.is_dir():
        if not (locations.staged or locations.final):
            raise UserError(
                f"{layout.flat_dir} does not exist; expected the folder of unsorted validation images."
            )
        return
    others = [name for name in os.listdir(layout.flat_dir) if name not in locations.flat]
    if others:
        raise UserError(
            f"{layout.flat_dir} holds {len(others)} item(s) that are not images "
            f"({describe_examples(others)}); expected only the validation images, because the "
            f"emptied folder is removed at the end."
        )


def run_preparation(
    layout: ClassTreeLayout,
    read_labels: Callable[[], dict[str, str]],
    label_file: Path,
    mode: str,
    dry_run: bool,
    val_dir_description: str,
) -> str:
    """Check the inputs, then prepare ``layout``; return the one-line summary to print.

    ``read_labels`` is called only when the folder is not already prepared, so a finished folder
    needs no label files any more. Raises UserError for every mistake in the input.
    """
    if not layout.val_dir.is_dir():
        raise UserError(
            f"--val-dir {layout.val_dir} does not exist; expected {val_dir_description}."
        )
    if layout.marker.is_file():
        return f"{layout.val_dir} is already prepared ({layout.marker} exists); nothing to do."
    labels = read_labels()
    locations = ImageLocations.scan(layout)
    check_separate_flat_dir(layout, locations)
    placements = plan_placements(layout, labels, label_file, locations)
    check_writable(layout)
    return prepare(layout, placements, locations, mode, dry_run)


def main_with_errors_reported(run: Callable[[], str]) -> int:
    """Call ``run()``, print its summary line, and turn errors into one line and an exit status.

    A UserError exits 2. An OSError (disk full, a file vanishing mid-run) exits 1 with a note that
    a rerun resumes, because the staged work is kept rather than rolled back.
    """
    script = Path(sys.argv[0]).name
    try:
        print(run())
    except UserError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        print(
            f"{script}: error: stopped part-way ({error}); the folder is not marked prepared, "
            f"and running the same command again resumes where it stopped.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


# --- ImageNet-1k label sources ---------------------------------------------------------------


def val_image_name(index: int) -> str:
    """Return the file name of the 1-based ``index``-th ImageNet validation image."""
    return f"ILSVRC2012_val_{index:08d}.JPEG"


def read_synsets(meta_path: Path) -> dict[int, str]:
    """Read the ILSVRC2012_ID → WNID mapping from the devkit's ``meta.mat`` (needs scipy)."""
    try:
        import scipy.io
    except ImportError:
        raise UserError(
            f"reading {meta_path} needs scipy, which is not installed; expected `pip install "
            f"scipy`, or use --solution-csv instead of --devkit."
        ) from None
    try:
        contents = scipy.io.loadmat(str(meta_path), squeeze_me=True)
    except Exception as error:  # scipy raises several types for a file that is not a .mat file
        raise UserError(
            f"{meta_path} could not be read as a MATLAB file ({error}); expected the devkit's meta.mat."
        ) from None
    synsets = contents.get("synsets")
    field_names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if "ILSVRC2012_ID" not in field_names or "WNID" not in field_names:
        raise UserError(
            f"{meta_path} has no 'synsets' struct with fields ILSVRC2012_ID and WNID; expected "
            f"the devkit's data/meta.mat."
        )
    # squeeze_me turns a one-element struct array into a 0-d array; reshape makes it iterable.
    return {int(entry["ILSVRC2012_ID"]): str(entry["WNID"]) for entry in synsets.reshape(-1)}


def read_devkit_labels(devkit_dir: Path) -> dict[str, str]:
    """Return image file name → WNID from the devkit's ground truth and meta.mat."""
    if not devkit_dir.is_dir():
        raise UserError(
            f"--devkit {devkit_dir} does not exist; expected the unpacked ILSVRC2012_devkit_t12 folder."
        )
    ground_truth = devkit_dir / GROUND_TRUTH_RELATIVE
    meta = devkit_dir / META_RELATIVE
    for required in (ground_truth, meta):
        if not required.is_file():
            raise UserError(
                f"{required} does not exist; expected --devkit to be the unpacked "
                f"ILSVRC2012_devkit_t12 folder, which holds {required.relative_to(devkit_dir)}."
            )
    wnid_by_id = read_synsets(meta)
    lines = read_text_lines(ground_truth, "one ILSVRC2012_ID per line")
    # Trailing blank lines are harmless; an inner one would shift every later label by one image.
    while lines and not lines[-1].strip():
        lines.pop()
    labels: dict[str, str] = {}
    for line_number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text.isdigit():
            raise UserError(
                f"line {line_number} of {ground_truth} is {text!r}; expected one integer "
                f"ILSVRC2012_ID per line, with no blank lines."
            )
        synset_id = int(text)
        if synset_id not in wnid_by_id:
            raise UserError(
                f"line {line_number} of {ground_truth} names ILSVRC2012_ID {synset_id}, which "
                f"{meta} does not define; expected the ground truth and meta.mat of one devkit."
            )
        labels[val_image_name(line_number)] = wnid_by_id[synset_id]
    if not labels:
        raise UserError(
            f"{ground_truth} is empty; expected one ILSVRC2012_ID per validation image."
        )
    return labels


def read_text_lines(path: Path, expected: str) -> list[str]:
    """Return the lines of a UTF-8 text file, or raise UserError if it is not text."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text file; expected {expected}.") from None


def read_solution_csv(solution_csv: Path) -> dict[str, str]:
    """Return image file name → WNID from Kaggle's ``LOC_val_solution.csv``."""
    if not solution_csv.is_file():
        raise UserError(
            f"--solution-csv {solution_csv} does not exist; expected Kaggle's LOC_val_solution.csv."
        )
    lines = read_text_lines(solution_csv, "Kaggle's LOC_val_solution.csv")
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [name.strip() for name in header[:2]] != ["ImageId", "PredictionString"]:
        raise UserError(
            f"{solution_csv} starts with {header!r}; expected the header "
            f"'ImageId,PredictionString' of Kaggle's LOC_val_solution.csv."
        )
    labels: dict[str, str] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line_number = reader.line_num
        tokens = row[1].split() if len(row) >= 2 else []
        if not row[0].strip() or not tokens or not WNID_PATTERN.match(tokens[0]):
            raise UserError(
                f"line {line_number} of {solution_csv} is {','.join(row)!r}; expected an "
                f"ImageId and a PredictionString starting with a WNID such as n01440764."
            )
        file_name = f"{row[0].strip()}.JPEG"
        if file_name in labels:
            raise UserError(
                f"line {line_number} of {solution_csv} repeats ImageId {row[0].strip()}; "
                f"expected one row per validation image."
            )
        labels[file_name] = tokens[0]
    if not labels:
        raise UserError(f"{solution_csv} has no rows; expected one row per validation image.")
    return labels


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Sort ImageNet-1k's flat validation folder into one sub-folder per class (WNID), "
        "so torchvision's ImageFolder reads it with the train folder's class order.",
    )
    parser.add_argument(
        "--val-dir",
        type=Path,
        required=True,
        help="the flat folder holding ILSVRC2012_val_*.JPEG; sorted in place",
    )
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument(
        "--devkit",
        type=Path,
        help="the unpacked ILSVRC2012_devkit_t12 folder (reads data/meta.mat with scipy)",
    )
    labels.add_argument("--solution-csv", type=Path, help="Kaggle's LOC_val_solution.csv")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="move",
        help="move the images (default), or hardlink/symlink them and keep the flat files",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and say what would happen; change nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    arguments = parse_arguments(argv)
    layout = ClassTreeLayout(val_dir=arguments.val_dir, flat_dir=arguments.val_dir)
    if arguments.devkit is not None:
        label_file = arguments.devkit / GROUND_TRUTH_RELATIVE
        read_labels = functools.partial(read_devkit_labels, arguments.devkit)
    else:
        label_file = arguments.solution_csv
        read_labels = functools.partial(read_solution_csv, arguments.solution_csv)
    return main_with_errors_reported(
        functools.partial(
            run_preparation,
            layout,
            read_labels,
            label_file,
            arguments.mode,
            arguments.dry_run,
            val_dir_description="the ImageNet validation folder holding ILSVRC2012_val_*.JPEG",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
