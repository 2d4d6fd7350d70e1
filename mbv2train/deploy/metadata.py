"""The mbv2.* keys that travel with every exported model: enough to preprocess an image and name its
class without mbv2 installed.

An image goes in as mbv2 evaluates it: RGB, short side resized to ``mbv2.resize`` pixels with
``mbv2.interpolation`` (antialiased), center-cropped to ``mbv2.crop``, scaled to 0-1, then
``(x - mean) / std`` per channel, NCHW float32. ONNX keeps these as metadata_props (strings: JSON for
lists); the formats without a place for them get a JSON file beside the model with the same keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mbv2train import __version__

KEYS = ("mbv2.classes", "mbv2.mean", "mbv2.std", "mbv2.resize", "mbv2.crop", "mbv2.interpolation",
        "mbv2.checkpoint_sha256", "mbv2.version")


@dataclass(frozen=True)
class Preprocess:
    """The validation transform of a checkpoint, as plain values."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int  # short side, in pixels
    crop: int  # center crop, in pixels
    interpolation: str  # "bilinear", "bicubic" or "nearest"

    @classmethod
    def of(cls, data_cfg) -> "Preprocess":
        return cls(tuple(data_cfg.mean), tuple(data_cfg.std), int(data_cfg.val_resize), int(data_cfg.val_crop),
                   str(data_cfg.interpolation))


def values(classes: list[str], pre: Preprocess, checkpoint_sha256: str) -> dict[str, Any]:
    """The keys with native values (lists, ints), as the JSON beside a model holds them."""
    return {"mbv2.classes": list(classes), "mbv2.mean": list(pre.mean), "mbv2.std": list(pre.std),
            "mbv2.resize": pre.resize, "mbv2.crop": pre.crop, "mbv2.interpolation": pre.interpolation,
            "mbv2.checkpoint_sha256": checkpoint_sha256, "mbv2.version": __version__}


def as_strings(native: dict[str, Any]) -> dict[str, str]:
    """The same keys as strings (JSON for lists), for ONNX metadata_props and TorchScript's extra files."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in native.items()}
