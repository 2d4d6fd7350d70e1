"""Models with known predictions, saved as training checkpoints, for the eval and predict tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from mbv2train.train import run_state
from mbv2train.config import Config, load_config
from mbv2train.model import InvertedResidual, build_model


def eval_config(root: Path, num_classes: int, *overrides: str) -> Config:
    """A config for width 0.25 at 16 px on ``root`` (no worker processes)."""
    return load_config(None, ["model.width_mult=0.25", f"model.num_classes={num_classes}", f"data.root={root}",
                              "data.image_size=16", "data.val_resize=16", "data.val_crop=16", "data.num_workers=0",
                              "data.batch_size=8", *overrides])


def save_checkpoint(path: Path, model: nn.Module, cfg: Config, classes: Sequence[str],
                    ema_model: Optional[nn.Module] = None, best_metric: str = "val_top1") -> Path:
    """``model`` as `mbv2 train` would save it after one epoch (EMA weights from ``ema_model``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = run_state.training_state(
        model=model, ema=None, optimizer=optimizer, scheduler=scheduler, scaler=None, epoch=1, global_step=1,
        epoch_progress=None, best_metric=best_metric, best_value=0.0, best_epoch=1, config=cfg.to_dict(),
        class_names=list(classes), world_size=1)
    if ema_model is not None:  # as AveragedModel keeps it: the model under "module." and a counter
        state["ema"] = {**{f"module.{k}": v for k, v in ema_model.state_dict().items()},
                        "n_averaged": torch.tensor(1)}
    torch.save(state, path)
    return path


def calibrated_model(cfg: Config, images: torch.Tensor, seed: int) -> nn.Module:
    """A randomly initialised model whose BatchNorm statistics are measured on ``images`` (uint8 NCHW) and
    whose classifier is scaled up: its predictions differ from image to image, with clear margins."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.classifier[1].weight.mul_(20)
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batch
        mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
        model((images.float() - mean) / std)
    return model.eval()


def colour_model(cfg: Config, logits_of_rgb: Sequence[Sequence[float]], bias: Sequence[float]) -> nn.Module:
    """A MobileNetV2 that looks at colour only: the backbone carries each pixel's R, G and B (scaled by 1/64,
    never clipped by ReLU6) through the first three channels of every layer, the global average makes them
    the mean colour of the sampled pixels, and the classifier gives class c the logit
    ``logits_of_rgb[c] . (r, g, b) + bias[c]``. Needs data.mean 0 and data.std 1 (inputs 0..255)."""
    model = build_model(cfg.model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # identity
                module.running_mean.zero_()
                module.running_var.fill_(1 - module.eps)
                module.weight.fill_(1)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                module.weight.zero_()
                centre = module.kernel_size[0] // 2
                for k in range(3):  # the centre tap: each of the first 3 channels passes through alone
                    module.weight[k, 0 if module.groups > 1 else k, centre, centre] = 1.0
        model.features[0][0].weight.mul_(1 / 64)  # 0..255 -> 0..4, below ReLU6's ceiling
        for block in model.modules():
            if isinstance(block, InvertedResidual) and block.use_res_connect:
                block.conv[-2].weight.zero_()  # the shortcut carries x; the branch adds nothing
        head = model.classifier[1]
        head.weight.zero_()
        head.weight[:, :3] = torch.tensor(logits_of_rgb, dtype=torch.float32)
        head.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return model.eval()
