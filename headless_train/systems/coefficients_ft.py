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

import torch

from npbgpp_core.fitting import coefficients_ft_loss
from npbgpp_core.models import NPBG, NPBGConfig, NPBGPlusPlusConfig

from .base import module_key
from .npbg import NPBGSystem

log = logging.getLogger(__name__)

# NPBG++ options that shape the coefficients_ft model (stored in its checkpoints).
SOURCE_KEYS = ("feature_dim", "basis_dim", "background", "background_rows", "world_up", "align_during_rendering",
               "render_canvas")


def coefficients_config(source: dict) -> NPBGConfig:
    """The NPBG model of coefficients_ft for a config dict ``source`` (a coefficients_ft
    checkpoint's, or an NPBG++ one's prepared by :class:`CoefficientsFTSystem`): its
    :data:`SOURCE_KEYS` as the NPBG++ network (defaults for the absent ones), rendered
    upright when ``align_during_rendering`` says so (absent, as in checkpoints written
    before the choice existed: no, the published NPBG)."""
    network = NPBGPlusPlusConfig.from_dict({k: source[k] for k in SOURCE_KEYS if k in source})
    return NPBGConfig.for_coefficients(network, bool(source.get("align_during_rendering", False)))


class CoefficientsFTSystem(NPBGSystem):
    system_name = "coefficients_ft"
    uses_render_loss = False

    def __init__(self, cfg: dict, scenes: list, source_config: dict | None = None):
        self._source = dict(source_config or {})
        # the run's up axis and render alignment, as cli.resolve_coefficients_frame chose them
        # (None when built without it: the source's)
        for key in ("world_up", "align_during_rendering"):
            if cfg["system"].get(key) is not None:
                self._source[key] = cfg["system"][key]
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
