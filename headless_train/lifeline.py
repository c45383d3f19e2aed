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
- Everywhere: a daemon thread polls ``os.getppid()`` once a second. Where no PDEATHSIG
  exists it sends the SIGTERM itself; in every case, if the process is still alive
  ``grace_s`` seconds after its parent went, it ends with ``os._exit(143)`` (a stop that
  hangs, e.g. in a stuck data loader). Checkpoints are written atomically (temporary file +
  rename), so this hard exit never leaves a half-written one.

Standard library only: it runs before Hydra, torch or Lightning are imported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PARENT_ENV = "HEADLESS_TRAIN_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXIT_ORPHANED = 128 + signal.SIGTERM  # what a run stopped by SIGTERM reports (checkpoints.EXIT_SIGTERM)


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


def _watch(parent: int, pdeathsig: bool, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    if not pdeathsig:
        log.warning("parent process %d is gone: stopping (SIGTERM to myself)", parent)
        os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
    # Still here: the graceful stop hangs. Checkpoints are atomic, so nothing is half-written.
    os.write(2, f"parent process {parent} is gone and the run did not stop within {grace_s:.0f} s: "
                f"exiting now\n".encode())
    os._exit(EXIT_ORPHANED)


def tie_to_parent(parent: int, grace_s: float = 120.0, poll_s: float = 1.0, use_pdeathsig: bool = True) -> bool:
    """Stop this process (SIGTERM, then ``os._exit`` after ``grace_s``) when process
    ``parent`` stops being its parent. Returns whether the kernel's parent-death signal is
    set. A parent already gone (it died before this ran) stops the process at once."""
    pdeathsig = use_pdeathsig and set_parent_death_signal(signal.SIGTERM)
    # Checked after prctl: a parent that died before the call would otherwise go unnoticed.
    threading.Thread(target=_watch, args=(parent, pdeathsig, grace_s, poll_s), name="parent-watch",
                     daemon=True).start()
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
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
