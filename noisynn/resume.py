"""A training's resume state in ``<run>/recovery/``: safetensors and JSON, never a pickle.

Rank 0 writes the model, the optimizer and the epoch's rows (``state.safetensors``, ``state.json``);
every rank, rank 0 included, writes its own random streams (torch's CPU generator, its CUDA
generator where there is one, the noise's) and the partial sums of the epoch it stopped in
(``rank-<r>.safetensors``): under torchrun each process draws its own training noise
and counts its own share of the loss, so each must resume its own. All files carry the position
(epoch, step) they were saved at; a set that disagrees, or that belongs to other settings, data or
starting weights, is discarded with a message and training starts over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noisynn.io.atomic import atomic_path, atomic_write_json
from noisynn.io.provenance import file_sha256

# settings that may change between an interrupted run and its resumption without changing the result
RESUME_FREE_KEYS = ("out_dir", "data_dir", "num_workers")


def run_identity(args: dict, init_checkpoint: str | None, data_fingerprint: str, world_size: int) -> dict:
    """What a resume state belongs to: the settings that decide the weights, the data, the start."""
    args = {k: v for k, v in args.items() if k not in RESUME_FREE_KEYS}
    init = file_sha256(init_checkpoint) if init_checkpoint else None
    identity = {"args": args, "data_fingerprint": data_fingerprint, "init_sha256": init, "world_size": world_size}
    return json.loads(json.dumps(identity))


def _rank_file(recovery: Path, rank: int) -> Path:
    return recovery / f"rank-{rank}.safetensors"


def save(recovery: Path, dist, model, optimizer, noise_rng, progress: dict, partial: dict | None) -> None:
    """Save the resume state of every rank (a collective call: every process calls it)."""
    from safetensors.torch import save_file

    position = {"epoch": str(progress["epoch"]), "step": str(progress["step"])}
    mine = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # dropout and drop-path on the GPU draw from this process's CUDA generator
        mine["rng.cuda"] = torch.cuda.get_rng_state()
    if noise_rng is not None:
        mine["rng.noise"] = noise_rng.cpu()
    # the partial sums travel as exact strings (float.hex) in the metadata
    sums = {k: float(v).hex() for k, v in (partial or {}).items()}
    if dist.is_main:
        recovery.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with atomic_path(_rank_file(recovery, dist.rank)) as tmp:
        save_file(mine, str(tmp), metadata={**position, **{f"sum.{k}": v for k, v in sums.items()}})
    dist.barrier()
    if dist.is_main:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        opt = optimizer.state_dict()
        scalars = {"param_groups": opt["param_groups"], "state_keys": {}}
        for pid, st in opt["state"].items():
            keys = []
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{pid}.{name}"] = val.detach().cpu().contiguous()
                    keys.append(name)
            scalars["state_keys"][str(pid)] = keys
        with atomic_path(recovery / "state.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=position)
        # state.json last: it is the seal of a complete save
        atomic_write_json(recovery / "state.json", {**progress, "optimizer": scalars})
    dist.barrier()


def drop(recovery: Path, reason: str, is_main: bool) -> None:
    if is_main:
        print(f"noisynn: discarding the resume state in {recovery} ({reason}); training starts over", flush=True)
        for path in [recovery / "state.json", recovery / "state.safetensors", *recovery.glob("rank-*.safetensors")]:
            path.unlink(missing_ok=True)


def discard_foreign(recovery: Path, identity: dict, is_main: bool) -> None:
    """Delete a resume state that belongs to other settings, data or starting weights, saying why.

    A workflow reruns a job when its settings change; resuming the old state would then hand back
    weights trained with the old settings, so the state is dropped and training starts over.
    """
    meta_path = recovery / "state.json"
    if not meta_path.is_file():
        return
    try:
        saved = json.loads(meta_path.read_text()).get("run")
    except json.JSONDecodeError:
        return drop(recovery, "state.json is not valid JSON", is_main)
    if saved is None or saved == identity:
        return
    drop(recovery, identity_difference(saved, identity), is_main)


def identity_difference(saved: dict, identity: dict) -> str | None:
    """What differs between a run identity recorded earlier and this run's, in words; None if nothing."""
    if saved == identity:
        return None
    if saved.get("data_fingerprint") != identity["data_fingerprint"]:
        return "the dataset fingerprint changed"
    if saved.get("init_sha256") != identity["init_sha256"]:
        return "the starting checkpoint changed"
    if saved.get("world_size") != identity["world_size"]:
        return f"{saved.get('world_size')} processes then, {identity['world_size']} now"
    old, new = saved.get("args", {}), identity["args"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"{changed[0]} was {old.get(changed[0])!r}, now {new.get(changed[0])!r}" if changed else "other settings"


def _read(recovery: Path, rank: int):
    """(meta, shared tensors, this rank's tensors, this rank's partial sums), or the reason it cannot resume."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    meta = json.loads((recovery / "state.json").read_text())
    expected = {"epoch": str(meta["epoch"]), "step": str(meta["step"])}
    try:
        with safe_open(str(recovery / "state.safetensors"), framework="pt") as fh:
            shared_position = fh.metadata() or {}
        with safe_open(str(_rank_file(recovery, rank)), framework="pt") as fh:
            rank_meta = fh.metadata() or {}
        shared = load_file(str(recovery / "state.safetensors"))
        mine = load_file(str(_rank_file(recovery, rank)))
    except (OSError, SafetensorError) as e:
        return f"the saved state is unreadable: {e}"
    for what, pos in (("state.safetensors", shared_position), (f"rank-{rank}.safetensors", rank_meta)):
        if (pos.get("epoch"), pos.get("step")) != (expected["epoch"], expected["step"]):
            return f"state.json and {what} are from different saves"
    sums = {k[len("sum."):]: float.fromhex(v) for k, v in rank_meta.items() if k.startswith("sum.")}
    return meta, shared, mine, sums


def load(recovery: Path, dist, device, model, optimizer):
    """Resume every rank from its own state; returns (meta, noise RNG state, partial sums) or None.

    A collective call: if any rank cannot resume, none does (and the state is dropped).
    """
    if not (recovery / "state.json").is_file():
        return None
    got = _read(recovery, dist.rank)
    failed = isinstance(got, str)
    if dist.any_flag(failed, device):
        drop(recovery, got if failed else "another process could not read its state", dist.is_main)
        dist.barrier()
        return None
    meta, shared, mine, sums = got
    model.load_state_dict({k[len("model."):]: v for k, v in shared.items() if k.startswith("model.")})
    opt_state = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for pid, keys in meta["optimizer"]["state_keys"].items():
        opt_state["state"][int(pid)] = {name: shared[f"optim.{pid}.{name}"] for name in keys}
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(mine["rng.torch"])
    if "rng.cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["rng.cuda"])
    return meta, mine.get("rng.noise"), sums
