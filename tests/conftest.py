"""Shared pytest setup: the repository root on sys.path, CUDA/bpy availability marks."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:
    import torch

    # The CI machine has 2 cores and tests use tiny tensors: one thread avoids
    # oversubscription, which made a tiny training step 40x slower here.
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard requirement of the suite
    pass


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
