"""The headless commands' out-of-memory error: one line, ``error: out of host memory (RAM)
while ... (first line of the error). What to do``, through each command's own exit path for
bad input (exit status 2), instead of a MemoryError or torch OutOfMemoryError traceback.

What ran out (the computer's memory or a GPU's) comes from the exception; during what and
what to do from the step the command last announced with :func:`step` (each command runs in
a process of its own, one step at a time, so the last step announced is the one that failed,
and :func:`reset` starts a command afresh). The advice names the command's own options
(``export --max-side``, ``--max-points``, ``--device cpu`` when the GPU is the one that is
full); the figures it quotes come from :mod:`npbgpp_core.memory`, which the add-on's messages
quote too.

Every command outside Hydra but check-corpus ends through :func:`run_command`: a refusal (bad
input) or running out of memory is one line and exit status 2, and ``--debug`` (:func:`add_debug_flag`, the same in
export, fit, render, stage, prepare-capture, export-weights, average-weights and capture-sfm)
turns each such end into the error itself raised with its full traceback, for a bug report:
what training and evaluation show with ``hydra.verbose``. A DataLoader worker killed by a signal
is out of memory when it is SIGKILL (the RAM) or SIGBUS (shared memory), a crash with a line of
its own when it is SIGSEGV, SIGFPE, ... (:func:`worker_crash`), else (SIGTERM: a stop) raised."""

from __future__ import annotations

import re
import signal
import sys
from argparse import ArgumentParser
from collections.abc import Callable

from npbgpp_core.memory import (
    first_line,
    is_out_of_memory,
    killed_worker,
    ran_out_on_gpu,
    shared_memory_worker,
    worker_signal,
)

__all__ = [
    "add_debug_flag", "is_out_of_memory", "memory_error", "out_of_memory_exit", "reset", "run_command", "step",
    "worker_crash", "CRASH_SIGNALS", "OUT_OF_MEMORY_LINE", "WORKER_CRASH_LINE",
]

# The start of the line a command writes with :func:`memory_error`: ``stage`` finds its training
# child's in the training log by it (anywhere in a line: a logged one starts with the time and logger).
OUT_OF_MEMORY_LINE = re.compile(r"error: out of (host|GPU|shared) memory\b")
# The start of :func:`worker_crash`'s line as a command writes it, which ``stage`` finds likewise.
WORKER_CRASH_LINE = re.compile(r"error: a DataLoader worker crashed while\b")

# What to do about too little shared memory, after the step's way to fewer workers.
SHARED_MEMORY_FIX = "or give the system more shared memory (/dev/shm; a Docker container: docker run --shm-size=8g)"

_DOING = "starting"
_ADVICE = ""
_WORKERS = ""
_FEWER_WORKERS = ""


def step(doing: str, advice: str, workers: str = "", fewer_workers: str = "") -> None:
    """Announce the step the command starts now: ``doing`` ("reading view 3 of 12 ...") and
    what would need less memory there ("lower --max-side ..."), for :func:`memory_error`;
    ``workers``: what would when a DataLoader worker of the step was killed (fewer workers,
    fewer cached views), ``fewer_workers``: the step's way to fewer workers alone (a worker
    killed by a bus error: too little shared memory), for a step that loads data in workers."""
    global _DOING, _ADVICE, _WORKERS, _FEWER_WORKERS
    _DOING, _ADVICE, _WORKERS, _FEWER_WORKERS = doing, advice, workers, fewer_workers


def reset() -> None:
    """Forget the steps of an earlier command (a test runs several in one process)."""
    step("starting", "")


def memory_error(exc: BaseException, device: str, gpu_fix: str = "--device cpu") -> str:
    """The one-line message (without ``error: ``) for ``exc``, an out-of-memory failure
    (:func:`is_out_of_memory`) during the step last announced: what ran out (``device``'s
    memory when the GPU's allocator failed, shared memory when a DataLoader worker died of a
    bus error, the computer's otherwise: a photo is read into host memory whatever the
    device), and the step's advice, with ``gpu_fix`` (the command's way to the CPU) when a GPU
    is the one that is full."""
    worker = shared_memory_worker(exc)
    if worker is not None:  # workers hand batches over in /dev/shm: that ran out, not the RAM
        why = (f"{first_line(worker).split('. ')[0]}: the DataLoader's workers pass their batches through shared "
               "memory, /dev/shm, and a bus error there most often means it is full")
        return (f"out of shared memory (/dev/shm) while {_DOING} ({why}). {_sentence(_fewer_workers())}, "
                f"{SHARED_MEMORY_FIX}")
    worker = killed_worker(exc)
    if worker is not None:  # the computer's memory: a worker process killed by the system
        why = (f"{first_line(worker).rstrip('. ')}: most often the system's out-of-memory killer; on Linux "
               "journalctl -k or dmesg says so")
        advice = _WORKERS or _ADVICE or "run it on a computer with more memory"
        return f"out of host memory (RAM) while {_DOING} ({why}). {_sentence(advice)}"
    gpu = ran_out_on_gpu(exc)
    what = f"GPU memory ({device})" if gpu else "host memory (RAM)"
    advice = _ADVICE or "run it on a computer with more memory"
    if gpu and gpu_fix:
        advice += f", or {gpu_fix} when the GPU is the one that is full"
    return f"out of {what} while {_DOING} ({first_line(exc)}). {_sentence(advice)}"


def _fewer_workers() -> str:
    """The step's way to fewer DataLoader workers (:func:`step`), or the general one."""
    return _FEWER_WORKERS or "load the data without worker processes"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


# The signals a process gets from its own fault (native code's crash: a bad address, a division by
# zero, an illegal instruction, abort()). SIGBUS is shared memory's (memory.shared_memory_worker),
# SIGKILL the RAM's; any other (SIGTERM, SIGHUP, SIGINT, SIGQUIT) was sent to the worker, most often
# a stop sent to the whole process group (timeout, docker stop, a terminal), not a crash.
CRASH_SIGNALS = tuple(getattr(signal, n) for n in ("SIGSEGV", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS")
                      if hasattr(signal, n))


def worker_crash(exc: BaseException) -> str | None:
    """The one-line message (without ``error: ``) for ``exc`` when it is torch's error for a
    DataLoader worker killed by a crash's signal (:data:`CRASH_SIGNALS`: SIGSEGV, SIGFPE, ...
    from native code the data loading calls); None otherwise, for memory running out
    (:func:`is_out_of_memory`) and for a signal sent to the worker (SIGTERM: a stop, whose error
    is raised as it is). The crash happened in the worker process, so this one has no traceback
    of it (torch's text says only that the worker exited): the line names the signal and says how
    to see where it happens, with the data loaded in this process."""
    died = worker_signal(exc)
    if died is None or is_out_of_memory(exc):
        return None
    link, name = died
    # torch names the signal as the C library's strsignal does, which signal.strsignal calls (macOS's
    # "Segmentation fault: 11": the name before the colon, as worker_signal reads torch's)
    crash = next((s for s in CRASH_SIGNALS if (signal.strsignal(s) or "").split(":")[0] == name), None)
    if crash is None:
        return None
    what = f"{first_line(link).split('. ')[0].rstrip('.')}, {crash.name}"
    return (f"a DataLoader worker crashed while {_DOING} ({what}): the error is in that process, which leaves no "
            f"traceback here (its own message, if any, is above). {_sentence(_fewer_workers())} and run it again with "
            "python -X faulthandler to see where it fails")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def add_debug_flag(parser: ArgumentParser) -> None:
    """The commands' one switch for the traceback of an error they end with one line."""
    parser.add_argument("--debug", action="store_true",
                        help="on an error, raise it with its full traceback instead of the one-line message "
                             "(for a bug report)")


def out_of_memory_exit(exc: BaseException, device: str, gpu_fix: str = "--device cpu",
                       write: Callable[[str], None] = _to_stderr, debug: bool = False, prefix: str = "error: ") -> int:
    """A command's end on ``exc``, an error none of its own refusals caught: when it is out of
    memory, 2 after writing ``prefix`` and :func:`memory_error`'s line with ``write`` (stderr by
    default); a DataLoader worker crashed by a signal, 1 (a failure, not bad input) after
    :func:`worker_crash`'s line instead of torch's text; any other error, and these too with
    ``debug`` (``--debug``), is raised again: a bug's traceback is wanted. Called in the
    command's ``except Exception`` so every command ends out of memory alike."""
    if debug:
        raise exc
    if is_out_of_memory(exc):
        write(f"{prefix}{memory_error(exc, device, gpu_fix)}")
        return 2
    crash = worker_crash(exc)
    if crash is None:
        raise exc
    write(f"{prefix}{crash}")
    return 1


def run_command(body: Callable[[], int], refusals: tuple[type[BaseException], ...], debug: bool,
                device: str = "cpu", gpu_fix: str = "--device cpu", prefix: str = "error: ",
                write: Callable[[str], None] = _to_stderr) -> int:
    """A command's ``body()`` (its exit status) with the commands' one way to end on an error:
    one of ``refusals`` (bad input, its message says what to do) is written as one line after
    ``prefix`` and ends with 2, so is running out of memory (:func:`out_of_memory_exit`, which
    ends a DataLoader worker's crash with 1); any other error is raised again (a bug: its
    traceback is wanted). ``debug`` (``--debug``) raises the refusal and the out-of-memory error
    too, with the traceback of where they happened."""
    try:
        return body()
    except refusals as exc:
        if debug:
            raise
        write(f"{prefix}{exc}")
        return 2
    except Exception as exc:
        return out_of_memory_exit(exc, device, gpu_fix, write, debug, prefix)
