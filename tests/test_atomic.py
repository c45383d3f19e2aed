"""npbgpp_core.atomic: whole files or nothing."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from npbgpp_core import atomic


def test_written_file_has_the_usual_permissions(tmp_path):
    path = tmp_path / "a.bin"
    atomic.atomic_write_bytes(path, b"hello")
    assert path.read_bytes() == b"hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with open(tmp_path / "plain.bin", "wb") as f:  # the same as a plain open() gives
        f.write(b"x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    atomic.atomic_write_bytes(path, b"old")

    def full_disk(fileobj, data):
        fileobj.write(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_bytes", full_disk)
    with pytest.raises(OSError, match="disk full while writing") as info:
        atomic.atomic_write_bytes(path, b"new contents")
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_missing_folder_is_an_error_unless_asked_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        atomic.atomic_write_bytes(tmp_path / "nope" / "a.bin", b"x", make_dirs=False)
    atomic.atomic_write_bytes(tmp_path / "made" / "a.bin", b"x")
    assert (tmp_path / "made" / "a.bin").read_bytes() == b"x"
