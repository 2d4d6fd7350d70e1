"""What the benchmarks share: reading the clock after the device is done, progress lines, tables."""

from __future__ import annotations

import platform
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from mbv2train.words import plural


def say(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the results (and only JSON with --json)."""
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run after the call that queued them returns, so
    a clock read before this measures how fast work was queued, not done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine() or 'CPU'}, {plural(torch.get_num_threads(), 'thread')}"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def keeps_torch_threads() -> Iterator[None]:
    """Run the block, then put back the intra-op thread count it started with (a benchmark may choose its
    own, as `mbv2 train` would, without changing it for whatever the process runs next)."""
    with torch_threads(torch.get_num_threads()):
        yield


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    """A rate for a table: whole numbers from 100 up, one decimal below."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
