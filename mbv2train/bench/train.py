"""`mbv2 bench train`: real training steps end to end (loader, step, optimizer, EMA), built as `mbv2
train` builds them, with no run directory, checkpoint or validation; and how much of the time the step
waited for data, with what to change.

A data wait is the time the training process spends blocked on the loader's next batch. On CUDA a
sync-free step queues its kernels and moves on, so the host's clock is the device's only over many steps:
the clock starts after the warm-up steps (worker start-up, cuDNN autotuning, compilation) and a device
synchronization, and stops after the last step's work has finished. With data.decode: device the data wait
includes the decode, and the host's time inside the decode call is reported apart: on CUDA, torchvision
returns from it only once nvJPEG is done.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from mbv2train import data, engine
from mbv2train.bench.common import rate, say, synchronize
from mbv2train.config import Config
from mbv2train.data.gpu_decode import DecodeWait, DeviceDecodingLoader
from mbv2train.devices import resolve_amp, resolve_device
from mbv2train.distributed import DistInfo
from mbv2train.errors import ConfigError
from mbv2train.faults import NO_FAULTS
from mbv2train.preemption import StopFlag
from mbv2train.words import is_or_are, plural

DATA_BOUND_FRACTION = 0.05  # waiting for data longer than this share of the time leaves the device idle

# Host-device synchronizations that torch.cuda.set_sync_debug_mode cannot see, because a library makes them
# in its own C++ code rather than through torch's API, by data.decode.
UNSEEN_SYNCS = {"device": "torchvision's CUDA decode_jpeg waits for its nvJPEG stream (cudaStreamSynchronize) "
                          "before it returns"}


class WaitClock:
    """Wraps a loader and adds up the time spent waiting for its batches while ``counting``."""

    def __init__(self, loader):
        self.loader = loader
        self.waited = 0.0
        self.counting = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        started = time.perf_counter()
        batches = iter(self.loader)  # starts the workers: part of the wait for the epoch's first batch
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            if self.counting:
                self.waited += time.perf_counter() - started
            yield batch
            started = time.perf_counter()


class StepClock:
    """The epoch's after_step hook: starts the clock once the warm-up steps are done, and with
    ``sync_debug`` makes every later step raise on a host-device synchronization (CUDA's sync debug mode),
    except around the chunk's end, where the epoch's totals are read on purpose."""

    def __init__(self, device: torch.device, warmup: int, waits: WaitClock, sync_debug: bool, decoder=None):
        self.device, self.warmup, self.waits, self.sync_debug = device, warmup, waits, sync_debug
        self.decoder = decoder  # the loader's BatchDecoder with data.decode: device
        self.started = None
        self.chunk_end = 0

    def after_step(self, global_step: int, _progress) -> None:
        if global_step == self.warmup:
            synchronize(self.device)
            self.started = time.perf_counter()
            self.waits.counting = True
            if self.decoder is not None:
                self.decoder.waited = DecodeWait()
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("error" if self.warmup <= global_step < self.chunk_end else 0)


def build_run(cfg: Config):
    """What `mbv2 train` builds for a run (loaders, model, optimizer, scheduler, scaler, EMA, runtime),
    without touching its run directory."""
    from mbv2train.trainer import Run

    device = resolve_device(cfg.train.device)
    # speed does not depend on the weights: no model.pretrained file to fetch or read
    return Run(cfg, device, resolve_amp(cfg.train.amp, device), DistInfo(), StopFlag(announce=False), NO_FAULTS,
               pretrained_weights=False)


def verdict(wait_fraction: float, cfg: Config, workers: int, cpus: int, device: torch.device) -> tuple[str, list[str]]:
    """("data-bound" or "compute-bound", what to change)."""
    if wait_fraction < DATA_BOUND_FRACTION:
        return "compute-bound", ["the model step is the limit: `mbv2 bench model` compares precisions, "
                                 "memory formats and torch.compile"]
    advice = []
    if workers < cpus:
        advice.append(f"more loader workers: data.num_workers is {workers} and {plural(cpus, 'CPU')} "
                      f"{is_or_are(cpus)} available")
    if cfg.data.decode == "workers" and device.type == "cuda":
        advice.append("decode JPEGs on the GPU: data.decode=device")
    if cfg.data.auto_augment != "none" or cfg.data.random_erasing > 0:
        advice.append("lighter CPU augmentations (data.auto_augment, data.random_erasing)")
    if not advice:
        advice.append("the loader is at this machine's limit: more CPUs, or faster storage if reading is slow "
                      "(`mbv2 bench data` measures the loader alone)")
    return "data-bound", advice


def sync_findings(sync_error: Optional[str], decode: str) -> dict:
    """What the sync check found: ``sync_error``, the first synchronization sync debug mode raised on;
    ``unseen_sync``, one the steps make that it cannot see; ``sync_free`` only when there is neither."""
    unseen = UNSEEN_SYNCS.get(decode)
    return {"sync_free": sync_error is None and unseen is None, "sync_error": sync_error, "unseen_sync": unseen}


def decode_wait(waited: DecodeWait, elapsed: Optional[float]) -> dict:
    """The host's time inside the decode calls of the timed steps: per batch, and as a share of the time."""
    return {"decode_wait_ms_per_batch": 1000 * waited.seconds / waited.batches if waited.batches else None,
            "decode_wait_frac": waited.seconds / elapsed if elapsed else None}


def bench_train(cfg: Config, steps: int, warmup: int, sync_debug: bool = False) -> dict:
    """Training img/s and the share of time spent waiting for data, over ``steps`` steps after ``warmup``.

    With ``sync_debug`` (CUDA only) the steps after the warm-up run under
    ``torch.cuda.set_sync_debug_mode("error")``: ``sync_free`` says whether none of them synchronized,
    ``sync_error`` names the first call that did, and ``unseen_sync`` one that the debug mode cannot see.
    With data.decode: device, ``decode_wait_ms_per_batch`` and ``decode_wait_frac`` give the host's time
    inside the decode calls.
    """
    if steps < 1 or warmup < 1:
        raise ConfigError("bench train needs --steps and --warmup of at least 1")
    # Workers end with each epoch's iterator. Persistent ones live as long as the loader, which the run's
    # objects can keep until the garbage collector frees them; its shutdown of workers that ignore SIGTERM
    # (preemption.py) can leave them running, and the interpreter's exit then waits for them forever.
    run = build_run(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, persistent_workers=False)))
    cfg, device = run.cfg, run.device
    if sync_debug and device.type != "cuda":
        raise ConfigError("the sync debug check needs a CUDA device")
    settings = dataclasses.replace(run.settings, log_every_steps=10**9)  # no step logging: it reads the loss
    model = torch.compile(run.model) if cfg.train.compile else run.model
    mix = data.build_mix_transform(cfg.data, cfg.model.num_classes)
    waits = WaitClock(run.loaders.train)
    decoder = run.loaders.train.decoder if isinstance(run.loaders.train, DeviceDecodingLoader) else None
    clock = StepClock(device, warmup, waits, sync_debug, decoder)
    workers = run.loaders.train.num_workers
    total = warmup + steps
    epochs = -(-total // run.steps_per_epoch)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.amp_dtype]
    say(f"bench train: {run.loaders.train_dir}, batch {run.global_batch}, {cfg.data.image_size} px, "
        f"{device.type}, {precision}, decode {cfg.data.decode}, {plural(workers, 'worker')}; "
        f"{warmup} warm-up + {plural(steps, 'timed step')}" + (f" over {epochs} epochs" if epochs > 1 else ""))
    global_step, epoch, loss, sync_error = 0, 0, None, None
    try:
        while global_step < total:
            epoch += 1
            count = min(run.steps_per_epoch, total - global_step)
            clock.chunk_end = global_step + count
            run.loaders.train_sampler.set_epoch(epoch)
            hooks = engine.EpochHooks(after_step=clock.after_step, bad_images=run.bad_train)
            metrics, global_step = engine.train_one_epoch(
                model, waits, run.optimizer, run.scheduler, run.scaler, run.rt, settings, epoch, global_step,
                count, engine.EpochProgress.from_state(None, device), ema=run.ema, mix=mix, hooks=hooks)
            loss = metrics["train_loss"]
            say(f"{global_step}/{total} steps, loss {loss:.4f}")
    except RuntimeError as exc:
        if not sync_debug or "synchroniz" not in str(exc):
            raise
        sync_error = str(exc).strip().splitlines()[0]
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    elapsed = time.perf_counter() - clock.started if clock.started is not None and sync_error is None else None
    images = steps * run.global_batch
    img_per_s = rate(images, elapsed) if elapsed else None
    wait_fraction = waits.waited / elapsed if elapsed else None
    cpus = data.available_cpus()
    result = {"img_per_s": img_per_s, "img_per_s_per_worker": img_per_s / max(workers, 1) if img_per_s else None,
              "data_wait_frac": wait_fraction, "device": device.type, "decode": cfg.data.decode,
              "workers": workers, "cpus": cpus, "batch_size": run.global_batch, "image_size": cfg.data.image_size,
              "amp": precision, "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
              "steps": steps, "warmup": warmup, "epochs": epochs, "train_loss": loss}
    if wait_fraction is not None:
        result["verdict"], result["advice"] = verdict(wait_fraction, cfg, workers, cpus, device)
    if decoder is not None:
        result.update(decode_wait(decoder.waited, elapsed))
    if sync_debug:
        result.update(sync_findings(sync_error, cfg.data.decode))
    return result


def format_train_result(result: dict) -> str:
    lines = [f"training: {result['img_per_s']:.1f} img/s ({result['amp']}, "
             f"{'channels_last' if result['channels_last'] else 'contiguous'}"
             f"{', compiled' if result['compile'] else ''}, batch {result['batch_size']}, "
             f"{result['image_size']} px, {result['device']}, {plural(result['workers'], 'worker')}, "
             f"{result['decode']} decode)",
             f"waiting for data: {result['data_wait_frac']:.1%} of the time -> {result['verdict']}"]
    if result.get("decode_wait_ms_per_batch") is not None:
        lines.append(f"  of which in the decode call: {result['decode_wait_ms_per_batch']:.1f} ms per batch "
                     f"({result['decode_wait_frac']:.1%} of the time)")
    lines += [f"  try: {line}" for line in result["advice"]]
    return "\n".join(lines)
