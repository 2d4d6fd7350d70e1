"""Progress for a loop over batches: a tqdm bar on a terminal, plain log lines every N steps otherwise.

Redrawn bars turn into megabytes of carriage returns in a batch job's log file, so when stdout is not
a terminal the same numbers are printed as one line every ``log_every`` steps.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

BAR_REFRESH_STEPS = 10  # numbers on a bar need a device sync; refresh them every few steps only


class Progress:
    def __init__(self, total: int, desc: str, log_every: int, enabled: bool = True, start: int = 0,
                 stream=None):
        self.total, self.desc, self.log_every, self.enabled = total, desc, log_every, enabled
        # stdout by default; a command whose stdout carries its results (mbv2 predict) passes stderr
        self.stream = stream if stream is not None else sys.stdout
        self.count = start
        self.started = time.perf_counter()
        self.label = ""  # whose figures the line shows ("all 2 processes"), when that needs saying
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    def due(self) -> bool:
        """Whether the next update shows numbers: the caller computes them (a device sync) only then."""
        if not self.enabled:
            return False
        every = BAR_REFRESH_STEPS if self.bar is not None else self.log_every
        return (self.count + 1) % every == 0 or self.count + 1 == self.total

    def update(self, fields: Callable[[], dict[str, str]] | None = None) -> None:
        """Advance one step; ``fields`` is called only when the numbers are shown."""
        show = self.due()
        self.count += 1
        if self.bar is not None:
            if show and fields is not None:
                text = ", ".join(f"{k}={v}" for k, v in fields().items())
                self.bar.set_postfix_str(f"{self.label}: {text}" if self.label and text else text, refresh=False)
            self.bar.update(1)
        elif show:
            elapsed = time.perf_counter() - self.started
            text = " ".join(f"{k} {v}" for k, v in (fields() if fields is not None else {}).items())
            if self.label and text:
                text = f"{self.label}: {text}"
            print(f"{self.desc} {self.count}/{self.total} {text} ({elapsed:.0f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(message: str, enabled: bool = True) -> None:
    """A console line that does not break a tqdm bar."""
    if not enabled:
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
