"""Tie a training process to the process that started it, so that a lost parent can never
mean an endless run (``python -m headless_train stage`` starts its Hydra training child so).

The parent puts its pid in the child's environment as ``HEADLESS_TRAIN_PARENT_PID``; the
child calls :func:`tie_to_parent_from_env` first thing. Then, however the parent ends
(SIGKILL included), the child receives SIGTERM, which the trainer turns into "write
last.ckpt and exit 143":

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (via ctypes): the kernel signals the child
  the moment the parent ends. It fires when the parent *thread* that started the child
  ends, so the parent must start it from a thread that lives as long as it does (the stage
  starts it from its main thread).
- Everywhere: a daemon thread checks once a second whether the parent has ended (POSIX: an
  orphan is re-parented, so ``os.getppid()`` changes; Windows never re-parents, its
  ``os.getppid()`` keeps the dead parent's id, which may be reused: there a handle to the
  parent, opened at once, is waited on). Where no PDEATHSIG exists it stops the process
  itself; in every case, if the process is still alive ``grace_s`` seconds after its
  parent went, it ends with ``os._exit(143)`` (a stop that hangs, e.g. in a stuck data
  loader). Checkpoints are written atomically (temporary file + rename), so this hard exit
  never leaves a half-written one.
- Windows: the stop is a simulated Ctrl-C in the main thread (the trainer saves last.ckpt
  at the next batch boundary, status 130): ``os.kill`` there is ``TerminateProcess`` (no
  last.ckpt) and Lightning handles no SIGTERM. This branch is not tested (no Windows here).

Standard library only: it runs before Hydra, torch or Lightning are imported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PARENT_ENV = "HEADLESS_TRAIN_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_status(signum: int) -> int:
    """The exit status of a process stopped by signal ``signum``, as a shell reports it
    (128 + the signal number): what a run, a stage or a GPU session reports when a signal
    stopped it (not 0, so that `train && export` and schedulers see the interruption)."""
    return 128 + int(signum)


# A run stopped by SIGTERM or Ctrl-C (after writing last.ckpt), and one whose parent is gone.
EXIT_SIGTERM = exit_status(signal.SIGTERM)
EXIT_SIGINT = exit_status(signal.SIGINT)


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the Linux kernel to send ``signum`` to this process when its parent ends. False
    where that is not available (not Linux, no libc, prctl refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stop_self() -> None:
    """Ask this process to stop the way its trainer saves last.ckpt (module doc)."""
    if os.name == "nt":
        import _thread

        _thread.interrupt_main()  # a Ctrl-C in the main thread
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def _windows_parent_check(parent: int) -> Callable[[], bool]:
    """Windows: whether process ``parent`` (this process's creator) has ended, through a
    handle opened now: the handle pins that very process, so a reused id cannot pass for
    it. A parent already gone (no such process, or the id names a process created after
    this one) reads as ended at once; one that cannot be opened is not watched."""
    import ctypes
    from ctypes import wintypes

    k = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k.OpenProcess.restype = wintypes.HANDLE
    k.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    k.WaitForSingleObject.restype = wintypes.DWORD
    k.GetCurrentProcess.restype = wintypes.HANDLE
    k.GetProcessTimes.argtypes = [wintypes.HANDLE] + [ctypes.POINTER(wintypes.FILETIME)] * 4
    k.GetProcessTimes.restype = wintypes.BOOL

    def created(handle: int) -> int | None:
        times = [wintypes.FILETIME() for _ in range(4)]
        if not k.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
            return None
        return (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime

    synchronize, query_limited, access_denied, wait_timeout = 0x00100000, 0x1000, 5, 0x102
    if os.getppid() != parent:
        return lambda: True
    handle = k.OpenProcess(synchronize | query_limited, False, parent)
    if not handle:
        if ctypes.get_last_error() == access_denied:  # alive, but not ours to watch
            log.warning("cannot watch parent process %d (access denied); trainer.max_minutes still applies", parent)
            return lambda: False
        return lambda: True
    mine, theirs = created(k.GetCurrentProcess()), created(handle)
    if mine is not None and theirs is not None and theirs > mine:
        return lambda: True  # the id was reused: the real parent is gone
    # The handle stays open for the life of the process (it is what pins the parent).
    return lambda: k.WaitForSingleObject(handle, 0) != wait_timeout


def parent_gone_check(parent: int) -> Callable[[], bool]:
    """A function telling whether process ``parent``, this process's parent now, has ended."""
    if os.name == "nt":
        return _windows_parent_check(parent)
    return lambda: os.getppid() != parent  # POSIX re-parents an orphan (to init or a subreaper)


def _watch(parent: int, gone: Callable[[], bool], pdeathsig: bool, grace_s: float, poll_s: float) -> None:
    while not gone():
        time.sleep(poll_s)
    if not pdeathsig:
        log.warning("parent process %d is gone: stopping", parent)
        _stop_self()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
    # Still here: the graceful stop hangs. Checkpoints are atomic, so nothing is half-written.
    os.write(2, f"parent process {parent} is gone and the run did not stop within {grace_s:.0f} s: "
                f"exiting now\n".encode())
    os._exit(EXIT_SIGTERM)


def tie_to_parent(parent: int, grace_s: float = 120.0, poll_s: float = 1.0, use_pdeathsig: bool = True) -> bool:
    """Stop this process (SIGTERM, a Ctrl-C on Windows; then ``os._exit`` after ``grace_s``)
    when process ``parent`` stops being its parent. Returns whether the kernel's
    parent-death signal is set. A parent already gone (it died before this ran) stops the
    process at once."""
    pdeathsig = use_pdeathsig and set_parent_death_signal(signal.SIGTERM)
    # Checked after prctl: a parent that died before the call would otherwise go unnoticed.
    gone = parent_gone_check(parent)
    threading.Thread(target=_watch, args=(parent, gone, pdeathsig, grace_s, poll_s), name="parent-watch",
                     daemon=True).start()
    if gone():
        _stop_self()
    return pdeathsig


def tie_to_parent_from_env(environ: dict[str, str] | None = None) -> int | None:
    """:func:`tie_to_parent` for the pid in ``HEADLESS_TRAIN_PARENT_PID``, which is removed
    from the environment so that this process's own children (DDP ranks, loader workers)
    do not watch a process that is not their parent. Returns that pid, or None when unset."""
    env = os.environ if environ is None else environ
    value = env.pop(PARENT_ENV, None)
    if not value:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"{PARENT_ENV} must be a process id, got {value!r}")
    parent = int(value)
    tie_to_parent(parent)
    return parent
