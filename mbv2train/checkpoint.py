"""Checkpoints: atomic writes, safe loads (weights_only=True), retention.

A checkpoint holds only tensors and plain containers of str/int/float/bool, so it loads with
``torch.load(path, weights_only=True)``: loading one never runs code from the file.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision

from mbv2train import __version__
from mbv2train.errors import CheckpointError
from mbv2train.faults import NO_FAULTS, Faults, die_mid_write

FORMAT_VERSION = 1
LAST = "last.pt"
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
    def write(f):
        if faults.crash_now():
            torch.save({"partial": torch.zeros(1024)}, f)
            die_mid_write(f)
        torch.save(state, f)

    _atomic_write(path, write, keep_previous)


def copy_checkpoint(source: Path, dest: Path) -> None:
    """Atomic copy (best.pt and epoch_N.pt are copies of last.pt, not a second serialization)."""
    with open(source, "rb") as src:
        _atomic_write(dest, lambda f: shutil.copyfileobj(src, f))


def _atomic_write(path: Path, write, keep_previous: Optional[Path] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; checkpoints get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself survive a power cut
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a full disk as RuntimeError, not OSError
        if isinstance(exc, (OSError, RuntimeError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
            raise CheckpointError(f"cannot write {path.name} in {path.parent}: {reason[:200]} (disk full?); "
                                  f"the previous checkpoint is intact") from None
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temp files that a crashed write left behind; returns them (the caller warns)."""
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state dict with weights_only=True; CheckpointError (one line) on any problem."""
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(held)})" if held else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickles that would import or call arbitrary objects; say which ones
        unsafe = sorted(set(UNSAFE_GLOBAL.findall(str(exc))))
        if unsafe:
            raise CheckpointError(f"checkpoint refused: {path} would load code objects ({', '.join(unsafe)}); "
                                  f"only tensors and plain containers are loaded") from None
        raise CheckpointError(f"checkpoint is corrupt or truncated: {path}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError):
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


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys of a wrapped model ('module.', '_orig_mod.') without the wrapper's prefix."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
