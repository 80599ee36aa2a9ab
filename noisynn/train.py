"""Pretraining from scratch and noise-injected fine-tuning, with timm's run-folder contract.

A run folder holds ``args.yaml``, a per-epoch ``summary.csv``, the final ``model.safetensors`` with
its sidecar ``model.json``, and, apart from those, ``recovery/`` with the resume state (written
after every epoch and on SIGTERM; ``resume.py``). Started again, a run resumes from ``recovery/``
and ends with the same weights, bit for bit on CPU, as a run that was never interrupted, with one
process or several under ``torchrun`` (``distributed.py``).

The seams are timm's: ``train()`` sets up and orchestrates, ``train_one_epoch()`` runs the
optimizer steps of one epoch, ``validate()`` measures the validation accuracy, and
``save_final()`` writes the checkpoint. The hyperparameters and their defaults are written once,
in the training section of ``workflow/schemas/config.schema.yaml``; ``TrainConfig.from_section``
validates a section against it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from noisynn import resume
from noisynn.data import load_dataset
from noisynn.distributed import Distributed
from noisynn.errors import UserError
from noisynn.inject.hook import inject, joined_batches
from noisynn.io.atomic import atomic_write_text, remove_stale_temp_files
from noisynn.io.guards import check_not_an_input, check_output_folder
from noisynn.io.locks import run_lock
from noisynn.io.provenance import provenance
from noisynn.models.build import build_model, check_model_config, meta_model
from noisynn.models.checkpoints import load_checkpoint, read_sidecar, save_checkpoint
from noisynn.models.checks import check_forward, check_model_fits_data, check_noises_act
from noisynn.models.transfer import adapt_to_data
from noisynn.models.weights import sidecar_path
from noisynn.noise import NoiseSpec
from noisynn.noise_batch import mixes_batch, noise_batch_problem
from noisynn.orders import forward_calls
from noisynn.pipeline.schema import training_defaults, validate_training_section
from noisynn.resume import identity_difference
from noisynn.schedule import learning_rate, training_problem
from noisynn.vocab import APPLY

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the scheduler sees a failure and retries; the retry resumes
_DEFAULTS = training_defaults()


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``args.yaml``.

    The hyperparameters' defaults come from the schema's training section (``_DEFAULTS``);
    ``epochs``, ``batch_size`` and ``lr`` have none there and must be given.
    """

    out_dir: str
    data_dir: str
    stage: str = "pretrain"  # pretrain | finetune
    model: dict = field(default_factory=dict)  # for pretrain: timm_name, kwargs, pretrained
    init_checkpoint: str | None = None  # for finetune
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float = _DEFAULTS["min_lr"]
    warmup_epochs: int = _DEFAULTS["warmup_epochs"]
    warmup_lr: float = _DEFAULTS["warmup_lr"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    label_smoothing: float = _DEFAULTS["label_smoothing"]
    eval_batch_size: int = _DEFAULTS["eval_batch_size"]
    noise_batch: int | None = _DEFAULTS["noise_batch"]  # k; None: batch_size (see forward_batch)
    num_workers: int = _DEFAULTS["num_workers"]
    seed: int = 0
    noise: dict = field(default_factory=lambda: {"kind": "none"})
    site: str | None = None
    apply: str = "train+eval"  # eval: the noise in validation only; train+eval: in training too
    monitor_test: bool = _DEFAULTS["monitor_test"]  # also score the test split after every epoch (record_epoch)
    amp: bool = True  # bf16 autocast, CUDA only

    @classmethod
    def from_section(cls, section: dict, source: str = "the training section", **run) -> "TrainConfig":
        """A config from a training section (the workflow config's pretrain/finetune) plus the run's own keys."""
        hyper = validate_training_section(section, source)
        problem = training_problem(hyper)
        if problem:
            raise UserError(f"{source}: key {problem[0]}: {problem[1]}.")
        hyper.pop("seed", None)  # the run's seed is its own key
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hyper.items() if k in known}, **run)

    def validate(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise UserError(f"stage must be pretrain or finetune; got {self.stage!r}.")
        for key in ("epochs", "batch_size", "lr"):
            if getattr(self, key) is None:
                raise UserError(f"training key {key} is required (the training section of the config, or --train).")
        if self.noise_batch is not None and (isinstance(self.noise_batch, bool) or int(self.noise_batch) < 1):
            raise UserError(f"noise_batch must be a positive integer or null; got {self.noise_batch!r}.")
        for key in ("batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"{key} must be a positive integer; got {getattr(self, key)}.")
        if int(self.epochs) < 1:
            raise UserError(f"epochs must be a positive integer; got {self.epochs}.")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0; got {self.lr}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0 (it seeds numpy's and torch's generators); got {self.seed!r}.")
        problem = training_problem({k: getattr(self, k) for k in training_defaults() if hasattr(self, k)}
                                   | {"epochs": self.epochs, "lr": self.lr})
        if problem:
            raise UserError(f"training key {problem[0]}: {problem[1]}.")
        if self.stage == "pretrain":
            check_model_config(self.model, "--model")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must lie in [0, 1); got {self.label_smoothing}.")
        if self.stage == "finetune" and not self.init_checkpoint:
            raise UserError("finetune needs init_checkpoint (the pretrained checkpoint to start from).")
        if self.apply not in APPLY:
            raise UserError(f"apply must be one of {', '.join(APPLY)}; got {self.apply!r}.")
        spec = NoiseSpec.from_dict(self.noise)
        if spec.kind != "none" and not self.site:
            raise UserError(f"noise kind {spec.kind} needs a site (e.g. blocks.3.attn or layer4.1, or image for the "
                            "input images).")


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Linear warm-up from ``warmup_lr``, then cosine to ``min_lr`` (``schedule.learning_rate``)."""
    return learning_rate(epoch, cfg.epochs, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.warmup_lr)


def forward_batch(cfg: TrainConfig, world: int) -> int:
    """k: the samples of each training forward pass, which a batch-axis noise mixes.

    Each of ``world`` processes takes ``batch_size / world`` samples of every global batch; it runs
    them in passes of ``noise_batch`` (accumulating the gradients) when declared, else at once. A
    noise that mixes the batch must get the k the config declares (by default ``batch_size``),
    whatever the number of processes: a run where it would not is refused
    (``noise_batch.noise_batch_problem``).
    """
    mixing = cfg.apply == "train+eval" and NoiseSpec.from_dict(cfg.noise).kind != "none" and mixes_batch(cfg.noise)
    if mixing or cfg.noise_batch:
        problem = noise_batch_problem(cfg.batch_size, cfg.noise_batch, world)
        if problem:
            raise UserError(f"{cfg.stage} of {cfg.out_dir}: key noise_batch (the training section, or --train): {problem}.")
        return cfg.noise_batch or cfg.batch_size
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {world} processes; "
                        f"use a multiple of {world}.")
    return cfg.batch_size // world


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled training batches: a function of (seed, epoch) alone, so resuming needs no RNG state."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class StopFlag:
    """Set by SIGTERM (a scheduler's time limit or scancel); checked after every optimizer step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class Interrupted(Exception):
    """Raised by ``train_one_epoch`` after the resume state of an interrupted epoch is saved."""


@torch.no_grad()
def correct_per_image(model, split, batches: list[np.ndarray], device, num_workers: int = 0,
                      amp: bool = False) -> np.ndarray:
    """Whether each image of a split is classified correctly when cut into ``batches`` (what a noise
    on the batch axis mixes; images in no batch count as wrong); up to 256 images share a forward
    call, each batch noised alone (``inject.hook.joined_batches``); ``amp``: under bf16 autocast."""
    model.eval()
    hits = np.zeros(len(split), dtype=bool)
    calls = forward_calls(batches, 256)
    for call, (x, y) in zip(calls, split.batches([np.concatenate(c) for c in calls], num_workers)):
        with joined_batches(model, [len(b) for b in call]), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(device, non_blocking=True))
        hits[np.concatenate(call)] = (logits.argmax(-1).cpu() == y).numpy()
    return hits


@torch.no_grad()
def validate(model, split, batch_size: int, device, order_seed: int | None = None, num_workers: int = 0,
             dist: Distributed | None = None, amp: bool = False) -> float:
    """Top-1 accuracy on a split (sequential order, or shuffled from ``order_seed``), in batches of
    ``batch_size``. Under torchrun each process takes whole batches (``dist.shard``) and the counts
    are summed, as timm's validation reduces its metrics; ``amp``: under bf16 autocast, as the
    training's forward passes."""
    n = len(split)
    idx = np.arange(n) if order_seed is None else np.random.default_rng(order_seed).permutation(n)
    batches = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    if dist is not None:
        batches = dist.shard(batches)
    correct = int(correct_per_image(model, split, batches, device, num_workers, amp).sum())
    if dist is not None:
        correct = int(dist.sum([correct], device)[0])
    return correct / max(1, n)


def record_epoch(folder: Path, epoch: int, model, data, batch_size: int, device, num_workers: int) -> None:
    """For measuring model selection on the test set (``noisynn selection``): after an epoch, each
    val and test image's correctness, both splits read class-sorted in batches of ``batch_size`` (the
    released protocol's order; a test list sorted by class in its own order), the noise as in validation."""
    from noisynn.io.atomic import atomic_path
    from noisynn.orders import batches_in_order

    arrays = {}
    for name, split in (("val", data.val), ("test", data.test)):
        batches = batches_in_order(np.asarray(split.labels), "class_sorted", batch_size)
        arrays[f"{name}_correct"] = correct_per_image(model, split, batches, device, num_workers)
        batch_of = np.empty(len(split), dtype=np.int64)
        for j, b in enumerate(batches):
            batch_of[b] = j
        arrays[f"{name}_batch"] = batch_of
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"epoch_{epoch + 1:04d}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _summary_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@dataclass
class _Run:
    """What the epoch loop needs besides the config: built once by ``train()``."""

    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: object
    handle: object
    recovery: Path
    identity: dict
    stop: StopFlag
    stop_after_steps: int | None
    noise_batch: int  # k: the samples of each forward pass (forward_batch)
    steps_done: int = 0


def train_one_epoch(run: _Run, epoch: int, first_step: int, partial: dict, rows: list[dict]) -> tuple[float, int, int]:
    """The optimizer steps of one epoch from ``first_step``; returns this rank's (loss sum, correct, seen).

    On SIGTERM (or after ``stop_after_steps``) every rank saves its state and ``Interrupted`` is raised.
    """
    from tqdm import tqdm

    cfg, dist, device = run.cfg, run.dist, run.device
    batches = epoch_batches(len(run.data.train), cfg.batch_size, cfg.seed, epoch)
    if dist.enabled:
        # equal shards: the incomplete last batch is dropped, as DistributedSampler(drop_last) does
        batches = [b[dist.rank :: dist.world] for b in batches if len(b) == cfg.batch_size]
    run.train_model.train()
    loss_sum, correct, seen = partial.get("loss_sum", 0.0), int(partial.get("correct", 0)), int(partial.get("seen", 0))
    use_amp = cfg.amp and device.type == "cuda"
    bar = tqdm(run.data.train.batches(batches[first_step:], cfg.num_workers, seed=cfg.seed * 10_007 + epoch),
               total=len(batches) - first_step, desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}",
               disable=not dist.is_main, leave=False, mininterval=2)
    for step, (x, y) in enumerate(bar, start=first_step):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        # passes of k samples (the last batch of an epoch may be shorter); their gradients add up to
        # the gradient of the process's share, synchronised across processes on the last pass only
        parts = list(zip(x.split(run.noise_batch), y.split(run.noise_batch)))
        for j, (xp, yp) in enumerate(parts):
            last = j == len(parts) - 1
            with run.train_model.no_sync() if dist.enabled and not last else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = run.train_model(xp)
                    loss = F.cross_entropy(logits.float(), yp, label_smoothing=cfg.label_smoothing)
                value = float(loss.detach())
                if not math.isfinite(value):
                    # every later step would be NaN too; the last epoch's resume state is kept
                    raise UserError(f"{cfg.stage} of {cfg.out_dir}: the training loss is {value} at epoch {epoch + 1} "
                                    f"step {step + 1} (lr {run.optimizer.param_groups[0]['lr']:g}); the weights "
                                    "diverged: lower lr, or check the data and the noise.")
                (loss if len(parts) == 1 else loss * (len(yp) / len(y))).backward()
            loss_sum += value * len(yp)
            correct += int((logits.argmax(-1) == yp).sum())
            seen += len(yp)
        run.optimizer.step()
        run.steps_done += 1
        interrupted = run.stop.raised or (run.stop_after_steps is not None and run.steps_done >= run.stop_after_steps)
        if dist.any_flag(interrupted, device):
            rng = run.handle.get_rng_state() if run.handle else None
            resume.save(run.recovery, dist, run.model, run.optimizer, rng,
                        {"epoch": epoch, "step": step + 1, "rows": rows, "run": run.identity},
                        {"loss_sum": loss_sum, "correct": correct, "seen": seen})
            if dist.is_main:
                print(f"noisynn: interrupted; resume state saved at epoch {epoch} step {step + 1}", flush=True)
            raise Interrupted
    return loss_sum, correct, seen


def save_final(run: _Run, model_cfg: dict, rows: list[dict], transfer: dict | None = None) -> dict:
    """Write the checkpoint and its sidecar (rank 0), and drop the finished run's resume state."""
    cfg, dist, data = run.cfg, run.dist, run.data
    result = {"final": rows[-1] if rows else {}, "epochs": len(rows)}
    if dist.is_main:
        if run.handle is not None:
            run.handle.remove()
        meta = {
            "stage": cfg.stage,
            "model": {k: v for k, v in model_cfg.items() if k != "pretrained"} | {"pretrained": model_cfg.get("pretrained")},
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "image_size": data.image_size,
            "data_fingerprint": data.fingerprint,
            "init_checkpoint": cfg.init_checkpoint,
            "train_args": asdict(cfg),
            "world_size": dist.world,
            # k: the samples of each training forward pass, which a batch-axis noise mixed
            "noise_batch": run.noise_batch,
            "final": result["final"],
            "transfer": transfer,
            "run_identity": run.identity,  # a rerun with the same identity has nothing to do
            **provenance(cfg.seed),
        }
        diverged = [k for k, v in run.model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if diverged:
            raise UserError(f"{cfg.stage} of {cfg.out_dir} ended with non-finite weights (tensor {diverged[0]}); "
                            "nothing was saved: lower lr, or check the data and the noise.")
        save_checkpoint(run.model, Path(cfg.out_dir) / "model.safetensors", meta)
        # the run is finished: its resume state must not be taken up by a later run of this folder
        shutil.rmtree(run.recovery, ignore_errors=True)
    return result


def finished_run(out: Path, identity: dict, stage: str) -> dict | None:
    """The sidecar of the finished run in ``out`` if it is this very training (same settings, data
    and starting weights); None if ``out`` holds no finished run. A finished run of another training
    is a UserError naming what differs: its checkpoint would be lost (``--overwrite`` replaces it).

    A workflow's rerun is not refused: Snakemake deletes a job's outputs (the checkpoint and its
    sidecar) before it runs the job again, so the folder then holds no finished run.
    """
    weights = out / "model.safetensors"
    if not weights.exists() and not sidecar_path(weights).exists():
        return None
    try:
        saved = read_sidecar(weights).get("run_identity")
        why = identity_difference(saved, identity) if saved else "its sidecar does not record the run's settings"
    except UserError:
        saved, why = None, "its checkpoint or sidecar is incomplete"
    if saved is not None and why is None:
        return read_sidecar(weights)
    raise UserError(f"{stage} --out {out} holds a finished run of another training ({why}); choose another folder, "
                    "or pass --overwrite to replace it.")


def train(cfg: TrainConfig, stop_after_steps: int | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) one training; returns the final metrics. Raises SystemExit(143) on SIGTERM.

    A folder that holds this very training's finished run is left as it is (a rerun has nothing to
    do); one that holds another training's is refused unless ``overwrite`` (``finished_run``).
    ``stop_after_steps`` behaves as if SIGTERM arrived after that many optimizer steps (for tests).
    """
    cfg.validate()
    out = Path(cfg.out_dir)
    # the output is checked before anything is read or computed
    check_output_folder(out, f"{cfg.stage} --out")
    inputs = {"the dataset folder (--data)": Path(cfg.data_dir)}
    if cfg.init_checkpoint:
        inputs["the folder of the starting checkpoint (--init)"] = Path(cfg.init_checkpoint).parent
    check_not_an_input(out, f"{cfg.stage} --out", inputs)
    k = forward_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group is formed
    dist = Distributed()
    device = dist.device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)

    if cfg.stage == "finetune":
        model, init_meta = load_checkpoint(Path(cfg.init_checkpoint))
        model_cfg = init_meta["model"]
    else:
        model_cfg = cfg.model
    data = load_dataset(Path(cfg.data_dir), model_cfg)
    transfer = None
    if cfg.stage == "pretrain":
        model = build_model(model_cfg, data.num_classes, data.in_chans)
    elif init_meta.get("data_fingerprint") != data.fingerprint and init_meta.get("stage") != "imported":
        # transfer: a model pretrained on another dataset gets a new classifier and this dataset's input
        model, model_cfg, adapted = adapt_to_data(model, init_meta, data.num_classes, data.in_chans, data.image_size)
        transfer = {"pretrain_data_fingerprint": init_meta.get("data_fingerprint"), "adapted": adapted}
        if dist.is_main:
            print(f"noisynn: transfer from data {str(init_meta.get('data_fingerprint'))[:12]} to {data.fingerprint[:12]}: "
                  f"{'; '.join(adapted)}", flush=True)
    identity = resume.run_identity(asdict(cfg), cfg.init_checkpoint, data.fingerprint, dist.world)
    done = None if overwrite else finished_run(out, identity, cfg.stage)
    if done is not None:
        if dist.is_main:
            print(f"noisynn: {out} already holds this training's finished run; nothing to do", flush=True)
        dist.close()
        return {"final": done.get("final", {}), "epochs": cfg.epochs}
    what = f"checkpoint {cfg.init_checkpoint}" if cfg.stage == "finetune" else f"model {model_cfg.get('timm_name')}"
    check_model_fits_data(model, what, cfg.data_dir, data.num_classes, data.in_chans, data.image_size)
    spec = NoiseSpec.from_dict(cfg.noise)
    # a model that cannot run, a site it lacks, or a noise the site makes the identity: before any step
    dry = meta_model(model_cfg, data.num_classes, data.in_chans)
    check_forward(dry, (min(cfg.batch_size, 2), data.in_chans, data.image_size, data.image_size), what)
    if cfg.site:  # named without a noise too: a site the model lacks is a mistake either way
        from noisynn.inject.sites import check_site

        check_site(model, cfg.site)
    if spec.kind != "none":
        for batch in sorted({k, cfg.eval_batch_size}):
            check_noises_act(dry, cfg.site, [spec], (batch, data.in_chans, data.image_size, data.image_size),
                             f"{cfg.stage} of {out}: {what} at site {cfg.site}")
    model.to(device)

    with run_lock(out, f"{cfg.stage} --out") if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            remove_stale_temp_files(out)
            remove_stale_temp_files(out / "recovery")
            if overwrite:  # the replaced run must not look finished while this one trains
                for path in (out / "model.safetensors", out / "model.json"):
                    path.unlink(missing_ok=True)
        result = _train_locked(cfg, dist, device, model, model_cfg, data, spec, transfer, out, identity,
                               stop_after_steps, k)
    return result


def prepare_model(model, cfg: TrainConfig, spec: NoiseSpec, dist: Distributed, device: torch.device,
                  sync_batchnorm: bool | None = None):
    """(the model, what the optimizer steps run: the model or its DDP wrapper, the noise's handle).

    Under torchrun on GPUs (``sync_batchnorm`` None) every BatchNorm becomes a SyncBatchNorm, one set
    of statistics over the global batch. The conversion replaces those modules, so the noise is
    hooked in afterwards: a hook on a BatchNorm (a site such as ``layer4.2.bn1``) would stay on the
    replaced module and never fire.
    """
    if (dist.enabled and device.type == "cuda") if sync_batchnorm is None else sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    handle = None
    if spec.kind != "none":
        handle = inject(model, cfg.site, spec, at_train=cfg.apply == "train+eval", at_eval=True, seed=cfg.seed + dist.rank)
    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    return model, train_model, handle


def _train_locked(cfg, dist, device, model, model_cfg, data, spec, transfer, out: Path, identity: dict,
                  stop_after_steps, k: int) -> dict:
    """The part of ``train`` that writes the run folder (rank 0 holds its lock meanwhile)."""
    model, train_model, handle = prepare_model(model, cfg, spec, dist, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    run = _Run(cfg, dist, device, model, train_model, optimizer, data, handle, out / "recovery", identity, StopFlag(),
               stop_after_steps, k)
    resume.discard_foreign(run.recovery, identity, dist.is_main)
    dist.barrier()
    rows: list[dict] = []
    start_epoch, start_step, partial = 0, 0, {}
    resumed = resume.load(run.recovery, dist, device, model, optimizer)
    if resumed is not None:
        meta, noise_rng, partial = resumed
        start_epoch, start_step, rows = meta["epoch"], meta["step"], meta["rows"]
        if handle is not None:
            handle.set_rng_state(noise_rng, device)
        if dist.is_main:
            print(f"noisynn: resuming {out} at epoch {start_epoch} step {start_step}", flush=True)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "args.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))

    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            first = start_step if epoch == start_epoch else 0
            sums = train_one_epoch(run, epoch, first, partial if epoch == start_epoch else {}, rows)
            loss_sum, correct, seen = dist.sum(list(sums), device)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(1, seen), "train_top1": correct / max(1, seen),
                   "val_top1_clean": None, "val_top1_noisy": None, "epoch_seconds": round(time.time() - t0, 3)}
            if handle is not None:
                handle.enabled = False
            use_amp = cfg.amp and device.type == "cuda"
            row["val_top1_clean"] = validate(model, data.val, 256, device, num_workers=cfg.num_workers, dist=dist,
                                             amp=use_amp)
            if handle is not None:
                handle.enabled = True
                row["val_top1_noisy"] = validate(model, data.val, cfg.eval_batch_size, device, order_seed=cfg.seed,
                                                 num_workers=cfg.num_workers, dist=dist, amp=use_amp)
            if cfg.monitor_test and dist.is_main:
                record_epoch(out / "selection", epoch, model, data, cfg.eval_batch_size, device, cfg.num_workers)
            rows.append(row)
            if dist.is_main:
                print(f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                      f"train {row['train_top1']:.4f} val {row['val_top1_clean']:.4f}", flush=True)
                atomic_write_text(out / "summary.csv", _summary_csv(rows))
            rng = handle.get_rng_state() if handle else None
            resume.save(run.recovery, dist, model, optimizer, rng, {"epoch": epoch + 1, "step": 0, "rows": rows,
                                                                   "run": identity}, None)
    except Interrupted:
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        run.stop.restore()
    result = save_final(run, model_cfg, rows, transfer)
    if dist.is_main:
        remove_stale_temp_files(out)
    dist.barrier()
    dist.close()
    return result
