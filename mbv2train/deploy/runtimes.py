"""An exported file loaded back the way its users load it, as a function from a float32 NCHW batch to
logits: onnxruntime for ONNX, torch.jit.load, torch.export.load, the ExecuTorch runtime, and
torchvision's own mobilenet_v2 for the state dict."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from mbv2train import extras

RUNTIME_NAMES = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "pt2": "torch.export.load",
                 "executorch": "the ExecuTorch runtime", "torchvision": "torchvision.models.mobilenet_v2"}

Runner = Callable[[torch.Tensor], torch.Tensor]


def load(fmt: str, path: Path, native: dict[str, Any], quantized: bool) -> Runner:
    if quantized:
        extras.import_pt2e_quantization()  # registers the quantized operators
    return LOADERS[fmt](path, native)


def _onnx(path: Path, native: dict[str, Any]) -> Runner:
    import onnxruntime  # the optional export extra

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def _torchscript(path: Path, native: dict[str, Any]) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda images: module(images)


def _pt2(path: Path, native: dict[str, Any]) -> Runner:
    module = torch.export.load(str(path)).module()
    return lambda images: module(images)


def _executorch(path: Path, native: dict[str, Any]) -> Runner:
    from executorch.runtime import Runtime  # the optional executorch extra

    with _native_stderr_silenced():  # the runtime logs its CPU probing on stderr at first use
        method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda images: method.execute([images.contiguous()])[0]


def _torchvision(path: Path, native: dict[str, Any]) -> Runner:
    builder = dict(native["torchvision"])
    builder.pop("builder")
    model = torchvision.models.mobilenet_v2(**builder)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    return lambda images: model(images)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for a block: C++ libraries write there directly, past sys.stderr."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


LOADERS = {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2, "executorch": _executorch,
           "torchvision": _torchvision}
