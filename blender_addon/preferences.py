"""Add-on preferences: the Python environment for the worker, torch status, PyTorch install."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import bpy
from bpy.props import StringProperty

ADDON_ID = __package__ or "npbgpp"
TORCH_PIN = "torch==2.13.0"
# What the worker imports besides torch (NeuralScene files, PLY files, dataset images).
WORKER_REQUIREMENTS = (TORCH_PIN, "safetensors==0.8.0", "plyfile==1.0.3", "pillow==11.3.0")


def deps_dir() -> str:
    """Folder the add-on owns for pip-installed PyTorch."""
    return bpy.utils.user_resource("SCRIPTS", path="npbgpp_deps", create=False)


def preferences() -> NPBGPPPreferences | None:
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    return None if addon is None else addon.preferences  # type: ignore[return-value]


def env_path() -> str:
    prefs = preferences()
    return bpy.path.abspath(prefs.python_env) if prefs is not None and prefs.python_env else ""


def add_deps_to_path() -> None:
    path = deps_dir()
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)


_torch_status: dict[str, str] = {}
_probes: dict[str, threading.Thread] = {}
CHECKING = "PyTorch: checking..."


def torch_status(refresh: bool = False) -> str:
    """One line: which torch the worker gets and its devices (probed in a subprocess, cached)."""
    key = env_path()
    if not refresh and key in _torch_status:
        return _torch_status[key]
    return _probe(key, deps_dir())


def torch_status_line() -> str:
    """The preferences' status line: the cached probe, or "checking" while a probe started
    here (main thread) runs in the background; a timer redraws the preferences when done."""
    key = env_path()
    if key in _torch_status:
        return _torch_status[key]
    if key not in _probes:
        thread = threading.Thread(target=_probe, args=(key, deps_dir()), daemon=True)
        _probes[key] = thread
        thread.start()

        def redraw_when_done() -> float | None:
            if thread.is_alive():
                return 0.2
            _probes.pop(key, None)
            for window in bpy.context.window_manager.windows:
                for area in window.screen.areas:
                    if area.type == "PREFERENCES":
                        area.tag_redraw()
            return None

        bpy.app.timers.register(redraw_when_done, first_interval=0.2)
    return CHECKING


def _probe(key: str, deps: str) -> str:
    """Run the worker's Python once to see its torch (no bpy here: runs on a thread too)."""
    from .worker_client import WorkerError, python_for_worker

    try:
        python = python_for_worker(key)
        code = (
            "import importlib.util as u, torch;d=['CPU']\n"
            "d=(['CUDA'] if torch.cuda.is_available() else [])+"
            "(['MPS'] if getattr(torch.backends,'mps',None) and torch.backends.mps.is_available() else [])+d\n"
            "m=[n for n in ('safetensors','plyfile','PIL') if u.find_spec(n) is None]\n"
            "print(torch.__version__, ','.join(d), ','.join(m) or '-')"
        )
        env = dict(os.environ)
        if os.path.isdir(deps):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (deps, env.get("PYTHONPATH", "")) if p)
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        if out.returncode == 0:
            version, devices, missing = out.stdout.split()[-3:]
            line = f"torch {version} ({devices}) in {python}"
            if missing != "-":
                line += f"; missing {missing}: use Install PyTorch"
        else:
            line = f"torch not importable in {python}"
    except (WorkerError, OSError, subprocess.SubprocessError) as exc:
        line = str(exc)
    _torch_status[key] = line
    return line


class _Install:
    """State of the background pip install (read by the preferences panel)."""

    running = False
    message = ""
    progress = 0.0


def _pip_install(python: str, target: str) -> None:
    cmd = [
        python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--retries", "1",
        "--timeout", "20", "--target", target, *WORKER_REQUIREMENTS,
    ]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail = []
        for line in proc.stdout:
            tail = (tail + [line.strip()])[-5:]
            _Install.message = line.strip()[:120]
            _Install.progress = min(0.95, _Install.progress + 0.02)
        code = proc.wait()
        if code == 0:
            _Install.message = f"Installed {', '.join(WORKER_REQUIREMENTS)} into {target}"
            _torch_status.clear()
        else:
            joined = " ".join(tail)
            offline = any(w in joined for w in ("Network", "connection", "resolve", "No matching distribution"))
            why = "pip could not reach the package index (offline?): " if offline else "pip failed: "
            _Install.message = why + joined[-200:]
    except OSError as exc:
        _Install.message = f"cannot run pip with {python}: {exc}"
    finally:
        _Install.progress = 1.0
        _Install.running = False


class NPBGPP_OT_install_torch(bpy.types.Operator):
    """Install PyTorch (and safetensors, plyfile, pillow) with pip into a folder this add-on owns,
    in the background"""

    bl_idname = "npbgpp.install_torch"
    bl_label = "Install PyTorch"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if _Install.running:
            self.report({"WARNING"}, "PyTorch install already running")
            return {"CANCELLED"}
        target = bpy.utils.user_resource("SCRIPTS", path="npbgpp_deps", create=True)
        _Install.running, _Install.progress, _Install.message = True, 0.0, f"pip install {TORCH_PIN} ..."
        threading.Thread(target=_pip_install, args=(sys.executable, target), daemon=True).start()
        self.report({"INFO"}, f"Installing {TORCH_PIN} into {target}")
        return {"FINISHED"}


class NPBGPP_OT_refresh_torch(bpy.types.Operator):
    """Check again whether the worker's Python can import torch"""

    bl_idname = "npbgpp.refresh_torch"
    bl_label = "Check PyTorch"

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({"INFO"}, torch_status(refresh=True))
        return {"FINISHED"}


class NPBGPPPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    python_env: StringProperty(  # type: ignore[valid-type]
        name="Python Environment",
        description="A python executable or virtual environment folder with torch for the worker "
        "(empty: Blender's own Python, with the add-on's installed PyTorch)",
        subtype="FILE_PATH", default="",
    )

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "python_env")
        row = layout.row()
        row.label(text=torch_status_line())
        row.operator(NPBGPP_OT_refresh_torch.bl_idname, text="", icon="FILE_REFRESH")
        row = layout.row()
        row.enabled = not _Install.running
        row.operator(NPBGPP_OT_install_torch.bl_idname, icon="IMPORT")
        if _Install.message:
            layout.label(text=_Install.message)
            if _Install.running:
                layout.progress(factor=_Install.progress, text="Installing")


CLASSES = (NPBGPP_OT_install_torch, NPBGPP_OT_refresh_torch, NPBGPPPreferences)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    add_deps_to_path()


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
