"""Time `mbv2 --help` and a mistake `mbv2 eval` reports before importing torch (a checkpoint that is not
there) against `python -c "import torch"` (best of N runs each).

Run with the project's Python after `make demo` or `make test`:
    .venv/bin/python scripts/measure_startup.py [RUNS]
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best_of(runs: int, command: list[str], exit_code: int = 0) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        if result.returncode != exit_code:
            raise SystemExit(f"{' '.join(command)} exited with {result.returncode}, not {exit_code}")
    return min(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    mbv2 = str(Path(sys.executable).with_name("mbv2"))
    help_s = best_of(runs, [mbv2, "--help"])
    with tempfile.TemporaryDirectory() as scratch:
        missing_s = best_of(runs, [mbv2, "eval", "--ckpt", str(Path(scratch) / "missing.pt")], exit_code=2)
    torch_s = best_of(runs, [sys.executable, "-c", "import torch"])
    print(f"mbv2 --help:                      {help_s:.2f} s (best of {runs})")
    print(f"mbv2 eval --ckpt missing.pt:      {missing_s:.2f} s (best of {runs})")
    print(f'python -c "import torch":         {torch_s:.2f} s (best of {runs})')
    print(f"ratio (--help / import torch):    {help_s / torch_s:.2f}")


if __name__ == "__main__":
    main()
