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
    """The figures of one process's epoch (``progress``: epoch.EpochProgress, ``guard``: its StepGuard) for
    the progress line, over ``processes`` processes."""

    def __init__(self, progress, guard, with_top1: bool, started: float, processes: int):
        self.progress, self.guard, self.with_top1, self.started = progress, guard, with_top1, started
        self.processes = processes
        self.shared: dict[str, str] = {}  # all processes' figures, as of the last share()
        self.shown: dict[str, str] = {}  # this process's, as of the last refresh()

    @property
    def label(self) -> str:
        """Whose figures the line shows, when that is not obvious."""
        return f"all {self.processes} processes" if self.processes > 1 else ""

    def share(self) -> None:
        """Sum the figures over the processes. Under torchrun a collective that settles the step flags:
        every process calls it at the same steps (log steps, the epoch's last step); alone, nothing."""
        if self.processes == 1:
            return
        progress = self.progress
        progress.settle()
        device = progress.loss_sum.device
        counts = torch.tensor([float(progress.seen), float(self.guard.images_taken)], device=device)
        sums = all_reduce_sum(torch.cat([torch.stack([progress.loss_sum.float(), progress.correct.float()]), counts]))
        self.shared = self._figures(*sums.tolist())

    def refresh(self) -> None:
        """Read this process's figures now (a wait for the device; nothing under torchrun, whose line
        shows all processes' as of the last share()). Reads the step flags without stopping the run: a
        breach of train.nonfinite is raised where every process looks (step_guard.py)."""
        if self.processes > 1:
            return
        self.guard.read(self.progress)  # rank 0's own look: counts without stopping (step_guard.py)
        progress = self.progress
        self.shown = self._figures(progress.loss_sum.item(), progress.correct.item(), progress.seen,
                                   self.guard.images_taken)

    def fields(self) -> dict[str, str]:
        """The line's figures, as the last refresh() or share() read them: plain values on the host, so
        that the progress bar's callback never waits or raises."""
        return self.shared if self.processes > 1 else self.shown

    def _figures(self, loss_sum: float, correct: float, seen: float, images_taken: float) -> dict[str, str]:
        figures = {"loss": f"{loss_sum / max(seen, 1):.4f}", "lr": f"{self.progress.lr:.4g}"}
        if self.with_top1:
            figures["top1"] = f"{correct / max(seen, 1):.3f}"
        figures["img/s"] = f"{images_taken / (time.perf_counter() - self.started):.0f}"
        return figures
