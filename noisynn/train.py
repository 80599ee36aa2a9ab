"""Pretraining from scratch and noise-injected fine-tuning, with timm's run-folder contract.

A run folder holds ``args.yaml``, a per-epoch ``summary.csv``, the final ``model.safetensors`` with
its sidecar ``model.json``, and, apart from those, ``recovery/`` with the resume state (written
after every epoch and on SIGTERM). Started again, a run resumes from ``recovery/`` and ends with
the same weights, bit for bit on CPU, as a run that was never interrupted.

Under ``torchrun`` the same code trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU):
every global batch of ``batch_size`` samples is split across the processes, and only rank 0 writes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from noisynn.data import load_dataset
from noisynn.errors import UserError
from noisynn.inject import inject
from noisynn.io import atomic_path, atomic_write_json, atomic_write_text, provenance
from noisynn.models import build_model, check_model_fits_data, load_checkpoint, save_checkpoint
from noisynn.noise import NoiseSpec

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the scheduler sees a failure and retries; the retry resumes


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``args.yaml``."""

    out_dir: str
    data_dir: str
    stage: str = "pretrain"  # pretrain | finetune
    model: dict = field(default_factory=dict)  # for pretrain: timm_name, kwargs, pretrained
    init_checkpoint: str | None = None  # for finetune
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    warmup_lr: float = 0.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    noise: dict = field(default_factory=lambda: {"kind": "none"})
    site: str | None = None
    apply_noise_at_train: bool = False
    apply_noise_at_eval: bool = False
    eval_batch_size: int = 10
    num_workers: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    stop_after_steps: int | None = None  # testing aid: stop as if SIGTERM arrived after N steps

    def validate(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise UserError(f"stage must be pretrain or finetune; got {self.stage!r}.")
        for key in ("batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"{key} must be a positive integer; got {getattr(self, key)}.")
        if int(self.epochs) < 0 or (int(self.epochs) == 0 and not (self.stage == "pretrain" and self.model.get("pretrained"))):
            # 0 epochs: wrap pretrained weights as the pretraining checkpoint (the released recipe
            # fine-tunes timm's ImageNet weights directly)
            raise UserError(f"epochs must be a positive integer (0 only for pretrain with pretrained weights); got {self.epochs}.")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0; got {self.lr}.")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must lie in [0, 1); got {self.label_smoothing}.")
        if self.stage == "finetune" and not self.init_checkpoint:
            raise UserError("finetune needs init_checkpoint (the pretrained checkpoint to start from).")
        spec = NoiseSpec.from_dict(self.noise)
        if spec.kind != "none" and not self.site:
            raise UserError(f"noise kind {spec.kind} needs a site (e.g. blocks.3.attn or layer4.1).")


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Linear warm-up from ``warmup_lr``, then cosine to ``min_lr`` (per epoch, like timm's scheduler)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * epoch / cfg.warmup_epochs
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    t = (epoch - cfg.warmup_epochs) / span
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled training batches: a function of (seed, epoch) alone, so resuming needs no RNG state."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class _Distributed:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        # on the training device: NCCL reduces CUDA tensors only
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the processes (the epoch's loss and accuracy counts)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


class _StopFlag:
    """Set by SIGTERM (a scheduler's time limit or scancel); checked after every optimizer step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _state_tensors(model, optimizer, noise_rng) -> tuple[dict, dict]:
    """Flatten model, optimizer and RNG state into safetensors tensors plus JSON scalars."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {"param_groups": opt["param_groups"], "state_keys": {}}
    for pid, st in opt["state"].items():
        keys = []
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{name}"] = val.detach().cpu().contiguous()
                keys.append(name)
        scalars["state_keys"][str(pid)] = keys
    tensors["rng.torch"] = torch.get_rng_state()
    if noise_rng is not None:
        tensors["rng.noise"] = noise_rng
    return tensors, scalars


def _save_resume(recovery: Path, model, optimizer, noise_rng, progress: dict) -> None:
    from safetensors.torch import save_file

    tensors, scalars = _state_tensors(model, optimizer, noise_rng)
    # the position is written into both files: a kill between the two renames leaves a pair
    # that disagrees, which loading detects instead of resuming on mismatched state
    position = {"epoch": str(progress["epoch"]), "step": str(progress["step"])}
    with atomic_path(recovery / "state.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=position)
    atomic_write_json(recovery / "state.json", {**progress, "optimizer": scalars})


# settings that may change between an interrupted run and its resumption without changing the result
_RESUME_FREE_KEYS = ("out_dir", "data_dir", "num_workers", "stop_after_steps")


def _run_identity(cfg: TrainConfig, data_fingerprint: str, world_size: int) -> dict:
    """What a resume state belongs to: the settings that decide the weights, the data, the start."""
    args = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE_KEYS}
    init = None
    if cfg.init_checkpoint:
        digest = hashlib.sha256()
        with open(cfg.init_checkpoint, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        init = digest.hexdigest()
    identity = {"args": args, "data_fingerprint": data_fingerprint, "init_sha256": init, "world_size": world_size}
    return json.loads(json.dumps(identity))


def _drop_state(recovery: Path, reason: str, is_main: bool) -> None:
    if is_main:
        print(f"noisynn: discarding the resume state in {recovery} ({reason}); training starts over", flush=True)
        for name in ("state.json", "state.safetensors"):
            (recovery / name).unlink(missing_ok=True)


def _discard_foreign_resume_state(recovery: Path, identity: dict, is_main: bool) -> None:
    """Delete a resume state that belongs to other settings, data or starting weights, saying why.

    A workflow reruns a job when its settings change; resuming the old state would then hand back
    weights trained with the old settings, so the state is dropped and training starts over.
    """
    meta_path = recovery / "state.json"
    if not meta_path.is_file():
        return
    try:
        saved = json.loads(meta_path.read_text()).get("run")
    except json.JSONDecodeError:
        return _drop_state(recovery, "state.json is not valid JSON", is_main)
    if saved is None or saved == identity:
        return
    if saved.get("data_fingerprint") != identity["data_fingerprint"]:
        reason = "the dataset fingerprint changed"
    elif saved.get("init_sha256") != identity["init_sha256"]:
        reason = "the starting checkpoint changed"
    elif saved.get("world_size") != identity["world_size"]:
        reason = f"{saved.get('world_size')} processes then, {identity['world_size']} now"
    else:
        old, new = saved.get("args", {}), identity["args"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        reason = f"{changed[0]} was {old.get(changed[0])!r}, now {new.get(changed[0])!r}" if changed else "other settings"
    _drop_state(recovery, reason, is_main)


def _load_resume(recovery: Path, model, optimizer, is_main: bool) -> tuple[dict, torch.Tensor | None] | None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    meta_path = recovery / "state.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    weights = recovery / "state.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as fh:
            position = fh.metadata() or {}
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        _drop_state(recovery, f"state.safetensors unreadable: {e}", is_main)
        return None
    if position and (position.get("epoch"), position.get("step")) != (str(meta["epoch"]), str(meta["step"])):
        _drop_state(recovery, "state.json and state.safetensors are from different saves", is_main)
        return None
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for pid, keys in meta["optimizer"]["state_keys"].items():
        opt_state["state"][int(pid)] = {name: tensors[f"optim.{pid}.{name}"] for name in keys}
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    return meta, tensors.get("rng.noise")


@torch.no_grad()
def accuracy(model, split, batch_size: int, device, order_seed: int | None = None, num_workers: int = 0) -> float:
    """Top-1 accuracy on a split (sequential order, or shuffled from ``order_seed``)."""
    model.eval()
    n = len(split)
    idx = np.arange(n) if order_seed is None else np.random.default_rng(order_seed).permutation(n)
    batches = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    correct = 0
    for x, y in split.batches(batches, num_workers):
        logits = model(x.to(device, non_blocking=True))
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return correct / max(1, n)


def _summary_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training; returns the final metrics. Raises SystemExit(143) on SIGTERM."""
    cfg.validate()
    out = Path(cfg.out_dir)
    recovery = out / "recovery"
    dist = _Distributed()
    if dist.enabled and cfg.batch_size % dist.world:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {dist.world} processes; "
                        f"use a multiple of {dist.world}.")
    device = dist.device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)

    if cfg.stage == "finetune":
        model, init_meta = load_checkpoint(Path(cfg.init_checkpoint))
        model_cfg = init_meta["model"]
    else:
        init_meta = None
        model_cfg = cfg.model
    data = load_dataset(Path(cfg.data_dir), model_cfg)
    if cfg.stage == "pretrain":
        model = build_model(model_cfg, data.num_classes, data.in_chans)
    what = f"checkpoint {cfg.init_checkpoint}" if cfg.stage == "finetune" else f"model {model_cfg.get('timm_name')}"
    check_model_fits_data(model, what, cfg.data_dir, data.num_classes, data.in_chans, data.image_size)
    model.to(device)

    spec = NoiseSpec.from_dict(cfg.noise)
    handle = None
    if spec.kind != "none":
        handle = inject(model, cfg.site, spec, at_train=cfg.apply_noise_at_train, at_eval=cfg.apply_noise_at_eval, seed=cfg.seed + dist.rank)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # SyncBatchNorm runs on GPUs only
            # one set of BatchNorm statistics over the whole global batch, not per shard
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    rows: list[dict] = []
    start_epoch, start_step = 0, 0
    run_identity = _run_identity(cfg, data.fingerprint, dist.world)
    _discard_foreign_resume_state(recovery, run_identity, dist.is_main)
    dist.barrier()
    resumed = _load_resume(recovery, model, optimizer, dist.is_main)
    if resumed is not None:
        meta, noise_rng = resumed
        start_epoch, start_step, rows = meta["epoch"], meta["step"], meta["rows"]
        if handle is not None:
            handle.set_rng_state(noise_rng, device)
        if dist.is_main:
            print(f"noisynn: resuming {out} at epoch {start_epoch} step {start_step}", flush=True)

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "args.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))

    use_amp = cfg.amp and device.type == "cuda"
    stop = _StopFlag()
    steps_done = 0
    try:
        from tqdm import tqdm

        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)
            first = start_step if epoch == start_epoch else 0
            if dist.enabled:
                # equal shards: the incomplete last batch is dropped, as DistributedSampler(drop_last) does
                batches = [b[dist.rank :: dist.world] for b in batches if len(b) == cfg.batch_size]
            train_model.train()
            t0 = time.time()
            loss_sum, correct, seen = 0.0, 0, 0
            if epoch == start_epoch and first and rows and rows[-1].get("_partial"):
                part = rows.pop()
                loss_sum, correct, seen = part["_loss_sum"], part["_correct"], part["_seen"]
            bar = tqdm(data.train.batches(batches[first:], cfg.num_workers, seed=cfg.seed * 10_007 + epoch), total=len(batches) - first,
                       desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}", disable=not dist.is_main, leave=False, mininterval=2)
            for step, (x, y) in enumerate(bar, start=first):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(y)
                steps_done += 1
                interrupted = stop.raised or (cfg.stop_after_steps is not None and steps_done >= cfg.stop_after_steps)
                if dist.any_flag(interrupted, device):
                    if dist.is_main:
                        partial = {"_partial": True, "_loss_sum": loss_sum, "_correct": correct, "_seen": seen}
                        rng = handle.get_rng_state() if handle else None
                        _save_resume(recovery, model, optimizer, rng, {"epoch": epoch, "step": step + 1, "rows": rows + [partial],
                                                                      "run": run_identity})
                        print(f"noisynn: interrupted; resume state saved at epoch {epoch} step {step + 1}", flush=True)
                    dist.barrier()  # no process exits (and takes the group down) before the save is complete
                    raise SystemExit(EXIT_INTERRUPTED)
            loss_sum, correct, seen = dist.sum([loss_sum, correct, seen], device)
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / max(1, seen),
                "train_top1": correct / max(1, seen),
                "val_top1_clean": None,
                "val_top1_noisy": None,
                "epoch_seconds": round(time.time() - t0, 3),
            }
            if handle is not None:
                handle.enabled = False
            row["val_top1_clean"] = accuracy(model, data.val, 256, device, num_workers=cfg.num_workers)
            if handle is not None:
                handle.enabled = True
                if cfg.apply_noise_at_eval:
                    row["val_top1_noisy"] = accuracy(model, data.val, cfg.eval_batch_size, device, order_seed=cfg.seed, num_workers=cfg.num_workers)
            rows.append(row)
            if dist.is_main:
                print(f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                      f"train {row['train_top1']:.4f} val {row['val_top1_clean']:.4f}", flush=True)
                atomic_write_text(out / "summary.csv", _summary_csv(rows))
                rng = handle.get_rng_state() if handle else None
                _save_resume(recovery, model, optimizer, rng, {"epoch": epoch + 1, "step": 0, "rows": rows, "run": run_identity})
            dist.barrier()
    finally:
        stop.restore()

    result = {"final": rows[-1] if rows else {}, "epochs": len(rows)}
    if dist.is_main:
        if handle is not None:
            handle.remove()
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
            "final": result["final"],
            **provenance(cfg.seed),
        }
        save_checkpoint(model, out / "model.safetensors", meta)
        # the run is finished: its resume state must not be taken up by a later run of this folder
        shutil.rmtree(recovery, ignore_errors=True)
    dist.barrier()
    dist.close()
    return result
