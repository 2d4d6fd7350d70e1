import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # loader worker processes, and every part of the check in turn
def test_gpu_check_quick_on_the_cpu_runs_every_part(tmp_path):
    out = tmp_path / "check.json"
    # As the GPU machines run it: from the repository root with PYTHONPATH=., nothing installed.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = ["model", "data_workers", "data_device", "train_workers", "train_device"]
    assert [name for name in parts if "error" in report[name]] == []
    assert report["model"]["rows"] and all(row["train_img_per_s"] > 0 for row in report["model"]["rows"])
    assert (report["data_workers"]["decode"], report["data_device"]["decode"]) == ("workers", "device")
    assert all(report[name]["ratio"] > 0 for name in ("data_workers", "data_device"))
    assert all(report[name]["verdict"] in ("data-bound", "compute-bound") for name in ("train_workers", "train_device"))
    assert report["sync_workers"] == report["sync_device"] == {"skipped": "needs a CUDA device"}
    assert "| sync check: decode workers | needs a CUDA device |" in result.stdout  # the table
