"""Faults injected on purpose, for tests of what happens when things go wrong.

They come only from the hidden `mbv2 train --fault NAME=VALUE` option and are inert otherwise:
    nan_loss_at_step=N       the loss of optimizer step N (1-based) becomes NaN
    nan_loss_from_step=N     ... and of every step after it
    nan_loss_rank=R          ... only in the process of rank R (under torchrun)
    nan_loss_micro_batch=M   ... only in micro-batch M (1-based) of the step (with train.accum_steps)
    crash_in_checkpoint=N    the N-th checkpoint write (1-based) kills the process half-way through
    sigterm_at_step=N        the process sends itself SIGTERM right after optimizer step N
    sleep_per_step=S         sleep S seconds after every optimizer step (to make timing tests reliable)
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, fields
from typing import Optional, Sequence

from mbv2train.errors import UserError


@dataclass
class Faults:
    nan_loss_at_step: Optional[int] = None
    nan_loss_from_step: Optional[int] = None
    nan_loss_rank: Optional[int] = None
    nan_loss_micro_batch: Optional[int] = None
    crash_in_checkpoint: Optional[int] = None
    sigterm_at_step: Optional[int] = None
    sleep_per_step: float = 0.0
    checkpoint_writes: int = 0  # counter, not a setting

    @classmethod
    def parse(cls, items: Sequence[str]) -> "Faults":
        faults = cls()
        names = {f.name: f.type for f in fields(cls) if f.name != "checkpoint_writes"}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names or not value:
                raise UserError(f"--fault {item}: expected one of {', '.join(f'{n}=VALUE' for n in names)}")
            try:
                setattr(faults, name, float(value) if name == "sleep_per_step" else int(value))
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

    def after_step(self, step: int) -> None:
        if self.sleep_per_step:
            time.sleep(self.sleep_per_step)
        if step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def crash_now(self) -> bool:
        """Count a checkpoint write; True when this is the one to crash in."""
        self.checkpoint_writes += 1
        return self.crash_in_checkpoint == self.checkpoint_writes


def die_mid_write(file) -> None:
    """Leave a half-written temp file behind, as a power cut or SIGKILL would."""
    file.flush()
    os.fsync(file.fileno())
    os._exit(86)


NO_FAULTS = Faults()
