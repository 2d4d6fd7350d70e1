"""The files and folders a command is given, checked before torch is imported.

Importing torch takes seconds (more on a busy machine); a missing checkpoint, data folder or output place is
a mistake the user should hear of at once. The commands' own code checks the same things again where it
uses them (this module's functions, called from there), so a caller that skips the CLI is told the same.
Only what the file system can answer is checked here: what is inside a checkpoint needs torch to read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from mbv2train import launch
from mbv2train.checkpoint_kind import LAST as LAST_CHECKPOINT
from mbv2train.checkpoint_kind import require_checkpoint_file
from mbv2train.config import Config, DataConfig, ModelConfig, PRETRAINED_TAGS, pretrained_is_file
from mbv2train.errors import CheckpointError, ConfigError, DataError

__all__ = ["LAST_CHECKPOINT", "data_folder", "for_bench", "for_data_check", "for_dataset_writer", "for_eval",
           "for_predict", "for_train", "fresh_run_dir", "pretrained_file", "require_checkpoint_file",
           "require_exists", "require_folder", "split_folders", "writable_file", "writable_folder"]


# ---------------------------------------------------------------- single paths

def require_folder(path: Path, what: str, key: Optional[str] = None) -> None:
    """DataError (one line) unless ``path`` is a folder; ``what`` names it, ``key`` the setting behind it."""
    source = f" (set by {key})" if key else ""
    if not path.exists():
        raise DataError(f"{what} folder {path} does not exist{source}")
    if not path.is_dir():
        raise DataError(f"{what} folder {path} is not a folder{source}")


def data_folder(path: Path) -> Path:
    """``path`` given as --data: it must be a folder."""
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    return path


def split_folders(cfg: DataConfig) -> list[tuple[str, Path, str]]:
    """(what, folder, setting) for the training and then the validation folder: data.train_dir /
    data.val_dir, else data.root / the split names; DataError when one is unset, missing or not a folder."""
    if cfg.train_dir is None and cfg.root is None:
        raise DataError("no training data: set data.root or --data DIR")
    if cfg.val_dir is None and cfg.root is None:
        raise DataError("no validation data: set data.val_dir or data.root")
    if cfg.root is not None and (cfg.train_dir is None or cfg.val_dir is None):
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root: folder {root} does not exist")
    splits = []
    for what, explicit, split, name in (("training", cfg.train_dir, cfg.train_split, "train"),
                                        ("validation", cfg.val_dir, cfg.val_split, "val")):
        if explicit is not None:
            path, key = Path(explicit).expanduser(), f"data.{name}_dir"
        else:
            path, key = Path(cfg.root).expanduser() / split, f"data.root + data.{name}_split"
        require_folder(path, what, key)
        splits.append((what, path, key))
    return splits


def fresh_run_dir(run_dir: Path) -> None:
    """CheckpointError when a run without --resume would start over a run that has saved."""
    if (run_dir / LAST_CHECKPOINT).exists():
        raise CheckpointError(f"{run_dir} already holds a run ({LAST_CHECKPOINT}); continue it with --resume auto "
                              f"or choose another --output-dir")


def pretrained_file(model_cfg: ModelConfig) -> Optional[Path]:
    """The file model.pretrained names (None for torchvision's weights or none); CheckpointError when it
    is missing or cannot hold weights."""
    if not pretrained_is_file(model_cfg.pretrained):
        return None
    path = Path(model_cfg.pretrained).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        raise CheckpointError(f"model.pretrained: {what}: {path} (expected a state dict or an mbv2 "
                              f"checkpoint file, or one of {', '.join(PRETRAINED_TAGS)})")
    try:
        require_checkpoint_file(path, expected="a state dict or an mbv2 checkpoint")
    except CheckpointError as exc:
        raise CheckpointError(f"model.pretrained: {exc}") from None
    return path


def writable_folder(path: Path, key: str) -> None:
    """ConfigError unless ``path`` is a folder this process may write in, or one it may create."""
    there = _nearest_existing(path)
    if not there.is_dir():
        reason = "a file of that name is there" if there == path else f"{there} is a file"
        raise ConfigError(f"{key}: cannot create {path}: {reason}")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot create {path}: no permission to write in {there}")


def writable_file(path: Path, option: str) -> None:
    """ConfigError unless a file can be written at ``path`` (given as ``option``)."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    there = _nearest_existing(path.parent)
    if not there.is_dir():
        raise ConfigError(f"{option} {path}: cannot write there: {there} is a file")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write there: no permission to write in {there}")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


# ---------------------------------------------------------------- per command

def for_train(cfg: Config, resume: Optional[str]) -> None:
    """`mbv2 train`: the checkpoint to resume from, model.pretrained's file, the data folders, and a run
    directory that can be made."""
    run_dir = Path(cfg.train.output_dir)
    if resume is None and launch.restart_count() == 0:  # a restarted group resumes what it saved itself
        fresh_run_dir(run_dir)
    if resume not in (None, "auto"):
        require_checkpoint_file(Path(resume))
    pretrained_file(cfg.model)
    split_folders(cfg.data)
    if launch.rank() == 0:  # the only process that writes; another node may not even see the folder
        writable_folder(run_dir, "train.output_dir")


def for_eval(ckpt: Path, data: Optional[Path], config: Optional[Path]) -> None:
    """`mbv2 eval`: the checkpoint, --data, and --config (read again, with the checkpoint, after torch)."""
    require_checkpoint_file(ckpt)
    if data is not None:
        data_folder(data)
    if config is not None and not config.exists():  # read with the overrides once the checkpoint is loaded
        raise ConfigError(f"config file not found: {config}")


def for_predict(ckpt: Path, paths: Sequence[Path]) -> None:
    """`mbv2 predict`: the checkpoint and each image file or folder named."""
    require_checkpoint_file(ckpt)
    for path in paths:
        require_exists(path)


def require_exists(path: Path) -> None:
    """An image file or folder named on the command line."""
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")


def for_bench(cfg: Config) -> None:
    """`mbv2 bench data | train`: the data folders."""
    split_folders(cfg.data)


def for_dataset_writer(dest: Path, command: str) -> None:
    """`mbv2 data demo | photos`: a folder that exists or can be made (what is in it is checked later)."""
    writable_folder(Path(dest).expanduser(), command)


def for_data_check(folder: Path) -> Path:
    """`mbv2 data check`: the folder to check."""
    folder = Path(folder).expanduser()
    require_folder(folder, "data check:")
    return folder
