"""SIGTERM, SIGINT and SIGUSR1 become a stop flag that the training loop checks between steps.

Schedulers (SLURM, Kubernetes) and Ctrl-C send the signal to the whole process group. The handler records
the signal and says on stderr that it was heard (one unbuffered write, which cannot collide with a
progress bar's buffered output); the loop then finishes its step, saves a checkpoint and exits with
128 + the signal number. DataLoader workers ignore the signals (``ignore_in_worker``), so they do not
die first and take the run down with them. A second SIGINT aborts at once.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    def __init__(self, announce: bool = True):
        self.signum: Optional[int] = None
        self.announce = announce  # under torchrun only rank 0 speaks
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        first = self.signum is None
        self.signum = signum
        if first and self.announce:
            hint = "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else ""
            message = f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint{hint}\n"
            try:
                os.write(2, message.encode())
            except OSError:  # stderr closed: the stop goes on without the message
                pass

    def install(self) -> "StopFlag":
        """Route the stop signals here (main thread only); ``restore`` puts the old handlers back."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class Preempted(Exception):
    """Raised by the trainer after it saved a checkpoint because of a stop signal."""

    def __init__(self, signum: int, checkpoint: str, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process decides when to stop, so workers ignore the signals."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
