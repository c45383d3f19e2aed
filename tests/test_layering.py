"""The layering rules, checked on the source: the core, the kernels and the trainer never
import Blender's modules (also enforced by ruff's banned-api, TID251, in pyproject.toml),
and dependencies point inward (blender_addon -> headless_train -> npbgpp_core -> kernels,
the core reaching kernels only through npbgpp_core/_backend.py)."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLENDER_MODULES = {"bpy", "bpy_extras", "mathutils", "_cycles", "gpu", "gpu_extras", "bmesh", "addon_utils"}
# package -> top-level packages of this repository it must not import
INWARD = {
    "npbgpp_core": {"headless_train", "blender_addon", "bench", "build_addon"},
    "kernels": {"npbgpp_core", "headless_train", "blender_addon", "bench", "build_addon"},
    "headless_train": {"blender_addon", "bench", "build_addon"},
}


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in a file, function-level ones and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name included."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                if not node.args[0].value.startswith("."):
                    out.append((node.lineno, node.args[0].value.split(".")[0]))
    return out


def _sources(package: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "build")]
        files += [os.path.join(dirpath, n) for n in filenames if n.endswith(".py")]
    return sorted(files)


def _addon_nodes() -> Iterator[tuple[str, ast.AST]]:
    """(file:line, node) for every syntax node of the add-on's sources, for the tests that look
    for a copy of the core's names or numbers there."""
    for path in _sources("blender_addon"):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            yield f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', 0)}", node


def _protocol_value_alone(name: str) -> str:
    """What a fresh interpreter that imports npbgpp_core.protocol alone prints for ``name`` of it,
    followed by whether that import loaded torch ("<value> False" for a torch-free module)."""
    code = f"import sys; import npbgpp_core.protocol as P; print(P.{name}, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[0]


@pytest.mark.parametrize("package", sorted(INWARD))
def test_no_blender_modules_and_inward_dependencies(package):
    files = _sources(package)
    assert files, package
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
           for path in files for line, name in imported_modules(path)
           if name in BLENDER_MODULES or name in INWARD[package]]
    assert not bad, "\n".join(bad)


def test_core_reaches_kernels_only_through_backend():
    users = sorted(os.path.relpath(path, ROOT) for path in _sources("npbgpp_core")
                   if any(name == "kernels" for _, name in imported_modules(path)))
    assert users == [os.path.join("npbgpp_core", "_backend.py")]


def test_checker_sees_function_level_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    import bpy.types\n    from mathutils import Vector\n"
                   "    import importlib\n    importlib.import_module('_cycles')\n    __import__('bmesh')\n")
    assert [name for _, name in imported_modules(str(src))] == ["os", "bpy", "mathutils", "importlib", "_cycles",
                                                                 "bmesh"]


def test_the_choosing_checks_recipes_are_one_torch_free_tuple_the_addon_sends():
    """CHECK_RECIPES lives in npbgpp_core.protocol, which the add-on imports without torch (a fresh
    interpreter importing it loads no torch); fitting uses that very tuple, and no add-on source
    holds a copy of its names (Fit to Photos sends protocol's; tests/test_addon_render drives it)."""
    assert _protocol_value_alone("CHECK_RECIPES") == "('crops', 'whole') False"
    from npbgpp_core import fitting, protocol

    assert fitting.CHECK_RECIPES is protocol.CHECK_RECIPES
    names = set(protocol.CHECK_RECIPES)
    copies = [where for where, node in _addon_nodes()
              if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1
              and all(isinstance(e, ast.Constant) and e.value in names for e in node.elts)]
    assert not copies, copies


def test_the_choosing_checks_combines_are_one_torch_free_tuple():
    """CHECK_COMBINES (how a choosing check turns its recipes' fits into one) lives in
    npbgpp_core.protocol beside CHECK_RECIPES, loading no torch; fitting uses that very tuple, and
    FitBegin's default is its first ("choose", what older callers get), the one named default
    FIT_CHECK_COMBINE that fitting's keywords use too."""
    assert _protocol_value_alone("CHECK_COMBINES") == "('choose', 'average') False"
    from npbgpp_core import fitting, protocol

    assert fitting.CHECK_COMBINES is protocol.CHECK_COMBINES
    assert protocol.FitBegin("b", "d").check_combine == protocol.CHECK_COMBINES[0] == "choose"
    assert fitting.FIT_CHECK_COMBINE is protocol.FIT_CHECK_COMBINE == "choose"
    assert inspect.signature(fitting.fit_coefficients).parameters["check_combine"].default == "choose"


def test_the_whole_view_steps_are_one_torch_free_number_the_addon_says():
    """WHOLE_VIEW_STEPS, the steps of the choosing check's "whole" recipe, lives in
    npbgpp_core.protocol beside CHECK_RECIPES (a fresh interpreter importing it loads no torch);
    fitting runs that very number, and no add-on text says a number of steps of whole photos
    of its own (Also Try Whole Views' description said "50 steps" as it was written)."""
    assert _protocol_value_alone("WHOLE_VIEW_STEPS") == "50 False"
    from npbgpp_core import fitting, protocol

    # fitting binds the name by importing protocol's only (``is`` cannot tell: ints below 257 are
    # one object in CPython, so a number of fitting's own equal to it would pass)
    with open(fitting.__file__, encoding="utf-8") as f:
        bound = [node.lineno for node in ast.walk(ast.parse(f.read())) if isinstance(node, (ast.Assign, ast.AnnAssign))
                 and any(isinstance(t, ast.Name) and t.id == "WHOLE_VIEW_STEPS"
                         for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert not bound, bound
    assert [steps for _, steps, _, _ in fitting.candidate_recipes(("whole",), 7, 64, fitting.FitRecipe(1.0, 1.0))] == [
        protocol.WHOLE_VIEW_STEPS]
    literal = re.compile(r"\b\d+ steps of whole")
    said = [where for where, node in _addon_nodes()
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and literal.search(node.value)]
    assert not said, said
