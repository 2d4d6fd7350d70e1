"""scripts/decode_speed.py run as a process."""

import numpy as np
import pytest
from PIL import Image

from helpers import REPO


@pytest.mark.slow  # a subprocess that times every variant
def test_decode_speed_script_reports_every_step(tmp_path):
    import subprocess
    import sys

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for split, count in (("train", 10), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.roll(pixels, i, axis=1)).save(tmp_path / split / name / f"{i}.jpg", "JPEG",
                                                                       quality=90)
    result = subprocess.run([sys.executable, "scripts/decode_speed.py", "--data", str(tmp_path), "--images", "8",
                             "--rounds", "1", "--batch-size", "4"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 9 and rows[-1].startswith("| + no Python random state (mbv2 now) |")
    assert "whole loaders, batch 4 (img/s per core): mbv2 training loader" in result.stdout
