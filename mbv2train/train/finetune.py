"""train.freeze_backbone_epochs: the module each epoch trains through, with the backbone frozen for the
first epochs and trained from then on.

Freezing sets ``requires_grad`` off on the backbone (MobileNetV2.freeze_backbone), so the backward pass
stops at the classifier, and keeps the backbone's BatchNorm layers on their running statistics. The
optimizer keeps every parameter throughout: a parameter without a gradient is skipped by torch's
optimizers, so its weight, its momentum or Adam moments and its step count stay exactly as they are (no
weight decay either), while the optimizer's state holds the same tensors in the same order before and after
the switch. That keeps checkpoints of either phase alike, lets the step guard's snapshot (step_guard.py)
cover the same tensors all along, and adds nothing to a step for the host to wait on; after the switch, the
backbone's first step is its first optimizer step, as in a fresh run. Whether an epoch is frozen follows
from its number alone, so a run resumed in either phase, mid-epoch too, continues exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbv2train.distributed import DistInfo
from mbv2train.model import MobileNetV2


def backbone_frozen(epoch: int, freeze_epochs: int) -> bool:
    """Whether epoch ``epoch`` (1-based) trains the classifier alone."""
    return epoch <= freeze_epochs


class TrainingModel:
    """The module the epochs train through: the model, torch.compile'd with train.compile, and under
    torchrun in DistributedDataParallel, wrapped again when the frozen part changes (DDP reduces the
    gradients of the parameters that wanted one when it was built, and no others)."""

    def __init__(self, model: MobileNetV2, compile_: bool, dist: DistInfo, device: torch.device,
                 freeze_epochs: int, say: Callable[[str], None]):
        self.model, self.dist, self.device, self.freeze_epochs, self.say = model, dist, device, freeze_epochs, say
        self.compiled = torch.compile(model) if compile_ else model
        self.module: nn.Module | None = None

    def for_epoch(self, epoch: int) -> nn.Module:
        frozen = backbone_frozen(epoch, self.freeze_epochs)
        if self.module is not None and frozen == self.model.backbone_frozen:
            return self.module
        if frozen:
            self.say(f"epoch {epoch}: only the classifier trains (train.freeze_backbone_epochs "
                     f"{self.freeze_epochs}); the backbone and its BatchNorm statistics stay as they are")
        elif self.freeze_epochs:
            self.say(f"epoch {epoch}: every layer trains from here on")
        self.model.freeze_backbone(frozen)
        self.module = self.compiled
        if self.dist.enabled:
            # The old wrapper's gradients are views of its buckets: let the new one make its own.
            self.model.zero_grad(set_to_none=True)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients as views of DDP's all-reduce buckets: no copy between the two each step
            self.module = DistributedDataParallel(self.compiled, device_ids=device_ids,
                                                  gradient_as_bucket_view=True)
        return self.module
