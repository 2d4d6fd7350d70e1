"""`mbv2 bench data`: how fast the training loader feeds a step, against torchvision's reference pipeline.

Both pipelines read the same training folder with the same batch size and worker count, and each batch
is copied to the device, as training does before its step. What each loader yields is what it hands the
step: mbv2's are uint8 images (with ``data.decode: device`` decoded from the JPEG bytes in this process,
on the device), normalized later on the device as part of the step, which `mbv2 bench model` and `mbv2
bench train` measure; the reference's are normalized float images, converted in its workers. They
are measured in alternating rounds, so background load hits both alike, and each round starts its
workers afresh and skips its first batches (worker start-up, caches). With no workers the one process
runs on one thread, as a worker does, so the figure is per core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from mbv2train.bench.common import rate, say, synchronize, torch_threads
from mbv2train.config import Config, DataConfig
from mbv2train.data import available_cpus, build_loaders
from mbv2train.errors import DataError
from mbv2train.devices import resolve_device
from mbv2train.words import plural

ROUNDS = 3


def reference_loader(train_dir, cfg: DataConfig, workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """torchvision's classification reference preset for training (references/classification/presets.py):
    PIL decoding, RandomResizedCrop, flip, and float conversion and normalization in the workers."""
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                  interpolation=InterpolationMode[cfg.interpolation.upper()], antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    dataset = datasets.ImageFolder(str(train_dir), transform=v2.Compose(steps))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def _time_batches(loader, consume, device: torch.device, warmup: int, count: int) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds of this process) for ``count`` batches after ``warmup`` untimed ones,
    from a fresh iterator."""
    batches = iter(loader)
    try:
        for _ in range(warmup):
            consume(next(batches))
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        images = 0
        for _ in range(count):
            batch = next(batches)
            consume(batch)
            images += len(batch[1])
        synchronize(device)
        return images, time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        # Without persistent workers this shuts the workers down now, before the other pipeline's turn.
        del batches


def bench_data(cfg: Config, batches: int | None = None, reference: bool = True) -> dict:
    """Images per second of the training loader (and of the reference), as a dict of plain values.

    ``batches``: timed batches per pipeline, split over the rounds; default 10 per round, or 4 per
    worker when that is more: the workers have up to data.prefetch_factor batches each under way when
    the clock starts, which a round must be long against.
    """
    device = resolve_device(cfg.train.device)
    data_cfg = dataclasses.replace(cfg.data, persistent_workers=False)  # each round starts and ends its workers
    loaders = build_loaders(data_cfg, cfg.train.seed, device_type=device.type)
    ours = loaders.train
    workers = ours.num_workers
    warmup = max(1, workers)  # the first batch of each worker carries its start-up
    if batches is None:
        batches = ROUNDS * max(10, 4 * workers)
    rounds = min(ROUNDS, batches)
    per_round = math.ceil(batches / rounds)
    if len(ours) < warmup + per_round:
        raise DataError(f"{loaders.train_dir} gives {plural(len(ours), 'batch')} of {data_cfg.batch_size} per epoch; "
                        f"bench data needs {warmup + per_round} per round ({warmup} warm-up + {per_round} timed): "
                        f"lower --batches or data.batch_size, or use more images")

    def to_device(batch):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    pipelines = {"mbv2": ours}
    if reference:
        pipelines["reference"] = reference_loader(loaders.train_dir, data_cfg, workers, ours.pin_memory,
                                                  cfg.train.seed)
    totals = {name: [0, 0.0, 0.0] for name in pipelines}  # images, seconds, CPU seconds
    per_round_rates = []
    say(f"bench data: {loaders.train_dir}, batch {data_cfg.batch_size}, {data_cfg.image_size} px, "
        f"decode {data_cfg.decode}, {plural(workers, 'worker')}, device {device.type}; {plural(rounds, 'round')} of "
        f"{warmup} warm-up + {plural(per_round, 'timed batch')} per pipeline")
    with torch_threads(1) if workers == 0 else contextlib.nullcontext():
        for r in range(rounds):
            loaders.train_sampler.set_epoch(r + 1)
            names = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))  # alternate who goes first
            this_round = {}
            for name in names:
                images, seconds, cpu_seconds = _time_batches(pipelines[name], to_device, device, warmup, per_round)
                totals[name][0] += images
                totals[name][1] += seconds
                totals[name][2] += cpu_seconds
                this_round[name] = rate(images, seconds)
            per_round_rates.append({"img_per_s": this_round["mbv2"],
                                    "reference_img_per_s": this_round.get("reference")})
            say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v:.0f} img/s" for n, v in this_round.items()))

    ours_rate = rate(*totals["mbv2"][:2])
    ref_rate = rate(*totals["reference"][:2]) if reference else None
    result = {"img_per_s": ours_rate, "img_per_s_per_worker": ours_rate / max(workers, 1),
              "reference_img_per_s": ref_rate,
              "reference_img_per_s_per_worker": ref_rate / max(workers, 1) if reference else None,
              "ratio": ours_rate / ref_rate if reference else None,
              "device": device.type, "decode": data_cfg.decode, "workers": workers,
              "threads": 1 if workers == 0 else torch.get_num_threads(), "cpus": available_cpus(),
              "batch_size": data_cfg.batch_size, "image_size": data_cfg.image_size,
              "batches": rounds * per_round, "warmup_batches": warmup, "rounds": per_round_rates,
              "data": str(loaders.train_dir)}
    if workers == 0:
        # Per CPU-second of this process, which other programs on the machine lower much less than the clock.
        ours_cpu = rate(totals["mbv2"][0], totals["mbv2"][2])
        ref_cpu = rate(totals["reference"][0], totals["reference"][2]) if reference else None
        result.update(cpu_img_per_s=ours_cpu, reference_cpu_img_per_s=ref_cpu,
                      cpu_ratio=ours_cpu / ref_cpu if reference and ref_cpu else None)
    return result


def format_data_result(result: dict) -> str:
    per = "per core" if result["workers"] == 0 else "per worker"
    lines = [f"training loader ({result['decode']} decode, {plural(result['workers'], 'worker')}, {result['device']}): "
             f"{result['img_per_s']:.0f} img/s, {result['img_per_s_per_worker']:.0f} img/s {per}"]
    if result["reference_img_per_s"] is not None:
        lines.append(f"torchvision reference preset: {result['reference_img_per_s']:.0f} img/s, "
                     f"{result['reference_img_per_s_per_worker']:.0f} img/s {per}")
        spread = [r["img_per_s"] / r["reference_img_per_s"] for r in result["rounds"]]
        lines.append(f"ratio: {result['ratio']:.2f}x (rounds {min(spread):.2f}x-{max(spread):.2f}x)"
                     + (f"; per CPU-second {result['cpu_ratio']:.2f}x" if result.get("cpu_ratio") else ""))
    lines.append(f"batch {result['batch_size']}, {result['image_size']} px, {plural(result['batches'], 'timed batch')} "
                 f"each, {plural(result['cpus'], 'CPU')}")
    return "\n".join(lines)
