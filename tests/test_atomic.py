"""npbgpp_core.atomic: whole files or nothing."""

from __future__ import annotations

import errno
import os
import re
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


def test_copy_is_byte_identical_and_streamed_in_chunks(tmp_path, monkeypatch):
    """atomic_copy_file writes the source's bytes unchanged, never more than one chunk at a
    time (a multi-GB last.ckpt is not read into memory whole), with a plain file's permissions."""
    src = tmp_path / "last.ckpt"
    data = os.urandom(10_000)
    src.write_bytes(data)
    monkeypatch.setattr(atomic, "COPY_CHUNK_BYTES", 4096)
    written: list[int] = []
    plain = atomic._write_bytes
    monkeypatch.setattr(atomic, "_write_bytes", lambda f, chunk: (written.append(len(chunk)), plain(f, chunk))[1])
    atomic.atomic_copy_file(src, tmp_path / "epoch3.ckpt")
    assert (tmp_path / "epoch3.ckpt").read_bytes() == data
    assert written == [4096, 4096, 10_000 - 2 * 4096]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "epoch3.ckpt").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "empty").write_bytes(b"")
    atomic.atomic_copy_file(tmp_path / "empty", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b""


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_copy_failing_midway_leaves_no_partial_file(tmp_path, monkeypatch, error):
    """A full disk (or Ctrl-C) after the first chunk: no file under the new name, no temporary
    beside it, and an older file of that name is kept as it was."""
    src = tmp_path / "last.ckpt"
    src.write_bytes(os.urandom(10_000))
    monkeypatch.setattr(atomic, "COPY_CHUNK_BYTES", 4096)
    chunks = iter(range(100))
    plain = atomic._write_bytes

    def fails_at_second_chunk(fileobj, chunk):
        if next(chunks) == 1:
            fileobj.write(chunk[:10])
            raise error
        plain(fileobj, chunk)

    monkeypatch.setattr(atomic, "_write_bytes", fails_at_second_chunk)
    with pytest.raises(type(error)):
        atomic.atomic_copy_file(src, tmp_path / "epoch0.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / "epoch1.ckpt").write_bytes(b"older")
    chunks = iter(range(100))
    with pytest.raises(type(error)):
        atomic.atomic_copy_file(src, tmp_path / "epoch1.ckpt")
    assert (tmp_path / "epoch1.ckpt").read_bytes() == b"older"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch1.ckpt", "last.ckpt"]


def test_a_copy_of_a_missing_source_touches_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic.atomic_copy_file(tmp_path / "nothere.ckpt", tmp_path / "epoch0.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_an_error_unless_asked_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        atomic.atomic_write_bytes(tmp_path / "nope" / "a.bin", b"x", make_dirs=False)
    atomic.atomic_write_bytes(tmp_path / "made" / "a.bin", b"x")
    assert (tmp_path / "made" / "a.bin").read_bytes() == b"x"


def test_output_file_checks_name_the_path(tmp_path):
    """One check for 'is a folder' and 'missing folder' (the commands' --out, the add-on's
    output paths, atomic_write_bytes), naming the path given and the missing folder."""
    folder = re.escape(str(tmp_path))
    with pytest.raises(IsADirectoryError, match=f"^{folder} is a folder; give the file to write, e.g. "
                                                f"{re.escape(str(tmp_path / 'a.ply'))}$"):
        atomic.check_output_file(tmp_path, "a.ply")
    missing = tmp_path / "no" / "a.bin"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(missing))}: output folder does not exist: "
                                                f"{re.escape(str(tmp_path / 'no'))}$"):
        atomic.check_output_file(missing)
    atomic.check_output_file(tmp_path / "a.bin")
    # the suffix as the readers match it: any letter case, the whole suffix
    atomic.check_output_suffix(tmp_path / "A.PLY", ".ply")
    atomic.check_output_suffix("w.SafeTensors", ".safetensors")
    for bad in ("a.txt", "a.ply.txt", "aply", "a.ply "):
        with pytest.raises(ValueError, match=f"^{re.escape(bad)} must end with .ply"):
            atomic.check_output_suffix(bad, ".ply")
    (tmp_path / "sub").mkdir()
    # a folder in the way was found only by os.replace, with its bare errno message
    with pytest.raises(IsADirectoryError, match="sub is a folder; give the file to write$"):
        atomic.atomic_write_bytes(tmp_path / "sub", b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_directory_renames_into_place_on_success(tmp_path):
    target = tmp_path / "scene"
    with atomic.atomic_directory(target) as tmp:
        assert os.path.basename(tmp) == f"scene.partial-{os.getpid()}" and os.listdir(tmp) == []
        assert not target.exists()  # nothing under the final name while it is written
        (tmp_path / tmp / "a.txt").write_text("a")
    assert os.listdir(tmp_path) == ["scene"] and (target / "a.txt").read_text() == "a"


def test_atomic_directory_failure_leaves_no_target_and_no_temporary(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic.atomic_directory(tmp_path / "scene") as tmp:
            (tmp_path / tmp / "a.txt").write_text("half")
            raise ZeroDivisionError
    assert os.listdir(tmp_path) == []

    def gen():  # closing a generator early (a cancelled job) also cleans up
        with atomic.atomic_directory(tmp_path / "scene") as tmp:
            (tmp_path / tmp / "a.txt").write_text("half")
            yield 1
            yield 2
    g = gen()
    next(g)
    g.close()
    assert os.listdir(tmp_path) == []


def test_atomic_directory_does_not_clobber_unless_asked(tmp_path):
    target = tmp_path / "scene"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="scene: exists"):
        with atomic.atomic_directory(target):
            pass
    assert os.listdir(tmp_path) == ["scene"] and os.listdir(target) == ["old.txt"]
    # another writer finishes the target while this one is still writing: refused at the rename
    with pytest.raises(FileExistsError, match="appeared while"):
        with atomic.atomic_directory(tmp_path / "other") as tmp:
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / "theirs.txt").write_text("theirs")
            (tmp_path / tmp / "mine.txt").write_text("mine")
    assert os.listdir(tmp_path / "other") == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["other", "scene"]
    # a failed overwrite keeps the old target
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target, overwrite=True) as tmp:
            raise RuntimeError
    assert os.listdir(target) == ["old.txt"]
    with atomic.atomic_directory(target, overwrite=True) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["other", "scene"]
    (tmp_path / "empty").mkdir()  # an empty folder is not clobbering anything
    with atomic.atomic_directory(tmp_path / "empty") as tmp:
        (tmp_path / tmp / "x").write_text("x")
    assert os.listdir(tmp_path / "empty") == ["x"]


def test_stale_temporary_of_a_killed_writer_is_skipped_then_replaced(tmp_path):
    from headless_train.data import discover_scene_dirs
    from npbgpp_core.datasets.corpus import corpus_scenes

    os.makedirs(tmp_path / "env_1")
    (tmp_path / "env_1" / "transforms_train.json").write_text('{"frames": []}')
    dead = _dead_pid()
    stale = tmp_path / f"env_2.partial-{dead}"
    (stale / "train").mkdir(parents=True)
    (stale / "transforms_train.json").write_text('{"frames": []}')  # looks like a scene: must still be skipped
    (tmp_path / "env_3.partial").mkdir()  # the pid-less name of older versions
    assert [os.path.basename(s) for s in corpus_scenes(str(tmp_path))] == ["env_1"]
    assert [n for n, _ in discover_scene_dirs({"data_root": str(tmp_path)})] == ["env_1"]
    live = tmp_path / f"env_2.partial-{os.getppid()}"  # a live writer's folder is left alone
    live.mkdir()
    with atomic.atomic_directory(tmp_path / "env_2") as tmp:
        assert not stale.exists() and live.is_dir()
        (tmp_path / tmp / "transforms_train.json").write_text('{"frames": []}')
    assert sorted(os.listdir(tmp_path)) == sorted(["env_1", "env_2", "env_3.partial", live.name])


@pytest.mark.parametrize("name, partial", [("env_1.partial-123", True), ("env_1.partial", True),
                                           ("env_1.partial-123-old", True), ("env_1", False),
                                           ("env_1.partial-x", False), ("env_1.partially", False),
                                           (".partial", False)])
def test_partial_names(name, partial):
    assert atomic.is_partial_name(name) is partial
    assert atomic.is_listed_name(name) is (not partial and not name.startswith("."))


def test_output_file_check_finds_a_folder_it_cannot_write(tmp_path, monkeypatch):
    """A read-only output folder was found only when the result was written, after the
    whole work (densify: a traceback after minutes). The check now creates (and removes)
    a probe file, which also catches read-only mounts."""
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode: fail creation as the OS does for a user
            def refused(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(atomic.tempfile, "mkstemp", refused)
        with pytest.raises(PermissionError, match=f"^{re.escape(str(folder / 'a.ply'))}: cannot write in folder "
                                                  f"{re.escape(str(folder))} \\(Permission denied\\)$"):
            atomic.check_output_file(folder / "a.ply")
    finally:
        folder.chmod(0o755)
    monkeypatch.undo()
    atomic.check_output_file(folder / "a.ply")
    assert list(folder.iterdir()) == []


def test_holds_and_same_file_by_hand(tmp_path, monkeypatch):
    """The one "output is (or holds) an input" rule: relative paths, links, a path that does
    not exist yet, a sibling sharing the name's prefix, the file system root."""
    corpus = tmp_path / "corpus"
    (corpus / "scene").mkdir(parents=True)
    (tmp_path / "corpus2").mkdir()
    (tmp_path / "cloud.ply").write_bytes(b"x")
    os.symlink(corpus, tmp_path / "link")
    os.symlink(tmp_path / "cloud.ply", tmp_path / "alias.ply")
    monkeypatch.chdir(tmp_path)
    assert atomic.holds("corpus", corpus) and atomic.holds(corpus, "corpus/scene")
    assert atomic.holds("corpus", "link/new/deeper")  # not there yet, inside through the link
    assert atomic.holds("link", corpus / "scene" / "x.png")
    assert not atomic.holds(corpus, tmp_path / "corpus2") and not atomic.holds(corpus, tmp_path)
    assert not atomic.holds(tmp_path / "missing", tmp_path / "missing2" / "x")
    assert atomic.holds("/", tmp_path) and atomic.holds(os.sep, "relative/name")
    assert atomic.same_file("alias.ply", tmp_path / "cloud.ply") and atomic.same_file("cloud.ply", "./cloud.ply")
    assert not atomic.same_file("cloud.ply", "new.ply") and not atomic.same_file("new.ply", "new2.ply")
    assert atomic.same_file("new.ply", "./new.ply")  # one name, though nothing is there yet


def test_holds_and_same_file_see_another_name_of_the_folder(tmp_path):
    """A folder reached under another name that is no link (a bind mount here; on macOS and
    Windows a name differing in case): the paths compared as strings differ, so an output
    folder holding the source, or an output onto the input, passed the old string test."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    a, b = tmp_path / "data", tmp_path / "other_name"
    (a / "scene").mkdir(parents=True)
    (a / "scene" / "cloud.ply").write_bytes(b"x")
    b.mkdir()
    code = ("import sys; from npbgpp_core.atomic import holds, same_file; a, b = sys.argv[1:3]; "
            "print(holds(b, a + '/scene/new/x'), holds(a + '/scene', b + '/scene/out'), "
            "same_file(b + '/scene/cloud.ply', a + '/scene/cloud.ply'), holds(a + '/scene', b), "
            "same_file(b + '/scene/new.ply', a + '/scene/cloud.ply'))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$1" "$2"',
                          "sh", str(a), str(b), sys.executable, code],
                         capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    if run.returncode != 0 and "mount" in run.stderr + run.stdout and "Traceback" not in run.stderr:
        pytest.skip(f"no bind mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True", "True", "False", "False"]


def test_file_version_tells_a_resave_of_the_same_size_and_time(tmp_path):
    """A file replaced by atomic_write_bytes with as many bytes and its old modification time
    (a re-save within a FAT or SMB timestamp tick) has another version; an untouched one
    keeps its version, and a missing one raises OSError."""
    path = tmp_path / "a.bin"
    atomic.atomic_write_bytes(path, b"first")
    old = path.stat()
    version = atomic.file_version(path)
    assert atomic.file_version(path) == version
    atomic.atomic_write_bytes(path, b"again")
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert atomic.file_version(path) != version
    with pytest.raises(OSError):
        atomic.file_version(tmp_path / "missing.bin")
