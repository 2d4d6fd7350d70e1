"""Which device and precision a config asks for (train.device and train.amp made concrete), and how
a batch meets them (Runtime)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from mbv2train.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA GPU is visible")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_amp(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 on CUDA GPUs that support it (no loss scaling needed), fp16 on older GPUs, none on CPU.

    On the CPU, full float32 is the default because bf16 is only fast with native bf16 instructions and
    emulated (several times slower) without them; ask for it with train.amp: bf16 where it helps
    (docs/PERFORMANCE.md has measurements).
    """
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA GPU; use bf16 or none on the CPU")
    return AMP_DTYPES[choice]


@dataclass(frozen=True)
class Runtime:
    """How tensors meet the device: where, in which precision, in which memory format."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None: full float32
    channels_last: bool
    mean: torch.Tensor  # (1, 3, 1, 1) on the device, 0-255 scale
    std: torch.Tensor

    @classmethod
    def create(cls, device: torch.device, amp_dtype, channels_last: bool, mean, std) -> "Runtime":
        shape = (1, 3, 1, 1)
        return cls(device, amp_dtype, channels_last,
                   torch.tensor(mean, device=device).view(shape) * 255,
                   torch.tensor(std, device=device).view(shape) * 255)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW batch from the loader -> normalized float on the device (workers do no float math)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:  # reorder while values are still 1 byte; the float math keeps the layout
            images = images.contiguous(memory_format=torch.channels_last)
        # the conversion makes a new tensor, so normalizing it in place changes nothing the caller holds
        images = images.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)
        return images, labels
