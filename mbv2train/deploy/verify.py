"""An exported model against the PyTorch model it came from, on the same real images.

Float exports must give the same logits to within ``FLOAT_ATOL`` and the same top-1 class on every
image. An int8 model is compared with its PyTorch program, which computes each quantized layer as
dequantize -> float op -> quantize; the runtimes' integer kernels (onnxruntime's QLinearConv, XNNPACK)
round their requantization differently, so the logits differ by more than float noise, and what must
hold is the top-1 class on at least ``INT8_MIN_AGREEMENT`` of the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mbv2train.errors import CheckFailed
from mbv2train.words import plural

FLOAT_ATOL = 1e-4
INT8_MIN_AGREEMENT = 0.98
CHUNK = 64  # images per call when the exported model takes any batch


class ExportMismatch(CheckFailed):
    """The exported file computes something else than the PyTorch model (exit 1, not a usage error)."""


@dataclass
class Check:
    max_abs_diff: float
    top1_agreement: float
    images: int
    quantized: bool

    @property
    def tolerance(self) -> str:
        if self.quantized:
            return f"top-1 agreement >= {INT8_MIN_AGREEMENT:.0%} (int8)"
        return f"max abs logit difference <= {FLOAT_ATOL:g} and 100% top-1 agreement"

    @property
    def passed(self) -> bool:
        if self.quantized:
            return self.top1_agreement >= INT8_MIN_AGREEMENT
        return self.max_abs_diff <= FLOAT_ATOL and self.top1_agreement == 1.0

    def describe(self) -> str:
        return (f"max abs logit difference {self.max_abs_diff:.3g}, top-1 agreement {self.top1_agreement:.2%} "
                f"on {plural(self.images, 'image')} (needed: {self.tolerance})")


@torch.inference_mode()
def compare(reference: torch.nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            fixed_batch: Optional[int], quantized: bool) -> Check:
    expected, got = [], []
    size = fixed_batch or CHUNK
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        batch = chunk if fixed_batch is None else _filled(chunk, fixed_batch)
        expected.append(reference(batch).float()[:len(chunk)])
        got.append(torch.as_tensor(exported(batch)).float()[:len(chunk)])
    expected, got = torch.cat(expected), torch.cat(got)
    if got.shape != expected.shape:
        raise ExportMismatch(f"the exported model gives logits of shape {tuple(got.shape)}, "
                             f"PyTorch {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    return Check(diff if diff == diff else float("inf"), agreement, len(images), quantized)


def _filled(chunk: torch.Tensor, size: int) -> torch.Tensor:
    """A last, short chunk filled up to a fixed batch by repeating its images (their logits are dropped)."""
    if chunk.shape[0] == size:
        return chunk
    repeats = -(-size // chunk.shape[0])
    return chunk.repeat(repeats, 1, 1, 1)[:size].contiguous()
