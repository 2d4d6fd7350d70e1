"""Whether a file can be a checkpoint at all, told from its first bytes without importing torch.

torch.save writes a zip archive holding ``<name>/data.pkl`` (older versions: a pickle, or a tar file).
Anything else given where a checkpoint belongs (a note, an image, a model exported from mbv2) is named
for what it is, at once: "corrupt or truncated" is kept for a file that starts like a checkpoint, which
only torch can judge.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

from mbv2train.errors import CheckpointError

LAST = "last.pt"  # a run's newest checkpoint; named here, without torch, for the checks made before it
HEAD_BYTES = 512
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
TAR_MAGIC = (257, b"ustar")  # (offset, bytes): torch's oldest format
IMAGE_MAGICS = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                (b"GIF8", "a GIF image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))
SOURCE_HINT = "mbv2 takes the .pt checkpoint it was exported from"


def require_checkpoint_file(path: Path, expected: str = "an mbv2 checkpoint") -> None:
    """CheckpointError (one line) unless ``path`` is a readable file that may hold a checkpoint; ``expected``
    says what was asked for."""
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(held)})" if held else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    kind = foreign_kind(path, head)
    if kind is not None:
        raise CheckpointError(f"{path} is not {expected} ({kind})")


def foreign_kind(path: Path, head: bytes) -> Optional[str]:
    """What the file that starts with ``head`` is when it cannot be a checkpoint; None when it may be one."""
    if not head:
        return "the file is empty"
    if head.startswith(ZIP_MAGIC):
        return _foreign_archive(path)
    if head.startswith(PICKLE_MAGIC) or head[TAR_MAGIC[0]:].startswith(TAR_MAGIC[1]):
        return None
    for magic, kind in IMAGE_MAGICS:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    text = _text_start(head)
    if text is not None:
        return f"a text file starting {text!r}"
    if head[4:6] == b"ET" and head[6:8].isdigit():  # a FlatBuffer whose identifier is ET and a version
        return f"an ExecuTorch program; {SOURCE_HINT}"
    if path.suffix == ".onnx":  # protobuf has no magic of its own
        return f"an ONNX model; {SOURCE_HINT}"
    return f"its first bytes, {head[:8].hex(' ')}, are neither a zip archive nor a pickle, which torch.save writes"


def _foreign_archive(path: Path) -> Optional[str]:
    """A zip archive that is not torch.save's: TorchScript and torch.export write zips too."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # no readable directory at its end: a checkpoint cut short, for torch to report
    if any(name.endswith("/code/") or "/code/__torch__/" in name for name in names):
        return f"a TorchScript model; {SOURCE_HINT}"
    if any(name.endswith("/models/model.json") or name.endswith("/archive_format") for name in names) \
            and not any(name.endswith("/data.pkl") for name in names):
        return f"a torch.export program; {SOURCE_HINT}"
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive that torch.save did not write"
    return None


def _text_start(head: bytes) -> Optional[str]:
    """The first line of ``head`` (up to 40 characters) when it reads as text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not merely a character cut by the end of the head
            return None
        text = head[:exc.start].decode("utf-8")
    if any(not (ch.isprintable() or ch in "\t\r\n") for ch in text):
        return None
    stripped = text.strip()
    return stripped.splitlines()[0][:40] if stripped else text[:40]
