"""Telling an out-of-memory failure from the others, for the readers that turn any other
failure into "bad file" (a bundle, a PLY cloud): running out of memory on a big file must reach
the user as out of memory, with advice about size, never as a damaged file. Torch-free (the
test is by type name), so Blender's own Python can use it."""

from __future__ import annotations

import re

# What allocators write when they fail and report it as a RuntimeError (torch's CPU allocator,
# older CUDA builds, the C library): lower case, matched as substrings.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A host MemoryError, torch's OutOfMemoryError, an allocator failure reported as a
    RuntimeError ("out of memory", "not enough memory", "can't allocate memory"), or a
    DataLoader worker killed outright (:func:`killed_worker`) or by a bus error, shared memory
    having run out (:func:`shared_memory_worker`)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(s in text for s in _OUT_OF_MEMORY_TEXTS):
        return True
    return killed_worker(exc) is not None or shared_memory_worker(exc) is not None


# torch's report of a DataLoader worker that died of a signal: "DataLoader worker (pid 123) is
# killed by signal: Killed. " (DataLoader.cpp; the C library's name of the signal: "Killed" for
# SIGKILL, "Bus error" for SIGBUS, which adds a sentence about shared memory, "Segmentation fault";
# macOS's appends the number, "Killed: 9": the name is what comes before the colon).
_WORKER_SIGNAL = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: ([^.:]+)[^.]*\.")


def worker_signal(exc: BaseException) -> tuple[BaseException, str] | None:
    """torch's RuntimeError saying a DataLoader worker was killed by a signal, when ``exc`` is
    it or was raised from it (torch's loader raises "DataLoader worker (pid(s) 123) exited
    unexpectedly" from it), with the signal's name as torch wrote it ("Killed", "Bus error",
    without macOS's ": 9"); None otherwise."""
    link: BaseException | None = exc
    seen: set[int] = set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        found = _WORKER_SIGNAL.search(str(link)) if isinstance(link, RuntimeError) else None
        if found is not None:
            return link, found[1]
        link = link.__cause__
    return None


def _worker_killed_by(exc: BaseException, name: str) -> BaseException | None:
    found = worker_signal(exc)
    return found[0] if found is not None and found[1] == name else None


def killed_worker(exc: BaseException) -> BaseException | None:
    """torch's error saying a DataLoader worker was killed by SIGKILL (:func:`worker_signal`),
    None otherwise. Nothing in training sends its workers SIGKILL: on Linux it is most often
    the kernel's out-of-memory killer (each worker is a process holding its own batches), so
    it counts as the computer's memory running out."""
    return _worker_killed_by(exc, "Killed")


def shared_memory_worker(exc: BaseException) -> BaseException | None:
    """torch's error saying a DataLoader worker was killed by SIGBUS ("Bus error"), None
    otherwise. Workers hand their batches over in shared memory (/dev/shm on Linux); a bus
    error there is in practice that memory being full, e.g. a Docker container's default 64
    MB, however much RAM is free, so it counts as memory running out, with its own advice."""
    return _worker_killed_by(exc, "Bus error")


# What a GPU's failure to allocate writes when it is not torch's OutOfMemoryError: a CUDA call's
# RuntimeError ("CUDA error: out of memory", cuBLAS / cuDNN) and Apple's MPS allocator
# ("MPS backend out of memory"), lower case, matched as substrings.
_GPU_TEXTS = ("cuda", "cublas", "cudnn", "mps backend")


def ran_out_on_gpu(exc: BaseException) -> bool:
    """Whether an out-of-memory failure (:func:`is_out_of_memory`) is a GPU's: torch's
    OutOfMemoryError is raised by its GPU allocators (its CPU allocator raises a RuntimeError,
    "DefaultCPUAllocator: can't allocate memory"; numpy and Python a MemoryError), other GPU
    failures name their backend (:data:`_GPU_TEXTS`)."""
    text = str(exc).lower()
    if "cpuallocator" in text:
        return False
    return type(exc).__name__ == "OutOfMemoryError" or any(s in text for s in _GPU_TEXTS)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for the
    parenthesis of an out-of-memory message: torch's CUDA message runs over several lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Peak memory of loading a NeuralScene bundle on the CPU, in times its file's size (BENCHMARKS.md,
# Loading a big bundle: 3.6-3.7x for 1 and 3 million points).
BUNDLE_LOAD_TIMES_FILE = 4

# What aggregating and fitting photos cost (BENCHMARKS.md, A user's capture with big photos; 2048 px:
# Aggregate's Photo Size): the add-on's and the headless commands' advice quote them.
AGGREGATE_PHOTOS_MEMORY = "about 3.6 GiB for photos of 11 megapixels (4032 px), 2.9 GiB at 2048 px on the CPU"
FIT_PHOTOS_MEMORY = "about 4 GiB to fit 20 photos of 11 megapixels (4032 px) on the CPU"
