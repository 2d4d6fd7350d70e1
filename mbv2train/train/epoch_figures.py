"""The figures on a training epoch's progress line: loss, learning rate, top-1 and img/s.

In one process they are read from the epoch's running sums when the line is drawn, a wait for the device
that the line's own rate bounds (progress.py). Under torchrun each process holds only its part of the
sums, while the epoch line that follows shows all processes' figures; so that both lines show one kind,
the progress line shows all processes' too, and says so. They are summed over the processes where every
process stops anyway to read its step flags (log steps and the epoch's last step), so a steady-state step
still never waits for the device; between those the line keeps the latest sum.
"""

from __future__ import annotations

import time

import torch

from mbv2train.distributed import all_reduce_sum


class ProgressFigures:
    """The figures of one process's epoch (``done``: engine.EpochProgress, ``guard``: its StepGuard) for
    the progress line, over ``processes`` processes."""

    def __init__(self, done, guard, with_top1: bool, started: float, processes: int):
        self.done, self.guard, self.with_top1, self.started = done, guard, with_top1, started
        self.processes = processes
        self.shared: dict[str, str] = {}  # all processes' figures, as of the last share()

    @property
    def label(self) -> str:
        """Whose figures the line shows, when that is not obvious."""
        return f"all {self.processes} processes" if self.processes > 1 else ""

    def share(self) -> None:
        """Sum the figures over the processes. Under torchrun a collective that settles the step flags:
        every process calls it at the same steps (log steps, the epoch's last step); alone, nothing."""
        if self.processes == 1:
            return
        done = self.done
        done.settle()
        device = done.loss_sum.device
        counts = torch.tensor([float(done.seen), float(self.guard.images_taken)], device=device)
        sums = all_reduce_sum(torch.cat([torch.stack([done.loss_sum.float(), done.correct.float()]), counts]))
        self.shared = self._figures(*sums.tolist())

    def fields(self) -> dict[str, str]:
        """The line's figures: this process's, read now, or all processes' as of the last share()."""
        if self.processes > 1:
            return self.shared
        self.guard.read(self.done)  # rank 0's own look: counts without stopping (step_guard.py)
        return self._figures(self.done.loss_sum.item(), self.done.correct.item(), self.done.seen,
                             self.guard.images_taken)

    def _figures(self, loss_sum: float, correct: float, seen: float, images_taken: float) -> dict[str, str]:
        figures = {"loss": f"{loss_sum / max(seen, 1):.4f}", "lr": f"{self.done.lr:.4g}"}
        if self.with_top1:
            figures["top1"] = f"{correct / max(seen, 1):.3f}"
        figures["img/s"] = f"{images_taken / (time.perf_counter() - self.started):.0f}"
        return figures
