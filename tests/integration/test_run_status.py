"""`mbv2 train --status-file PATH`: how the run ended, in a file a job script can read (torchrun reports every
failed process as exit code 1, so the exit code cannot tell a clean stop from a crash)."""

import json

from helpers import train_args
from mbv2train.errors import ConfigError
from mbv2train.preemption import Preempted
from mbv2train.train.run_status import record_of, write_status


def status_train_args(image_root, run_dir, status, *extra):
    """train_args with --status-file STATUS."""
    return train_args(image_root, run_dir, *extra, options=["--status-file", status])


def test_a_stop_by_a_signal_records_the_signal_step_and_checkpoint_and_exits_0(cli, image_root, tmp_path):
    run, status = tmp_path / "run", tmp_path / "status.json"
    result = cli(*status_train_args(image_root, run, status, "train.epochs=5"), "--fault", "sigterm_at_step=2")
    # the file carries 128 + SIGTERM; the process exits 0 so that torchrun neither fails nor restarts the group
    assert result.exit_code == 0, result.output
    assert json.loads(status.read_text()) == {"exit_code": 143, "stopped_by": "SIGTERM", "step": 2,
                                              "checkpoint": str(run / "last.pt")}
    assert "stopped by SIGTERM at step 2" in result.stdout


def test_a_finished_run_records_exit_code_0(cli, image_root, tmp_path):
    status = tmp_path / "status.json"
    result = cli(*status_train_args(image_root, tmp_path / "run", status, "train.epochs=1"))
    assert result.exit_code == 0, result.output
    assert json.loads(status.read_text()) == {"exit_code": 0}


def test_a_config_mistake_records_exit_code_2_and_its_line(cli, image_root, tmp_path):
    status = tmp_path / "status.json"
    result = cli(*status_train_args(image_root, tmp_path / "run", status, "train.epochs=x"))
    assert result.exit_code == 2
    record = json.loads(status.read_text())
    assert record["exit_code"] == 2
    assert record["error"].startswith("--set train.epochs=x: train.epochs: expected an integer")
    assert f"error: {record['error']}" in result.stderr


def test_any_rank_writes_its_error_since_torchrun_may_end_rank_0_first(cli, image_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun gives the second process
    status = tmp_path / "status.json"
    result = cli(*status_train_args(image_root, tmp_path / "run", status, "train.epochs=x"))
    assert result.exit_code == 2
    assert json.loads(status.read_text())["exit_code"] == 2


def test_a_crash_is_recorded_as_exit_code_1_with_its_error_on_one_line():
    assert record_of(RuntimeError("CUDA error: an illegal memory access\nwas encountered")) == {
        "exit_code": 1, "error": "RuntimeError: CUDA error: an illegal memory access\\nwas encountered"}


def test_a_stop_that_ended_in_an_error_is_not_recorded_as_a_clean_stop():
    # an error raised while the stop's own exit was under way (its __context__ is the stop) is still an error
    try:
        try:
            raise Preempted(10, "run/last.pt", 7)
        except Preempted:
            raise ConfigError("train.output_dir: disk full")  # noqa: B904 - the stop is to stay its __context__
    except ConfigError as error:
        assert record_of(error) == {"exit_code": 2, "error": "train.output_dir: disk full"}


def test_only_rank_0_writes_a_finished_run(cli, image_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun gives the second process
    status = tmp_path / "status.json"
    result = cli(*status_train_args(image_root, tmp_path / "run", status, "train.epochs=1"))
    assert result.exit_code == 0, result.output
    assert not status.exists()


def test_the_first_error_stays_and_a_finished_run_replaces_it(tmp_path):
    status = tmp_path / "status.json"
    write_status(status, {"exit_code": 2, "error": "first"}, replace=False)
    write_status(status, {"exit_code": 1, "error": "second"}, replace=False)  # a process ended by the first
    assert json.loads(status.read_text()) == {"exit_code": 2, "error": "first"}
    write_status(status, {"exit_code": 0})  # a group torchrun restarted, finishing
    assert json.loads(status.read_text()) == {"exit_code": 0}
    assert [path.name for path in tmp_path.iterdir()] == ["status.json"]  # no temp file left
