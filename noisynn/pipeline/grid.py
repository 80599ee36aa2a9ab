"""The experiment grid of a workflow config (no torch import here).

One evaluation = (model, noise setting, when it applies, site, seed), a ``vocab.Evaluation``. Its
checkpoint is the vanilla fine-tuning when the noise applies at evaluation only (the same training,
never run twice), a fine-tuning with that noise injected otherwise, and the starting weights
themselves when the config has no fine-tuning (``finetune: null``, the audit of released weights).

Evaluations that share a checkpoint and a site form one evaluation *group*: one pass of the test
images through the network up to the site, shared by every setting and every protocol of the group.
The vanilla model (noise none) joins the group of its model's default site. A group is one job, or
(the config's ``evaluate.jobs``) the groups of one checkpoint are one job: its sites, and its seeds
when they share it; or the groups of every checkpoint of one model are (``evaluation_jobs``). Paths:

    results/<dataset>/<model>/pretrain/model.safetensors         (or imported/, weights as loaded)
    results/<dataset>/<model>/finetune/noise~<token>/site~<site>/seed~<n>/model.safetensors
    results/<dataset>/<model>/evaluate/train~<token>/site~<site>/seed~<n>/evaluations.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from noisynn.errors import UserError
from noisynn.vocab import (
    FINETUNE_PATH,
    GROUP_PATH,
    GROUP_PREDICTIONS,
    IMPORTED_PATH,
    PRETRAIN_PATH,
    RELEASED_NOISE,
    Evaluation,
    noise_token,
)

# the numbers a noise token writes with :g; its words (kind, axis, neighbour, detach) are written whole
_NUMBERS = ("strength", "alpha", "mean", "std")

__all__ = ["Grid", "EvaluationGroup", "EvaluationJob", "noise_token", "GROUP_PATH", "GROUP_PREDICTIONS"]


def entry_noises(entry: dict) -> list[dict]:
    """The noise settings an entry of the config's ``noises`` asks for: one per strength, alpha and axis."""
    kind = entry["kind"]
    if kind == "none":
        return [{"kind": "none"}]
    if kind in ("gaussian", "impulse"):
        base = {"kind": kind}
        if kind == "gaussian":
            base.update(mean=entry.get("mean", 0.0), std=entry.get("std", 1.0))
        return [{**base, "strength": s} for s in entry["strength"]]
    variant = {k: entry[k] for k in ("neighbour", "detach") if k in entry}
    if kind == "linear-shift":
        return [{"kind": kind, "alpha": a, "axis": ax, **variant} for a in entry["alpha"] for ax in entry["axis"]]
    return [{"kind": kind, "axis": ax, **variant} for ax in entry["axis"]]


def layer_sweep_noise(sweep: dict) -> dict:
    """The noise setting the config's ``layer_sweep`` injects at each of a model's sweep sites."""
    noise = {"kind": sweep["kind"], "axis": sweep.get("axis", "batch")}
    if sweep["kind"] == "linear-shift":
        noise["alpha"] = sweep.get("alpha", 0.3)
    for key in ("neighbour", "detach"):
        if key in sweep:
            noise[key] = sweep[key]
    return noise


@dataclass
class EvaluationGroup:
    """The evaluations of one checkpoint at one site and seed: one job."""

    dataset: str
    model: str
    train: str  # the noise the checkpoint was trained with: none (vanilla) or a noise token
    site: str
    seed: int
    checkpoint: str
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def wildcards(self) -> dict:
        return {"dataset": self.dataset, "model": self.model, "train": self.train, "site": self.site, "seed": self.seed}

    @property
    def path(self) -> str:
        return GROUP_PATH.format(**self.wildcards)

    @property
    def predictions_path(self) -> str:
        return GROUP_PREDICTIONS.format(**self.wildcards)


@dataclass
class EvaluationJob:
    """Evaluation groups run by one process, which starts Python and torch once and reads each
    checkpoint and the data once: those of one checkpoint (its sites, and its seeds when they share
    it), or of every checkpoint of one model, as the config's ``evaluate.jobs`` says."""

    folder: str  # what the job covers below results/<dataset>/: a checkpoint's folder or a model's name
    name: str  # the same in word characters, unique in the grid (the job's rule name)
    groups: list[EvaluationGroup]

    @property
    def model(self) -> str:
        return self.groups[0].model

    @property
    def checkpoints(self) -> list[str]:
        """The checkpoints the job reads, in the order it evaluates them."""
        return list(dict.fromkeys(g.checkpoint for g in self.groups))


class Grid:
    """Every evaluation, training and noise setting a config asks for."""

    def __init__(self, config: dict):
        self.config = config
        self.dataset = config["dataset"]["name"]
        self.finetunes = config.get("finetune") is not None
        self.noises: dict[str, dict] = {"none": {"kind": "none"}}
        evals: list[Evaluation] = []
        seeds = config["seeds"]
        for entry in config["noises"]:
            models = entry.get("models") or list(config["models"])
            for noise in entry_noises(entry):
                token = self._register(noise, f"noises.{config['noises'].index(entry)}")
                for model in models:
                    site = config["models"][model]["site"] if noise["kind"] != "none" else "none"
                    applies = ["eval"] if noise["kind"] == "none" else entry.get("apply", ["eval"])
                    for apply in applies:
                        for seed in seeds:
                            evals.append(Evaluation(self.dataset, model, token, apply, site, seed, True))
        sweep = config.get("layer_sweep")
        if sweep:
            token = self._register(layer_sweep_noise(sweep), "layer_sweep")
            for model, mcfg in config["models"].items():
                for site in mcfg.get("layer_sweep_sites", []):
                    for seed in seeds:
                        evals.append(Evaluation(self.dataset, model, token, sweep.get("apply", "eval"), site, seed,
                                                site == mcfg["site"]))
        # unique, in config order; a sweep site equal to the default site is the same evaluation
        unique: dict[tuple, Evaluation] = {}
        for e in evals:
            unique.setdefault(e.key, e)
        self.evaluations = list(unique.values())
        self.groups = self._groups()

    def _register(self, noise: dict, key: str) -> str:
        """The noise's path token, refused where it names another setting already in the grid: the
        token writes numbers with 6 significant digits, so 0.1 and 0.1000001 would share results."""
        token = noise_token(noise)
        known = self.noises.get(token)
        if known is not None:
            differ = [k for k in _NUMBERS if k in known or k in noise if float(known.get(k, 0)) != float(noise.get(k, 0))]
            if differ:
                raise UserError(f"key {key}: the noise settings {differ[0]} = {known.get(differ[0])} and "
                                f"{noise.get(differ[0])} share the path token {token} (6 significant digits); "
                                "make them differ within 6 digits or keep one.")
        self.noises[token] = noise
        return token

    # --- checkpoints -----------------------------------------------------------------------------

    def start_checkpoint(self, model: str) -> str:
        """The weights fine-tuning starts from: pretrained here, or imported as loaded."""
        template = IMPORTED_PATH if self.config["models"][model].get("skip_pretrain") else PRETRAIN_PATH
        return template.format(dataset=self.dataset, model=model)

    def checkpoint(self, e: Evaluation) -> str:
        if not self.finetunes:
            return self.start_checkpoint(e.model)
        if e.trains_with_noise:
            return FINETUNE_PATH.format(dataset=self.dataset, model=e.model, noise=e.noise, site=e.site, seed=e.seed)
        return FINETUNE_PATH.format(dataset=self.dataset, model=e.model, noise="none", site="none", seed=e.seed)

    def checkpoint_files(self) -> list[str]:
        return list(dict.fromkeys(self.checkpoint(e) for e in self.evaluations))

    # --- evaluation groups -----------------------------------------------------------------------

    def _groups(self) -> list[EvaluationGroup]:
        groups: dict[tuple, EvaluationGroup] = {}
        for e in self.evaluations:
            train = e.noise if e.trains_with_noise else "none"
            site = e.site
            if e.noise == "none":
                site = self.config["models"][e.model]["site"] if self._has_eval_only_at_default(e.model) else "image"
            key = (e.model, train, site, e.seed)
            if key not in groups:
                groups[key] = EvaluationGroup(self.dataset, e.model, train, site, e.seed, self.checkpoint(e))
            groups[key].evaluations.append(e)
        return list(groups.values())

    def _has_eval_only_at_default(self, model: str) -> bool:
        default = self.config["models"][model]["site"]
        return any(e.model == model and e.site == default and not e.trains_with_noise and e.noise != "none"
                   for e in self.evaluations)

    def group(self, model: str, train: str, site: str, seed) -> EvaluationGroup:
        for g in self.groups:
            if (g.model, g.train, g.site, g.seed) == (model, train, site, int(seed)):
                return g
        raise KeyError(f"no evaluation group model={model} train={train} site={site} seed={seed} in the grid")

    def evaluation_jobs(self, per: str) -> list[EvaluationJob]:
        """The groups of each checkpoint (``per="checkpoint"``) or of each model (``per="model"``) as
        jobs, in the grid's order (the evaluation reads each checkpoint once, whatever the order)."""
        if per not in ("checkpoint", "model"):
            raise ValueError(f"evaluation jobs are per checkpoint or per model, not {per!r}")
        covered: dict[str, list[EvaluationGroup]] = {}  # what a job covers → its groups
        for g in self.groups:
            folder = g.model if per == "model" else g.checkpoint.removeprefix(f"results/{self.dataset}/").rsplit("/", 1)[0]
            covered.setdefault(folder, []).append(g)
        jobs, names = [], set()
        for folder, groups in covered.items():
            name = base = re.sub(r"\W+", "_", folder)
            count = 1
            while name in names:  # folders that differ only in punctuation
                count += 1
                name = f"{base}_{count}"
            names.add(name)
            jobs.append(EvaluationJob(folder, name, groups))
        return jobs

    def group_files(self) -> list[str]:
        return [g.path for g in self.groups]

    def prediction_files(self) -> list[str]:
        return [g.predictions_path for g in self.groups]

    def runs_sweeps(self, e: Evaluation) -> bool:
        """The sweeps and the pooling control go with the released recipe at the model's default site."""
        return bool(self.config["evaluate"].get("sweeps")) and e.noise == RELEASED_NOISE and e.apply == "eval" \
            and e.site == self.config["models"][e.model]["site"]

    def settings(self, g: EvaluationGroup) -> list[dict]:
        """What the evaluate job of a group is told: each evaluation's record and noise parameters."""
        return [{**e.to_dict(), "noise_params": self.noises[e.noise], **({"sweeps": True} if self.runs_sweeps(e) else {})}
                for e in g.evaluations]
