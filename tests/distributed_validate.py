"""Validate a checkpoint with ``train.validate`` in one process or several, and print what it measured.

Used by tests/test_distributed.py: ``[torchrun ...] tests/distributed_validate.py DATA CHECKPOINT``.
Rank 0 prints one JSON line: the clean and the noisy (optimal Q on the batch axis, batches of 10)
top-1, and the images each process put through the model.
"""

import json
import sys

import torch

from noisynn.data import load_dataset
from noisynn.distributed import Distributed
from noisynn.inject.hook import inject
from noisynn.models.checkpoints import load_checkpoint
from noisynn.noise import NoiseSpec
from noisynn.train import validate

if __name__ == "__main__":
    data_dir, checkpoint = sys.argv[1:3]
    dist = Distributed()
    device = dist.device()
    model, _ = load_checkpoint(checkpoint)
    data = load_dataset(data_dir)
    images = [0]
    model.register_forward_pre_hook(lambda module, args: images.__setitem__(0, images[0] + args[0].shape[0]))
    clean = validate(model, data.val, 256, device, dist=dist)
    handle = inject(model, "blocks.1.attn", NoiseSpec.from_dict({"kind": "linear-optimal", "axis": "batch"}))
    noisy = validate(model, data.val, 10, device, order_seed=0, dist=dist)
    handle.remove()
    counts = [torch.zeros(dist.world, dtype=torch.float64)]
    counts[0][dist.rank] = images[0]
    if dist.enabled:
        torch.distributed.all_reduce(counts[0])
    if dist.is_main:
        print(json.dumps({"clean": clean, "noisy": noisy, "images": counts[0].tolist(), "n": len(data.val)}))
    dist.close()
