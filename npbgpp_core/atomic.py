"""Writing files and folders so that a failure (full disk, Ctrl-C, crash) never leaves a
half-written one under its final name.

- ``atomic_write_bytes(path, data)``: a temporary file in the same folder, fsync, then
  ``os.replace``; ``atomic_copy_file(src, dst)``: the same for a copy, streamed in chunks
  (a checkpoint of gigabytes is never held in memory whole); ``check_output_file(path)``:
  the same refusals (a folder, a missing folder, a folder that cannot be written) for
  commands to make before their work;
  ``check_output_suffix(path, suffix)``: an output named for another kind of file.
- ``atomic_directory(target)``: a context manager that builds a folder at the temporary
  sibling name ``<target>.partial-<pid>`` and renames it into place on success (removes it
  on failure).
- ``same_file(a, b)`` / ``holds(folder, path)``: the one rule for "this output is (or
  holds) an input" that every command and the add-on refuse before writing.
- ``file_version(path)``: what tells one saved version of a file from another without
  reading it, for caches that re-read a file only when it changed.
- ``is_partial_name(name)`` / ``is_listed_name(name)``: the one test every corpus or scene
  listing uses to skip such temporary folders (and hidden ones).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

# The permissions a plain open() would give (mkstemp's are 0600), read once at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_bytes(fileobj, data: bytes) -> None:
    """Write ``data`` to an open file (a seam so tests can simulate a full disk)."""
    fileobj.write(data)


# Bytes read and written at a time by atomic_copy_file: large enough that the copy runs at
# disk speed, small enough that copying a multi-GB checkpoint costs no memory to speak of.
COPY_CHUNK_BYTES = 1 << 20


def check_output_file(path: str | os.PathLike, example: str = "") -> None:
    """Whether a file can be written at ``path``: IsADirectoryError when it names a folder
    (with ``example``, a file name to suggest in it), FileNotFoundError when its folder is
    missing, PermissionError when nothing can be created in that folder (read-only). Commands
    call it before long work whose result is written at the end."""
    path = os.fspath(path)
    if os.path.isdir(path):
        hint = f", e.g. {os.path.join(path, example)}" if example else ""
        raise IsADirectoryError(f"{path} is a folder; give the file to write{hint}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: output folder does not exist: {folder}")
    # A probe file, not os.access: permissions alone miss read-only mounts and root's rights.
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as exc:
        raise PermissionError(f"{path}: cannot write in folder {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_suffix(path: str | os.PathLike, suffix: str) -> None:
    """ValueError unless ``path`` ends with ``suffix`` (any letter case, as the readers match
    it): a .ply written as ``a.txt`` is one no reader picks up as a cloud, and a weights file
    without ``.safetensors`` is read as a torch checkpoint. Commands call it before work."""
    path = os.fspath(path)
    if not path.lower().endswith(suffix.lower()):
        raise ValueError(f"{path} must end with {suffix} (it is written as a {suffix} file)")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: links resolved, and two existing paths also by
    identity (device and inode), since a name that differs only in case (case-insensitive
    file systems: macOS, Windows) or another mount of the folder is the same file there. A
    command writing ``a`` would replace the ``b`` it reads."""
    real_a, real_b = os.path.realpath(a), os.path.realpath(b)
    if real_a == real_b:
        return True
    try:
        return os.path.samefile(real_a, real_b)
    except OSError:  # one of them does not exist: nothing there to replace
        return False


def holds(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it: links resolved, and by identity of
    ``path``'s nearest existing folders (as :func:`same_file`), so a path that does not
    exist yet counts by where it would be. A command whose output folder holds its source
    would delete what it reads when it replaces the folder."""
    top, inner = os.path.realpath(folder), os.path.realpath(path)
    if inner == top or inner.startswith(top.rstrip(os.sep) + os.sep):
        return True
    try:
        top_stat = os.stat(top)
    except OSError:  # no such folder holds anything
        return False
    while True:
        try:
            if os.path.samestat(os.stat(inner), top_stat):
                return True
        except OSError:  # not there (yet): its parent may be
            pass
        parent = os.path.dirname(inner)
        if parent == inner:
            return False
        inner = parent


def atomic_write_bytes(path: str | os.PathLike, data: bytes, make_dirs: bool = True) -> None:
    """Write ``data`` to ``path``; on any error the temporary file is removed and an
    existing ``path`` is untouched. A full disk raises ``OSError(ENOSPC)`` saying so; a
    missing folder (without ``make_dirs``) or a folder at ``path`` is refused by name."""
    _atomic_write(path, lambda f: _write_bytes(f, data), make_dirs)


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike, make_dirs: bool = True) -> None:
    """Copy ``src`` to ``dst`` as :func:`atomic_write_bytes` writes (whole or not at all, the
    same refusals), reading :data:`COPY_CHUNK_BYTES` at a time so that a large file is never
    held in memory whole. A ``src`` that cannot be read fails before ``dst`` is touched."""
    with open(src, "rb") as source:

        def copy(f: BinaryIO) -> None:
            while chunk := source.read(COPY_CHUNK_BYTES):
                _write_bytes(f, chunk)

        _atomic_write(dst, copy, make_dirs)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], make_dirs: bool) -> None:
    """Run ``write`` on a temporary file beside ``path``, fsync, and rename it to ``path``;
    on any error remove the temporary file (``path`` stays as it was)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    check_output_file(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; the previous file is kept") from exc
        raise


PARTIAL = ".partial"
# <name>.partial-<pid> (ours), <name>.partial-<pid>-old (a replaced target on its way out) and
# <name>.partial (written by older versions, which had no pid in the name).
_PARTIAL_RE = re.compile(r"^(?P<base>.+)\.partial(?:-(?P<pid>\d+)(?:-old)?)?$")


def file_version(path: str | os.PathLike) -> tuple[int, ...]:
    """The stat fields that change whenever ``path`` is saved again (OSError when it is
    gone): size and modification time miss a re-save of the same size within the
    filesystem's timestamp resolution (1-2 s on FAT or SMB), but our writers replace a file
    (``atomic_write_bytes``), so a re-save also gets a new inode and change time."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_partial_name(name: str) -> bool:
    """True for the name of a folder that ``atomic_directory`` is still writing (or that a
    killed writer left behind): ``<name>.partial-<pid>``, and ``<name>.partial`` of older
    versions."""
    return _PARTIAL_RE.match(name) is not None


def is_listed_name(name: str) -> bool:
    """Whether a corpus or scene listing should consider a sub-folder ``name``: not hidden and
    not an unfinished ``atomic_directory`` folder (the one rule every listing uses)."""
    return not name.startswith(".") and not is_partial_name(name)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000 | 0x00100000, False, pid)  # query-limited | synchronize
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _remove_stale_partials(target: str) -> None:
    """Remove ``<target>.partial-<pid>[-old]`` folders whose process is gone (a killed run)."""
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        m = _PARTIAL_RE.match(name)
        if m and m["base"] == base and m["pid"] is not None and not pid_alive(int(m["pid"])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def occupied(path: str | os.PathLike) -> bool:
    """A file, a link or a non-empty folder: what :func:`atomic_directory` refuses to
    replace without ``overwrite`` (an empty folder may be replaced freely)."""
    path = os.fspath(path)
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        return True
    return os.path.isdir(path) and bool(os.listdir(path))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Build the folder ``target`` all at once: yields a new empty folder
    ``<target>.partial-<pid>`` beside it to write into; when the block ends normally the
    folder is renamed to ``target``, when it raises (or a generator around it is closed) the
    folder is removed and ``target`` is left as it was.

    An existing ``target`` (other than an empty folder) raises ``FileExistsError`` on entry
    and again at the rename (another process may have finished it meanwhile) unless
    ``overwrite``; then the old one is removed only once the new one is complete. Temporary
    folders of processes that are gone (killed runs) are removed on entry; the pid in the
    name keeps two live writers of the same target apart. Listings skip these folders with
    :func:`is_listed_name`."""
    target = os.path.abspath(os.fspath(target))
    if not overwrite and occupied(target):
        raise FileExistsError(f"{target}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(target)
    tmp = f"{target}{PARTIAL}-{os.getpid()}"
    _remove(tmp)  # left by an earlier failed attempt of this very process
    os.makedirs(tmp)
    try:
        yield tmp
        if not os.path.isdir(tmp):
            raise FileNotFoundError(f"{tmp}: the temporary folder vanished before it could become {target}")
        if occupied(target) and not overwrite:
            raise FileExistsError(f"{target}: appeared while it was being written (pass overwrite=True to replace it)")
        old = f"{tmp}-old"
        _remove(old)
        if os.path.lexists(target):
            os.rename(target, old)  # kept until the new folder is in place
        try:
            os.rename(tmp, target)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(target):
                os.rename(old, target)
            raise
        _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
