#!/usr/bin/env python3
"""Sort TinyImageNet-200's validation images into the train folder's layout, one folder per class.

TinyImageNet ships ``val/images/val_<n>.JPEG`` with the labels in ``val/val_annotations.txt``
(tab-separated: file name, WNID, then a bounding box x0 y0 x1 y1), while its train folder is
``train/<wnid>/images/*.JPEG``. This script makes ``val/<wnid>/images/<file>``, so torchvision's
``ImageFolder`` (which walks each class folder recursively and numbers classes by the sorted
folder names) reads val with the same class order as train.

The images are always moved: ``val/images`` sits inside the folder ImageFolder reads, so keeping
it (as hardlink or symlink modes would) would add a 201st class called "images".

The safety rules are those of ``prepare_imagenet_val.py``, whose implementation this script
reuses: every input checked before a file moves, one-sentence errors with exit status 2, the work
done in a hidden staging sibling of ``val`` and the marker ``val/.prepared`` written last, and a
rerun that says "already prepared" or resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

# The shared machinery lives next to this file; importing it by directory keeps the script
# runnable from any working directory without installing anything.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_imagenet_val import (  # noqa: E402
    WNID_PATTERN,
    ClassTreeLayout,
    UserError,
    main_with_errors_reported,
    read_text_lines,
    run_preparation,
)

ANNOTATIONS_NAME = "val_annotations.txt"
FLAT_FOLDER_NAME = "images"
# File name, WNID and the four bounding-box coordinates.
ANNOTATION_FIELD_COUNT = 6


def read_annotations(annotations: Path) -> dict[str, str]:
    """Return image file name → WNID from ``val_annotations.txt``."""
    if not annotations.is_file():
        raise UserError(
            f"{annotations} does not exist; expected TinyImageNet's validation labels "
            f"(file name, WNID and box, tab-separated) next to val/images."
        )
    labels: dict[str, str] = {}
    for line_number, line in enumerate(
        read_text_lines(annotations, "tab-separated annotations"), 1
    ):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != ANNOTATION_FIELD_COUNT or not WNID_PATTERN.match(fields[1]):
            raise UserError(
                f"line {line_number} of {annotations} is {line.strip()!r}; expected "
                f"{ANNOTATION_FIELD_COUNT} tab-separated fields: file name, WNID such as "
                f"n01443537, x0, y0, x1, y1."
            )
        file_name = fields[0]
        if file_name in labels:
            raise UserError(
                f"line {line_number} of {annotations} labels {file_name} a second time; "
                f"expected one line per validation image."
            )
        labels[file_name] = fields[1]
    if not labels:
        raise UserError(
            f"{annotations} has no annotations; expected one line per validation image."
        )
    return labels


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Move TinyImageNet-200's val/images/*.JPEG into val/<wnid>/images/, the layout "
        "of its train folder, using val/val_annotations.txt.",
    )
    parser.add_argument(
        "--val-dir",
        type=Path,
        required=True,
        help="TinyImageNet's val folder, holding images/ and val_annotations.txt; sorted in place",
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
    layout = ClassTreeLayout(
        val_dir=arguments.val_dir,
        flat_dir=arguments.val_dir / FLAT_FOLDER_NAME,
        within_class=FLAT_FOLDER_NAME,
    )
    annotations = arguments.val_dir / ANNOTATIONS_NAME
    return main_with_errors_reported(
        functools.partial(
            run_preparation,
            layout,
            functools.partial(read_annotations, annotations),
            annotations,
            "move",
            arguments.dry_run,
            val_dir_description="TinyImageNet's val folder holding images/ and val_annotations.txt",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
