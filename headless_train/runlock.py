"""One run per run folder: ``<run dir>/run.lock`` holds an exclusive ``flock`` and the
holder's pid. A second run into the same folder refuses, naming that pid. The kernel drops
a flock when its process ends, however it ends, so a lock left by a killed run is free
and the next run takes it over (and says so)."""

from __future__ import annotations

import logging
import os
import socket
from types import TracebackType

from npbgpp_core.atomic import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The run folder is in use by another live process."""


def is_primary_process() -> bool:
    """False in the extra processes of a multi-process (DDP, Slurm) job: only the first
    process of the job takes the folder's lock, the others share it."""
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


class RunLock:
    """Context manager holding ``<folder>/run.lock`` for the life of a run."""

    def __init__(self, folder: str, setting: str = "hydra.run.dir") -> None:
        """``setting``: the option that chose ``folder``, named in the refusal."""
        self.folder = os.path.abspath(folder)
        self.setting = setting
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(200).strip()
        except OSError:
            return ""

    def acquire(self) -> RunLock:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - no flock (Windows): fall back to the pid alone
                fcntl = None  # type: ignore[assignment]
            previous = os.read(fd, 200).decode("utf-8", "replace").strip()
            prev_pid = int(previous.split()[0]) if previous.split() and previous.split()[0].isdigit() else None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = self._holder() or "unknown"
                    raise RunLockedError(
                        f"run folder {self.folder} is in use by another run (pid {holder.split()[0]}, "
                        f"lock {self.path}: {holder}); wait for it to end or choose another {self.setting}"
                    ) from None
            elif prev_pid is not None and prev_pid != os.getpid() and pid_alive(prev_pid):
                raise RunLockedError(
                    f"run folder {self.folder} is in use by another run (pid {prev_pid}, lock {self.path}); "
                    f"wait for it to end or choose another {self.setting}"
                )
            if prev_pid is not None and prev_pid != os.getpid():
                log.warning("%s: took over the lock of pid %d, which is gone", self.path, prev_pid)
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (nobody holds it) and drop the flock. The file stays: removing
        it could let two runs lock two different files of the same name."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
