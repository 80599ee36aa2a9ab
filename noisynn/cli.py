"""The ``noisynn`` command line: prepare, pretrain, finetune, evaluate, entropy, and the report steps.

User mistakes exit with status 2 and one sentence on stderr; an interrupted training exits 143
after saving its resume state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from noisynn.errors import UserError
from noisynn.evaluate import PROTOCOLS


def _json_arg(what: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{what} must be JSON ({e.msg}); got {text!r}")
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{what} must be a JSON object; got {text!r}")
        return value

    return parse


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
        p.add_argument("--noise-at", default="train,eval",
                       help="when the noise applies: 'eval', 'train' or 'train,eval' (default)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--eval-batch-size", type=int, default=10, help="batch size of the noisy validation pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")


class _Parser(argparse.ArgumentParser):
    """argparse with user errors as one line (the usage block is for --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="noisynn", description="NoisyNN noise injection, training and evaluation protocols.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="materialize a dataset split and its manifest")
    p.add_argument("--kind", choices=["digits", "imagefolder"], default="digits")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="split seed (digits)")
    p.add_argument("--root", type=Path, help="ImageFolder root holding the train and val folders")
    p.add_argument("--train-dir", default="train")
    p.add_argument("--val-dir", default="val")
    p.add_argument("--name", default="imagefolder")
    p.add_argument("--hash-mode", choices=["fast", "full"], default="fast")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error")
    p.add_argument("--no-verify-images", action="store_true", help="skip opening every image (much faster)")

    _add_train_args(sub.add_parser("pretrain", help="train a model from scratch"), "pretrain")
    _add_train_args(sub.add_parser("finetune", help="fine-tune a checkpoint with a noise injected"), "finetune")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint under every protocol")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="evaluation JSON")
    p.add_argument("--predictions", type=Path, help="optional .npz of each protocol's predictions")
    p.add_argument("--noise", type=_json_arg("--noise"), default={"kind": "none"})
    p.add_argument("--site", default=None)
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of " + ",".join(PROTOCOLS))
    p.add_argument("--test-batch-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--no-prefix-cache", action="store_true", help="run the full network for every protocol")
    p.add_argument("--num-workers", type=int, default=0)

    p = sub.add_parser("entropy", help="print the theory's ΔS against k and alpha")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 10, 16, 32, 64])
    p.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--format", choices=["table", "csv"], default="table")

    p = sub.add_parser("sites", help="list the injection sites of a timm model")
    p.add_argument("--model", required=True, type=_json_arg("--model"))

    p = sub.add_parser("aggregate", help="gather evaluation JSONs into one tidy CSV")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("evaluations", nargs="+", type=Path)

    p = sub.add_parser("figures", help="tables and figures from the tidy CSV")
    p.add_argument("--evaluations", required=True, type=Path)
    p.add_argument("--paper", required=True, type=Path, help="config/paper_results.csv")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--dataset", required=True)
    return parser


def _train(args, stage: str) -> int:
    from noisynn.train import EXIT_INTERRUPTED, TrainConfig, train

    when = {"eval": (False, True), "train": (True, False), "train,eval": (True, True), "eval,train": (True, True)}
    noise_at = getattr(args, "noise_at", "train,eval")
    if noise_at not in when:
        raise UserError(f"--noise-at must be eval, train or train,eval; got {noise_at!r}.")
    at_train, at_eval = when[noise_at]
    cfg = TrainConfig(
        out_dir=str(args.out),
        data_dir=str(args.data),
        stage=stage,
        model=getattr(args, "model", {}) or {},
        init_checkpoint=str(args.init) if stage == "finetune" else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        noise=getattr(args, "noise", {"kind": "none"}),
        site=getattr(args, "site", None),
        apply_noise_at_train=at_train,
        apply_noise_at_eval=at_eval,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        amp=not args.no_amp,
    )
    try:
        train(cfg)
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:  # resume state saved; the rerun continues from it
            return EXIT_INTERRUPTED
        raise
    return 0


def _evaluate(args) -> int:
    import numpy as np

    from noisynn.evaluate import evaluate_checkpoint
    from noisynn.io import atomic_path, atomic_write_json

    result = evaluate_checkpoint(
        args.checkpoint, args.data, args.noise, args.site,
        protocols=tuple(p for p in args.protocols.split(",") if p),
        test_batch_size=args.test_batch_size, seed=args.seed, split=args.split,
        use_prefix_cache=not args.no_prefix_cache, num_workers=args.num_workers,
    )
    predictions = result.pop("predictions")
    if args.predictions:
        with atomic_path(args.predictions) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **predictions)
    atomic_write_json(args.out, result)
    for name, r in result["protocols"].items():
        print(f"{name:12s} top1 {r['top1']:.4f}  top5 {r['top5']:.4f}  released-metric {r['released_metric_top1']:.4f}")
    return 0


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
    from noisynn.inject import valid_sites
    from noisynn.models import build_model

    kwargs = args.model.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"--model kwargs must be a JSON object; got {kwargs!r}.")
    model = build_model({**args.model, "kwargs": kwargs, "pretrained": None}, kwargs.get("num_classes", 10), kwargs.get("in_chans", 3))
    print("\n".join(valid_sites(model)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("SLURM_JOB_ID") and args.command in ("pretrain", "finetune", "evaluate"):
        # the job's log then names the scheduler job that ran it
        print(f"noisynn: {args.command} running as SLURM job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}", flush=True)
    try:
        if args.command == "prepare":
            from noisynn import data

            if args.kind == "digits":
                m = data.prepare_digits(args.out, args.image_size, args.seed)
            else:
                if args.root is None:
                    raise UserError("prepare --kind imagefolder needs --root (the folder holding train/ and val/).")
                m = data.prepare_image_folder(args.out, args.root, args.train_dir, args.val_dir, args.image_size,
                                              args.hash_mode, args.on_bad_image, not args.no_verify_images, args.name)
            print(f"prepared {m['dataset']}: {m['counts']} fingerprint {m['fingerprint'][:12]}")
            return 0
        if args.command in ("pretrain", "finetune"):
            return _train(args, args.command)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "entropy":
            return _entropy(args)
        if args.command == "sites":
            return _sites(args)
        if args.command == "aggregate":
            from noisynn.report import aggregate

            aggregate(args.evaluations, args.out)
            return 0
        if args.command == "figures":
            from noisynn.figures import make_figures

            make_figures(args.evaluations, args.paper, args.out_dir, args.dataset)
            return 0
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its sentence
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"noisynn: error: {message}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets known commands through


if __name__ == "__main__":
    sys.exit(main())
