"""A run that has trained all its epochs, met again by `mbv2 train --resume`: left as it is.

Building the run would read the data, rewrite config.yaml and open a TensorBoard file, only to find that
no epoch is left; a second `make demo` does exactly this. So the finished run is recognised from its
checkpoint alone, before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from mbv2train import checkpoint as ckpt
from mbv2train.model import pretrained
from mbv2train.train import run_state
from mbv2train.config import Config, with_num_classes
from mbv2train.progress import log
from mbv2train.words import plural


def left_finished(state: Optional[dict[str, Any]], cfg: Config, resume: Optional[str], allow_changes: Sequence[str],
                  world_size: int, is_main: bool) -> bool:
    """Whether ``state`` has already trained all of cfg's train.epochs. Such a run is left as it is: a config
    that changes the experiment is still refused (as any resume), rank 0 (``is_main``) finishes the copies to
    best.pt and epoch_N.pt that a kill interrupted, and one line says the run is done; nothing else is
    read, written or logged."""
    if state is None or state["epoch"] < cfg.train.epochs:
        return False
    # what the run took from its pretrained file and its data, as a resume takes them
    resolved = pretrained.resolve_config(cfg, None, state["config"])
    if resolved.model.num_classes is None:
        resolved = with_num_classes(resolved, len(state["class_names"]))
    run_state.check_config_changes(state, resolved.to_dict(), world_size, allow_changes)

    run_dir, auto = Path(cfg.train.output_dir), resume in (None, "auto")
    folder = run_dir if auto else Path(resume).parent  # where the checkpoint and its best.pt are
    if is_main and folder.resolve() == run_dir.resolve():
        for line in run_state.restore_derived_copies(state, run_dir, cfg.train.save_every_epochs,
                                                     cfg.train.keep_checkpoints):
            log(f"warning: {line}")
    trained = state["epoch"]
    line = f"nothing to train: {run_dir if auto else resume} already finished its {plural(trained, 'epoch')}"
    if state.get("best_value") is not None:
        line += (f"; best {state['best_metric']} {state['best_value']:.4f} (epoch {state.get('best_epoch')}) "
                 f"in {folder / ckpt.BEST}")
    log(line)
    return True
