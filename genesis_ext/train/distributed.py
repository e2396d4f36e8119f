"""torch.distributed helpers: a run under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process
group; everything else is a single process (rank 0 of 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (sum, then divide: the order DDP uses for gradients)."""
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def broadcast(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.broadcast(value, 0)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """The training device: ``None`` or ``"auto"`` is this process's GPU (``cuda:<local_rank>``) where torch has CUDA,
    else the CPU; a CUDA device torch cannot use is a ValueError that says so."""
    if name in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to torch here")
    return torch.device(name)


def setup(device: str | None) -> Dist:
    """Join the process group when launched by torchrun (backend nccl for CUDA, gloo otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    cuda = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0))).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)
