"""The mbv2.* keys that travel with every exported model: enough to preprocess an image and name its
class without mbv2 installed.

An image goes in as mbv2 evaluates it: RGB, short side resized to ``mbv2.resize`` pixels with
``mbv2.interpolation`` (antialiased), center-cropped to ``mbv2.crop``, scaled to 0-1, then
``(x - mean) / std`` per channel, NCHW float32. ONNX keeps these as metadata_props (strings: JSON for
lists); the formats without a place for them get a JSON file beside the model with the same keys, which
`mbv2 eval` and `mbv2 predict` read back (``read_sidecar``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mbv2train import __version__
from mbv2train.errors import CheckpointError

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


def sidecar_of(path: Path) -> Path:
    """The JSON beside a model file: best.pte -> best.pte.json (one per exported file, whatever its format)."""
    return path.with_name(path.name + ".json")


@dataclass(frozen=True)
class Sidecar:
    """The JSON beside an exported file, read back: its class names and the config settings it fixes."""

    path: Path
    classes: list[str]
    settings: dict[str, dict[str, Any]]  # {"data": {mean, std, val_resize, val_crop, interpolation}, "model": ...}


# Each key's config setting and what its value must be (checked here, so that a bad value names the key the
# file holds; the ranges are the config's to check)
_AS_SETTINGS = {"mbv2.mean": ("data", "mean", list), "mbv2.std": ("data", "std", list),
                "mbv2.resize": ("data", "val_resize", int), "mbv2.crop": ("data", "val_crop", int),
                "mbv2.interpolation": ("data", "interpolation", str)}
_KINDS = {list: "a list of numbers", int: "a whole number", str: "a string"}
# what torchvision.models.mobilenet_v2 is given, as the torchvision export writes it
_ARCHITECTURE = ("num_classes", "width_mult", "round_nearest")


def read_sidecar(model_file: Path) -> Optional[Sidecar]:
    """The JSON beside ``model_file``, or None when there is none; CheckpointError (one line naming the JSON
    and the key) when it is not what `mbv2 export` writes."""
    path = sidecar_of(Path(model_file))
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not JSON ({' '.join(str(exc).split())}); it should hold the keys "
                              f"mbv2 export writes beside a model") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a JSON object; it should hold the keys mbv2 export writes")
    settings: dict[str, dict[str, Any]] = {"data": {}, "model": {}}
    for key, (section, name, kind) in _AS_SETTINGS.items():
        if key not in content:
            raise CheckpointError(f"{path}: {key} missing; it should hold the keys mbv2 export writes")
        value = content[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{path}: {key}: expected {_KINDS[kind]}, got {json.dumps(value)[:60]}")
        settings[section][name] = value
    classes = content.get("mbv2.classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: mbv2.classes: expected the list of class names")
    architecture = content.get("torchvision")
    if isinstance(architecture, dict):
        settings["model"] = {k: architecture[k] for k in _ARCHITECTURE if k in architecture}
    settings["model"].setdefault("num_classes", len(classes))
    return Sidecar(path, classes, settings)
