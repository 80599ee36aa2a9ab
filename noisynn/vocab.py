"""The words every layer of noisynn shares (no torch import here).

The grid, the workflow rules, the evaluation, the aggregation and the reports all speak of the same
things: evaluation protocols and the test orders they use, the released code's metric, noise
settings and their path tokens, the paths of checkpoints and evaluations, and one record that says
which evaluation a file holds. They are defined here once, so that a file carries its own meaning and
nothing downstream has to parse it back out of a path (docs/paper.md §4 and §6 for the protocols).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# --- protocols and test orders ---------------------------------------------------------------------

ORDERS = ("shuffled", "class_sorted", "class_pure", "class_mixed")


@dataclass(frozen=True)
class Protocol:
    """How the test set is cut into batches and whether the noise is on.

    ``batch_size`` None means the test batch size of the evaluation (10 in the released ViT code).
    """

    name: str
    order: str
    batch_size: int | None
    noise_on: bool
    description: str


_PROTOCOL_LIST = (
    Protocol("clean", "shuffled", None, False, "the noise off: the plain model"),
    Protocol("released", "class_sorted", None, True,
             "the released code: the class-sorted ImageFolder read in sequence, so most batches hold one class"),
    Protocol("shuffled", "shuffled", None, True, "a seeded random test order, same batch size"),
    Protocol("batch1", "shuffled", 1, True, "batch size 1: a batch-axis linear noise is then the identity"),
    Protocol("class_pure", "class_pure", None, True, "every batch holds images of one class"),
    Protocol("class_mixed", "class_mixed", None, True, "every batch holds distinct classes"),
)
PROTOCOL_DEFS = {p.name: p for p in _PROTOCOL_LIST}
PROTOCOLS = tuple(PROTOCOL_DEFS)
NOISY_PROTOCOLS = tuple(p for p in PROTOCOLS if PROTOCOL_DEFS[p].noise_on)

# Which accuracy a model family's released code reports for the `released` protocol:
# `running`: the mean over batches of the running accuracy (the official ViT code);
# `plain`: the fraction of test images classified correctly (the official CNN code).
REPORTED_METRICS = ("running", "plain")


def released_metric(correct_per_batch, batch_sizes) -> float:
    """The released ViT code's reported accuracy: the mean over batches of the running accuracy.

    After batch t the running accuracy is (correct in batches 1..t) / (samples in batches 1..t);
    the metric averages those running values over t. It equals the plain accuracy only by chance.
    """
    if len(correct_per_batch) != len(batch_sizes) or not len(batch_sizes):
        raise ValueError("released_metric needs one correct count per batch and at least one batch")
    correct = np.cumsum(np.asarray(correct_per_batch, dtype=np.float64))
    seen = np.cumsum(np.asarray(batch_sizes, dtype=np.float64))
    return float(np.mean(correct / seen))


# How an image folder's images are fed to a model (models.<name>.preprocess; data.image_transforms):
# timm's pretrained config of the weights, or the released code's test and training transforms.
PREPROCESSES = ("timm", "released")


# --- noise settings --------------------------------------------------------------------------------

NOISE_KINDS = ("none", "gaussian", "impulse", "linear-optimal", "linear-shift")
LINEAR_NOISE_KINDS = ("linear-optimal", "linear-shift")
ADDITIVE_NOISE_KINDS = ("gaussian", "impulse")
AXES = ("batch", "rows", "features")
NEIGHBOURS = ("previous", "next")
# the gradient a linear noise passes back: False, through (I + Q)ᵀ as the algebra says (eq. 17 and
# the released ViT's OptimalQ); True, the identity (the noise term detached: the released CNN code,
# e.g. NoisyCNN_CircularShiftQ/CNNs.py lines 57-62); "partner", the own term only, (1 + Q_ii)·g, the
# partner's term detached (the released ResNet-18 at stage 4 after its first sub-block, lines 560-575)
DETACH = (False, True, "partner")
APPLY = ("eval", "train+eval")  # when a workflow setting's noise acts: at evaluation only, or also in training
RELEASED_NOISE = "linear-optimal_batch"  # the released recipe: optimal Q over the batch, at evaluation only


def noise_token(noise: dict) -> str:
    """A readable, unique path token for a noise setting (``gaussian_s0.5``, ``linear-shift_a0.3_batch``).

    The released CNN variant of the shift (partner x_(i+1), noise term detached) adds ``_next`` and
    ``_detach`` (``_detach-partner`` when only the partner's term is detached); the defaults (eq. 17:
    x_(i-1), gradient through) add nothing, so older paths stay.
    """
    kind = noise["kind"]
    if kind == "none":
        return "none"
    if kind == "gaussian":
        extra = "" if (noise.get("mean", 0.0), noise.get("std", 1.0)) == (0.0, 1.0) else f"_m{noise['mean']:g}_sd{noise['std']:g}"
        return f"gaussian_s{noise['strength']:g}{extra}"
    if kind == "impulse":
        return f"impulse_p{noise['strength']:g}"
    detach = noise.get("detach", False)
    variant = (("_next" if noise.get("neighbour", "previous") == "next" else "")
               + ("_detach-partner" if detach == "partner" else "_detach" if detach is True else ""))
    if kind == "linear-shift":
        return f"linear-shift_a{noise['alpha']:g}_{noise['axis']}{variant}"
    return f"linear-optimal_{noise['axis']}{variant}"


def noise_strength(noise: dict) -> float | None:
    """The number a strength sweep varies: Gaussian s, impulse p, shift alpha (None for the others)."""
    if noise["kind"] in ADDITIVE_NOISE_KINDS:
        return float(noise["strength"])
    if noise["kind"] == "linear-shift":
        return float(noise["alpha"])
    return None


def noise_problem(noise: dict) -> tuple[str, str] | None:
    """Why a noise setting cannot be run as a noise, as (key, what is wrong), or None.

    A number that is not finite (a NaN strength would train on NaN activations and fail later,
    blaming the learning rate), or a setting that is the identity wherever it acts: a Gaussian of
    strength 0 (or of mean 0 and std 0), an impulse probability of 0, a shift weight alpha of 0.
    Such a "noise" would report the vanilla model under a noise's name.
    """
    for key in ("strength", "mean", "std", "alpha"):
        value = noise.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return key, f"must be a finite number; got {value}"
    kind = noise.get("kind")
    if kind in ADDITIVE_NOISE_KINDS and noise.get("strength", 1.0) == 0:
        return "strength", f"{kind} noise of strength 0 leaves every input unchanged (the identity, no noise)"
    if kind == "gaussian" and noise.get("mean", 0.0) == 0 and noise.get("std", 1.0) == 0:
        return "std", "a Gaussian of mean 0 and std 0 adds nothing (the identity, no noise)"
    if kind == "linear-shift" and noise.get("alpha", 0.3) == 0:
        return "alpha", "the shift with alpha 0 leaves every input unchanged (the identity, no noise)"
    return None


# --- files -----------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# --- paths -----------------------------------------------------------------------------------------

PRETRAIN_PATH = "results/{dataset}/{model}/pretrain/model.safetensors"
IMPORTED_PATH = "results/{dataset}/{model}/imported/model.safetensors"
FINETUNE_PATH = "results/{dataset}/{model}/finetune/noise~{noise}/site~{site}/seed~{seed}/model.safetensors"
# one evaluation job: a checkpoint (trained with noise `train`, or none) at one site and seed, every
# setting of that pair in one JSON, and each image's prediction and batch beside it
GROUP_PATH = "results/{dataset}/{model}/evaluate/train~{train}/site~{site}/seed~{seed}/evaluations.json"
GROUP_PREDICTIONS = "results/{dataset}/{model}/evaluate/train~{train}/site~{site}/seed~{seed}/predictions.npz"


# --- the arrays of a group's predictions file ---------------------------------------------------
# "<setting key>/<stem>/<pred|batch|correct>", the stem a protocol or a sweep point; "labels" alone


def setting_key(noise: str, apply: str, site: str) -> str:
    """The key of one setting's arrays in its group's predictions file."""
    return f"{noise}|{apply}|{site}"


def batch_size_stem(order: str, k) -> str:
    """The batch-size sweep's point (order, k) with the noise on."""
    return f"batch_size/{order}/k{k:g}"


def purity_stem(m) -> str:
    """The purity sweep's point: m images of one class in a batch."""
    return f"purity/m{m:g}"


def pooling_stem(protocol: str) -> str:
    """The noise-free pooling control under a protocol's order and batch size."""
    return f"pooling/{protocol}"


def pooling_batch_size_stem(order: str, k) -> str:
    """The pooling control's batch-size sweep point."""
    return "pooling/" + batch_size_stem(order, k)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a workflow grid: a model's checkpoint, a noise setting at a site, a seed.

    ``noise`` is the setting's token; ``default_site`` says whether ``site`` is the model's default
    site (where the config's settings go), as opposed to a site of the layer sweep.
    """

    dataset: str
    model: str
    noise: str
    apply: str
    site: str
    seed: int
    default_site: bool = True

    @property
    def trains_with_noise(self) -> bool:
        return self.apply == "train+eval" and self.noise != "none"

    def fields(self) -> dict:
        return {"dataset": self.dataset, "model": self.model, "noise": self.noise, "apply": self.apply,
                "site": self.site, "seed": self.seed}

    @property
    def key(self) -> tuple:
        """What makes an evaluation distinct within a dataset's grid."""
        return self.model, self.noise, self.apply, self.site, self.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(**{k: d[k] for k in ("dataset", "model", "noise", "apply", "site", "seed", "default_site")})
