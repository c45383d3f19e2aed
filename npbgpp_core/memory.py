"""Telling an out-of-memory failure from the others, for the readers that turn any other
failure into "bad file" (a bundle, a PLY cloud): running out of memory on a big file must reach
the user as out of memory, with advice about size, never as a damaged file. Torch-free (the
test is by type name), so Blender's own Python can use it."""

from __future__ import annotations

# What allocators write when they fail and report it as a RuntimeError (torch's CPU allocator,
# older CUDA builds, the C library): lower case, matched as substrings.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A host MemoryError, torch's OutOfMemoryError, an allocator failure reported as a
    RuntimeError ("out of memory", "not enough memory", "can't allocate memory"), or a
    DataLoader worker killed outright (:func:`killed_worker`)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(s in text for s in _OUT_OF_MEMORY_TEXTS):
        return True
    return killed_worker(exc) is not None


# torch's report of a DataLoader worker that died of SIGKILL, lower case: "DataLoader worker (pid
# 123) is killed by signal: Killed. " (the C library's name of the signal; matched as substrings).
_KILLED_WORKER_TEXTS = ("dataloader worker (pid", "is killed by signal: killed")


def killed_worker(exc: BaseException) -> BaseException | None:
    """torch's RuntimeError saying a DataLoader worker was killed by SIGKILL, when ``exc`` is it
    or was raised from it (torch's loader raises "DataLoader worker (pid(s) 123) exited
    unexpectedly" from it); None otherwise. Nothing in training sends its workers SIGKILL: on
    Linux it is most often the kernel's out-of-memory killer (each worker is a process holding
    its own batches), so it counts as the computer's memory running out."""
    link: BaseException | None = exc
    seen: set[int] = set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, RuntimeError) and all(s in str(link).lower() for s in _KILLED_WORKER_TEXTS):
            return link
        link = link.__cause__
    return None


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
