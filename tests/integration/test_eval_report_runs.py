"""Per-class summaries that training writes to TensorBoard, alone and summed over torchrun processes."""

import pytest

from helpers import eval_json, read_events, run_ckpt, torchrun, train_args


def per_class_table(events, tag):
    """The rows of the per-class Markdown table of each text event: [(class, images, top-1), ...]."""
    tables = []
    for event in events.Tensors(tag):
        text = event.tensor_proto.string_val[0].decode()
        rows = [line.strip("|").split("|") for line in text.split("\n\n")[0].splitlines()[2:]]
        tables.append((event.step, [(c.strip(), int(n), float(t)) for c, n, t in rows]))
    return tables


def test_tensorboard_gets_the_per_class_summary_of_each_epoch(cli, tiny_config, tmp_path):
    from mbv2train.train.trainer import fit

    fit(tiny_config("train.tb_per_class=true"))
    run = tmp_path / "run"
    tables = per_class_table(read_events(run), "per_class/val/text_summary")
    state = run_ckpt(run)
    assert [step for step, _ in tables] == [state["global_step"] // 2, state["global_step"]]
    out = eval_json(cli, "--ckpt", run / "last.pt", "--per-class")
    assert tables[-1][1] == [(r["class"], r["images"], pytest.approx(r["top1"], abs=1e-4)) for r in out["per_class"]]
    assert sum(images for _, images, _ in tables[-1][1]) == 12


@pytest.mark.slow
def test_torchrun_sums_the_per_class_counts_over_processes(image_root, tmp_path, cli):
    run = tmp_path / "ddp"
    # val batches of 5: rank 0 takes 6 of the 12 images, in 2 batches; rank 1 the other 6
    result = torchrun(train_args(image_root, run, "data.batch_size=4", "data.val_batch_size=5",
                                 "train.tb_per_class=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    tables = per_class_table(read_events(run), "per_class/val/text_summary")
    assert len(tables) == 2
    out = eval_json(cli, "--ckpt", run / "last.pt", "--per-class")
    assert tables[-1][1] == [(r["class"], r["images"], pytest.approx(r["top1"], abs=1e-4)) for r in out["per_class"]]
    assert [images for _, images, _ in tables[-1][1]] == [4, 4, 4]
