"""`mbv2 data photos` and `mbv2 bench data | model | train`: what they write and report, at tiny sizes.

Speed itself is never asserted; the tests check that each figure is there, sane, and computed as stated.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mbv2train.cli import app
from mbv2train.data.demo import write_photo_dataset
from mbv2train.errors import DataError

# the photo set and the bench runs (module fixtures) are built once, on one worker
pytestmark = pytest.mark.xdist_group("bench")

TINY = ["--set", "model.width_mult=0.25", "--set", "data.image_size=32", "--set", "data.val_resize=32",
        "--set", "data.val_crop=32", "--set", "data.batch_size=4", "--set", "train.device=cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def json_result(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # nothing but the JSON object on stdout


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photo_dataset(tmp_path_factory.mktemp("photos") / "set", classes=2, per_class=12,
                               val_per_class=2)


@pytest.fixture(scope="module")
def photo_root(photos):
    return Path(photos["path"])


def files_under(root) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


# ---------------------------------------------------------------- mbv2 data photos

def test_photo_set_has_the_asked_counts_of_jpegs(photo_root):
    for split, per_class in (("train", 12), ("val", 2)):
        classes = sorted(p.name for p in (photo_root / split).iterdir())
        assert classes == ["c000", "c001"]
        for name in classes:
            files = sorted((photo_root / split / name).iterdir())
            assert len(files) == per_class
            assert all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)  # JPEG by content


def test_photo_set_images_have_imagenet_like_sizes(photo_root):
    from PIL import Image

    sizes = []
    for path in sorted(photo_root.glob("train/*/*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode in ("RGB", "L")
            sizes.append(image.size)
    assert all(300 <= max(w, h) <= 640 and min(w, h) >= 160 for w, h in sizes)
    assert len(set(sizes)) > 1  # varied, not one size cut many times


def test_photo_set_is_the_same_for_the_same_options(photos, tmp_path):
    again = write_photo_dataset(tmp_path / "again", classes=2, per_class=12, val_per_class=2, workers=2)
    first, second = files_under(photos["path"]), files_under(again["path"])
    assert [p.relative_to(photos["path"]) for p in first] == [p.relative_to(again["path"]) for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_photo_set_already_there_is_left_as_it_is(photos):
    again = write_photo_dataset(photos["path"], classes=2, per_class=12, val_per_class=2)
    assert again["created"] is False


def test_photos_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "mine.txt").write_text("not a photo set")
    result = invoke("data", "photos", tmp_path, "--classes", "1", "--per-class", "1")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path} exists but is not the photo set of --classes 1 "
                                          f"--per-class 1 --val-per-class 1; remove it or pick another folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_photos_command_reports_what_it_wrote(tmp_path):
    result = invoke("data", "photos", tmp_path / "set", "--classes", "2", "--per-class", "3", "--val-per-class", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"photo set written: {tmp_path / 'set'} (6 train / 2 val JPEGs, 2 classes)"
    assert len(list((tmp_path / "set").glob("*/*/*.jpg"))) == 8


def test_photos_without_scikit_learn_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if it were missing
    with pytest.raises(DataError, match=r"needs scikit-learn: pip install 'mbv2train\[demo\]'"):
        write_photo_dataset(tmp_path / "set", classes=1, per_class=1)
    assert not (tmp_path / "set").exists()


# ---------------------------------------------------------------- mbv2 bench data

@pytest.fixture(scope="module")
def data_result(photo_root):
    return json_result("bench", "data", "--data", photo_root, "--workers", "0", "--batches", "3", *TINY)


def test_bench_data_reports_the_loader_against_the_reference(data_result):
    assert data_result["img_per_s"] > 0 and data_result["reference_img_per_s"] > 0
    assert data_result["ratio"] == pytest.approx(data_result["img_per_s"] / data_result["reference_img_per_s"])
    assert (data_result["device"], data_result["decode"], data_result["workers"]) == ("cpu", "workers", 0)


def test_bench_data_without_workers_is_per_core(data_result):
    assert data_result["threads"] == 1
    assert data_result["img_per_s_per_worker"] == data_result["img_per_s"]
    assert data_result["cpu_img_per_s"] > 0 and data_result["reference_cpu_img_per_s"] > 0
    assert data_result["cpu_ratio"] == pytest.approx(data_result["cpu_img_per_s"]
                                                     / data_result["reference_cpu_img_per_s"])


def test_bench_data_alternates_three_rounds_of_both_pipelines(data_result):
    assert len(data_result["rounds"]) == 3
    assert all(r["img_per_s"] > 0 and r["reference_img_per_s"] > 0 for r in data_result["rounds"])
    assert data_result["batches"] == 3 and data_result["batch_size"] == 4 and data_result["image_size"] == 32


def test_bench_data_measures_device_decoding(photo_root):
    result = json_result("bench", "data", "--data", photo_root, "--workers", "0", "--batches", "3",
                         "--decode", "device", "--no-reference", *TINY)
    assert result["decode"] == "device" and result["img_per_s"] > 0
    assert result["reference_img_per_s"] is None and result["ratio"] is None


def test_bench_data_text_output_names_the_ratio(photo_root):
    result = invoke("bench", "data", "--data", photo_root, "--workers", "0", "--batches", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert "ratio: " in result.stdout and "img/s per core" in result.stdout
    assert "round 1/1" in result.stderr  # progress on stderr, results on stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{root}", "--decode", "gpu"], "--decode gpu: data.decode: must be one of workers, device"),
    (["--data", "{root}", "--workers", "-1"], "--workers -1: data.num_workers: must be >= 0"),
    (["--data", "{root}", "--workers", "0", "--batches", "40"], "lower --batches or data.batch_size"),
])
def test_bench_data_bad_input_is_one_line_and_exit_2(photo_root, tmp_path, args, message):
    args = [a.format(root=photo_root, missing=tmp_path / "missing") for a in args]
    result = invoke("bench", "data", *args, *TINY)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


# ---------------------------------------------------------------- mbv2 bench model

def test_bench_model_reports_each_setting_against_the_plain_loop():
    result = json_result("bench", "model", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32",
                         "--memory-format", "channels_last", *TINY)
    assert [row["setting"] for row in result["rows"]] == ["fp32, channels_last"]
    assert all(row["train_img_per_s"] > 0 and row["infer_img_per_s"] > 0 for row in result["rows"])
    assert result["reference_img_per_s"] > 0
    assert result["img_per_s"] == max(row["train_img_per_s"] for row in result["rows"])
    assert result["ratio"] == pytest.approx(result["img_per_s"] / result["reference_img_per_s"])
    assert result["device"] == "cpu" and "peak_memory_gib" not in result["rows"][0]


@pytest.mark.parametrize("precision, message", [("fp16", "--precision: fp16 is not available"),
                                                ("int8", "--precision: 'int8' is not one of fp32, bf16, fp16")])
def test_bench_model_refuses_a_precision_the_device_lacks(precision, message):
    result = invoke("bench", "model", "--precision", precision, "--steps", "1", *TINY)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_bench_model_cpu_precisions_are_fp32_and_bf16():
    from mbv2train.bench.model import supported_precisions

    assert supported_precisions(torch.device("cpu")) == ["fp32", "bf16"]


# ---------------------------------------------------------------- mbv2 bench train

@pytest.fixture(scope="module")
def train_run(photo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(cwd)  # the default train.output_dir is relative: nothing may appear here
    try:
        result = json_result("bench", "train", "--data", photo_root, "--steps", "2", "--warmup", "1",
                             "--set", "data.num_workers=0", "--no-worker-trial", *TINY)
    finally:
        os.chdir(before)
    return result, cwd


def test_bench_train_reports_speed_data_wait_and_a_verdict(train_run):
    result, _ = train_run
    assert result["img_per_s"] > 0
    assert 0 <= result["data_wait_frac"] < 1
    assert result["verdict"] in ("data-bound", "compute-bound", "oversubscribed") and result["advice"]
    assert result["oversubscribed"] == (result["verdict"] == "oversubscribed")
    assert result["threads"] == torch.get_num_threads()  # OMP_NUM_THREADS is set: the count is left alone
    assert result["usable_cpus"] >= 1 and 0 <= result["others_busy_cpus"] <= result["cpus"]
    assert (result["steps"], result["batch_size"], result["workers"], result["decode"]) == (2, 4, 0, "workers")
    assert "decode_wait_ms_per_batch" not in result  # nothing is decoded in this process


def test_bench_train_with_device_decoding_reports_the_host_s_wait_in_the_decode(photo_root):
    result = json_result("bench", "train", "--data", photo_root, "--steps", "2", "--warmup", "1",
                         "--set", "data.num_workers=0", "--set", "data.decode=device", *TINY)
    assert result["decode"] == "device"
    assert result["decode_wait_ms_per_batch"] > 0 and 0 < result["decode_wait_frac"] < 1


def test_bench_train_times_the_worker_trial_it_decides_on_and_reports_both_figures(photo_root, monkeypatch):
    from mbv2train.bench import verdict

    monkeypatch.setattr(verdict, "worth_a_trial", lambda wait, load: 1)
    result = json_result("bench", "train", "--data", photo_root, "--steps", "2", "--warmup", "1",
                         "--set", "data.num_workers=0", *TINY)
    trial = result["worker_trial"]
    assert trial["workers"] == 1 and trial["threads"] >= 1 and trial["img_per_s"] > 0
    assert trial["faster"] == (trial["img_per_s"] >= verdict.TRIAL_GAIN * result["img_per_s"])
    advised = [line for line in result["advice"] if line.startswith("more loader workers: data.num_workers=1")]
    assert len(advised) == (trial["faster"] and result["verdict"] == "data-bound")
    skipped = json_result("bench", "train", "--data", photo_root, "--steps", "2", "--warmup", "1",
                          "--set", "data.num_workers=0", "--no-worker-trial", *TINY)
    assert skipped["worker_trial"] is None


def test_bench_train_text_says_what_the_worker_trial_gave_when_it_was_not_faster():
    from mbv2train.bench.train import format_train_result

    result = {"img_per_s": 327.0, "amp": "fp32", "channels_last": True, "compile": False, "batch_size": 32,
              "image_size": 32, "device": "cpu", "threads": 1, "workers": 0, "decode": "workers",
              "data_wait_frac": 0.12, "usable_cpus": 2, "others_busy_cpus": 0.1, "verdict": "data-bound",
              "worker_trial": {"workers": 1, "threads": 1, "img_per_s": 284.0, "faster": False},
              "advice": ["the loader is at this machine's limit"]}
    lines = format_train_result(result).splitlines()
    assert lines[0].endswith("cpu, 1 thread, 0 workers, workers decode)")
    assert lines[1] == "waiting for data: 12.0% of the time; other processes kept 0.1 of the 2 CPUs busy -> data-bound"
    assert lines[2] == "  tried: data.num_workers=1 gave 284 img/s against 327 with 0: more workers are no faster here"


def test_bench_train_writes_no_run_directory(train_run):
    _, cwd = train_run
    assert list(cwd.iterdir()) == []


def test_bench_train_with_missing_data_is_one_line_and_exit_2(tmp_path):
    result = invoke("bench", "train", "--data", tmp_path / "missing", *TINY)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and "does not exist" in result.stderr


def _judge(wait=0.30, img_per_s=327.0, usable=2, others=0.0, threads=1, workers=0, device="cpu", trial=None,
           heavy_augment=False):
    from mbv2train.bench import verdict as judge

    load = judge.Load(usable, others, threads, workers)
    return judge.verdict(wait, img_per_s, load, judge.Settings(device, "workers", heavy_augment), trial)


def test_little_waiting_for_data_is_compute_bound():
    from mbv2train.bench.verdict import DATA_BOUND_FRACTION

    kind, _ = _judge(wait=DATA_BOUND_FRACTION / 2, usable=4, workers=4)
    assert kind == "compute-bound"


def test_waiting_for_data_on_a_gpu_advises_device_decoding_and_no_untried_workers():
    kind, advice = _judge(wait=0.30, usable=16, workers=2, device="cuda")
    assert kind == "data-bound"
    assert any("data.decode=device" in line for line in advice)
    assert not any("worker" in line for line in advice)  # more workers are advised only once tried


def test_more_workers_are_advised_only_when_the_trial_was_faster():
    from mbv2train.bench.verdict import Trial

    # the demo on 2 cores with one thread: 1 worker gave 284 img/s against 327 with none
    kind, advice = _judge(trial=Trial(workers=1, threads=1, img_per_s=284.0))
    assert kind == "data-bound" and not any("more loader workers" in line for line in advice)
    assert advice == ["the loader is at this machine's limit: more CPUs, or faster storage if reading is slow "
                      "(`mbv2 bench data` measures the loader alone)"]
    _, advice = _judge(img_per_s=200.0, threads=2, trial=Trial(workers=1, threads=1, img_per_s=260.0))
    assert advice[0] == "more loader workers: data.num_workers=1, 1 thread gave 260 img/s against 200 with 0, 2 threads"


def test_a_trial_runs_only_when_data_bound_with_cpus_to_spare_and_no_crowd():
    from mbv2train.bench.verdict import Load, worth_a_trial

    assert worth_a_trial(0.30, Load(usable=2, others=0.0, threads=1, workers=0)) == 1
    assert worth_a_trial(0.30, Load(usable=8, others=0.0, threads=2, workers=2)) == 4
    assert worth_a_trial(0.30, Load(usable=2, others=0.0, threads=1, workers=2)) is None  # no CPU left for one
    assert worth_a_trial(0.01, Load(usable=8, others=0.0, threads=8, workers=0)) is None  # compute-bound
    assert worth_a_trial(0.30, Load(usable=2, others=1.9, threads=1, workers=0)) is None  # oversubscribed


def test_other_processes_crowding_the_cpus_make_the_verdict_oversubscribed_with_the_numbers():
    kind, advice = _judge(wait=0.30, others=1.3, threads=2, workers=0)
    assert kind == "oversubscribed"
    assert advice[0].startswith("other processes kept 1.3 of the 2 usable CPUs busy beside this run's 2 threads "
                                "and 0 loader workers")
    assert advice[1].startswith("fewer threads: train.threads=1")
    kind, advice = _judge(wait=0.01, others=1.9, threads=1)
    assert kind == "oversubscribed" and len(advice) == 1  # one thread already: nothing fewer to advise


@pytest.mark.parametrize("others, threads, usable", [(None, 2, 2), (0.3, 2, 2), (1.0, 1, 2), (3.0, 4, 8)])
def test_a_machine_with_room_for_the_run_is_not_oversubscribed(others, threads, usable):
    from mbv2train.bench.verdict import Load, oversubscribed

    assert not oversubscribed(Load(usable, others, threads, workers=0))


def test_sync_debug_mode_s_silence_is_not_sync_free_when_torchvision_decodes_on_the_gpu():
    from mbv2train.bench.train import sync_findings

    assert sync_findings(None, "workers") == {"sync_free": True, "sync_error": None, "unseen_sync": None}
    device = sync_findings(None, "device")
    assert device["sync_free"] is False and device["sync_error"] is None
    assert "decode_jpeg" in device["unseen_sync"] and "cudaStreamSynchronize" in device["unseen_sync"]
    seen = sync_findings("called a synchronizing CUDA operation", "workers")
    assert seen["sync_free"] is False and seen["sync_error"] == "called a synchronizing CUDA operation"
