"""The engine of ``mbv2 data check DIR``: find what would stop or quietly spoil a run, before it starts.

A broken file usually surfaces hours into an epoch; this scan decodes every image once, with all cores,
exactly as training would (``folders.load_image``), and checks the folder layout the loaders expect. The
report is a plain dict (JSON-able); ``format_report`` turns it into lines for people.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from mbv2train.data import folders
from mbv2train.words import plural
from mbv2train.shortlist import differences, shortlist
from mbv2train.config.preflight import for_data_check

__all__ = ["ERROR_KINDS", "PROBLEM_KINDS", "WARNING_KINDS", "check_dataset", "format_report", "severity"]

# Errors: training would stop on them, or silently lose the file (a class or split it never sees).
ERROR_KINDS = ("unreadable", "empty_class", "flat_split", "empty_split", "missing_split", "class_mismatch")
# Warnings: training reads the file fine, but other tools may stumble on it. They leave a report ok, so that
# a check in a script does not fail on a dataset that trains; --strict fails on them too.
WARNING_KINDS = ("extension_mismatch",)
PROBLEM_KINDS = ERROR_KINDS + WARNING_KINDS

# What PIL calls the content each image extension promises. MPO is how PIL reports the multi-picture
# JPEGs many cameras write; they decode as ordinary JPEGs.
_FORMATS = {".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",), ".ppm": ("PPM",),
            ".pgm": ("PPM",), ".bmp": ("BMP", "DIB"), ".tif": ("TIFF",), ".tiff": ("TIFF",),
            ".webp": ("WEBP",)}


def severity(kind: str) -> str:
    """"warning" for WARNING_KINDS, "error" for the other problem kinds."""
    return "warning" if kind in WARNING_KINDS else "error"


def _problem(kind: str, path: Path | str, detail: str) -> dict[str, str]:
    return {"kind": kind, "severity": severity(kind), "path": str(path), "detail": detail}


def _note(kind: str, path: Path | str, detail: str) -> dict[str, str]:
    return {"kind": kind, "path": str(path), "detail": detail}


def _inspect(path: str) -> Optional[tuple[str, str]]:
    """(kind, detail) of what is wrong with one image file, or None; runs in the worker processes."""
    try:
        with Image.open(path) as img:
            found = img.format
            folders.to_rgb(img)  # the very decoding training does, load() included: truncation shows here
    except Exception as e:  # noqa: BLE001 - as in folders.load_image: any failure to decode means unreadable
        reason = folders.read_failure(path, e)
        if os.path.basename(path).startswith("._"):
            reason += " (a macOS resource-fork file; such ._* files can be deleted)"
        return "unreadable", reason
    ext = os.path.splitext(path)[1].lower()
    expected = _FORMATS.get(ext)
    if expected and found not in expected:
        return "extension_mismatch", (f"{found} data in a {ext} file; it trains fine, but tools that "
                                      f"trust the extension may not read it")
    return None


def _scan_split(split_dir: Path) -> tuple[dict, list[str], list[str], list[dict], list[dict]]:
    """(counts, class names, image paths, problems, notes) of one split folder, without decoding."""
    problems, notes = [], []
    classes = folders.class_folders(split_dir)
    top_files = sorted(e.name for e in os.scandir(split_dir) if e.is_file())
    if not classes:
        flat = [str(split_dir / name) for name in top_files if folders.is_image_file(name)]
        if flat:
            # ImageNet's validation archive unpacks to 50,000 images in one folder.
            problems.append(_problem("flat_split", split_dir, (
                f"{plural(len(flat), 'image')} but no class folders; if it is ImageNet's flat val folder, sort it "
                f"first: {folders.PREPARE_VAL_HINT} {split_dir} --labels LOC_val_solution.csv")))
        else:
            problems.append(_problem("empty_split", split_dir,
                                     f"no class folders and no images; expected {split_dir}/<class>/<image>"))
        return {"images": len(flat), "classes": 0}, [], flat, problems, notes

    for name in top_files:
        notes.append(_note("ignored_file", split_dir / name, "outside any class folder; training ignores it"))
    images = []
    for name in classes:
        found = 0
        # The same files torchvision's ImageFolder finds: recursive, following links.
        for folder, _, files in sorted(os.walk(split_dir / name, followlinks=True)):
            for file in sorted(files):
                path = os.path.join(folder, file)
                if folders.is_image_file(file):
                    images.append(path)
                    found += 1
                else:
                    notes.append(_note("ignored_file", path, "not an image extension; training ignores it"))
        if not found:
            problems.append(_problem("empty_class", split_dir / name,
                                     f"class folder has no images ({' '.join(folders.IMG_EXTENSIONS)})"))
    return {"images": len(images), "classes": len(classes)}, classes, images, problems, notes


def _inspect_all(paths: list[str], workers: int, progress: Optional[Callable[[int, int], None]]) -> list:
    if workers <= 1 or len(paths) < 2:
        results = map(_inspect, paths)
        pool = None
    else:
        workers = min(workers, len(paths))
        # Chunks amortize the inter-process traffic; small enough that the last chunks balance out.
        chunk = max(1, min(256, len(paths) // (workers * 8)))
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_inspect, paths, chunksize=chunk)
    try:
        out = []
        for done, result in enumerate(results, 1):
            out.append(result)
            if progress is not None and (done % 1000 == 0 or done == len(paths)):
                progress(done, len(paths))
        return out
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def check_dataset(root: Path, workers: int | None = None, train_split: str = "train", val_split: str = "val",
                  progress: Optional[Callable[[int, int], None]] = None, strict: bool = False) -> dict:
    """Scan a dataset root (``root/<train_split>``, ``root/<val_split>``) or one split folder (class folders).

    Every image is decoded in ``workers`` processes (default: all cores). Returns
    {"root", "splits": {name: {"path", "images", "classes"}},
    "problems": [{"kind", "severity", "path", "detail"}], "notes": [...], "errors", "warnings", "strict", "ok"}.
    ok is False when there is an error (ERROR_KINDS), or, with ``strict``, a warning (WARNING_KINDS).
    Notes (kind "ignored_file": files training skips) never make a report not ok. ``progress(done, total)``
    is called now and then while decoding.
    """
    root = for_data_check(root)

    problems, notes = [], []
    split_dirs = {name: root / name for name in (train_split, val_split) if (root / name).is_dir()}
    if split_dirs:
        for name in (train_split, val_split):
            if name not in split_dirs:
                problems.append(_problem("missing_split", root / name,
                                         f"no {name} folder; `mbv2 train --data {root}` needs {root / name}"))
    else:
        split_dirs = {root.name or str(root): root}  # a single split: DIR holds the class folders

    splits, classes, paths = {}, {}, []
    for name, split_dir in split_dirs.items():
        counts, classes[name], images, split_problems, split_notes = _scan_split(split_dir)
        splits[name] = {"path": str(split_dir), **counts}
        paths += images
        problems += split_problems
        notes += split_notes

    for name, split_dir in split_dirs.items():  # before the minutes of decoding
        error = folders.too_few_classes(split_dir, classes[name], "data check:") if classes[name] else None
        if error is not None:
            raise error

    if train_split in split_dirs and val_split in split_dirs:
        train_classes, val_classes = classes[train_split], classes[val_split]
        if train_classes and val_classes and train_classes != val_classes:
            problems.append(_problem("class_mismatch", root, (
                f"class folders differ between {train_split} ({len(train_classes)}) and {val_split} "
                f"({len(val_classes)}): {differences(train_split, train_classes, val_split, val_classes)}")))

    workers = workers if workers is not None else (os.cpu_count() or 1)
    for path, found in zip(paths, _inspect_all(paths, workers, progress)):
        if found is not None:
            problems.append(_problem(found[0], path, found[1]))

    problems.sort(key=lambda p: (p["path"], p["kind"]))
    warnings = sum(p["severity"] == "warning" for p in problems)
    errors = len(problems) - warnings
    return {"root": str(root), "splits": splits, "problems": problems, "notes": notes, "errors": errors,
            "warnings": warnings, "strict": strict, "ok": errors == 0 and not (strict and warnings)}


def format_report(report: dict) -> str:
    """Human-readable report: one line per problem (starting with its severity), a line per split, notes in
    brief, and a summary line: "ok: ..." (clean), "ok (N warnings): ..." or "not ok: ..."."""
    lines = [f"{p['severity']}: {p['kind']}: {p['path']}: {p['detail']}" for p in report["problems"]]
    for name, split in report["splits"].items():
        lines.append(f"{name}: {plural(split['images'], 'image')} in {plural(split['classes'], 'class')} "
                     f"({split['path']})")
    if report["notes"]:
        shown = shortlist([n["path"] for n in report["notes"]], limit=3)  # paths are long: three per line
        lines.append(f"note: {plural(len(report['notes']), 'file')} ignored by training (not images, or outside "
                     f"class folders): {shown}")
    lines.append(_summary_line(report))
    return "\n".join(lines)


def _summary_line(report: dict) -> str:
    root, errors, warnings = report["root"], report["errors"], report["warnings"]
    n_images = sum(s["images"] for s in report["splits"].values())
    if not report["problems"]:
        return f"ok: {root}: {plural(n_images, 'image')}, no problems"
    if report["ok"]:
        return (f"ok ({plural(warnings, 'warning')}): {root}: {plural(n_images, 'image')}; training reads them all "
                f"(--strict fails on warnings)")
    why = " (--strict)" if errors == 0 else ""
    return (f"not ok{why}: {root}: {plural(errors, 'error')}, {plural(warnings, 'warning')} in "
            f"{plural(n_images, 'image')}")
