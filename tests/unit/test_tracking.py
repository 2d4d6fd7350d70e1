import io
import json
from contextlib import redirect_stdout


from mbv2train.progress import Progress
from mbv2train.train.tracking import read_metrics, truncate_metrics


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "val_top1": e / 10}) + "\n" for e in (1, 2, 3)))
    truncate_metrics(path, 2)
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2]


def test_progress_prints_a_line_every_n_steps_when_not_a_terminal():
    out = io.StringIO()
    with redirect_stdout(out):
        progress = Progress(total=7, desc="epoch 1/1", log_every=3)
        for _ in range(7):
            progress.update(lambda: {"loss": "0.5"})
        progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["3/7", "6/7", "7/7"]
    assert all("loss 0.5" in line for line in lines)


def test_progress_computes_numbers_only_when_it_shows_them():
    calls = []
    with redirect_stdout(io.StringIO()):
        progress = Progress(total=10, desc="x", log_every=5)
        for _ in range(10):
            progress.update(lambda: calls.append(1) or {})
    assert len(calls) == 2
