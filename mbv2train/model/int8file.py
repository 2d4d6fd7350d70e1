"""The file `mbv2 quantize` writes: an int8 torch.export program with the class names, config and
preprocessing of the checkpoint it came from.

It is a torch.save'd dict of plain values and tensors (so it loads with ``weights_only=True``, as every
mbv2 checkpoint does); the program is the bytes that ``torch.export.save`` writes, zlib-compressed. The
compression matters for small models: the program's graph is a JSON text of about 350 kB for MobileNetV2
whatever its width, which would otherwise be a large part of an int8 file of a small model.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbv2train import checkpoint as ckpt
from mbv2train import extras
from mbv2train.errors import CheckpointError

FORMAT = "mbv2-int8"
FORMAT_VERSION = 1


def is_int8_file(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def packed(program: torch.export.ExportedProgram, **info: Any) -> dict[str, Any]:
    """The file's content: ``info`` (class_names, config, ...) beside the compressed program."""
    data = zlib.compress(program_bytes(program), 9)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "program": torch.frombuffer(bytearray(data), dtype=torch.uint8), "versions": ckpt.versions(), **info}


def save(path: Path, program: torch.export.ExportedProgram, **info: Any) -> int:
    """Write atomically; returns the file's size in bytes."""
    ckpt.save_checkpoint(packed(program, **info), path)
    return path.stat().st_size


def load_program(state: dict[str, Any], path: Path) -> torch.export.ExportedProgram:
    """The int8 program in a loaded file; the quantized operators it calls are torchao's."""
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: int8 file format {state.get('format_version')} is not the "
                              f"{FORMAT_VERSION} this mbv2 reads")
    extras.require("quantize", f"{path} (an int8 model)")
    extras.import_pt2e_quantization()  # registers the quantized operators

    try:
        return torch.export.load(io.BytesIO(zlib.decompress(state["program"].numpy().tobytes())))
    except Exception as exc:  # noqa: BLE001 - zlib, zip and the deserializer each fail their own way
        raise CheckpointError(f"{path}: the int8 program does not load ({type(exc).__name__}); "
                              f"is the file damaged?") from None


class FrozenProgram(nn.Module):
    """An exported program as a module that the evaluation loop can call ``eval()`` on.

    The program was exported in inference mode (BatchNorm folded, no dropout), so train/eval mode means
    nothing to it; the GraphModule that ``ExportedProgram.module()`` returns refuses ``eval()`` outright.
    """

    def __init__(self, program: torch.export.ExportedProgram, num_classes: int):
        super().__init__()
        self.program = program
        self.num_classes = num_classes
        self.graph_module = program.module()

    def train(self, mode: bool = True) -> "FrozenProgram":
        self.training = mode  # not passed down: see the class docstring
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph_module(images)
