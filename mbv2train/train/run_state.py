"""What a training checkpoint holds, finding the one to resume from, and which config changes a resume
allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mbv2train import checkpoint as ckpt
from mbv2train.config import Config
from mbv2train.distributed import barrier
from mbv2train.progress import log
from mbv2train.errors import CheckpointError, ConfigError
from mbv2train.words import plural
from mbv2train.config.preflight import fresh_run_dir
from mbv2train.train.rescale import saved_global_batch

# Settings that change where files are or how fast things run, not what is computed. Any other
# difference between the saved config and the resumed one would make the run a different experiment.
HARMLESS_KEYS = {
    "data.root", "data.train_dir", "data.val_dir", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "data.prefetch_factor", "data.val_batch_size",
    "train.output_dir", "train.log_every_steps", "train.tb_images", "train.tb_per_class", "train.save_every_epochs",
    "train.keep_checkpoints", "train.compile", "train.threads", "train.device", "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes", "train.dist_timeout_s", "data.bad_images", "data.max_bad_fraction",
}


def training_state(*, model, ema, optimizer, scheduler, scaler, epoch: int, global_step: int,
                   epoch_progress: Optional[dict[str, Any]], best_metric: str, best_value: float | None,
                   best_epoch: Optional[int], config: dict, class_names: list[str], world_size: int,
                   global_batch: Optional[int] = None, epoch_position: int = 0) -> dict[str, Any]:
    """Everything needed to continue a run, as tensors and plain containers only (weights_only loads it).

    ``epoch`` counts completed epochs; ``epoch_progress`` is set when the checkpoint was written inside
    the next one (after ``epoch_progress["steps"]`` of its optimizer steps, which took the first
    ``epoch_position`` samples of that epoch's global order).
    """
    if global_batch is None:
        global_batch = config["data"]["batch_size"] * world_size * config["train"]["accum_steps"]
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "epoch_progress": epoch_progress,
        "global_step": global_step,  # optimizer steps completed
        "best_metric": best_metric,
        "best_value": best_value,
        "best_epoch": best_epoch,  # the epoch whose end-of-epoch checkpoint best.pt must hold
        "config": config,
        "class_names": list(class_names),
        "world_size": world_size,
        "global_batch": global_batch,  # images per optimizer step over all processes
        "epoch_position": epoch_position,  # samples of the running epoch's global order trained on
        # CPU float sums depend on the thread count: a resume computes with the same one (cpu_threads.py)
        "intra_op_threads": torch.get_num_threads(),
        "versions": ckpt.versions(),
    }


def recorded_threads(state: Optional[dict[str, Any]]) -> Optional[int]:
    """The intra-op thread count the run being resumed computed with; None for a fresh run or a checkpoint
    from before it was recorded."""
    return state.get("intra_op_threads") if state is not None else None


def restore(state: dict[str, Any], *, model, ema, optimizer, scheduler, scaler) -> None:
    model.load_state_dict(state["model"])
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError("the checkpoint has no EMA weights but train.ema is on")
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def prepare_resume(resume: Optional[str], run_dir: Path, is_main: bool, restart: int = 0
                   ) -> Optional[dict[str, Any]]:
    """The checkpoint a run continues from (None: a fresh run), after rank 0 (``is_main``) has finished or
    undone the checkpoint writes a crash interrupted; every process calls it. ``restart``: how many times
    torchrun has restarted the group (restart_state)."""
    if is_main:
        for line in ckpt.recover_interrupted_writes(run_dir):
            log(f"warning: {line}")
    barrier()  # every process then reads the checkpoints rank 0 has put in order
    if restart:
        return restart_state(resume, run_dir, restart, log)
    return find_resume_state(resume, run_dir, log)


def find_resume_state(resume: Optional[str], run_dir: Path, warn: Callable[[str], None]
                      ) -> Optional[dict[str, Any]]:
    """The checkpoint to continue from: None for a fresh run, the newest valid one for "auto", or PATH."""
    if resume is None:
        fresh_run_dir(run_dir)
        return None
    if resume == "auto":
        state, path, only_damaged = _newest_in(run_dir, warn)
        if only_damaged:
            raise CheckpointError(f"no valid checkpoint left in {run_dir} to resume from")
        if path is not None and path.name != ckpt.LAST:
            warn(f"warning: resuming from {path}")
        return state
    state = ckpt.load_checkpoint(resume)
    if not ckpt.is_training_checkpoint(state):
        raise CheckpointError(f"{resume}: not a training checkpoint written by mbv2 train (a bare state dict "
                              f"has no optimizer or schedule to resume)")
    return state


def restart_state(resume: Optional[str], run_dir: Path, restart: int, warn: Callable[[str], None]
                  ) -> Optional[dict[str, Any]]:
    """The checkpoint a group that torchrun restarted continues from, named in one line: the newest in the
    run dir, or --resume PATH when nothing there is newer. The attempt that failed started from PATH and
    may have saved since; going back to PATH would overwrite that progress with older weights."""
    state, path, only_damaged = _newest_in(run_dir, warn)
    if resume not in (None, "auto"):
        given = find_resume_state(resume, run_dir, warn)
        if state is None or ckpt.position(given) >= ckpt.position(state):
            state, path = given, Path(resume)
    elif only_damaged:
        raise CheckpointError(f"no valid checkpoint left in {run_dir} to resume from")
    if state is None:
        warn(f"torchrun restart {restart}: no checkpoint in {run_dir} yet; starting afresh")
    else:
        warn(f"torchrun restart {restart}: resuming from {path}")
    return state


def _newest_in(run_dir: Path, warn: Callable[[str], None]
               ) -> tuple[Optional[dict[str, Any]], Optional[Path], bool]:
    """(state, path) of the newest valid checkpoint in ``run_dir`` (None, None when there is none), and
    whether it holds checkpoints that are all damaged (each named in a warning)."""
    if not run_dir.is_dir():
        return None, None, False
    state, path, skipped = ckpt.newest_valid_checkpoint(run_dir)
    for reason in skipped:
        warn(f"warning: skipping a checkpoint: {reason}")
    return state, path, state is None and bool(skipped)


def restore_derived_copies(state: dict[str, Any], run_dir: Path, save_every_epochs: int,
                           keep_checkpoints: int) -> list[str]:
    """Bring best.pt and epoch_N.pt up to the checkpoint a run resumes from; returns what was rewritten.

    At an epoch's end last.pt is written first and best.pt / epoch_N.pt are copied from it afterwards, so
    a run killed in between resumes from a last.pt that says "this epoch was the best" while best.pt still
    holds an older epoch (or does not exist). Such a copy is written again from the resumed state.
    """
    if state.get("epoch_progress") is not None or not state.get("epoch"):
        return []  # written inside an epoch: the copies belong to epoch ends
    epoch, rewritten = state["epoch"], []
    wanted = []
    if state.get("best_epoch") == epoch:
        wanted.append(run_dir / ckpt.BEST)
    if save_every_epochs and epoch % save_every_epochs == 0:
        wanted.append(run_dir / f"epoch_{epoch}.pt")
    for path in wanted:
        try:
            held = ckpt.load_checkpoint(path)
        except CheckpointError:
            held = None
        if held is not None and ckpt.is_training_checkpoint(held) and ckpt.position(held) >= ckpt.position(state):
            continue
        ckpt.save_checkpoint(state, path)
        rewritten.append(f"{path} was behind the checkpoint resumed from (a save was interrupted); "
                         f"rewrote it for epoch {epoch}")
    if save_every_epochs and rewritten:
        ckpt.prune_epoch_copies(run_dir, keep_checkpoints)
    return rewritten


def check_resumable(state: dict[str, Any], config: dict, classes: list[str], world_size: int,
                    allow_changes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(allowed, harmless) changes against the checkpoint; raises CheckpointError for any other change."""
    if state["class_names"] != classes:
        raise CheckpointError("the checkpoint's class list differs from the training data's "
                              f"({len(state['class_names'])} vs {plural(len(classes), 'class')})")
    return check_config_changes(state, config, world_size, allow_changes)


def check_config_changes(state: dict[str, Any], config: dict, world_size: int, allow_changes: Sequence[str]
                         ) -> tuple[list[str], list[str]]:
    """check_resumable's verdict on the config and the number of processes alone."""
    for key in allow_changes:
        section, _, name = key.partition(".")
        if name not in config.get(section, {}):
            raise ConfigError(f"--allow-change {key}: not a config key")
    refused, harmless = config_changes(_with_defaults(state["config"]), config)
    if state.get("world_size", 1) != world_size:
        now = config["data"]["batch_size"] * world_size * config["train"]["accum_steps"]
        if now == saved_global_batch(state):  # rescale.keep_global_batch split it anew: the same experiment
            refused = [line for line in refused if line.split(":")[0] not in ("data.batch_size", "train.accum_steps")]
        else:  # the global batch, hence steps and LR, would change
            refused.append(f"processes: {state.get('world_size', 1)} -> {world_size} with global batch "
                           f"{saved_global_batch(state)} -> {now}")
    allowed = [line for line in refused if line.split(":")[0] in allow_changes]
    refused = [line for line in refused if line not in allowed]
    if refused:
        raise CheckpointError("resuming would change the experiment: " + "; ".join(refused)
                              + " (pass --allow-change KEY to accept a change on purpose)")
    return allowed, harmless


def _with_defaults(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A saved config with the keys added since it was written at their defaults, which is what that run
    did: a key that did not exist yet cannot have been set to anything else."""
    defaults = Config().to_dict()
    return {section: {**defaults.get(section, {}), **saved.get(section, {})} for section in {*defaults, *saved}}


def config_changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]
                   ) -> tuple[list[str], list[str]]:
    """(refused, harmless) differences between two config dicts, each as 'key: saved -> now'."""
    refused, harmless = [], []
    for section in sorted(set(saved) | set(now)):
        old_values, new_values = saved.get(section, {}), now.get(section, {})
        for key in sorted(set(old_values) | set(new_values)):
            old, new = old_values.get(key), new_values.get(key)
            if old != new:
                line = f"{section}.{key}: {old!r} -> {new!r}"
                (harmless if f"{section}.{key}" in HARMLESS_KEYS else refused).append(line)
    return refused, harmless
