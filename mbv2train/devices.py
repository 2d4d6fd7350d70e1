"""Which device and precision a config asks for: train.device and train.amp made concrete."""

from __future__ import annotations

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
