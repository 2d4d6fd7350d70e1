"""A run that fails before its first checkpoint takes back what it put into the run directory.

Until last.pt is written, config.yaml, tb/ and metrics.jsonl describe a run that cannot be resumed or
evaluated: left behind, they look like a run that happened, and the next attempt writes its curves over
them. A stop signal's checkpoint is a checkpoint: what goes with it stays. What was there before the
run (a folder the user made, their own files in it, an earlier attempt's leftovers) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from mbv2train.config.preflight import LAST_CHECKPOINT

DEPTH = 2  # levels of the run directory looked at: its own files, and those in its tb/


@contextlib.contextmanager
def taken_back_unless_saved(run_dir: Path, owner: bool) -> Iterator[list[Callable[[], None]]]:
    """Around a run writing into ``run_dir``: when it raises and ``run_dir`` holds no last.pt, remove what
    appeared in ``run_dir`` (and the folders above it that it created) meanwhile. ``owner``: this process
    writes the run directory (rank 0); the others leave it alone.

    Yields a list the run appends to: what must stop writing into ``run_dir`` before it is taken back."""
    before_taking_back: list[Callable[[], None]] = []
    if not owner:
        yield before_taking_back
        return
    run_dir = Path(run_dir)
    new_parents = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    there = _contents(run_dir)
    try:
        yield before_taking_back
    except BaseException:
        if not (run_dir / LAST_CHECKPOINT).exists():
            for stop_writing in before_taking_back:
                with contextlib.suppress(Exception):  # the run's own error is the one to report
                    stop_writing()
            _take_back(run_dir, there, new_parents)
        raise


def _contents(folder: Path) -> set[str]:
    """The paths in ``folder`` and in its folders, relative to it (empty when there is no such folder)."""
    return {relative for relative, _ in _entries(folder)}


def _entries(folder: Path) -> Iterator[tuple[str, str]]:
    """(path relative to ``folder``, full path) down to DEPTH levels: a run writes files into the run
    directory and into its tb/, and an output directory given by mistake (a home folder) is not walked."""
    for root, dirs, files in os.walk(folder):
        relative_root = os.path.relpath(root, folder)
        level = 0 if relative_root == "." else relative_root.count(os.sep) + 1
        for name in dirs + files:
            yield os.path.normpath(os.path.join(relative_root, name)), os.path.join(root, name)
        if level + 1 >= DEPTH:
            dirs[:] = []


def _take_back(run_dir: Path, there: set[str], new_parents: list[Path]) -> None:
    if new_parents:  # the run made the folder: all of it is the run's
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in new_parents[1:]:
            with contextlib.suppress(OSError):  # another run may have put its own folder there meanwhile
                parent.rmdir()
        return
    # listed first, removed after: a folder removed while walking would be walked into
    for relative, full in [entry for entry in _entries(run_dir) if entry[0] not in there]:
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)
