"""One training epoch: the only place with a backward pass. It takes what it needs as arguments and
returns a dict of metrics; the trainer merges and logs them."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch
from torch import nn

from mbv2train import rng
from mbv2train.devices import Runtime
from mbv2train.distributed import all_gather_rows, all_reduce_sum, current_rank, current_world_size
from mbv2train.faults import Faults
from mbv2train.progress import Progress
from mbv2train.train.epoch_figures import ProgressFigures
from mbv2train.train.prefetch import Prefetcher
from mbv2train.train.rescale import split_rank_parts
from mbv2train.train.step_guard import EmaUpdate, StepGuard


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
    # after each optimizer step; may raise. Reading the epoch's counts or sums waits for the device:
    # do it only at boundaries (a checkpoint: EpochProgress.state settles first)
    after_step: Optional[Callable[[int, EpochProgress], None]] = None
    # data.BadImageLog: warns about and counts substituted images; under torchrun the processes pool theirs
    # at log steps and at the epoch's end
    bad_images: Optional[Any] = None
    faults: Faults = field(default_factory=Faults)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, runtime: Runtime,
                    settings: TrainSettings, epoch: int, global_step: int, steps_per_epoch: int,
                    epoch_progress: EpochProgress, ema=None, mix: Callable | None = None, bar: Progress | None = None,
                    hooks: Optional[EpochHooks] = None) -> tuple[dict[str, float], int]:
    """Train the rest of an epoch (``epoch_progress`` says how much is behind); returns (metrics, global step).

    ``loader``'s sampler must already skip the batches of the ``epoch_progress.steps`` steps;
    ``epoch_progress`` is updated as the epoch goes, so ``hooks.after_step`` can checkpoint it. Every
    micro-step reseeds torch's RNG from (seed, step), so dropout and MixUp/CutMix draws depend only on the
    position in the run: a resumed run continues exactly.

    A step never waits for the device (step_guard.py): the non-finite check stays on the device and is
    read at log steps, checkpoints (``epoch_progress.state()``), the progress bar's refreshes and the
    epoch's end; it stops the run only at those every process reaches (not at rank 0's progress bar).
    """
    steps = _EpochSteps(model, loader, optimizer, scheduler, scaler, runtime, settings, epoch, global_step,
                        epoch_progress, ema, mix, hooks or EpochHooks())
    if bar is not None:
        bar.label = steps.figures.label
    accum = settings.accum_steps
    end_micro = steps_per_epoch * accum
    for micro in range(epoch_progress.steps * accum, end_micro):
        last_micro = (micro + 1) % accum == 0
        loss = steps.micro_step(micro, last_micro, more_batches=micro + 1 < end_micro)
        if last_micro:
            steps.optimizer_step(loss, last_of_epoch=micro + 1 == end_micro)
        if bar is not None:
            if bar.due():
                steps.figures.refresh()  # the host waits for the device here, as often as the bar shows figures
            bar.update(steps.figures.fields)  # reads figures already on the host: it cannot raise
    return steps.finish(), steps.global_step


class _EpochSteps:
    """The state of one running epoch, with its two kinds of step: a micro-step (forward and backward
    of one batch) and an optimizer step (every train.accum_steps micro-steps)."""

    def __init__(self, model, loader, optimizer, scheduler, scaler, runtime: Runtime, settings: TrainSettings,
                 epoch: int, global_step: int, epoch_progress: EpochProgress, ema, mix, hooks: EpochHooks):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.runtime, self.settings, self.global_step, self.progress = runtime, settings, global_step, epoch_progress
        self.mix, self.hooks = mix, hooks
        model.train()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        self.guard = StepGuard(model, optimizer, settings.skip_nonfinite, settings.max_nonfinite_skips, epoch)
        epoch_progress.guard = self.guard
        self.update_ema = EmaUpdate(ema, model, settings.ema_decay) if ema is not None else None
        self.rank = current_rank()
        self.started = time.perf_counter()
        self.figures = ProgressFigures(epoch_progress, self.guard, mix is None, self.started, current_world_size())
        self.batches = Prefetcher(loader, runtime.device)

    def micro_step(self, micro: int, last_micro: bool, more_batches: bool) -> torch.Tensor:
        """Forward and backward of the next batch, the ``micro``-th of the epoch; returns its loss."""
        accum, progress, guard = self.settings.accum_steps, self.progress, self.guard
        images, labels, bad = self.batches.take()
        if self.hooks.bad_images is not None and any(bad):
            self.hooks.bad_images.record(bad)
            progress.bad_images += sum(1 for path in bad if path)
        torch.manual_seed(rng.derive_seed(self.settings.seed, rng.STEP, self.global_step * accum + micro % accum))
        images, labels = self.runtime.prepare(images, labels)
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        if micro % accum == 0:
            guard.start_step(self.runtime.device)
        no_sync = not last_micro and hasattr(self.model, "no_sync")  # DDP: all-reduce the last micro-step only
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self.runtime.autocast():
                logits = self.model(images)
                loss = self.criterion(logits, targets)
            if self.hooks.faults.nan_loss(self.global_step + 1, self.rank, micro % accum + 1):
                loss = loss * float("nan")
            guard.add(loss, logits, labels, count_correct=self.mix is None)
            if last_micro:
                guard.agree()  # under torchrun, a NaN on one process must undo the step on all of them
            if more_batches:
                self.batches.fetch()  # the next batch's copy to the device overlaps this backward pass
            scaled = self.scaler.scale(loss / accum) if self.scaler is not None else loss / accum
            scaled.backward()
        return loss

    def optimizer_step(self, loss: torch.Tensor, last_of_epoch: bool) -> None:
        """The optimizer, LR and EMA step after the step's last micro-step, then its hooks."""
        settings, progress, hooks = self.settings, self.progress, self.hooks
        progress.lr = self.optimizer.param_groups[0]["lr"]
        skipped = self.guard.finish_step(self.optimizer, self.scaler, settings.grad_clip_norm, progress,
                                         self.global_step + 1)
        with warnings.catch_warnings():
            # a step skipped (by us or by fp16's GradScaler) still uses up its place on the LR curve
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        self.global_step += 1
        progress.steps += 1
        if self.update_ema is not None and self.global_step % settings.ema_every_steps == 0:
            self.update_ema(skipped)
        at_log_step = hooks.log_step is not None and self.global_step % settings.log_every_steps == 0
        if at_log_step:
            progress.settle()  # the host waits for the device: the steps' flags, and the loss below
            if hooks.bad_images is not None:
                hooks.bad_images.share()
            hooks.log_step(self.global_step, {"loss": loss.item(), "lr": progress.lr})
        if at_log_step or last_of_epoch:
            self.figures.share()
        hooks.faults.after_step(self.global_step, self.rank)
        if hooks.after_step is not None:
            hooks.after_step(self.global_step, progress)

    def finish(self) -> dict[str, float]:
        """The epoch's metrics, summed over the processes (a wait for the device)."""
        progress, guard = self.progress, self.guard
        progress.settle()
        if self.hooks.bad_images is not None:
            self.hooks.bad_images.share()
        progress.guard = None  # its snapshots are as large as the weights: let them go now
        counts = torch.tensor([float(progress.seen), float(guard.images_taken), float(progress.bad_images)],
                              device=self.runtime.device)
        totals = all_reduce_sum(torch.cat([torch.stack([progress.loss_sum.float(), progress.correct.float()]),
                                           counts]))
        elapsed = time.perf_counter() - self.started  # after the reduction, which waits for the device
        loss_total, correct_total, seen_total, seen_here_total, bad_total = totals.tolist()
        metrics = {"train_loss": loss_total / max(seen_total, 1), "train_images": int(seen_total), "lr": progress.lr,
                   "img_per_s": seen_here_total / elapsed, "epoch_time_s": elapsed,
                   "data_time_frac": self.batches.waited / elapsed, "bad_images": int(bad_total),
                   "nonfinite_skips": progress.nonfinite_skips}
        if self.scaler is not None:
            metrics["scaler_skips"] = progress.scaler_skips
        if self.mix is None:
            metrics["train_top1"] = correct_total / max(seen_total, 1)
        return metrics
