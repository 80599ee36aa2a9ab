"""Loading and checking a workflow config, with one sentence per mistake (no torch import here).

The JSON Schema in ``workflow/schemas/config.schema.yaml`` says what each key must be; this module
turns the first violation into a sentence naming the file, the key and what was expected, and adds
the checks a schema cannot make (a model timm does not know, a dataset folder that is missing,
noise settings that need a key their kind implies). Sites are checked against the built model by
the first job that uses them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from noisynn.errors import UserError

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


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


def _apply_defaults(schema: dict, instance, root: dict):
    """Fill schema defaults into ``instance`` (nested objects and arrays of objects)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
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


def validate_config(config: dict, source: str = "the config") -> dict:
    """Check ``config`` against the schema and the cross-key rules; returns it with defaults filled."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        e = errors[0]
        raise UserError(f"{source}: key {_key_path(e)}: {_describe(e)}.")
    config = _apply_defaults(schema, copy.deepcopy(config), schema)
    _cross_checks(config, source)
    return config


def _cross_checks(config: dict, source: str) -> None:
    ds = config["dataset"]
    if ds["kind"] == "imagefolder":
        root = ds.get("root")
        if not root:
            raise UserError(f"{source}: key dataset.root: expected the folder holding {ds['train_dir']}/ and {ds['val_dir']}/ for kind imagefolder.")
        for sub in (ds["train_dir"], ds["val_dir"]):
            if not (Path(root) / sub).is_dir():
                raise UserError(f"{source}: key dataset.root: folder {Path(root) / sub} does not exist (expected an ImageFolder split).")
    elif ds.get("image_size") not in (8, 16, 32):
        raise UserError(f"{source}: key dataset.image_size: expected 8, 16 or 32 for digits; got {ds.get('image_size')!r}.")
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
    for name, m in config["models"].items():
        pre = m.get("pretrained")
        if pre not in (None, "hub") and not Path(pre).is_file():
            raise UserError(f"{source}: key models.{name}.pretrained: file {pre} does not exist (expected null, 'hub' or a .safetensors path).")
        if m.get("skip_pretrain") and pre is None:
            raise UserError(f"{source}: key models.{name}.skip_pretrain: needs pretrained weights (set models.{name}.pretrained).")


def load_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
    return validate_config(data or {}, str(path))


def check_models_known(config: dict, source: str, cache_file: Path | None = None) -> None:
    """Fail when a ``timm_name`` is not a timm model; names already checked are cached.

    Importing timm costs seconds, so the answer is kept in ``cache_file``: a no-op workflow run
    stays fast, and a new name is still checked before any job starts.
    """
    names = sorted({m["timm_name"] for m in config["models"].values()})
    known: set[str] = set()
    if cache_file and Path(cache_file).is_file():
        try:
            known = set(json.loads(Path(cache_file).read_text()))
        except (json.JSONDecodeError, TypeError):
            known = set()
    todo = [n for n in names if n not in known]
    if not todo:
        return
    code = "import json,sys,timm; print(json.dumps([n for n in sys.argv[1:] if not timm.is_model(n)]))"
    out = subprocess.run([sys.executable, "-c", code, *todo], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{source}: the model names could not be checked because timm does not import ({last}).")
    unknown = json.loads(out.stdout)
    if unknown:
        model = next(k for k, m in config["models"].items() if m["timm_name"] == unknown[0])
        raise UserError(f"{source}: key models.{model}.timm_name: {unknown[0]!r} is not a timm model (see timm.list_models()).")
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(sorted(known | set(todo))))


def job_environment(repo: Path) -> None:
    """Let workflow jobs find this Python first on PATH and import noisynn from ``repo``.

    Jobs inherit the environment (locally, and through sbatch's default --export=ALL on SLURM).
    """
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    paths = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(repo)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
