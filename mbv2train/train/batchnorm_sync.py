"""BatchNorm under torchrun: train.sync_bn's synchronized layers, and the running statistics that every
process agrees on before an evaluation or an epoch's save.

Without train.sync_bn each process normalizes with its own batch and keeps its own running statistics
(DDP hands rank 0's to the others at every forward). Evaluating or saving rank 0's alone would make the
result depend on rank 0's shard of the data, so at those points the statistics are averaged over the
processes (what timm calls ``--dist-bn reduce``).

With train.sync_bn the layers normalize with the statistics of the global batch, so every process holds
the same running statistics. torch's SyncBatchNorm does this on GPUs; it has no CPU kernels, so on the
CPU (gloo) ``ReducedBatchNorm2d`` computes the same moments with two differentiable all-reduces.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from mbv2train.distributed import all_gather_rows
from mbv2train.progress import log


class ReducedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode batch statistics are those of every process's batch together.

    Same parameters, buffers and state-dict keys as BatchNorm2d, so checkpoints do not depend on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count_here = x.numel() // channels
        xf = x.float()
        # one reduction for the sums and the count; autograd passes the gradients back through it
        moments = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)),
                             torch.tensor([float(count_here)], device=x.device)])
        moments = differentiable_all_reduce(moments)
        count = moments[-1]
        mean = moments[:channels] / count
        var = (moments[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        shape = (1, channels, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d (and its parameters and buffers) moved into a ReducedBatchNorm2d."""
    if type(module) is nn.BatchNorm2d:
        reduced = ReducedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device=module.running_mean.device)
        reduced.load_state_dict(module.state_dict())
        reduced.train(module.training)
        if module.affine:
            reduced.weight.requires_grad_(module.weight.requires_grad)
            reduced.bias.requires_grad_(module.bias.requires_grad)
        return reduced
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child))
    return module


def synchronize_batchnorm(model: nn.Module, device_type: str, world_size: int,
                          warn: Callable[[str], None] = log) -> nn.Module:
    """train.sync_bn: the model with BatchNorm layers that normalize over the global batch (the model itself
    with one process, where there is nothing to synchronize)."""
    if world_size <= 1:
        warn("warning: train.sync_bn has no effect with one process")
        return model
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def average_running_statistics(model: nn.Module) -> None:
    """Replace every BatchNorm layer's running mean and variance by their mean over the processes, in
    place on every process (nothing to do in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = _running_buffers(model)
    if not buffers:
        return
    flat = torch.cat([buffer.detach().reshape(-1).double() for buffer in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def _running_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buffer in (module.running_mean, module.running_var) if buffer is not None]


def gather_running_statistics(model: nn.Module) -> torch.Tensor:
    """Every process's BatchNorm running statistics, one row per rank (a collective: every process calls
    it). A mid-epoch checkpoint keeps them so that each process resumes with its own, as it had them."""
    buffers = _running_buffers(model)
    return all_gather_rows(torch.cat([buffer.detach().reshape(-1).float() for buffer in buffers])).cpu()


def restore_running_statistics(model: nn.Module, rows: torch.Tensor, rank: int) -> None:
    """Put back what gather_running_statistics saved: this rank's row when the checkpoint was written by as
    many processes, else (another number of processes) their mean."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    row = rows[rank] if len(rows) == world_size else rows.double().mean(dim=0).float()
    offset = 0
    for buffer in _running_buffers(model):
        buffer.copy_(row[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
