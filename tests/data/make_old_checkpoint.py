"""Write tests/data/old_last.pt, the mid-epoch last.pt of a tiny run made by the code before the package
was reorganised into layers (commit 4221183), and old_last_eval.json, what that code's `mbv2 eval --json`
said of it, for tests/integration/test_old_checkpoint.py.

    git worktree add /tmp/old 4221183
    PYTHONPATH=/tmp/old python tests/data/make_old_checkpoint.py

The run is stopped by SIGTERM (the hidden --fault sigterm_at_step) after step STOP_STEP of epoch 1 of 2; it
writes last.pt there, as a preempted run does. The test makes the same images with ``make_images``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "old_last.pt"
EVAL_OUTPUT = HERE / "old_last_eval.json"
CLASSES = ("a", "b", "c")
STEPS_PER_EPOCH = 6  # 12 training images in batches of 2
STOP_STEP = 4
SETTINGS = [
    "model.width_mult=0.01", "data.image_size=8", "data.val_resize=8", "data.val_crop=8", "data.batch_size=2",
    "data.num_workers=0", "train.epochs=2", "train.checkpoint_every_steps=2", "train.tb_images=0",
]


def make_images(root: Path) -> Path:
    """root/{train,val}/<class>/*.png: 4 training and 2 validation 8x8 images per class, each class its own
    tint; the same pixels on every call."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.zeros(3)
            tint[c] = 160
            for i in range(count):
                pixels = rng.integers(0, 90, (8, 8, 3)) + tint
                Image.fromarray(pixels.clip(0, 255).astype("uint8"), "RGB").save(folder / f"{i}.png")
    return root


def train_command(data: Path, run: Path) -> list[str]:
    command = [sys.executable, "-m", "mbv2train", "train", "--data", str(data), "--output-dir", str(run)]
    for item in SETTINGS:
        command += ["--set", item]
    return command


def eval_command(ckpt: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "mbv2train", "eval", "--ckpt", str(ckpt), "--data", str(data), "--json"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, run = make_images(tmp / "images"), tmp / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([*train_command(images, run), "--fault", f"sigterm_at_step={STOP_STEP}"],
                                cwd=tmp, env=env, capture_output=True, text=True)
        print(result.stdout + result.stderr)
        if result.returncode != 143:  # 128 + SIGTERM: stopped, with its checkpoint written
            print(f"expected exit code 143, got {result.returncode}", file=sys.stderr)
            return 1
        shutil.copyfile(run / "last.pt", OUTPUT)
        result = subprocess.run(eval_command(OUTPUT, images), cwd=tmp, env=env, capture_output=True, text=True,
                                check=True)
        report = json.loads(result.stdout)
        del report["ckpt"]  # a path on this machine
        EVAL_OUTPUT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes) and {EVAL_OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
