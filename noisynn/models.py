"""Models by timm name, and checkpoints as safetensors plus a JSON sidecar (never a pickle).

A model config is a small dict: ``{"timm_name": "vit_tiny_patch16_224", "kwargs": {...},
"pretrained": null | "hub" | "path/to/weights.safetensors"}``. ``kwargs`` go to
``timm.create_model`` (num_classes, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
layers, channels …) so small ViTs and ResNets train on 8–32 px digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path, atomic_write_json
from noisynn.io.safetensors_header import read_safetensors_header
from noisynn.vocab import PREPROCESSES

CHECKPOINT_FORMAT = "noisynn-checkpoint/1"
MODEL_KEYS = {"timm_name": (str,), "kwargs": (dict, type(None)), "pretrained": (str, type(None)),
              "augment": (dict, type(None)), "image_size": (int, type(None)), "preprocess": (str, type(None))}


def check_model_config(model_cfg, what: str = "model config", strict: bool = False) -> None:
    """A model config is a mapping of ``MODEL_KEYS`` with values of their types; ``strict`` also
    refuses keys outside them (what a user types on the command line)."""
    if not isinstance(model_cfg, dict):
        raise UserError(f"{what} must be a mapping such as {{'timm_name': 'resnet18', 'kwargs': {{}}}}; got {model_cfg!r}.")
    if not isinstance(model_cfg.get("timm_name"), str) or not model_cfg["timm_name"]:
        raise UserError(f"{what} needs timm_name, the name of a timm model (e.g. 'vit_tiny_patch16_224'); "
                        f"got {model_cfg.get('timm_name')!r}.")
    unknown = sorted(set(model_cfg) - set(MODEL_KEYS))
    if strict and unknown:
        raise UserError(f"{what} has unknown key {unknown[0]!r} (allowed: {', '.join(MODEL_KEYS)}).")
    for key, types in MODEL_KEYS.items():
        value = model_cfg.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "a mapping",
                                                                  "int": "an integer"}[t.__name__] for t in types)
            raise UserError(f"{what} key {key} must be {want}; got {value!r}.")
    if model_cfg.get("preprocess") not in (None, *PREPROCESSES):
        raise UserError(f"{what} key preprocess must be one of {', '.join(PREPROCESSES)}; got {model_cfg['preprocess']!r}.")
    if isinstance(model_cfg.get("image_size"), int) and model_cfg["image_size"] < 1:
        raise UserError(f"{what} key image_size must be a positive integer; got {model_cfg['image_size']}.")


def build_model(model_cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """Create the timm model a config names (random init unless ``pretrained`` says otherwise).

    Under ``with torch.device("meta"):`` the model costs nothing: what the config checks use.
    """
    import timm

    check_model_config(model_cfg)
    name = model_cfg.get("timm_name")
    # is_model, not list_models: a name may carry a weight tag (vit_base_patch16_384.augreg_in21k_ft_in1k)
    if not name or not timm.is_model(name):
        raise UserError(f"model timm_name {name!r} is not a timm model (see timm.list_models()).")
    if "." in name and not timm.list_pretrained(name):
        arch, tag = name.split(".", 1)
        raise UserError(f"model timm_name {name!r}: timm has no weights tagged {tag!r} for {arch} "
                        f"(see timm.list_pretrained('{arch}.*')).")
    kwargs = dict(model_cfg.get("kwargs") or {})
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_chans", in_chans)
    for key in ("layers", "channels"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    pretrained = model_cfg.get("pretrained")
    try:
        model = timm.create_model(name, pretrained=(pretrained == "hub"), **kwargs)
    except TypeError as e:
        raise UserError(f"model kwargs {sorted(kwargs)} are not accepted by timm model {name!r} ({e}).") from None
    except (OSError, RuntimeError) as e:
        if pretrained == "hub":
            raise UserError(
                f"pretrained weights for {name!r} could not be fetched from the hub ({type(e).__name__}); "
                "download them where the network allows and set pretrained: /path/to/weights.safetensors."
            ) from None
        raise _kwargs_refused(name, kwargs, e) from None
    except (AssertionError, ValueError, ZeroDivisionError, IndexError, KeyError, AttributeError) as e:
        # timm's own checks of the kwargs (assertions, divisions, lookups) inside timm's code
        raise _kwargs_refused(name, kwargs, e) from None
    if pretrained not in (None, "hub"):
        load_pretrained_weights(model, Path(pretrained), name)
    return model


def _kwargs_refused(name: str, kwargs: dict, e: Exception) -> UserError:
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    return UserError(f"model kwargs {json.dumps(kwargs, sort_keys=True, default=str)} are not accepted by timm model "
                     f"{name!r} ({type(e).__name__}{': ' + detail if detail else ''}).")


def meta_model(model_cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """The model a config describes, on the meta device (no memory, no weights read): for checks."""
    with torch.device("meta"):
        return build_model({**model_cfg, "pretrained": None}, num_classes, in_chans).eval()


# what a forward pass raises when a model's own code cannot handle its configuration or input (a
# meta device's missing kernels raise NotImplementedError, or a RuntimeError naming the meta device,
# and prove nothing)
_CONFIG_FAILURES = (AttributeError, TypeError, ValueError, AssertionError, IndexError, KeyError, ZeroDivisionError)
# what an op without a meta kernel raises: nothing is proven then, the real forward checks it
_NO_META_KERNEL = (NotImplementedError, RuntimeError)


def check_forward(model: nn.Module, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse a model whose forward pass fails on a batch of ``input_shape`` (a meta-device model,
    so nothing is computed): kwargs that timm accepts but that build a model that cannot run,
    such as fewer ResNet ``layers`` than stages."""
    if next(iter(model.parameters()), torch.empty(0)).device.type != "meta":
        raise ValueError("check_forward needs a meta-device model (see meta_model)")
    try:
        with torch.no_grad():
            model(torch.empty(*input_shape, device="meta"))
    except UserError:
        raise
    except (*_CONFIG_FAILURES, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "meta" in str(e).lower():
            return  # an op the meta device cannot run (a value read out of a meta tensor): the real forward checks it
        # a shape the model's ops cannot take (a kernel larger than the image, mismatched matrices) is a
        # RuntimeError on the meta device as on a real one
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{what} cannot run on a batch of shape {tuple(input_shape)} "
                        f"({type(e).__name__}: {detail}); check its kwargs and the data's image size.") from None
    except NotImplementedError:  # an op without a meta kernel: the real forward checks it
        return


def check_noises_act(model: nn.Module, site: str, specs, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse, before any real work, a noise that cannot act at ``site`` or that the site makes the
    identity (a linear noise over an axis of size 1, e.g. ``rows`` on a 1×1 feature map).

    One forward of a meta-device batch of ``input_shape`` up to the site, then each deterministic
    noise's hook on what the site received: its own checks run on the shapes the real batch will
    have, at no cost. The random kinds
    act on any tensor and are not run (their generators need a real device). A model whose forward
    the meta device cannot run is left to the hook's checks at the first real batch.
    """
    from noisynn.inject.hook import inject
    from noisynn.inject.split import site_input

    specs = [sp for sp in specs if sp.kind.startswith("linear")]
    if not specs:
        return
    if next(iter(model.parameters()), torch.empty(0)).device.type != "meta":
        raise ValueError("check_noises_act needs a meta-device model (see meta_model)")
    # one forward up to the site, whose input each noise's hook then checks (a noise keeps the shape,
    # so what follows the site cannot fail because of it)
    try:
        with torch.no_grad():
            reached = site_input(model, site, torch.empty(*input_shape, device="meta"))
    except _NO_META_KERNEL:  # the real forward checks it
        return
    if reached is None:
        return  # the forward never reached the site: the real forward's hook will say so
    module, args = reached
    for spec in specs:
        injection = inject(model, site, spec, at_train=True, at_eval=True)
        try:
            injection.apply(module, args)
        except UserError as e:
            raise UserError(f"{what}: noise {spec.kind} on axis {spec.axis}: {e}") from None
        except _NO_META_KERNEL:  # this noise is left to the real forward; the others are still checked
            continue
        finally:
            injection.remove()


def check_model_fits_data(model: nn.Module, what: str, data_dir, num_classes: int, in_chans: int, image_size: int) -> None:
    """Refuse a model that cannot take a dataset's images or predict its classes, naming both.

    Caught here, these mismatches are one sentence; left alone they surface as a shape error deep
    in a forward pass (or, for the classes, as a silently meaningless accuracy).
    """
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != int(num_classes):
        raise UserError(f"{what} predicts {model_classes} classes but dataset {data_dir} has {num_classes}.")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != in_chans:
        raise UserError(
            f"{what} takes {first_conv.in_channels}-channel images but dataset {data_dir} has {in_chans}-channel images."
        )
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
    if fixed is not None and tuple(fixed) != (image_size, image_size):
        raise UserError(
            f"{what} takes {fixed[0]}×{fixed[1]} px images but dataset {data_dir} has {image_size}×{image_size} px images."
        )


def check_pretrained_file(path: Path, model_name: str) -> dict:
    """A local pretrained weights file must exist, be named ``.safetensors`` and have a readable
    header; returns the header's tensors (name → (dtype, shape)). Reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist (model {model_name}).")
    if path.suffix != ".safetensors":
        raise UserError(f"pretrained weights file {path} must be a .safetensors file (pickled checkpoints are never loaded).")
    return read_safetensors_header(path, "pretrained weights file")


def load_weights_file(path: Path, what: str) -> dict:
    """The tensors of a safetensors file, checked as a file where it enters: its size and header
    (``read_safetensors_header``), then every floating tensor finite (a NaN or inf weight makes every
    later number meaningless, so it is refused here rather than evaluated to chance accuracy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path, what)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable safetensors file ({e}).") from None
    _refuse_non_finite(state.items(), path, what)
    return state


def _refuse_non_finite(tensors, path: Path, what: str) -> None:
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{what} {path} holds {bad} non-finite value(s) (NaN or inf) in tensor {name}; "
                            "such weights cannot be evaluated or trained (a diverged training?).")


def check_weights_finite(path: Path, what: str) -> None:
    """Refuse a safetensors file holding a NaN or inf weight, one tensor in memory at a time (the
    config check reads a large pretrained file this way, before any job)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        _refuse_non_finite(((name, fh.get_tensor(name)) for name in fh.keys()), path, what)


def unfit_tensors(model: nn.Module, shapes: dict[str, tuple]) -> tuple[list[str], list[str]]:
    """The model's tensors (classifier aside) that ``shapes`` lacks, and those it has in another shape."""
    own = model.state_dict()
    head_keys = _classifier_keys(model)
    missing = [k for k in own if k not in shapes and k not in head_keys]
    mismatched = [k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k].shape) and k not in head_keys]
    return missing, mismatched


def refuse_unfit_weights(model: nn.Module, shapes: dict[str, tuple], path: Path, model_name: str) -> None:
    missing, mismatched = unfit_tensors(model, shapes)
    if missing or mismatched:
        saved = _sidecar_model_name(path)
        bad = (missing + mismatched)[:3]
        raise UserError(
            f"pretrained weights {path} (model {saved or 'unknown'}) do not fit model {model_name}: "
            f"{len(missing)} missing and {len(mismatched)} mis-shaped tensors, e.g. {', '.join(bad)}."
        )


def load_pretrained_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a local safetensors file (timm's or ours) into ``model``; a new classifier is kept fresh."""
    check_pretrained_file(path, model_name)
    state = load_weights_file(path, "pretrained weights file")
    refuse_unfit_weights(model, {k: tuple(v.shape) for k, v in state.items()}, path, model_name)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if clf is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(clf))
    return {f"{prefix}.{k}" for k in clf.state_dict()} if prefix else set()


def _sidecar_model_name(path: Path) -> str | None:
    side = sidecar_path(path)
    if side.is_file():
        try:
            name = json.loads(side.read_text()).get("model", {}).get("timm_name")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None
        return name if isinstance(name, str) else None
    return None


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(model: nn.Module, weights: Path, meta: dict) -> None:
    """Write ``weights`` (safetensors) and its sidecar JSON atomically; sidecar last, as the seal."""
    from safetensors.torch import save_file

    weights = Path(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        # one metadata key only: safetensors writes several in a random order, and equal weights
        # must give equal bytes (content hashes of DVC and Snakemake); the model name is in the sidecar
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_json(sidecar_path(weights), {"format": CHECKPOINT_FORMAT, **meta})


def read_sidecar(weights: Path) -> dict:
    weights = Path(weights)
    side = sidecar_path(weights)
    if weights.is_dir():
        raise UserError(f"checkpoint {weights} is a folder; expected its model.safetensors file.")
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} does not exist.")
    if not side.is_file():
        raise UserError(f"checkpoint {weights} has no sidecar {side.name} (expected the JSON written with every noisynn checkpoint).")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint sidecar {side} is not valid JSON ({e.msg}).") from None
    except UnicodeDecodeError:
        raise UserError(f"checkpoint sidecar {side} is not text (expected the JSON written with the checkpoint).") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint sidecar {side} holds a JSON {type(meta).__name__}; expected an object with "
                        "format, model, num_classes and in_chans.")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint sidecar {side} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}.")
    if "model" not in meta:
        raise UserError(f"checkpoint sidecar {side} lacks key model (the timm model the weights belong to).")
    check_model_config(meta["model"], f"checkpoint sidecar {side}: key model")
    for key in ("num_classes", "in_chans"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"checkpoint sidecar {side}: key {key} must be a positive integer; got {value!r}.")
    return meta


def load_checkpoint(weights: Path, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint's sidecar names and load its weights (no unpickling).

    The weights file is checked as a file first (size, header, every tensor finite).
    """
    meta = read_sidecar(weights)
    name = meta["model"]["timm_name"]
    if expect_model and expect_model != name:
        raise UserError(f"checkpoint {weights} holds model {name}, but {expect_model} was expected.")
    state = load_weights_file(Path(weights), "checkpoint")
    cfg = dict(meta["model"], pretrained=None)
    model = build_model(cfg, meta["num_classes"], meta["in_chans"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {weights} does not match model {name} described by its sidecar ({first}).") from None
    return model, meta


def import_weights(model_cfg: dict, data_dir: Path, out_dir: Path, allow_new_head: bool = False) -> Path:
    """Wrap pretrained weights (hub or a local .safetensors) as a noisynn checkpoint, unchanged.

    This is the start of the released recipe (timm's ImageNet weights) and the whole of an audit
    of released weights: no optimizer step runs. The weights must classify the dataset as they
    are, classifier included; weights whose classifier does not fit are refused.
    """
    from noisynn.data import load_dataset
    from noisynn.io.provenance import provenance

    if model_cfg.get("pretrained") in (None, ""):
        raise UserError(f"import-weights needs pretrained weights for model {model_cfg.get('timm_name')} "
                        "(pretrained: hub or a .safetensors path).")
    data = load_dataset(Path(data_dir), model_cfg, train_augment=False, splits=("val",))
    model = build_model(model_cfg, data.num_classes, data.in_chans)
    pre = model_cfg["pretrained"]
    new_head = False
    if pre != "hub":
        state = load_weights_file(Path(pre), "pretrained weights file")
        head = _classifier_keys(model)
        own = model.state_dict()
        unfit = sorted(k for k in head if k not in state or state[k].shape != own[k].shape)
        new_head = bool(unfit)
        if unfit and not allow_new_head:
            raise UserError(f"pretrained weights {pre} have no classifier for the {data.num_classes} classes of "
                            f"{data_dir} (tensor {unfit[0]}); weights imported as loaded must classify the dataset.")
    else:
        hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        new_head = hub_classes not in (None, data.num_classes)
        if new_head and not allow_new_head:
            raise UserError(f"hub weights of {model_cfg.get('timm_name')} classify {hub_classes} classes, not the "
                            f"{data.num_classes} of {data_dir}; weights imported as loaded must classify the dataset.")
    check_model_fits_data(model, f"model {model_cfg.get('timm_name')}", data_dir, data.num_classes, data.in_chans,
                          data.image_size)
    meta = {
        "stage": "imported",
        "new_head": new_head,
        "model": {k: v for k, v in model_cfg.items()},
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "image_size": data.image_size,
        "data_fingerprint": data.fingerprint,
        "init_checkpoint": None,
        "train_args": None,
        **provenance(None),
    }
    weights = Path(out_dir) / "model.safetensors"
    save_checkpoint(model, weights, meta)
    return weights


def data_kwargs(model_cfg: dict, model: nn.Module, num_classes: int, in_chans: int, image_size: int) -> dict:
    """The kwargs that rebuild ``model`` (built from ``model_cfg``) for a dataset: its classes and
    channels, and its image size where the model has one (a ViT's patch grid)."""
    kwargs = {**(model_cfg.get("kwargs") or {}), "num_classes": num_classes, "in_chans": in_chans}
    if "img_size" in kwargs or hasattr(model, "patch_embed"):
        kwargs["img_size"] = image_size
    return kwargs


def adapt_to_data(model: nn.Module, meta: dict, num_classes: int, in_chans: int, image_size: int) -> tuple[nn.Module, dict, list[str]]:
    """The model of a checkpoint rebuilt for another dataset (transfer), its weights carried over.

    The classifier is new (the new dataset's classes); a ViT's position embedding is resampled to the
    new patch grid and a first convolution summed or repeated over the new input channels (timm's
    helpers); any other tensor whose shape changed is left at its initialization and named.
    Returns (model, its model config, what was adapted).
    """
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    cfg = dict(meta["model"])
    cfg = {**cfg, "kwargs": data_kwargs(cfg, model, num_classes, in_chans, image_size), "pretrained": None}
    new = build_model(cfg, num_classes, in_chans)
    old_state, own = model.state_dict(), new.state_dict()
    head = _classifier_keys(new)
    load, fresh = {}, []
    for key, target in own.items():
        value = old_state.get(key)
        if key in head or value is None:
            fresh.append(key)
        elif value.shape == target.shape:
            load[key] = value
        elif key.endswith("pos_embed") and value.dim() == 3:
            prefix = 0 if getattr(new, "no_embed_class", False) else int(getattr(new, "num_prefix_tokens", 0))
            grid = new.patch_embed.grid_size
            load[key] = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)
        elif value.dim() == 4 and value.shape[1] != target.shape[1] and value.shape[0] == target.shape[0]:
            load[key] = adapt_input_conv(target.shape[1], value)
        else:
            fresh.append(key)
    new.load_state_dict(load, strict=False)
    adapted = [f"classifier for {num_classes} classes"]
    if meta.get("image_size") != image_size:
        adapted.append(f"input {meta.get('image_size')} → {image_size} px")
    if meta.get("in_chans") != in_chans:
        adapted.append(f"{meta.get('in_chans')} → {in_chans} input channels")
    others = [k for k in fresh if k not in head]
    if others:
        adapted.append(f"{len(others)} tensors re-initialized ({', '.join(others[:3])})")
    return new, cfg, adapted
