"""The Checkpointer's decisions: when a save comes inside an epoch, and what it writes."""

import signal
from pathlib import Path

import pytest
import torch

from mbv2train.distributed import DistInfo
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted, StopFlag
from mbv2train.train.checkpointer import Checkpointer, SaveSchedule
from mbv2train.train.epoch import EpochProgress


def test_every_n_steps_saves_at_the_multiples_inside_an_epoch_only():
    schedule = SaveSchedule(every_steps=3, every_minutes=None, steps_per_epoch=5)
    # global steps 1..10 over two epochs of 5 steps: the 5th step of an epoch ends it, which saves anyway
    due = [step for step in range(1, 11) if schedule.due(step, (step - 1) % 5 + 1, minutes_up=False)]
    assert due == [3, 6, 9]


def test_no_interval_never_saves_inside_an_epoch():
    schedule = SaveSchedule(every_steps=0, every_minutes=0, steps_per_epoch=5)
    assert not any(schedule.due(step, step, minutes_up=schedule.minutes_up(10**6)) for step in range(1, 5))


def test_minutes_save_when_the_time_is_up_but_not_at_the_epoch_s_end():
    schedule = SaveSchedule(every_steps=None, every_minutes=2, steps_per_epoch=5)
    assert not schedule.minutes_up(119.0) and schedule.minutes_up(120.0)
    assert schedule.due(7, 2, minutes_up=True) and not schedule.due(7, 2, minutes_up=False)
    assert not schedule.due(10, 5, minutes_up=True)


class Recorder:
    """A Checkpointer over a fake training state, recording what it saves."""

    def __init__(self, tmp_path: Path, schedule: SaveSchedule, stop: StopFlag):
        self.saved: list[tuple] = []
        self.checkpointer = Checkpointer(tmp_path, schedule, DistInfo(), stop, Faults(), self.state,
                                         models={"model": None, "ema": None}, global_batch=4)

    def state(self, epoch_progress, epoch_position):
        self.saved.append((epoch_progress["steps"] if epoch_progress is not None else None, epoch_position))
        return {"weights": torch.zeros(1)}


def test_after_step_saves_when_due_and_a_stop_signal_saves_and_stops(tmp_path):
    stop = StopFlag(announce=False)
    recorder = Recorder(tmp_path, SaveSchedule(every_steps=2, every_minutes=None, steps_per_epoch=10), stop)
    progress = EpochProgress()
    for step in (1, 2, 3):
        progress.steps = step
        recorder.checkpointer.after_step(step, progress)
    assert recorder.saved == [(2, 8)]  # after step 2, at sample 2 x 4 of the epoch's order
    assert (tmp_path / "last.pt").is_file()
    stop.signum = signal.SIGUSR1
    progress.steps = 4
    with pytest.raises(Preempted) as stopped:
        recorder.checkpointer.after_step(4, progress)
    assert recorder.saved[-1] == (4, 16)
    assert stopped.value.signum == signal.SIGUSR1


def test_an_epoch_s_end_saves_and_copies_the_best_and_the_epoch(tmp_path):
    recorder = Recorder(tmp_path, SaveSchedule(None, None, 10), StopFlag(announce=False))
    recorder.checkpointer.save_every_epochs = 2
    recorder.checkpointer.save_epoch_end(1, is_best=True)
    assert recorder.saved == [(None, 0)]
    assert (tmp_path / "best.pt").is_file() and not (tmp_path / "epoch_1.pt").exists()
    recorder.checkpointer.save_epoch_end(2, is_best=False)
    assert (tmp_path / "epoch_2.pt").is_file()
    recorder.checkpointer.keep_checkpoints = 1
    recorder.checkpointer.save_epoch_end(4, is_best=False)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_4.pt"]
