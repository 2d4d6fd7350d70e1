"""Faults injected on purpose, for tests of what happens when things go wrong.

They come only from the hidden `mbv2 train --fault NAME=VALUE` option and are inert otherwise:
    nan_loss_at_step=N       the loss of optimizer step N (1-based) becomes NaN
    nan_loss_from_step=N     ... and of every step after it
    nan_loss_rank=R          ... only in the process of rank R (under torchrun)
    nan_loss_micro_batch=M   ... only in micro-batch M (1-based) of the step (with train.accum_steps)
    crash_in_checkpoint=N    the N-th checkpoint save (1-based) kills the process at crash_point
    crash_point=P            where in that save: mid_write (default; a half-written temp file),
                             after_write (temp file complete, nothing renamed), after_previous (previous.pt
                             holds the old last.pt, last.pt not yet replaced), after_rename (new last.pt in
                             place), before_best_copy, before_epoch_copy (an epoch's end: last.pt saved,
                             best.pt or epoch_N.pt not yet)
    sigterm_at_step=N        the process sends itself SIGTERM right after optimizer step N
    sigterm_at_val_batch=N   ... right after batch N (1-based) of its first validation pass
    sleep_per_step=S         sleep S seconds after every optimizer step (to make timing tests reliable)
    stall_at_step=N          after optimizer step N, before its checkpoint, wait for good: a hung step, for
                             tests that kill a run at a known point (only SIGKILL or a second Ctrl-C end it)
    stall_rank=R             ... only in the process of rank R (under torchrun): a hung peer
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from mbv2train.errors import UserError

CRASH_POINTS = ("mid_write", "after_write", "after_previous", "after_rename", "before_best_copy",
                "before_epoch_copy")
CRASH_EXIT_CODE = 86  # what a process killed by an injected crash exits with


@dataclass
class Faults:
    nan_loss_at_step: Optional[int] = None
    nan_loss_from_step: Optional[int] = None
    nan_loss_rank: Optional[int] = None
    nan_loss_micro_batch: Optional[int] = None
    crash_in_checkpoint: Optional[int] = None
    crash_point: str = "mid_write"
    sigterm_at_step: Optional[int] = None
    sigterm_at_val_batch: Optional[int] = None
    sleep_per_step: float = 0.0
    stall_at_step: Optional[int] = None
    stall_rank: Optional[int] = None
    checkpoint_writes: int = 0  # counters, not settings
    validation_passes: int = 0

    @classmethod
    def parse(cls, items: Sequence[str]) -> "Faults":
        faults = cls()
        kinds = {"sleep_per_step": float, "crash_point": str}
        names = [name for name in cls.__dataclass_fields__ if name not in ("checkpoint_writes", "validation_passes")]
        for item in items:
            name, _, value = item.partition("=")
            if name not in names or not value:
                raise UserError(f"--fault {item}: expected one of {', '.join(f'{n}=VALUE' for n in names)}")
            kind = kinds.get(name, int)
            if kind is str:
                if value not in CRASH_POINTS:
                    raise UserError(f"--fault {item}: expected one of {', '.join(CRASH_POINTS)}")
                setattr(faults, name, value)
                continue
            try:
                setattr(faults, name, kind(value))
            except ValueError:
                raise UserError(f"--fault {item}: {value!r} is not a number") from None
        return faults

    def nan_loss(self, step: int, rank: int = 0, micro_batch: int = 1) -> bool:
        """Whether micro-batch ``micro_batch`` of optimizer step ``step`` (both 1-based) gets a NaN loss in
        the process of rank ``rank``."""
        if self.nan_loss_rank is not None and rank != self.nan_loss_rank:
            return False
        if self.nan_loss_micro_batch is not None and micro_batch != self.nan_loss_micro_batch:
            return False
        return step == self.nan_loss_at_step or (self.nan_loss_from_step is not None
                                                 and step >= self.nan_loss_from_step)

    def after_step(self, step: int, rank: int = 0) -> None:
        if self.sleep_per_step:
            time.sleep(self.sleep_per_step)
        if step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        while step == self.stall_at_step and self.stall_rank in (None, rank):
            signal.pause()  # a handled stop signal returns here and the stall goes on

    def start_validation(self) -> None:
        self.validation_passes += 1

    def after_val_batch(self, batch: int) -> None:
        if self.validation_passes == 1 and batch == self.sigterm_at_val_batch:
            os.kill(os.getpid(), signal.SIGTERM)

    def start_checkpoint(self) -> None:
        """Count a checkpoint save (the crash points below refer to the count)."""
        self.checkpoint_writes += 1

    def crash_at(self, point: str) -> None:
        """Kill the process here, as a power cut or SIGKILL would, if this is the chosen save and point."""
        if self.crash_in_checkpoint == self.checkpoint_writes and self.crash_point == point:
            os._exit(CRASH_EXIT_CODE)


def die_mid_write(file) -> None:
    """Leave a half-written temp file behind, as a power cut or SIGKILL would."""
    file.flush()
    os.fsync(file.fileno())
    os._exit(CRASH_EXIT_CODE)


NO_FAULTS = Faults()
