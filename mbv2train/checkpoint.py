"""Checkpoints: atomic writes, safe loads (weights_only=True), retention.

A checkpoint holds only tensors and plain containers of str/int/float/bool, so it loads with
``torch.load(path, weights_only=True)``: loading one never runs code from the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision

from mbv2train import __version__, atomic_files
from mbv2train.checkpoint_kind import LAST, require_checkpoint_file
from mbv2train.errors import CheckpointError
from mbv2train.faults import NO_FAULTS, Faults, die_mid_write

FORMAT_VERSION = 1
PREVIOUS = "previous.pt"  # the last.pt before the newest one
BEST = "best.pt"
TEMP_SUFFIX = ".tmp"
EPOCH_COPY = re.compile(r"^epoch_(\d+)\.pt$")
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "mbv2train": __version__}


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: Optional[Path] = None,
                    faults: Faults = NO_FAULTS) -> None:
    """Write ``state`` to ``path`` atomically: a crash or a full disk mid-write leaves the old file intact.

    With ``keep_previous``, the file being replaced is kept under that name, so two valid checkpoints
    exist even if the newest one is later found damaged.
    """
    faults.start_checkpoint()

    def write(f):
        if faults.crash_in_checkpoint == faults.checkpoint_writes and faults.crash_point == "mid_write":
            torch.save({"partial": torch.zeros(1024)}, f)
            die_mid_write(f)
        torch.save(state, f)

    _atomic_write(path, write, keep_previous, faults)


def copy_checkpoint(source: Path, dest: Path) -> None:
    """Atomic copy (best.pt and epoch_N.pt are copies of last.pt, not a second serialization)."""
    with open(source, "rb") as src:
        _atomic_write(dest, lambda f: shutil.copyfileobj(src, f))


def _atomic_write(path: Path, write, keep_previous: Optional[Path] = None, faults: Faults = NO_FAULTS) -> None:
    """Write through a temp file, then rename it over ``path``.

    At every instant ``path`` names a complete file: the old one is kept as ``keep_previous`` through a
    hard link (or a copy) made before the rename, never by moving ``path`` away. A crash at any point
    leaves the old ``path`` or the new one; a complete temp file left behind is recovered by
    ``recover_interrupted_writes``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.crash_at("after_write")
        if keep_previous is not None and path.exists():
            _keep_copy(path, keep_previous)
        faults.crash_at("after_previous")
        os.replace(tmp, path)
        faults.crash_at("after_rename")
        atomic_files.fsync_dir(path.parent)  # make the renames themselves survive a power cut
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as RuntimeError, not OSError
        if isinstance(exc, (OSError, RuntimeError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
            raise CheckpointError(f"cannot write {path.name} in {path.parent}: {reason[:200]} (disk full?); "
                                  f"the previous checkpoint is intact") from None
        raise


def _temp_file(path: Path) -> tuple[int, Path]:
    """An open temp file beside ``path`` whose name says what it is for (.NAME.RANDOM.tmp), with the mode the
    umask gives (recover_interrupted_writes finds them by that name)."""
    return atomic_files.temp_file_beside(path, TEMP_SUFFIX)


def _keep_copy(source: Path, dest: Path) -> None:
    """Atomically make ``dest`` a copy of ``source`` while ``source`` stays where it is."""
    if dest.exists() and os.path.samefile(source, dest):
        return  # already linked (a save that died after linking); renaming a link onto itself does nothing
    fd, tmp = _temp_file(dest)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(source, tmp)  # the same bytes without copying; a later rename over source leaves them
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _target_of(temp: Path) -> str:
    """The file a temp file was written for: '.last.pt.k2j4h1.tmp' -> 'last.pt'."""
    return temp.name[1:-len(TEMP_SUFFIX)].rsplit(".", 1)[0]


def position(state: dict[str, Any]) -> tuple[int, int]:
    """Where in the run a checkpoint was written, comparable between checkpoints: (optimizer steps,
    completed epochs); an epoch's end save follows the save at its last step."""
    return int(state["global_step"]), int(state["epoch"])


def recover_interrupted_writes(run_dir: Path) -> list[str]:
    """Finish or undo the checkpoint writes that a crash interrupted; returns one line per file handled.

    A temp file for last.pt that is a complete training checkpoint newer than last.pt was written in full
    and only missed its rename: it becomes last.pt (and the old last.pt previous.pt). Every other temp
    file (half-written, or a copy that the run derives again) is deleted.
    """
    if not run_dir.is_dir():
        return []
    messages = []
    temps = sorted(p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))
    last = run_dir / LAST
    for temp in temps:
        candidate = _training_checkpoint_or_none(temp) if _target_of(temp) == LAST else None
        current = _training_checkpoint_or_none(last) if candidate is not None else None
        if candidate is not None and (current is None or position(candidate) > position(current)):
            if current is not None:  # a damaged last.pt must not push out a good previous.pt
                _keep_copy(last, run_dir / PREVIOUS)
            os.replace(temp, last)
            atomic_files.fsync_dir(run_dir)
            messages.append(f"recovered {temp}, a complete checkpoint whose rename was interrupted, as {last}")
        else:
            temp.unlink(missing_ok=True)
            messages.append(f"removed {temp}, left by a checkpoint write that did not finish")
    return messages


def _training_checkpoint_or_none(path: Path) -> Optional[dict[str, Any]]:
    """The training checkpoint at ``path``, or None when it is missing, damaged or something else."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None
    return state if is_training_checkpoint(state) else None


def newest_valid_checkpoint(run_dir: Path) -> tuple[Optional[dict[str, Any]], Optional[Path], list[str]]:
    """(state, path, skipped) of the newest training checkpoint in ``run_dir`` that loads.

    Candidates are last.pt, previous.pt and the epoch_N.pt copies, newest first; a truncated or corrupt
    one is skipped, and ``skipped`` says which and why.
    """
    names = [LAST, PREVIOUS] + [p.name for p in run_dir.glob("epoch_*.pt") if EPOCH_COPY.match(p.name)]
    candidates = sorted((run_dir / n for n in names if (run_dir / n).is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if is_training_checkpoint(state):
            return state, path, skipped
        skipped.append(f"not a training checkpoint: {path}")
    return None, None, skipped


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state dict with weights_only=True; CheckpointError (one line) on any problem."""
    path = Path(path)
    require_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickles that would import or call arbitrary objects; say which ones
        unsafe = sorted(set(UNSAFE_GLOBAL.findall(str(exc))))
        if unsafe:
            raise CheckpointError(f"checkpoint refused: {path} would load code objects ({', '.join(unsafe)}); "
                                  f"only tensors and plain containers are loaded") from None
        raise CheckpointError(f"checkpoint is corrupt or truncated: {path}") from None
    except Exception:  # noqa: BLE001 - garbage bytes fail inside the unpickler in many ways (IndexError, ...)
        raise CheckpointError(f"checkpoint is corrupt or truncated: {path}") from None


def is_training_checkpoint(obj: Any) -> bool:
    """True for a checkpoint written by `mbv2 train`, False for a bare state dict."""
    return isinstance(obj, dict) and "format_version" in obj and "model" in obj


def prune_epoch_copies(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch_N.pt copies; returns what was deleted."""
    copies = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := EPOCH_COPY.match(p.name)))
    doomed = [p for _, p in copies[:-keep]] if keep > 0 else [p for _, p in copies]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex: what model.pretrained_sha256 and exported models name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys of a wrapped model ('module.', '_orig_mod.') without the wrapper's prefix."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def ema_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA model's state dict in a training checkpoint (which must hold one): AveragedModel keeps the
    model under "module." beside its own n_averaged counter."""
    return strip_prefix({k: v for k, v in state["ema"].items() if k != "n_averaged"}, "module.")
