"""Training and validation transforms: decoded image -> uint8 tensor (3, H, W) in the workers, and the
MixUp/CutMix step that runs on the device.

Workers never do float math: the float conversion and normalization happen on the device
(engine.Runtime.prepare).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from mbv2train.config import DataConfig

def _interpolation(cfg: DataConfig) -> InterpolationMode:
    return InterpolationMode[cfg.interpolation.upper()]


@dataclass(frozen=True)
class CropDraw:
    """One training image's random window (in the upright image's pixels) and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_train_crop(image_height: int, image_width: int, cfg: DataConfig) -> CropDraw:
    """The RandomResizedCrop window and the flip for an image of this size, drawn from torch's global
    generator exactly as ``build_train_transform``'s pipeline draws them (same rule, same draws, same
    order), so every decoder crops the window the PIL pipeline would have cropped."""
    crop = v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
    # A zero-size view stands in for the image: only its shape is read.
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, image_height, image_width)
    make_params = getattr(crop, "make_params", None) or crop._get_params  # renamed in torchvision 0.21
    box = make_params([shape_only])
    # v2.RandomHorizontalFlip flips when torch.rand(1) < p, and draws nothing when it is left out (p = 0).
    flip = cfg.hflip > 0 and bool(torch.rand(1) < cfg.hflip)
    return CropDraw(box["top"], box["left"], box["height"], box["width"], flip)


def build_train_transform(cfg: DataConfig) -> v2.Compose:
    """PIL image -> uint8 tensor (3, image_size, image_size); no float math, that happens on the device."""
    interp = _interpolation(cfg)
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                  interpolation=interp, antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interp))
    elif cfg.auto_augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=interp))
    elif cfg.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    steps.append(v2.PILToTensor())
    if cfg.random_erasing > 0:
        # After the tensor conversion because RandomErasing works on tensors; value 0 suits uint8.
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(steps)


def build_val_transform(cfg: DataConfig) -> v2.Compose:
    """Resize the short side to val_resize, center-crop val_crop, uint8 tensor."""
    return v2.Compose([v2.Resize(cfg.val_resize, interpolation=_interpolation(cfg), antialias=True),
                       v2.CenterCrop(cfg.val_crop),
                       v2.PILToTensor()])


def build_mix_transform(cfg: DataConfig, num_classes: int):
    """MixUp and/or CutMix for float NCHW images and int64 labels -> (images, soft targets); None if off.

    Runs on the device in the training step, which seeds the global RNG it draws from.
    """
    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
