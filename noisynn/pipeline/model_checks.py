"""The models of a config checked before any job starts: built on the meta device, in a subprocess.

``check_models_and_sites`` builds each model on the meta device and checks what the first job would
otherwise find: a timm name or kwargs timm refuses, a site the model lacks, a model that cannot take
the data, pretrained weights that do not fit it, a noise that a site makes the identity. It runs
torch in a subprocess, only for the models not yet checked (a cache under ``.snakemake/``), so a
no-op workflow run stays fast and the workflow's own process never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from noisynn.errors import UserError
from noisynn.pipeline.codedigest import modules_digest
from noisynn.pipeline.datasets import dataset_geometry
from noisynn.pipeline.grid import entry_noises, layer_sweep_noise


def _code_digest() -> str:
    """The code and versions the model check depends on: a change of any of them checks again."""
    from importlib import metadata

    digest = hashlib.sha256(modules_digest("noisynn.pipeline.model_checks").encode())
    for dist in ("torch", "timm"):
        try:
            digest.update(metadata.version(dist).encode())
        except metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()


def model_checks(config: dict, source: str) -> list[dict]:
    """What ``check_models_and_sites`` checks of each model, as JSON-ready records with a cache key."""
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
                noises += [[f"noises.{i}.axis", m["site"], noise] for noise in entry_noises(entry)
                           if noise["kind"].startswith("linear")]
        sweep = config.get("layer_sweep")
        if sweep:
            noises += [["layer_sweep.axis", site, layer_sweep_noise(sweep)] for site in m.get("layer_sweep_sites", [])]
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
    from noisynn.models.build import meta_model
    from noisynn.models.checks import check_forward, check_model_fits_data, check_noises_act
    from noisynn.models.pretrained import classifier_keys, refuse_unfit_weights
    from noisynn.models.transfer import data_kwargs
    from noisynn.models.weights import check_weights_finite
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
            head = sorted(k for k in classifier_keys(model) if tuple(shapes.get(k, ())) != tuple(own[k].shape))
            if head and not c["new_head_allowed"]:
                raise UserError(f"{where}.pretrained: weights {c['pretrained']} have no classifier for the "
                                f"{start['num_classes']} classes of {start['name']!r} (tensor {head[0]}), and finetune "
                                "is null, so nothing would train one.")
        data = c["data"]
        if c["transfer"]:
            # the fine-tuning adapts the model to the dataset (noisynn.models.transfer.adapt_to_data)
            kwargs = data_kwargs(model_cfg, model, data["num_classes"], data["in_chans"], data["image_size"])
            model = meta_model({**model_cfg, "kwargs": kwargs}, data["num_classes"], data["in_chans"])
        shape = (c["batch_size"], data["in_chans"], data["image_size"], data["image_size"])
        for key, site, noise in c["noises"]:
            try:
                check_noises_act(model, site, [NoiseSpec.from_dict(noise)], shape, f"model {c['name']} at site {site}")
            except UserError as e:
                raise UserError(f"{c['source']}: key {key}: {e}") from None


def _main() -> None:
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
        out = subprocess.run([sys.executable, "-m", "noisynn.pipeline.model_checks"],
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


if __name__ == "__main__":
    _main()
