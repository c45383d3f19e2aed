"""NPBG++ for Blender: a render engine drawing neural point-based images.

The network runs in a worker process by default (``worker.py``) so that Blender never
imports torch and a CUDA error or OOM only ends the worker. ``npbgpp_core`` and
``kernels`` travel inside the add-on (``vendor/``, put on ``sys.path`` while enabled).
"""

from __future__ import annotations

import atexit
import os
import sys

try:
    import bpy
except (ImportError, OSError):  # outside Blender: `python -m blender_addon.demo` reports what is missing
    bpy = None  # type: ignore[assignment]

bl_info = {
    "name": "NPBG++ Neural Point Renderer",
    "author": "NPBG++ Blender contributors",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "Render Properties > Render Engine > NPBG++; File > Import > NPBG++",
    "description": "Neural point-based rendering (NPBG++ / NPBG) as a render engine",
    "category": "Render",
}

VENDOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
_added_paths: list[str] = []


def _module_names() -> list[str]:
    return ["properties", "blend_paths", "preferences", "engine", "importers", "operators", "ui"]


def _modules() -> list:
    import importlib

    return [importlib.import_module(f".{name}", __package__) for name in _module_names()]


def _shutdown_worker() -> None:
    from .worker_client import HUB

    HUB.shutdown()


def _on_load_pre(*_args) -> None:
    _shutdown_worker()


if bpy is not None:
    _on_load_pre = bpy.app.handlers.persistent(_on_load_pre)


def register() -> None:
    if os.path.isdir(os.path.join(VENDOR_DIR, "npbgpp_core")) and VENDOR_DIR not in sys.path:
        sys.path.append(VENDOR_DIR)  # an installed copy of npbgpp_core (development) comes first
        _added_paths.append(VENDOR_DIR)
    for module in _modules():
        module.register()
    bpy.app.handlers.load_pre.append(_on_load_pre)
    atexit.register(_shutdown_worker)


def unregister() -> None:
    atexit.unregister(_shutdown_worker)
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    _shutdown_worker()
    for module in reversed(_modules()):
        module.unregister()
    while _added_paths:
        path = _added_paths.pop()
        if path in sys.path:
            sys.path.remove(path)
