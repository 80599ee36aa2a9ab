"""Tests of noisynn/cli.py, run as a user runs it: ``noisynn …`` with its arguments, exit status and
streams (in this process, through ``noisynn.cli.main``, so that each test does not pay for a fresh
Python importing torch and timm; ``test_the_installed_command_runs_as_a_subprocess`` checks that the
real ``python -m noisynn`` behaves the same).

What a user relies on: a mistake of theirs (a missing dataset, a malformed or unknown noise, a
site the model lacks, a missing or foreign checkpoint, an out-of-range alpha, a bad --apply)
ends with exit status 2 and one sentence on stderr naming the file or key, never a traceback;
``--help`` works for every subcommand; ``entropy`` prints the theory's optimal-Q value
(k-1)·log(k+1); and ``evaluate`` writes one JSON with every protocol.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env

from noisynn.cli import build_parser, main

OPTIMAL_BATCH = json.dumps({"kind": "linear-optimal", "axis": "batch"})


def noisynn(*args) -> subprocess.CompletedProcess:
    """``noisynn args`` in this process: its exit status, stdout and stderr (argparse's exits included)."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def noisynn_subprocess(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noisynn", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, and one line on stderr that names each of ``names``; returns the line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def assert_usage_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """An argparse error: exit 2, no traceback, usage lines, then one error line naming ``names``."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last
    for name in names:
        assert name in last, f"{name!r} not named in: {last}"
    return last


def _evaluate_args(checkpoint, data, out, **options):
    args = ["evaluate", "--checkpoint", checkpoint, "--data", data, "--out", out]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


# --- user errors -------------------------------------------------------------------------------


def test_missing_dataset_folder(vit_run, tmp_path):
    missing = tmp_path / "no-such-dataset"
    result = noisynn(*_evaluate_args(vit_run.checkpoint, missing, tmp_path / "e.json"))
    assert_user_error(result, str(missing))
    assert not (tmp_path / "e.json").exists()


ONE_EPOCH = json.dumps({"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0})


def test_dataset_folder_without_manifest(vit_run, tmp_path):
    (tmp_path / "data").mkdir()
    result = noisynn(*_evaluate_args(vit_run.checkpoint, tmp_path / "data", tmp_path / "e.json"))
    assert_user_error(result, str(tmp_path / "data" / "manifest.json"))


def test_pretrain_on_missing_dataset(tmp_path):
    result = noisynn("pretrain", "--data", tmp_path / "nothing", "--out", tmp_path / "run", "--train", ONE_EPOCH,
                     "--model", json.dumps({"timm_name": "resnet18"}))
    assert_user_error(result, str(tmp_path / "nothing"))


def test_noise_that_is_not_json(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json", noise="{kind: gaussian"))
    assert_usage_error(result, "--noise", "JSON")


def test_noise_that_is_not_a_json_object(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json", noise='["gaussian"]'))
    assert_usage_error(result, "--noise", "object")


def test_unknown_noise_kind(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json", noise='{"kind": "blur"}',
                                     site=vit_run.last_site))
    assert_user_error(result, "kind", "'blur'", "linear-optimal")


def test_unknown_noise_key(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json",
                                     noise='{"kind": "gaussian", "sigma": 0.1}', site=vit_run.last_site))
    assert_user_error(result, "sigma", "std")


def test_unknown_site_lists_the_valid_ones(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json", noise=OPTIMAL_BATCH,
                                     site="blocks.12.attn"))
    line = assert_user_error(result, "'blocks.12.attn'")
    for site in ("image", "blocks.0", "blocks.3.attn"):
        assert site in line


def test_missing_checkpoint(digits_dir, tmp_path):
    missing = tmp_path / "run" / "model.safetensors"
    result = noisynn(*_evaluate_args(missing, digits_dir, tmp_path / "e.json"))
    assert_user_error(result, str(missing))


def test_checkpoint_that_is_not_safetensors(vit_run, digits_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    shutil.copy(vit_run.checkpoint.with_suffix(".json"), weights.with_suffix(".json"))
    result = noisynn(*_evaluate_args(weights, digits_dir, tmp_path / "e.json"))
    assert_user_error(result, str(weights))


def test_checkpoint_without_sidecar(vit_run, digits_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copy(vit_run.checkpoint, weights)
    result = noisynn(*_evaluate_args(weights, digits_dir, tmp_path / "e.json"))
    assert_user_error(result, str(weights), "model.json")


def test_finetune_from_a_checkpoint_without_sidecar(vit_run, digits_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copy(vit_run.checkpoint, weights)
    result = noisynn("finetune", "--data", digits_dir, "--init", weights, "--out", tmp_path / "run", "--train", ONE_EPOCH)
    assert_user_error(result, str(weights), "model.json")


def test_alpha_out_of_range(vit_run, digits_dir, tmp_path):
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, tmp_path / "e.json",
                                     noise='{"kind": "linear-shift", "alpha": 1.5}', site=vit_run.last_site))
    assert_user_error(result, "alpha", "1.5")


def test_bad_apply(resnet_run, digits_dir, tmp_path):
    result = noisynn("finetune", "--data", digits_dir, "--init", resnet_run.checkpoint, "--out", tmp_path / "run",
                     "--train", ONE_EPOCH, "--noise", OPTIMAL_BATCH, "--site", resnet_run.last_site, "--apply", "test")
    assert_usage_error(result, "--apply", "'test'")
    assert not (tmp_path / "run").exists()


def test_bad_training_key(resnet_run, digits_dir, tmp_path):
    result = noisynn("finetune", "--data", digits_dir, "--init", resnet_run.checkpoint, "--out", tmp_path / "run",
                     "--train", '{"epochs": 1, "batch_size": 32, "lr": 0.001, "epoch": 3}')
    assert_user_error(result, "--train", "'epoch'")
    assert not (tmp_path / "run").exists()


def test_digits_image_size_not_offered(tmp_path):
    result = noisynn("prepare", "--out", tmp_path / "d", "--image-size", 12)
    assert_user_error(result, "image_size", "12")


def test_imagefolder_without_root(tmp_path):
    result = noisynn("prepare", "--kind", "imagefolder", "--out", tmp_path / "d")
    assert_user_error(result, "--root")


def test_imagefolder_with_a_corrupt_image(image_folder, tmp_path):
    bad = image_folder / "train" / "dog" / "x.png"
    bad.write_bytes(b"not a png")
    result = noisynn("prepare", "--kind", "imagefolder", "--root", image_folder, "--out", tmp_path / "d", "--image-size", 8)
    assert_user_error(result, str(bad))


# --- what works ------------------------------------------------------------------------------


def _subcommands() -> list[str]:
    parser = build_parser()
    return sorted(next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices)


@pytest.mark.parametrize("command", _subcommands())
def test_help_of_every_subcommand(command):
    result = noisynn(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: noisynn {command}")
    assert not result.stderr


def test_entropy_prints_the_optimal_q_value():
    result = noisynn("entropy", "--k", 3, 10, "--alpha", 0.3)
    assert result.returncode == 0, result.stderr
    for k in (3, 10):
        rows = [line.split() for line in result.stdout.splitlines() if line.split()[:2] == [str(k), "optimal"]]
        assert len(rows) == 1, result.stdout
        closed_form, slogdet = map(float, rows[0][-2:])
        assert closed_form == pytest.approx((k - 1) * math.log(k + 1), abs=1e-4)  # 3: 2·log 4 = 2.7726
        assert slogdet == pytest.approx((k - 1) * math.log(k + 1), abs=1e-4)


def test_entropy_csv_has_the_optimal_q_value():
    result = noisynn("entropy", "--k", 6, "--alpha", 0.3, "--format", "csv")
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split(",") for line in result.stdout.strip().splitlines()]
    optimal = [dict(zip(header, r)) for r in rows if r[1] == "optimal"]
    assert len(optimal) == 1
    assert float(optimal[0]["delta_S_closed_form"]) == pytest.approx(5 * math.log(7), rel=1e-5)


def test_prepare_prints_the_manifest_fingerprint(tmp_path):
    result = noisynn("prepare", "--out", tmp_path / "d", "--image-size", 8)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["fingerprint"][:12] in result.stdout


def test_sites_lists_the_injection_sites():
    model = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                                             "num_heads": 2, "in_chans": 1}}
    result = noisynn("sites", "--model", json.dumps(model))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["image", "blocks.0", "blocks.0.attn", "blocks.1", "blocks.1.attn"]


def test_evaluate_writes_every_protocol(vit_run, digits_dir, tmp_path):
    out, predictions = tmp_path / "eval" / "e.json", tmp_path / "eval" / "p.npz"
    result = noisynn(*_evaluate_args(vit_run.checkpoint, digits_dir, out, noise=OPTIMAL_BATCH, site=vit_run.last_site,
                                     predictions=predictions))
    assert result.returncode == 0, result.stderr
    group = json.loads(out.read_text())
    evaluation = group["evaluations"][0]
    protocols = ("clean", "released", "shuffled", "batch1", "class_pure", "class_mixed")
    assert set(evaluation["protocols"]) == set(protocols)
    for name in protocols:
        r = evaluation["protocols"][name]
        assert 0 <= r["top1"] <= r["top5"] <= 1
    assert 0 <= evaluation["protocols"]["released"]["released_metric_top1"] <= 1
    assert group["site"] == vit_run.last_site and evaluation["setting"]["site"] == vit_run.last_site
    assert evaluation["noise"]["kind"] == "linear-optimal"
    assert "predictions" not in evaluation
    key = f"linear-optimal|eval|{vit_run.last_site}"
    with np.load(predictions) as z:
        assert sorted(z.files) == sorted(["labels"] + [f"{key}/{p}/{a}" for p in protocols for a in ("pred", "batch")])
        assert all(len(z[f"{key}/{name}/pred"]) == evaluation["protocols"][name]["n"] for name in protocols)
        assert evaluation["protocols"]["clean"]["top1"] == pytest.approx(
            float(np.mean(z[f"{key}/clean/pred"] == _test_labels(digits_dir))), abs=1e-12)
    assert sorted(p.name for p in out.parent.iterdir()) == ["e.json", "p.npz"]  # no temp file left beside them


def _test_labels(digits_dir: Path) -> np.ndarray:
    with np.load(digits_dir / "digits.npz") as z:
        return z["labels"][z["test"]]


def test_the_installed_command_runs_as_a_subprocess(vit_run, tmp_path):
    """The real `python -m noisynn`: a user mistake is exit 2 and one line; --help and a verb work."""
    mistake = noisynn_subprocess("evaluate", "--checkpoint", tmp_path / "none.safetensors", "--data", tmp_path,
                                 "--out", tmp_path / "e.json")
    assert_user_error(mistake, str(tmp_path / "none.safetensors"))
    assert noisynn_subprocess("--help").returncode == 0
    entropy = noisynn_subprocess("entropy", "--k", "10", "--alpha", "0.3", "--format", "csv")
    assert entropy.returncode == 0 and entropy.stdout.startswith("k,Q,alpha")
