"""What `mbv2 export` and `mbv2 quantize` are asked to do, and the mistakes in it that show before anything
is loaded: unknown formats, clashing options, a checkpoint, data folder or output place that is not there.

Without torch, so that the command line reports them at once (preflight.py); run_export and run_quantize
check again, for callers that skip the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mbv2train import extras
from mbv2train.errors import ConfigError
from mbv2train.config.preflight import data_folder, require_checkpoint_file, writable_file

FORMATS = ("onnx", "torchscript", "pt2", "executorch", "torchvision")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2", "executorch": ".pte",
            "torchvision": ".torchvision.pth"}
BACKENDS = ("x86", "xnnpack")


@dataclass
class ExportRequest:
    ckpt: Path
    format: str
    output: Optional[Path] = None
    ema: Optional[bool] = None
    image_size: Optional[int] = None
    batch_size: Optional[int] = None  # a fixed batch; None: dynamic where the format allows, else 1
    dynamic_batch: bool = False
    data: Optional[Path] = None  # the images checked on: this folder's val split, else the checkpoint's
    images: int = 256


@dataclass
class QuantizeRequest:
    ckpt: Path
    data: Path
    calibration_images: int = 512
    backend: str = "x86"
    output: Optional[Path] = None
    ema: Optional[bool] = None


def check_export(req: ExportRequest) -> Path:
    """The file to write; ConfigError (or CheckpointError, DataError) for a mistake in ``req``."""
    if req.format not in FORMATS:
        raise ConfigError(f"--format {req.format}: unknown; choose one of {', '.join(FORMATS)}")
    if req.batch_size is not None and req.batch_size < 1:
        raise ConfigError(f"--batch-size {req.batch_size}: must be at least 1")
    if req.batch_size is not None and req.dynamic_batch:
        raise ConfigError("--batch-size and --dynamic-batch: give one (a fixed batch, or any batch)")
    if req.dynamic_batch and req.format == "executorch":
        raise ConfigError("--dynamic-batch: ExecuTorch programs are planned for one batch size; give --batch-size")
    if req.images < 1:
        raise ConfigError(f"--images {req.images}: must be at least 1")
    if req.format == "onnx":
        extras.require("export", f"--format {req.format}")
    if req.format == "executorch":
        extras.require("executorch", "--format executorch")
    # beside the checkpoint, named after it: runs/x/best.pt -> runs/x/best.onnx
    output = req.output or req.ckpt.with_name(req.ckpt.stem + SUFFIXES[req.format])
    _check_files(req.ckpt, output)
    if req.data is not None:
        data_folder(req.data)
    return output


def check_quantize(req: QuantizeRequest) -> Path:
    """The file to write (default: best.pt -> best.int8.pt beside it); a UserError for a mistake in ``req``."""
    if req.backend not in BACKENDS:
        raise ConfigError(f"--backend {req.backend}: unknown; choose one of {', '.join(BACKENDS)}")
    if req.calibration_images < 1:
        raise ConfigError(f"--calibration-images {req.calibration_images}: must be at least 1")
    extras.require("quantize", "mbv2 quantize")
    if req.backend == "xnnpack":
        extras.require("executorch", "--backend xnnpack")
    data_folder(req.data)
    output = req.output or req.ckpt.with_name(req.ckpt.stem + ".int8.pt")
    _check_files(req.ckpt, output)
    return output


def _check_files(ckpt: Path, output: Path) -> None:
    require_checkpoint_file(ckpt)
    if output.exists() and output.resolve() == ckpt.resolve():
        raise ConfigError(f"--output {output}: is the checkpoint itself; choose another file")
    writable_file(output, "--output")
