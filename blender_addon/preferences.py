"""Add-on preferences: the Python environment for the worker, torch status, PyTorch install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from typing import Any

import bpy
from bpy.props import EnumProperty, StringProperty

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


PROBE_MARK = "npbgpp-torch-check"  # starts the line the probe's Python prints


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
            f"print({PROBE_MARK!r}, torch.__version__, ','.join(d), ','.join(m) or '-')"
        )
        env = dict(os.environ)
        if os.path.isdir(deps):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (deps, env.get("PYTHONPATH", "")) if p)
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        # the marked line only: another program may exit 0 and print anything (its arguments)
        found = [w for w in (line.split() for line in out.stdout.splitlines()) if len(w) == 4 and w[0] == PROBE_MARK]
        if out.returncode == 0 and found:
            version, devices, missing = found[-1][1:]
            line = f"torch {version} ({devices}) in {python}"
            if missing != "-":
                line += f"; missing {missing}: use Install PyTorch"
        elif out.returncode == 0:  # e.g. a Python Environment that names some other program
            line = f"{python} does not look like a Python interpreter (it did not run the torch check)"
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


CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's own index of CPU-only wheels
_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


def pip_commands(python: str, target: str, build: str, raw_progress: bool) -> list[list[str]]:
    """The pip calls that install the worker's requirements into ``target``: 'CPU' takes
    torch from PyTorch's CPU-only index (a few hundred MB instead of several GB), 'CUDA'
    from PyPI (its Linux and Windows wheels carry CUDA); the rest always from PyPI."""
    base = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--retries", "1",
            "--timeout", "20", "--target", target]
    if raw_progress:
        base += ["--progress-bar", "raw"]  # machine-readable "Progress N of M" lines
    others = [r for r in WORKER_REQUIREMENTS if r != TORCH_PIN]
    if build == "CPU":
        return [base + ["--index-url", CPU_INDEX, TORCH_PIN], base + others]
    if build == "CUDA":
        return [base + list(WORKER_REQUIREMENTS)]
    raise ValueError(f"unknown PyTorch build {build!r}")


def _pip_supports_raw_progress(python: str) -> bool:
    """pip >= 24.1 prints raw progress lines."""
    try:
        out = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    match = re.match(r"pip (\d+)\.(\d+)", out.strip())
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (24, 1)


def _show(message: str, fraction: float | None) -> None:
    _Install.message = message[:160]
    if fraction is not None:
        _Install.progress = fraction


def _pip_install(python: str, target: str, build: str = "CPU", show: Any = _show) -> None:
    """Run pip (background thread), passing each line and pip's own download progress to
    ``show(message, fraction or None)``; the outcome ends up in ``_Install.message``."""
    tail: list[str] = []
    package = ""
    try:
        for cmd in pip_commands(python, target, build, _pip_supports_raw_progress(python)):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.strip()
                progress = _PROGRESS.search(line)
                if progress is not None:
                    done, total = int(progress.group(1)), max(1, int(progress.group(2)))
                    show(f"Downloading {package}: {done / 1e6:.0f} of {total / 1e6:.0f} MB", done / total)
                    continue
                if line.startswith(("Collecting ", "Downloading ")):
                    package = line.split()[1]
                tail = (tail + [line])[-5:]
                show(line, None)
            code = proc.wait()
            if code != 0:
                joined = " ".join(tail)
                offline = any(w in joined for w in ("Network", "connection", "resolve", "No matching distribution"))
                why = "pip could not reach the package index (offline?): " if offline else "pip failed: "
                _Install.message = why + joined[-200:]
                return
        _Install.message = f"Installed {', '.join(WORKER_REQUIREMENTS)} ({build} build) into {target}"
        _torch_status.clear()
    except OSError as exc:
        _Install.message = f"cannot run pip with {python}: {exc}"
    finally:
        _Install.progress = 1.0
        _Install.running = False


class NPBGPP_OT_install_torch(bpy.types.Operator):
    """Install PyTorch (and safetensors, plyfile, pillow) with pip into a folder this add-on owns,
    in the background, showing pip's download progress"""

    bl_idname = "npbgpp.install_torch"
    bl_label = "Install PyTorch"
    build: EnumProperty(  # type: ignore[valid-type]
        name="Build",
        description="Which PyTorch to install",
        items=[
            ("CPU", "CPU only", "From PyTorch's CPU index: a few hundred MB, runs everywhere"),
            ("CUDA", "NVIDIA GPU (CUDA)", "PyTorch's default build with CUDA (several GB; Linux and Windows)"),
        ],
        default="CPU",
    )

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        return context.window_manager.invoke_props_dialog(self)

    def execute(self, context: bpy.types.Context) -> set[str]:
        if _Install.running:
            self.report({"WARNING"}, "A PyTorch install is already running.")
            return {"CANCELLED"}
        target = bpy.utils.user_resource("SCRIPTS", path="npbgpp_deps", create=True)
        _Install.running, _Install.progress, _Install.message = True, 0.0, f"pip install {TORCH_PIN} ..."
        threading.Thread(target=_pip_install, args=(sys.executable, target, self.build), daemon=True).start()
        self.report({"INFO"}, f"Installing {TORCH_PIN} ({self.build} build) into {target}.")
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
