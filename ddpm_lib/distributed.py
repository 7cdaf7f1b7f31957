"""Several processes, one training run: torchrun's environment, the process group and barriers.

Under ``torchrun`` every process trains on its shard of the global batch with DistributedDataParallel;
alone, a process is rank 0 of 1 and nothing here talks to anyone.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device, bool]:
    """Join the process group described by torchrun's environment (``env://``), if any.

    Returns (info, this process's device, whether this call created the group). On CUDA each
    process takes GPU ``LOCAL_RANK`` and talks NCCL; on CPU it talks Gloo. The collective timeout
    is an hour, so other processes can wait while the main one samples a grid or writes a checkpoint.
    """
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)))
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    else:
        return DistInfo(), device, False
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return info, device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(hours=1))
    return info, device, True


def barrier(info: DistInfo) -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    if info.world_size > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``values`` averaged over the processes (in place; itself in a single-process run)."""
    if info.world_size > 1:
        dist.all_reduce(values)
        values /= info.world_size
    return values
