"""A tiny real dataset for trying the trainer without ImageNet: scikit-learn's handwritten digits.

``load_digits`` ships 1,797 8x8 scans (10 classes) inside scikit-learn, so nothing is downloaded. They
are written as an ImageFolder (train/<digit>/NNNN.png, val/<digit>/NNNN.png) that the normal data code
reads like any other dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mbv2train.errors import DataError

__all__ = ["write_demo_dataset", "DEMO_COUNTS", "DEMO_SIZE"]

DEMO_COUNTS = {"train": 1437, "val": 360}  # a fixed stratified 80/20 split of the 1,797 digits
DEMO_SIZE = 32  # pixels; see _save_png
CLASSES = [str(d) for d in range(10)]


def _count(dest: Path) -> dict[str, int] | None:
    """Images per split if ``dest`` holds the complete demo dataset, else None."""
    counts = {}
    for split in DEMO_COUNTS:
        split_dir = dest / split
        if not split_dir.is_dir() or sorted(p.name for p in split_dir.iterdir() if p.is_dir()) != CLASSES:
            return None
        counts[split] = sum(1 for c in CLASSES for p in (split_dir / c).iterdir() if p.suffix == ".png")
    return counts if counts == DEMO_COUNTS else None


def _save_png(pixels, path: Path) -> None:
    from PIL import Image

    # Scans are 0..16; stretch to 0..255. Stored at 32x32 with nearest-neighbour (each scan pixel a
    # 4x4 block): the demo trains at 32 px, so no resampling blur is added, and RandomResizedCrop
    # gets finer crop positions than on an 8x8 image.
    image = Image.fromarray((pixels * (255 / 16)).round().clip(0, 255).astype("uint8"), mode="L")
    image.resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.NEAREST).save(path)


def write_demo_dataset(dest: Path) -> dict:
    """Write the digits ImageFolder under ``dest`` unless it is already complete there.

    Returns {"train": 1437, "val": 360, "classes": 10, "path": str, "created": bool}.
    """
    dest = Path(dest).expanduser()
    result = {**DEMO_COUNTS, "classes": len(CLASSES), "path": str(dest)}
    if dest.exists():
        if _count(dest) is None:
            # Never overwrite or mix into a folder we did not write completely ourselves.
            raise DataError(f"{dest} exists but is not a complete demo dataset; "
                            "remove it or pick another folder")
        return {**result, "created": False}

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("the demo dataset needs scikit-learn: pip install 'mbv2train[demo]'") from None

    digits = load_digits()
    indices = list(range(len(digits.target)))
    splits = dict(zip(DEMO_COUNTS, train_test_split(indices, test_size=0.2, stratify=digits.target,
                                                    random_state=0)))

    # Write into a hidden sibling and rename it into place at the end, so an interrupted write
    # never leaves a folder that looks complete.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for split, split_indices in splits.items():
            for c in CLASSES:
                (tmp / split / c).mkdir(parents=True)
            for i in split_indices:
                # The file name is the scan's index in load_digits, so every image can be traced back.
                _save_png(digits.images[i], tmp / split / str(digits.target[i]) / f"{i:04d}.png")
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process (e.g. a second rank) may have finished the same dataset first.
        if dest.exists() and _count(dest) is not None:
            return {**result, "created": False}
        raise DataError(f"cannot write the demo dataset to {dest}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "created": True}
