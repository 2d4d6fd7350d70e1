"""Resuming on another number of processes: the global batch stays, the per-process split changes.

The global batch (data.batch_size x processes x train.accum_steps) fixes the run's steps per epoch, its
learning rate (optim.lr_reference_batch) and its LR curve, so a resume keeps it. The rule, in order:
  1. keep data.batch_size and change train.accum_steps;
  2. else keep train.accum_steps and change data.batch_size;
  3. else one process batch of global batch / processes, without accumulation;
and when the processes do not divide the global batch, a one-line error naming process counts that do.

Every epoch has one global order of its samples, the same for any number of processes (data/loaders.py,
EpochSampler), and each micro-batch of the processes together takes the next slice of it. So a checkpoint's
position in the epoch is a number of samples of that order, and the rest of the epoch covers exactly the
samples not yet trained on, once each, whatever the new number of processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from mbv2train.config import Config
from mbv2train.errors import CheckpointError
from mbv2train.words import plural
from mbv2train.shortlist import shortlist


def saved_global_batch(state: dict[str, Any]) -> int:
    """The global batch a checkpoint was trained with (older checkpoints: from their config)."""
    if "global_batch" in state:
        return int(state["global_batch"])
    saved = state["config"]
    return (int(saved["data"]["batch_size"]) * int(state.get("world_size", 1))
            * int(saved.get("train", {}).get("accum_steps", 1)))


def keep_global_batch(cfg: Config, state: Optional[dict[str, Any]], world_size: int
                      ) -> tuple[Config, Optional[str]]:
    """``cfg`` with data.batch_size / train.accum_steps split so that ``world_size`` processes train with the
    checkpoint's global batch, and the warning line to print; ``cfg`` itself and None when the number of
    processes is the checkpoint's (or there is no checkpoint)."""
    if state is None or int(state.get("world_size", 1)) == world_size:
        return cfg, None
    target, saved_processes = saved_global_batch(state), int(state.get("world_size", 1))
    batch, accum = cfg.data.batch_size, cfg.train.accum_steps
    if target % (batch * world_size) == 0:
        accum = target // (batch * world_size)
    elif target % (accum * world_size) == 0:
        batch = target // (accum * world_size)
    elif target % world_size == 0:
        batch, accum = target // world_size, 1
    else:
        working = [n for n in range(1, target + 1) if target % n == 0]
        raise CheckpointError(f"cannot resume the global batch of {target} on {plural(world_size, 'process')}: "
                              f"{world_size} does not divide it; process counts that do: "
                              f"{shortlist(working, limit=12)}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch),
                              train=dataclasses.replace(cfg.train, accum_steps=accum))
    processes = plural(world_size, "process")
    note = (f"warning: resuming on {processes} instead of {saved_processes}: global batch {target} "
            f"kept as data.batch_size {batch} x {processes} x train.accum_steps {accum}; BatchNorm "
            f"statistics come from per-process batches of another size, so the run is no longer bit-identical "
            f"to one that was not interrupted")
    return cfg, note


def split_rank_parts(parts, world_size: int):
    """A mid-epoch checkpoint's per-process running sums (one row per process that wrote it) as rows for
    ``world_size`` processes: unchanged for the same count; else the first process carries their total,
    the others nothing, so the epoch's totals (summed over processes) come out the same."""
    if parts is None or len(parts) == world_size:
        return parts
    rows = parts.new_zeros((world_size, parts.shape[1]))
    rows[0] = parts.sum(dim=0)
    return rows
