"""The experiment grid of a workflow config, as readable path tokens (no torch import here).

One evaluation = (model, noise setting, when it applies, site, seed). Its checkpoint is the vanilla
fine-tuning when the noise applies at evaluation only (the same training, never run twice), and a
fine-tuning with that noise injected otherwise. Paths:

    results/<dataset>/<model>/pretrain/model.safetensors
    results/<dataset>/<model>/finetune/noise~<token>/site~<site>/seed~<n>/model.safetensors
    results/<dataset>/<model>/evaluate/noise~<token>/apply~<eval|train+eval>/site~<site>/seed~<n>/evaluation.json
"""

from __future__ import annotations

from dataclasses import dataclass


def noise_token(noise: dict) -> str:
    """A readable, unique path token for a noise setting (``gaussian_s0.5``, ``linear-shift_a0.3_batch``)."""
    kind = noise["kind"]
    if kind == "none":
        return "none"
    if kind == "gaussian":
        extra = "" if (noise.get("mean", 0.0), noise.get("std", 1.0)) == (0.0, 1.0) else f"_m{noise['mean']:g}_sd{noise['std']:g}"
        return f"gaussian_s{noise['strength']:g}{extra}"
    if kind == "impulse":
        return f"impulse_p{noise['strength']:g}"
    if kind == "linear-shift":
        return f"linear-shift_a{noise['alpha']:g}_{noise['axis']}"
    return f"linear-optimal_{noise['axis']}"


@dataclass(frozen=True)
class Evaluation:
    model: str
    noise: str  # token
    apply: str  # eval | train+eval
    site: str
    seed: int

    @property
    def trains_with_noise(self) -> bool:
        return self.apply == "train+eval" and self.noise != "none"


class Grid:
    """Every evaluation, training and noise setting a config asks for."""

    def __init__(self, config: dict):
        self.config = config
        self.dataset = config["dataset"]["name"]
        self.noises: dict[str, dict] = {}
        evals: list[Evaluation] = []
        seeds = config["seeds"]
        for entry in config["noises"]:
            models = entry.get("models") or list(config["models"])
            for noise in self._expand(entry):
                token = noise_token(noise)
                self.noises[token] = noise
                for model in models:
                    site = config["models"][model]["site"] if noise["kind"] != "none" else "none"
                    applies = ["eval"] if noise["kind"] == "none" else entry.get("apply", ["eval"])
                    for apply in applies:
                        for seed in seeds:
                            evals.append(Evaluation(model, token, apply, site, seed))
        sweep = config.get("layer_sweep")
        if sweep:
            noise = {"kind": sweep["kind"], "axis": sweep.get("axis", "batch")}
            if sweep["kind"] == "linear-shift":
                noise["alpha"] = sweep.get("alpha", 0.3)
            token = noise_token(noise)
            self.noises[token] = noise
            for model, mcfg in config["models"].items():
                for site in mcfg.get("layer_sweep_sites", []):
                    for seed in seeds:
                        evals.append(Evaluation(model, token, sweep.get("apply", "eval"), site, seed))
        self.evaluations = list(dict.fromkeys(evals))  # unique, in config order

    @staticmethod
    def _expand(entry: dict) -> list[dict]:
        kind = entry["kind"]
        if kind == "none":
            return [{"kind": "none"}]
        if kind in ("gaussian", "impulse"):
            base = {"kind": kind}
            if kind == "gaussian":
                base.update(mean=entry.get("mean", 0.0), std=entry.get("std", 1.0))
            return [{**base, "strength": s} for s in entry["strength"]]
        if kind == "linear-shift":
            return [{"kind": kind, "alpha": a, "axis": ax} for a in entry["alpha"] for ax in entry["axis"]]
        return [{"kind": kind, "axis": ax} for ax in entry["axis"]]

    # --- paths -----------------------------------------------------------------------------

    def root(self, model: str) -> str:
        return f"results/{self.dataset}/{model}"

    def checkpoint(self, e: Evaluation) -> str:
        if e.trains_with_noise:
            return f"{self.root(e.model)}/finetune/noise~{e.noise}/site~{e.site}/seed~{e.seed}/model.safetensors"
        return f"{self.root(e.model)}/finetune/noise~none/site~none/seed~{e.seed}/model.safetensors"

    def evaluation(self, e: Evaluation) -> str:
        return f"{self.root(e.model)}/evaluate/noise~{e.noise}/apply~{e.apply}/site~{e.site}/seed~{e.seed}/evaluation.json"

    def evaluation_files(self) -> list[str]:
        return [self.evaluation(e) for e in self.evaluations]

    def checkpoint_files(self) -> list[str]:
        return list(dict.fromkeys(self.checkpoint(e) for e in self.evaluations))

    def lookup(self, model: str, noise: str, apply: str, site: str, seed: int) -> Evaluation:
        e = Evaluation(model, noise, apply, site, int(seed))
        if e not in self.evaluations:
            raise KeyError(f"no evaluation {e} in the grid")
        return e
