"""ImageNet-style folders (root/<split>/<class>/<image>): finding the splits and classes, and reading
image files as RGB.

Reading is strict: a file that does not decode completely is unreadable (a DataError naming it), while
valid but unusual files (grayscale, CMYK, RGBA, palette, 16-bit, misnamed formats) load as RGB.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from mbv2train.config import Config, DataConfig
from mbv2train.errors import DataError
from mbv2train.words import plural
from mbv2train.shortlist import shortlist
from mbv2train.config.preflight import require_folder, split_folders

PREPARE_VAL_HINT = "python scripts/prepare_imagenet_val.py"
MIN_CLASSES = 2  # with one class every prediction is right: a perfect score that means nothing


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# ---------------------------------------------------------------- folders

def class_folders(split_dir: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store-like leftovers) are not classes; counting them
    # would silently add an output unit and shift every label after it.
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def check_split(path: Path, what: str, key: Optional[str] = None) -> None:
    """DataError (one line) unless ``path`` is a folder with at least one class subfolder."""
    require_folder(path, what, key)
    if class_folders(path):
        return
    source = f" (set by {key})" if key else ""
    n_flat = sum(1 for e in os.scandir(path) if e.is_file() and is_image_file(e.name))
    if n_flat:
        # ImageNet's validation archive unpacks to 50,000 images in one folder.
        raise DataError(f"{what} folder {path} holds {plural(n_flat, 'image')} but no class folders{source}; "
                        f"if it is ImageNet's flat val folder, sort it first: {PREPARE_VAL_HINT} {path} "
                        f"--labels LOC_val_solution.csv")
    raise DataError(f"{what} folder {path} has no class subfolders{source}; "
                    f"expected {path}/<class>/<image>")


def too_few_classes(split_dir: Path, classes: list[str], what: str) -> Optional[DataError]:
    """The error for a split with fewer than MIN_CLASSES class folders, or None."""
    if len(classes) >= MIN_CLASSES:
        return None
    return DataError(f"{what} {split_dir} has {plural(len(classes), 'class folder')} ({shortlist(classes)}); "
                     f"a classifier needs at least {MIN_CLASSES} classes")


def resolve_dirs(cfg: DataConfig) -> tuple[Path, Path]:
    """(train folder, val folder): data.train_dir / data.val_dir, else data.root / the split names; each
    with at least MIN_CLASSES class folders."""
    dirs = []
    for what, path, key in split_folders(cfg):
        check_split(path, what, key)
        error = too_few_classes(path, class_folders(path), f"{what} folder")
        if error is not None:
            raise error
        dirs.append(path)
    return dirs[0], dirs[1]


def _has_image(folder: Path) -> bool:
    # Stops at the first image, so checking 1000 ImageNet classes lists each folder once at most.
    for _, _, files in os.walk(folder, followlinks=True):
        if any(is_image_file(f) for f in files):
            return True
    return False


def _no_images(class_dir: Path) -> DataError:
    return DataError(f"class folder {class_dir} has no images ({' '.join(IMG_EXTENSIONS)})")


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of ``split_dir``; DataError if there are none or one holds no image."""
    split_dir = Path(split_dir)
    check_split(split_dir, "data")
    classes = class_folders(split_dir)
    for name in classes:
        if not _has_image(split_dir / name):
            raise _no_images(split_dir / name)
    return classes


# "I" is how PIL opens 16-bit PGM files (and 16-bit PNGs in older versions).
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image fully and return it as upright 8-bit RGB; raises whatever PIL raises."""
    # Decode now: a truncated JPEG only fails when its pixels are read, and it must fail here, where the
    # caller names the file, not later inside a transform.
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF metadata: the pixels are fine, so use them unrotated
        pass
    if img.mode in _SIXTEEN_BIT_GRAY:
        # convert("RGB") clips 16-bit values to 0..255, so almost every pixel turns white; scale instead.
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    elif img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        # Through RGBA, as PIL asks (it warns on a direct P -> RGB with transparency); the alpha is then
        # dropped as in torchvision's loader, so the colours match what reference pipelines see.
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_failure(path: str, exc: BaseException) -> str:
    """One-line reason why ``path`` could not be read."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded; DataError naming the file if it cannot be read.

    EXIF orientation IS applied (phone photos are often stored sideways with a rotation tag), so a JPEG
    tagged "rotate 90" comes out with width and height swapped. Grayscale, CMYK, palette and alpha images
    become RGB (alpha is dropped); 16-bit grayscale is scaled from 0..65535 to 0..255. The format comes
    from the file's content, not its extension.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as e:  # noqa: BLE001 - only PIL reading the user's bytes runs in here; corrupt files
        # raise OSError, SyntaxError, ValueError, DecompressionBombError and, from some plugins, IndexError
        # or struct.error: every one of them means this file is unreadable, not that mbv2train has a bug.
        raise DataError(f"cannot read image {path}: {read_failure(path, e)}") from None


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder with our class list (hidden folders skipped) and EXIF-aware loading."""

    def __init__(self, root: Path):
        # allow_empty: we report an empty class folder ourselves, as a one-line DataError.
        super().__init__(str(root), loader=load_image, allow_empty=True)
        counts = Counter(self.targets)
        for i, name in enumerate(self.classes):
            if counts[i] == 0:
                raise _no_images(Path(root) / name)

    def find_classes(self, directory):
        classes = class_folders(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}


IMAGENET_CLASSES = 1000  # what a summary assumes when neither the config nor its data says


def class_count(cfg: Config) -> tuple[int, str, Optional[str]]:
    """The classes a summary of ``cfg`` shows: model.num_classes, else as many as the class folders of the
    config's training data (what `mbv2 train` would build), else ImageNet's 1000.

    Returns (count, where a count read from the data came from, for the title ("" otherwise), a note when
    the config names training data that could not tell)."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes, "", None
    d = cfg.data
    if d.train_dir is None and d.root is None:
        return IMAGENET_CLASSES, "", None
    train_dir = Path(d.train_dir) if d.train_dir is not None else Path(d.root) / d.train_split
    train_dir = train_dir.expanduser()
    if not train_dir.exists():
        reason = "does not exist"
    elif not train_dir.is_dir():
        reason = "is not a folder"
    else:
        try:
            classes = class_folders(train_dir)
        except OSError as exc:
            classes, reason = [], f"cannot be read ({exc.strerror or exc})"
        else:
            reason = "has no class folders"
        if classes:
            return len(classes), f"the class folders of {train_dir}", None
    return IMAGENET_CLASSES, "", (f"model.num_classes is unset and {train_dir} {reason}; "
                                  f"assuming {IMAGENET_CLASSES} classes (ImageNet)")
