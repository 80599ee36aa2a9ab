"""The k a batch-mixing noise sees in training, and the processes a training job runs (no torch import:
the config check applies the rule before any job starts, and the training again on its own processes)."""

from __future__ import annotations

from noisynn.vocab import LINEAR_NOISE_KINDS


def processes(resources: dict) -> int:
    """The processes a training job runs under torchrun: its GPUs, else its CPU processes, else one."""
    return int(resources.get("gpu", 0) or 0) or int(resources.get("nproc", 1) or 1)


def mixes_batch(noise: dict) -> bool:
    """Whether a noise makes a sample's output depend on the other samples of its batch: a linear
    noise on the batch axis (k = the batch it sees), or impulse noise (its max and min are the batch's).
    ``axis`` is one axis, or the list of a config's noise entry (mixing if any of them is the batch)."""
    kind, axis = noise.get("kind"), noise.get("axis")
    axes = axis if isinstance(axis, list) else [axis]
    return kind == "impulse" or (kind in LINEAR_NOISE_KINDS and "batch" in axes)


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
