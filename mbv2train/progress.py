"""Progress for a loop over batches: a tqdm bar on a terminal, plain log lines every N steps otherwise.

Redrawn bars turn into megabytes of carriage returns in a batch job's log file, so when stdout is not
a terminal the same numbers are printed as one line every ``log_every`` steps.

Under torchrun only the main process (rank 0) prints: each process says once which it is
(``set_main_process``), and ``log`` and a ``Progress`` made without ``enabled`` follow it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

BAR_REFRESH_STEPS = 10  # numbers on a bar need a device sync; refresh them every few steps only


_main_process = True  # this process prints (rank 0, or the only process)


def set_main_process(is_main: bool) -> bool:
    """Say once per process whether it is the one that prints; returns what was set before."""
    global _main_process
    before, _main_process = _main_process, bool(is_main)
    return before


def is_main_process() -> bool:
    return _main_process


class Progress:
    def __init__(self, total: int, desc: str, log_every: int, enabled: Optional[bool] = None, start: int = 0,
                 stream=None):
        """``enabled``: whether to show anything (by default, when this is the main process)."""
        self.total, self.desc, self.log_every = total, desc, log_every
        self.enabled = _main_process if enabled is None else enabled
        # stdout by default; a command whose stdout carries its results (mbv2 predict) passes stderr
        self.stream = stream if stream is not None else sys.stdout
        self.count = start
        self.started = time.perf_counter()
        self.label = ""  # whose figures the line shows ("all 2 processes"), when that needs saying
        self.bar = None
        if self.enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    def due(self) -> bool:
        """Whether the next update shows numbers: the caller computes them (a device sync) only then."""
        if not self.enabled:
            return False
        every = BAR_REFRESH_STEPS if self.bar is not None else self.log_every
        return (self.count + 1) % every == 0 or self.count + 1 == self.total

    def update(self, fields: Callable[[], dict[str, str]] | None = None) -> None:
        """Advance one step; ``fields`` is called only when the numbers are shown.

        An exception from ``fields`` does not break the bar: the step is counted and shown without
        figures, and the exception is raised once the bar's own bookkeeping is done."""
        show = self.due()
        self.count += 1
        figures, failure = {}, None
        if show and fields is not None:
            try:
                figures = fields()
            except Exception as exc:  # re-raised below, once the bar is consistent again
                failure = exc
        if self.bar is not None:
            if show and fields is not None:
                text = ", ".join(f"{k}={v}" for k, v in figures.items())
                self.bar.set_postfix_str(f"{self.label}: {text}" if self.label and text else text, refresh=False)
            self.bar.update(1)
        elif show:
            elapsed = time.perf_counter() - self.started
            text = " ".join(f"{k} {v}" for k, v in figures.items())
            if self.label and text:
                text = f"{self.label}: {text}"
            print(f"{self.desc} {self.count}/{self.total} {text} ({elapsed:.0f}s)", file=self.stream, flush=True)
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(message: str) -> None:
    """A console line that does not break a tqdm bar, printed by the main process only."""
    if _main_process:
        tqdm.write(message, file=sys.stdout)
