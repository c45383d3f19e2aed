"""The public API as documented: every name npbgpp_core exports resolves lazily to its
module's object and is listed in the package docstring's Public API, and each signature the
README's Public API table writes names the real function's parameters with its defaults."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re

import npbgpp_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_api_rows() -> list[str]:
    """First cells of the README's "Public API (`npbgpp_core`)" table, backticks removed."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Public API (`npbgpp_core`)", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [row.split(" | ")[0].lstrip("| ") for row in rows]


def test_every_export_resolves_and_is_in_the_package_docstring() -> None:
    doc = npbgpp_core.__doc__.split("Example::")[0]
    for name, module in npbgpp_core._EXPORTS.items():
        value = getattr(npbgpp_core, name)
        assert value is getattr(importlib.import_module(module, "npbgpp_core"), name), name
        assert re.search(rf"\b{name}\b", doc), f"{name} is exported but not in npbgpp_core's Public API docstring"


def test_readme_signatures_match_the_functions() -> None:
    """A row written as a call, `name(a, b=1, ...)`, must name the function's leading
    parameters, then some of the others in their order (optional ones may be left out), with
    the defaults they really have."""
    checked = 0
    for cell in readme_api_rows():
        for part in re.findall(r"`([^`]+)`", cell):
            if part.isidentifier():  # a bare name: the package exports it
                assert hasattr(npbgpp_core, part), part
                continue
            match = re.fullmatch(r"([\w.]+)\((.*)\)(?: -> .*)?", part)
            if not match:
                continue
            dotted, params = match.groups()
            module_name, _, attr = dotted.rpartition(".")
            module = importlib.import_module(module_name) if module_name else npbgpp_core
            func = getattr(module, attr)
            call = ast.parse(f"f({params})", mode="eval").body
            real = inspect.signature(func).parameters
            positional = [a.id for a in call.args]
            assert positional == list(real)[: len(positional)], (dotted, positional, list(real))
            named = [k.arg for k in call.keywords if k.arg is not None]
            rest = iter(list(real)[len(positional):])
            assert all(name in rest for name in named), (dotted, named, list(real))  # in order, some left out
            if any(k.arg is None for k in call.keywords):  # **overrides
                assert any(p.kind is p.VAR_KEYWORD for p in real.values()), dotted
            for k in call.keywords:  # a literal, or a name the package exports (DEFAULT_SCALES)
                if k.arg is None:
                    continue
                value = getattr(npbgpp_core, k.value.id) if isinstance(k.value, ast.Name) else ast.literal_eval(k.value)
                assert value == real[k.arg].default, (dotted, k.arg, value, real[k.arg].default)
            checked += 1
    assert checked >= 6  # rasterize, rasterize_descriptors, rasterize_features, fit_bundle, densify_scene, ...
