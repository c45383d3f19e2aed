"""pyproject.toml builds a wheel holding every tracked module and data file of the four
packages (a plain list of top-level packages left out every sub-package and the Hydra
configs, so an installed headless_train could not start)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("npbgpp_core", "kernels", "headless_train", "blender_addon")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "-C", ROOT, "ls-files", *PACKAGES], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_wheel_holds_every_module_and_data_file(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), src)
    files = _tracked()
    for rel in files:
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").iterdir()
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [f for f in files if f.endswith((".py", ".yaml", ".safetensors", ".cu", ".cpp", ".h", ".toml"))]
    missing = [f for f in wanted if f not in names]
    assert not missing, missing[:10]
    assert "headless_train/conf/system/npbgpp_sphere.yaml" in names and "npbgpp_core/models/npbgpp.py" in names
