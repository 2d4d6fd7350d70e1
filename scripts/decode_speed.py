"""What each step of the fast CPU data path buys: one training sample (file -> augmented uint8 tensor) per
call, in one process on one thread, timed in CPU time, for torchvision's reference preset, mbv2's loader
before the fast path, and the fast path with its steps added one at a time.

The variants run in interleaved rounds over the same JPEGs, so background load hits them alike; the table
gives the median over rounds and the spread. Usage, from the repository root:

    .venv/bin/python scripts/decode_speed.py                  # writes a photo set to a temp folder first
    .venv/bin/python scripts/decode_speed.py --data DIR --rounds 9

DIR is an ImageFolder of JPEGs (``mbv2 data photos DIR`` writes one); its training split is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from mbv2train import devices, rng
from mbv2train.config import DataConfig
from mbv2train.data import build_loaders, decode, folders, loaders, transforms
from mbv2train.data.loaders import SeededDataset


def reference_preset(cfg: DataConfig) -> v2.Compose:
    """torchvision's classification reference (presets.py): crop, flip, float, normalize on a PIL image."""
    return v2.Compose([v2.RandomResizedCrop(cfg.image_size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])


def reference_sample(cfg: DataConfig):
    """The reference's sample: PIL open and convert to RGB (torchvision's pil_loader), then the preset."""
    pipeline = reference_preset(cfg)

    def sample(path: str, seed: int) -> torch.Tensor:
        with Image.open(path) as img:
            return pipeline(img.convert("RGB"))
    return sample


def seeded_old_style(load, transform):
    """mbv2's per-sample seeding before the fast path: torch's generator and Python's random, both saved,
    seeded and restored around every sample."""
    def sample(path: str, seed: int) -> torch.Tensor:
        image = load(path)
        torch_state, py_state = torch.default_generator.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(image)
        finally:
            torch.default_generator.set_state(torch_state)
            random.setstate(py_state)
    return sample


def draw_with_a_new_transform(height: int, width: int, cfg: DataConfig) -> transforms.CropDraw:
    """The crop draw as first written: a v2.RandomResizedCrop built for every sample, its make_params."""
    crop = v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)
    box = crop.make_params([shape_only])
    flip = cfg.hflip > 0 and bool(torch.rand(1) < cfg.hflip)
    return transforms.CropDraw(box["top"], box["left"], box["height"], box["width"], flip)


def tensor_crop(cfg: DataConfig, draw, channels_last: bool):
    """Crop the drawn window of a decoded uint8 tensor, resize it with F.resize, flip it as drawn."""
    interpolation = InterpolationMode[cfg.interpolation.upper()]

    def transform(image: torch.Tensor) -> torch.Tensor:
        box = draw(image.shape[-2], image.shape[-1], cfg)
        window = image[:, box.top:box.top + box.height, box.left:box.left + box.width]
        if channels_last:
            window = window.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        image = F.resize(window, [cfg.image_size] * 2, interpolation=interpolation, antialias=True)
        image = image[0] if channels_last else image
        return F.horizontal_flip(image) if box.flip else image
    return transform


def public_decode_jpeg(path: str) -> torch.Tensor:
    """torchvision.io.decode_jpeg as documented: bytes copied into a tensor, the deprecation-warning wrapper."""
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def variants(cfg: DataConfig, train_dir: Path) -> dict:
    """name -> sample(path, seed); each fast-path row adds one step to the row above it."""
    mbv2_now = SeededDataset(folders.ImageFolderDataset(train_dir), transforms.TrainTransform(cfg), 0,
                             loader=decode.load_image_fast)

    def mbv2_sample(path: str, seed: int) -> torch.Tensor:
        mbv2_now.samples = [(path, 0)]  # the dataset's own __getitem__: seeding, loading, transform
        mbv2_now.seed = seed
        return mbv2_now[(0, 0)][0]

    return {
        "torchvision reference preset (PIL, float out)": reference_sample(cfg),
        "mbv2 before: PIL loader, v2 pipeline, uint8 out": seeded_old_style(
            folders.load_image, transforms.build_train_transform(cfg)),
        "decode_jpeg + crop and resize on the uint8 tensor": seeded_old_style(
            public_decode_jpeg, tensor_crop(cfg, draw_with_a_new_transform, channels_last=False)),
        "+ resize in channels-last memory": seeded_old_style(
            public_decode_jpeg, tensor_crop(cfg, draw_with_a_new_transform, channels_last=True)),
        "+ crop drawn by CropDrawer (no transform built, tensors reused)": seeded_old_style(
            public_decode_jpeg, tensor_crop(cfg, transforms.draw_train_crop, channels_last=True)),
        "+ bytes read in place, decoder op called directly": seeded_old_style(
            decode.load_image_fast, tensor_crop(cfg, transforms.draw_train_crop, channels_last=True)),
        "+ torch's interpolate and flip called directly (TrainTransform)": seeded_old_style(
            decode.load_image_fast, transforms.TrainTransform(cfg)),
        "+ no Python random state (mbv2 now)": mbv2_sample,
    }


def time_round(sample, paths: list[str], seeds: list[int]) -> float:
    """Images per second of this process's CPU time: on a busy machine, wall time would also count the
    time other processes held the core."""
    started = time.process_time()
    for path, seed in zip(paths, seeds):
        sample(path, seed)
    return len(paths) / (time.process_time() - started)


def decode_only(paths: list[str]) -> dict:
    """Decoding alone (img/s): PIL, libjpeg-turbo through torchvision, and PIL with libjpeg's fast integer
    IDCT and plain upsampling (Pillow's draft flag; torchvision has no switch for them)."""
    blobs = [bytes(decode.read_bytes(p)) for p in paths]

    def pil(data, fast=False):
        img = Image.open(io.BytesIO(data))
        if fast:
            img.decoderconfig = (1, 1)  # (scale, draft): draft sets JDCT_FASTEST and no fancy upsampling
        img.load()

    runs = {"PIL": lambda d: pil(d), "torchvision (libjpeg-turbo)": lambda d: decode.decode_jpeg(bytearray(d)),
            "PIL, fast IDCT + upsampling": lambda d: pil(d, fast=True)}
    rates = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            started = time.process_time()
            for data in blobs:
                run(data)
            rates[name].append(len(blobs) / (time.process_time() - started))
    return {name: statistics.median(r) for name, r in rates.items()}


def batch_costs(cfg: DataConfig, train_dir: Path, paths: list[str], seeds: list[int], batch_size: int) -> dict:
    """CPU microseconds per image to collate the transformed images and prepare the batch as the training
    step does on a CPU device (channels-last, float, normalized): default_collate against mbv2's."""
    sample = variants(cfg, train_dir)["+ no Python random state (mbv2 now)"]
    items = [(sample(p, s), 0, "") for p, s in zip(paths[:batch_size], seeds[:batch_size])]
    runtime = devices.Runtime.create(torch.device("cpu"), None, True, cfg.mean, cfg.std)
    collates = {"default_collate": default_collate, "collate_channels_last": loaders.collate_channels_last}
    costs = {name: [] for name in collates}
    for _ in range(5):
        for name, collate in collates.items():
            started = time.process_time()
            images, labels, _ = collate(items)
            runtime.prepare(images, labels)
            costs[name].append((time.process_time() - started) / len(items) * 1e6)
    return {name: statistics.median(c) for name, c in costs.items()}


def loader_rates(cfg: DataConfig, root: Path, rounds: int, batch_size: int, batches: int = 3) -> dict:
    """img/s (CPU time, one thread, no workers) of whole batches: mbv2's training loader (uint8 out, as it
    leaves the loader; the device normalizes) and torchvision's ImageFolder with the reference preset."""
    from torchvision import datasets

    cfg = dataclasses.replace(cfg, root=str(root), num_workers=0, batch_size=batch_size)
    ours = build_loaders(cfg, seed=0)
    reference = DataLoader(datasets.ImageFolder(str(root / "train"), transform=reference_preset(cfg)),
                           batch_size=batch_size, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(0))
    rates = {"mbv2 training loader": [], "reference loader": []}
    for r in range(rounds):
        ours.train_sampler.set_epoch(r)
        for name, loader in (("mbv2 training loader", ours.train), ("reference loader", reference)):
            batches_left, images = iter(loader), 0
            next(batches_left)  # the first batch carries the loader's start
            started = time.process_time()
            for _, batch in zip(range(batches), batches_left):
                images += len(batch[1])
            rates[name].append(images / (time.process_time() - started))
    return {name: statistics.median(r) for name, r in rates.items()}


def draft_share(cfg: DataConfig, paths: list[str], seeds: list[int]) -> float:
    """Share of training crops whose window is at least twice the output on both sides: the only ones
    PIL's draft() (decoding at 1/2, 1/4, 1/8 scale) could speed up."""
    hits = 0
    for path, seed in zip(paths, seeds):
        with Image.open(path) as img:
            width, height = img.size
        torch.default_generator.manual_seed(seed)
        box = transforms.draw_train_crop(height, width, cfg)
        hits += min(box.height, box.width) >= 2 * cfg.image_size
    return hits / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ImageFolder root with a train/ split of JPEGs")
    parser.add_argument("--images", type=int, default=240, help="JPEGs per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64, help="for the collate and whole-loader figures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core, as in a loader worker
    cfg = DataConfig()
    root = args.data
    if root is None:
        from mbv2train.data.demo import write_photo_dataset

        root = Path(tempfile.mkdtemp(prefix="mbv2-photos-")) / "photos"
        write_photo_dataset(root, classes=8, per_class=max(1, math.ceil(args.images / 8)))
    train_dir = root / "train"
    paths = sorted(str(p) for p in train_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.images]
    seeds = [rng.derive_seed(0, rng.SAMPLE, 0, i) for i in range(len(paths))]
    runs = variants(cfg, train_dir)
    for sample in runs.values():  # warm up: imports, caches, the first allocations
        time_round(sample, paths[:20], seeds[:20])
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, sample in runs.items():
            rates[name].append(time_round(sample, paths, seeds))

    print(f"{len(paths)} JPEGs from {train_dir}, {args.rounds} interleaved rounds, 1 thread, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    reference = statistics.median(next(iter(rates.values())))
    print("\n| pipeline (RandomResizedCrop 224 + flip) | img/s per core (median) | spread | vs reference |")
    print("| --- | --- | --- | --- |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / reference:.2f}x |")
    print("\ndecode alone (img/s): " + ", ".join(f"{k} {v:.0f}" for k, v in decode_only(paths).items()))
    print(f"crops at least 2x the output on both sides (where draft() could apply): "
          f"{100 * draft_share(cfg, paths, seeds):.1f}%")
    print("collate + prepare on the CPU (us per image): " + ", ".join(
        f"{k} {v:.0f}" for k, v in batch_costs(cfg, train_dir, paths, seeds, args.batch_size).items()))
    loaders_now = loader_rates(cfg, root, args.rounds, args.batch_size)
    ratio = loaders_now["mbv2 training loader"] / loaders_now["reference loader"]
    print(f"whole loaders, batch {args.batch_size} (img/s per core): "
          + ", ".join(f"{k} {v:.0f}" for k, v in loaders_now.items()) + f"; ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
