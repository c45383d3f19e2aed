"""NPBG (Aliev et al., ECCV 2020): learnable per-point descriptors and background, the same
rasterizer and refiner as NPBG++, rendered by NPBG++'s own path (:mod:`.rendering`):
in the view's frame as published, or with ``config.align_during_rendering`` upright on the
aligned canvas as NPBG++. With ``use_basis`` the descriptors are NPBG++ coefficients
[ym; beta] (coefficients_ft) turned into per-camera descriptors by a frozen basis MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..camera import Camera
from .aggregator import BasisMLP, descriptors_from_coefficients
from .background import refiner_background_rasters
from .config import NPBGConfig, NPBGPlusPlusConfig
from .npbgpp import check_points, refine_dense
from .refiner import Refiner
from .rendering import DescriptorRendering


class NPBG(DescriptorRendering, nn.Module):
    """``.descriptors`` (N, D) (zeros), ``.background`` (feature_dim,) (zeros),
    ``.refiner``; ``.basis`` (frozen) only with ``use_basis``. ``.active`` (N,) bool
    buffer: points that are rasterized (all by default). With ``background='environment'``
    also ``.environment`` (feature_dim + 1, rows, 2 rows) (zeros): a learnable NPBG++
    environment map looked up per pixel for the refiner's background projections.
    ``render(points, camera)``: the scene argument of :class:`DescriptorRendering` is the
    (N, 3) point cloud."""

    def __init__(self, num_points: int, config: NPBGConfig | dict | None = None) -> None:
        super().__init__()
        if not isinstance(config, NPBGConfig):
            config = NPBGConfig.from_dict(config)
        if num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {num_points}")
        self.config = config
        self.num_points = int(num_points)
        self.descriptors = nn.Parameter(torch.zeros(num_points, config.descriptor_dim))
        self.background = nn.Parameter(torch.zeros(config.feature_dim))
        self.register_buffer("active", torch.ones(num_points, dtype=torch.bool))
        self.basis: BasisMLP | None = None
        if config.use_basis:
            self.basis = BasisMLP(config.basis_dim)
            self.basis.requires_grad_(False)
        self.refiner = Refiner(config.feature_dim + 1, 4 if config.predict_mask else 3,
                               background_channels=config.background_channels)
        self.environment: nn.Parameter | None = None
        if config.background_channels:
            rows = config.background_rows
            self.environment = nn.Parameter(torch.zeros(config.background_channels, rows, 2 * rows))
        self._init_rendering()

    @property
    def device(self) -> torch.device:
        return self.descriptors.device

    @classmethod
    def from_npbgpp_coefficients(
        cls,
        points: torch.Tensor,
        coefficients: torch.Tensor,
        basis_state: dict[str, torch.Tensor],
        refiner_state: dict[str, torch.Tensor],
        config: NPBGPlusPlusConfig | dict | None = None,
        valid: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
        aligned: bool = False,
    ) -> NPBG:
        """coefficients_ft: descriptors = the NPBG++ coefficients (N, 1 + m, C) flattened,
        the basis MLP from ``basis_state`` (frozen), the refiner from ``refiner_state``.
        ``config`` is the NPBG++ model's config; ``valid`` marks the points to render;
        ``background`` the scene's environment map (NPBG++ with ``background='environment'``:
        the start of the learnable ``.environment``; None starts it at zero). ``aligned``:
        render as the NPBG++ model does (its ``align_during_rendering`` and
        ``render_canvas``), so the unfitted model renders the NPBG++ image; False: every
        view in its own frame (the published NPBG)."""
        if not isinstance(config, NPBGPlusPlusConfig):
            config = NPBGPlusPlusConfig.from_dict(config)
        if config.aggregator != "sphere":
            raise ValueError("coefficients_ft needs the 'sphere' aggregator (the mean variant has no basis)")
        points = check_points(points)
        n, rows, c = coefficients.shape
        if n != points.shape[0] or rows != 1 + config.basis_dim or c != config.feature_dim:
            raise ValueError(
                f"coefficients must be (N={points.shape[0]}, {1 + config.basis_dim}, {config.feature_dim}), "
                f"got {tuple(coefficients.shape)}"
            )
        model = cls(n, NPBGConfig.for_coefficients(config, aligned))
        with torch.no_grad():
            model.descriptors.copy_(coefficients.detach().reshape(n, rows * c))
            if valid is not None:
                model.active.copy_(valid.to(torch.bool).reshape(n))
            if background is not None:
                if model.environment is None or tuple(background.shape) != tuple(model.environment.shape):
                    want = None if model.environment is None else tuple(model.environment.shape)
                    raise ValueError(f"background map {tuple(background.shape)} does not fit this model "
                                     f"(expects {want})")
                model.environment.copy_(background.detach())
        assert model.basis is not None
        model.basis.load_state_dict(_strip(basis_state, "basis."))
        model.refiner.load_state_dict(_strip(refiner_state, "refiner."))
        return model

    def point_descriptors(
        self, points: torch.Tensor, camera: Camera, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, feature_dim) descriptors for ``camera`` (rows ``index`` only if given)."""
        desc = self.descriptors if index is None else self.descriptors[index]
        if self.basis is None:
            return desc
        pts = points if index is None else points[index]
        c = self.config.feature_dim
        # Explicit sizes: a view seeing no point (a fitting crop on empty space) has 0 rows.
        coefficients = desc.view(desc.shape[0], desc.shape[1] // c, c)
        return descriptors_from_coefficients(coefficients, self.basis(camera.view_directions(pts)))

    def render_raw(self, scene: torch.Tensor, camera: Camera) -> torch.Tensor:
        """:meth:`DescriptorRendering.render_raw` of the point cloud ``scene``, converted to
        float32 on the model's device once per frame: the hooks below then find it ready
        (check_points and ``.to`` of such a tensor copy nothing)."""
        return super().render_raw(self._scene_points(scene), camera)

    def _scene_points(self, scene: torch.Tensor) -> torch.Tensor:
        points = check_points(scene).to(self.device)
        if points.shape[0] != self.num_points:
            raise ValueError(f"this NPBG model has {self.num_points} points, got {points.shape[0]}")
        return points

    # DescriptorRendering's hooks: the scene is the point cloud
    def _cloud(self, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._scene_points(scene), None if bool(self.active.all()) else torch.nonzero(self.active).squeeze(1)

    def _point_descriptors(self, scene: torch.Tensor, camera: Camera, rows: torch.Tensor) -> torch.Tensor:
        return self.point_descriptors(self._scene_points(scene), camera, rows)

    def _empty_descriptor(self) -> torch.Tensor:
        return self.background

    def _background_rasters(self, scene: torch.Tensor, camera: Camera) -> list[torch.Tensor] | None:
        if self.environment is None:
            return None
        cfg = self.config
        return refiner_background_rasters(self.environment, camera, cfg.scales, cfg.world_up,
                                          cfg.background_channels)

    def refine_feature_map(
        self, feature_map: torch.Tensor, drop_prob: float = 0.5, detach: bool = True
    ) -> torch.Tensor:
        return refine_dense(self.refiner, feature_map, self.config.scales, drop_prob, detach)

    def descriptor_parameters(self) -> list[nn.Parameter]:
        """Parameters for the descriptor optimiser (RMSprop in the published recipe); the
        environment map too when there is one (same learning rate as the coefficients)."""
        extra = [] if self.environment is None else [self.environment]
        return [self.descriptors, self.background, *extra]


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)
