"""Files mbv2 writes for others to read appear whole, and with the mode the umask gives (not mkstemp's 0600)."""

import stat

import pytest
import torch

from mbv2train import atomic_files
from mbv2train import checkpoint as ckpt


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_and_their_copies_have_the_mode_the_umask_gives(tmp_path, shared_umask):
    ckpt.save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.pt")
    ckpt.save_checkpoint({"step": torch.tensor(2)}, tmp_path / "last.pt", keep_previous=tmp_path / "previous.pt")
    ckpt.copy_checkpoint(tmp_path / "last.pt", tmp_path / "best.pt")
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "last.pt": shared_umask, "previous.pt": shared_umask, "best.pt": shared_umask}


def test_a_file_written_by_name_replaces_its_destination_only_when_the_writing_ends(tmp_path, shared_umask):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"before")
    with pytest.raises(KeyboardInterrupt):
        with atomic_files.replacing(out, suffix=".onnx") as temp:
            assert temp.parent == tmp_path and temp.suffix == ".onnx" and temp != out
            temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("model.onnx", b"before")]

    with atomic_files.replacing(out, suffix=".onnx") as temp:
        temp.unlink()  # a writer that puts a file of its own, with its own mode, in the temp file's place
        temp.write_bytes(b"after")
        temp.chmod(0o600)
        assert out.read_bytes() == b"before"
    assert [(p.name, p.read_bytes(), mode(p)) for p in tmp_path.iterdir()] == [("model.onnx", b"after", shared_umask)]
