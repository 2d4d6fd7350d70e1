"""A file given as a checkpoint that is no checkpoint at all is named for what it is; a real checkpoint cut
short is "corrupt or truncated"."""

import io

import pytest
import torch
from PIL import Image

from mbv2train.checkpoint import load_checkpoint, save_checkpoint
from mbv2train.errors import CheckpointError


def _png(path):
    Image.new("RGB", (4, 4)).save(path)


def _jpeg(path):
    Image.new("RGB", (4, 4)).save(path, "JPEG")


def _torchscript(path):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    path.write_bytes(buffer.getvalue())


def _pt2(path):
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), str(path))


def _zip_of_files(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "hello")


@pytest.mark.parametrize("name, make, kind", [
    ("notes.txt", lambda p: p.write_text("epochs: 10\nlr: 0.1\n"), "a text file starting 'epochs: 10'"),
    ("empty.pt", lambda p: p.write_bytes(b""), "the file is empty"),
    ("cat.png", _png, "a PNG image"),
    ("cat.pt", _jpeg, "a JPEG image"),
    ("zeros.pt", lambda p: p.write_bytes(bytes(100)), "its first bytes, 00 00 00 00 00 00 00 00, are neither"),
    ("best.torchscript.pt", _torchscript, "a TorchScript model"),
    ("best.pt2", _pt2, "a torch.export program"),
    ("best.onnx", lambda p: p.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(50)), "an ONNX model"),
    ("best.pte", lambda p: p.write_bytes(b"\x1c\x00\x00\x00ET12" + bytes(50)), "an ExecuTorch program"),
    ("archive.pt", _zip_of_files, "a zip archive that torch.save did not write"),
])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, name, make, kind):
    path = tmp_path / name
    make(path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert str(refused.value).startswith(f"{path} is not an mbv2 checkpoint ("), refused.value
    assert kind in str(refused.value)


def test_a_checkpoint_cut_short_is_corrupt_or_truncated(tmp_path):
    whole = tmp_path / "last.pt"
    save_checkpoint({"format_version": 1, "model": {"w": torch.zeros(1000)}}, whole)
    for cut in (4, 100, whole.stat().st_size // 2):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(whole.read_bytes()[:cut])
        with pytest.raises(CheckpointError, match=f"^checkpoint is corrupt or truncated: {path}$"):
            load_checkpoint(path)
    assert load_checkpoint(whole)["model"]["w"].shape == (1000,)


def test_a_legacy_pickle_checkpoint_still_loads(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
