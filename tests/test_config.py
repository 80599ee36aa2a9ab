"""Config validation: every shipped config passes, every mistake is one sentence naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import config_refused, tiny_config

from noisynn.errors import UserError
from noisynn.pipeline.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def tiny() -> dict:
    return yaml.safe_load((REPO / "config/tiny.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml"])
def test_shipped_digits_configs_validate(name):
    cfg = load_config(REPO / "config" / name)
    # defaults are filled in, so the workflow reads every key without .get()
    assert cfg["finetune"]["min_lr"] == 1e-6
    assert cfg["evaluate"]["protocols"][0] == "clean"


@pytest.mark.parametrize("name", ["paper-imagenet.yaml", "tinyimagenet.yaml"])
def test_paper_configs_validate_against_a_dataset_folder(tmp_path, name):
    for sub in ("train", "val"):
        (tmp_path / sub / "n01440764").mkdir(parents=True)
        (tmp_path / sub / "n01440764" / "0.JPEG").write_bytes(b"")  # the check looks for image names, not pixels
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg["dataset"]["root"] = str(tmp_path)
    out = validate_config(cfg, name)
    assert all(m["skip_pretrain"] for m in out["models"].values())


@pytest.mark.parametrize(
    "edit, key, expected",
    [
        (lambda c: c.update(extra=1), "(top level)", "unknown key 'extra'"),
        (lambda c: c["finetune"].update(lr="fast"), "finetune.lr", "expected number"),
        (lambda c: c["finetune"].update(lr=0), "finetune.lr", "> 0"),
        (lambda c: c["noises"][2].update(strength=[1.5]), "noises.2.strength", "[0, 1]"),
        (lambda c: c["noises"][4].pop("alpha"), "noises.4.alpha", "required"),
        (lambda c: c["noises"][3].update(axis=["diagonal"]), "noises.3.axis.0", "batch, rows, features"),
        (lambda c: c["noises"][3].update(models=["mlp"]), "noises.3.models", "not a model"),
        (lambda c: c["dataset"].update(image_size=12), "dataset.image_size", "8, 16 or 32"),
        (lambda c: c["dataset"].update(kind="imagefolder"), "dataset.root", "expected the folder"),
        (lambda c: c["models"]["vit"].update(pretrained="/no/weights.safetensors"), "models.vit.pretrained", "does not exist"),
        (lambda c: c.update(seeds=[0, 0]), "seeds", "non-unique"),
        (lambda c: c.update(finetune=None), "noises.3.apply", "train+eval needs a fine-tuning"),
        (lambda c: c.update(pretrain=None), "models.vit.skip_pretrain", "pretrain is null"),
        (lambda c: c["noises"][1].update(detach=True), "noises.1.detach", "only the linear noises"),
        (lambda c: c["noises"][4].update(neighbour="left"), "noises.4.neighbour", "previous, next"),
        (lambda c: c["models"]["resnet"].update(reported_metric="mean"), "models.resnet.reported_metric", "running, plain"),
        (lambda c: c["models"]["vit"].update(preprocess="imagenet"), "models.vit.preprocess", "timm, released"),
        (lambda c: c["models"]["vit"].update(preprocess="released"), "models.vit.preprocess", "dataset kind digits"),
        (lambda c: c["noises"][4].update(detach="partial"), "noises.4.detach", "partner"),
    ],
)
def test_each_mistake_is_one_sentence_naming_file_and_key(edit, key, expected):
    cfg = tiny()
    edit(cfg)
    with pytest.raises(UserError) as err:
        validate_config(cfg, "config/mine.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("config/mine.yaml: key ") and key in msg and expected in msg


# The weights the released code loads (github.com/Shawey94/NoisyNN @719ccf6), by the file they come
# from. ViTs: timm.create_model('vit_<scale>_patch16_<res>', pretrained=True) (NoisyViT-OptimalQ/Main.py
# line 80) under timm==0.6.13 (requirements.txt line 3), whose default_cfgs name these files (timm v0.6.13
# timm/models/vision_transformer.py lines 55-57, 69-71, 83-88, 99-104). ResNets: torchvision's DEFAULT
# weights (NoisyCNN_CircularShiftQ/CNNs.py lines 156, 266, 376, 486), IMAGENET1K_V1 for ResNet-18/34 and
# IMAGENET1K_V2 for ResNet-50/101 (its CNNModels.py lines 1779, 1801, 1844, 1887; URLs lines 1762, 1784,
# 1824, 1867).
_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"
RELEASED_WEIGHTS = {
    "vit_tiny_patch16_224": _AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "vit_small_patch16_224": _AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "vit_base_patch16_224": _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "vit_base_patch16_384": _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "vit_large_patch16_224": _AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "vit_large_patch16_384": _AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
}


@pytest.mark.parametrize("name", ["imagenet-audit.yaml", "paper-imagenet.yaml"])
def test_imagenet_configs_start_from_the_weights_the_released_code_loads(name):
    """Each of the paper's ViTs and ResNets names the timm tag whose file is the one the released code
    downloads (timm keeps the source URL of every tag). timm 1.x's untagged vit_base_patch16_224 is AugReg2
    and its untagged resnet50 is a1_in1k: neither is what the released code ran."""
    import timm

    models = yaml.safe_load((REPO / "config" / name).read_text())["models"]
    released = {m: c for m, c in models.items() if c["timm_name"].split(".")[0] in RELEASED_WEIGHTS}
    assert {c["timm_name"].split(".")[0] for c in released.values()} == set(RELEASED_WEIGHTS)
    for m, c in released.items():
        assert timm.models.get_pretrained_cfg(c["timm_name"]).url == RELEASED_WEIGHTS[c["timm_name"].split(".")[0]], m


def _on_processes(resources: dict, **finetune) -> dict:
    cfg = tiny()
    cfg["models"]["vit"]["resources"] = resources
    cfg["finetune"].update(finetune)
    return cfg


@pytest.mark.parametrize("resources", [{"nproc": 2}, {"gpu": 4}])
def test_a_world_size_that_changes_k_is_refused_with_its_fixes(resources):
    """tiny's optimal-Q fine-tuning (batch 64) mixes 64 samples on one process; on N it would mix 64 / N."""
    world = next(iter(resources.values()))
    with pytest.raises(UserError) as e:
        validate_config(_on_processes(resources), "tiny.yaml")
    message = str(e.value)
    assert message.startswith(f"tiny.yaml: key finetune.noise_batch: model vit trains on {world} processes")
    assert f"would mix {64 // world}, not the 64" in message
    assert f"batch_size {64 * world} (64 per process)" in message and f"noise_batch {64 // world}" in message


def test_k_declared_for_the_processes_or_no_batch_mixing_noise_in_training_passes():
    assert validate_config(_on_processes({"nproc": 2}, noise_batch=32), "tiny.yaml")
    # 2 processes × 32 a step, each in two forward passes of 16 (gradient accumulation)
    assert validate_config(_on_processes({"nproc": 2}, batch_size=64, noise_batch=16), "tiny.yaml")
    cfg = _on_processes({"nproc": 2})
    for entry in cfg["noises"]:
        entry["apply"] = ["eval"]  # the batch is never mixed in training: k does not matter there
    assert validate_config(cfg, "tiny.yaml")
    with pytest.raises(UserError, match="finetune.noise_batch.*would mix 32, not the 24"):
        validate_config(_on_processes({"nproc": 2}, noise_batch=24), "tiny.yaml")


def test_the_paper_config_declares_the_released_k():
    """The released ViT code fine-tunes at batch 16 on one GPU (runScript.txt: --batch_size 16 --gpu_id 0;
    NoisyViT-OptimalQ/Main.py builds no DataParallel), so its batch-axis noise mixes 16."""
    cfg = yaml.safe_load((REPO / "config/paper-imagenet.yaml").read_text())
    assert cfg["finetune"]["noise_batch"] == cfg["finetune"]["batch_size"] == 16
    assert all(m["resources"]["gpu"] == 1 for m in cfg["models"].values())


def test_config_augment_beside_the_released_preprocess(image_folder):
    cfg = tiny_config()
    cfg["dataset"] = {"name": "folder", "kind": "imagefolder", "root": str(image_folder), "image_size": 8}
    cfg["models"]["vit"].update(preprocess="released", augment={"scale": [0.5, 1.0]})
    config_refused(cfg, "models.vit.augment", "preprocess: released")


def test_config_schedule_at_learning_rate_zero():
    cfg = tiny_config()
    cfg["finetune"].update(epochs=1, warmup_epochs=1)
    config_refused(cfg, "finetune.warmup_epochs", "learning rate 0")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d, good: (d / "weights.pth").write_bytes(good), ".safetensors"),
        (lambda d, good: (d / "weights.safetensors").write_bytes(good[:-64]), "cut short"),
    ],
    ids=["not-safetensors", "truncated"],
)
def test_config_pretrained_file_that_is_no_safetensors_file(make, why, resnet_run, tmp_path):
    make(tmp_path, resnet_run.checkpoint.read_bytes())
    weights = next(tmp_path.iterdir())
    cfg = tiny_config()
    cfg["models"]["resnet"]["pretrained"] = str(weights)
    config_refused(cfg, "models.resnet.pretrained", str(weights), why)


@pytest.mark.parametrize(("index", "key", "value", "why"),
                         [(1, "strength", [0.5, 0], "identity"), (4, "alpha", [0.0], "identity"),
                          (1, "strength", [float("inf")], "finite"), (2, "strength", [float("nan")], "finite")],
                         ids=["gaussian-strength-0", "shift-alpha-0", "gaussian-inf", "impulse-nan"])
def test_config_noise_that_is_the_identity_or_not_finite(index, key, value, why):
    # the parse-time check a dry run (snakemake -n) and a real run both make before any job
    cfg = tiny_config()
    assert cfg["noises"][index].get(key) is not None
    cfg["noises"][index][key] = value
    config_refused(cfg, f"noises.{index}.{key}.{len(value) - 1}", why)
