"""Shared fixtures: a prepared digits dataset and two small trained checkpoints, made once a session.

Training is the expensive part of these tests, so one small ViT and one small ResNet are trained
per session (on CPU, seconds each) and every test that needs a trained model reuses them: the
accuracy tests read them, the resume tests fine-tune them for a few epochs, the evaluation and CLI
tests evaluate them. Tests must not write into the fixtures' folders; they copy what they change.

Under pytest-xdist (`make test` runs `pytest -n auto --no-loadscope-reorder`) the workers share these
folders too (the first worker to ask makes one, the others wait for it), and each test module runs
on one worker, so a module's own fixtures are also made once; the SLURM modules share one worker,
since each starts and stops the one cluster of this machine.
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from noisynn.errors import UserError
from noisynn.pipeline.config import validate_config
from noisynn.pipeline.model_checks import check_models_and_sites

REPO = Path(__file__).resolve().parents[1]

# The recipes are the known-good ones of the project (~96 % / ~99 % val on digits at 16 px), with
# fewer epochs to keep the session short; both stay well above the 90 % / 95 % the tests ask for.
VIT_MODEL = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2},
}
RESNET_MODEL = {
    "timm_name": "resnet18",
    "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
}
VIT_RECIPE = {"epochs": 20, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 2}
RESNET_RECIPE = {"epochs": 10, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 1}


@dataclass(frozen=True)
class TrainedRun:
    """A finished pretraining run shared by the session (treat its folder as read-only)."""

    run_dir: Path
    checkpoint: Path
    model_cfg: dict
    recipe: dict
    last_site: str  # the site where the released code injects: last block's attention / last sub-block


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread
    only adds synchronisation stalls (measured: 6× slower training under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env() -> dict:
    """The environment for ``noisynn`` subprocesses: one thread, as in-process (see above)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called only where it runs
def pytest_xdist_make_scheduler(config, log):
    """One worker per test module (its module-scoped fixtures are made once) and one worker for both
    SLURM modules, tests/test_slurm_*.py (they must not start and stop the cluster side by side).
    xdist's `--dist loadgroup` would do this with marks, but it cannot regroup pytest 9's node ids."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if Path(module).name.startswith("test_slurm_") else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    """Under xdist the longest modules go first (`--no-loadscope-reorder` keeps this order), so that
    no minutes-long module is left alone on one worker at the end: the SLURM ones (a cluster to
    start, jobs that queue), then the modules by their number of end-to-end tests."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    slow = Counter(module_of(item) for item in items if item.get_closest_marker("slow"))
    # stable: each module's own order is kept
    items.sort(key=lambda item: (item.get_closest_marker("slurm") is None, -slow[module_of(item)]))


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``make(folder)`` fills, made once a session: under pytest-xdist the workers share
    it (the first to ask makes it under a lock, the others wait and reuse it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # the run's temporary folder, above each worker's own
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The digits dataset prepared at 16 px with the default split seed."""
    from noisynn.data import prepare_digits

    return made_once(tmp_path_factory, "digits16", lambda out: prepare_digits(out, image_size=16, seed=0))


def _pretrain(tmp_path_factory, digits_dir: Path, model_cfg: dict, recipe: dict, last_site: str, name: str) -> TrainedRun:
    from noisynn.train import TrainConfig, train

    def pretrain(folder: Path) -> None:
        cfg = TrainConfig(out_dir=str(folder / "run"), data_dir=str(digits_dir), stage="pretrain", model=model_cfg,
                          seed=0, **recipe)
        train(cfg)

    run_dir = made_once(tmp_path_factory, name, pretrain) / "run"
    return TrainedRun(run_dir, run_dir / "model.safetensors", model_cfg, recipe, last_site)


@pytest.fixture(scope="session")
def vit_run(tmp_path_factory, digits_dir) -> TrainedRun:
    """A 4-block ViT (patch 4, dim 64) pretrained on digits; its last attention input is blocks.3.attn."""
    return _pretrain(tmp_path_factory, digits_dir, VIT_MODEL, VIT_RECIPE, "blocks.3.attn", "vit")


@pytest.fixture(scope="session")
def resnet_run(tmp_path_factory, digits_dir) -> TrainedRun:
    """A ResNet-18 with one sub-block per stage pretrained on digits; its last sub-block is layer4.0."""
    return _pretrain(tmp_path_factory, digits_dir, RESNET_MODEL, RESNET_RECIPE, "layer4.0", "resnet")


def write_image_folder(root: Path, classes: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    """Write a tiny ImageFolder tree ``root/<class>/<i>.png`` of random RGB images; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A valid fake ImageFolder dataset: train/ and val/ with three classes of a few 8 px PNGs."""
    root = tmp_path / "folder"
    write_image_folder(root / "train", {"cat": 4, "dog": 3, "emu": 2}, seed=0)
    write_image_folder(root / "val", {"cat": 2, "dog": 2, "emu": 2}, seed=1)
    return root


def state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(checkpoint))


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensor names with bit-identical values."""
    sa, sb = state_of(a), state_of(b)
    assert sorted(sa) == sorted(sb)
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def assert_user_error(excinfo, *fragments: str) -> None:
    """A user mistake: a ValueError whose message is one sentence holding every fragment."""
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in msg and msg.strip().endswith(".")
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def tiny_config() -> dict:
    return yaml.safe_load((REPO / "config/tiny.yaml").read_text())


def config_refused(config: dict, key: str, *names: str) -> str:
    """The workflow's parse-time checks refuse ``config`` naming the file and ``key``."""
    with pytest.raises(UserError) as err:
        cfg = validate_config(config, "config/mine.yaml")
        check_models_and_sites(cfg, "config/mine.yaml", None, isolate=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".")
    assert msg.startswith(f"config/mine.yaml: key {key}:"), msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg}"
    return msg


def _digest(*paths: Path) -> dict[str, str]:
    """The bytes of each file under ``paths``, so that a test can say an input is intact."""
    import hashlib

    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
