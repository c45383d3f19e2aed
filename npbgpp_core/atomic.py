"""Writing files so that a failure (full disk, Ctrl-C, crash) never leaves a half-written
file: a temporary file in the same folder, fsync, then ``os.replace``."""

from __future__ import annotations

import errno
import os
import tempfile

# The permissions a plain open() would give (mkstemp's are 0600), read once at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_bytes(fileobj, data: bytes) -> None:
    """Write ``data`` to an open file (a seam so tests can simulate a full disk)."""
    fileobj.write(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, make_dirs: bool = True) -> None:
    """Write ``data`` to ``path``; on any error the temporary file is removed and an
    existing ``path`` is untouched. A full disk raises ``OSError(ENOSPC)`` saying so."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            _write_bytes(f, data)
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
