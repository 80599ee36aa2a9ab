"""A new user's mistakes, through the command line and the workflow's config check.

What a user relies on (the README's promise): every mistake of theirs ends with exit status 2 and
one sentence on stderr that names the file or the key and what was expected, never a traceback;
it is found before the expensive step (an evaluation never reaches its prefix pass, printed as
``noisynn: prefix cache at …``; a training never writes ``args.yaml`` or ``summary.csv``); nothing
that looks finished is left behind; and nothing wrong is accepted in silence (other data than the
checkpoint's, non-finite weights, a schedule at learning rate 0, a noise that its site makes the
identity, a dataset file changed after ``prepare``). Also: checkpoints are readable by the group,
a run folder is left without temp files, and two trainings cannot share one run folder. The config
check's refusals one by one are tested with the module that makes each (tests/test_config.py,
test_datasets.py, test_model_checks.py).

Most cases call ``noisynn.cli.main`` in-process (fast); a few run ``python -m noisynn``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RESNET_MODEL, _digest, cli_env, config_refused, tiny_config, write_image_folder

from noisynn.cli import main

REPO = Path(__file__).resolve().parents[1]
ONE_EPOCH = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 0}
ROWS = json.dumps({"kind": "linear-optimal", "axis": "rows"})
TINY_RESNET = {"timm_name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}}
RUN_FILES = ("args.yaml", "summary.csv", "model.safetensors", "model.json")


def refused(capsys, argv, *names) -> str:
    """Run ``noisynn argv`` in-process: exit 2, one ``noisynn: error:`` sentence naming ``names``, no
    prefix pass; returns the sentence."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("noisynn") and "error: " in line and line.endswith("."), line
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    assert "prefix cache" not in out, "refused only after the prefix pass"
    return line


def refused_in_subprocess(argv, *names) -> str:
    result = subprocess.run([sys.executable, "-m", "noisynn", *map(str, argv)], capture_output=True, text=True,
                            env=cli_env(), timeout=300)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    assert "prefix cache" not in result.stdout
    return lines[0]


def evaluate(checkpoint, data, out, *extra) -> list:
    return ["evaluate", "--checkpoint", checkpoint, "--data", data, "--out", out, *extra]


def finetune(init, data, out, train=ONE_EPOCH, *extra) -> list:
    return ["finetune", "--data", data, "--init", init, "--out", out, "--train", json.dumps(train), *extra]


def pretrain(model, data, out, train=ONE_EPOCH) -> list:
    model = model if isinstance(model, str) else json.dumps(model)
    return ["pretrain", "--data", data, "--out", out, "--model", model, "--train", json.dumps(train)]


def assert_no_run(out: Path) -> None:
    """The training stopped before it started: no file of a run folder's contract exists."""
    present = [name for name in RUN_FILES if (Path(out) / name).exists()]
    assert not present, f"{present} written although the run was refused"


def copy_checkpoint(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / "model.safetensors")
    shutil.copy(src.with_suffix(".json"), dst_dir / "model.json")
    return dst_dir / "model.safetensors"


def copy_data(digits_dir: Path, dst: Path) -> Path:
    shutil.copytree(digits_dir, dst)
    return dst


# --- 1. output paths, checked before any work -------------------------------------------------


def test_evaluate_out_that_is_a_folder(resnet_run, digits_dir, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "results"), tmp_path / "results", "folder")


def test_evaluate_out_under_a_file(resnet_run, digits_dir, tmp_path, capsys):
    (tmp_path / "notes").write_text("a file, not a folder")
    out = tmp_path / "notes" / "e.json"
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, out), out, "is a file")


def test_evaluate_out_in_an_unwritable_place(resnet_run, digits_dir, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere chmod allows; sysfs refuses even root
        if not Path("/sys").is_dir():
            pytest.skip("needs a place root cannot write")
        out = Path("/sys/noisynn-test/e.json")
    else:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "e.json"
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, out), out, "cannot be written")


def test_evaluate_out_that_is_the_checkpoint(resnet_run, digits_dir, tmp_path, capsys):
    weights = copy_checkpoint(resnet_run.checkpoint, tmp_path / "run")
    before = weights.read_bytes()
    refused(capsys, evaluate(weights, digits_dir, weights), weights, "checkpoint")
    assert weights.read_bytes() == before


def test_evaluate_predictions_that_are_the_out_file(resnet_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, out, "--predictions", out), "--predictions", out)
    assert not out.exists()


def test_evaluate_out_that_is_a_folder_through_the_real_cli(resnet_run, digits_dir, tmp_path):
    (tmp_path / "results").mkdir()
    refused_in_subprocess(evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "results"), tmp_path / "results")


def test_finetune_out_that_is_a_file(resnet_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("an existing file")
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, out), out, "existing file")
    assert out.read_text() == "an existing file"


def test_pretrain_out_under_a_file(digits_dir, tmp_path, capsys):
    (tmp_path / "notes").write_text("x")
    out = tmp_path / "notes" / "run"
    refused(capsys, pretrain(TINY_RESNET, digits_dir, out), out, "is a file")


def test_finetune_out_that_is_the_folder_of_init(resnet_run, digits_dir, tmp_path, capsys):
    weights = copy_checkpoint(resnet_run.checkpoint, tmp_path / "pretrained")
    refused(capsys, finetune(weights, digits_dir, weights.parent), weights.parent, "--init")
    assert sorted(p.name for p in weights.parent.iterdir()) == ["model.json", "model.safetensors"]


# --- 1. malformed command-line values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "names"),
    [
        ('{"timm_name": "resnet18", "kwargs": "img_size=8"}', ["--model", "kwargs", "img_size=8"]),
        ('{"kwargs": {}}', ["--model", "timm_name"]),
        ('{"timm_name": "resnet18", "pretrain": "hub"}', ["--model", "'pretrain'", "pretrained"]),
        ('{"timm_name": "resnet18", "kwargs": {"layers": [1, 1]}}', ["resnet18", "cannot run", "kwargs"]),
    ],
    ids=["kwargs-a-string", "no-timm-name", "unknown-key", "kwargs-that-build-a-broken-model"],
)
def test_pretrain_model_config_mistakes(model, names, digits_dir, tmp_path, capsys):
    refused(capsys, pretrain(model, digits_dir, tmp_path / "run"), *names)
    assert_no_run(tmp_path / "run")


def test_sites_with_kwargs_that_are_not_a_mapping(capsys):
    refused(capsys, ["sites", "--model", '{"timm_name": "resnet18", "kwargs": "img_size=8"}'], "kwargs")


def test_evaluate_negative_seed(resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--seed", -1), "seed", "-1")
    assert not (tmp_path / "e.json").exists()


def test_finetune_negative_seed(resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--seed", -1), "seed", "-1")
    assert_no_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--protocols", ","], ["protocol", "clean"]),
        (["--num-workers", "-1"], ["num_workers", "-1"]),
        (["--forward-batch-size", "0"], ["forward_batch_size", "0"]),
        (["--site", " ", "--noise", '{"kind": "gaussian"}'], ["--site", "empty"]),
        (["--settings", '[{"noise_params": {"kind": "none"}, "seed": "x"}]'], ["--settings entry 0", "seed"]),
    ],
    ids=["no-protocol", "negative-workers", "no-images-per-call", "empty-site", "settings-seed-not-a-number"],
)
def test_evaluate_option_mistakes(extra, names, resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", *extra), *names)
    assert not (tmp_path / "e.json").exists()


def test_evaluate_groups_mistakes_are_refused_before_the_first_group_runs(resnet_run, digits_dir, tmp_path, capsys):
    """`evaluate --groups` (the workflow's job per checkpoint or per model): a mistake in any group
    stops the job before the first prefix pass, naming the entry."""
    none = [{"noise_params": {"kind": "none"}}]
    first = {"checkpoint": str(resnet_run.checkpoint), "site": "layer4.0", "settings": none, "out": str(tmp_path / "a.json")}
    command = ["evaluate", "--data", digits_dir, "--groups"]
    refused(capsys, [*command, json.dumps([first]), "--out", tmp_path / "b.json"], "--groups", "--out")
    refused(capsys, [*command, json.dumps([first]), "--checkpoint", resnet_run.checkpoint], "--groups", "--checkpoint")
    refused(capsys, [*command, json.dumps([first, {"site": "layer4.0", "settings": none}])], "--groups entry 1", "out")
    no_checkpoint = {k: v for k, v in first.items() if k != "checkpoint"} | {"out": str(tmp_path / "c.json")}
    refused(capsys, [*command, json.dumps([first, no_checkpoint])], "--groups entry 1", "checkpoint")
    refused(capsys, [*command, json.dumps([first, {**first, "site": "layer3.0"}])], "--groups entry 1 out",
            "--groups entry 0 out")
    refused(capsys, [*command, json.dumps([first, {**first, "out": str(resnet_run.checkpoint)}])], "--groups entry 1 out",
            "checkpoint")
    refused(capsys, [*command, json.dumps([first, {**first, "site": "layer9.9", "out": str(tmp_path / "c.json")}])],
            "layer9.9")
    assert not list(tmp_path.iterdir())


# --- 1. broken dataset files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "name"),
    [
        (lambda m: {k: v for k, v in m.items() if k != "kind"}, "kind"),
        (lambda m: {k: v for k, v in m.items() if k != "fingerprint"}, "fingerprint"),
        (lambda m: [m], "list"),
    ],
    ids=["without-kind", "without-fingerprint", "a-json-list"],
)
def test_manifest_mistakes(edit, name, resnet_run, digits_dir, tmp_path, capsys):
    data = copy_data(digits_dir, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(edit(manifest)))
    refused(capsys, evaluate(resnet_run.checkpoint, data, tmp_path / "e.json"), data / "manifest.json", name)


def _rewrite_npz(data: Path, forget_hash: bool = True, **arrays) -> None:
    with np.load(data / "digits.npz") as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    np.savez(data / "digits.npz", **content)
    if forget_hash:  # as if written by a noisynn without the recorded SHA-256: the arrays are checked alone
        manifest = json.loads((data / "manifest.json").read_text())
        manifest.pop("npz_sha256")
        (data / "manifest.json").write_text(json.dumps(manifest))


def test_npz_holding_object_arrays(resnet_run, digits_dir, tmp_path, capsys):
    data = copy_data(digits_dir, tmp_path / "data")
    with np.load(data / "digits.npz") as z:
        labels = np.array(list(z["labels"]), dtype=object)
    _rewrite_npz(data, labels=labels)
    refused(capsys, evaluate(resnet_run.checkpoint, data, tmp_path / "e.json"), data / "digits.npz", "object arrays")


def test_npz_cut_short(resnet_run, digits_dir, tmp_path, capsys):
    data = copy_data(digits_dir, tmp_path / "data")
    _rewrite_npz(data)
    (data / "digits.npz").write_bytes((data / "digits.npz").read_bytes()[:2000])
    refused(capsys, evaluate(resnet_run.checkpoint, data, tmp_path / "e.json"), data / "digits.npz", "not a readable")


def test_npz_replaced_after_prepare(resnet_run, digits_dir, tmp_path, capsys):
    data = copy_data(digits_dir, tmp_path / "data")
    with np.load(data / "digits.npz") as z:
        images = z["images"].copy()
    images[:5] = 0.0  # five images blanked: same shapes, another dataset
    _rewrite_npz(data, forget_hash=False, images=images)
    refused(capsys, evaluate(resnet_run.checkpoint, data, tmp_path / "e.json"), data / "digits.npz", "changed")


@pytest.fixture
def prepared_folder(image_folder, tmp_path) -> Path:
    from noisynn.data import prepare_image_folder

    prepare_image_folder(tmp_path / "prepared", image_folder, image_size=8)
    return tmp_path / "prepared"


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_image_changed_after_prepare(change, image_folder, prepared_folder, tmp_path, capsys):
    victim = image_folder / "train" / "dog" / "2.png"  # not the first file: every file is checked
    if change == "replaced":
        write_image_folder(tmp_path / "other", {"dog": 3}, seed=7, size=9)
        shutil.copy(tmp_path / "other" / "dog" / "2.png", victim)
    else:
        victim.unlink()
    refused(capsys, pretrain(TINY_RESNET, prepared_folder, tmp_path / "run"), victim)
    assert_no_run(tmp_path / "run")


def test_image_only_touched_after_prepare_is_accepted(image_folder, prepared_folder):
    from noisynn.data import load_dataset

    victim = image_folder / "val" / "cat" / "0.png"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert len(load_dataset(prepared_folder, train_augment=False).test) == 6  # same bytes: hashed again, same hash


# --- 1. broken checkpoints and weights files -------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda meta: [meta], ["model.json", "list"]),
        (lambda meta: {k: v for k, v in meta.items() if k != "model"}, ["model.json", "model"]),
        (lambda meta: {**meta, "num_classes": "ten"}, ["model.json", "num_classes"]),
    ],
    ids=["a-json-list", "without-model", "num-classes-not-a-number"],
)
def test_sidecar_mistakes(edit, names, resnet_run, digits_dir, tmp_path, capsys):
    weights = copy_checkpoint(resnet_run.checkpoint, tmp_path / "run")
    meta = json.loads(weights.with_suffix(".json").read_text())
    weights.with_suffix(".json").write_text(json.dumps(edit(meta)))
    refused(capsys, evaluate(weights, digits_dir, tmp_path / "e.json"), weights.with_suffix(".json"), *names[1:])


def _with_a_nan(src: Path, dst_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    weights = copy_checkpoint(src, dst_dir)
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[1] = float("nan")
    save_file(state, str(weights), metadata={"format": "noisynn-checkpoint/1"})
    return weights


def test_evaluate_a_checkpoint_with_nan_weights(resnet_run, digits_dir, tmp_path, capsys):
    weights = _with_a_nan(resnet_run.checkpoint, tmp_path / "run")
    refused(capsys, evaluate(weights, digits_dir, tmp_path / "e.json"), weights, "non-finite")
    assert not (tmp_path / "e.json").exists()


def test_finetune_from_a_checkpoint_with_nan_weights(resnet_run, digits_dir, tmp_path, capsys):
    weights = _with_a_nan(resnet_run.checkpoint, tmp_path / "start")
    refused(capsys, finetune(weights, digits_dir, tmp_path / "run"), weights, "non-finite")
    assert_no_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: b[: len(b) // 2], "cut short"),
        (lambda b: b"\x80\x04\x95" + b"\x00" * 64 + b"a pickle renamed .safetensors", "pickle"),
    ],
    ids=["truncated", "pickle-renamed"],
)
def test_pretrained_weights_file_that_is_no_safetensors_file(damage, why, resnet_run, digits_dir, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(damage(resnet_run.checkpoint.read_bytes()))
    model = {**RESNET_MODEL, "pretrained": str(weights)}
    refused(capsys, pretrain(model, digits_dir, tmp_path / "run"), weights, why)
    assert_no_run(tmp_path / "run")


def test_import_weights_from_a_truncated_file(resnet_run, digits_dir, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(resnet_run.checkpoint.read_bytes()[:-100])
    model = json.dumps({**RESNET_MODEL, "pretrained": str(weights)})
    refused(capsys, ["import-weights", "--data", digits_dir, "--model", model, "--out", tmp_path / "imported"], weights)
    assert not (tmp_path / "imported" / "model.safetensors").exists()


# --- 2. nothing wrong accepted in silence -------------------------------------------------------


@pytest.fixture(scope="module")
def other_split(digits_dir, tmp_path_factory) -> Path:
    """Digits split with another seed: its test images are partly the fixture model's training images."""
    from noisynn.data import prepare_digits

    out = tmp_path_factory.mktemp("digits16-seed1")
    prepare_digits(out, image_size=16, seed=1)
    return out


def test_evaluate_on_other_data_is_refused(resnet_run, other_split, tmp_path, capsys):
    line = refused(capsys, evaluate(resnet_run.checkpoint, other_split, tmp_path / "e.json"), other_split,
                   resnet_run.checkpoint, "--allow-other-data")
    assert "fingerprint" in line
    assert not (tmp_path / "e.json").exists()


def test_evaluate_on_other_data_when_intended_is_recorded(resnet_run, other_split, tmp_path, capsys):
    out = tmp_path / "e.json"
    stale = tmp_path / ".e.json.abcd1234.tmp"  # left by an evaluation killed while writing
    stale.write_text("{")
    rc = main([str(a) for a in evaluate(resnet_run.checkpoint, other_split, out, "--allow-other-data", "--protocols", "clean")])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["other_data"] is True
    assert result["checkpoint_data_fingerprint"] != result["data_fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]  # the stale temp file is gone too


def test_finetune_whose_schedule_is_zero_throughout(resnet_run, digits_dir, tmp_path, capsys):
    # one epoch and the default one warm-up epoch from warmup_lr 0: lr 0 at every step
    train = {"epochs": 1, "batch_size": 64, "lr": 1e-3}
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", train), "--train", "warmup_epochs",
            "learning rate 0")
    assert_no_run(tmp_path / "run")


def test_evaluate_rows_noise_that_the_site_makes_the_identity(resnet_run, digits_dir, tmp_path, capsys):
    # the ResNet's layer4.0 sees a 1×1 map of 16 px digits: mixing its one row changes nothing
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--noise", ROWS,
                             "--site", resnet_run.last_site), "layer4.0", "rows", "identity")


def test_finetune_rows_noise_that_the_site_makes_the_identity(resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--noise", ROWS, "--site",
                             resnet_run.last_site), "layer4.0", "identity")
    assert_no_run(tmp_path / "run")


def test_training_that_diverges_stops_with_a_sentence(resnet_run, digits_dir, tmp_path, capsys):
    # found during training (the progress bar has started), but never saved as a finished run
    train = {**ONE_EPOCH, "lr": 1e30}
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", train)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("noisynn: error: ") and "Traceback" not in err, err
    assert str(tmp_path / "run") in lines[0] and "nan" in lines[0] and "lr" in lines[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / ".lock").exists()


# --- 5. outputs: group-readable, no temp files, one writer per run folder ---------------------


def test_checkpoint_is_readable_by_the_group(tmp_path):
    import torch

    from noisynn.models.build import build_model
    from noisynn.models.checkpoints import save_checkpoint

    old = os.umask(0o022)
    try:
        model = build_model(TINY_RESNET, 10, 1)
        save_checkpoint(model, tmp_path / "model.safetensors", {"model": TINY_RESNET, "num_classes": 10, "in_chans": 1})
    finally:
        os.umask(old)
    for name in ("model.safetensors", "model.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert torch.isfinite(next(model.parameters())).all()


def test_finished_run_leaves_no_temp_or_lock_file(resnet_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "recovery").mkdir(parents=True)
    stale = [out / ".model.json.k3j9x2ab.tmp", out / ".summary.csv.a1b2c3d4.tmp", out / "recovery" / ".state.json.zzzz9999.tmp"]
    for path in stale:
        path.write_text("left by a process killed mid-write")
    (out / "notes.txt").write_text("the user's own file")
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "model.json", "model.safetensors", "notes.txt",
                                                      "summary.csv"]
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) & 0o044 == 0o044  # group and others read


def test_second_training_on_a_run_folder_in_use(resnet_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # the first training, still running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(capsys, finetune(resnet_run.checkpoint, digits_dir, out), out, "in use")
        assert_no_run(out)
        line = refused_in_subprocess(finetune(resnet_run.checkpoint, digits_dir, out), out, "in use")
        assert "another training" in line
    assert_no_run(out)


def test_cost_mistakes_are_one_sentence(tmp_path, capsys):
    audit = REPO / "config" / "imagenet-audit.yaml"
    split = ["--images", "50000", "--classes", "1000"]
    refused(capsys, ["cost", "--config", audit], "--images", "--classes")
    refused(capsys, ["cost", "--config", audit, "--images", "10", "--classes", "20"], "--classes")
    refused(capsys, ["cost", "--config", audit, "--data", tmp_path, "--images", "10"], "--data", "--images")
    missing = tmp_path / "none.csv"
    refused(capsys, ["cost", "--config", audit, *split, "--throughput", missing], missing)
    columns = tmp_path / "columns.csv"
    columns.write_text("model,img_size,samples_per_sec\nresnet50,224,100\n")
    refused(capsys, ["cost", "--config", audit, *split, "--throughput", columns], columns, "infer_samples_per_sec")
    value = tmp_path / "value.csv"
    value.write_text("model,infer_img_size,infer_samples_per_sec\nresnet50,224,fast\n")
    refused(capsys, ["cost", "--config", audit, *split, "--throughput", value], value, "line 2")
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("model,infer_img_size,infer_samples_per_sec\n", encoding="utf-16")
    refused(capsys, ["cost", "--config", audit, *split, "--throughput", utf16], utf16, "UTF-8")
    refused(capsys, ["cost", "--config", audit, *split, "--throughput", tmp_path], tmp_path, "not a file")
    digits = REPO / "config" / "config.yaml"
    refused(capsys, ["cost", "--config", digits], "--data")


# --- 6. what still got through (issue 22): each class refused before the work -----------------


IDENTITY_NOISES = [({"kind": "gaussian", "strength": 0}, "strength"), ({"kind": "linear-shift", "alpha": 0.0}, "alpha")]


@pytest.mark.parametrize(("noise", "key"), IDENTITY_NOISES, ids=["gaussian-strength-0", "shift-alpha-0"])
def test_identity_noise_is_refused_at_evaluation_and_in_finetuning(noise, key, resnet_run, digits_dir, tmp_path, capsys):
    before = _digest(resnet_run.checkpoint, digits_dir)
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--noise", json.dumps(noise),
                             "--site", resnet_run.last_site), key, "identity")
    assert not (tmp_path / "e.json").exists()
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--noise",
                             json.dumps(noise), "--site", resnet_run.last_site), key, "identity")
    assert_no_run(tmp_path / "run")
    assert _digest(resnet_run.checkpoint, digits_dir) == before


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_noise_strength_that_is_not_finite(value, resnet_run, digits_dir, tmp_path, capsys):
    noise = '{"kind": "gaussian", "strength": %s}' % value
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--noise", noise, "--site",
                             resnet_run.last_site), "strength", "finite")
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--noise", noise,
                             "--site", resnet_run.last_site), "strength", "finite")
    assert_no_run(tmp_path / "run")
    assert not (tmp_path / "e.json").exists()


def test_finished_run_folder_is_never_overwritten_by_other_settings(resnet_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, out)]) == 0
    capsys.readouterr()
    finished = _digest(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    # another seed, another noise: refused, naming what differs; the finished run intact
    line = refused(capsys, finetune(resnet_run.checkpoint, digits_dir, out, ONE_EPOCH, "--seed", 1), out, "--overwrite")
    assert "seed was 0, now 1" in line
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, out, ONE_EPOCH, "--noise", ROWS.replace("rows", "batch"),
                             "--site", resnet_run.last_site), out, "noise")
    assert _digest(out) == finished

    # the same training again: nothing to do, nothing rewritten
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # the workflow's rerun: Snakemake deletes a job's outputs (checkpoint and sidecar) before it runs it
    for name in ("model.safetensors", "model.json"):
        (out / name).unlink()
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, out, ONE_EPOCH, "--seed", 1)]) == 0
    assert json.loads((out / "model.json").read_text())["train_args"]["seed"] == 1

    # and the user's explicit wish
    assert main([str(a) for a in finetune(resnet_run.checkpoint, digits_dir, out, ONE_EPOCH, "--overwrite")]) == 0
    capsys.readouterr()
    assert json.loads((out / "model.json").read_text())["train_args"]["seed"] == 0


def test_aggregate_output_that_is_an_input_or_a_folder(tmp_path, capsys):
    evaluation = tmp_path / "a.json"
    evaluation.write_text('{"evaluations": []}\n')
    before = _digest(evaluation)
    refused(capsys, ["aggregate", evaluation, "--out", evaluation], evaluation, "input")
    refused(capsys, ["aggregate", evaluation, "--out", tmp_path / "e.csv", "--sweeps-out", evaluation], "--sweeps-out",
            "input")
    refused(capsys, ["aggregate", evaluation, "--out", tmp_path / "e.csv", "--sweeps-out", tmp_path / "e.csv"],
            "--sweeps-out", "--out")
    (tmp_path / "folder").mkdir()
    refused(capsys, ["aggregate", evaluation, "--out", tmp_path / "folder"], tmp_path / "folder", "is a folder")
    refused(capsys, ["aggregate", tmp_path / "folder", "--out", tmp_path / "e.csv"], tmp_path / "folder")
    assert _digest(evaluation) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory) -> dict:
    import report_fixture

    return report_fixture.shared_inputs(tmp_path_factory, "no_sweeps")


def report(inputs: dict, out: Path, dataset: str = "digits", **replace) -> list:
    paths = {**inputs, **replace}
    return ["report", "--evaluations", paths["evaluations"], "--sweeps", paths["sweeps"], "--paper", paths["paper"],
            "--out-dir", out, "--dataset", dataset]


def test_inputs_that_are_folders_where_files_go(resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, evaluate(resnet_run.run_dir, digits_dir, tmp_path / "e.json"), resnet_run.run_dir, "is a folder")
    refused(capsys, finetune(resnet_run.run_dir, digits_dir, tmp_path / "run"), resnet_run.run_dir, "is a folder")
    refused(capsys, ["cost", "--config", tmp_path, "--images", "10", "--classes", "10"], tmp_path, "is a folder")
    refused(capsys, evaluate(resnet_run.checkpoint, resnet_run.checkpoint, tmp_path / "e.json"), resnet_run.checkpoint,
            "is a file")
    assert_no_run(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_output_that_is_an_input_or_a_file(report_inputs, tmp_path, capsys):
    shutil.copy(report_inputs["evaluations"], tmp_path / "SUMMARY.md")  # the evaluations, where SUMMARY.md goes
    before = _digest(tmp_path / "SUMMARY.md")
    refused(capsys, report(report_inputs, tmp_path, evaluations=tmp_path / "SUMMARY.md"), "SUMMARY.md", "input")
    assert _digest(tmp_path / "SUMMARY.md") == before
    (tmp_path / "notes").write_text("a file")
    refused(capsys, report(report_inputs, tmp_path / "notes"), tmp_path / "notes", "existing file")
    refused(capsys, report(report_inputs, tmp_path / "out", paper=tmp_path), tmp_path)
    assert not (tmp_path / "out").exists()


def test_report_of_a_dataset_the_evaluations_do_not_hold(report_inputs, tmp_path, capsys):
    before = _digest(report_inputs["evaluations"])
    refused(capsys, report(report_inputs, tmp_path / "out", dataset="mnist"), "--dataset", "'mnist'", "'digits'",
            report_inputs["evaluations"])
    assert not (tmp_path / "out").exists()
    assert _digest(report_inputs["evaluations"]) == before


def test_report_with_a_truncated_paper_table(report_inputs, tmp_path, capsys):
    text = report_inputs["paper"].read_bytes()
    for cut, name in ((text.rindex(b"\n", 0, len(text) - 1) + 40, "cut mid-line"), (len(text) // 2, "cut in half")):
        paper = tmp_path / f"paper-{cut}.csv"
        paper.write_bytes(text[:cut])
        refused(capsys, report(report_inputs, tmp_path / "out", paper=paper), paper)
        assert paper.read_bytes() == text[:cut], name
    assert not (tmp_path / "out").exists(), "no figure or table of a report that was refused"


def test_compare_against_a_reference_without_cells(report_inputs, tmp_path, capsys):
    from noisynn.report.compare import CELLS_COLUMNS

    empty = tmp_path / "cells.csv"
    empty.write_text(",".join(CELLS_COLUMNS) + "\n")
    refused(capsys, ["compare", empty, empty], empty, "no cells")
    assert empty.read_text() == ",".join(CELLS_COLUMNS) + "\n"


def test_prepare_and_import_outputs_that_are_inputs_or_files(resnet_run, digits_dir, image_folder, tmp_path, capsys):
    before = _digest(image_folder)
    refused(capsys, ["prepare", "--kind", "imagefolder", "--root", image_folder, "--out", image_folder / "train",
                     "--image-size", "8"], image_folder / "train", "input")
    assert _digest(image_folder) == before
    (tmp_path / "imported").write_text("a file")
    model = json.dumps({**RESNET_MODEL, "pretrained": str(resnet_run.checkpoint)})
    refused(capsys, ["import-weights", "--data", digits_dir, "--model", model, "--out", tmp_path / "imported"],
            tmp_path / "imported", "existing file")
    assert (tmp_path / "imported").read_text() == "a file"


def test_min_lr_above_lr(resnet_run, digits_dir, tmp_path, capsys):
    train = {**ONE_EPOCH, "lr": 1e-3, "min_lr": 1e-2}
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", train), "--train", "min_lr", "lr")
    assert_no_run(tmp_path / "run")
    cfg = tiny_config()
    cfg["finetune"]["min_lr"] = cfg["finetune"]["lr"] * 10
    config_refused(cfg, "finetune.min_lr", "above lr")


def test_site_the_model_lacks_without_a_noise(resnet_run, digits_dir, tmp_path, capsys):
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--site", "layer9.0"), "'layer9.0'")
    assert not (tmp_path / "e.json").exists()
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--site", "layer9.0"),
            "'layer9.0'")
    assert_no_run(tmp_path / "run")


def test_evaluate_a_noise_without_a_site_as_finetune_does(resnet_run, digits_dir, tmp_path, capsys):
    gaussian = '{"kind": "gaussian", "strength": 0.5}'
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--noise", gaussian), "--site",
            "image")
    settings = json.dumps([{"noise_params": {"kind": "gaussian", "strength": 0.5}}])
    refused(capsys, evaluate(resnet_run.checkpoint, digits_dir, tmp_path / "e.json", "--settings", settings), "--site")
    refused(capsys, finetune(resnet_run.checkpoint, digits_dir, tmp_path / "run", ONE_EPOCH, "--noise", gaussian),
            "site", "image")
    assert not (tmp_path / "e.json").exists()
    assert_no_run(tmp_path / "run")


def test_model_that_cannot_take_the_image_size(digits_dir, tmp_path, capsys):
    # timm builds it, but its 32 px patches do not fit 16 px images: a RuntimeError on the meta device too
    vit = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 32, "embed_dim": 32,
                                                           "depth": 1, "num_heads": 2}}
    refused(capsys, pretrain(vit, digits_dir, tmp_path / "run"), "cannot run", "image size")
    assert_no_run(tmp_path / "run")
    cfg = tiny_config()
    cfg["models"]["vit"]["kwargs"].update(patch_size=16)  # the tiny config's images are 8 px
    config_refused(cfg, "models.vit.kwargs", "cannot run")


def test_config_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "mine.yaml"
    broken.write_text("dataset:\n  name: digits\nseeds: [0, 1\nmodels: {}\n")
    line = refused(capsys, ["cost", "--config", broken, "--images", "10", "--classes", "10"], broken, "line 4")
    assert "YAML" in line
    assert broken.read_text().startswith("dataset:")


@pytest.mark.slow
def test_workflow_default_config_yaml_syntax_error_names_the_file(tmp_path):
    from workflow_helpers import copy_repo, snakemake

    repo = copy_repo(tmp_path / "repo")
    (repo / "config" / "config.yaml").write_text("dataset:\n  name: [digits\nseeds: [0]\n")
    proc = snakemake(repo, "--dry-run", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("noisynn: error:")]
    assert lines and "config/config.yaml" in lines[0] and "line" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_evaluation_names_its_predictions_file_and_a_missing_or_changed_one_is_refused(resnet_run, digits_dir,
                                                                                         tmp_path, capsys):
    """The record says which predictions file it wrote (and its hash): nothing is guessed from a
    sibling's name, and a file lost or replaced since is named instead of silently becoming no data."""
    out, predictions = tmp_path / "eval" / "evaluations.json", tmp_path / "eval" / "predictions.npz"
    assert main([str(a) for a in evaluate(resnet_run.checkpoint, digits_dir, out, "--predictions", predictions,
                                          "--protocols", "clean")]) == 0
    capsys.readouterr()
    record = json.loads(out.read_text())["predictions"]
    assert record == {"file": "predictions.npz", "sha256": _digest(predictions)[str(predictions)]}
    table = tmp_path / "e.csv"
    assert main(["aggregate", str(out), "--out", str(table)]) == 0
    import pandas as pd

    assert set(pd.read_csv(table)["predictions"]) == {str(predictions)}
    predictions.write_bytes(predictions.read_bytes() + b"\0")  # replaced since
    refused(capsys, ["aggregate", out, "--out", tmp_path / "e2.csv"], out, predictions, "sha256 differs")
    predictions.unlink()
    refused(capsys, ["aggregate", out, "--out", tmp_path / "e2.csv"], out, predictions, "does not exist")
    assert not (tmp_path / "e2.csv").exists()
    # an evaluation that wrote no predictions says so, and its rows have none
    assert main([str(a) for a in evaluate(resnet_run.checkpoint, digits_dir, out, "--protocols", "clean")]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["predictions"] is None
    assert main(["aggregate", str(out), "--out", str(table)]) == 0
