"""`mbv2 predict`: the top-k classes of image files, by a training checkpoint, with its class names and
its validation preprocessing.

The files go through the validation loader's code (data.loaders.data_loader: the same reading, JPEG
decoding and ValTransform, or the device decoder with data.decode: device) and through the forward pass
that evaluate uses (loop.eval_logits), with the weights eval would pick (evaluation.load_model); so a
file's top-1 here is the prediction `mbv2 eval` counts for it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from mbv2train.evaluate import loop
from mbv2train.config import preflight
from mbv2train.data.decode import load_image_fast
from mbv2train.data.folders import is_image_file, load_image
from mbv2train.data.loaders import EpochSampler, data_loader
from mbv2train.data.transforms import ValTransform
from mbv2train.errors import ConfigError, DataError
from mbv2train.evaluate.evaluation import SAVED_CONFIG, EvalRequest, load_model, preprocessing_line, preprocessing_of
from mbv2train.progress import Progress
from mbv2train.words import plural

DEFAULT_TOPK = 5


@dataclass
class PredictRequest:
    ckpt: Path
    paths: Sequence[Path]  # image files, or folders searched recursively for images
    topk: Optional[int] = None  # None: DEFAULT_TOPK, or every class when the model has fewer
    batch_size: Optional[int] = None  # default: the checkpoint's val batch size
    ema: Optional[bool] = None  # as mbv2 eval: None takes the weights that picked best.pt
    device: Optional[str] = None  # auto, cpu, cuda; default: the checkpoint's train.device


@dataclass
class Prediction:
    path: str
    topk: list[tuple[str, int, float]]  # (class name, class index, probability), most probable first


def find_images(paths: Sequence[Path]) -> list[str]:
    """The files named and the images under the folders named, in the order given (each folder's in
    sorted order, hidden folders left out, as ImageFolder orders a split).

    Symbolic links are followed, but each folder is listed once and each file is taken once, under the first
    name met: a link back to a parent folder ends there instead of repeating the tree below it, and two
    names of one image (links, or a file named twice) are one prediction. A file named explicitly is taken
    whatever its extension (its reading decides); DataError for a path that does not exist or a folder
    without images."""
    found: list[str] = []
    for path in paths:
        preflight.require_exists(path)
        if path.is_dir():
            images = _images_under(path)
            if not images:
                raise DataError(f"no images in {path} or below it ({' '.join(IMG_EXTENSIONS)})")
            found += images
        else:
            found.append(str(path))
    first_name = {}
    for name in found:
        first_name.setdefault(_identity(name), name)
    return list(first_name.values())


def _identity(path: str):
    """What two names of one file or folder share: its device and inode (the name itself for a link that
    leads nowhere, which the loader then reports as unreadable)."""
    try:
        stat = os.stat(path)
    except OSError:
        return path
    return stat.st_dev, stat.st_ino


def _images_under(folder: Path) -> list[str]:
    images = []
    listed = {_identity(str(folder))}
    for root, dirs, files in os.walk(folder, followlinks=True):
        # pruned before the walk goes down: a folder met again (through a link) is not listed again
        unseen = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            identity = _identity(os.path.join(root, name))
            if identity not in listed:
                listed.add(identity)
                unseen.append(name)
        dirs[:] = unseen
        images += [os.path.join(root, name) for name in sorted(files) if is_image_file(name)]
    return images


class FileDataset(Dataset):
    """The files to predict, with SeededDataset's items: ``(uint8 image, index, why)``, indexed by (epoch,
    index). ``why`` is "" for a readable file; for an unreadable one it is the reason, and the image a
    blank of the right size, so that the batch still forms and the other files in it are predicted."""

    def __init__(self, paths: list[str], transform, crop: int):
        self.paths = paths
        self.loader = load_image_fast  # replaced by the encoded reader with data.decode: device
        self.transform = transform
        self.blank = torch.zeros((3, crop, crop), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        _, index = key
        try:
            image = self.loader(self.paths[index])
        except DataError as exc:
            return self.blank, index, str(exc)
        return self.transform(image), index, ""


def _reason(path: str) -> str:
    """Why a file the device decoder gave up on is unreadable, in the words of the PIL loader, which
    had the last word there too (gpu_decode.BatchDecoder); read again, for the few files that fail."""
    try:
        load_image(path)
    except DataError as exc:
        return str(exc)
    return f"cannot read image {path}"


def predict(req: PredictRequest, on_prediction: Callable[[Prediction], None],
            on_unreadable: Callable[[str], None], on_note: Callable[[str], None] = lambda line: None) -> int:
    """Predict every image of ``req.paths`` in order, calling ``on_prediction`` for each readable one as its
    batch finishes and ``on_unreadable(reason)`` for each other one; returns the number of unreadable files.
    ``on_note`` hears the preprocessing when it is not a training checkpoint's own (an export's JSON).

    Bad input (a missing path, a file that is not a training checkpoint, --topk out of range) raises a
    UserError before any image is read."""
    if req.topk is not None and req.topk < 1:
        raise ConfigError(f"--topk {req.topk}: must be at least 1")
    loaded = load_model(EvalRequest(ckpt=req.ckpt, ema=req.ema, batch_size=req.batch_size, device=req.device),
                        classes_needed="mbv2 predict")
    if loaded.preprocessing_from != SAVED_CONFIG:
        on_note(preprocessing_line(preprocessing_of(loaded)))
    classes = loaded.classes
    # a default that a small model cannot meet would make the command fail unasked; a number asked for is kept
    topk = min(DEFAULT_TOPK, len(classes)) if req.topk is None else req.topk
    if topk > len(classes):
        raise ConfigError(f"--topk {topk}: the checkpoint's model has {plural(len(classes), 'class')}; "
                          f"choose 1 to {len(classes)}")
    paths = find_images(req.paths)

    cfg = loaded.cfg.data
    # "skip" for the device decoder: a JPEG it cannot decode is then reported in the batch's bad paths
    # (and replaced by a neighbour, whose result is dropped) instead of stopping the whole command.
    loader_cfg = dataclasses.replace(cfg, bad_images="skip")
    dataset = FileDataset(paths, ValTransform(cfg), cfg.val_crop)
    batch_size = cfg.val_batch_size or cfg.batch_size
    sampler = EpochSampler(len(paths), seed=0, shuffle=False, drop_last=False)
    loader = data_loader(dataset, loader_cfg, False, loaded.device.type, sampler=sampler, batch_size=batch_size,
                         drop_last=False)
    position_of = {path: i for i, path in enumerate(paths)}
    batches = len(loader)
    # A bar on a terminal only: redirected, stderr carries nothing but the warnings, which scripts read
    progress = Progress(batches, "predict", log_every=batches, enabled=batches > 1 and sys.stderr.isatty(),
                        stream=sys.stderr)
    unreadable = 0
    start = 0
    with torch.inference_mode():
        for images, indices, why in loader:
            count = len(indices)
            # the dataset's reasons, one per image; then the files the device decoder could not read
            failed = {start + k: reason for k, reason in enumerate(why[:count]) if reason}
            failed.update({position_of[path]: _reason(path) for path in why[count:]})
            images, _ = loaded.runtime.prepare(images, indices)
            logits = loop.eval_logits(loaded.model, images, loaded.runtime)
            # ranked by the logits, as evaluate ranks them: probabilities can round two close logits equal
            top = logits.topk(topk, dim=1).indices
            probs = logits.softmax(1).gather(1, top)
            for k, (ranked, p) in enumerate(zip(top.tolist(), probs.tolist())):
                i = start + k
                if i in failed:
                    unreadable += 1
                    on_unreadable(failed[i])
                else:
                    on_prediction(Prediction(paths[i], [(classes[c], c, prob) for c, prob in zip(ranked, p)]))
            start += count
            progress.update()
    progress.close()
    return unreadable
