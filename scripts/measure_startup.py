"""Time `mbv2 --help` against `python -c "import torch"` (best of N runs each).

Run with the project's Python after `make demo` or `make test`:
    .venv/bin/python scripts/measure_startup.py [RUNS]
"""

import subprocess
import sys
import time
from pathlib import Path


def best_of(runs: int, command: list[str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    mbv2 = str(Path(sys.executable).with_name("mbv2"))
    help_s = best_of(runs, [mbv2, "--help"])
    torch_s = best_of(runs, [sys.executable, "-c", "import torch"])
    print(f"mbv2 --help:                {help_s:.2f} s (best of {runs})")
    print(f'python -c "import torch":   {torch_s:.2f} s (best of {runs})')
    print(f"ratio:                      {help_s / torch_s:.2f}")


if __name__ == "__main__":
    main()
