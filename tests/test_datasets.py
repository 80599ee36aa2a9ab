"""A config's dataset sections (noisynn/pipeline/datasets.py): a folder that cannot give a split is refused
before any job, naming the file, the key and the folder."""

from __future__ import annotations

from conftest import config_refused, tiny_config


def test_config_empty_class_folder(image_folder):
    for f in (image_folder / "train" / "emu").glob("*.png"):
        f.unlink()
    (image_folder / "train" / "emu" / "notes.txt").write_text("no image")
    cfg = tiny_config()
    cfg["dataset"] = {"name": "folder", "kind": "imagefolder", "root": str(image_folder), "image_size": 8}
    config_refused(cfg, "dataset.root", str(image_folder / "train" / "emu"), "no images")
