"""Files that appear whole or not at all, with the permissions any file the user makes has.

A file is written under a temporary name beside its destination (same folder, so same filesystem), then
renamed over it: a reader sees the old file or the new one, never part of one. ``tempfile.mkstemp`` makes
its files 0600, private to the user, which suits a shared temp folder; but these files are outputs for
others to read (a checkpoint a colleague resumes, a model a service account serves), so the file that
takes the destination's name gets 0666 less the umask, as ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process's umask (reading it means setting it: put it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode() -> int:
    return 0o666 & ~umask()


def temp_file_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """An open temp file beside ``path``, named after it (.NAME.RANDOM + suffix), with the usual mode."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.chmod(name, usual_mode())
    return fd, Path(name)


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path`` for the block to write (by name: exporters open files themselves).

    When the block ends without an exception, the file is synced to disk and renamed over ``path``; when it
    raises (a failed check, Ctrl-C), the temp file is removed and ``path`` is untouched.
    """
    fd, temp = temp_file_beside(path, suffix)
    os.close(fd)
    try:
        yield temp
        # a writer may have put its own file in the temp file's place; its mode is then not ours
        os.chmod(temp, usual_mode())
        fsync_file(temp)
        os.replace(temp, path)
        fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temp:
        temp.write_text(text, encoding="utf-8")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
