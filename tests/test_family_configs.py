"""The configs of the NoisyNN family's recipes (config/claims.yaml names them) dry-run.

The embedded-data recipes (NoisyViT_Food's and InterLUDE's on MNIST-5k, FFTAT's from MNIST-5k to digits) plan the jobs their headers
describe; the cluster-scale ones (Food-101 as an ImageFolder with train/ and test/, Office-Home as
FFTAT's list files with ./data/office-home/images/ paths, ImageNetV2 with four-digit class folders
under val/) plan theirs against generated data of that shape.
"""

from __future__ import annotations

import pytest
from PIL import Image
from workflow_helpers import copy_repo, job_counts, snakemake


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def _dry(repo, config, *overrides) -> dict[str, int]:
    args = ["--config", *overrides] if overrides else []
    return job_counts(snakemake(repo, "-n", "--workflow-profile", "none", "--configfile", config, *args).stdout)


@pytest.mark.slow  # each config checks its models on the meta device first
@pytest.mark.parametrize("config, counts", [
    # one ViT: the vanilla fine-tuning serves both settings (optimal Q at evaluation only), 2 seeds
    ("config/noisyvit-food-mnist.yaml", {"prepare_data": 1, "pretrain": 1, "finetune": 2, "evaluate": 2}),
    # one ResNet: vanilla and shift-trained fine-tunings, each evaluated, 2 seeds
    ("config/interlude-mnist.yaml", {"prepare_data": 1, "pretrain": 1, "finetune": 4, "evaluate": 4}),
    # pretraining on the source (its own prepare job), vanilla and operator-trained fine-tunings on the target
    ("config/fftat-digits.yaml", {"prepare_data": 1, "prepare_pretrain_data": 1, "pretrain": 1, "finetune": 4,
                                  "evaluate": 4}),
])
def test_embedded_recipes_dry_run(repo_copy, config, counts):
    got = _dry(repo_copy, config)
    assert {k: got.get(k, 0) for k in counts} == counts and got["summary"] == 1


@pytest.mark.slow
def test_food101_dry_runs_on_an_imagefolder_with_a_test_split(repo_copy, tmp_path):
    for split in ("train", "test"):
        for cls in ("apple_pie", "baby_back_ribs"):
            _image(tmp_path / split / cls / "1.jpg")
    got = _dry(repo_copy, "config/food101.yaml", f"dataset={{root: {tmp_path}}}")
    assert {k: got.get(k, 0) for k in ("import_weights", "finetune", "evaluate", "pretrain")} == \
        {"import_weights": 1, "finetune": 1, "evaluate": 1, "pretrain": 0}


@pytest.mark.slow
def test_office_home_dry_runs_on_fftat_style_lists(repo_copy, tmp_path):
    lists = {}
    for domain in ("Art", "Clipart"):
        lines = []
        for label, cls in enumerate(("Drill", "Kettle")):
            rel = f"./data/office-home/images/{domain}/{cls}/00001.jpg"
            _image(tmp_path / rel)
            lines.append(f"{rel} {label}")
        lists[domain] = tmp_path / f"{domain}.txt"
        lists[domain].write_text("\n".join(lines) + "\n")
    got = _dry(repo_copy, "config/office-home.yaml",
               f"dataset={{root: {tmp_path}, train_list: {lists['Art']}, test_list: {lists['Clipart']}}}")
    # the vanilla fine-tuning and the one with the operator in training, each evaluated
    assert {k: got.get(k, 0) for k in ("import_weights", "finetune", "evaluate")} == \
        {"import_weights": 1, "finetune": 2, "evaluate": 2}


@pytest.mark.slow
def test_imagenetv2_dry_runs_on_four_digit_class_folders(repo_copy, tmp_path):
    for cls in ("0000", "0001", "0002"):
        _image(tmp_path / "val" / cls / "a.jpeg")
    got = _dry(repo_copy, "config/imagenetv2.yaml", f"dataset={{root: {tmp_path}}}")
    assert {k: got.get(k, 0) for k in ("import_weights", "finetune", "evaluate")} == \
        {"import_weights": 2, "finetune": 0, "evaluate": 2}
