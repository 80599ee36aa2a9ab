"""The test orders: how the indices of a test set are cut into batches (numpy only, no torch import).

The evaluation protocols (``vocab.PROTOCOL_DEFS``) name an order and a batch size; the experiments
that separate the batch leak from the entropy theory (docs/paper.md §6) need two more cuts:
batches of a chosen purity (``purity_batches``) and any batch size (``batches_in_order`` takes one).
"""

from __future__ import annotations

import numpy as np

from noisynn.errors import UserError
from noisynn.vocab import ORDERS

# the orders and batch sizes of the batch-size sweep, and the purity sweep's batch size (the theory's
# ΔS* = (k-1)·ln(k+1) grows with k whatever a batch holds; the leak follows what it holds)
SWEEP_ORDERS = ("class_pure", "shuffled", "class_mixed")
SWEEP_BATCH_SIZES = (1, 2, 4, 8, 10, 16, 32, 64)
PURITY_BATCH_SIZE = 10


def batches_in_order(labels: np.ndarray, order: str, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Split the indices 0..N-1 into test batches in the named order; every index appears once.

    ``shuffled``: a seeded permutation, cut into batches;
    ``class_sorted``: sequential over the class-sorted samples (the released code's
    SequentialSampler over ImageFolder), cut into batches that may straddle two classes;
    ``class_pure``: every batch holds one class (a class's last batch may be smaller);
    ``class_mixed``: every batch holds distinct classes as far as the remaining classes allow.
    """
    labels = np.asarray(labels)
    if order not in ORDERS:
        raise UserError(f"test order must be one of {', '.join(ORDERS)}; got {order!r}.")
    if int(batch_size) < 1:
        raise UserError(f"test batch size must be a positive integer; got {batch_size}.")
    n = len(labels)
    if order == "shuffled":
        perm = np.random.default_rng(seed).permutation(n)
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    if order == "class_sorted":
        seq = np.concatenate([by_class[c] for c in sorted(by_class)]) if n else np.array([], dtype=int)
        return [seq[i : i + batch_size] for i in range(0, n, batch_size)]
    if order == "class_pure":
        return [idx[i : i + batch_size] for c in sorted(by_class) for idx in [by_class[c]] for i in range(0, len(idx), batch_size)]
    return _class_mixed(by_class, batch_size)


def forward_calls(batches: list[np.ndarray], max_images: int) -> list[list[np.ndarray]]:
    """Consecutive test batches grouped into forward calls of at most ``max_images`` images
    (a batch larger than that is a call of its own); each batch is still noised alone
    (``inject.hook.joined_batches``)."""
    calls: list[list[np.ndarray]] = []
    size = 0
    for b in batches:
        if calls and size + len(b) <= max_images:
            calls[-1].append(b)
            size += len(b)
        else:
            calls.append([b])
            size = len(b)
    return calls


def _class_mixed(by_class: dict, batch_size: int) -> list[np.ndarray]:
    """Batches of the test batch size (the last may be smaller) with the fewest repeated labels.

    With B = ceil(N / batch_size) batches, a class of n samples can sit in at most min(n, B) of
    them. Classes are placed largest demand first, one sample into each of the min(n, B) batches
    with the most room left (Havel–Hakimi on the class–batch bipartite graph, which reaches the
    max-flow optimum); what remains (samples of classes larger than B) fills the room left over.
    A batch-by-batch greedy is not optimal: it spends the room of early batches on repeats of
    small classes that later batches then lack.
    """
    n = sum(len(idx) for idx in by_class.values())
    if n == 0:
        return []
    num_batches = -(-n // batch_size)
    room = np.full(num_batches, batch_size, dtype=np.int64)
    room[-1] = n - batch_size * (num_batches - 1)
    batches: list[list[int]] = [[] for _ in range(num_batches)]
    queues = {c: list(map(int, idx)) for c, idx in by_class.items()}
    for c in sorted(queues, key=lambda c: (-min(len(queues[c]), num_batches), c)):
        # most room first, ties by batch position (a stable sort keeps it deterministic)
        targets = np.argsort(-room, kind="stable")[: min(len(queues[c]), num_batches)]
        for j in targets[room[targets] > 0]:
            batches[j].append(queues[c].pop(0))
            room[j] -= 1
    j = 0
    for c in sorted(queues):
        for i in queues[c]:
            while room[j] == 0:
                j += 1
            batches[j].append(i)
            room[j] -= 1
    return [np.array(b, dtype=np.int64) for b in batches]


def purity_batches(labels: np.ndarray, m: int, batch_size: int = 10, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches that hold ``m`` images of one class and ``batch_size - m`` of other classes.

    Every test image is a *target* exactly once: the images of each class are taken ``m`` at a
    time (a class's last group is completed with its first images), and each group is filled up to ``batch_size`` with
    images of other classes, as many distinct classes as there are (drawn from a seeded shuffle,
    so fillers repeat across batches but never within one). Returns (batch, targets) index pairs;
    the purity experiment scores only the targets.
    """
    labels = np.asarray(labels)
    if not 1 <= int(m) <= int(batch_size):
        raise UserError(f"purity m must lie in 1..{batch_size} (images of one class in a batch of {batch_size}); got {m}.")
    rng = np.random.default_rng([seed, m])
    classes = np.unique(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    pools = {c: rng.permutation(by_class[c]) for c in classes}
    cursor = {c: 0 for c in classes}
    out = []
    for c in classes:
        idx = by_class[c]
        others = [o for o in classes if o != c]
        for start in range(0, len(idx), m):
            targets = idx[start : start + m]
            # a class's last group is completed with its first images (not scored twice), so that
            # every batch holds exactly m images of the class
            same = np.concatenate([targets, idx[: m - len(targets)]]) if len(targets) < m else targets
            need = batch_size - m
            fill: list[int] = []
            order = rng.permutation(len(others)) if others else []
            while len(fill) < need and others:
                for j in order:
                    if len(fill) == need:
                        break
                    o = others[j]
                    pool = pools[o]
                    fill.append(int(pool[cursor[o] % len(pool)]))
                    cursor[o] += 1
            batch = np.concatenate([same, np.asarray(fill, dtype=np.int64)]).astype(np.int64)
            out.append((batch, targets.astype(np.int64)))
    return out
