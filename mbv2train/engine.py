"""One training epoch and one evaluation pass; the only place with forward and backward.

Both take what they need as arguments and return a dict of metrics; trainer.py merges and logs them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mbv2train import rng
from mbv2train.distributed import all_reduce_sum
from mbv2train.progress import Progress


@dataclass(frozen=True)
class Runtime:
    """How tensors meet the device: where, in which precision, in which memory format."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None: full float32
    channels_last: bool
    mean: torch.Tensor  # (1, 3, 1, 1) on the device, 0-255 scale
    std: torch.Tensor

    @classmethod
    def create(cls, device: torch.device, amp_dtype, channels_last: bool, mean, std) -> "Runtime":
        shape = (1, 3, 1, 1)
        return cls(device, amp_dtype, channels_last,
                   torch.tensor(mean, device=device).view(shape) * 255,
                   torch.tensor(std, device=device).view(shape) * 255)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW batch from the loader -> normalized float on the device (workers do no float math)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:  # reorder while values are still 1 byte; the float math keeps the layout
            images = images.contiguous(memory_format=torch.channels_last)
        images = (images.float() - self.mean) / self.std
        return images, labels


@dataclass
class TrainSettings:
    """The parts of the train config a step needs."""

    seed: int
    label_smoothing: float = 0.0
    accum_steps: int = 1
    grad_clip_norm: Optional[float] = None
    ema_every_steps: int = 1
    log_every_steps: int = 50


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, rt: Runtime, settings: TrainSettings,
                    epoch: int, global_step: int, ema=None, mix: Callable | None = None,
                    progress: Progress | None = None, log_step: Callable[[int, dict], None] | None = None
                    ) -> tuple[dict[str, float], int]:
    """Train over ``loader`` once; returns (metrics, global step after the epoch).

    Every micro-step reseeds torch's RNG from (seed, step), so dropout and MixUp/CutMix draws depend only
    on the position in the run: a run resumed from a checkpoint continues exactly.
    """
    model.train()
    accum = settings.accum_steps
    steps = len(loader) // accum
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    data_time = 0.0
    started = fetch_started = time.perf_counter()
    batches = iter(loader)
    for micro in range(steps * accum):  # a trailing partial accumulation is dropped: steps stay whole
        images, labels = next(batches)
        data_time += time.perf_counter() - fetch_started
        torch.manual_seed(rng.derive_seed(settings.seed, rng.STEP, global_step * accum + micro % accum))
        images, labels = rt.prepare(images, labels)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        last_micro = (micro + 1) % accum == 0
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with rt.autocast():
                logits = model(images)
                loss = criterion(logits, targets)
            (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
        loss_sum += loss.detach().float() * len(labels)
        seen += len(labels)
        if mix is None:
            correct += (logits.detach().argmax(1) == labels).sum()

        if last_micro:
            lr = optimizer.param_groups[0]["lr"]
            _optimizer_step(model, optimizer, scaler, settings.grad_clip_norm)
            scheduler.step()
            global_step += 1
            if ema is not None and global_step % settings.ema_every_steps == 0:
                ema.update_parameters(model)
            if log_step is not None and global_step % settings.log_every_steps == 0:
                log_step(global_step, {"loss": loss.item(), "lr": lr})
        if progress is not None:
            progress.update(lambda: {"loss": f"{loss_sum.item() / seen:.4f}", "lr": f"{lr:.4g}",
                                     **({"top1": f"{correct.item() / seen:.3f}"} if mix is None else {}),
                                     "img/s": f"{seen / (time.perf_counter() - started):.0f}"})
        fetch_started = time.perf_counter()

    totals = all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=rt.device)]))
    elapsed = time.perf_counter() - started  # after the reduction, which waits for the device
    loss_total, correct_total, seen_total = totals.tolist()
    metrics = {"train_loss": loss_total / max(seen_total, 1), "lr": lr,
               "img_per_s": seen_total / elapsed, "epoch_time_s": elapsed, "data_time_frac": data_time / elapsed}
    if mix is None:
        metrics["train_top1"] = correct_total / max(seen_total, 1)
    return metrics, global_step


def _optimizer_step(model: nn.Module, optimizer, scaler, clip_norm: Optional[float]) -> None:
    if clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, rt: Runtime, progress: Progress | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 over every image of ``loader`` (summed over processes): fractions in [0, 1]."""
    model.eval()
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)  # loss, top1, top5, images
    for images, labels in loader:
        images, labels = rt.prepare(images, labels)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(len(labels), device=rt.device, dtype=torch.float64)])
        if progress is not None:
            progress.update(lambda: {"top1": f"{sums[1].item() / max(sums[3].item(), 1):.4f}"})
    loss, top1, top5, images = all_reduce_sum(sums).tolist()
    n = max(images, 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(images)}
