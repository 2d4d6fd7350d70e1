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
from typing import Any

import torch
import torchvision

from mbv2train import __version__
from mbv2train.errors import CheckpointError

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
EPOCH_COPY = re.compile(r"^epoch_(\d+)\.pt$")
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "mbv2train": __version__}


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    _atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(source: Path, dest: Path) -> None:
    """Atomic copy (best.pt and epoch_N.pt are copies of last.pt, not a second serialization)."""
    with open(source, "rb") as src:
        _atomic_write(dest, lambda f: shutil.copyfileobj(src, f))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; checkpoints get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state dict with weights_only=True; CheckpointError (one line) on any problem."""
    path = Path(path)
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
