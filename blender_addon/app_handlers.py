"""Adding and removing the add-on's ``bpy.app.handlers`` functions, one rule for every module
that has some (blend_paths' save handlers, engine's render-job handlers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import bpy


def _same_function(handler: Callable, fn: Callable) -> bool:
    return (getattr(handler, "__module__", None), getattr(handler, "__name__", None)) == (fn.__module__, fn.__name__)


def add_handlers(pairs: Iterable[tuple[str, Callable]]) -> None:
    """Append each ``(kind, fn)`` to ``bpy.app.handlers.<kind>`` (kinds this Blender lacks are
    skipped). Persistent handlers outlive a register() that failed part-way, and a reload
    makes new function objects: copies of ``fn`` by module and name are dropped first, so a
    handler never runs twice."""
    for kind, fn in pairs:
        handlers = getattr(bpy.app.handlers, kind, None)
        if handlers is None:
            continue
        for old in [h for h in handlers if _same_function(h, fn)]:
            handlers.remove(old)
        handlers.append(fn)


def remove_handlers(pairs: Iterable[tuple[str, Callable]]) -> None:
    """Remove each ``(kind, fn)`` that :func:`add_handlers` added."""
    for kind, fn in pairs:
        handlers = getattr(bpy.app.handlers, kind, [])
        if fn in handlers:
            handlers.remove(fn)
