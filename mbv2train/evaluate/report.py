"""Per-class results from a confusion matrix: per-class top-1 and image counts, the most confused class
pairs, the CSV files and picture of `mbv2 eval --report`, and the summary TensorBoard shows per epoch.

A confusion matrix here is an integer tensor (classes, classes): row = true class, column = top-1
prediction, each cell a count of images. Counts (not fractions) are what processes can sum under torchrun
(evaluate/loop.py reduces it); everything else is derived from them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import torch

from mbv2train.errors import UserError

PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
MOST_CONFUSED = 10  # pairs listed in the summary
PNG_LABELS_UP_TO = 50  # classes; more tick labels than this are unreadable, so they are left off


def per_class(confusion: torch.Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per class: its name, index, images, correctly classified images and top-1 (None when the
    class has no image)."""
    images, correct = confusion.sum(1).tolist(), confusion.diagonal().tolist()
    return [{"class": name, "index": i, "images": images[i], "correct": correct[i],
             "top1": correct[i] / images[i] if images[i] else None} for i, name in enumerate(classes)]


def most_confused(confusion: torch.Tensor, classes: Sequence[str], count: int = MOST_CONFUSED
                  ) -> list[dict[str, Any]]:
    """The ``count`` largest off-diagonal cells, largest first (ties: by true, then predicted class
    index): images of class ``true`` predicted as ``predicted``, and that as a fraction of the class."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    # a stable sort on the count: equal counts keep the order of their flat index, i.e. true then predicted
    order = torch.argsort(-flat, stable=True)[:count].tolist()
    totals = confusion.sum(1).tolist()
    size = confusion.shape[1]
    return [{"true": classes[i // size], "predicted": classes[i % size], "count": int(flat[i]),
             "fraction": int(flat[i]) / totals[i // size]} for i in order if flat[i] > 0]


def summarize(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """What --per-class adds to the result: ``per_class`` and ``confused``."""
    return {"per_class": per_class(confusion, classes), "confused": most_confused(confusion, classes)}


# ---------------------------------------------------------------- text

def _percent(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def per_class_lines(summary: dict[str, Any]) -> list[str]:
    """The per-class table and the most confused pairs, as console lines."""
    width = max([len("class")] + [len(row["class"]) for row in summary["per_class"]])
    lines = [f"{'class':<{width}}  {'images':>7}  {'top-1':>7}"]
    lines += [f"{row['class']:<{width}}  {row['images']:>7}  {_percent(row['top1']):>7}"
              for row in summary["per_class"]]
    if summary["confused"]:
        lines.append("most confused (true -> predicted: images, share of the true class):")
        lines += [f"  {c['true']} -> {c['predicted']}: {c['count']} ({c['fraction']:.1%})"
                  for c in summary["confused"]]
    else:
        lines.append("no image was confused with another class")
    return lines


def sweep_lines(sweep: list[dict[str, Any]]) -> list[str]:
    """One row per crop size of an --resolutions sweep."""
    lines = [f"{'crop':>5} {'resize':>6} {'top-1':>7} {'top-5':>7} {'loss':>7} {'images':>7}"]
    lines += [f"{r['crop']:>5} {r['resize']:>6} {r['top1']:>7.4f} {r['top5']:>7.4f} {r['loss']:>7.4f} "
              f"{r['images']:>7}" for r in sweep]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables, for TensorBoard's text tab."""
    lines = ["| class | images | top-1 |", "| --- | --- | --- |"]
    lines += [f"| {row['class']} | {row['images']} | {_percent(row['top1'])} |" for row in summary["per_class"]]
    if summary["confused"]:
        lines += ["", "| true | predicted | images | share |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['true']} | {c['predicted']} | {c['count']} | {c['fraction']:.4f} |"
                  for c in summary["confused"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- files

def write_report(folder: Path, confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Write per_class.csv, confusion.csv and (with matplotlib) confusion.png into ``folder``.

    Returns {"dir": folder, "files": [names written], "notes": [lines to tell the user]}."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_per_class_csv(folder / PER_CLASS_CSV, per_class(confusion, classes))
        _write_confusion_csv(folder / CONFUSION_CSV, confusion, classes)
    except OSError as exc:
        raise UserError(f"--report {folder}: cannot write the report: {exc.strerror or exc}") from None
    files, notes = [PER_CLASS_CSV, CONFUSION_CSV], []
    try:
        import matplotlib  # noqa: F401 - an optional extra; the CSV files are the report without it
    except ImportError:
        notes.append(f"{CONFUSION_PNG} skipped: it needs matplotlib (pip install 'mbv2train[report]')")
    else:
        _write_confusion_png(folder / CONFUSION_PNG, confusion, classes)
        files.append(CONFUSION_PNG)
    return {"dir": str(folder), "files": files, "notes": notes}


def _write_per_class_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "index", "images", "correct", "top1"])
        for row in rows:
            top1 = "" if row["top1"] is None else f"{row['top1']:.6f}"
            writer.writerow([row["class"], row["index"], row["images"], row["correct"], top1])


def _write_confusion_csv(path: Path, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    """A square table: the header row names the predicted classes, the first column the true ones."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion.tolist()):
            writer.writerow([name, *row])


def _write_confusion_png(path: Path, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    """Each row divided by its class's image count, so that classes of any size read alike."""
    # the optional report extra; Figure without pyplot: no GUI backend, no global state
    from matplotlib.figure import Figure

    counts = confusion.double()
    rows = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    n = len(classes)
    side = min(max(4.0, 0.3 * n + 2), 30.0)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= PNG_LABELS_UP_TO:
        ax.set_xticks(range(n), labels=list(classes), rotation=90)
        ax.set_yticks(range(n), labels=list(classes))
    top1 = counts.diagonal().sum().item() / max(counts.sum().item(), 1)
    ax.set_title(f"confusion matrix: {n} classes, top-1 {top1:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100 if n <= 200 else 50)
