"""One evaluation pass over a loader: loss, top-1, top-5 (and a confusion matrix), summed over processes.
Training's validation, `mbv2 eval`, predict and quantize's check all go through it."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mbv2train.devices import Runtime
from mbv2train.distributed import all_reduce_sum, current_rank, current_world_size
from mbv2train.progress import Progress


def eval_logits(model: nn.Module, images: torch.Tensor, runtime: Runtime, tta_flip: bool = False) -> torch.Tensor:
    """Float32 logits of a prepared batch (Runtime.prepare) for a model in eval mode; with ``tta_flip``
    the mean of the logits of each image and of its mirror image (flipped left to right).

    evaluate and predict both go through here, so `mbv2 predict` computes exactly what `mbv2 eval` counts.
    """
    with runtime.autocast():
        logits = model(images).float()
        if tta_flip:
            logits = (logits + model(images.flip(-1)).float()) / 2
    return logits


def _num_outputs(model: nn.Module) -> int:
    """The number of classes: the out_features of the last Linear layer (the classifier), or what a model
    without one (an exported int8 program) says of itself."""
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


@torch.inference_mode()
def evaluate(model: nn.Module, loader, runtime: Runtime, progress: Progress | None = None, bad_images=None,
             should_stop: Callable[[], bool] | None = None, stop_check_batches: Optional[int] = None,
             after_batch: Callable[[int], None] | None = None, per_class: bool = False,
             tta_flip: bool = False) -> Optional[dict[str, Any]]:
    """Loss, top-1 and top-5 over every image of ``loader`` (summed over processes): fractions in [0, 1].

    None when ``should_stop`` turned true part-way (the caller saves and exits; the pass is redone). It
    is asked after each of the first ``stop_check_batches`` batches (all, when None): under torchrun the
    processes' shards can differ by a batch, and the question is a collective that every process must
    ask equally often. ``after_batch(n)`` is called after batch n (1-based).

    With ``per_class``, ``confusion`` is the (classes, classes) int64 CPU tensor of image counts, true class
    by row and top-1 prediction by column, summed over processes. ``tta_flip``: see eval_logits.
    """
    model.eval()
    if progress is not None and current_world_size() > 1:
        progress.label = f"rank {current_rank()}"  # its running top-1: all processes' only at the end
    sums = torch.zeros(4, device=runtime.device, dtype=torch.float64)  # loss, top1, top5, images
    confusion, classes = None, 0
    if per_class:
        # Sized from the model, not from the first batch: a process whose shard is empty must still join
        # the reduction with a tensor of the same shape.
        classes = _num_outputs(model)
        confusion = torch.zeros(classes * classes, device=runtime.device, dtype=torch.int64)
    substituted = 0
    for batch, (images, labels, bad) in enumerate(loader, 1):
        if bad_images is not None and any(bad):
            bad_images.record(bad)
            substituted += sum(1 for path in bad if path)
        images, labels = runtime.prepare(images, labels)
        logits = eval_logits(model, images, runtime, tta_flip)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(len(labels), device=runtime.device, dtype=torch.float64)])
        if confusion is not None:
            confusion += torch.bincount(labels * classes + top[:, 0], minlength=classes * classes)
        if progress is not None:
            progress.update(lambda sums=sums: {"top1": f"{sums[1].item() / max(sums[3].item(), 1):.4f}"})
        if after_batch is not None:
            after_batch(batch)
        if should_stop is not None and (stop_check_batches is None or batch <= stop_check_batches) and should_stop():
            return None
    if bad_images is not None:
        bad_images.share()
    sums = torch.cat([sums, torch.tensor([float(substituted)], device=runtime.device, dtype=torch.float64)])
    loss, top1, top5, images, substituted = all_reduce_sum(sums).tolist()
    n = max(images, 1)
    metrics = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(images)}
    if bad_images is not None:
        metrics["bad_images"] = int(substituted)
    if confusion is not None:
        metrics["confusion"] = all_reduce_sum(confusion).view(classes, classes).cpu()
    return metrics
