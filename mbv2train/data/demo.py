"""Datasets made offline from what scikit-learn ships, so nothing is downloaded.

The digits demo (``mbv2 data demo``): ``load_digits``'s 1,797 8x8 scans (10 classes), written as an
ImageFolder (train/<digit>/NNNN.png, val/<digit>/NNNN.png) that the normal data code reads like any other
dataset; small enough to train on a laptop.

The photo set (``mbv2 data photos``): JPEGs cut from ``load_sample_images``'s two 640x427 photos, with
ImageNet's sizes, shapes and quality, to measure the data path on real photographic content (``mbv2
bench``). Its classes carry no meaning.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mbv2train.errors import DataError

__all__ = ["write_demo_dataset", "write_photo_dataset", "DEMO_COUNTS", "DEMO_SIZE"]

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

    try:  # scikit-learn: the optional demo extra
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


# ---------------------------------------------------------------- the photo set

PHOTO_SEED = 0
# What the set imitates (ImageNet's training JPEGs): most are 500 px on the long side at 4:3, about a
# quarter are portrait, a few percent are grayscale, and quality sits around 90.
_ASPECTS = ((4 / 3, 0.6), (3 / 2, 0.2), (1.0, 0.1), (16 / 9, 0.1))  # long side / short side, probability
_PORTRAIT, _GRAYSCALE = 0.25, 0.02


def _photo_name(class_index: int, index: int) -> str:
    return f"c{class_index:03d}_{index:05d}.jpg"


def _photo_class(class_index: int) -> str:
    return f"c{class_index:03d}"


def _count_photos(dest: Path, counts: dict[str, int], classes: int) -> bool:
    """Whether ``dest`` holds exactly the photo set of these counts (its file names and nothing else)."""
    expected = [_photo_class(c) for c in range(classes)]
    for split, per_class in counts.items():
        split_dir = dest / split
        if not split_dir.is_dir() or sorted(p.name for p in split_dir.iterdir()) != expected:
            return False
        for c, name in enumerate(expected):
            if sorted(p.name for p in (split_dir / name).iterdir()) != [_photo_name(c, i) for i in range(per_class)]:
                return False
    return True


def _draw_photo(sources, rng):
    """One ImageNet-like photo (a PIL image) cut from one of the source photos with ``rng``'s draws."""
    source = sources[rng.integers(len(sources))]
    aspect = rng.choice([a for a, _ in _ASPECTS], p=[p for _, p in _ASPECTS])
    long_side = 500 if rng.random() < 0.6 else int(rng.integers(300, 641))
    width, height = long_side, max(1, round(long_side / aspect))
    if rng.random() < _PORTRAIT:
        width, height = height, width
    # The largest window of the output's shape inside the source, then 70-100% of it: little upscaling
    # (1.25x at most for 500x375, 2x for tall portraits), so the JPEGs keep a real photo's detail and so
    # its decoding cost.
    src_w, src_h = source.size
    fit = min(src_w / width, src_h / height)
    scale = fit * rng.uniform(0.7, 1.0)
    box_w, box_h = min(src_w, round(width * scale)), min(src_h, round(height * scale))
    left, top = int(rng.integers(src_w - box_w + 1)), int(rng.integers(src_h - box_h + 1))
    photo = source.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < _GRAYSCALE:
        photo = photo.convert("L")
    return photo, int(rng.integers(85, 96))  # quality: median 90


@functools.lru_cache(maxsize=1)  # once per writing process, not once per class
def _load_sources():
    from sklearn.datasets import load_sample_images  # the optional demo extra

    return [Image.fromarray(pixels) for pixels in load_sample_images().images]


def _write_photo_class(job: tuple[Path, int, int, int, int]) -> None:
    """Write one class folder: its photos depend only on (seed, split, class), not on which process runs it."""
    folder, split_id, class_index, count, seed = job
    rng = np.random.default_rng([seed, split_id, class_index])
    sources = _load_sources()
    folder.mkdir(parents=True)
    for i in range(count):
        photo, quality = _draw_photo(sources, rng)
        photo.save(folder / _photo_name(class_index, i), "JPEG", quality=quality)


def write_photo_dataset(dest: Path, classes: int = 100, per_class: int = 50, val_per_class: int | None = None,
                        workers: int = 1, seed: int = PHOTO_SEED) -> dict:
    """Write the photo ImageFolder (train/cNNN/*.jpg, val/cNNN/*.jpg) under ``dest`` unless it is already
    there with these counts. ``val_per_class`` defaults to a tenth of ``per_class`` (at least 1).

    Returns {"train": int, "val": int, "classes": int, "path": str, "created": bool}.
    """
    if classes < 1 or per_class < 1 or (val_per_class is not None and val_per_class < 1):
        raise DataError("the photo set needs at least 1 class and 1 image per class and split")
    val_per_class = val_per_class if val_per_class is not None else max(1, per_class // 10)
    dest = Path(dest).expanduser()
    counts = {"train": per_class, "val": val_per_class}
    result = {"train": classes * per_class, "val": classes * val_per_class, "classes": classes, "path": str(dest)}
    if dest.exists():
        if _count_photos(dest, counts, classes):
            return {**result, "created": False}
        if not dest.is_dir() or any(dest.iterdir()):
            raise DataError(f"{dest} exists but is not the photo set of --classes {classes} --per-class "
                            f"{per_class} --val-per-class {val_per_class}; remove it or pick another folder")
    try:
        import sklearn.datasets  # noqa: F401 - the optional demo extra, checked before anything is written
    except ImportError:
        raise DataError("the photo set needs scikit-learn: pip install 'mbv2train[demo]'") from None

    # As the digits: write into a hidden sibling and rename it into place when it is complete.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    jobs = [(tmp / split / _photo_class(c), split_id, c, count, seed)
            for split_id, (split, count) in enumerate(counts.items()) for c in range(classes)]
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                list(pool.map(_write_photo_class, jobs))
        else:
            for job in jobs:
                _write_photo_class(job)
        os.rename(tmp, dest)  # replaces an empty folder at dest
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the photo set to {dest}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "created": True}
