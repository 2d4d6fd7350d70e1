"""The worker side of `data.decode: device`: JPEGs leave the workers undecoded, with their random draws.

A worker reads a JPEG's bytes and its header only (size and EXIF orientation, no pixels), draws the
crop window and the flip exactly as the PIL pipeline would (same seed, same draws), and hands the bytes
on; the training process decodes the whole batch at once (gpu_decode.py). Every other file, and every
JPEG that PIL must judge (CMYK, a header PIL cannot parse, no end-of-image marker after the last scan,
as in a truncated file), takes the usual path in the worker: decoded by the dataset's loader and
transformed there, or replaced if unreadable, exactly as with `data.decode: workers`.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, replace
from typing import Optional

import torch
from PIL import Image

from mbv2train.config import DataConfig
from mbv2train.data.decode import is_jpeg, read_bytes
from mbv2train.data.transforms import draw_train_crop
from mbv2train.errors import ConfigError

SCAN_START, IMAGE_END = b"\xff\xda", b"\xff\xd9"  # SOS, EOI
ORIENTATION_TAG = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DEVICE_MODES = ("RGB", "L")  # what the batch decoders turn into RGB as PIL's convert("RGB") does


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes with what the device needs to finish it: the upright image's size, the EXIF
    orientation to apply after decoding (1 = none), and, once drawn, the crop window in the upright
    image's pixels (top, left, height, width; None for validation) and the flip."""

    data: bytearray
    path: str
    height: int
    width: int
    orientation: int = 1
    window: Optional[tuple[int, int, int, int]] = None
    flip: bool = False


def jpeg_header(data: bytearray) -> Optional[tuple[int, int, int]]:
    """(upright height, upright width, EXIF orientation) of a JPEG the batch decoders can take, read
    from its header without decoding; None when PIL should decode it instead."""
    # nvJPEG may pad a cut-off file with gray where PIL calls it truncated; a complete file ends its last
    # scan with an end-of-image marker (trailing bytes may follow it). Searched from the end, where the
    # marker is: a few bytes to read, not the whole file.
    end = data.rfind(IMAGE_END)
    if end < 0 or data.find(SCAN_START, end) >= 0:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            # MPO: a JPEG with more pictures appended; every decoder reads its first one, as PIL does
            if img.format not in ("JPEG", "MPO") or img.mode not in DEVICE_MODES:
                return None
            width, height = img.size
            try:
                orientation = img.getexif().get(ORIENTATION_TAG, 1)
            except Exception:  # noqa: BLE001 - broken EXIF: PIL's loader uses the pixels unrotated too
                orientation = 1
    except Exception:  # noqa: BLE001 - a header PIL cannot parse: its loader names the file
        return None
    if orientation not in range(1, 9):  # PIL's exif_transpose ignores unknown values as well
        orientation = 1
    if orientation in TRANSPOSING:
        height, width = width, height
    return height, width, orientation


class ReadEncoded:
    """A dataset loader: path -> EncodedJpeg for a JPEG the device decodes, else ``fallback(path)``
    (the decoded image, or the DataError naming an unreadable file)."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, path: str):
        data = read_bytes(path)  # DataError naming the file if it cannot be read
        header = jpeg_header(data) if is_jpeg(data) else None  # JPEG by content, not by name
        if header is None:
            return self.fallback(path)
        height, width, orientation = header
        return EncodedJpeg(data, path, height, width, orientation)


class DrawWindow:
    """A dataset transform: draws an EncodedJpeg's crop window and flip (training) from the generator
    SeededDataset has seeded, as ``draw_train_crop`` matches the PIL pipeline draw for draw; a decoded
    image goes through the usual ``fallback`` transform."""

    def __init__(self, fallback, cfg: Optional[DataConfig]):
        self.fallback = fallback
        self.cfg = cfg  # None: validation, nothing to draw

    def __call__(self, image):
        if not isinstance(image, EncodedJpeg):
            return self.fallback(image)
        if self.cfg is None:
            return image
        crop = draw_train_crop(image.height, image.width, self.cfg)
        return replace(image, window=(crop.top, crop.left, crop.height, crop.width), flip=crop.flip)


def check_device_decoding(cfg: DataConfig) -> None:
    """ConfigError for the augmentations the device path does not apply."""
    asked = [f"data.{key}" for key, off in (("auto_augment", "none"), ("random_erasing", 0.0))
             if getattr(cfg, key) != off]
    if cfg.decode == "device" and asked:
        raise ConfigError(f"data.decode: device does not apply {' or '.join(asked)}; "
                          f"use data.decode: workers with them")


def leave_jpegs_encoded(dataset, cfg: DataConfig, train: bool):
    """A copy of a SeededDataset whose items hold EncodedJpegs for JPEGs; its seeding and its handling
    of unreadable files stay the dataset's own."""
    if train:
        check_device_decoding(cfg)
    encoded = copy.copy(dataset)
    encoded.loader = ReadEncoded(dataset.loader)
    encoded.transform = DrawWindow(dataset.transform, cfg if train else None)
    return encoded


# ---------------------------------------------------------------- batches

@dataclass
class EncodedBatch:
    """One batch as it leaves the workers: the JPEGs' bytes in one tensor (one shared-memory block
    for the whole batch rather than one per image), what each needs to be finished, and the images the
    workers already decoded (other formats, files PIL had to judge) with their places in the batch."""

    size: int
    data: torch.Tensor  # uint8, every JPEG's bytes one after another
    lengths: list[int]
    positions: list[int]  # place of each JPEG in the batch
    paths: list[str]
    orientations: list[int]
    windows: list[Optional[tuple[int, int, int, int]]]
    flips: list[bool]
    decoded: torch.Tensor  # uint8 (K, 3, H, W), K may be 0
    decoded_positions: list[int]

    def pin_memory(self) -> "EncodedBatch":
        # DataLoader(pin_memory=True) calls this; the JPEG bytes are copied by the decoder itself
        return replace(self, decoded=self.decoded.pin_memory())

    def jpegs(self) -> list[torch.Tensor]:
        """Each JPEG's bytes as a 1-D uint8 tensor (views of ``data``)."""
        return list(torch.split(self.data, self.lengths)) if self.lengths else []


def collate_encoded(items) -> tuple[EncodedBatch, torch.Tensor, tuple[str, ...]]:
    """DataLoader collate_fn for the (image or EncodedJpeg, label, bad) items of a SeededDataset whose
    JPEGs are left encoded: (EncodedBatch, int64 labels, bad paths), the shape of a usual batch."""
    jpegs = [(i, image) for i, (image, _, _) in enumerate(items) if isinstance(image, EncodedJpeg)]
    done = [(i, image) for i, (image, _, _) in enumerate(items) if not isinstance(image, EncodedJpeg)]
    buffer = bytearray(sum(len(j.data) for _, j in jpegs))
    offset = 0
    for _, jpeg in jpegs:
        buffer[offset:offset + len(jpeg.data)] = jpeg.data
        offset += len(jpeg.data)
    data = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    decoded = torch.stack([image for _, image in done]) if done else torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    batch = EncodedBatch(size=len(items), data=data, lengths=[len(j.data) for _, j in jpegs],
                         positions=[i for i, _ in jpegs], paths=[j.path for _, j in jpegs],
                         orientations=[j.orientation for _, j in jpegs], windows=[j.window for _, j in jpegs],
                         flips=[j.flip for _, j in jpegs], decoded=decoded,
                         decoded_positions=[i for i, _ in done])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return batch, labels, tuple(bad for _, _, bad in items)
