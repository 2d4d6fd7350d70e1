import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


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
    assert all(report[name]["verdict"] in ("data-bound", "compute-bound", "oversubscribed")
               for name in ("train_workers", "train_device"))
    assert report["train_device"]["decode_wait_ms_per_batch"] > 0  # the host's time in the decode call
    assert report["sync_workers"] == report["sync_device"] == {"skipped": "needs a CUDA device"}
    assert "| sync check: decode workers | needs a CUDA device |" in result.stdout  # the table


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_reports_the_host_s_wait_in_the_device_decode_instead_of_a_pass():
    from mbv2train.bench.train import sync_findings

    results = {"sync_workers": sync_findings(None, "workers"),
               "sync_device": {**sync_findings(None, "device"), "decode_wait_ms_per_batch": 12.5,
                               "decode_wait_frac": 0.042}}
    lines = gpu_check_module().table(results).splitlines()
    assert "| sync check: decode workers | pass: no host-device sync |" in lines
    [row] = [line for line in lines if "sync check: decode device" in line]
    assert "pass" not in row and "FAIL" not in row
    assert "the host waited 12.5 ms per batch in the decode call (4.2% of the time)" in row
