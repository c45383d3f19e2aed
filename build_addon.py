"""Pack the Blender add-on: ``python build_addon.py`` -> ``dist/npbgpp_blender-<version>.zip``.

The zip holds one folder ``npbgpp/`` with the add-on (``blender_manifest.toml`` for the
Blender 4.2+ extension installer, ``bl_info`` for the legacy add-on installer; its
``datagen/`` dataset generator included, ``demo.py`` left out) and
``npbgpp/vendor/{npbgpp_core,kernels}`` (torch is not bundled: the preferences install it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
ADDON_SRC = os.path.join(ROOT, "blender_addon")
PACKAGE = "npbgpp"
VENDORED = ("npbgpp_core", "kernels")
SKIP_DIRS = {"__pycache__", "build", ".pytest_cache", "dist"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".o", ".ninja_deps", ".ninja_log")
# Repository tools that live beside the add-on but need the repository (demo.py, journey.py import
# this file), so they stay out of the zip.
ADDON_SKIP_FILES = {"demo.py", "journey.py"}
FIXED_TIME = (2024, 1, 1, 0, 0, 0)  # reproducible archives
WEIGHTS_DIR = os.path.join("npbgpp_core", "weights")  # bundled pretrained weights travel in the zip
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024


def check_weights_size(root: str = ROOT) -> int:
    """Total size of the bundled ``*.safetensors`` files; ValueError above 20 MB."""
    folder = os.path.join(root, WEIGHTS_DIR)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    if total > MAX_WEIGHTS_BYTES:
        raise ValueError(f"bundled weights in {folder} are {total / 1e6:.1f} MB, over the 20 MB limit "
                         "(export them with --fp16)")
    return total


def manifest_version(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    if match is None:
        raise ValueError(f"no version in {path}")
    return match.group(1)


def _files(src: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(SKIP_SUFFIXES) and not name.startswith("."):
                out.append(os.path.join(dirpath, name))
    return out


def build(out_dir: str = os.path.join(ROOT, "dist")) -> str:
    """Write the zip atomically and return its path."""
    manifest = os.path.join(ADDON_SRC, "blender_manifest.toml")
    version = manifest_version(manifest)
    check_weights_size()
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"npbgpp_blender-{version}.zip")
    entries: list[tuple[str, str]] = []
    for path in _files(ADDON_SRC):
        if os.path.relpath(path, ADDON_SRC) in ADDON_SKIP_FILES:
            continue
        entries.append((path, f"{PACKAGE}/{os.path.relpath(path, ADDON_SRC)}"))
    for name in VENDORED:
        src = os.path.join(ROOT, name)
        if not os.path.isdir(src):  # npbgpp_core imports kernels.contract: both are needed
            raise FileNotFoundError(f"{src} is missing: the add-on cannot work without {name}")
        for path in _files(src):
            entries.append((path, f"{PACKAGE}/vendor/{name}/{os.path.relpath(path, src)}"))
    fd, tmp = tempfile.mkstemp(suffix=".zip", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path, arcname in entries:
                info = zipfile.ZipInfo(arcname.replace(os.sep, "/"), date_time=FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(path, "rb") as f:
                    zf.writestr(info, f.read())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "dist"), help="output folder (default dist/)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
