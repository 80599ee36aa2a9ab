"""A config's dataset sections: whether their files hold what their kind needs, and the geometry of
the images a model sees on them (no torch import here)."""

from __future__ import annotations

import os
from pathlib import Path

from noisynn.errors import UserError
from noisynn.vocab import IMAGE_EXTENSIONS


def check_dataset(ds: dict, key: str, source: str, check_folders: bool = True) -> None:
    """Refuse a dataset section (config key ``key``) whose kind lacks a path it needs, whose folders or
    lists do not exist (unless not ``check_folders``), or whose image size its kind does not offer."""
    if ds["kind"] == "imagefolder":
        root = ds.get("root")
        if not root:
            raise UserError(f"{source}: key {key}.root: expected the folder holding {ds['train_dir']}/ and {ds['val_dir']}/ for kind imagefolder.")
        if not check_folders:
            return
        for sub in (ds["train_dir"], ds["val_dir"]):
            if not (Path(root) / sub).is_dir():
                raise UserError(f"{source}: key {key}.root: folder {Path(root) / sub} does not exist (expected an ImageFolder split).")
        classes = {sub: _class_folders(Path(root) / sub, f"{source}: key {key}.root") for sub in (ds["train_dir"], ds["val_dir"])}
        train, val = classes[ds["train_dir"]], classes[ds["val_dir"]]
        if train != val:
            differ = sorted(set(train) ^ set(val))[:3]
            raise UserError(f"{source}: key {key}.root: {Path(root) / ds['train_dir']} and {Path(root) / ds['val_dir']} "
                            f"have different class folders (e.g. {', '.join(differ)}); expected the same classes in both.")
    elif ds["kind"] == "list":
        for name in ("root", "train_list", "test_list"):
            if not ds.get(name):
                raise UserError(f"{source}: key {key}.{name}: expected a path for kind list (root: the folder the "
                                "lists' paths are relative to; train_list, test_list: `<path> <label>` files).")
            if check_folders and not Path(ds[name]).exists():
                raise UserError(f"{source}: key {key}.{name}: {ds[name]} does not exist.")
    elif ds["kind"] == "digits" and ds.get("image_size") not in (8, 16, 32):
        raise UserError(f"{source}: key {key}.image_size: expected 8, 16 or 32 for digits; got {ds.get('image_size')!r}.")
    elif ds["kind"] == "mnist" and ds.get("image_size") not in (8, 16, 28, 32):
        raise UserError(f"{source}: key {key}.image_size: expected 8, 16, 28 or 32 for mnist; got {ds.get('image_size')!r}.")


def _class_folders(folder: Path, where: str) -> list[str]:
    """The class folders of an ImageFolder split; an empty split or class folder is a UserError."""
    names = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not names:
        raise UserError(f"{where}: folder {folder} has no class sub-folders (expected the ImageFolder layout "
                        f"{folder}/<class>/<image>).")
    for name in names:
        if not _holds_image(folder / name):
            raise UserError(f"{where}: class folder {folder / name} holds no images (expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}).")
    return names


def _holds_image(folder: Path) -> bool:
    """Whether a class folder holds an image, at any depth; stops at the first one found."""
    try:
        with os.scandir(folder) as entries:
            subfolders = []
            for e in entries:
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    return True
                if e.is_dir():
                    subfolders.append(e.path)
    except OSError:
        return False
    return any(_holds_image(Path(d)) for d in subfolders)


def dataset_geometry(ds: dict, model: dict, num_classes: int | None = None) -> dict:
    """(num_classes, in_chans, image_size) of the images a model sees on a dataset of the config;
    an ImageFolder's classes are its class folders, a list dataset's the labels of its lists, unless
    ``num_classes`` is given."""
    if ds["kind"] in ("digits", "mnist"):
        return {"name": ds["name"], "num_classes": num_classes or 10, "in_chans": 1, "image_size": ds["image_size"]}
    if num_classes is None and ds["kind"] == "list":
        from noisynn.listfile import read_list

        num_classes = 1 + max(label for f in (ds["train_list"], ds["test_list"]) for _, label in read_list(Path(f)))
    if num_classes is None:
        num_classes = len([d for d in os.scandir(Path(ds["root"]) / ds["train_dir"]) if d.is_dir()])
    size = model.get("image_size") or (model.get("kwargs") or {}).get("img_size") or ds["image_size"]
    return {"name": ds["name"], "num_classes": num_classes, "in_chans": 3, "image_size": int(size)}
