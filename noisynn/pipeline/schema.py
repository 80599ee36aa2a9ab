"""The config's JSON Schema and its messages: one sentence per mistake (no torch import here).

``workflow/schemas/config.schema.yaml`` says what each key must be and its default; this module reads
YAML files, turns the first violation of a schema into a sentence naming the file, the key and what
was expected, and fills the schema's defaults in. The training section's defaults are written in the
schema alone: ``training_defaults`` is where training code reads them.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

from noisynn.errors import UserError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


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


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    return yaml.load(SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def config_schema() -> dict:
    """The config schema (parsed once per process; each caller gets its own copy)."""
    return copy.deepcopy(_parsed_schema())


def check_against_schema(doc, schema: dict, source: str) -> None:
    """Refuse ``doc`` if it breaks ``schema``, in one sentence naming ``source`` and the key."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc),
                    key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        e = _deepest(errors[0])
        raise UserError(f"{source}: key {_key_path(e)}: {_describe(e)}.")


def _deepest(error):
    """An optional section (anyOf: the section or null) reports what is wrong inside the section."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        inner = [c for c in error.context if c.validator != "type" or list(c.relative_path)]
        error = max(inner or error.context, key=lambda c: len(list(c.absolute_path)))
    return error


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


def apply_defaults(schema: dict, instance, root: dict):
    """Fill schema defaults into ``instance`` (nested objects and arrays of objects)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    if "anyOf" in schema and isinstance(instance, dict):  # an optional section: its object form
        schema = next(s for s in schema["anyOf"] if "$ref" in s or s.get("type") == "object")
        return apply_defaults(schema, instance, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            resolved = root["$defs"][sub["$ref"].split("/")[-1]] if "$ref" in sub else sub
            if key not in instance and "default" in resolved:
                instance[key] = copy.deepcopy(resolved["default"])
            if key in instance:
                apply_defaults(sub, instance[key], root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in schema.get("properties", {}):
                    apply_defaults(extra, instance[key], root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            apply_defaults(schema["items"], item, root)
    return instance


def training_defaults() -> dict:
    """The defaults of the schema's training section: the one place a hyperparameter's default is written."""
    props = config_schema()["$defs"]["training"]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def validate_training_section(section: dict, source: str = "the training section") -> dict:
    """Check a training section (a config's pretrain/finetune, or ``--train``) and fill its defaults."""
    import jsonschema

    schema = config_schema()
    sub = {**schema["$defs"]["training"], "$defs": schema["$defs"]}
    if not isinstance(section, dict):
        raise UserError(f"{source}: expected a mapping of training keys; got {section!r}.")
    errors = sorted(jsonschema.Draft202012Validator(sub).iter_errors(section), key=lambda e: str(e.absolute_path))
    if errors:
        e = errors[0]
        raise UserError(f"{source}: key {_key_path(e)}: {_describe(e)}.")
    return {**training_defaults(), **section}
