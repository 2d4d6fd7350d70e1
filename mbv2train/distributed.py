"""torchrun support: process rank, world size, and reductions. A plain `mbv2 train` is world size 1.

torchrun's RANK, WORLD_SIZE and LOCAL_RANK come from launch.py, which reads them without torch.

Two kinds of agreement between processes: tensors that live on the device (sums, the non-finite flag)
go through the main process group (NCCL on GPUs), never read back by the host during a step; flags that
the host raises (a stop signal, rank 0's clock) go through a gloo group on the CPU, so that agreeing on
them never waits for the GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mbv2train import launch
from mbv2train.errors import CheckFailed
from mbv2train.launch import restart_count


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


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun set up, or return world size 1 outside torchrun.

    ``timeout_s`` (train.dist_timeout_s) bounds how long a collective waits for a process that died or
    hung: past it the others raise (gloo) or are ended by NCCL's watchdog, instead of waiting forever."""
    world_size = launch.world_size()
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(launch.rank(), world_size, launch.local_rank())
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)  # the local rank picks the GPU on every node
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, rank, size = next(dist.rendezvous("env://", info.rank, world_size, timeout=timeout))
        # torchrun keeps its store across restarts of the worker group: without a name of their own, a
        # restarted group's processes can read the addresses the dead attempt left there and connect to them
        store = dist.PrefixStore(f"mbv2/attempt_{restart_count()}/", store)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=size, timeout=timeout)
    global _host_group
    # every process creates it, in the same order: new_group is itself a collective
    _host_group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                   if dist.get_backend() != "gloo" else None)
    return info


class PeerFailure(CheckFailed):
    """A collective failed because another process died, hung past train.dist_timeout_s, or closed its
    connection; the message says which, in one line (exit 1: the run failed, the input was fine)."""


# What gloo and NCCL say when a peer is gone: their errors are plain RuntimeErrors otherwise.
_PEER_FAILURE_SIGNS = ("Timed out", "timed out", "Application timeout", "Connection closed by peer",
                       "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")


def as_peer_failure(exc: BaseException, rank: int, timeout_s: float) -> Optional[PeerFailure]:
    """A PeerFailure naming what happened, when ``exc`` is a failed collective; None for anything else."""
    text = " ".join(str(exc).split())
    backend_error = isinstance(exc, getattr(dist, "DistError", ()))
    if not backend_error and not (isinstance(exc, RuntimeError) and any(s in text for s in _PEER_FAILURE_SIGNS)):
        return None
    if "imed out" in text or "timeout" in text:
        what = (f"another process did not reach the same collective within train.dist_timeout_s "
                f"{timeout_s:g} s (it hung or died)")
    else:
        what = "another process closed its connection (it died)"
    return PeerFailure(f"rank {rank}: training stopped: {what}; last checkpoint kept. Detail: {text[:200]}")


def shutdown_distributed() -> None:
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# The group for host-side flags: a gloo group beside NCCL, None when the main group is gloo already (CPU).
_host_group = None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


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


def current_world_size() -> int:
    """The number of processes (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank_later(flag: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start finding out whether a boolean device tensor is true on any process; returns the function
    that gives the answer, as a boolean tensor on the device. The reduction runs while the caller goes
    on, and waiting for it holds back the device's stream, not the host (NCCL). In a single process the
    answer is the flag itself, at no cost."""
    if not _initialized():
        return lambda: flag
    values = flag.to(torch.uint8)
    work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)

    def answer() -> torch.Tensor:
        work.wait()
        return values.bool()
    return answer


def any_rank(flag: bool) -> bool:
    """Whether a host-side flag is set on any process (itself in a single process): a blocking all-reduce
    of one integer on the CPU, which never waits for the GPU."""
    if not _initialized():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value[0])


class StepVote:
    """Host-side flags (a stop signal, rank 0's clock) that every process must act on at the same step,
    agreed on without making any step wait. Under torchrun each step ``cast``s its flags in an all-reduce
    on the CPU that runs while the next step computes, and the next step ``collect``s the answer: the
    processes act one step after a flag was raised, all at that same step. In a single process
    ``collect`` gives the flags of this very step, and nothing else is done."""

    def __init__(self):
        self._pending: Optional[tuple[torch.Tensor, object]] = None

    def collect(self, mine: tuple[bool, ...]) -> tuple[bool, ...]:
        """The agreed flags: ``mine`` in a single process; under torchrun, those of the previous step's
        cast (all false before the first)."""
        if not _initialized():
            return mine
        pending, self._pending = self._pending, None
        if pending is None:
            return tuple(False for _ in mine)
        values, work = pending
        work.wait()
        return tuple(bool(v) for v in values.tolist())

    def cast(self, mine: tuple[bool, ...]) -> None:
        """Send this step's flags (under torchrun; nothing to do in a single process)."""
        if _initialized():
            values = torch.tensor([int(flag) for flag in mine], dtype=torch.int32)
            work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_host_group, async_op=True)
            self._pending = (values, work)

    def drain(self) -> None:
        """Wait for a cast nobody will collect (at an epoch's end), so that no reduction is left in flight.
        The flags themselves are not lost: a stop signal stays set, and rank 0's clock stays past due."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None


def gather_objects(value) -> list:
    """Every process's ``value`` (any picklable object), in rank order ([value] in a single process): a
    collective on the CPU group, which never waits for the GPU."""
    if not _initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_host_group)
    return values


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


# How long a process tries to reach torchrun's store before it says its line anyway: the agent answers at
# once while it runs; this only bounds the wait of a process whose agent is gone.
SAY_ONCE_TIMEOUT_S = 10.0


def first_to_say(line: str) -> bool:
    """Whether this process is the first of its torchrun job to say ``line``: under torchrun every process
    meets a stop, and most mistakes, at once, and would print the same line; said once per job, it stays
    one line. A line only one process has (its own failure) is still said, by that process.

    The processes count each line in the store torchrun's agent keeps for the job, which outlives them and
    their process group, so this works before the group is joined and after it is gone. Outside torchrun,
    or with the store out of reach, every process says its lines."""
    where = launch.agent_store()
    if where is None:
        return True
    key = f"mbv2/attempt_{restart_count()}/said/{hashlib.sha256(line.encode()).hexdigest()}"
    try:
        store = dist.TCPStore(where[0], where[1], is_master=False, timeout=timedelta(seconds=SAY_ONCE_TIMEOUT_S))
        return store.add(key, 1) == 1
    except (RuntimeError, OSError, ValueError):
        return True
