"""Saving and resuming inside a run: when to save, what each process adds to a save, and the copies.

A save comes after train.checkpoint_every_steps steps, after train.checkpoint_every_minutes on rank 0's
clock, on a stop signal, and at every epoch's end. Under torchrun every process takes part in a save inside
an epoch: each one's part of the epoch's sums and its own BatchNorm statistics are gathered, so that each
resumes with its own and the epoch ends as an uninterrupted one would. Rank 0 alone writes last.pt (the
one before it kept as previous.pt), and at an epoch's end copies it to best.pt and epoch_N.pt.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from mbv2train import checkpoint as ckpt
from mbv2train.distributed import DistInfo, StepVote, any_rank
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted, StopFlag
from mbv2train.train.batchnorm_sync import gather_running_statistics, restore_running_statistics
from mbv2train.train.epoch import EpochProgress

# (the epoch's progress as EpochProgress.state() gives it or None at an epoch's end, the samples of the
# epoch's global order trained on) -> the checkpoint's state (run_state.training_state)
TrainingState = Callable[[Optional[dict[str, Any]], int], dict[str, Any]]


@dataclass(frozen=True)
class SaveSchedule:
    """When a save comes inside an epoch (the epoch's end always saves)."""

    every_steps: Optional[int]  # train.checkpoint_every_steps (0 or None: never)
    every_minutes: Optional[float]  # train.checkpoint_every_minutes, on rank 0's clock
    steps_per_epoch: int

    def minutes_up(self, since_last_save_s: float) -> bool:
        return bool(self.every_minutes) and since_last_save_s >= self.every_minutes * 60

    def due(self, global_step: int, epoch_steps: int, minutes_up: bool) -> bool:
        """Whether to save after optimizer step ``global_step``, the ``epoch_steps``-th of its epoch."""
        due = (bool(self.every_steps) and global_step % self.every_steps == 0) or minutes_up
        return due and epoch_steps < self.steps_per_epoch  # the epoch's end saves anyway


class Checkpointer:
    """The run's saves and what a resume puts back of them, for one process.

    ``training_state`` gives the state to save (see TrainingState); ``models`` are the modules whose
    per-process BatchNorm statistics a save inside an epoch keeps ({"model": ..., "ema": ... or None})."""

    def __init__(self, run_dir: Path, schedule: SaveSchedule, dist: DistInfo, stop: StopFlag, faults: Faults,
                 training_state: TrainingState, models: dict[str, Optional[nn.Module]], global_batch: int,
                 save_every_epochs: int = 0, keep_checkpoints: int = 3):
        self.run_dir, self.schedule, self.dist, self.stop, self.faults = run_dir, schedule, dist, stop, faults
        self.training_state, self.models, self.global_batch = training_state, models, global_batch
        self.save_every_epochs, self.keep_checkpoints = save_every_epochs, keep_checkpoints
        self.last_save = time.monotonic()
        # what every process must act on at the same step: a stop signal, and rank 0's clock for
        # train.checkpoint_every_minutes (clocks differ between processes: rank 0's decides for all)
        self.step_vote = StepVote()
        # each process's BatchNorm statistics from a mid-epoch checkpoint, put back once DDP has wrapped
        # the model (wrapping hands rank 0's to every process)
        self.rank_batchnorm: Optional[dict[str, Any]] = None

    @property
    def last(self) -> Path:
        return self.run_dir / ckpt.LAST

    # ------------------------------------------------------------------------------------------- resume

    def resume(self, state: Optional[dict[str, Any]], device: torch.device) -> EpochProgress:
        """The running epoch's progress that this process continues from (a fresh one without ``state``
        or after an epoch's end), and the BatchNorm statistics that ``restore_batchnorm`` puts back."""
        if state is None:
            return EpochProgress.from_state(None, device)
        self.rank_batchnorm = state.get("rank_batchnorm")
        return EpochProgress.from_state(state.get("epoch_progress"), device, self.dist.rank, self.dist.world_size)

    def restore_batchnorm(self) -> None:
        """This process's own BatchNorm statistics of a mid-epoch checkpoint (once, after DDP's wrap)."""
        if self.rank_batchnorm is None:
            return
        for part, model in self.models.items():
            if model is not None and self.rank_batchnorm.get(part) is not None:
                restore_running_statistics(model, self.rank_batchnorm[part], self.dist.rank)
        self.rank_batchnorm = None

    # ---------------------------------------------------------------------------------- inside an epoch

    def after_step(self, global_step: int, epoch_progress: EpochProgress) -> None:
        """After every optimizer step: save when a stop signal came or a step/minute interval is up.

        Nothing here waits for the device unless it saves. Under torchrun the processes learn of a signal
        or of rank 0's clock one step late (StepVote), and all act at that same step."""
        stop, minutes_up = self.step_vote.collect(self._step_flags())
        if stop:
            self.save_and_stop(epoch_progress, global_step)
        if self.schedule.due(global_step, epoch_progress.steps, minutes_up):
            self.save(epoch_progress)
        self.step_vote.cast(self._step_flags())  # after the save: a save just made resets rank 0's clock

    def end_of_steps(self) -> None:
        """The epoch's last step is done: from here on, stop checks ask all processes at once."""
        self.step_vote.drain()

    def _step_flags(self) -> tuple[bool, bool]:
        """(a stop signal came, train.checkpoint_every_minutes is up on rank 0's clock)."""
        minutes_up = self.dist.is_main and self.schedule.minutes_up(time.monotonic() - self.last_save)
        return bool(self.stop), minutes_up

    def stop_requested(self) -> bool:
        """A stop signal, agreed on by all processes at once (a collective on the CPU, outside the steps)."""
        return any_rank(bool(self.stop))

    def preempted(self, global_step: int) -> Preempted:
        # another process may have received the signal and this one only agreed to stop
        return Preempted(self.stop.signum or signal.SIGTERM, str(self.last), global_step)

    def save_and_stop(self, epoch_progress: EpochProgress, global_step: int) -> None:
        self.save(epoch_progress)
        raise self.preempted(global_step)

    # -------------------------------------------------------------------------------------------- saves

    def save(self, epoch_progress: Optional[EpochProgress]) -> None:
        """Save last.pt; ``epoch_progress`` for a save inside an epoch, None at its end.

        Every process calls it: under torchrun a save inside an epoch gathers each process's part of the
        epoch's sums, so that each resumes with its own part and the epoch's totals come out exact."""
        self.last_save = time.monotonic()
        progress_state = epoch_progress.state() if epoch_progress is not None else None
        rank_batchnorm = None
        if epoch_progress is not None and self.dist.enabled:
            # each process's own statistics: an uninterrupted run goes on with them (the epoch's end averages
            # them), so a resumed one must too
            rank_batchnorm = {part: gather_running_statistics(model) if model is not None else None
                              for part, model in self.models.items()}
        if not self.dist.is_main:
            return
        position = epoch_progress.steps * self.global_batch if epoch_progress is not None else 0
        state = self.training_state(progress_state, position)
        if rank_batchnorm is not None:
            state["rank_batchnorm"] = rank_batchnorm
        ckpt.save_checkpoint(state, self.last, keep_previous=self.run_dir / ckpt.PREVIOUS, faults=self.faults)

    def save_epoch_end(self, epoch: int, is_best: bool) -> None:
        """Rank 0's save at an epoch's end, and its copies to best.pt and epoch_N.pt."""
        if not self.dist.is_main:
            return
        # last.pt first: a kill before the copies is repaired on resume (run_state.restore_derived_copies)
        self.save(None)
        if is_best:
            self.faults.crash_at("before_best_copy")
            ckpt.copy_checkpoint(self.last, self.run_dir / ckpt.BEST)
        if self.save_every_epochs and epoch % self.save_every_epochs == 0:
            self.faults.crash_at("before_epoch_copy")
            ckpt.copy_checkpoint(self.last, self.run_dir / f"epoch_{epoch}.pt")
            ckpt.prune_epoch_copies(self.run_dir, self.keep_checkpoints)
