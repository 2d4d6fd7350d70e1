import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_script_prints_every_setting_against_the_plain_loop():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--image-size", "32",
                             "--width-mult", "0.35", "--batch-size", "4", "--steps", "1", "--warmup", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "img/s" not in line]
    rows = [[cell.strip() for cell in row] for row in rows if not row[0].strip().startswith("---")]
    assert [row[0] for row in rows] == [
        "plain loop: channels-first, float32", "mbv2train: channels-first, float32", "mbv2train: channels-first, bf16",
        "mbv2train: channels_last, float32", "mbv2train: channels_last, bf16"]
    assert rows[0][2] == "1.00x"
    assert all(float(row[1]) > 0 for row in rows)
