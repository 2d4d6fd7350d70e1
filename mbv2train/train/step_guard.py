"""train.nonfinite decided on the device: a step whose loss is NaN or infinite is undone without the host
ever waiting for the GPU to find out.

Each step computes a flag, "some loss of this step, on some process, is not finite", as a tensor. The
step then runs as usual, and everything it changed is put back wherever the flag is set: the weights and
the optimizer's state (``Rollback``), the BatchNorm statistics, the EMA (``EmaUpdate``), fp16's loss
scale, and the epoch's sums. The flags pile up on the device and are read in one go at the next log,
checkpoint or epoch boundary (``StepGuard.settle``): that is where skipped steps are counted, where
``raise`` raises and where too many skips in a row stop the run, naming the step at which it happened.
The flags are agreed on by all processes, and those boundaries are reached by all of them, so under
torchrun every process stops at the same point with the same error. A look at the counts from one
process alone (rank 0's progress line: ``StepGuard.read``) reads the flags without stopping.
The weights never take a non-finite step in either mode, so a checkpoint always holds finite weights.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
from torch import nn

from mbv2train.train import optim
from mbv2train.distributed import any_rank_later
from mbv2train.errors import NonFiniteLoss

# Devices whose flags the host reads for free: on the CPU there is no device to wait for, so a bad step
# is simply not taken, which spares the copies that undoing it on the device costs (a few ms per step, a
# sixth or so of a tiny model's step). The result is the same bit for bit: a step not taken and a step
# undone leave the same weights and state. Tests empty it to run the device path on the CPU.
HOST_READ_DEVICES = ("cpu",)


class Rollback:
    """A snapshot of some tensors, put back where a device flag says so, without the host looking at it.

    The snapshot lives in one flat buffer per device and dtype, laid out like the tensors, so saving and
    restoring cost a few multi-tensor copies and one ``torch.where`` whatever the number of tensors.
    ``torch.where`` selects, so NaN or infinite values left by a bad step are replaced exactly."""

    def __init__(self, tensors: list[torch.Tensor]):
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        self.groups = []
        for (device, dtype), members in by_kind.items():
            total = sum(t.numel() for t in members)
            saved = torch.empty(total, device=device, dtype=dtype)
            scratch = torch.empty(total, device=device, dtype=dtype)
            self.groups.append((members, saved, scratch, _views(saved, members), _views(scratch, members)))

    @torch.no_grad()
    def save(self) -> None:
        for members, _, _, saved_views, _ in self.groups:
            torch._foreach_copy_(saved_views, members)

    @torch.no_grad()
    def undo_if(self, flag: torch.Tensor) -> None:
        """Put the saved values back if ``flag`` (a boolean 0-dim tensor) is true; keep them otherwise."""
        for members, saved, scratch, _, scratch_views in self.groups:
            torch._foreach_copy_(scratch_views, members)
            torch.where(flag.to(saved.device), saved, scratch, out=scratch)
            torch._foreach_copy_(members, scratch_views)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive pieces of ``flat`` with the shapes and strides of ``like`` (channels_last
    weights included), so that copies between them take the multi-tensor fast path."""
    views, offset = [], 0
    for tensor in like:
        dense = tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)
        stride = tensor.stride() if dense else torch.empty(tensor.shape, device="meta").stride()
        views.append(flat.as_strided(tensor.shape, stride, flat.storage_offset() + offset))
        offset += tensor.numel()
    return views


def weights_and_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer step changes: the parameters and the optimizer's state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [value for p in params for value in optimizer.state.get(p, {}).values() if torch.is_tensor(value)]
    return params + state


@torch.no_grad()
def optimizer_step(parameters, optimizer, scaler, clip_norm: Optional[float], skip: Optional[torch.Tensor] = None,
                   weights: Optional[Rollback] = None, keep_grads: bool = False) -> Optional[torch.Tensor]:
    """One optimizer step, undone on the device where ``skip`` (a boolean tensor) is true, and where fp16's
    GradScaler found infinite or NaN gradients. Returns the GradScaler's flag, true when it alone skipped
    the step (None without a scaler).

    ``parameters`` are the model's, for the gradient clip; ``weights`` is the Rollback of
    ``weights_and_state(optimizer)`` (made here when not given); ``keep_grads`` zeroes the gradients in
    place rather than dropping them: under DDP with gradient_as_bucket_view they are views of its
    all-reduce buckets, and kept so the next backward writes straight into the buckets (dropped, DDP would
    copy every gradient into its bucket each step)."""
    found_inf = None
    if scaler is not None:
        # unscale first so that the clip sees the true gradients; the scaler records what it found
        scaler.unscale_(optimizer)
        found_inf = (sum(scaler._found_inf_per_device(optimizer).values()) > 0).reshape(())
    if clip_norm is not None:
        nn.utils.clip_grad_norm_(parameters, clip_norm)
    undo = skip if found_inf is None else found_inf if skip is None else skip | found_inf
    if undo is not None and scaler is None and undo.device.type in HOST_READ_DEVICES:
        if not bool(undo):
            optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        return None
    if undo is not None and weights is None:
        optim.materialize_state(optimizer)
        weights = Rollback(weights_and_state(optimizer))
    if undo is not None:
        weights.save()
    optimizer.step()  # not scaler.step(): that one reads the flag on the host to decide whether to step
    if undo is not None:
        weights.undo_if(undo)
    if scaler is not None:
        # The scaler shrinks its scale after inf/NaN gradients; a step skipped for its loss leaves it alone.
        scale = [scaler._scale.clone(), scaler._growth_tracker.clone()] if skip is not None else None
        scaler.update()
        if scale is not None:
            for now, before in zip((scaler._scale, scaler._growth_tracker), scale):
                now.copy_(torch.where(skip, before, now))
            found_inf = found_inf & ~skip
    optimizer.zero_grad(set_to_none=not keep_grads)
    return found_inf


class EmaUpdate:
    """``ema.update_parameters(model)`` for torch's AveragedModel with ``get_ema_multi_avg_fn(decay)`` and
    ``use_buffers=True``, done on the device and left undone where a flag is true.

    AveragedModel's own update asks the host whether it is the first (``n_averaged == 0``: copy rather
    than average), which waits for the GPU. Here the weight of the new values is a device tensor: 0 for a
    skipped step, 1 for the first update, 1 - decay after. Integer buffers (BatchNorm's batch counts)
    follow the model's. The tensors are listed once (walking a model's modules costs milliseconds)."""

    def __init__(self, ema, model: nn.Module, decay: float):
        self.ema, self.decay = ema, decay
        pairs = list(zip(itertools.chain(ema.module.parameters(), ema.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers())))
        self.floats = [(e, m.detach()) for e, m in pairs if e.is_floating_point()]
        self.counts = [(e, m.detach()) for e, m in pairs if not e.is_floating_point()]
        device = pairs[0][0].device
        if ema.n_averaged.device != device:
            ema.n_averaged = ema.n_averaged.to(device)  # AveragedModel keeps it on the CPU unless told otherwise

    @torch.no_grad()
    def __call__(self, skip: torch.Tensor) -> None:
        keep = ~skip
        weight = torch.where(keep, torch.where(self.ema.n_averaged == 0, 1.0, 1.0 - self.decay), 0.0)
        for pairs, factor in ((self.floats, weight), (self.counts, keep.long())):
            if pairs:
                targets, sources = [e for e, _ in pairs], [m for _, m in pairs]
                step = torch._foreach_sub(sources, targets)  # ema += factor * (model - ema)
                torch._foreach_mul_(step, factor)
                torch._foreach_add_(targets, step)
        self.ema.n_averaged += keep.long()


class StepGuard:
    """One epoch's non-finite policy: flags each step on the device, undoes bad steps, and reads the flags
    at boundaries (``settle``), where it counts, raises or gives up as train.nonfinite says."""

    def __init__(self, model: nn.Module, optimizer, skip_nonfinite: bool, max_skips: int, epoch: int):
        optim.materialize_state(optimizer)
        on_host = next(model.parameters()).device.type in HOST_READ_DEVICES
        self.weights = None if on_host else Rollback(weights_and_state(optimizer))  # see optimizer_step
        self.buffers = Rollback(list(model.buffers()))  # a NaN forward must not poison BatchNorm statistics
        self.parameters = list(model.parameters())
        self.keep_grads = getattr(model, "gradient_as_bucket_view", False)  # DDP's; see optimizer_step
        self.skip_nonfinite, self.max_skips, self.epoch = skip_nonfinite, max_skips, epoch
        # (step, its non-finite flag, fp16's scaler-skipped flag, its images) for each step not yet settled
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
        self.in_a_row = 0
        self.images_taken = 0  # images of the steps taken (not skipped), settled
        self.failure: Optional[NonFiniteLoss] = None  # the first breach of train.nonfinite read so far
        self._agreed: Optional[Callable[[], torch.Tensor]] = None

    def start_step(self, device: torch.device) -> None:
        """Before the step's first forward pass."""
        self.buffers.save()
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.images = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, count_correct: bool) -> None:
        """One micro-batch's loss (a finite one's sums join the epoch's only if the whole step is taken)."""
        loss = loss.detach()
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss_sum += loss.float() * len(labels)
        if count_correct:
            self.correct += (logits.detach().argmax(1) == labels).sum()
        self.images += len(labels)

    def agree(self) -> None:
        """Start agreeing with the other processes on the step's flag (before the last backward pass,
        which it overlaps), so that all of them undo the step or none does."""
        self._agreed = any_rank_later(self.nonfinite)

    def finish_step(self, optimizer, scaler, clip_norm: Optional[float], progress, step: int) -> torch.Tensor:
        """The optimizer step, undone with the BatchNorm statistics if the step is bad, and the step's sums
        into ``progress`` if it is not. Returns the flag (a boolean device tensor) for the EMA."""
        skip = self._agreed() if self._agreed is not None else self.nonfinite
        self._agreed = None
        scaler_skip = optimizer_step(self.parameters, optimizer, scaler, clip_norm, skip, self.weights,
                                     self.keep_grads)
        self.buffers.undo_if(skip)
        progress.loss_sum += self.loss_sum.masked_fill(skip, 0)  # a NaN times 0 would still be NaN: select
        progress.correct += self.correct.masked_fill(skip, 0)
        scaler_skip = torch.zeros_like(skip) if scaler_skip is None else scaler_skip
        self.pending.append((step, skip, scaler_skip, self.images))
        return skip

    def settle(self, progress) -> None:
        """Read the flags of the steps since the last call (one wait for the device) into ``progress``'s
        counts; raise NonFiniteLoss where train.nonfinite says so. Under torchrun a collective decision:
        call it only where every process does (log steps, checkpoints, the epoch's end)."""
        self.read(progress)
        if self.failure is not None:
            raise self.failure

    def read(self, progress) -> None:
        """``settle`` without the raise: the counts, and the first breach of train.nonfinite kept for the
        next ``settle``. For what one process does alone, such as rank 0's progress line: a raise there
        would leave the other processes waiting for it in their next collective."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([torch.stack((skip, scaled)) for _, skip, scaled, _ in pending]).tolist()
        for (step, _, _, images), (nonfinite, scaler_skipped) in zip(pending, flags):
            if nonfinite:
                if not self.skip_nonfinite:
                    self._fail(f"non-finite loss at step {step} (epoch {self.epoch}); "
                               f"the last checkpoint holds finite weights")
                    continue
                progress.nonfinite_skips += 1
                self.in_a_row += 1
                if self.in_a_row >= self.max_skips:
                    self._fail(f"{self.in_a_row} non-finite losses in a row, the last at step {step}; "
                               f"giving up (train.max_nonfinite_skips)")
            else:
                self.in_a_row = 0
                progress.seen += images
                self.images_taken += images
                progress.scaler_skips += int(scaler_skipped)

    def _fail(self, message: str) -> None:
        if self.failure is None:  # the first breach names the step the run stopped for
            self.failure = NonFiniteLoss(message)
