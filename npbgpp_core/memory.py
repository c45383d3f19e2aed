"""Telling an out-of-memory failure from the others, for the readers that turn any other
failure into "bad file" (a bundle, a PLY cloud): running out of memory on a big file must reach
the user as out of memory, with advice about size, never as a damaged file. Torch-free (the
test is by type name), so Blender's own Python can use it."""

from __future__ import annotations

# What allocators write when they fail and report it as a RuntimeError (torch's CPU allocator,
# older CUDA builds, the C library): lower case, matched as substrings.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A host MemoryError, torch's OutOfMemoryError, or an allocator failure reported as a
    RuntimeError ("out of memory", "not enough memory", "can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OUT_OF_MEMORY_TEXTS)
