"""Loading and checking a workflow config, with one sentence per mistake (no torch import here).

The JSON Schema in ``workflow/schemas/config.schema.yaml`` says what each key must be; this module
turns the first violation into a sentence naming the file, the key and what was expected, and adds
the checks a schema cannot make (a dataset folder that is missing or holds an empty class folder,
noise settings that need a key their kind implies, a pretrained file that is no safetensors file,
a learning-rate schedule that is 0 at every epoch). ``check_models_and_sites`` then builds each
model on the meta device and checks what the first job would otherwise find: a timm name or kwargs
timm refuses, a site the model lacks, a model that cannot take the data, pretrained weights that do
not fit it, a noise that a site makes the identity. It runs torch in a subprocess, only for the
models not yet checked (a cache under ``.snakemake/``), so a no-op workflow run stays fast.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from noisynn.errors import UserError
from noisynn.vocab import IMAGE_EXTENSIONS, noise_problem

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error) -> str:
    v = error.validator
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown key {extra[0]!r} (allowed: {allowed})"
    if v == "required":
        return error.message.replace("is a required property", "is required")
    if v == "enum":
        return f"expected one of {', '.join(map(str, error.validator_value))}; got {error.instance!r}"
    if v == "type":
        want = error.validator_value if isinstance(error.validator_value, str) else " or ".join(error.validator_value)
        return f"expected {want}; got {error.instance!r}"
    if v in ("minimum", "maximum", "exclusiveMinimum"):
        return f"expected a value {'>=' if v == 'minimum' else '<=' if v == 'maximum' else '>'} {error.validator_value}; got {error.instance!r}"
    return error.message


def _deepest(error):
    """An optional section (anyOf: the section or null) reports what is wrong inside the section."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        inner = [c for c in error.context if c.validator != "type" or list(c.relative_path)]
        error = max(inner or error.context, key=lambda c: len(list(c.absolute_path)))
    return error


def _apply_defaults(schema: dict, instance, root: dict):
    """Fill schema defaults into ``instance`` (nested objects and arrays of objects)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    if "anyOf" in schema and isinstance(instance, dict):  # an optional section: its object form
        schema = next(s for s in schema["anyOf"] if "$ref" in s or s.get("type") == "object")
        return _apply_defaults(schema, instance, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            resolved = root["$defs"][sub["$ref"].split("/")[-1]] if "$ref" in sub else sub
            if key not in instance and "default" in resolved:
                instance[key] = copy.deepcopy(resolved["default"])
            if key in instance:
                _apply_defaults(sub, instance[key], root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in schema.get("properties", {}):
                    _apply_defaults(extra, instance[key], root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _apply_defaults(schema["items"], item, root)
    return instance


def validate_config(config: dict, source: str = "the config", check_folders: bool = True) -> dict:
    """Check ``config`` against the schema and the cross-key rules; returns it with defaults filled.

    ``check_folders`` False leaves out whether an ImageFolder root exists (for estimates made
    before the data is at hand, ``noisynn cost``)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    check_against_schema(config, schema, source)
    config = _apply_defaults(schema, copy.deepcopy(config), schema)
    _cross_checks(config, source, check_folders)
    return config


def check_against_schema(doc, schema: dict, source: str) -> None:
    """Refuse ``doc`` if it breaks ``schema``, in one sentence naming ``source`` and the key."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc),
                    key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        e = _deepest(errors[0])
        raise UserError(f"{source}: key {_key_path(e)}: {_describe(e)}.")


def read_yaml(path: Path, what: str):
    """The content of a YAML file, or one sentence saying that ``what`` (e.g. "config file") is missing or broken."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; expected a YAML file.")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} {path} is not valid YAML{where} ({problem}).") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text (expected a YAML file).") from None


def _cross_checks(config: dict, source: str, check_folders: bool = True) -> None:
    _check_dataset(config["dataset"], "dataset", source, check_folders)
    if config.get("pretrain_dataset") is not None:
        _check_dataset(config["pretrain_dataset"], "pretrain_dataset", source, check_folders)
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


def processes(resources: dict) -> int:
    """The processes a training job runs under torchrun: its GPUs, else its CPU processes, else one."""
    return int(resources.get("gpu", 0) or 0) or int(resources.get("nproc", 1) or 1)


def mixes_batch(noise: dict) -> bool:
    """Whether a noise makes a sample's output depend on the other samples of its batch: a linear
    noise on the batch axis (k = the batch it sees), or impulse noise (its max and min are the batch's)."""
    kind, axis = noise.get("kind"), noise.get("axis")
    return kind == "impulse" or (str(kind).startswith("linear") and (axis == "batch" or "batch" in (axis or [])))


def noise_batch_problem(batch_size: int, noise_batch: int | None, world: int) -> str | None:
    """Why ``world`` processes cannot give a batch-mixing training noise the k a training section
    declares (``noise_batch``, by default ``batch_size``), or None.

    Each process takes ``batch_size / world`` samples of every global batch and runs them in forward
    passes of k samples (gradient accumulation when k is smaller), so k must divide that share.
    """
    k = noise_batch or batch_size
    if batch_size % world:
        return f"batch_size {batch_size} does not split evenly over {world} processes; use a multiple of {world}"
    share = batch_size // world
    if share % k == 0:
        return None
    declared = f"noise_batch {noise_batch}" if noise_batch else f"noise_batch (by default batch_size, {batch_size})"
    fixes = [f"batch_size {k * world} ({k} per process)"]
    if share > k:
        fixes.append(f"a batch_size that is a multiple of {k * world} (each process then accumulates gradients "
                     f"over forward passes of {k})")
    fixes.append(f"noise_batch {share} if a noise mixing {share} samples is what you mean")
    return (f"under {world} processes each forward pass would hold {share} of the {batch_size} samples, so a "
            f"batch-axis noise would mix {share}, not the {k} of {declared}; set {', or '.join(fixes)}")


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


def _check_dataset(ds: dict, key: str, source: str, check_folders: bool = True) -> None:
    if ds["kind"] == "imagefolder":
        root = ds.get("root")
        if not root:
            raise UserError(f"{source}: key {key}.root: expected the folder holding {ds['train_dir']}/ and {ds['val_dir']}/ for kind imagefolder.")
        if not check_folders:
            return
        for sub in (ds["train_dir"], ds["val_dir"]):
            if not (Path(root) / sub).is_dir():
                raise UserError(f"{source}: key {key}.root: folder {Path(root) / sub} does not exist (expected an ImageFolder split).")
        classes = {sub: _class_folders(Path(root) / sub, f"{source}: key {key}.root") for sub in (ds["train_dir"], ds["val_dir"])}
        train, val = classes[ds["train_dir"]], classes[ds["val_dir"]]
        if train != val:
            differ = sorted(set(train) ^ set(val))[:3]
            raise UserError(f"{source}: key {key}.root: {Path(root) / ds['train_dir']} and {Path(root) / ds['val_dir']} "
                            f"have different class folders (e.g. {', '.join(differ)}); expected the same classes in both.")
    elif ds["kind"] == "list":
        for name in ("root", "train_list", "test_list"):
            if not ds.get(name):
                raise UserError(f"{source}: key {key}.{name}: expected a path for kind list (root: the folder the "
                                "lists' paths are relative to; train_list, test_list: `<path> <label>` files).")
            if check_folders and not Path(ds[name]).exists():
                raise UserError(f"{source}: key {key}.{name}: {ds[name]} does not exist.")
    elif ds["kind"] == "digits" and ds.get("image_size") not in (8, 16, 32):
        raise UserError(f"{source}: key {key}.image_size: expected 8, 16 or 32 for digits; got {ds.get('image_size')!r}.")
    elif ds["kind"] == "mnist" and ds.get("image_size") not in (8, 16, 28, 32):
        raise UserError(f"{source}: key {key}.image_size: expected 8, 16, 28 or 32 for mnist; got {ds.get('image_size')!r}.")


def _holds_image(folder: Path) -> bool:
    """Whether a class folder holds an image, at any depth; stops at the first one found."""
    try:
        with os.scandir(folder) as entries:
            subfolders = []
            for e in entries:
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    return True
                if e.is_dir():
                    subfolders.append(e.path)
    except OSError:
        return False
    return any(_holds_image(Path(d)) for d in subfolders)


def _class_folders(folder: Path, where: str) -> list[str]:
    """The class folders of an ImageFolder split; an empty split or class folder is a UserError."""
    names = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not names:
        raise UserError(f"{where}: folder {folder} has no class sub-folders (expected the ImageFolder layout "
                        f"{folder}/<class>/<image>).")
    for name in names:
        if not _holds_image(folder / name):
            raise UserError(f"{where}: class folder {folder / name} holds no images (expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}).")
    return names


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
    from noisynn.pipeline.grid import Grid

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


def read_config_file(path: Path) -> dict:
    """A config file's mapping of keys, or a UserError naming the file (and the line of a YAML mistake)."""
    data = read_yaml(path, "config file")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {path} holds a YAML {type(data).__name__}; expected a mapping of keys.")
    return data or {}


def load_config(path: Path, check_folders: bool = True) -> dict:
    return validate_config(read_config_file(path), str(path), check_folders)


def dataset_geometry(ds: dict, model: dict, num_classes: int | None = None) -> dict:
    """(num_classes, in_chans, image_size) of the images a model sees on a dataset of the config;
    an ImageFolder's classes are its class folders, a list dataset's the labels of its lists, unless
    ``num_classes`` is given."""
    if ds["kind"] in ("digits", "mnist"):
        return {"name": ds["name"], "num_classes": num_classes or 10, "in_chans": 1, "image_size": ds["image_size"]}
    if num_classes is None and ds["kind"] == "list":
        from noisynn.listfile import read_list

        num_classes = 1 + max(label for f in (ds["train_list"], ds["test_list"]) for _, label in read_list(Path(f)))
    if num_classes is None:
        num_classes = len([d for d in os.scandir(Path(ds["root"]) / ds["train_dir"]) if d.is_dir()])
    size = model.get("image_size") or (model.get("kwargs") or {}).get("img_size") or ds["image_size"]
    return {"name": ds["name"], "num_classes": num_classes, "in_chans": 3, "image_size": int(size)}


def _code_digest() -> str:
    """The code and versions the model check depends on: a change of any of them checks again."""
    from importlib import metadata

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    names = ("models.py", "noise.py", "vocab.py")
    files = [package / "pipeline" / "config.py", *(package / name for name in names),
             *(path for sub in ("inject", "io") for path in sorted((package / sub).glob("*.py")))]
    for path in files:
        digest.update(path.read_bytes())
    for dist in ("torch", "timm"):
        try:
            digest.update(metadata.version(dist).encode())
        except metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()


def model_checks(config: dict, source: str) -> list[dict]:
    """What ``check_models_and_sites`` checks of each model, as JSON-ready records with a cache key."""
    from noisynn.pipeline.grid import Grid

    code = _code_digest()
    checks = []
    for name, m in config["models"].items():
        model = {k: m[k] for k in ("timm_name", "kwargs", "image_size", "augment", "preprocess") if m.get(k) is not None}
        transfer = config.get("pretrain_dataset") is not None and not m.get("skip_pretrain")
        start_data = config["pretrain_dataset"] if transfer else config["dataset"]
        sites = [[f"models.{name}.site", m["site"]]]
        sites += [[f"models.{name}.layer_sweep_sites.{i}", site] for i, site in enumerate(m.get("layer_sweep_sites", []))]
        batch = m.get("test_batch_size") or config["evaluate"]["test_batch_size"]
        noises = []
        for i, entry in enumerate(config["noises"]):
            if name in (entry.get("models") or list(config["models"])):
                noises += [[f"noises.{i}.axis", m["site"], noise] for noise in Grid._expand(entry)
                           if noise["kind"].startswith("linear")]
        sweep = config.get("layer_sweep")
        if sweep:
            noise = {"kind": sweep["kind"], "axis": sweep.get("axis", "batch"),
                     **({"alpha": sweep.get("alpha", 0.3)} if sweep["kind"] == "linear-shift" else {}),
                     **{k: sweep[k] for k in ("neighbour", "detach") if k in sweep}}
            noises += [["layer_sweep.axis", site, noise]
                       for site in m.get("layer_sweep_sites", [])]
        pre = m.get("pretrained")
        local = pre if pre not in (None, "hub") else None
        stat = None
        if local:
            st = os.stat(local)
            stat = [st.st_size, st.st_mtime_ns]
        record = {
            "source": source, "name": name, "model": model, "pretrained": local, "pretrained_stat": stat,
            "new_head_allowed": config.get("finetune") is not None, "sites": sites, "noises": noises,
            "batch_size": batch, "start_data": dataset_geometry(start_data, m),
            "data": dataset_geometry(config["dataset"], m), "transfer": transfer, "code": code,
        }
        record["key"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        checks.append(record)
    return checks


def run_model_checks(checks: list[dict]) -> None:
    """The torch part of ``check_models_and_sites``: each model built on the meta device, once."""
    from noisynn.inject.sites import check_site
    from noisynn.models import (
        _classifier_keys,
        check_forward,
        check_model_fits_data,
        check_weights_finite,
        data_kwargs,
        meta_model,
        refuse_unfit_weights,
    )
    from noisynn.noise import NoiseSpec

    for c in checks:
        where = f"{c['source']}: key models.{c['name']}"
        model_cfg, start = c["model"], c["start_data"]
        try:
            model = meta_model(model_cfg, start["num_classes"], start["in_chans"])
        except UserError as e:
            raise UserError(f"{where}.{'timm_name' if 'timm_name' in str(e) else 'kwargs'}: {e}") from None
        if model_cfg.get("preprocess") == "released":
            from noisynn.data import released_family

            try:
                released_family(model_cfg["timm_name"])
            except UserError as e:
                raise UserError(f"{where}.preprocess: {e}") from None
        check_model_fits_data(model, f"{where}.kwargs: model {model_cfg['timm_name']}", f"{start['name']!r}",
                              start["num_classes"], start["in_chans"], start["image_size"])
        check_forward(model, (2, start["in_chans"], start["image_size"], start["image_size"]),
                      f"{where}.kwargs: model {model_cfg['timm_name']}")
        for key, site in c["sites"]:
            try:
                check_site(model, site)
            except UserError as e:
                raise UserError(f"{c['source']}: key {key}: {e}") from None
        if c["pretrained"]:
            from noisynn.io.safetensors_header import read_safetensors_header

            header = read_safetensors_header(Path(c["pretrained"]), "pretrained weights file")
            shapes = {k: shape for k, (_, shape) in header.items()}
            try:
                refuse_unfit_weights(model, shapes, Path(c["pretrained"]), model_cfg["timm_name"])
                check_weights_finite(Path(c["pretrained"]), "pretrained weights file")
            except UserError as e:
                raise UserError(f"{where}.pretrained: {e}") from None
            own = model.state_dict()
            head = sorted(k for k in _classifier_keys(model) if tuple(shapes.get(k, ())) != tuple(own[k].shape))
            if head and not c["new_head_allowed"]:
                raise UserError(f"{where}.pretrained: weights {c['pretrained']} have no classifier for the "
                                f"{start['num_classes']} classes of {start['name']!r} (tensor {head[0]}), and finetune "
                                "is null, so nothing would train one.")
        data = c["data"]
        if c["transfer"]:
            # the fine-tuning adapts the model to the dataset (noisynn.models.adapt_to_data)
            kwargs = data_kwargs(model_cfg, model, data["num_classes"], data["in_chans"], data["image_size"])
            model = meta_model({**model_cfg, "kwargs": kwargs}, data["num_classes"], data["in_chans"])
        from noisynn.models import check_noises_act

        shape = (c["batch_size"], data["in_chans"], data["image_size"], data["image_size"])
        for key, site, noise in c["noises"]:
            try:
                check_noises_act(model, site, [NoiseSpec.from_dict(noise)], shape, f"model {c['name']} at site {site}")
            except UserError as e:
                raise UserError(f"{c['source']}: key {key}: {e}") from None


def _model_checks_main() -> None:
    """Entry of the subprocess: checks on stdin (JSON), the verdict as the last line of stdout."""
    checks = json.loads(sys.stdin.read())
    try:
        run_model_checks(checks)
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        return
    print(json.dumps({"error": None}))


def check_models_and_sites(config: dict, source: str, cache_file: Path | None = None, isolate: bool = True) -> None:
    """Check every model of a validated config on the meta device before any job starts.

    For each model: its timm name and kwargs (built once on the meta device, no memory, no
    weights), every site the config names for it (``site``, ``layer_sweep_sites``), that it can
    take the dataset's images and classes, that a local ``pretrained`` file's tensors fit it (from
    the safetensors header alone), and that no linear noise of the grid is the identity at its
    site (a dry forward with the noise hooked in). Models already checked with the same config,
    site list, noises, pretrained file (size, mtime), code and versions are skipped (their keys
    are kept in ``cache_file``); the rest run in one subprocess (``isolate``), so the workflow's
    own process never imports torch.
    """
    checks = model_checks(config, source)
    done: list = []
    if cache_file and Path(cache_file).is_file():
        try:
            done = json.loads(Path(cache_file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            done = []
        done = done if isinstance(done, list) else []
    todo = [c for c in checks if c["key"] not in done]
    if not todo:
        return
    if isolate:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        out = subprocess.run([sys.executable, "-c", "from noisynn.pipeline.config import _model_checks_main; _model_checks_main()"],
                             input=json.dumps(todo), capture_output=True, text=True, env=env)
        lines = out.stdout.strip().splitlines()
        try:
            verdict = json.loads(lines[-1]) if out.returncode == 0 and lines else None
        except json.JSONDecodeError:
            verdict = None
        if verdict is None:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"{source}: the models could not be checked (the check ended with exit status "
                            f"{out.returncode}: {last}).")
        if verdict["error"]:
            raise UserError(verdict["error"])
    else:
        run_model_checks(todo)
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        from noisynn.io.atomic import atomic_write_text

        # the newest first, and a bounded list: a config edited many times does not grow it for ever
        keys = list(dict.fromkeys([c["key"] for c in checks] + [k for k in done if isinstance(k, str)]))[:256]
        atomic_write_text(Path(cache_file), json.dumps(keys))


def job_environment(repo: Path) -> None:
    """Let workflow jobs find this Python first on PATH and import noisynn from ``repo``.

    Jobs inherit the environment (locally, and through sbatch's default --export=ALL on SLURM).
    """
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    paths = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(repo)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


@functools.lru_cache(maxsize=1)
def _schema_text_parsed() -> dict:
    return yaml.load(SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _schema() -> dict:
    """The config schema (parsed once per process; each caller gets its own copy)."""
    return copy.deepcopy(_schema_text_parsed())


def training_defaults() -> dict:
    """The defaults of the schema's training section: the one place a hyperparameter's default is written."""
    props = _schema()["$defs"]["training"]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def validate_training_section(section: dict, source: str = "the training section") -> dict:
    """Check a training section (a config's pretrain/finetune, or ``--train``) and fill its defaults."""
    import jsonschema

    schema = _schema()
    sub = {**schema["$defs"]["training"], "$defs": schema["$defs"]}
    if not isinstance(section, dict):
        raise UserError(f"{source}: expected a mapping of training keys; got {section!r}.")
    errors = sorted(jsonschema.Draft202012Validator(sub).iter_errors(section), key=lambda e: str(e.absolute_path))
    if errors:
        e = errors[0]
        raise UserError(f"{source}: key {_key_path(e)}: {_describe(e)}.")
    return {**training_defaults(), **section}
