"""Training systems (LightningModules) by config name: npbgpp (sphere/mean), npbg, coefficients_ft."""

from __future__ import annotations

from .base import BaseSystem


def build_system(cfg: dict, scenes: list, source_ckpt: dict | None = None) -> BaseSystem:
    """The system ``cfg['system']['name']`` over ``scenes``; ``source_ckpt`` is the weights_path
    checkpoint, or the resumed one (coefficients_ft reads its model's config from it: the NPBG++
    feature/basis sizes, background, and the up axis and render alignment
    where cli.resolve_coefficients_frame left them null)."""
    name = cfg["system"]["name"]
    if name == "npbgpp":
        from .npbgpp import NPBGPlusPlusSystem

        return NPBGPlusPlusSystem(cfg, scenes)
    if name == "npbg":
        from .npbg import NPBGSystem

        return NPBGSystem(cfg, scenes)
    if name == "coefficients_ft":
        from .coefficients_ft import CoefficientsFTSystem

        meta = (source_ckpt or {}).get("npbgpp", {})
        return CoefficientsFTSystem(cfg, scenes, meta.get("config") if source_ckpt else None)
    raise ValueError(f"unknown system '{name}' (expected npbgpp, npbg or coefficients_ft)")
