"""Training speed of the demo on this machine, idle and busy: mbv2's thread choice against every fixed count.

Runs `mbv2 bench train` on the demo (configs/demo.yaml; the digits set is written by `mbv2 data demo` when
missing) with mbv2's default (no thread variable set: mbv2 chooses) and with OMP_NUM_THREADS=1..N, N the
CPUs this process may use; OMP_NUM_THREADS=N is torch's default count, what mbv2 used before it chose.
Each runs on an idle machine and beside one CPU-bound process per usable CPU (started, and running, before
the benchmark starts), --repeats times, interleaved: every repeat runs every setting in both conditions, in
an order rotated from one repeat to the next, so that drift in the machine's speed falls on all alike.
Prints a Markdown table (median img/s and the range over repeats) and the ratios docs/PERFORMANCE.md
quotes: default / best fixed count when busy, default / torch's default when idle.

    PYTHONPATH=. python scripts/busy_machine.py                      # data/digits, 60 steps, 5 repeats
    PYTHONPATH=. python scripts/busy_machine.py --data /tmp/digits --repeats 3 --json busy.json

Run it on a machine nothing else is using: other programs would count as load in both conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# One CPU-bound process: says when it runs, then spins until it is stopped.
SPINNER = "print('spinning', flush=True)\nwhile True:\n    pass\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "digits", help="digits set (written if missing)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per benchmark (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: bench train's)")
    p.add_argument("--repeats", type=int, default=5, help="runs of every setting in each condition")
    p.add_argument("--json", type=Path, help="also write every figure here")
    return p.parse_args()


def usable_cpus() -> int:
    from mbv2train import cpu_threads

    return cpu_threads.usable_cpus(len(cpu_threads.affinity()), cpu_threads.cpu_quota())


def mbv2(*args: str, threads: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARS}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "mbv2train", *args], env=env, capture_output=True, text=True,
                          check=check)


def bench(args: argparse.Namespace, threads: int | None) -> dict:
    command = ["bench", "train", "--config", str(args.config), "--data", str(args.data), "--steps", str(args.steps),
               "--no-worker-trial", "--json"]
    if args.warmup is not None:
        command += ["--warmup", str(args.warmup)]
    run = mbv2(*command, threads=threads, check=False)
    if run.returncode != 0:
        sys.exit(f"mbv2 {' '.join(command)} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout)


class Competitors:
    """One spinning process per CPU, running before the block starts, stopped after it."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        for _ in range(self.count):
            proc = subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            proc.stdout.readline()  # "spinning": it runs
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()
        return False


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    args = parse_args()
    made = mbv2("data", "demo", str(args.data))
    print(made.stdout.strip(), file=sys.stderr)
    cpus = usable_cpus()
    settings: list[int | None] = [None, *range(1, cpus + 1)]  # None: mbv2's own choice
    figures = {(condition, s): [] for condition in ("idle", "busy") for s in settings}
    chosen = {"idle": set(), "busy": set()}
    for repeat in range(args.repeats):
        order = settings[repeat % len(settings):] + settings[:repeat % len(settings)]
        conditions = ("idle", "busy") if repeat % 2 == 0 else ("busy", "idle")
        for condition in conditions:
            with Competitors(cpus if condition == "busy" else 0):
                for threads in order:
                    result = bench(args, threads)
                    figures[(condition, threads)].append(result["img_per_s"])
                    if threads is None:
                        chosen[condition].add(result["threads"])
                    name = "default" if threads is None else f"OMP_NUM_THREADS={threads}"
                    print(f"repeat {repeat + 1}/{args.repeats}, {condition}, {name}: {result['img_per_s']:.0f} img/s",
                          file=sys.stderr, flush=True)

    def label(threads: int | None) -> str:
        if threads is None:
            counts = ", ".join(f"{c} {'/'.join(map(str, sorted(chosen[c])))}" for c in ("idle", "busy"))
            return f"default (mbv2 chose: {counts})"
        return f"`OMP_NUM_THREADS={threads}`" + (" (torch's default, mbv2's before)" if threads == cpus else "")

    def median(condition: str, threads: int | None) -> float:
        return statistics.median(figures[(condition, threads)])

    cpu = platform.processor() or platform.machine()
    print(f"{cpus} usable CPUs ({cpu}), demo recipe, `mbv2 bench train --steps {args.steps}`, {args.repeats} "
          f"repeats; busy: {cpus} CPU-bound processes beside it. img/s, median (min-max):\n")
    print("| threads | idle | busy |\n| --- | --- | --- |")
    for threads in settings:
        print(f"| {label(threads)} | {spread(figures[('idle', threads)])} | {spread(figures[('busy', threads)])} |")
    def ratio(condition: str, other: int) -> tuple[float, list[float]]:
        """Of the medians, and per repeat (both ran in the same repeat, close in time)."""
        pairs = zip(figures[(condition, None)], figures[(condition, other)])
        return median(condition, None) / median(condition, other), [a / b for a, b in pairs]

    best = max(settings[1:], key=lambda t: median("busy", t))
    busy_ratio, busy_each = ratio("busy", best)
    idle_ratio, idle_each = ratio("idle", cpus)
    print(f"\nbusy: default / best fixed count (OMP_NUM_THREADS={best}) = {busy_ratio:.2f}x "
          f"(repeats {min(busy_each):.2f}-{max(busy_each):.2f}x)")
    print(f"idle: default / torch's default (OMP_NUM_THREADS={cpus}) = {idle_ratio:.2f}x "
          f"(repeats {min(idle_each):.2f}-{max(idle_each):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({
            "cpus": cpus, "steps": args.steps, "repeats": args.repeats, "busy_ratio": busy_ratio,
            "idle_ratio": idle_ratio, "chosen": {c: sorted(v) for c, v in chosen.items()},
            "img_per_s": [{"condition": c, "threads": t, "values": v} for (c, t), v in figures.items()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
