"""Training and validation transforms: decoded image -> uint8 tensor (3, H, W) in the workers, and the
MixUp/CutMix step that runs on the device.

Two kinds of decoded image arrive here. JPEGs come as uint8 tensors from libjpeg-turbo (decode.py) and are
cropped and resized on the tensor (TrainTransform, ValTransform); other formats come as PIL images and go
through the v2 pipelines of build_train_transform / build_val_transform, as before. Both crop the same
window for the same seed: the window and the flip are drawn by draw_train_crop, draw for draw as the PIL
pipeline draws them.

Workers never do float math: the float conversion and normalization happen on the device
(devices.Runtime.prepare).
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from mbv2train.config import DataConfig


def _interpolation(cfg: DataConfig) -> InterpolationMode:
    return InterpolationMode[cfg.interpolation.upper()]


def tensor_interpolation(cfg: DataConfig) -> InterpolationMode:
    """The resampling filter for resizing a tensor as the PIL pipeline resizes a PIL image: PIL's nearest
    picks the pixel whose centre is nearest, which on tensors is NEAREST_EXACT (torch's NEAREST rounds
    down and picks other pixels)."""
    mode = _interpolation(cfg)
    return InterpolationMode.NEAREST_EXACT if mode == InterpolationMode.NEAREST else mode


@dataclass(frozen=True)
class CropDraw:
    """One training image's random window (in the upright image's pixels) and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


class CropDrawer:
    """Draws the RandomResizedCrop window and the flip for images of any size, from torch's global
    generator, exactly as ``build_train_transform``'s pipeline draws them (same rule, same draws, same
    order), so every decoder crops the window the PIL pipeline would have cropped.

    The rule is v2.RandomResizedCrop's (make_params: up to 10 tries of an area and a log-uniform aspect
    ratio, then a centred fallback), written out because building the transform for every sample cost more
    than the draws themselves; tests/unit/test_fast_decode.py checks it against torchvision's own, window for
    window, over many seeds and sizes. The draws go into two reused one-element tensors: torch.randint and
    torch.rand are these same in-place draws into a new tensor each time."""

    def __init__(self, cfg: DataConfig):
        self.scale = (float(cfg.scale[0]), float(cfg.scale[1]))
        self.ratio = tuple(cfg.ratio)
        # In float32, widened, as torchvision keeps them (torch.log of a float32 tensor) and as
        # RandomHorizontalFlip compares its float32 draw with p: the results must be bit-identical.
        self.log_ratio = tuple(torch.log(torch.tensor(self.ratio[:2])).tolist())
        self.hflip = _float32(cfg.hflip)
        # Reused for every draw: one drawer per thread (as the global generator it draws from, it is not
        # meant to be shared by threads drawing at the same time).
        self._float = torch.empty(1)
        self._long = torch.empty(1, dtype=torch.int64)

    def __call__(self, image_height: int, image_width: int) -> CropDraw:
        area = image_height * image_width
        for _ in range(10):
            target_area = area * self._float.uniform_(*self.scale).item()
            aspect_ratio = self._float.uniform_(*self.log_ratio).exp_().item()
            width = int(round(math.sqrt(target_area * aspect_ratio)))
            height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < width <= image_width and 0 < height <= image_height:
                top = self._long.random_(0, image_height - height + 1).item()
                left = self._long.random_(0, image_width - width + 1).item()
                break
        else:  # no try fitted: the largest centred window within the ratio range
            in_ratio = image_width / image_height
            if in_ratio < min(self.ratio):
                width, height = image_width, int(round(image_width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                width, height = int(round(image_height * max(self.ratio))), image_height
            else:
                width, height = image_width, image_height
            top, left = (image_height - height) // 2, (image_width - width) // 2
        # v2.RandomHorizontalFlip flips when torch.rand(1) < p, and draws nothing when it is left out (p = 0).
        flip = self.hflip > 0 and self._float.uniform_(0, 1).item() < self.hflip
        return CropDraw(top, left, height, width, flip)


@functools.lru_cache(maxsize=8)
def _drawer(cfg: DataConfig) -> CropDrawer:
    return CropDrawer(cfg)


def draw_train_crop(image_height: int, image_width: int, cfg: DataConfig) -> CropDraw:
    """The RandomResizedCrop window (in the upright image's pixels) and the flip for an image of this size,
    drawn from torch's global generator as ``build_train_transform``'s pipeline draws them (CropDrawer)."""
    return _drawer(cfg)(image_height, image_width)


def _policy(cfg: DataConfig) -> Optional[v2.Transform]:
    """The auto_augment policy transform (for PIL images and uint8 tensors alike), or None."""
    interp = _interpolation(cfg)
    if cfg.auto_augment == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interp)
    if cfg.auto_augment == "randaugment":
        return v2.RandAugment(interpolation=interp)
    if cfg.auto_augment == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=interp)
    return None


def _erasing(cfg: DataConfig) -> Optional[v2.Transform]:
    # Value 0 suits uint8 images.
    return v2.RandomErasing(p=cfg.random_erasing, value=0) if cfg.random_erasing > 0 else None


def build_train_transform(cfg: DataConfig) -> v2.Compose:
    """PIL image -> uint8 tensor (3, image_size, image_size); no float math, that happens on the device."""
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                  interpolation=_interpolation(cfg), antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if _policy(cfg) is not None:
        steps.append(_policy(cfg))
    steps.append(v2.PILToTensor())
    if _erasing(cfg) is not None:  # after the tensor conversion because RandomErasing works on tensors
        steps.append(_erasing(cfg))
    return v2.Compose(steps)


def build_val_transform(cfg: DataConfig) -> v2.Compose:
    """Resize the short side to val_resize, center-crop val_crop, uint8 tensor."""
    return v2.Compose([v2.Resize(cfg.val_resize, interpolation=_interpolation(cfg), antialias=True),
                       v2.CenterCrop(cfg.val_crop),
                       v2.PILToTensor()])


def _uint8_resize_is_native(interpolation: InterpolationMode) -> bool:
    """Whether F.resize resizes a uint8 tensor as uint8 (torchvision's rule: bicubic always, bilinear where
    torch has its vectorized uint8 kernel) rather than through float32."""
    if interpolation == InterpolationMode.BICUBIC:
        return True
    vectorized = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return interpolation == InterpolationMode.BILINEAR and (vectorized or platform.machine() in ("aarch64", "arm64"))


class TrainTransform:
    """Decoded image -> uint8 tensor (3, image_size, image_size): the training augmentation.

    A uint8 tensor (a JPEG from decode.py) is cropped to the window of draw_train_crop and resized on the
    tensor, flipped as drawn, then the policy and RandomErasing run on it, in
    build_train_transform's order and with its draws. A PIL image (any other format) goes through
    build_train_transform's pipeline itself."""

    def __init__(self, cfg: DataConfig):
        self.draw = CropDrawer(cfg)
        self.size = [cfg.image_size, cfg.image_size]
        self.interpolation = tensor_interpolation(cfg)
        self.native_resize = _uint8_resize_is_native(self.interpolation)
        self.pil_pipeline = build_train_transform(cfg)
        # A fixed chain, called directly: v2.Compose would re-inspect the input at every step.
        self.after_crop = [step for step in (_policy(cfg), _erasing(cfg)) if step is not None]

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            return self.pil_pipeline(image)
        box = self.draw(image.shape[-2], image.shape[-1])
        image = self.resize(image[:, box.top:box.top + box.height, box.left:box.left + box.width])
        if box.flip:
            image = image.flip(-1)  # what F.horizontal_flip does to a tensor, without its dispatch
        for step in self.after_crop:
            image = step(image)
        return image

    def resize(self, window: torch.Tensor) -> torch.Tensor:
        """The window (a view of the decoded image) resized to image_size, as F.resize(antialias=True)
        computes it, into channels-last memory (strides (1, 3W, 3)).

        torch's uint8 resize works on interleaved pixels: with channels-last memory in and out it skips
        repacking its result into planes, ~20% of its time. Where F.resize would resize in uint8 anyway,
        torch's interpolate is called directly, without F.resize's dispatch and checks (~20% more on this
        path); tests/unit/test_fast_decode.py checks that the values are F.resize's. The collation copies the
        images into one contiguous batch, as it copied PILToTensor's (also channels-last) tensors."""
        batch = window.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # the window's one copy
        if not self.native_resize:
            return F.resize(batch, self.size, interpolation=self.interpolation, antialias=True)[0]
        return torch.nn.functional.interpolate(batch, size=self.size, mode=self.interpolation.value,
                                               align_corners=False, antialias=True)[0]


class ValTransform:
    """Decoded image -> uint8 tensor (3, val_crop, val_crop): resize the short side to val_resize, then the
    center crop; on the tensor for a JPEG from decode.py, through build_val_transform for a PIL image."""

    def __init__(self, cfg: DataConfig):
        self.resize = cfg.val_resize
        self.crop = [cfg.val_crop, cfg.val_crop]
        self.interpolation = tensor_interpolation(cfg)
        self.pil_pipeline = build_val_transform(cfg)

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            return self.pil_pipeline(image)
        # A decoded image is channels-last (strides (1, 3W, 3)), so F.resize keeps it so, without repacking.
        image = F.resize(image, [self.resize], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, self.crop)


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
