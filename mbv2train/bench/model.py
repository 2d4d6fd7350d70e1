"""`mbv2 bench model`: the training and inference step alone, on synthetic batches already in memory,
for each precision x memory format (x torch.compile), beside a textbook PyTorch loop.

The training rows run mbv2's own epoch (``train_one_epoch``: uint8 -> float on the device,
per-step reseeding, the non-finite guard, the config's optimizer), so they are what training gets when
data loading keeps up; ``mbv2 bench data`` and ``mbv2 bench train`` measure the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import torch
from torch import nn

from mbv2train import cpu_threads, devices
from mbv2train.train import optim
from mbv2train.train.epoch import EpochProgress, TrainSettings, train_one_epoch
from mbv2train.bench.common import device_name, fmt, keeps_torch_threads, markdown_table, rate, say, synchronize
from mbv2train.config import Config
from mbv2train.errors import ConfigError, UserError
from mbv2train.model import build_model
from mbv2train.words import plural

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = ("contiguous", "channels_last")


def supported_precisions(device: torch.device) -> list[str]:
    """fp32 and bf16 everywhere (bf16 is emulated, and slow, on CPUs without bf16 instructions); fp16 on
    CUDA only, and bf16 there only where the GPU has it."""
    if device.type != "cuda":
        return ["fp32", "bf16"]
    return ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]


class InMemoryLoader:
    """``steps`` times the same uint8 batch, shaped like what the real loader yields."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.labels, ("",) * len(self.labels))] * self.steps)


class ConstantLR:
    def step(self) -> None: ...


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    if device.type == "cuda":  # as the real loader hands them over (data.pin_memory)
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def _fresh_model(cfg: Config, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def reference_rate(cfg: Config, device, images, labels, steps: int, warmup: int) -> float:
    """The textbook loop: channels-first float32, plain SGD, input normalized once beforehand."""
    model = _fresh_model(cfg, device, channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = (images.to(device).float() / 255 - 0.45) / 0.225
    y = labels.to(device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return rate(len(labels) * steps, time.perf_counter() - started)


def train_rate(model, cfg: Config, runtime: devices.Runtime, images, labels, steps: int, warmup: int) -> float:
    """mbv2's training epoch over in-memory batches: an untimed warm-up epoch, then the timed one."""
    optimizer = optim.build_optimizer(model, cfg.optim, len(labels))
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    settings = TrainSettings(seed=0, label_smoothing=cfg.train.label_smoothing, log_every_steps=10**9)
    for epoch, count in ((0, warmup), (1, steps)):
        metrics, _ = train_one_epoch(model, InMemoryLoader(images, labels, count), optimizer, ConstantLR(),
                                            scaler, runtime, settings, epoch=epoch, global_step=0,
                                            steps_per_epoch=count,
                                            epoch_progress=EpochProgress.from_state(None, runtime.device))
    return metrics["img_per_s"]


@torch.inference_mode()
def inference_rate(model, runtime: devices.Runtime, images, labels, steps: int, warmup: int) -> float:
    model.eval()
    x, _ = runtime.prepare(images, labels)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(runtime.device)
            started = time.perf_counter()
        with runtime.autocast():
            model(x)
    synchronize(runtime.device)
    model.train()
    return rate(len(labels) * steps, time.perf_counter() - started)


def setting_name(precision: str, memory_format: str, compiled: bool) -> str:
    return f"{precision}, {memory_format}" + (", compiled" if compiled else "")


def bench_model(cfg: Config, device: torch.device, batch_size: int, steps: int, warmup: int,
                precisions: Optional[Sequence[str]] = None, memory_formats: Sequence[str] = MEMORY_FORMATS,
                compile: bool = False, compile_only: Optional[Sequence[tuple[str, str]]] = None,
                reference: bool = True) -> dict:
    """Training and inference img/s per setting, as a dict of plain values.

    ``compile`` adds a torch.compile'd row per setting (only for the (precision, memory format) pairs in
    ``compile_only`` when given); a compiled row that fails records its error instead of stopping. The steps
    compute with the threads `mbv2 train` would choose without loader workers (cpu_threads.py); the count in
    force before is restored afterwards.
    """
    with keeps_torch_threads():
        cpu_threads.use(cfg.train.threads, 0, say=say)
        return _measure(cfg, device, batch_size, steps, warmup, precisions, memory_formats, compile, compile_only,
                        reference)


def _measure(cfg: Config, device: torch.device, batch_size: int, steps: int, warmup: int,
             precisions: Optional[Sequence[str]], memory_formats: Sequence[str], compile: bool,
             compile_only: Optional[Sequence[tuple[str, str]]], reference: bool) -> dict:
    supported = supported_precisions(device)
    precisions = list(precisions or supported)
    for name in precisions:
        if name not in PRECISIONS:
            raise ConfigError(f"--precision: {name!r} is not one of {', '.join(PRECISIONS)}")
        if name not in supported:
            where = "the CPU (fp16 needs a CUDA GPU)" if device.type != "cuda" else device_name(device)
            raise ConfigError(f"--precision: {name} is not available on {where}; "
                              f"this device has {', '.join(supported)}")
    for name in memory_formats:
        if name not in MEMORY_FORMATS:
            raise ConfigError(f"--memory-format: {name!r} is not one of {', '.join(MEMORY_FORMATS)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does
    if cfg.model.num_classes is None:  # unset means "from the data"; synthetic batches have ImageNet's 1000
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=1000))
    image_size = cfg.data.image_size
    images, labels = synthetic_batch(batch_size, image_size, cfg.model.num_classes, device)

    settings = [(p, f, False) for p in precisions for f in memory_formats]
    if compile:
        settings += [(p, f, True) for p in precisions for f in memory_formats
                     if compile_only is None or (p, f) in compile_only]
    say(f"bench model: MobileNetV2 {cfg.model.width_mult:g}, batch {batch_size}, {image_size} px, "
        f"{device_name(device)}, {plural(steps, 'timed step')} after {warmup} warm-up, "
        f"{plural(len(settings), 'setting')}")
    ref = None
    if reference:
        ref = _guard_memory(lambda: reference_rate(cfg, device, images, labels, steps, warmup), batch_size)
        say(f"reference (plain loop, fp32, contiguous): {ref:.1f} img/s")
    rows = []
    for precision, memory_format, compiled in settings:
        row = {"setting": setting_name(precision, memory_format, compiled), "precision": precision,
               "memory_format": memory_format, "compile": compiled}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        channels_last = memory_format == "channels_last"
        runtime = devices.Runtime.create(device, PRECISIONS[precision], channels_last, cfg.data.mean, cfg.data.std)
        model = _fresh_model(cfg, device, channels_last)
        step_model = torch.compile(model) if compiled else model
        try:  # partial binds this setting's model now; a lambda would read names the loop rebinds and deletes
            row["train_img_per_s"] = _guard_memory(
                functools.partial(train_rate, step_model, cfg, runtime, images, labels, steps, warmup), batch_size)
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["infer_img_per_s"] = _guard_memory(
                functools.partial(inference_rate, step_model, runtime, images, labels, steps, warmup), batch_size)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.compile needs a compiler toolchain; report, go on
            if not compiled:
                raise
            row["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if ref and "train_img_per_s" in row:
            row["vs_reference"] = row["train_img_per_s"] / ref
        rows.append(row)
        say(format_row(row))
        del model, step_model

    done = [row for row in rows if "train_img_per_s" in row]
    fastest = max(done, key=lambda row: row["train_img_per_s"]) if done else None
    return {"img_per_s": fastest["train_img_per_s"] if fastest else None,
            "fastest": fastest["setting"] if fastest else None,
            "reference_img_per_s": ref, "ratio": fastest["train_img_per_s"] / ref if fastest and ref else None,
            "device": device.type, "device_name": device_name(device), "batch_size": batch_size,
            "image_size": image_size, "width_mult": cfg.model.width_mult, "steps": steps, "warmup": warmup,
            "torch": torch.__version__, "rows": rows}


def _guard_memory(measure, batch_size: int):
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"batch {batch_size} does not fit in GPU memory; lower --batch-size") from None


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['setting']}: failed ({row['error']})"
    memory = f", peak {row['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in row else ""
    return (f"{row['setting']}: train {row['train_img_per_s']:.1f} img/s, "
            f"inference {row['infer_img_per_s']:.1f} img/s{memory}")


def format_model_result(result: dict) -> str:
    cuda = result["device"] == "cuda"
    headers = ["setting", "train img/s", "vs plain loop", "inference img/s"] + (["peak memory"] if cuda else [])
    rows = []
    if result["reference_img_per_s"] is not None:
        rows.append(["plain loop: fp32, contiguous", fmt(result["reference_img_per_s"]), "1.00x", "-"]
                    + (["-"] if cuda else []))
    for row in result["rows"]:
        if "error" in row:
            rows.append([row["setting"], f"failed: {row['error']}", "-", "-"] + (["-"] if cuda else []))
            continue
        ratio = f"{row['vs_reference']:.2f}x" if "vs_reference" in row else "-"
        cells = [row["setting"], fmt(row["train_img_per_s"]), ratio, fmt(row["infer_img_per_s"])]
        rows.append(cells + ([f"{row['peak_memory_gib']:.2f} GiB"] if cuda else []))
    title = (f"MobileNetV2 {result['width_mult']:g}, batch {result['batch_size']}, {result['image_size']} px, "
             f"{result['device_name']}, torch {result['torch']}, {plural(result['steps'], 'timed step')} after "
             f"{result['warmup']} warm-up")
    return title + "\n" + markdown_table(headers, rows)
