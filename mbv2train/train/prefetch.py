"""The next batch, fetched while the current step computes and, on CUDA, copied to the GPU on a side stream
so that the copy overlaps the step's backward pass instead of delaying the next forward pass."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch


class Prefetcher:
    """Batches of ``loader`` one at a time: ``take`` the current one, then ``fetch`` the next one early.

    Only the plain batch, ``(uint8 images (N,3,H,W), labels, ...)``, is copied ahead; any other batch is
    handed over as the loader gave it. With data.decode: device the loader decodes the batch on the device
    within ``fetch``, while the step's kernels are still queued (data/gpu_decode.py keeps the decoder off
    the memory they read). An error
    raised by the loader while fetching early is raised by the ``take`` that would have returned that
    batch, so a run stops at the same step as without fetching ahead. ``waited`` adds up the seconds spent
    waiting for the loader.
    """

    def __init__(self, loader, device: torch.device):
        self.batches = iter(loader)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.waited = 0.0
        self._next: Optional[tuple[Any, Optional[BaseException]]] = None

    def fetch(self) -> None:
        """Get the next batch from the loader now, and start its copy to the device."""
        started = time.perf_counter()
        try:
            batch, error = next(self.batches), None
        except StopIteration:  # the caller asked for more batches than there are: its bug, say so now
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the step that would have used the batch
            batch, error = None, exc
        self.waited += time.perf_counter() - started
        if error is None and self.stream is not None and _is_plain(batch):
            with torch.cuda.stream(self.stream):
                images, labels = (t.to(self.device, non_blocking=True) for t in batch[:2])
            batch = (images, labels, *batch[2:])
        self._next = (batch, error)

    def take(self):
        """The next batch, on the device if it was copied ahead."""
        if self._next is None:
            self.fetch()
        (batch, error), self._next = self._next, None
        if error is not None:
            raise error
        if self.stream is not None and _is_plain(batch) and batch[0].device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for tensor in batch[:2]:
                tensor.record_stream(current)  # freed memory must wait for this stream's use, not the copy's
        return batch


def _is_plain(batch) -> bool:
    return (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and batch[0].dim() == 4 and isinstance(batch[1], torch.Tensor))
