"""Optimizer with parameter groups, and the per-step learning-rate schedule.

The learning rate is a pure function of the optimizer step (``lr_at``), so a resumed run only needs the
step count to be back on the same curve. ``build_scheduler`` wraps that function in a ``LambdaLR`` that
is stepped once per optimizer step.

RMSProp and the paper. The paper trained with TensorFlow's RMSProp, which differs from
``torch.optim.RMSprop`` in two ways:

- TensorFlow adds epsilon inside the square root, ``g / sqrt(v + e)``; PyTorch adds it outside,
  ``g / (sqrt(v) + e)``. Where ``v`` is small (the case epsilon is there for) the denominators are
  ``sqrt(e)`` and ``e``, so a TensorFlow epsilon ``e`` corresponds to a PyTorch epsilon ``sqrt(e)``:
  rmsprop's default epsilon 0.0316 ~ TensorFlow's 1e-3.
- TensorFlow starts the squared-gradient average at 1, PyTorch at 0. PyTorch's first steps are
  therefore large (about lr x 1/sqrt(1 - alpha) ~ 3 x lr per weight with alpha 0.9) until the average
  has filled; a few warmup epochs (``schedule.warmup_epochs``) tame them if a run diverges early.

Weight decay is added to the gradient (L2) for sgd and rmsprop, as TensorFlow's L2 regularizer did, and
decoupled for adamw.

On CUDA the optimizers keep all their state on the GPU (fused kernels for sgd and adamw, ``capturable``
for rmsprop), so that a training step can be undone on the device without the host looking (epoch.py,
step_guard.py); on the CPU they are torch's defaults. An optimizer keeps these options when a checkpoint
saved on another kind of device is loaded into it (keep_device_options).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mbv2train.config import OptimConfig, ScheduleConfig
from mbv2train.model import HEAD

__all__ = ["build_optimizer", "build_scheduler", "keep_device_options", "lr_at", "materialize_state",
           "parameter_groups", "scaled_lr"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
BIASED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
RMSPROP_EPS = 0.0316  # ~ TensorFlow's 1e-3 (see above)
ADAMW_EPS = 1e-8  # Adam's usual value
# Devices where the optimizers keep all their state on the device (_on_device_options). Tests add "cpu" to
# run the device path on the CPU.
STATE_ON_DEVICE = ("cuda",)
# The parameter-group settings that say how a step runs on its device, not what it computes
DEVICE_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """``cfg.lr`` scaled linearly to ``global_batch_size`` when ``cfg.lr_reference_batch`` is set."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
    if cfg.lr_reference_batch is None:
        return cfg.lr
    return cfg.lr * global_batch_size / cfg.lr_reference_batch


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into "decay", "norm" and "bias" groups, each with its weight decay.

    Norm scales and shifts (and, optionally, biases) are usually left undecayed: shrinking them towards 0
    does not regularize a network whose next layer is normalized anyway, it only fights the optimizer.

    With ``cfg.backbone_lr_scale`` other than 1, each group is split in two: the classifier's part first
    (the first group's lr is the one logged) and the backbone's, "backbone_decay" and so on, whose
    "lr_scale" makes its learning rate that fraction of the classifier's at every step (build_scheduler).
    """
    norm_wd = cfg.weight_decay if cfg.norm_weight_decay is None else cfg.norm_weight_decay
    bias_wd = cfg.weight_decay if cfg.bias_weight_decay is None else cfg.bias_weight_decay
    parts = [("", 1.0)] + ([("backbone_", cfg.backbone_lr_scale)] if cfg.backbone_lr_scale != 1.0 else [])
    groups = {}
    for prefix, lr_scale in parts:
        for kind, weight_decay in (("decay", cfg.weight_decay), ("norm", norm_wd), ("bias", bias_wd)):
            group = {"params": [], "weight_decay": weight_decay, "name": prefix + kind}
            if prefix:  # absent from the classifier's groups: an unsplit optimizer keeps its old state layout
                group["lr_scale"] = lr_scale
            groups[prefix + kind] = group
    seen = set()  # a parameter shared by two modules must be optimized once
    for module_name, module in model.named_modules():
        in_head = module_name == HEAD or module_name.startswith(HEAD + ".")
        prefix = "backbone_" if len(parts) > 1 and not in_head else ""
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_LAYERS):
                groups[prefix + "norm"]["params"].append(param)
            elif name == "bias" and isinstance(module, BIASED_LAYERS):
                groups[prefix + "bias"]["params"].append(param)
            else:
                groups[prefix + "decay"]["params"].append(param)
    # torch optimizers reject an empty group, e.g. "bias" for a model without biases
    return [group for group in groups.values() if group["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch_size: int) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``parameter_groups(model, cfg)`` at ``scaled_lr(cfg, global_batch_size)``,
    with the device options of the model's device, which it keeps when a state dict is loaded into it."""
    params = parameter_groups(model, cfg)
    lr = scaled_lr(cfg, global_batch_size)
    for group in params:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    on_device = next(model.parameters()).device.type in STATE_ON_DEVICE
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    **_on_device_options(torch.optim.SGD, on_device))
    elif cfg.name == "rmsprop":
        eps = RMSPROP_EPS if cfg.eps is None else cfg.eps
        optimizer = torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, eps=eps, momentum=cfg.momentum,
                                        **_on_device_options(torch.optim.RMSprop, on_device))
    elif cfg.name == "adamw":
        eps = ADAMW_EPS if cfg.eps is None else cfg.eps
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=eps,
                                      **_on_device_options(torch.optim.AdamW, on_device))
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    optimizer.register_load_state_dict_post_hook(keep_device_options)
    return optimizer


def _on_device_options(optimizer_class, on_device: bool) -> dict:
    """On CUDA: one fused kernel per step where torch has it, else ``capturable``; both keep the step count
    on the GPU (torch's default keeps it on the CPU, and reading it there would wait for the GPU). On the
    CPU: torch's defaults (the fused CPU kernels round differently and buy little)."""
    if not on_device:
        return {}
    accepted = inspect.signature(optimizer_class.__init__).parameters
    if "fused" in accepted:
        return {"fused": True}
    if "capturable" in accepted:
        return {"capturable": True}
    return {}


def keep_device_options(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the device options the optimizer was built with, and each step count
    where they keep it, whatever device the state was saved on.

    torch's ``load_state_dict`` takes the options (fused, capturable, ...) from the saved groups, so a GPU
    run's capturable RMSprop resumed on the CPU would fail at its first step, and a CPU run's optimizer
    resumed on a GPU would lose its fused kernel and keep its step counts on the host, where undoing a
    step on the device (step_guard.py) copies to the host every step. As torch does, a capturable or
    fused group keeps its step counts on its parameters' device in float32, any other on the CPU.
    """
    for group in optimizer.param_groups:
        for key in DEVICE_OPTIONS:
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        on_device = group.get("capturable") or group.get("fused")
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                step = state["step"]
                state["step"] = step.to(device=param.device, dtype=torch.float32) if on_device else step.to("cpu")


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's per-parameter state now, as its first step would, so that the first step
    can be undone like any other (a step creates its state lazily, so undoing it would need to know what
    was there before). Does nothing when any state exists (a resumed run, or a later epoch).

    It runs one step with zero gradients, zero learning rate and zero weight decay, which changes no
    weight in sgd, adamw or rmsprop and fills their state with zeros, then sets the step counts back to 0.
    A momentum buffer that starts at zero is then updated to the first gradient, the value torch's first
    step copies into it.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(optimizer.state.get(p) for p in params):
        return
    settings = [(group["lr"], group.get("weight_decay")) for group in optimizer.param_groups]
    grads = [p.grad for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, (lr, weight_decay) in zip(optimizer.param_groups, settings):
            group["lr"] = lr
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        for p, grad in zip(params, grads):
            p.grad = grad
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``epochs`` epochs.

    Time is measured in fractional epochs, t = step / steps_per_epoch, so the curve is smooth within an
    epoch and the same whatever the batch size. Warmup rises linearly from base_lr x warmup_start_factor
    at t=0 to base_lr at t=warmup_epochs; the decay then runs over the remaining epochs.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    t = step / steps_per_epoch
    warmup = cfg.warmup_epochs
    if t < warmup:
        start = cfg.warmup_start_factor
        return base_lr * (start + (1.0 - start) * t / warmup)

    u = t - warmup
    total = epochs - warmup
    if total <= 0:
        raise ValueError(f"warmup_epochs ({warmup:g}) must be shorter than epochs ({epochs})")
    if cfg.name == "cosine":
        # held at min_lr past the end, rather than climbing back up the cosine
        u = min(u, total)
        return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * u / total))
    if cfg.name == "exponential":
        return base_lr * cfg.gamma ** u
    if cfg.name == "step":
        return base_lr * cfg.gamma ** math.floor(u / cfg.step_epochs)
    if cfg.name == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {cfg.name!r}")


class PerStepLR(LambdaLR):
    """LambdaLR that also puts the restored learning rate back into the optimizer on load.

    Plain LambdaLR leaves the optimizer's lr alone in ``load_state_dict``; if the scheduler was built
    after the optimizer state was loaded, building it reset the lr to the step-0 value, and the first
    step after a resume would run at that lr. Writing the restored lr here makes the load order irrelevant.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                    steps_per_epoch: int) -> LambdaLR:
    """A LambdaLR following ``lr_at``; call ``scheduler.step()`` after every ``optimizer.step()``."""

    def make_factor(base_lr: float):
        # A plain closure, not a callable object: LambdaLR.state_dict() stores None for functions, so the
        # state dict holds only numbers and loads with torch.load(weights_only=True).
        def factor(step: int) -> float:
            return lr_at(step, steps_per_epoch, epochs, base_lr, cfg) / base_lr
        return factor

    # "initial_lr" is there when the optimizer state was loaded from a checkpoint: it is the unscheduled lr,
    # whereas "lr" is wherever the schedule had got to. A group with an "lr_scale" (the backbone's,
    # optim.backbone_lr_scale) follows the unscaled curve times its scale, min_lr and all, so that its lr
    # stays that fraction of the classifier's at every step.
    factors = [make_factor(group.get("initial_lr", group["lr"]) / group.get("lr_scale", 1.0))
               for group in optimizer.param_groups]
    return PerStepLR(optimizer, factors)
