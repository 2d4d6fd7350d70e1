"""Reading image files for the fast CPU path: JPEGs (found by content, not extension) are decoded by
libjpeg-turbo through torchvision straight into a uint8 tensor; everything else goes through the strict PIL
loader (folders.load_image) as before.

The fast decoder must never accept what the PIL loader would reject, nor give a different image:
- a truncated JPEG makes torchvision's decoder fail (its source manager raises when the data runs out
  before the end-of-image marker, as PIL's loader does; tests/unit/test_fast_decode.py cuts files at many points
  to check that both always agree), and any failure falls back to load_image, which names the file and the
  reason exactly as today;
- colour, grayscale and EXIF-rotated JPEGs decode to the same pixels as PIL's (the same libjpeg-turbo
  decoding, the same upright turn: 0 levels apart in the tests);
- CMYK and YCCK JPEGs (4 components, found from the frame header in a few microseconds) go to PIL. Both
  convert them alike with torchvision 0.29 and Pillow 13, but torchvision's conversion is recent, PIL's is
  what training has always seen, and such files are rare (22 of ImageNet's 1.28M training images).

``read_bytes``, ``is_jpeg`` and ``jpeg_components`` serve the device decoder's workers too, which read the
bytes and leave the decoding to the training process.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from PIL import Image

from mbv2train.data.folders import load_image, read_failure
from mbv2train.errors import DataError

JPEG_START = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker

# Start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC, which share the 0xC_ range); the frame header
# holds the image size and the number of colour components.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_START_OF_SCAN, _END_OF_IMAGE = 0xDA, 0xD9

_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


def _load_jpeg_op():
    """torchvision's JPEG decoder op, or None if this torchvision was built without image support.

    The op is called directly: torchvision.io.decode_jpeg is a thin wrapper around it that, since 0.29,
    also warns a DeprecationWarning on every call. The wrapper calls it with the same arguments (data,
    mode, apply_exif_orientation) in torchvision 0.21 and 0.29 (read in their sources)."""
    try:
        import torchvision.io  # noqa: F401 - importing it loads the extension that registers torch.ops.image
        return torch.ops.image.decode_jpeg
    except (ImportError, AttributeError, RuntimeError):
        return None


_decode_jpeg_op = _load_jpeg_op()


def read_bytes(path: str) -> bytearray:
    """The file's content; DataError naming the file if it cannot be read.

    A bytearray, not bytes: torch.frombuffer then shares its memory without a copy (and without the
    warning torch gives for read-only buffers)."""
    try:
        fd = os.open(path, os.O_RDONLY)  # os-level calls: ~2/3 of the time of open() + readinto()
        try:
            data = bytearray(os.fstat(fd).st_size)
            got = os.readv(fd, [data])
        finally:
            os.close(fd)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {read_failure(path, e)}") from None
    if got < len(data):  # the file shrank while being read: decode what is there, which then fails
        del data[got:]
    return data


def is_jpeg(data: Union[bytes, bytearray, memoryview]) -> bool:
    """True if ``data`` starts like a JPEG file (SOI marker), whatever the file's name says."""
    return data[:3] == JPEG_START


def jpeg_components(data: Union[bytes, bytearray, memoryview]) -> Optional[int]:
    """The number of colour components in a JPEG's frame header (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK), or
    None if no frame header comes before the image data (not a JPEG, or a broken one).

    Walks the segment headers only (a few per file, skipping EXIF blocks by their length), so it costs
    microseconds."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _SOF_MARKERS:
            # FF Cn, length (2), precision (1), height (2), width (2), components (1)
            return data[i + 9] if i + 9 < n else None
        elif marker in (_START_OF_SCAN, _END_OF_IMAGE):
            return None
        elif marker in _STANDALONE:
            i += 2
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def decode_jpeg(data: bytearray) -> Optional[torch.Tensor]:
    """An upright RGB uint8 tensor (3, H, W) of the JPEG in ``data``, decoded by libjpeg-turbo; None where
    PIL stays the reference (4-component JPEGs) or the decoder fails (truncated, 12-bit, a broken header):
    the caller then uses the PIL loader, which decides and names the reason.

    The tensor is a channels-last view (strides (1, 3W, 3)) of the decoder's row-major output: no copy is
    made, and torch's uint8 resize reads that layout fastest."""
    if _decode_jpeg_op is None or jpeg_components(data) not in (1, 3):
        return None
    try:
        return _decode_jpeg_op(torch.frombuffer(data, dtype=torch.uint8), _RGB, True)
    except RuntimeError:
        return None


def load_image_fast(path: str) -> Union[torch.Tensor, Image.Image]:
    """The image at ``path``, upright and RGB: a uint8 tensor (3, H, W) for a JPEG that libjpeg-turbo
    decodes as PIL would, else a PIL image from the strict loader (folders.load_image). DataError naming
    the file if it is unreadable, exactly as load_image."""
    data = read_bytes(path)
    if is_jpeg(data):
        image = decode_jpeg(data)
        if image is not None:
            return image
    return load_image(path)
