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
