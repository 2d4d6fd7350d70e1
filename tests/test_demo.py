from pathlib import Path

import pytest

from mbv2train.config import load_config
from mbv2train.demo_data import write_demo_dataset
from mbv2train.tracking import read_metrics
from mbv2train.trainer import fit

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_a_short_demo_run_learns_the_real_digits(tmp_path):
    # Half the demo's schedule: short of its 98%, but far above chance (10%).
    write_demo_dataset(tmp_path / "digits")
    cfg = load_config(DEMO_CONFIG, [f"data.root={tmp_path / 'digits'}", f"train.output_dir={tmp_path / 'run'}",
                                    "train.epochs=5"])
    fit(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["val_top1"] > 0.8
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
