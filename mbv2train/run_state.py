"""What a training checkpoint holds, how it is put back, and which config changes a resume allows."""

from __future__ import annotations

from typing import Any

from mbv2train.checkpoint import FORMAT_VERSION, versions
from mbv2train.errors import CheckpointError

# Settings that change where files are or how fast things run, not what is computed. Any other
# difference between the saved config and the resumed one would make the run a different experiment.
HARMLESS_KEYS = {
    "data.root", "data.train_dir", "data.val_dir", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "data.prefetch_factor", "data.val_batch_size",
    "train.output_dir", "train.log_every_steps", "train.tb_images", "train.save_every_epochs",
    "train.keep_checkpoints", "train.compile", "train.device", "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes", "data.bad_images", "data.max_bad_fraction",
}


def training_state(*, model, ema, optimizer, scheduler, scaler, epoch: int, global_step: int,
                   best_metric: str, best_value: float | None, config: dict, class_names: list[str],
                   world_size: int) -> dict[str, Any]:
    """Everything needed to continue a run, as tensors and plain containers only (weights_only loads it)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # epochs completed
        "global_step": global_step,  # optimizer steps completed
        "best_metric": best_metric,
        "best_value": best_value,
        "config": config,
        "class_names": list(class_names),
        "world_size": world_size,
        "versions": versions(),
    }


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
