"""What `mbv2 bench train` concludes from its figures, and what it advises: plain numbers in, words out.

Three verdicts: ``oversubscribed`` when other processes held CPUs this run needed (then no other figure
means much), ``data-bound`` when the step waited for data, ``compute-bound`` otherwise. More loader workers
are advised only when a trial with more of them was faster on this machine: workers compete with the step's
threads for the same CPUs, and on a small machine more of them is often slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mbv2train.words import plural

DATA_BOUND_FRACTION = 0.05  # waiting for data longer than this share of the time leaves the device idle
BUSY_OTHERS_MIN = 0.5  # CPUs' worth of other processes' load that can oversubscribe a machine
TOLERANCE = 0.1  # CPUs' worth of clock-tick noise in the load reading
TRIAL_GAIN = 1.05  # more workers are advised when they were at least this much faster


@dataclass(frozen=True)
class Load:
    """The CPUs during the timed steps."""

    usable: int  # CPUs this process may use (affinity set, cgroup quota)
    others: Optional[float]  # CPUs' worth other processes kept busy; None: not measured
    threads: int  # this run's intra-op threads
    workers: int  # and its loader worker processes


@dataclass(frozen=True)
class Trial:
    """The same steps, run again with more loader workers (and the threads that choice leaves)."""

    workers: int
    threads: int
    img_per_s: float


@dataclass(frozen=True)
class Settings:
    """What the advice depends on besides the figures."""

    device: str  # "cpu" or "cuda"
    decode: str  # data.decode
    heavy_augment: bool  # data.auto_augment or data.random_erasing on


def oversubscribed(load: Load) -> bool:
    """Other processes took a real share of the CPUs, and with this run's threads and workers there was
    more to run than CPUs to run it on."""
    if load.others is None or load.others < BUSY_OTHERS_MIN:
        return False
    return load.others + load.threads + load.workers > load.usable + TOLERANCE


def trial_workers(workers: int, usable: int) -> Optional[int]:
    """The worker count to try next (double, at least one more), or None when there are no CPUs for more."""
    if workers >= usable:
        return None
    return min(usable, max(workers + 1, 2 * workers))


def worth_a_trial(wait_fraction: float, load: Load) -> Optional[int]:
    """The worker count a trial should run with: only when the step waited for data, with CPUs to spare
    and no other process crowding them (which would make both figures say little)."""
    if wait_fraction < DATA_BOUND_FRACTION or oversubscribed(load):
        return None
    return trial_workers(load.workers, load.usable)


def faster(trial: Trial, img_per_s: float) -> bool:
    return trial.img_per_s >= TRIAL_GAIN * img_per_s


def trial_line(trial: Trial, img_per_s: float, load: Load) -> str:
    """Both figures, with the thread counts where they differ."""
    def threads(count: int) -> str:
        return f", {plural(count, 'thread')}" if trial.threads != load.threads else ""

    return (f"data.num_workers={trial.workers}{threads(trial.threads)} gave {trial.img_per_s:.0f} img/s against "
            f"{img_per_s:.0f} with {load.workers}{threads(load.threads)}")


def verdict(wait_fraction: float, img_per_s: float, load: Load, settings: Settings,
            trial: Optional[Trial] = None) -> tuple[str, list[str]]:
    """(verdict, what to change)."""
    if oversubscribed(load):
        advice = [f"other processes kept {load.others:.1f} of the {load.usable} usable CPUs busy beside this run's "
                  f"{plural(load.threads, 'thread')} and {plural(load.workers, 'loader worker')}: the run gets "
                  f"what they leave; stop them, or run where CPUs are free"]
        fewer = max(1, int(load.usable - load.others + 0.5) - load.workers)
        if fewer < load.threads:
            advice.append(f"fewer threads: train.threads={fewer} (threads that share CPUs with other processes "
                          f"wait for each other)")
        return "oversubscribed", advice
    if wait_fraction < DATA_BOUND_FRACTION:
        return "compute-bound", ["the model step is the limit: `mbv2 bench model` compares precisions, "
                                 "memory formats and torch.compile"]
    advice = []
    if trial is not None and faster(trial, img_per_s):
        advice.append(f"more loader workers: {trial_line(trial, img_per_s, load)}")
    if settings.decode == "workers" and settings.device == "cuda":
        advice.append("decode JPEGs on the GPU: data.decode=device")
    if settings.heavy_augment:
        advice.append("lighter CPU augmentations (data.auto_augment, data.random_erasing)")
    if not advice:
        advice.append("the loader is at this machine's limit: more CPUs, or faster storage if reading is slow "
                      "(`mbv2 bench data` measures the loader alone)")
    return "data-bound", advice
