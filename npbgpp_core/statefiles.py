"""Reading network weights from local files, safely (safetensors, or torch files loaded
with ``weights_only=True``: loading never executes code from the file)."""

from __future__ import annotations

import os

import torch

from .published import refusal


def load_state_dict_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` or torch state-dict file (a Lightning-style
    ``{"state_dict": ...}`` is unwrapped). ``what`` names the setting in error messages."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path} (nothing is downloaded; give a local file)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad file
        published = None if path.endswith(".safetensors") else refusal(path)
        if published:
            raise ValueError(f"{what}: {published}") from exc
        raise ValueError(f"{what}: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} does not hold a state dict (got {type(state).__name__})")
    published = refusal(path, [k for k in state if isinstance(k, str)])
    if published:
        raise ValueError(f"{what}: {published}")
    return state
