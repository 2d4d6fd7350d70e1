"""The run directory: opened (config.yaml, metrics.jsonl, TensorBoard) by rank 0, and taken back when a
run fails before its first checkpoint.

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

import yaml

from mbv2train.config import Config
from mbv2train.config.preflight import LAST_CHECKPOINT
from mbv2train.errors import ConfigError
from mbv2train.progress import is_main_process
from mbv2train.train.tracking import NullTracker, Tracker, append_event, augmented_samples, truncate_metrics

DEPTH = 2  # levels of the run directory looked at: its own files, and those in its tb/


def open_run_dir(run_dir: Path, cfg: Config, epoch: int, global_step: int, fresh: bool, allowed: list[str],
                 train_loader) -> Tracker | NullTracker:
    """Create the run directory (rank 0 only), write its config.yaml, drop the metrics rows past the
    checkpoint at (``epoch``, ``global_step``), note the ``allowed`` changes, and return its tracker (a
    NullTracker on the other processes)."""
    if not is_main_process():
        return NullTracker()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"train.output_dir: cannot create {run_dir}: {exc.strerror or exc}") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    # Rows and curves past the checkpoint belong to an attempt that died before saving: drop them.
    metrics = run_dir / "metrics.jsonl"
    truncate_metrics(metrics, epoch)
    if allowed:
        append_event(metrics, {"event": "allowed_change", "epoch": epoch, "step": global_step, "changes": allowed})
    tracker = Tracker(run_dir, purge_step=0 if fresh else global_step + 1)
    try:
        if fresh:
            tracker.hparams(cfg.to_dict())
            if cfg.train.tb_images:  # reads images: an unreadable one stops the run here
                tracker.images(augmented_samples(train_loader, cfg.train.tb_images))
    except BaseException:
        tracker.close()  # its writer thread must stop before a failed start takes the run directory back
        raise
    return tracker


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
    for _relative, full in [entry for entry in _entries(run_dir) if entry[0] not in there]:
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)
