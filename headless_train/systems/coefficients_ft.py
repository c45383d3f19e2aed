"""coefficients_ft (the published recipe): NPBG machinery on the 56 NPBG++ coefficients per
point (from ``descriptors_pretrained_dir``) with the NPBG++ basis MLP frozen; RMSprop 0.1 on
the coefficients, Adam 1e-4 on the refiner, L1 at full, 1/2 and 1/4 resolution
(``npbgpp_core.fitting.coefficients_ft_loss``, as in the add-on's fitting loop).

These published values are kept for the long (40k-step) runs this system makes. The
200-step fits of the add-on, the demo and bench_quality (``npbgpp_core.fitting.fit_coefficients``)
use their own short-fit defaults instead (lower coefficient rate, higher refiner rate,
two crops per step), measured in BENCHMARKS.md "Short coefficient fits"."""

from __future__ import annotations

import logging
import os

import torch

from npbgpp_core.fitting import coefficients_ft_loss
from npbgpp_core.models import NPBG, NPBGConfig

from ..checkpoints import BACKGROUND_SUFFIX, map_world_up
from .base import module_key
from .npbg import NPBGSystem

log = logging.getLogger(__name__)

# NPBG++ options that shape the coefficients_ft model (stored in its checkpoints).
SOURCE_KEYS = ("feature_dim", "basis_dim", "background", "background_rows", "world_up", "align_during_rendering",
               "render_canvas")


def coefficients_config(source: dict) -> NPBGConfig:
    """The NPBG model of coefficients_ft for a config dict ``source`` (a coefficients_ft
    checkpoint's, or an NPBG++ one's prepared by :class:`CoefficientsFTSystem`): (1 + m) * C
    coefficients per point, the frozen basis, the NPBG++ environment background (a learnable
    map) when the source has one, and whether rolled views render upright (absent, as in
    checkpoints written before the choice existed: no, the published NPBG)."""
    c, m = int(source.get("feature_dim", 8)), int(source.get("basis_dim", 6))
    return NPBGConfig(descriptor_dim=(1 + m) * c, feature_dim=c, use_basis=True, basis_dim=m,
                      background=str(source.get("background", "none")),
                      background_rows=int(source.get("background_rows", 16)),
                      world_up=tuple(source.get("world_up", (0.0, 1.0, 0.0))),
                      align_during_rendering=bool(source.get("align_during_rendering", False)),
                      render_canvas=str(source.get("render_canvas", "bounds")))


def run_world_up(scfg: dict, scene_names: list[str]) -> tuple[float, float, float] | None:
    """The up axis of a coefficients_ft run, None: the source's. It belongs to the scenes,
    not to the source's weights (a weights file's own +Z need not be theirs): the given
    ``system.world_up``; else (null) the frame the files it starts from record (in
    ``descriptors_pretrained_dir``: the coefficients ``<scene>`` and environment maps
    ``<scene>.background`` that the NPBG++ evaluation or an earlier coefficients_ft run wrote
    with its world_up), so evaluate -> fine-tune -> test agree without a flag: the model
    renders upright about the axis the coefficients were aggregated with, and reads the map
    in its frame. ValueError naming the field or the files."""
    from npbgpp_core.models.alignment import check_world_up

    up = scfg.get("world_up")
    if up is not None:
        try:
            return check_world_up(up)
        except ValueError as exc:
            raise ValueError(f"system.world_up: {exc}") from None
    folder = scfg.get("descriptors_pretrained_dir")
    paths = [os.path.join(str(folder), n + suffix) for n in scene_names for suffix in ("", BACKGROUND_SUFFIX)
             ] if folder else []
    frames = {p: map_world_up(p) for p in paths if os.path.isfile(p)}
    frames = {p: f for p, f in frames.items() if f is not None}
    if len({tuple(round(v, 6) for v in f) for f in frames.values()}) > 1:
        raise ValueError("system.world_up=null, but the descriptor files lie in different frames: "
                         + ", ".join(f"{p}: {list(f)}" for p, f in frames.items()) + "; give system.world_up")
    if frames:
        path, up = next(iter(frames.items()))
        log.info("system.world_up=null: %s, the frame of %s", list(up), path)
        return up
    return None


class CoefficientsFTSystem(NPBGSystem):
    system_name = "coefficients_ft"
    uses_render_loss = False

    def __init__(self, cfg: dict, scenes: list, source_config: dict | None = None,
                 source_system: str | None = None):
        self._source = dict(source_config or {})
        wanted = cfg["system"].get("align_during_rendering")
        if wanted is not None and not isinstance(wanted, bool):
            raise ValueError(f"system.align_during_rendering must be true, false or null, got {wanted!r}")
        if source_system != "coefficients_ft":
            # Started from an NPBG++ network: render upright as the library's fits do
            # (npbgpp_core.fitting.FIT_ALIGNED; false: the published NPBG) when that network does.
            from npbgpp_core.fitting import FIT_ALIGNED

            self._source["align_during_rendering"] = (FIT_ALIGNED if wanted is None else wanted) and bool(
                self._source.get("align_during_rendering", True))
        elif wanted is not None and wanted != bool(self._source.get("align_during_rendering", False)):
            # a coefficients_ft checkpoint (resumed, or tested) keeps the choice it was trained with
            had = str(bool(self._source.get("align_during_rendering", False))).lower()
            raise ValueError(f"system.align_during_rendering={str(wanted).lower()}, but the coefficients_ft "
                             f"checkpoint this run continues was trained with {had}: leave it null")
        up = run_world_up(cfg["system"], [s.name for s in scenes])
        if up is not None:
            self._source["world_up"] = list(up)
        super().__init__(cfg, scenes)
        self.basis = self.scene_model(0).basis
        for sid in range(1, len(self.scene_names)):
            self.scene_model(sid).basis = self.basis
        self.loss_factors = tuple(int(f) for f in self.scfg.get("loss_factors", (1, 2, 4)))

    def npbg_config(self) -> NPBGConfig:
        return coefficients_config(self._source)

    def metadata(self) -> dict:
        meta = super().metadata()
        ncfg = self.npbg_config().to_dict()
        meta["config"] = {**self.scfg, **{k: ncfg[k] for k in SOURCE_KEYS}}
        return meta

    def after_descriptors_loaded(self, model: NPBG, descriptors: torch.Tensor) -> None:
        seen = descriptors.abs().sum(1) > 0  # NPBG++ writes zeros for points no input view saw
        with torch.no_grad():
            model.active.copy_(seen if bool(seen.any()) else torch.ones_like(seen))

    def sample_loss(self, sample: dict):
        loss = self.step_loss(sample, coefficients_ft_loss(self.loss_factors))
        return loss, {"l1": loss}

    def load_initial_weights(self, ckpt: dict, path: str) -> None:
        state = ckpt["state_dict"]
        if ckpt.get("npbgpp", {}).get("system") == "npbgpp":
            basis = {k[len("model.basis."):]: v for k, v in state.items() if k.startswith("model.basis.")}
            refiner = {k[len("model.refiner."):]: v for k, v in state.items() if k.startswith("model.refiner.")}
            if not basis:
                raise ValueError(f"checkpoint {path} has no basis MLP (NPBG++ with aggregator 'mean'?); "
                                 "coefficients_ft needs the 'sphere' aggregator")
            try:
                self.basis.load_state_dict(basis)
                self.refiner.load_state_dict(refiner)
            except RuntimeError as exc:
                raise ValueError(f"checkpoint {path}: NPBG++ weights do not fit: {exc}") from exc
            log.info("coefficients_ft: basis MLP and refiner from NPBG++ checkpoint %s", path)
        else:
            self.load_matching(state, path, required_prefixes=("refiner.", "basis."))
        self.basis.requires_grad_(False)


__all__ = ["CoefficientsFTSystem", "module_key"]
