"""Loading and checking a workflow config, with one sentence per mistake (no torch import here).

The JSON Schema (``noisynn.pipeline.schema``) says what each key must be; this module adds the checks
a schema cannot make: a dataset folder that is missing or holds an empty class folder
(``noisynn.pipeline.datasets``), noise settings that need a key their kind implies, a pretrained file
that is no safetensors file, a learning-rate schedule that is 0 at every epoch (``noisynn.schedule``),
a batch-mixing training noise its processes cannot give the declared k (``noisynn.noise_batch``), two
settings one path token would name. The models themselves are checked apart, with torch
(``noisynn.pipeline.model_checks``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from noisynn.errors import UserError
from noisynn.noise_batch import mixes_batch, noise_batch_problem, processes
from noisynn.pipeline.datasets import check_dataset
from noisynn.pipeline.grid import Grid
from noisynn.pipeline.schema import apply_defaults, check_against_schema, config_schema, read_yaml
from noisynn.schedule import training_problem
from noisynn.vocab import noise_problem


def read_config_file(path: Path) -> dict:
    """A config file's mapping of keys, or a UserError naming the file (and the line of a YAML mistake)."""
    data = read_yaml(path, "config file")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {path} holds a YAML {type(data).__name__}; expected a mapping of keys.")
    return data or {}


def load_config(path: Path, check_folders: bool = True) -> dict:
    return validate_config(read_config_file(path), str(path), check_folders)


def validate_config(config: dict, source: str = "the config", check_folders: bool = True) -> dict:
    """Check ``config`` against the schema and the cross-key rules; returns it with defaults filled.

    ``check_folders`` False leaves out whether an ImageFolder root exists (for estimates made
    before the data is at hand, ``noisynn cost``)."""
    schema = config_schema()
    check_against_schema(config, schema, source)
    config = apply_defaults(schema, copy.deepcopy(config), schema)
    _cross_checks(config, source, check_folders)
    return config


def _cross_checks(config: dict, source: str, check_folders: bool = True) -> None:
    check_dataset(config["dataset"], "dataset", source, check_folders)
    if config.get("pretrain_dataset") is not None:
        check_dataset(config["pretrain_dataset"], "pretrain_dataset", source, check_folders)
        if config["pretrain_dataset"]["name"] == config["dataset"]["name"]:
            raise UserError(f"{source}: key pretrain_dataset.name: must differ from dataset.name "
                            f"({config['dataset']['name']!r}); both are prepared under results/.")
        if config.get("pretrain") is None:
            raise UserError(f"{source}: key pretrain_dataset: needs a pretrain section (the pretraining on it).")
        if config.get("finetune") is None:
            raise UserError(f"{source}: key pretrain_dataset: needs a finetune section; without one the models "
                            f"pretrained on {config['pretrain_dataset']['name']!r} would be evaluated on other data.")
    for section in ("pretrain", "finetune"):
        if config.get(section) is not None:
            problem = training_problem(config[section])
            if problem:
                raise UserError(f"{source}: key {section}.{problem[0]}: {problem[1]}.")
    _check_grid(config, source)
    _check_noise_batch(config, source)


def _check_grid(config: dict, source: str) -> None:
    names = set(config["models"])
    for i, entry in enumerate(config["noises"]):
        for m in entry.get("models", []):
            if m not in names:
                raise UserError(f"{source}: key noises.{i}.models: {m!r} is not a model of this config (models: {', '.join(sorted(names))}).")
        kind = entry["kind"]
        need = {"gaussian": "strength", "impulse": "strength", "linear-shift": "alpha"}.get(kind)
        if need and need not in entry:
            raise UserError(f"{source}: key noises.{i}.{need}: required for noise kind {kind}.")
        if kind == "impulse" and any(p > 1 for p in entry["strength"]):
            raise UserError(f"{source}: key noises.{i}.strength: the impulse probability must lie in [0, 1].")
        if kind.startswith("linear") and "axis" not in entry:
            raise UserError(f"{source}: key noises.{i}.axis: required for noise kind {kind} (batch, rows or features).")
        _check_noise_values(entry, f"noises.{i}", source)
    if config.get("layer_sweep"):
        _check_noise_values(config["layer_sweep"], "layer_sweep", source)
    for name, m in config["models"].items():
        pre = m.get("pretrained")
        if pre not in (None, "hub") and not Path(pre).is_file():
            raise UserError(f"{source}: key models.{name}.pretrained: file {pre} does not exist (expected null, 'hub' or a .safetensors path).")
        if pre not in (None, "hub"):
            from noisynn.io.safetensors_header import read_safetensors_header

            if Path(pre).suffix != ".safetensors":
                raise UserError(f"{source}: key models.{name}.pretrained: file {pre} is not a .safetensors file "
                                "(pickled checkpoints are never loaded; convert it with safetensors.torch.save_file).")
            try:
                read_safetensors_header(Path(pre), "file")
            except UserError as e:
                raise UserError(f"{source}: key models.{name}.pretrained: {e}") from None
        if m.get("preprocess") == "released" and config["dataset"]["kind"] in ("digits", "mnist"):
            raise UserError(f"{source}: key models.{name}.preprocess: released is the released code's transform of "
                            f"image files; dataset kind {config['dataset']['kind']} is normalized when prepared, so use timm.")
        if m.get("preprocess") == "released" and m.get("augment"):
            raise UserError(f"{source}: key models.{name}.augment: applies to preprocess: timm; preprocess: released "
                            "fixes the released code's transforms, so leave augment out.")
        if m.get("skip_pretrain") and pre is None:
            raise UserError(f"{source}: key models.{name}.skip_pretrain: needs pretrained weights (set models.{name}.pretrained).")
        if config.get("pretrain") is None and not m.get("skip_pretrain"):
            raise UserError(f"{source}: key models.{name}.skip_pretrain: pretrain is null, so the model must start "
                            "from pretrained weights (set pretrained and skip_pretrain: true).")
    if config.get("finetune") is None:
        for i, entry in enumerate(config["noises"]):
            if "train+eval" in entry.get("apply", []):
                raise UserError(f"{source}: key noises.{i}.apply: train+eval needs a fine-tuning, but finetune is null "
                                "(evaluation only); use apply: [eval].")
        if (config.get("layer_sweep") or {}).get("apply") == "train+eval":
            raise UserError(f"{source}: key layer_sweep.apply: train+eval needs a fine-tuning, but finetune is null.")
    for i, entry in enumerate(config["noises"]):
        for key in ("neighbour", "detach"):
            if key in entry and not entry["kind"].startswith("linear"):
                raise UserError(f"{source}: key noises.{i}.{key}: only the linear noises take {key}; kind is {entry['kind']}.")
    try:
        Grid(config)  # two settings one path token would name: refused here, not overwritten later
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _check_noise_batch(config: dict, source: str) -> None:
    """A fine-tuning whose noise mixes the batch gets the k the config declares on every model's
    processes (finetune.noise_batch, by default finetune.batch_size), or the run stops here."""
    section = config.get("finetune")
    if section is None:
        return
    trained = [e for e in config["noises"] if "train+eval" in e.get("apply", [])]
    sweep = config.get("layer_sweep") or {}
    for name, m in config["models"].items():
        mixing = any(mixes_batch(e) for e in trained if name in (e.get("models") or config["models"]))
        mixing = mixing or (sweep.get("apply") == "train+eval" and mixes_batch(sweep) and bool(m.get("layer_sweep_sites")))
        world = processes(m.get("resources") or {})
        problem = noise_batch_problem(section["batch_size"], section.get("noise_batch"), world) if mixing else None
        if problem:
            raise UserError(f"{source}: key finetune.noise_batch: model {name} trains on {world} processes "
                            f"(models.{name}.resources); {problem}.")


def _check_noise_values(entry: dict, key: str, source: str) -> None:
    """Every value of a noise entry (lists of strengths or alphas) is finite and makes a noise."""
    for k in ("strength", "alpha"):
        values = entry.get(k, [])
        for j, v in enumerate(values if isinstance(values, list) else [values]):
            problem = noise_problem({"kind": entry["kind"], k: v})
            if problem:
                where = f"{key}.{k}" + (f".{j}" if isinstance(values, list) else "")
                raise UserError(f"{source}: key {where}: {problem[1]}.")
    problem = noise_problem({k: entry[k] for k in ("kind", "mean", "std") if k in entry})
    if problem:
        raise UserError(f"{source}: key {key}.{problem[0]}: {problem[1]}.")
