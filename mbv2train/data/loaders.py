"""Seeded datasets, samplers and DataLoaders for ImageNet-style folders (root/<split>/<class>/<image>).

Batches leave the workers as (uint8 images (N, 3, H, W), int64 labels, paths of unreadable files that
were replaced, "" for the others; see SeededDataset). Every random draw of a sample is seeded from
(seed, epoch, index), so the augmented images do not depend on the number of workers or on where a run
was resumed.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import datasets

from mbv2train import rng
from mbv2train.config import DEFAULT_WORKERS, DataConfig
from mbv2train.data.decode import load_image_fast
from mbv2train.data.encoded import collate_encoded, leave_jpegs_encoded
from mbv2train.data.folders import ImageFolderDataset, check_split, load_image, resolve_dirs
from mbv2train.data.gpu_decode import BatchDecoder, DeviceDecodingLoader
from mbv2train.data.transforms import TrainTransform, ValTransform
from mbv2train.distributed import gather_objects
from mbv2train.errors import DataError
from mbv2train.preemption import ignore_in_worker
from mbv2train.progress import is_main_process
from mbv2train.words import is_or_are, plural
from mbv2train.shortlist import differences

# ---------------------------------------------------------------- dataset and sampler

class SeededDataset(Dataset):
    """Indexed by (epoch, index); the augmentation of a sample depends only on (seed, epoch, index).

    An item is ``(uint8 image, label, bad)``: ``bad`` is "" for a readable sample. With
    ``bad_images="skip"``, an unreadable file is replaced by the next readable sample (index+1, index+2, ...
    wrapping around), image and label both, augmented with the original index's seed, and ``bad`` is the
    unreadable file's path so the training process can warn and count (see BadImageLog). With "error" the
    loader's DataError propagates.
    """

    def __init__(self, folder: datasets.DatasetFolder, transform, seed: int, bad_images: str = "error",
                 max_bad_fraction: float = 1.0, split: str = "train", loader=None):
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', not {bad_images!r}")
        self.samples = folder.samples
        self.classes = folder.classes
        self.root = getattr(folder, "root", "")
        # path -> decoded image, DataError if unreadable; the folder's own (PIL) unless one is given
        self.loader = loader or getattr(folder, "loader", load_image)
        self.transform = transform
        self.seed = seed
        self.bad_images = bad_images
        self.max_bad_fraction = max_bad_fraction
        self.split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, index = key
        path, label = self.samples[index]
        bad = ""
        try:
            image = self.loader(path)
        except DataError:
            if self.bad_images == "error":
                raise
            bad = path
            image, label = self._substitute(index)
        sample_seed = rng.derive_seed(self.seed, rng.SAMPLE, epoch, index)
        # Only torch's CPU generator is seeded: the transforms (ours and torchvision's v2) draw from it
        # alone, never from Python's `random`, whose state costs tens of microseconds to save and seed.
        # torch.manual_seed would also touch CUDA and cost ~0.3 ms.
        cpu = torch.default_generator
        if get_worker_info() is not None:  # a worker process: nothing else draws from its generator
            cpu.manual_seed(sample_seed)
            return self.transform(image), label, bad
        # With num_workers=0 this runs in the training process, so the state is put back afterwards:
        # loading data must never shift dropout or init draws.
        state = cpu.get_state()
        cpu.manual_seed(sample_seed)
        try:
            image = self.transform(image)
        finally:
            cpu.set_state(state)
        return image, label, bad

    def _substitute(self, index: int) -> tuple[Union[torch.Tensor, Image.Image], int]:
        """Image and label of the first readable sample after ``index`` (wrapping around)."""
        n = len(self.samples)
        # A run of consecutive unreadable files is that many distinct bad files; once it is longer than
        # max_bad_fraction allows, BadImageLog would stop the run anyway, so stop searching here instead of
        # walking a dataset that is mostly broken once for every sample.
        allowed = int(self.max_bad_fraction * n)
        failed = 1
        for step in range(1, n):
            path, label = self.samples[(index + step) % n]
            try:
                return self.loader(path), label
            except DataError:
                failed += 1
                if failed > allowed and failed < n:
                    first = self.samples[index][0]
                    raise DataError(
                        f"{failed} of {n} {self.split} images are unreadable ({first} and "
                        f"{plural(failed - 1, 'file')} after it), more than data.max_bad_fraction "
                        f"{self.max_bad_fraction:g} allows ({allowed}); run `mbv2 data check {self.root}`") from None
        raise DataError(f"none of the {n} {self.split} images in {self.root} can be read; "
                        f"run `mbv2 data check {self.root}`")


class BadImageLog:
    """Main-process record of the unreadable files the loader skipped (``bad`` lists of its batches).

    Warns once per distinct file over the whole run, counts substitutions per epoch, and raises DataError
    once more than ``max_fraction`` of the split's files have turned out unreadable: a few broken files
    are noise, many mean a broken copy of the dataset that should not be trained on silently.

    Under torchrun (``processes`` > 1) each process meets the bad files of its own shard only, and a file
    may fall to another process in the next epoch: the processes pool the files they found at points all
    of them reach (``share``, a collective), and there all of them decide alike, so that every one stops
    with the same line. In a single process ``record`` decides at once.
    """

    def __init__(self, split_size: int, max_fraction: float, split: str, folder: str | Path | None = None,
                 processes: int = 1):
        self.split_size = split_size
        self.max_fraction = max_fraction
        self.split = split
        self.folder = folder
        self.processes = processes
        self.seen: set[str] = set()  # every process's bad files, as of the last share
        self.unshared: dict[str, None] = {}  # this process's new ones since then, in the order met
        self.epoch_count = 0

    def start_epoch(self) -> None:
        self.epoch_count = 0

    def record(self, paths: Sequence[str]) -> None:
        for path in paths:
            if not path:
                continue
            self.epoch_count += 1
            if path not in self.seen:
                self.unshared[path] = None
        if self.processes == 1:
            self.share()

    def share(self) -> None:
        """Pool the bad files every process found since the last call, warn about the new ones and raise
        DataError past ``max_fraction``. Under torchrun a collective: every process calls it at the same
        points (log steps and an epoch's end; the end of a validation pass)."""
        mine, self.unshared = list(self.unshared), {}
        for found in (gather_objects(mine) if self.processes > 1 else [mine]):
            for path in found:
                if path not in self.seen:
                    self.seen.add(path)
                    if is_main_process():  # each file is warned about once per run, by rank 0
                        print(f"warning: skipped unreadable image {path}", file=sys.stderr, flush=True)
        if len(self.seen) > self.max_fraction * self.split_size:
            folder = self.folder if self.folder is not None else Path(sorted(self.seen)[0]).parent.parent
            raise DataError(f"{len(self.seen)} of {self.split_size} {self.split} images "
                            f"{is_or_are(len(self.seen))} unreadable, "
                            f"more than data.max_bad_fraction {self.max_fraction:g}; "
                            f"run `mbv2 data check {folder}`")


class EpochSampler(Sampler):
    """Yields (epoch, index) for this rank; call set_epoch(epoch) before every epoch.

    Each epoch has one global order (a permutation seeded by (seed, epoch)), the same for any number of
    processes. Rank r takes positions r, r + world_size, ... of it, so the processes' batches together take
    consecutive slices of the order: after any number of steps the samples consumed are a prefix of it, and
    a resume, on this number of processes or another (rescale.py), continues from that position.

    Training (drop_last=True): the order is truncated to a multiple of world_size so every rank runs the
    same number of steps. Validation (shuffle=False, drop_last=False): rank r takes r, r+world_size, ...
    without padding, so each image is counted exactly once over all ranks.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # samples of the epoch's global order already consumed by all ranks (mid-epoch resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start epoch ``epoch`` at position ``start`` of its global order (a multiple of world_size)."""
        if start % self.world_size:
            raise ValueError(f"start {start} is not a multiple of the world size {self.world_size}")
        self.epoch = epoch
        self.start = start

    def _end(self) -> int:
        return self.num_samples // self.world_size * self.world_size if self.drop_last else self.num_samples

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self._end(), self.world_size))

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(rng.derive_seed(self.seed, rng.SHUFFLE, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        mine = order[self.start + self.rank:self._end():self.world_size]
        return iter([(self.epoch, i) for i in mine])


# ---------------------------------------------------------------- loaders

@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: EpochSampler
    classes: list[str]
    train_dir: Path
    val_dir: Path


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)  # once per process, not once per loader
def _warn_workers_capped(requested: int, available: int) -> None:
    print(f"warning: data.num_workers is {requested} but only {plural(available, 'CPU')} "
          f"{is_or_are(available)} available; using {plural(available, 'worker')}", file=sys.stderr, flush=True)


def worker_count(requested: Optional[int]) -> int:
    """data.num_workers, but no more than the CPUs there are: more workers than CPUs only compete with each
    other and the training process. Every sample is seeded from its index, so the count never changes
    what is trained on. Unset, it is DEFAULT_WORKERS or the CPUs when fewer, quietly: the warning is for
    a number somebody chose."""
    available = available_cpus()
    if requested is None:
        return min(DEFAULT_WORKERS, available)
    if requested > available:
        _warn_workers_capped(requested, available)
        return available
    return requested


def _loader_options(cfg: DataConfig, device_type: str) -> dict:
    workers = worker_count(cfg.num_workers)
    options = {"num_workers": workers, "pin_memory": device_type == "cuda" and cfg.pin_memory}
    if workers > 0:  # DataLoader rejects these without workers
        # Workers ignore stop signals: the main process finishes its step, saves, and then ends them.
        options.update(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor,
                       worker_init_fn=ignore_in_worker)
    return options


def collate_channels_last(items: Sequence[tuple[torch.Tensor, int, str]]):
    """default_collate for SeededDataset items, with the images stacked into channels-last memory: (uint8
    images (N, 3, H, W) with strides (HW3, 1, W3, 3), int64 labels, bad paths).

    The transforms leave images channels-last (decoded JPEGs, PILToTensor's output), so the stack is one
    plain copy per image instead of a scatter into planes, and the device step's reorder to channels_last
    (devices.Runtime.prepare) finds nothing left to do. Pinning and the copy to the device keep the strides."""
    images = default_collate([image.permute(1, 2, 0) for image, _, _ in items])  # (N, H, W, 3); shared
    labels, bad = default_collate([item[1:] for item in items])  # memory in a worker, as default_collate's
    return images.permute(0, 3, 1, 2), labels, bad


def data_loader(dataset: SeededDataset, cfg: DataConfig, train: bool, device_type: str, **options):
    """DataLoader over ``dataset`` (a SeededDataset, or anything with its items, ``loader`` and ``transform``,
    such as predict.py's file list). With data.decode: device, JPEGs leave the workers encoded with their
    random draws, and the loader decodes each batch in the training process (data/gpu_decode.py)."""
    if cfg.decode != "device":
        return DataLoader(dataset, collate_fn=collate_channels_last, **options, **_loader_options(cfg, device_type))
    loader = DataLoader(leave_jpegs_encoded(dataset, cfg, train), collate_fn=collate_encoded, **options,
                        **_loader_options(cfg, device_type))
    return DeviceDecodingLoader(loader, BatchDecoder(cfg, train, device_type, cfg.bad_images))


def build_val_loader(cfg: DataConfig, val_dir: Path, rank: int = 0, world_size: int = 1,
                     device_type: str = "cpu", batch_size: Optional[int] = None, shuffle_seed: Optional[int] = None
                     ) -> tuple[DataLoader, list[str]]:
    """Validation loader over ``val_dir`` (every image once over all ranks) and its class names; with
    ``shuffle_seed``, in that seed's random order rather than the folder's (a sample of it then spans
    every class: int8 calibration takes its images so)."""
    val_dir = Path(val_dir).expanduser()
    check_split(val_dir, "validation")
    folder = ImageFolderDataset(val_dir)
    # The val transform is deterministic, so the seed and the epoch (always 0) change nothing.
    # JPEGs are decoded by libjpeg-turbo and resized on the tensor, other formats by PIL (decode.py).
    dataset = SeededDataset(folder, ValTransform(cfg), seed=0, loader=load_image_fast,
                            bad_images=cfg.bad_images, max_bad_fraction=cfg.max_bad_fraction, split="val")
    sampler = EpochSampler(len(dataset), seed=shuffle_seed or 0, shuffle=shuffle_seed is not None, rank=rank,
                           world_size=world_size, drop_last=False)
    loader = data_loader(dataset, cfg, False, device_type, sampler=sampler, drop_last=False,
                         batch_size=batch_size or cfg.val_batch_size or cfg.batch_size)
    return loader, folder.classes


def build_loaders(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                  device_type: str = "cpu") -> Loaders:
    """Training and validation loaders for one process of ``world_size``."""
    train_dir, val_dir = resolve_dirs(cfg)
    folder = ImageFolderDataset(train_dir)
    if len(folder) // world_size < cfg.batch_size:
        raise DataError(f"training folder {train_dir} has {plural(len(folder), 'image')}, fewer than one batch "
                        f"(data.batch_size {cfg.batch_size} x {plural(world_size, 'process')}); "
                        f"lower data.batch_size")
    val_loader, val_classes = build_val_loader(cfg, val_dir, rank, world_size, device_type)
    if val_classes != folder.classes:
        raise DataError(f"class folders differ between {train_dir} ({len(folder.classes)}) and {val_dir} "
                        f"({len(val_classes)}): {differences('train', folder.classes, 'val', val_classes)}")

    dataset = SeededDataset(folder, TrainTransform(cfg), seed, loader=load_image_fast,
                            bad_images=cfg.bad_images, max_bad_fraction=cfg.max_bad_fraction, split="train")
    sampler = EpochSampler(len(dataset), seed, shuffle=True, rank=rank, world_size=world_size)
    train_loader = data_loader(dataset, cfg, True, device_type, batch_size=cfg.batch_size, sampler=sampler,
                               drop_last=True)
    return Loaders(train_loader, val_loader, sampler, folder.classes, train_dir, val_dir)
