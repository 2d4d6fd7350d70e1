"""model.pretrained: runs that start from torchvision's weights, a torchvision-format state dict or an mbv2
checkpoint, and the one-line errors for files that cannot be used.

No test here reaches the network: TORCH_HOME points into the test's temp folder and torch.hub's download
function fails (the `offline` fixture), so a torchvision tag loads only a file a test has put in the cache.
"""

import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from helpers import TINY_RUN, load_ckpt, make_image_folder, metric_rows, run_ckpt, run_metrics
from mbv2train.config import load_config
from mbv2train.distributed import DistInfo
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted
from mbv2train.model.pretrained import torchvision_file
from mbv2train.train.build import BuiltRun, build_run as build
from mbv2train.train.trainer import fit

HEAD_KEYS = ("classifier.1.weight", "classifier.1.bias")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """An empty torch cache, and downloads that fail as they do without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def torchvision_weights(path: Path, width_mult: float = 0.25, num_classes: int = 1000, seed: int = 1) -> Path:
    """Save the state dict of a freshly initialized torchvision.models.mobilenet_v2 to ``path``."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.mobilenet_v2(width_mult=width_mult, num_classes=num_classes).state_dict(), path)
    return path


def build_run(cfg) -> BuiltRun:
    """What `mbv2 train` has built just before its first step."""
    return build(cfg, None, torch.device("cpu"), None, DistInfo())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backbone(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if not k.startswith("classifier.")}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ loading


def test_a_run_starts_from_exactly_the_weights_of_a_torchvision_state_dict(tmp_path, capsys):
    file = torchvision_weights(tmp_path / "tv.pth", width_mult=1.0)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(load_ckpt(file))
    # ImageNet's 1000 classes, one tiny image each: the file's classifier fits and is kept
    root = make_image_folder(tmp_path / "data", classes=[f"n{i:04d}" for i in range(1000)], train_per_class=1,
                             val_per_class=1, size=8)
    run = build_run(load_config(None, [f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
                                       f"model.pretrained={file}", f"train.output_dir={tmp_path / 'run'}"]))
    assert "loaded 314 tensors, nothing re-initialized" in capsys.readouterr().out
    assert run.cfg.model.width_mult == 1.0 and run.cfg.model.num_classes == 1000
    assert_same(run.model.state_dict(), reference.state_dict())

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)  # as the run computes (train.channels_last)
    reference = reference.to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        assert torch.equal(run.model.eval()(images), reference(images))


def test_another_number_of_classes_reinitializes_only_the_classifier(tiny_config, tmp_path, capsys):
    file = torchvision_weights(tmp_path / "tv.pth")
    saved = load_ckpt(file)
    run = build_run(tiny_config(f"model.pretrained={file}"))
    out = capsys.readouterr().out
    assert "loaded 312 tensors; re-initialized classifier.1.weight, classifier.1.bias " \
           "(1000 classes in the file, 3 in the data)" in out
    weights = run.model.state_dict()
    assert_same(backbone(weights), backbone(saved))
    # the classifier is the one a run from random init starts with (same seed)
    fresh = build_run(tiny_config(run_dir=tmp_path / "fresh")).model.state_dict()
    for key in HEAD_KEYS:
        assert weights[key].shape[0] == 3 and torch.equal(weights[key], fresh[key])
    assert not torch.equal(weights["features.0.0.weight"], fresh["features.0.0.weight"])


def test_an_unset_width_is_taken_from_the_file(tiny_config, tmp_path):
    file = torchvision_weights(tmp_path / "tv.pth", width_mult=0.5)
    run = build_run(tiny_config(f"model.pretrained={file}", "model.width_mult="))
    assert run.cfg.model.width_mult == 0.5
    assert_same(backbone(run.model.state_dict()), backbone(load_ckpt(file)))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_state_dict_saved_through_ddp_or_torch_compile_loads(tiny_config, tmp_path, prefix):
    plain = load_ckpt(torchvision_weights(tmp_path / "tv.pth"))
    torch.save({prefix + k: v for k, v in plain.items()}, tmp_path / "wrapped.pth")
    run = build_run(tiny_config(f"model.pretrained={tmp_path / 'wrapped.pth'}"))
    assert_same(backbone(run.model.state_dict()), backbone(plain))


def test_a_torchvision_tag_loads_the_cached_file_without_the_network(tiny_config, tmp_path, capsys):
    _, cached = torchvision_file("torchvision-v2")
    assert cached.is_relative_to(tmp_path / "torch_home")  # TORCH_HOME decides where torchvision's cache is
    torchvision_weights(cached, width_mult=1.0)
    run = build_run(tiny_config("model.pretrained=torchvision-v2", "model.width_mult="))
    assert f"pretrained: torchvision-v2 ({cached}, sha256 {sha256(cached)[:12]}" in capsys.readouterr().out
    assert run.cfg.model.width_mult == 1.0
    assert run.cfg.model.pretrained_sha256 == sha256(cached)
    assert_same(backbone(run.model.state_dict()), backbone(load_ckpt(cached)))


def test_a_torchvision_tag_without_its_file_offline_names_the_file_and_where_it_goes(cli, image_root, tmp_path):
    weights, cached = torchvision_file("torchvision-v1")
    result = cli("train", "--data", image_root, "--output-dir", tmp_path / "run",
                 *[a for item in TINY_RUN for a in ("--set", item)], "--set", "model.pretrained=torchvision-v1")
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert "mobilenet_v2-b0353104.pth" in result.stderr and str(cached.parent) in result.stderr
    assert weights.url in result.stderr and "network is unreachable" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_source_gives_its_weights_or_its_ema_weights(tiny_config, tmp_path):
    source = tmp_path / "source"
    fit(tiny_config("train.epochs=1", "train.ema=true", "train.ema_decay=0.5", run_dir=source))
    saved = run_ckpt(source)
    ema = {k.removeprefix("module."): v for k, v in saved["ema"].items() if k != "n_averaged"}
    raw = build_run(tiny_config(f"model.pretrained={source / 'last.pt'}", "model.width_mult=",
                                run_dir=tmp_path / "a"))
    from_ema = build_run(tiny_config(f"model.pretrained={source / 'last.pt'}", "model.pretrained_ema=true",
                                     "model.width_mult=", run_dir=tmp_path / "b"))
    assert raw.cfg.model.width_mult == 0.25  # from the checkpoint's config
    assert_same(raw.model.state_dict(), saved["model"])  # 3 classes, as in the checkpoint: all of it
    assert_same(from_ema.model.state_dict(), ema)
    assert not torch.equal(ema["features.0.0.weight"], saved["model"]["features.0.0.weight"])


def test_a_state_dict_of_as_many_classes_gives_its_classifier_whole(tiny_config, tmp_path, capsys):
    """A bare state dict has no class names: a classifier of the data's number of classes is taken as it is."""
    file = torchvision_weights(tmp_path / "tv.pth", num_classes=3)
    run = build_run(tiny_config(f"model.pretrained={file}"))
    assert "loaded 314 tensors, nothing re-initialized" in capsys.readouterr().out
    assert_same(run.model.state_dict(), load_ckpt(file))
    fresh = build_run(tiny_config(run_dir=tmp_path / "fresh")).model.state_dict()
    assert not torch.equal(run.model.state_dict()[HEAD_KEYS[0]], fresh[HEAD_KEYS[0]])


@pytest.fixture(scope="module")
def shapes_checkpoint(image_root, tmp_path_factory):
    """last.pt of a one-epoch run on the classes circle, square and triangle."""
    run = tmp_path_factory.mktemp("shapes") / "run"
    fit(load_config(None, [*TINY_RUN, f"data.root={image_root}", f"train.output_dir={run}", "train.epochs=1"]))
    return run / "last.pt"


@pytest.mark.parametrize("classes, kept", [
    (["apple", "mango", "zebra"], {}),
    (["square", "triangle", "zebra"], {"square": 1, "triangle": 2}),
    (["circle", "triangle"], {"circle": 0, "triangle": 2}),
    (["apple", "circle", "square", "triangle"], {"circle": 0, "square": 1, "triangle": 2}),
    (["circle", "square", "triangle"], {"circle": 0, "square": 1, "triangle": 2}),
], ids=["same_count_other_names", "shifted", "subset", "superset", "same_classes"])
def test_a_checkpoints_classifier_rows_go_to_the_classes_of_the_same_name(shapes_checkpoint, tmp_path, capsys,
                                                                         classes, kept):
    """``kept``: the data's classes found in the checkpoint (circle, square, triangle), with their row there.
    The other classes' rows are those a run from random init starts with (same seed)."""
    root = make_image_folder(tmp_path / "data", classes=classes, train_per_class=2, val_per_class=1)
    data = [*TINY_RUN, f"data.root={root}", "data.batch_size=2"]
    run = build_run(load_config(None, [*data, f"model.pretrained={shapes_checkpoint}",
                                       f"train.output_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    fresh = build_run(load_config(None, [*data, f"train.output_dir={tmp_path / 'fresh'}"])).model.state_dict()
    saved = load_ckpt(shapes_checkpoint)["model"]
    weights = run.model.state_dict()
    assert_same(backbone(weights), backbone(saved))
    for key in HEAD_KEYS:
        assert weights[key].shape[0] == len(classes)
        for row, name in enumerate(classes):
            if name in kept:
                assert not torch.equal(saved[key][kept[name]], fresh[key][row])  # the file's row is another
                assert torch.equal(weights[key][row], saved[key][kept[name]]), (key, name)
            else:
                assert torch.equal(weights[key][row], fresh[key][row]), (key, name)
    fresh_names = [name for name in classes if name not in kept]
    assert (f"loaded 312 tensors; classifier rows matched by class name: {len(kept)} kept, "
            f"{len(fresh_names)} initialized fresh (") in out
    assert f"3 classes in the file, {len(classes)} in the data)" in out
    assert "nothing re-initialized" not in out
    if fresh_names:
        assert f"initialized fresh ({', '.join(fresh_names)}; 3 classes" in out


def test_the_run_records_the_source_and_its_hash_in_config_and_checkpoints(cli, image_root, tmp_path):
    file = torchvision_weights(tmp_path / "tv.pth")
    run = tmp_path / "run"
    result = cli("train", "--data", image_root, "--output-dir", run,
                 *[a for item in TINY_RUN for a in ("--set", item)], "--set", "train.epochs=1",
                 "--set", f"model.pretrained={file}")
    assert result.exit_code == 0, result.output
    assert "re-initialized classifier.1.weight, classifier.1.bias" in result.stdout
    recorded = {"pretrained": str(file), "pretrained_ema": False, "pretrained_sha256": sha256(file)}
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert {k: config[k] for k in recorded} == recorded
    for name in ("last.pt", "best.pt"):
        model = load_ckpt(run / name)["config"]["model"]
        assert {k: model[k] for k in recorded} == recorded
    # the recorded config runs again, and its hash pins the file
    again = cli("train", "--config", run / "config.yaml", "--output-dir", tmp_path / "again")
    assert again.exit_code == 0, again.output
    torchvision_weights(file, seed=2)
    changed = cli("train", "--config", run / "config.yaml", "--output-dir", tmp_path / "changed")
    assert changed.exit_code == 2 and len(changed.stderr.splitlines()) == 1
    assert f"has SHA-256 {sha256(file)}, not the {recorded['pretrained_sha256']}" in changed.stderr


# ------------------------------------------------------------------------------------------ resuming


def test_a_resume_continues_the_checkpoint_without_reading_the_pretrained_file(tiny_config, tmp_path):
    file = torchvision_weights(tmp_path / "tv.pth")
    args = ["data.batch_size=2", f"model.pretrained={file}", "model.width_mult="]
    fit(tiny_config(*args, run_dir=tmp_path / "whole"))
    run = tmp_path / "stopped"
    with pytest.raises(Preempted):
        fit(tiny_config(*args, run_dir=run), faults=Faults(sigterm_at_step=5))
    file.unlink()  # a resume that read it again would fail; one that loaded it would end elsewhere
    fit(tiny_config(*args, run_dir=run), resume="auto")
    whole, resumed = (run_ckpt(d) for d in (tmp_path / "whole", run))
    assert_same(resumed["model"], whole["model"])
    assert resumed["config"]["model"] == whole["config"]["model"]  # width and hash as the run recorded them
    assert metric_rows(run) == \
           metric_rows(tmp_path / "whole")


def test_a_finished_run_from_a_pretrained_file_is_left_as_it_is(tiny_config, tmp_path, capsys):
    """Its width and hash, unset in the config, are the ones the run recorded: resumed again, the run is
    finished, not a changed experiment."""
    file = torchvision_weights(tmp_path / "tv.pth")
    args = ["data.batch_size=2", "train.epochs=1", f"model.pretrained={file}", "model.width_mult="]
    fit(tiny_config(*args))
    capsys.readouterr()
    file.unlink()
    assert fit(tiny_config(*args), resume="auto") == {}
    assert capsys.readouterr().out.splitlines()[0].startswith(f"nothing to train: {tmp_path / 'run'} already finished")


def test_a_checkpoint_saved_before_the_fine_tuning_keys_existed_still_resumes(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        fit(tiny_config("data.batch_size=2", run_dir=run), faults=Faults(sigterm_at_step=3))
    state = run_ckpt(run)
    for section, key in (("model", "pretrained"), ("model", "pretrained_ema"), ("model", "pretrained_sha256"),
                         ("optim", "backbone_lr_scale"), ("train", "freeze_backbone_epochs")):
        del state["config"][section][key]
    torch.save(state, run / "last.pt")
    fit(tiny_config("data.batch_size=2", run_dir=run), resume="auto")
    assert [r["epoch"] for r in run_metrics(run)] == [1, 2]


# ------------------------------------------------------------------------------------------ bad input


def _not_mobilenet(path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)


def _a_list(path: Path) -> None:
    torch.save([torch.zeros(3)], path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all" * 10)


def _bare_state_dict(path: Path) -> None:
    torchvision_weights(path)


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "model.pretrained: file not found: {file}"),
    (_garbage, [], "model.pretrained: {file} is not a state dict or an mbv2 checkpoint (a text file starting "
                   "'not a checkpoint at all"),
    (_a_list, [], "model.pretrained: {file} is neither a state dict nor an mbv2 checkpoint"),
    (_not_mobilenet, [], "model.pretrained: {file} does not hold MobileNetV2 weights"),
    (_bare_state_dict, ["model.pretrained_ema=true"], "model.pretrained_ema: {file} is a bare state dict"),
    (_bare_state_dict, ["model.width_mult=0.5"],
     "its weights are for width_mult 0.25, but model.width_mult is 0.5 (features.0.0.weight: [8, 3, 3, 3] vs "
     "[16, 3, 3, 3])"),
    (_bare_state_dict, ["model.pretrained_sha256=" + "ab" * 32], "has SHA-256"),
], ids=["missing", "garbage", "not_a_dict", "another_network", "ema_of_a_state_dict", "wrong_width", "wrong_hash"])
def test_a_pretrained_file_that_cannot_be_used_is_one_line_and_exit_2(cli, image_root, tmp_path, make, extra,
                                                                      message):
    file = tmp_path / "weights.pth"
    if make is not None:
        make(file)
    before = file.read_bytes() if file.exists() else None
    args = [a for item in [*TINY_RUN, f"model.pretrained={file}", *extra] for a in ("--set", item)]
    result = cli("train", "--data", image_root, "--output-dir", tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert message.format(file=file) in result.stderr
    assert not (tmp_path / "run").exists()
    if before is not None:
        assert file.read_bytes() == before


def test_ema_weights_asked_of_a_checkpoint_without_them_is_one_line(cli, image_root, tiny_config, tmp_path):
    source = tmp_path / "source"
    fit(tiny_config("train.epochs=1", run_dir=source))
    args = [a for item in [*TINY_RUN, f"model.pretrained={source / 'best.pt'}", "model.pretrained_ema=true"]
            for a in ("--set", item)]
    result = cli("train", "--data", image_root, "--output-dir", tmp_path / "run", *args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert f"model.pretrained_ema: {source / 'best.pt'} holds no EMA weights" in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["model.pretrained_ema=true"], "model.pretrained_ema: needs model.pretrained to be an mbv2 checkpoint file"),
    (["model.pretrained=torchvision-v2", "model.pretrained_ema=true"], "model.pretrained_ema: needs"),
    (["model.pretrained=torchvision-v2", "model.pretrained_sha256=abc"], "must be 64 hexadecimal digits"),
    (["model.pretrained_sha256=" + "a" * 64], "model.pretrained_sha256: is set but model.pretrained is not"),
])
def test_contradictory_pretrained_settings_are_config_errors(cli, overrides, message):
    result = cli("config", "show", *[a for item in overrides for a in ("--set", item)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert message in result.stderr


def test_only_training_reads_an_unset_width_from_a_file(cli, tmp_path):
    file = torchvision_weights(tmp_path / "tv.pth")
    # a torchvision tag has the paper's width: an unset width is 1.0 everywhere
    tagged = load_config(None, ["model.pretrained=torchvision-v1"])
    assert tagged.model.width_mult == 1.0
    # a file's width is known once it is read, which only mbv2 train does; elsewhere it must be given
    result = cli("summary", "--set", f"model.pretrained={file}")
    assert result.exit_code == 2 and "model.width_mult is unset" in result.stderr
    assert cli("summary", "--set", f"model.pretrained={file}", "--width-mult", "0.25").exit_code == 0
