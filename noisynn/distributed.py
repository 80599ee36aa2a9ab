"""The processes of a training under ``torchrun`` (NCCL on GPUs, gloo on CPU), or just one.

Every global batch of ``batch_size`` samples is split across the processes (``train.forward_batch``
says how many samples each forward pass, and so a batch-axis noise, sees); validation hands each
process whole test batches and sums the counts. Only rank 0 writes the run folder, but each rank
keeps its own noise stream and partial sums (``resume.py`` saves them).
"""

from __future__ import annotations

import os

import torch


class Distributed:
    """World size, rank and the few collective operations training needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # under torchrun, even one process joins a process group (NCCL on a GPU), as a job on N GPUs does
        self.enabled = self.world > 1 or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)
        cuda = torch.cuda.is_available()
        if cuda:
            # before NCCL starts: its communicator is then bound to this process's own GPU, not GPU 0
            torch.cuda.set_device(self.local_rank)
        if self.enabled:
            import torch.distributed as dist

            if cuda:
                dist.init_process_group(backend="nccl", device_id=torch.device("cuda", self.local_rank))
            else:
                dist.init_process_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def shard(self, items: list) -> list:
        """This process's share of a list: every ``world``-th item from its rank (whole items, never split)."""
        return items[self.rank :: self.world] if self.enabled else items

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        # on the training device: NCCL reduces CUDA tensors only
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the processes (the epoch's loss and accuracy counts)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()
