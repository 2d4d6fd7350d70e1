#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into one subfolder per class (synset).

ImageNet's val archive unpacks to 50,000 images in a single folder; ImageFolder-style loaders need
val/<synset>/<image>. The labels come from either

  * Kaggle's LOC_val_solution.csv:   ImageId,PredictionString
                                     ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...
    (the first word of PredictionString is the synset), or
  * a two-column text file:          ILSVRC2012_val_00000001.JPEG n01751748
    (file name or name without extension, then the class; spaces, tabs or a comma between them).

Usage:
    python scripts/prepare_imagenet_val.py /data/imagenet/val --labels LOC_val_solution.csv [--dry-run]

Everything is checked before the first file moves: an image without a label, a label file that names
one image twice with different classes, or a destination that already exists stops the script.
Labels whose image is not in the folder are skipped (so a half-finished run can simply be re-run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class PrepareError(Exception):
    pass


def read_labels(path: Path) -> dict[str, str]:
    """{image name without extension: class} from a Kaggle CSV or a 'filename class' text file."""
    if not path.is_file():
        raise PrepareError(f"label file {path} does not exist")
    lines = path.read_text().splitlines()
    kaggle = bool(lines) and lines[0].strip().lower().startswith("imageid,")
    labels: dict[str, str] = {}
    for line_no, line in enumerate(lines, 1):
        if not line.strip() or (kaggle and line_no == 1):
            continue
        # Kaggle: "ImageId,synset x y x y synset ..."; text: "name synset" (any whitespace or a comma).
        fields = line.split(",", 1) if kaggle else line.replace(",", " ").split(None, 1)
        if len(fields) != 2 or not fields[1].split():
            raise PrepareError(f"{path}:{line_no}: expected an image name and a class")
        name, synset = fields[0].strip(), fields[1].split()[0]
        if "/" in synset or "\\" in synset or synset.startswith("."):
            raise PrepareError(f"{path}:{line_no}: {synset!r} is not a usable class folder name")
        stem = Path(name).stem if name.lower().endswith(IMAGE_EXTENSIONS) else name
        if labels.setdefault(stem, synset) != synset:
            raise PrepareError(f"{path}:{line_no}: {name} is labelled both {labels[stem]} and {synset}")
    if not labels:
        raise PrepareError(f"label file {path} has no labels")
    return labels


def plan_moves(val_dir: Path, labels: dict[str, str]) -> tuple[list[tuple[Path, Path]], int]:
    """(source, destination) for every image directly in val_dir, and how many labels had no image."""
    if not val_dir.is_dir():
        raise PrepareError(f"validation folder {val_dir} does not exist")
    images = sorted(p for p in val_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    unlabelled = [p.name for p in images if p.stem not in labels]
    if unlabelled:
        raise PrepareError(f"{len(unlabelled)} images in {val_dir} have no label, "
                           f"e.g. {', '.join(unlabelled[:3])}")
    moves = [(p, val_dir / labels[p.stem] / p.name) for p in images]
    taken = [str(dst) for _, dst in moves if dst.exists()]
    if taken:
        raise PrepareError(f"refusing to overwrite {len(taken)} existing files, e.g. {taken[0]}")
    return moves, len(labels) - len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sort ImageNet's flat val folder into class folders.")
    parser.add_argument("val_dir", type=Path, help="folder holding the validation images")
    parser.add_argument("--labels", type=Path, required=True,
                        help="LOC_val_solution.csv or a 'filename class' text file")
    parser.add_argument("--dry-run", action="store_true", help="show what would happen, change nothing")
    parser.add_argument("--copy", action="store_true", help="copy instead of moving")
    args = parser.parse_args(argv)

    try:
        moves, missing = plan_moves(args.val_dir, read_labels(args.labels))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = sorted({dst.parent.name for _, dst in moves})
    verb = "copy" if args.copy else "move"
    if missing:
        print(f"note: {missing} labelled images are not in {args.val_dir} (already sorted?); skipped")
    if args.dry_run:
        for src, dst in moves[:5]:
            print(f"would {verb} {src} -> {dst}")
        print(f"dry run: would {verb} {len(moves)} images into {len(classes)} class folders")
        return 0
    for src, dst in moves:
        dst.parent.mkdir(exist_ok=True)
        if args.copy:
            shutil.copy2(src, dst)
        else:
            src.rename(dst)  # same folder tree, so a rename: fast and atomic
    done = "copied" if args.copy else "moved"
    print(f"{done} {len(moves)} images into {len(classes)} class folders under {args.val_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
