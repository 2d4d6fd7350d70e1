"""torchrun support: process rank, world size, and reductions. A plain `mbv2 train` is world size 1.

torchrun's RANK, WORLD_SIZE and LOCAL_RANK are read here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 does every write (checkpoints, metrics, TensorBoard, console)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up, or return world size 1 outside torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """Reduce a copy of a tensor over all processes (the tensor itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=op)
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity in a single process)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def current_rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_ranks_true(flag: torch.Tensor) -> bool:
    """Whether a boolean tensor is true on every process: one small reduction, so that all ranks take
    the same branch (a rank that skips a backward pass while the others all-reduce gradients would hang)."""
    return bool(_all_reduce(flag.to(torch.int32), dist.ReduceOp.MIN).item())


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of an integer's values over all processes (itself in a single process)."""
    return int(_all_reduce(torch.tensor([value], device=device, dtype=torch.int64), dist.ReduceOp.MIN).item())


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every process's copy of a tensor, stacked by rank: (world size, *shape) (a single row outside
    torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values.unsqueeze(0)
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values.contiguous())
    return torch.stack(rows)


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite these tensors, in place, with rank 0's values (nothing to do in a single process)."""
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
