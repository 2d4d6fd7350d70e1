"""Where metrics go: metrics.jsonl (one JSON object per epoch) and TensorBoard files under tb/.

Only rank 0 creates a Tracker; other ranks get ``NullTracker``, whose methods do nothing, so callers
never branch on the rank.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

from mbv2train.evaluate import report as eval_report

METRICS_FILE = "metrics.jsonl"
TIMING_FIELDS = ("img_per_s", "epoch_time_s", "data_time_frac", "val_time_s")


class Tracker:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.metrics_path = run_dir / METRICS_FILE
        # purge_step drops events a killed run wrote after its last checkpoint, so curves don't fork.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def epoch(self, row: dict[str, Any], step: int) -> None:
        """Append one epoch's row to metrics.jsonl and its values to TensorBoard (at the global step)."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.scalars(step, {k: v for k, v in row.items() if k not in ("epoch", "step")}, prefix="epoch")
        self.writer.flush()

    def images(self, batch_uint8: torch.Tensor, tag: str = "train/augmented_images") -> None:
        self.writer.add_image(tag, make_grid(batch_uint8.cpu(), nrow=int(math.sqrt(len(batch_uint8))) or 1))

    def per_class(self, prefix: str, confusion: torch.Tensor | None, classes: list[str], step: int) -> None:
        """One evaluation's per-class summary (eval_report.summarize): a Markdown table in the text tab
        (``per_class/val``, ``per_class/ema_val``) and a histogram of the per-class top-1. Nothing when
        ``confusion`` is None (train.tb_per_class is off)."""
        if confusion is None:
            return
        summary = eval_report.summarize(confusion, classes)
        name = prefix.rstrip("_")
        self.writer.add_text(f"per_class/{name}", eval_report.markdown(summary), step)
        top1 = [row["top1"] for row in summary["per_class"] if row["top1"] is not None]
        if top1:
            self.writer.add_histogram(f"per_class/{name}_top1", torch.tensor(top1), step)

    def hparams(self, config: dict[str, dict[str, Any]]) -> None:
        """The flattened config in TensorBoard's HParams tab, tied to the epoch/val_top1 curve."""
        flat = {}
        for section, values in config.items():
            for key, value in values.items():
                if isinstance(value, (list, tuple)):
                    value = str(list(value))
                flat[f"{section}.{key}"] = "null" if value is None else value
        for summary in hparams(flat, {"epoch/val_top1": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


class NullTracker:
    """What ranks other than 0 log with: nothing."""

    def scalars(self, *args, **kwargs) -> None: ...
    def epoch(self, *args, **kwargs) -> None: ...
    def images(self, *args, **kwargs) -> None: ...
    def per_class(self, *args, **kwargs) -> None: ...
    def hparams(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


def append_event(path: Path, event: dict[str, Any]) -> None:
    """A non-epoch row (it has an "event" key), e.g. a config change accepted at a resume."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep rows up to ``last_epoch`` (1-based, inclusive): a resumed run rewrites what came after."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("epoch", 0) <= last_epoch]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)


def epoch_line(row: dict[str, Any], best_metric: str, best_value: float) -> str:
    """The console line that ends an epoch."""
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}", f"val_loss {row['val_loss']:.4f}",
             f"val_top1 {row['val_top1']:.4f}", f"val_top5 {row['val_top5']:.4f}"]
    if "ema_val_top1" in row:
        parts.append(f"ema_val_top1 {row['ema_val_top1']:.4f}")
    if row.get("bad_images"):
        parts.append(f"skipped images {row['bad_images']}")
    if row.get("nonfinite_skips"):
        parts.append(f"non-finite steps skipped {row['nonfinite_skips']}")
    parts += [f"lr {row['lr']:.4g}", f"{row['img_per_s']:.0f} img/s", f"best {best_metric} {best_value:.4f}"]
    return " | ".join(parts)


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row minus the fields that measure time: what two identical runs must agree on."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def augmented_samples(loader, count: int) -> torch.Tensor:
    """The first training images exactly as epoch 1 augments them (uint8), for TensorBoard."""
    dataset = loader.dataset
    # the loader's own collate: with data.decode: device it also decodes the JPEGs
    images, _, _ = loader.collate_fn([dataset[(1, i)] for i in range(min(count, len(dataset)))])
    return images.cpu()
