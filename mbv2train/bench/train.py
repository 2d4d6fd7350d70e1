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

from mbv2train import cpu_threads, data
from mbv2train.bench import verdict as judge
from mbv2train.bench.common import keeps_torch_threads, rate, say, synchronize
from mbv2train.config import Config
from mbv2train.data.gpu_decode import DecodeWait, DeviceDecodingLoader
from mbv2train.devices import resolve_amp, resolve_device
from mbv2train.distributed import DistInfo
from mbv2train.errors import ConfigError
from mbv2train.train.build import BuiltRun, build_run
from mbv2train.train.epoch import EpochHooks, EpochProgress, train_one_epoch
from mbv2train.words import plural

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
        self.cpus = cpu_threads.affinity()
        self.cpu_times = None  # the CPU counters when the clock started: what other processes ran meanwhile

    def after_step(self, global_step: int, _progress) -> None:
        if global_step == self.warmup:
            synchronize(self.device)
            self.started = time.perf_counter()
            self.cpu_times = cpu_threads.read_cpu_times(self.cpus, children=True)
            self.waits.counting = True
            if self.decoder is not None:
                self.decoder.waited = DecodeWait()
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("error" if self.warmup <= global_step < self.chunk_end else 0)


def build_fresh_run(cfg: Config) -> BuiltRun:
    """What `mbv2 train` builds for a fresh run in one process (train.build_run), without a run directory."""
    device = resolve_device(cfg.train.device)
    # speed does not depend on the weights: no model.pretrained file to fetch or read
    return build_run(cfg, None, device, resolve_amp(cfg.train.amp, device), DistInfo(), pretrained_weights=False)


def sync_findings(sync_error: Optional[str], decode: str) -> dict:
    """What the sync check found: ``sync_error``, the first synchronization sync debug mode raised on;
    ``unseen_sync``, one the steps make that it cannot see; ``sync_free`` only when there is neither."""
    unseen = UNSEEN_SYNCS.get(decode)
    return {"sync_free": sync_error is None and unseen is None, "sync_error": sync_error, "unseen_sync": unseen}


def decode_wait(waited: DecodeWait, elapsed: Optional[float]) -> dict:
    """The host's time inside the decode calls of the timed steps: per batch, and as a share of the time."""
    return {"decode_wait_ms_per_batch": 1000 * waited.seconds / waited.batches if waited.batches else None,
            "decode_wait_frac": waited.seconds / elapsed if elapsed else None}


def bench_train(cfg: Config, steps: int, warmup: int, sync_debug: bool = False, worker_trial: bool = True) -> dict:
    """Training img/s and the share of time spent waiting for data, over ``steps`` steps after ``warmup``.

    The steps compute with the threads `mbv2 train` would choose (cpu_threads.py), and the count in force
    before is restored afterwards. ``verdict`` is "oversubscribed" when other processes held CPUs the run
    needed (``others_busy_cpus`` over the timed steps), else "data-bound" or "compute-bound"; when data-bound
    with CPUs to spare and ``worker_trial``, the steps run again with more loader workers
    (``worker_trial`` in the result), and more workers are advised only if that was faster.

    With ``sync_debug`` (CUDA only) the steps after the warm-up run under
    ``torch.cuda.set_sync_debug_mode("error")``: ``sync_free`` says whether none of them synchronized,
    ``sync_error`` names the first call that did, and ``unseen_sync`` one that the debug mode cannot see.
    With data.decode: device, ``decode_wait_ms_per_batch`` and ``decode_wait_frac`` give the host's time
    inside the decode calls.
    """
    if steps < 1 or warmup < 1:
        raise ConfigError("bench train needs --steps and --warmup of at least 1")
    with keeps_torch_threads():
        threads = cpu_threads.use(cfg.train.threads, cfg.data.workers_asked, say=say).count
        result = _timed_steps(cfg, steps, warmup, sync_debug)
        usable = cpu_threads.measure_machine().usable
        load = judge.Load(usable, result["others_busy_cpus"], threads, result["workers"])
        result.update(threads=threads, usable_cpus=usable, oversubscribed=judge.oversubscribed(load), worker_trial=None)
        if result["data_wait_frac"] is None:  # the sync check stopped the clock
            return result
        more = judge.worth_a_trial(result["data_wait_frac"], load) if worker_trial and not sync_debug else None
        trial = _worker_trial(cfg, more, steps, warmup) if more is not None else None
        if trial is not None:
            result["worker_trial"] = {"workers": trial.workers, "threads": trial.threads, "img_per_s": trial.img_per_s,
                                      "faster": judge.faster(trial, result["img_per_s"])}
        settings = judge.Settings(result["device"], cfg.data.decode,
                                  cfg.data.auto_augment != "none" or cfg.data.random_erasing > 0)
        result["verdict"], result["advice"] = judge.verdict(result["data_wait_frac"], result["img_per_s"], load,
                                                            settings, trial)
    return result


def _worker_trial(cfg: Config, workers: int, steps: int, warmup: int) -> Optional[judge.Trial]:
    """The same steps with ``workers`` loader workers and the threads `mbv2 train` would choose beside them."""
    threads = cpu_threads.use(cfg.train.threads, workers).count
    say(f"data-bound: the same steps again with data.num_workers={workers} ({judge.plural(threads, 'thread')})")
    more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    img_per_s = _timed_steps(more, steps, warmup, sync_debug=False)["img_per_s"]
    return judge.Trial(workers, threads, img_per_s) if img_per_s is not None else None


def _timed_steps(cfg: Config, steps: int, warmup: int, sync_debug: bool) -> dict:
    """One measurement: the figures of ``steps`` training steps after ``warmup``, with no verdict."""
    # Workers end with each epoch's iterator. Persistent ones live as long as the loader, which the run's
    # objects can keep until the garbage collector frees them; its shutdown of workers that ignore SIGTERM
    # (preemption.py) can leave them running, and the interpreter's exit then waits for them forever.
    run = build_fresh_run(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, persistent_workers=False)))
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
            hooks = EpochHooks(after_step=clock.after_step, bad_images=run.bad_train)
            metrics, global_step = train_one_epoch(
                model, waits, run.optimizer, run.scheduler, run.scaler, run.runtime, settings, epoch, global_step,
                count, EpochProgress.from_state(None, device), ema=run.ema, mix=mix, hooks=hooks)
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
    cpu_times = cpu_threads.read_cpu_times(clock.cpus, children=True)
    others = (cpu_threads.others_busy(clock.cpu_times, cpu_times)
              if clock.cpu_times is not None and cpu_times is not None else None)
    images = steps * run.global_batch
    img_per_s = rate(images, elapsed) if elapsed else None
    wait_fraction = waits.waited / elapsed if elapsed else None
    cpus = data.available_cpus()
    result = {"img_per_s": img_per_s, "img_per_s_per_worker": img_per_s / max(workers, 1) if img_per_s else None,
              "data_wait_frac": wait_fraction, "device": device.type, "decode": cfg.data.decode,
              "workers": workers, "cpus": cpus, "batch_size": run.global_batch, "image_size": cfg.data.image_size,
              "amp": precision, "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
              "steps": steps, "warmup": warmup, "epochs": epochs, "train_loss": loss, "others_busy_cpus": others}
    if decoder is not None:
        result.update(decode_wait(decoder.waited, elapsed))
    if sync_debug:
        result.update(sync_findings(sync_error, cfg.data.decode))
    return result


def format_train_result(result: dict) -> str:
    others = result.get("others_busy_cpus")
    busy = (f"; other processes kept {others:.1f} of the {result['usable_cpus']} CPUs busy"
            if others is not None else "")
    threads = result["threads"]
    lines = [f"training: {result['img_per_s']:.1f} img/s ({result['amp']}, "
             f"{'channels_last' if result['channels_last'] else 'contiguous'}"
             f"{', compiled' if result['compile'] else ''}, batch {result['batch_size']}, "
             f"{result['image_size']} px, {result['device']}, {judge.plural(threads, 'thread')}, "
             f"{judge.plural(result['workers'], 'worker')}, {result['decode']} decode)",
             f"waiting for data: {result['data_wait_frac']:.1%} of the time{busy} -> {result['verdict']}"]
    if result.get("decode_wait_ms_per_batch") is not None:
        lines.append(f"  of which in the decode call: {result['decode_wait_ms_per_batch']:.1f} ms per batch "
                     f"({result['decode_wait_frac']:.1%} of the time)")
    trial = result.get("worker_trial")
    if trial is not None and not trial["faster"]:
        tried = judge.Trial(trial["workers"], trial["threads"], trial["img_per_s"])
        load = judge.Load(result["usable_cpus"], others, threads, result["workers"])
        lines.append(f"  tried: {judge.trial_line(tried, result['img_per_s'], load)}: more workers are no faster here")
    lines += [f"  try: {line}" for line in result["advice"]]
    return "\n".join(lines)
