"""The learning-rate schedule of a training section, and why a section could not train (no torch import:
the config check runs it before any job starts, and the training follows it epoch by epoch)."""

from __future__ import annotations

import math

from noisynn.pipeline.schema import training_defaults


def learning_rate(epoch: int, epochs: int, lr: float, min_lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr``, then cosine to ``min_lr`` (per epoch, like timm's scheduler)."""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    span = max(1, epochs - warmup_epochs)
    t = (epoch - warmup_epochs) / span
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def schedule_problem(section: dict) -> str | None:
    """Why a training section's schedule cannot train (every epoch at learning rate 0), or None."""
    hyper = {**training_defaults(), **section}
    epochs = int(hyper["epochs"])
    rates = [learning_rate(e, epochs, hyper["lr"], hyper["min_lr"], hyper["warmup_epochs"], hyper["warmup_lr"])
             for e in range(epochs)]
    if any(r > 0 for r in rates):
        return None
    return (f"with epochs {epochs}, warmup_epochs {hyper['warmup_epochs']} and warmup_lr {hyper['warmup_lr']} every "
            "epoch trains at learning rate 0, so the weights would not change; set warmup_epochs below epochs "
            "(e.g. 0) or warmup_lr above 0")


def training_problem(section: dict) -> tuple[str, str] | None:
    """Why a training section cannot train as meant, as (key, what is wrong), or None: a number
    that is not finite, a final learning rate min_lr above the peak lr (the cosine would then
    raise the rate), or a schedule at learning rate 0 throughout (``schedule_problem``)."""
    hyper = {**training_defaults(), **section}
    for key, value in hyper.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key, f"must be a finite number; got {value}"
    if hyper["min_lr"] > hyper["lr"]:
        return "min_lr", (f"the final learning rate {hyper['min_lr']:g} is above lr {hyper['lr']:g}, so the cosine "
                          "schedule would raise the rate instead of decaying it; set min_lr <= lr")
    problem = schedule_problem(hyper)
    return ("warmup_epochs", problem) if problem else None
