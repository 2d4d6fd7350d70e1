"""Training throughput of MobileNetV2: mbv2train's step in several precision/memory-format settings,
side by side with a plain PyTorch loop (channels-first, float32), all measured in one run.

Data are synthetic uint8 batches already in memory, so the numbers are the model step alone (data
loading is not measured). Usage, from the repository root after `make test` or `make demo`:

    .venv/bin/python scripts/benchmark.py                     # CPU, batch 32, 224 px, width 1.0
    .venv/bin/python scripts/benchmark.py --device cuda --steps 50 --warmup 10
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from mbv2train import engine
from mbv2train.model import MobileNetV2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class InMemoryLoader:
    """`steps` copies of one uint8 batch, shaped like what the real loader yields."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.labels, ("",) * len(self.labels))] * self.steps)


class ConstantLR:
    def step(self) -> None: ...


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args, device, images, labels) -> float:
    """The reference: the textbook PyTorch loop, channels-first float32, no tricks."""
    model = MobileNetV2(width_mult=args.width_mult).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = (images.float().to(device) / 255 - 0.45) / 0.225
    y = labels.to(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - started)


def mbv2_step(args, device, images, labels, channels_last: bool, amp: str) -> float:
    """mbv2train's own training epoch (engine.train_one_epoch) over in-memory batches."""
    model = MobileNetV2(width_mult=args.width_mult).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    rt = engine.Runtime.create(device, dtype, channels_last, MEAN, STD)
    settings = engine.TrainSettings(seed=0, log_every_steps=10**9)
    for steps, epoch in ((args.warmup, 0), (args.steps, 1)):  # warm-up epoch, then the timed one
        sync(device)
        metrics, _ = engine.train_one_epoch(model, InMemoryLoader(images, labels, steps), optimizer, ConstantLR(),
                                            scaler, rt, settings, epoch=epoch, global_step=0, steps_per_epoch=steps,
                                            done=engine.EpochProgress())
    return metrics["img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, autotuning)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, 1000, (args.batch_size,))

    settings = [("plain loop: channels-first, float32", None, None)]
    settings += [(f"mbv2train: {'channels_last' if cl else 'channels-first'}, {amp if amp != 'none' else 'float32'}",
                  cl, amp) for cl in (False, True) for amp in ("none", "bf16")]
    if device.type == "cuda":
        settings += [("mbv2train: channels_last, fp16", True, "fp16")]

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
                                                                        f"{torch.get_num_threads()} threads"
    print(f"MobileNetV2 {args.width_mult:g}, batch {args.batch_size}, {args.image_size} px, {name}, "
          f"torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up")
    print("| setting | img/s | vs plain loop |" + (" peak memory |" if device.type == "cuda" else ""))
    print("| --- | --- | --- |" + (" --- |" if device.type == "cuda" else ""))
    baseline = None
    for label, channels_last, amp in settings:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if channels_last is None:
            rate = plain_loop(args, device, images, labels)
            baseline = rate
        else:
            rate = mbv2_step(args, device, images, labels, channels_last, amp)
        memory = f" {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |" if device.type == "cuda" else ""
        print(f"| {label} | {rate:.1f} | {rate / baseline:.2f}x |{memory}", flush=True)


if __name__ == "__main__":
    main()
