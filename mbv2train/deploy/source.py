"""A checkpoint made ready to leave mbv2: the model on the CPU in inference mode, its class names and
preprocessing, the file's hash, and the real images an export is checked on.

Two kinds of file are taken: a training checkpoint from `mbv2 train` (float; its EMA or raw weights,
chosen as `mbv2 eval` chooses them) and an int8 file from `mbv2 quantize`. Both go through
evaluation.load_model, so an exported model starts from exactly the weights `mbv2 eval` scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mbv2train import checkpoint as ckpt
from mbv2train import data, devices
from mbv2train.config import Config
from mbv2train.model.int8file import FrozenProgram
from mbv2train.model.sidecar import Preprocess
from mbv2train.errors import DataError
from mbv2train.evaluate.evaluation import EvalRequest, load_model, sweep_sizes, val_dir_of


@dataclass
class ModelSource:
    path: Path
    sha256: str
    cfg: Config  # data.val_resize / val_crop already at the size asked for (--image-size)
    classes: list[str]
    ema: bool
    model: nn.Module  # float MobileNetV2, or FrozenProgram for an int8 file; CPU, inference mode

    @property
    def quantized(self) -> bool:
        return isinstance(self.model, FrozenProgram)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.of(self.cfg.data)

    @property
    def image_size(self) -> int:
        return self.cfg.data.val_crop

    def example(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 3, self.image_size, self.image_size)

    def graph_module(self) -> nn.Module:
        """What torch.export traces: the float model, or the int8 program's own graph."""
        return self.model.graph_module if self.quantized else self.model


def load_source(path: Path, ema: Optional[bool] = None, image_size: Optional[int] = None,
                wanted_by: str = "mbv2 export") -> ModelSource:
    """The model in ``path`` (a training checkpoint or an int8 file), at ``image_size`` pixels when given
    (the resize keeps the checkpoint's resize/crop ratio, as `mbv2 eval --resolutions` does)."""
    loaded = load_model(EvalRequest(ckpt=path, ema=ema, device="cpu"), classes_needed=wanted_by)
    cfg = loaded.cfg
    if isinstance(loaded.model, FrozenProgram) and image_size not in (None, cfg.data.val_crop):
        raise DataError(f"--image-size {image_size}: {path} is an int8 program captured at {cfg.data.val_crop} px; "
                        f"it runs at that size only")
    if image_size is not None:
        if image_size < 8:
            raise DataError(f"--image-size {image_size}: at least 8 pixels")
        resize, crop = sweep_sizes(cfg.data, image_size)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_resize=resize, val_crop=crop))
    model = loaded.model
    if not isinstance(model, FrozenProgram):
        model = model.to(memory_format=torch.contiguous_format)  # exporters and runtimes expect NCHW
    return ModelSource(path, ckpt.file_sha256(path), cfg, loaded.classes, loaded.ema, model)


def real_images(src: ModelSource, data_dir: Optional[Path], limit: int) -> tuple[torch.Tensor, Path]:
    """Up to ``limit`` validation images (``data_dir``'s, else the checkpoint's), prepared as mbv2 eval
    prepares them: normalized float32 NCHW, contiguous."""
    val_dir = val_dir_of(src.cfg, data_dir)
    if not val_dir.is_dir():
        raise DataError(f"no images to check the export on: {val_dir} is not a folder; pass --data DIR")
    return torch.cat(prepared_batches(src.cfg.data, val_dir, limit)), val_dir


def prepared_batches(data_cfg, folder: Path, limit: int, shuffle_seed: Optional[int] = None) -> list[torch.Tensor]:
    """The first ``limit`` images of ``folder`` (in ``shuffle_seed``'s random order when given) through the
    evaluation transform and normalization, as contiguous float32 batches."""
    loader, _ = data.build_val_loader(data_cfg, folder, shuffle_seed=shuffle_seed)
    runtime = devices.Runtime.create(torch.device("cpu"), None, False, data_cfg.mean, data_cfg.std)
    batches, count = [], 0
    for images, labels, _ in loader:
        batch = runtime.prepare(images, labels)[0].contiguous()[:limit - count]
        batches.append(batch)
        count += len(batch)
        if count >= limit:
            break
    return batches
