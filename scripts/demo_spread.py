"""Run the digits demo recipe under several CPU kernel families and thread counts, and print one line per run.

The demo's accuracy moves with the CPU: PyTorch picks its vectorized kernels (default, avx2, avx512) by CPU,
and each family rounds float32 sums differently, so two machines train slightly different models from the
same seed. This script measures the spread on one machine by forcing the family with ATEN_CPU_CAPABILITY
(a family the CPU lacks falls back to the best one it has; the `kernels` column shows what torch used) and
the thread count with OMP_NUM_THREADS.

    PYTHONPATH=. python3 scripts/demo_spread.py DATA_DIR                       # default, avx2, avx512 x 1, 2 threads
    PYTHONPATH=. python3 scripts/demo_spread.py /tmp/digits --capabilities default avx2 --threads 1 2
    PYTHONPATH=. python3 scripts/demo_spread.py /tmp/digits --seeds 0 1 2 --set train.epochs=8

DATA_DIR receives the digits first if it does not hold them (`python3 -m mbv2train data demo DATA_DIR`, which
needs scikit-learn). Runs go in parallel, as many at a time as their threads fit in --cpus (default: all
cores), each in its own process through `python3 -m mbv2train train`; a run's folder is kept under
--out-dir. Columns: best val top-1 (raw weights) and best EMA val top-1 over the epochs, the metric that
picks best.pt and its value, the epoch it came from, and the run's time (wall clock of the whole process,
and the sum of its epochs' train + val time). With several runs sharing cores, times are only rough.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="digits dataset folder (written if missing)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--capabilities", nargs="+", default=["default", "avx2", "avx512"],
                   help="ATEN_CPU_CAPABILITY values")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="OMP_NUM_THREADS values")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="cores to fill: runs start while their threads fit (default: all)")
    p.add_argument("--out-dir", type=Path, default=None, help="where run folders go (default: a temp dir)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs mbv2train")
    p.add_argument("--json", action="store_true", help="also print one JSON object per run at the end")
    return p.parse_args(argv)


def child_env(capability: str, threads: int) -> dict:
    env = dict(os.environ)
    env["ATEN_CPU_CAPABILITY"] = capability
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def kernels_used(python: str, capability: str) -> str:
    """What torch actually runs under ATEN_CPU_CAPABILITY=capability (it falls back when the CPU lacks it)."""
    out = subprocess.run([python, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=child_env(capability, 1), capture_output=True, text=True)
    return out.stdout.strip() or "?"


def ensure_data(python: str, data: Path) -> None:
    if (data / "train").is_dir() and (data / "val").is_dir():
        return
    subprocess.run([python, "-m", "mbv2train", "data", "demo", str(data)], env=child_env("default", 1),
                   check=True)


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = (run_dir / "config.yaml").read_text()
    ema = any("ema_val_top1" in r for r in rows)
    # Same rule as Config.best_metric: EMA val top-1 when the run keeps an EMA, else val top-1, unless set.
    best_metric = "ema_val_top1" if ema else "val_top1"
    for line in config.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "best_metric" and value.strip() not in ("", "null"):
            best_metric = value.strip()
    best = max(rows, key=lambda r: r[best_metric])  # first maximum, as the trainer keeps it
    return {
        "epochs": len(rows),
        "best_val_top1": max(r["val_top1"] for r in rows),
        "best_ema_val_top1": max(r["ema_val_top1"] for r in rows) if ema else None,
        "best_metric": best_metric,
        "best_value": best[best_metric],
        "best_epoch": best["epoch"],
        "last_val_top1": rows[-1]["val_top1"],
        "epochs_s": sum(r.get("epoch_time_s", 0) + r.get("val_time_s", 0) for r in rows),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_data(args.python, args.data)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="demo_spread_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    kernels = {cap: kernels_used(args.python, cap) for cap in args.capabilities}
    print(f"runs in {out_dir}; torch kernels per ATEN_CPU_CAPABILITY: "
          + ", ".join(f"{c} -> {k}" for c, k in kernels.items()), flush=True)

    pending = [dict(capability=c, threads=t, seed=s)
               for c, t, s in itertools.product(args.capabilities, args.threads, args.seeds)]
    # Biggest runs first, so the last ones to start are the small ones that fill the gaps.
    pending.sort(key=lambda r: -r["threads"])
    running, done = [], []
    header = (f"{'capability':<10} {'kernels':<8} {'thr':>3} {'seed':>4}  {'val_top1':>8} {'ema_top1':>8}  "
              f"{'best(metric)':>12} {'ep':>3}  {'wall_s':>6} {'epochs_s':>8}  rc")
    print(header, flush=True)
    while pending or running:
        used = sum(r["threads"] for r in running)
        while pending and (not running or used + pending[0]["threads"] <= args.cpus):
            run = pending.pop(0)
            name = f"{run['capability']}_t{run['threads']}_s{run['seed']}"
            run["dir"] = out_dir / name
            cmd = [args.python, "-m", "mbv2train", "train", "--config", str(args.config), "--data", str(args.data),
                   "--output-dir", str(run["dir"]), "--set", f"train.seed={run['seed']}"]
            for override in args.overrides:
                cmd += ["--set", override]
            log = open(out_dir / f"{name}.log", "w")
            run["start"] = time.monotonic()
            run["proc"] = subprocess.Popen(cmd, env=child_env(run["capability"], run["threads"]), stdout=log,
                                           stderr=subprocess.STDOUT, cwd=REPO)
            run["log"] = log
            running.append(run)
            used += run["threads"]
        time.sleep(0.5)
        for run in [r for r in running if r["proc"].poll() is not None]:
            running.remove(run)
            run["log"].close()
            run["rc"] = run["proc"].returncode
            run["wall_s"] = time.monotonic() - run["start"]
            result = {"capability": run["capability"], "kernels": kernels[run["capability"]],
                      "threads": run["threads"], "seed": run["seed"], "rc": run["rc"], "wall_s": run["wall_s"],
                      "dir": str(run["dir"])}
            try:
                result.update(summarize(run["dir"]))
            except (OSError, ValueError, KeyError):
                pass
            done.append(result)
            if "best_val_top1" in result:
                ema = result["best_ema_val_top1"]
                print(f"{result['capability']:<10} {result['kernels']:<8} {result['threads']:>3} {result['seed']:>4}  "
                      f"{100 * result['best_val_top1']:>7.2f}% {'-' if ema is None else f'{100 * ema:.2f}%':>8}  "
                      f"{100 * result['best_value']:>11.2f}% {result['best_epoch']:>3}  "
                      f"{result['wall_s']:>6.1f} {result['epochs_s']:>8.1f}  {result['rc']}", flush=True)
            else:
                print(f"{result['capability']:<10} {result['kernels']:<8} {result['threads']:>3} {result['seed']:>4}  "
                      f"FAILED (rc {result['rc']}), see {out_dir / (run['dir'].name + '.log')}", flush=True)

    finished = [r for r in done if "best_value" in r]
    if finished:
        values = [100 * r["best_value"] for r in finished]
        print(f"best.pt metric over {len(finished)} runs: min {min(values):.2f}%  max {max(values):.2f}%")
    if args.json:
        for r in done:
            print(json.dumps(r))
    return 0 if all(r["rc"] == 0 for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
