"""One training epoch and one evaluation pass; the only place with forward and backward.

Both take what they need as arguments and return a dict of metrics; trainer.py merges and logs them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mbv2train import rng
from mbv2train.distributed import all_gather_rows, all_reduce_sum, current_rank, current_world_size
from mbv2train.epoch_figures import ProgressFigures
from mbv2train.faults import Faults
from mbv2train.prefetch import Prefetcher
from mbv2train.progress import Progress
from mbv2train.rescale import split_rank_parts
from mbv2train.step_guard import EmaUpdate, StepGuard


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
        # the conversion makes a new tensor, so normalizing it in place changes nothing the caller holds
        images = images.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)
        return images, labels


@dataclass
class TrainSettings:
    """The parts of the train config a step needs."""

    seed: int
    label_smoothing: float = 0.0
    accum_steps: int = 1
    grad_clip_norm: Optional[float] = None
    ema_every_steps: int = 1
    ema_decay: float = 0.9999
    log_every_steps: int = 50
    skip_nonfinite: bool = False
    max_nonfinite_skips: int = 10


@dataclass
class EpochProgress:
    """How far an epoch has got, with its running sums: a mid-epoch checkpoint stores it, so that the
    resumed epoch ends with the same metrics as an uninterrupted one."""

    steps: int = 0  # optimizer steps done in this epoch
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    seen: int = 0
    lr: float = 0.0
    bad_images: int = 0
    nonfinite_skips: int = 0
    scaler_skips: int = 0
    # The running epoch's StepGuard, whose flags still on the device complete the counts above (settle)
    guard: Optional[StepGuard] = field(default=None, repr=False, compare=False)

    def settle(self) -> None:
        """Read the steps' flags still on the device into the counts above: a wait for the device, and
        where train.nonfinite says so a NonFiniteLoss. state() does it first, so a checkpoint is complete."""
        if self.guard is not None:
            self.guard.settle(self)

    def state(self) -> dict[str, Any]:
        """As plain values and CPU tensors, with each process's own part of the sums as ``rank_parts``, one
        row per rank (float64 holds the float32 and integer sums exactly), so that a resumed process
        continues its own part. A collective under torchrun: every process calls it."""
        self.settle()
        state = {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "guard"},
                 "loss_sum": self.loss_sum.detach().cpu(), "correct": self.correct.detach().cpu()}
        state["rank_parts"] = all_gather_rows(_sums_row(self.loss_sum, self.correct, self.seen, self.bad_images)).cpu()
        return state

    @classmethod
    def from_state(cls, state: Optional[dict[str, Any]], device: torch.device, rank: int = 0,
                   world_size: int = 1) -> "EpochProgress":
        """The progress process ``rank`` of ``world_size`` continues from: its own part of the saved sums
        (rescale.split_rank_parts when the number of processes changed), so that the processes' parts add
        up to the saved epoch's sums once. A checkpoint written before ``rank_parts`` existed holds one
        process's sums."""
        state = dict(state or {})
        parts = state.pop("rank_parts", None)
        progress = cls(**state)
        if state and parts is None:
            parts = _sums_row(progress.loss_sum, progress.correct, progress.seen, progress.bad_images)[None].cpu()
        if parts is not None:
            loss_sum, correct, seen, bad_images = split_rank_parts(parts, world_size)[rank].tolist()
            progress.loss_sum = torch.tensor(loss_sum, dtype=torch.float32)
            progress.correct = torch.tensor(int(correct), dtype=torch.long)
            progress.seen, progress.bad_images = int(seen), int(bad_images)
        progress.loss_sum = progress.loss_sum.to(device)
        progress.correct = progress.correct.to(device)
        return progress


def _sums_row(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, bad_images: int) -> torch.Tensor:
    """(loss, correct, images seen, bad images) of one process as one float64 row on the sums' device."""
    as_row = dict(device=loss_sum.device, dtype=torch.float64)
    return torch.stack([loss_sum.detach().double(), correct.detach().double(),
                        torch.tensor(float(seen), **as_row), torch.tensor(float(bad_images), **as_row)])


@dataclass
class EpochHooks:
    """What the trainer plugs into an epoch."""

    log_step: Optional[Callable[[int, dict], None]] = None  # (global step, values) every log_every_steps
    # after each optimizer step; may raise. Reading the progress's counts or sums waits for the device:
    # do it only at boundaries (a checkpoint: EpochProgress.state settles first)
    after_step: Optional[Callable[[int, EpochProgress], None]] = None
    # data.BadImageLog: warns about and counts substituted images; under torchrun the processes pool theirs
    # at log steps and at the epoch's end
    bad_images: Optional[Any] = None
    faults: Faults = field(default_factory=Faults)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, rt: Runtime, settings: TrainSettings,
                    epoch: int, global_step: int, steps_per_epoch: int, done: EpochProgress,
                    ema=None, mix: Callable | None = None, progress: Progress | None = None,
                    hooks: Optional[EpochHooks] = None) -> tuple[dict[str, float], int]:
    """Train the rest of an epoch (``done`` says how much is behind); returns (metrics, global step).

    ``loader``'s sampler must already skip the batches of the ``done.steps`` steps; ``done`` is updated as
    the epoch goes, so ``hooks.after_step`` can checkpoint it. Every micro-step reseeds torch's RNG from
    (seed, step), so dropout and MixUp/CutMix draws depend only on the position in the run: a resumed run
    continues exactly.

    A step never waits for the device (step_guard.py): the non-finite check stays on the device and is
    read at log steps, checkpoints (``done.state()``), the progress bar's refreshes and the epoch's end;
    it stops the run only at those every process reaches (not at rank 0's progress bar).
    """
    hooks = hooks or EpochHooks()
    model.train()
    accum = settings.accum_steps
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    guard = StepGuard(model, optimizer, settings.skip_nonfinite, settings.max_nonfinite_skips, epoch)
    done.guard = guard
    update_ema = EmaUpdate(ema, model, settings.ema_decay) if ema is not None else None
    rank = current_rank()
    started = time.perf_counter()
    figures = ProgressFigures(done, guard, mix is None, started, current_world_size())
    if progress is not None:
        progress.label = figures.label
    batches = Prefetcher(loader, rt.device)
    first_micro, end_micro = done.steps * accum, steps_per_epoch * accum
    for micro in range(first_micro, end_micro):
        images, labels, bad = batches.take()
        if hooks.bad_images is not None and any(bad):
            hooks.bad_images.record(bad)
            done.bad_images += sum(1 for path in bad if path)
        torch.manual_seed(rng.derive_seed(settings.seed, rng.STEP, global_step * accum + micro % accum))
        images, labels = rt.prepare(images, labels)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        if micro % accum == 0:
            guard.start_step(rt.device)
        last_micro = (micro + 1) % accum == 0
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with rt.autocast():
                logits = model(images)
                loss = criterion(logits, targets)
            if hooks.faults.nan_loss(global_step + 1, rank, micro % accum + 1):
                loss = loss * float("nan")
            guard.add(loss, logits, labels, count_correct=mix is None)
            if last_micro:
                guard.agree()  # under torchrun, a NaN on one process must undo the step on all of them
            if micro + 1 < end_micro:
                batches.fetch()  # the next batch's copy to the device overlaps this backward pass
            (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()

        if last_micro:
            done.lr = optimizer.param_groups[0]["lr"]
            skipped = guard.finish_step(optimizer, scaler, settings.grad_clip_norm, done, global_step + 1)
            with warnings.catch_warnings():
                # a step skipped (by us or by fp16's GradScaler) still uses up its place on the LR curve
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                scheduler.step()
            global_step += 1
            done.steps += 1
            if update_ema is not None and global_step % settings.ema_every_steps == 0:
                update_ema(skipped)
            at_log_step = hooks.log_step is not None and global_step % settings.log_every_steps == 0
            if at_log_step:
                done.settle()
                if hooks.bad_images is not None:
                    hooks.bad_images.share()
                hooks.log_step(global_step, {"loss": loss.item(), "lr": done.lr})
            if at_log_step or micro + 1 == end_micro:
                figures.share()
            hooks.faults.after_step(global_step, rank)
            if hooks.after_step is not None:
                hooks.after_step(global_step, done)
        if progress is not None:
            progress.update(figures.fields)

    done.settle()
    if hooks.bad_images is not None:
        hooks.bad_images.share()
    done.guard = None  # its snapshots are as large as the weights: let them go now
    counts = torch.tensor([float(done.seen), float(guard.images_taken), float(done.bad_images)], device=rt.device)
    totals = all_reduce_sum(torch.cat([torch.stack([done.loss_sum.float(), done.correct.float()]), counts]))
    elapsed = time.perf_counter() - started  # after the reduction, which waits for the device
    loss_total, correct_total, seen_total, seen_here_total, bad_total = totals.tolist()
    metrics = {"train_loss": loss_total / max(seen_total, 1), "train_images": int(seen_total), "lr": done.lr,
               "img_per_s": seen_here_total / elapsed, "epoch_time_s": elapsed,
               "data_time_frac": batches.waited / elapsed, "bad_images": int(bad_total),
               "nonfinite_skips": done.nonfinite_skips}
    if scaler is not None:
        metrics["scaler_skips"] = done.scaler_skips
    if mix is None:
        metrics["train_top1"] = correct_total / max(seen_total, 1)
    return metrics, global_step


def eval_logits(model: nn.Module, images: torch.Tensor, rt: Runtime, tta_flip: bool = False) -> torch.Tensor:
    """Float32 logits of a prepared batch (Runtime.prepare) for a model in eval mode; with ``tta_flip``
    the mean of the logits of each image and of its mirror image (flipped left to right).

    evaluate and predict both go through here, so `mbv2 predict` computes exactly what `mbv2 eval` counts.
    """
    with rt.autocast():
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
def evaluate(model: nn.Module, loader, rt: Runtime, progress: Progress | None = None, bad_images=None,
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
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)  # loss, top1, top5, images
    confusion, classes = None, 0
    if per_class:
        # Sized from the model, not from the first batch: a process whose shard is empty must still join
        # the reduction with a tensor of the same shape.
        classes = _num_outputs(model)
        confusion = torch.zeros(classes * classes, device=rt.device, dtype=torch.int64)
    substituted = 0
    for batch, (images, labels, bad) in enumerate(loader, 1):
        if bad_images is not None and any(bad):
            bad_images.record(bad)
            substituted += sum(1 for path in bad if path)
        images, labels = rt.prepare(images, labels)
        logits = eval_logits(model, images, rt, tta_flip)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(len(labels), device=rt.device, dtype=torch.float64)])
        if confusion is not None:
            confusion += torch.bincount(labels * classes + top[:, 0], minlength=classes * classes)
        if progress is not None:
            progress.update(lambda: {"top1": f"{sums[1].item() / max(sums[3].item(), 1):.4f}"})
        if after_batch is not None:
            after_batch(batch)
        if should_stop is not None and (stop_check_batches is None or batch <= stop_check_batches) and should_stop():
            return None
    if bad_images is not None:
        bad_images.share()
    sums = torch.cat([sums, torch.tensor([float(substituted)], device=rt.device, dtype=torch.float64)])
    loss, top1, top5, images, substituted = all_reduce_sum(sums).tolist()
    n = max(images, 1)
    metrics = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": int(images)}
    if bad_images is not None:
        metrics["bad_images"] = int(substituted)
    if confusion is not None:
        metrics["confusion"] = all_reduce_sum(confusion).view(classes, classes).cpu()
    return metrics
