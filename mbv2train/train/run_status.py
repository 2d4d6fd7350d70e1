"""`mbv2 train --status-file PATH`: how the run ended, written for a job script to read.

Under torchrun the exit code cannot say it: torchrun turns any failed process into exit code 1, so a
clean stop on a signal, a crash and a mistake in the config all look the same to a batch script. The file
is one line of JSON, written at once as the command ends (after the stop's checkpoint is saved):

    {"exit_code": 0}                                   the run finished
    {"exit_code": 138, "stopped_by": "SIGUSR1", "step": 1200, "checkpoint": "runs/x/last.pt"}
                                                       a stop signal: the checkpoint is written, resume from it
    {"exit_code": 2, "error": "..."}                   a mistake (the error line), or 1 for a crash

``exit_code`` is what `mbv2 train` alone exits with. With a status file a clean stop exits 0 on every
process instead: its code is in the file, and torchrun then neither fails the group (a traceback, exit 1)
nor restarts it (--max-restarts) as if a process had died.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from mbv2train import launch
from mbv2train.errors import UserError
from mbv2train.preemption import Preempted


def record_of(ended: Optional[BaseException]) -> dict:
    """The status of a command that ended by ``ended`` (None: it returned normally)."""
    stop = _clean_stop(ended)
    if stop is not None:
        return {"exit_code": stop.exit_code, "stopped_by": signal.Signals(stop.signum).name, "step": stop.step,
                "checkpoint": stop.checkpoint}
    if ended is None:
        return {"exit_code": 0}
    if isinstance(ended, UserError):
        return {"exit_code": ended.exit_code, "error": _one_line(str(ended))}
    if isinstance(ended, KeyboardInterrupt):
        return {"exit_code": 130, "error": "interrupted"}
    code = getattr(ended, "exit_code", None)  # typer.Exit
    if code is None and isinstance(ended, SystemExit):
        code = ended.code if isinstance(ended.code, int) else 1
    if code is not None:
        return {"exit_code": code}
    return {"exit_code": 1, "error": _one_line(f"{type(ended).__name__}: {ended}")}


def _clean_stop(ended: Optional[BaseException]) -> Optional[Preempted]:
    if isinstance(ended, Preempted):
        return ended
    # the command turns the stop into typer.Exit(128 + signal) `from None`, which still keeps it as context
    if ended is not None and hasattr(ended, "exit_code") and not isinstance(ended, UserError) \
            and isinstance(ended.__context__, Preempted):
        return ended.__context__
    return None


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def write_status(path: Path, record: dict, replace: bool = True) -> None:
    """Put ``record`` at ``path`` all at once, so that a reader never sees half a file; with ``replace``
    False, leave a status that is already there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a run that failed early took back the run dir it was in
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)  # fails if the file exists, also on NFS
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)


def records_run_status(command):
    """Wrap `mbv2 train`: write its ``status_file`` as it ends, and exit 0 after a clean stop.

    A finished run or a clean stop is written by rank 0, for the whole run. An error is written by the first
    process that fails, whichever rank: torchrun ends the other processes as soon as one fails, possibly
    before rank 0 reached its own error (a mistake in the config fails every process at once)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        path = kwargs.get("status_file")
        if path is None:
            return command(*args, **kwargs)
        try:
            result = command(*args, **kwargs)
        except BaseException as ended:
            record = record_of(ended)
            if "stopped_by" in record:
                _write(path, record, rank_0_only=True)
                return None
            _write(path, record, replace=False)
            raise
        _write(path, record_of(None), rank_0_only=True)
        return result

    return wrapper


def _write(path: Path, record: dict, rank_0_only: bool = False, replace: bool = True) -> None:
    if rank_0_only:
        if launch.rank() != 0:
            return
    try:
        write_status(path, record, replace=replace)
    except OSError as exc:
        # the run's outcome stands; the job script, finding no status, treats the run as failed
        print(f"warning: cannot write the status file {path}: {exc.strerror or exc}", file=sys.stderr, flush=True)
