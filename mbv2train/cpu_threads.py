"""The intra-op thread count a command computes with, chosen from the CPUs this process may use, the loader
workers that share them, and how busy other processes keep them.

torch's default, one thread per CPU, is the fastest on an idle machine and by far the slowest on a busy one:
each parallel region waits for its slowest thread, and a thread whose CPU another process holds keeps the
others spinning (OpenMP's busy-wait) until the scheduler hands it back (docs/PERFORMANCE.md, "A busy
machine", has the figures). So a command takes the CPUs it may use (affinity set, cgroup quota), less its
loader workers, less what other processes keep busy, and never more than torch's default.

Who decides, first match wins: OMP_NUM_THREADS or MKL_NUM_THREADS when set (torch has already read them;
they are the standard way to say it, so mbv2 steps aside), then train.threads, then on resume the count the
run was started with (CPU float sums depend on it, so an exact resume needs it), then the choice above.

The load of other processes is measured from the kernel's CPU counters between two readings: one when the
command starts (``start_reading``, before torch is imported) and one when the count is chosen, once torch is
imported; importing torch takes a second or more, which is the interval measured, at no extra wait. So
torch is imported here only inside the functions that set the count.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from mbv2train.words import plural

PROC = Path("/proc")
CGROUP_FS = Path("/sys/fs/cgroup")
# OpenMP's and MKL's own settings: read here only to leave torch's count alone when one is set
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
MIN_INTERVAL_S = 0.25  # a shorter interval is a few clock ticks per CPU: too coarse to tell load apart
BUSY_SHOWN = 0.05  # CPUs' worth of other processes' load below which a line does not mention it


@dataclass(frozen=True)
class CpuTimes:
    """One reading of the kernel's CPU counters, in clock ticks: (busy, total) per CPU of the affinity set,
    and the time this process (with its child processes, when read with ``children``) has run."""

    cpus: dict[int, tuple[int, int]]
    own: int
    at: float = 0.0  # time.monotonic() of the reading


@dataclass(frozen=True)
class Machine:
    """The CPUs as this process finds them."""

    cpus: int  # in its affinity set
    usable: int  # of them, as many as the cgroup's CPU quota allows
    others: Optional[float] = None  # CPUs' worth kept busy by other processes; None: not measured

    def free(self) -> float:
        """CPUs' worth left to this process: its usable CPUs, fewer where others keep the rest busy. Under a
        quota the load of other processes counts only once it leaves fewer CPUs idle than the quota."""
        if self.others is None:
            return float(self.usable)
        return max(0.0, min(float(self.usable), self.cpus - self.others))


@dataclass(frozen=True)
class ThreadChoice:
    count: int  # the intra-op threads the command computes with
    source: str  # "environment", "train.threads", "resumed run" or "auto"
    line: Optional[str] = None  # what to tell the user; None when there is nothing worth a line


# ------------------------------------------------------------------------------------------- reading /proc

def affinity() -> set[int]:
    """The CPUs this process may run on (containers, `taskset` and Slurm narrow the set)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def read_cpu_times(cpus: Iterable[int], proc: Path = PROC, children: bool = False) -> Optional[CpuTimes]:
    """The counters of ``cpus`` from /proc/stat and this process's own CPU time; None where there is no /proc."""
    wanted = set(cpus)
    try:
        lines = (proc / "stat").read_text().splitlines()
        own = _process_ticks(proc, "self", children)
    except (OSError, ValueError, IndexError):
        return None
    per_cpu = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted:
            # user nice system idle iowait irq softirq steal (guest time is inside user already)
            values = [int(value) for value in fields[:8]]
            per_cpu[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return CpuTimes(per_cpu, own, time.monotonic()) if per_cpu else None


def _process_ticks(proc: Path, pid: str, children: bool) -> int:
    """utime + stime of ``pid``; with ``children`` also those of its children, live (loader workers) or
    already waited for (cutime + cstime)."""
    stat = (proc / pid / "stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": fields 3 onwards of proc(5)
    ticks = int(fields[11]) + int(fields[12])
    if not children:
        return ticks
    ticks += int(fields[13]) + int(fields[14])
    for child in _children(proc / pid):
        try:
            ticks += _process_ticks(proc, child, children=False)
        except (OSError, ValueError, IndexError):  # ended between the listing and the reading
            continue
    return ticks


def _children(process: Path) -> list[str]:
    found = []
    try:
        tasks = list((process / "task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += (task / "children").read_text().split()
        except OSError:
            continue
    return found


def others_busy(first: CpuTimes, second: CpuTimes) -> Optional[float]:
    """CPUs' worth of the CPUs read that processes other than this one kept busy between two readings."""
    shared = first.cpus.keys() & second.cpus.keys()
    if not shared:
        return None
    busy = sum(second.cpus[cpu][0] - first.cpus[cpu][0] for cpu in shared)
    elapsed = sum(second.cpus[cpu][1] - first.cpus[cpu][1] for cpu in shared) / len(shared)  # ticks per CPU
    if elapsed <= 0:
        return None
    return min(float(len(shared)), max(0.0, (busy - (second.own - first.own)) / elapsed))


def cpu_quota(proc: Path = PROC, cgroup_fs: Path = CGROUP_FS) -> Optional[float]:
    """CPUs' worth of time the cgroup's CPU quota allows (v2 cpu.max; v1 cpu.cfs_quota_us / cfs_period_us),
    the smallest on the way up to the root; None when there is none."""
    try:
        memberships = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            limits += [_v2_quota(folder) for folder in _up_to(cgroup_fs, path)]
        elif "cpu" in controllers.split(","):
            mount = next((m for m in (cgroup_fs / controllers, cgroup_fs / "cpu", cgroup_fs / "cpu,cpuacct")
                          if m.is_dir()), None)
            if mount is not None:
                limits += [_v1_quota(folder) for folder in _up_to(mount, path)]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _up_to(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and each above it up to the mount. Inside a container the path is often the
    host's while the mount shows the container's own cgroup at its root: the folders that do not exist
    read as no limit."""
    folders, parts = [], [part for part in path.strip("/").split("/") if part]
    while parts:
        folders.append(mount.joinpath(*parts))
        parts.pop()
    return folders + [mount]


def _v2_quota(folder: Path) -> Optional[float]:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> Optional[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cpus: int, quota: Optional[float]) -> int:
    """CPUs a process can keep busy: its affinity set, or the whole CPUs of a smaller quota (a thread past
    the quota only gets the process throttled), at least 1."""
    return max(1, min(cpus, int(quota)) if quota is not None else cpus)


# --------------------------------------------------------------------------------------------- measuring

_start: Optional[CpuTimes] = None  # the reading taken when the command started
_machine: Optional[Machine] = None  # measured once per command, then reused (bench's trial runs)


def start_reading(proc: Path = PROC) -> None:
    """Read the CPU counters now, as the command starts: the interval up to ``measure_machine`` (mostly
    importing torch) is what other processes' load is measured over."""
    global _start, _machine
    _start, _machine = read_cpu_times(affinity(), proc), None


def measure_machine(proc: Path = PROC, cgroup_fs: Path = CGROUP_FS,
                    sleep: Callable[[float], None] = time.sleep) -> Machine:
    """The machine as this command finds it; measured at the first call, the same afterwards. Without a
    reading from the command's start (a library caller), or after too short an interval, it waits for
    MIN_INTERVAL_S to read again."""
    global _machine
    if _machine is not None:
        return _machine
    cpus = affinity()
    first = _start if _start is not None else read_cpu_times(cpus, proc)
    others = None
    if first is not None:
        short = MIN_INTERVAL_S - (time.monotonic() - first.at)
        if short > 0:
            sleep(short)
        second = read_cpu_times(cpus, proc)
        others = others_busy(first, second) if second is not None else None
    _machine = Machine(len(cpus), usable_cpus(len(cpus), cpu_quota(proc, cgroup_fs)), others)
    return _machine


# ------------------------------------------------------------------------------------------------ choosing

def auto_threads(machine: Machine, workers: int, default: int) -> int:
    """Threads for the CPUs left: usable ones less the loader workers, less other processes' load (rounded
    to whole CPUs), no more than torch's default (it counts physical cores, not hyper-threads), at least 1."""
    left = machine.usable - min(workers, machine.usable)
    return max(1, min(default, left, int(machine.free() + 0.5)))


def _why(machine: Machine, workers: int) -> str:
    reasons = []
    if workers > 0:
        reasons.append(f"{min(workers, machine.usable)} for loader workers")
    if machine.others is not None and machine.others >= BUSY_SHOWN:
        reasons.append(f"{machine.others:.1f} busy with other processes")
    if machine.usable < machine.cpus:
        reasons.append(f"the cgroup's CPU quota allows {machine.usable} of {machine.cpus}")
    return "; ".join(reasons)


def choose(setting: Optional[int], workers: int, recorded: Optional[int], env: Mapping[str, str],
           machine: Callable[[], Machine], default: int) -> ThreadChoice:
    """The count, who chose it, and the line that says so; ``machine`` is called only when it matters.

    ``setting``: train.threads; ``workers``: data.num_workers; ``recorded``: the count the run being resumed
    used (None: a fresh run, or a checkpoint from before it was recorded); ``default``: torch's own count."""
    unlike = (f"; the run being resumed used {recorded}, so it will not repeat an uninterrupted run bit for bit"
              if recorded is not None else "")
    named = [var for var in THREAD_ENV_VARS if env.get(var, "").strip()]
    if named:
        line = None
        if recorded not in (None, default):
            line = f"warning: {named[0]}={env[named[0]]} gives {plural(default, 'thread')}{unlike}"
        return ThreadChoice(default, "environment", line)
    if setting is not None:
        if recorded not in (None, setting):
            return ThreadChoice(setting, "train.threads", f"warning: threads: {setting} (train.threads){unlike}")
        return ThreadChoice(setting, "train.threads",
                            f"threads: {setting} (train.threads)" if setting != default else None)
    found = machine()
    auto = auto_threads(found, workers, default)
    why = _why(found, workers)
    if recorded is not None:
        if recorded == default and recorded == auto:
            return ThreadChoice(recorded, "resumed run")
        otherwise = f"; {auto} otherwise" + (f" ({why})" if why else "") if auto != recorded else ""
        return ThreadChoice(recorded, "resumed run", f"threads: {recorded} of {found.usable} CPUs, as the run being "
                            f"resumed used: an exact resume needs its count (train.threads sets another){otherwise}")
    # The loader workers' share is the policy every run follows, not news: a line only when other processes'
    # load or a CPU quota took threads away, the two things a user may not know about their machine.
    planned = auto_threads(Machine(found.cpus, found.cpus), workers, default)
    if auto == planned:
        return ThreadChoice(auto, "auto")
    return ThreadChoice(auto, "auto", f"threads: {auto} of {found.usable} CPUs ({why})" if why else
                        f"threads: {auto} of {found.usable} CPUs")


# ------------------------------------------------------------------------------------------------ applying

_torch_default: Optional[int] = None


def torch_default() -> int:
    """torch's own intra-op count, as it was before this module first changed it."""
    global _torch_default
    import torch  # here, not at the top: the command's first CPU reading comes before torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    return _torch_default


def use(setting: Optional[int], workers: int, recorded: Optional[int] = None,
        say: Optional[Callable[[str], None]] = None,
        machine: Optional[Callable[[], Machine]] = None) -> ThreadChoice:
    """Choose (``choose``) and set torch's intra-op thread count for the rest of the process; ``say`` gets
    the line, when there is one. ``machine``: how to find the machine (default: ``measure_machine``)."""
    import torch  # here, as in torch_default: the CLI's checks before training import this module without torch

    choice = choose(setting, workers, recorded, os.environ, machine or measure_machine, torch_default())
    if choice.source != "environment" and torch.get_num_threads() != choice.count:
        torch.set_num_threads(choice.count)
    if choice.line is not None and say is not None:
        say(choice.line)
    return choice


def to_stderr(line: str) -> None:
    """For commands whose stdout carries their results (eval --json, predict, bench)."""
    print(line, file=sys.stderr, flush=True)
