"""An epoch's validation: the model, and the EMA when there is one, on the whole validation split."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from mbv2train.devices import Runtime
from mbv2train.distributed import broadcast_from_rank0
from mbv2train.evaluate import loop
from mbv2train.faults import Faults
from mbv2train.progress import Progress
from mbv2train.train.batchnorm_sync import average_running_statistics


class Validator:
    """Validates at each epoch's end. ``stop_check_batches``: how many batches every process has (the
    fewest over the processes: see the trainer), after each of which ``stop_requested`` is asked."""

    def __init__(self, loader, runtime: Runtime, sync_bn: bool, per_class: bool, stop_check_batches: int,
                 stop_requested: Callable[[], bool], faults: Faults, bad_images=None):
        self.loader, self.runtime, self.sync_bn, self.per_class = loader, runtime, sync_bn, per_class
        self.stop_check_batches, self.stop_requested = stop_check_batches, stop_requested
        self.faults, self.bad_images = faults, bad_images

    def validate(self, epoch: int, model: nn.Module, ema_model: Optional[nn.Module],
                 per_class_figures: Callable[[str, Any], None] = lambda prefix, confusion: None
                 ) -> Optional[dict[str, Any]]:
        """The metrics, prefixed "val_" (and "ema_val_" for the EMA); None when a stop signal came part-way
        (the caller saves the finished training part; a resume redoes the pass). ``per_class_figures(prefix,
        confusion)`` takes each pass's confusion matrix (train.tb_per_class) as soon as it is done."""
        evaluations = [("val_", model)] + ([("ema_val_", ema_model)] if ema_model is not None else [])
        # Each process's last forward pass left its own BatchNorm statistics (DDP hands rank 0's out only
        # at the next forward): evaluate and save their mean over the processes, which does not depend on
        # rank 0's shard alone (batchnorm_sync.py). With train.sync_bn they agree already; rank 0's copy
        # makes them agree to the last bit.
        for _, module in evaluations:
            if self.sync_bn:
                broadcast_from_rank0(list(module.buffers()))
            else:
                average_running_statistics(module)
        row: dict[str, Any] = {}
        for prefix, module in evaluations:
            bar = Progress(len(self.loader), f"{prefix.replace('_', ' ').strip()} {epoch}",
                           log_every=max(len(self.loader), 1))
            self.faults.start_validation()
            metrics = loop.evaluate(module, self.loader, self.runtime, bar, self.bad_images, self.stop_requested,
                                    stop_check_batches=self.stop_check_batches,
                                    after_batch=self.faults.after_val_batch, per_class=self.per_class)
            bar.close()
            if metrics is None:
                return None
            per_class_figures(prefix, metrics.pop("confusion", None))
            row.update({prefix + k: v for k, v in metrics.items()})
        return row
