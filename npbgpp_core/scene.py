"""One-file neural scenes: points, colours, per-point coefficients or descriptors and
the network weights needed to render them, stored as safetensors (plain tensors plus a
JSON header; loading never executes code)."""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Any, NamedTuple

import numpy as np
import torch

from .atomic import atomic_write_bytes
from .bundle_file import FORMAT_NAME, FORMAT_VERSION, check_format, read_header
from .camera import Camera
from .memory import is_out_of_memory
from .rasterizer import keys_to_depth, keys_to_index, rasterize_keys

# Render quality presets: internal resolution factor (the image is upsampled to the
# camera's size). 'preview' is for interactive viewports: about a quarter of the cost.
QUALITY_SCALES = {"full": 1.0, "preview": 0.5}
KINDS = ("npbgpp", "npbg", "coefficients")
_MODEL_PREFIX = "model."


class NeuralScene:
    """A renderable scene.

    ``kind='npbgpp'``: ``features`` are NPBG++ coefficients (N, R, C) ([ym; beta] or
    [ym]) and ``model_state`` holds the basis MLP and refiner weights.
    ``kind='npbg'`` / ``'coefficients'``: ``features`` are NPBG descriptors (N, D) and
    ``model_state`` holds the refiner, background (and frozen basis) weights.
    ``valid`` (N,) marks the points that are rendered. ``background`` is the NPBG++
    environment map (C + 1, rows, 2 rows) of a model with ``background='environment'``
    (None otherwise); NPBG bundles keep theirs among the model weights.
    """

    def __init__(
        self,
        points: torch.Tensor,
        colors: torch.Tensor | None = None,
        kind: str = "npbgpp",
        features: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        model_config: dict[str, Any] | None = None,
        model_state: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, Any] | None = None,
        background: torch.Tensor | None = None,
    ) -> None:
        points = torch.as_tensor(points)
        if points.ndim != 2 or points.shape[1] != 3 or not points.is_floating_point():
            raise ValueError(f"points must be a float (N, 3) tensor, got {tuple(points.shape)} {points.dtype}")
        n = points.shape[0]
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if features is None:
            raise ValueError("features (coefficients or descriptors) are required")
        features = torch.as_tensor(features)
        want_ndim = 3 if kind == "npbgpp" else 2
        if features.ndim != want_ndim or features.shape[0] != n:
            shape = "(N, R, C)" if kind == "npbgpp" else "(N, D)"
            raise ValueError(f"{kind} features must be {shape} with N={n}, got {tuple(features.shape)}")
        if colors is not None:
            colors = torch.as_tensor(colors)
            if colors.shape != (n, 3):
                raise ValueError(f"colors must be (N, 3) = ({n}, 3), got {tuple(colors.shape)}")
        valid = torch.ones(n, dtype=torch.bool) if valid is None else torch.as_tensor(valid).to(torch.bool)
        if valid.shape != (n,):
            raise ValueError(f"valid must be (N,) = ({n},), got {tuple(valid.shape)}")
        self.points = points.detach().cpu()
        self.colors = None if colors is None else colors.detach().cpu()
        self.kind = kind
        self.features = features.detach().cpu()
        self.valid = valid.detach().cpu()
        self.model_config = dict(model_config or {})
        self.model_state = {k: v.detach().cpu() for k, v in (model_state or {}).items()}
        self.metadata = dict(metadata or {})
        self.background = None if background is None else torch.as_tensor(background).detach().cpu()

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def __repr__(self) -> str:
        return (
            f"NeuralScene(kind={self.kind!r}, points={len(self)}, features={tuple(self.features.shape)}, "
            f"valid={int(self.valid.sum())}, name={self.metadata.get('name')!r})"
        )

    # ------------------------------------------------------------ builders
    @classmethod
    def from_aggregated(
        cls, model: Any, aggregated: Any, colors: torch.Tensor | None = None, name: str = "scene",
        metadata: dict[str, Any] | None = None,
    ) -> NeuralScene:
        """Bundle an NPBG++ ``AggregatedScene`` with the model's basis and refiner weights."""
        config = model.config.to_dict()
        config["extractor_weights"] = None  # rendering needs no extractor
        state = {k: v for k, v in model.state_dict().items() if k.startswith(("basis.", "refiner."))}
        return cls(
            aggregated.points, colors, "npbgpp", aggregated.coefficients, aggregated.valid,
            config, state, {**(metadata or {}), "name": name}, getattr(aggregated, "background", None),
        )

    @classmethod
    def from_npbg(
        cls, model: Any, points: torch.Tensor, colors: torch.Tensor | None = None, name: str = "scene",
        metadata: dict[str, Any] | None = None,
    ) -> NeuralScene:
        """Bundle an :class:`NPBG` model (descriptors become the features)."""
        state = {k: v for k, v in model.state_dict().items() if k not in ("descriptors", "active")}
        kind = "coefficients" if model.config.use_basis else "npbg"
        return cls(
            points, colors, kind, model.descriptors, model.active, model.config.to_dict(), state,
            {**(metadata or {}), "name": name},
        )

    # ------------------------------------------------------------------ I/O
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"points": self.points, "features": self.features, "valid": self.valid}
        if self.colors is not None:
            tensors["colors"] = self.colors
        if self.background is not None:
            tensors["background"] = self.background
        for k, v in self.model_state.items():
            tensors[_MODEL_PREFIX + k] = v
        return {k: v.contiguous().clone() for k, v in tensors.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the scene atomically (temporary file in the same folder, then rename)."""
        from safetensors.torch import save

        path = os.fspath(path)
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "model_config": json.dumps(self.model_config),
            "metadata": json.dumps(self.metadata),
        }
        data = save(self._tensors(), metadata=header)
        atomic_write_bytes(path, data, make_dirs=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuralScene:
        """Read a scene written by :meth:`save`; raises ``ValueError`` naming the file for
        corrupt, truncated, foreign or other-version files. Running out of memory is raised as
        it came (MemoryError, torch's OutOfMemoryError), never as a corrupt file."""
        from safetensors.torch import load

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"neural scene file not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        meta = read_header(io.BytesIO(data), len(data), path)[0]["__metadata__"]
        check_format(meta, path)
        try:
            tensors = load(data)
            model_config = json.loads(meta.get("model_config", "{}"))
            metadata = json.loads(meta.get("metadata", "{}"))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
            if is_out_of_memory(exc):  # a big bundle, not a bad one: the caller says so
                raise
            raise ValueError(f"{path}: corrupt or truncated neural scene file ({type(exc).__name__}: {exc})") from exc
        missing = [k for k in ("points", "features", "valid") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: neural scene file lacks tensors {missing}")
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{path}: tensor '{name}' holds {bad} NaN or infinite values; the bundle is "
                                 "damaged (aggregate or export it again)")
        state = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
        if not isinstance(model_config, dict) or not isinstance(metadata, dict):
            raise ValueError(f"{path}: inconsistent neural scene file: model_config and metadata must be JSON objects")
        try:
            scene = cls(
                tensors["points"], tensors.get("colors"), meta.get("kind", ""), tensors["features"], tensors["valid"],
                model_config, state, metadata, tensors.get("background"),
            )
            scene.check()
        except ValueError as exc:
            raise ValueError(f"{path}: inconsistent neural scene file: {exc}") from exc
        return scene

    def check(self) -> None:
        """Check the scene against its own ``model_config`` without allocating the network:
        config types and sizes (bounded by ``models.config.MAX_CHANNELS``), feature shape,
        the shape and dtype of every weight the renderer needs (compared with the network
        built on the ``meta`` device), finite points, colours and features. ValueError
        names the field."""
        from .models import NPBGConfig, NPBGPlusPlusConfig

        for name, t in (("points", self.points), ("features", self.features), ("colors", self.colors)):
            if t is not None and not (t.is_floating_point() and _all_finite(t)):
                raise ValueError(f"{name} must be finite floats ({t.dtype})")
        n = len(self)
        try:
            if self.kind == "npbgpp":
                config: Any = NPBGPlusPlusConfig.from_dict({**self.model_config, "extractor_weights": None})
                # [ym; beta] or [ym] alone (rendered without the view-dependent part)
                rows = self.features.shape[1] if self.features.shape[1:2] == (1,) else config.coefficient_rows
                want: tuple[int, ...] = (n, rows, config.feature_dim)
            else:
                config = NPBGConfig.from_dict(self.model_config)
                if config.use_basis != (self.kind == "coefficients"):
                    raise ValueError(f"use_basis={config.use_basis} does not fit kind {self.kind!r}")
                want = (n, config.descriptor_dim)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_config: {exc}") from exc
        if tuple(self.features.shape) != want:
            raise ValueError(f"features have shape {tuple(self.features.shape)}, model_config implies {want}")
        self._check_background(config)
        expected = _expected_weights(self.kind, json.dumps(config.to_dict(), sort_keys=True))
        _check_state(self.model_state, set(expected), "NPBG++" if self.kind == "npbgpp" else "NPBG")
        for key, (shape, dtype) in expected.items():
            got = self.model_state[key]
            if tuple(got.shape) != shape or got.is_floating_point() != dtype.is_floating_point:
                raise ValueError(f"weight {_MODEL_PREFIX}{key} is {tuple(got.shape)} {got.dtype}, model_config needs "
                                 f"{shape} {dtype}")
            if got.is_floating_point() and not _all_finite(got):
                raise ValueError(f"weight {_MODEL_PREFIX}{key} has non-finite values")

    def _check_background(self, config: Any) -> None:
        """The environment map: present exactly when an NPBG++ config asks for one, float,
        finite, (feature_dim + 1, background_rows, 2 * background_rows)."""
        wants = self.kind == "npbgpp" and config.background == "environment"
        bg = self.background
        if bg is None:
            if wants:
                raise ValueError("background: model_config has background='environment' but the scene has no "
                                 "'background' tensor (aggregate or export it again)")
            return
        if not wants:
            raise ValueError(f"background: a {tuple(bg.shape)} map, but this {self.kind} model_config has no "
                             "environment background (background='none')")
        shape = (config.feature_dim + 1, config.background_rows, 2 * config.background_rows)
        if tuple(bg.shape) != shape:
            raise ValueError(f"background has shape {tuple(bg.shape)}, model_config implies {shape}")
        if not (bg.is_floating_point() and _all_finite(bg)):
            raise ValueError(f"background must be finite floats ({bg.dtype})")

    # ------------------------------------------------------------ rendering
    def aggregated_scene(self, device: torch.device | str = "cpu") -> Any:
        """An NPBG++ bundle's points, coefficients, validity and environment map as the
        :class:`~npbgpp_core.models.AggregatedScene` the network renders (and fits) from."""
        from .models import AggregatedScene

        device = torch.device(device)
        return AggregatedScene(
            self.points.float().to(device), self.features.float().to(device), self.valid.to(device), None,
            None if self.background is None else self.background.float().to(device),
        )

    def renderer(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, tune_allocator: bool = True
    ) -> SceneRenderer:
        return SceneRenderer(self, device, dtype, tune_allocator)


def quality_scale(quality: str | float) -> float:
    """Internal resolution factor of a render quality: a name of :data:`QUALITY_SCALES`
    or a number in (0, 1]."""
    if isinstance(quality, str):
        if quality not in QUALITY_SCALES:
            raise ValueError(f"quality must be one of {sorted(QUALITY_SCALES)} or a number in (0, 1], got {quality!r}")
        return QUALITY_SCALES[quality]
    scale = float(quality)
    if not 0 < scale <= 1:
        raise ValueError(f"quality as a resolution factor must be in (0, 1], got {quality!r}")
    return scale


class SceneRenderer:
    """Renders a :class:`NeuralScene` on one device: ``render(camera, quality)`` (3, H, W)
    in [0, 1], ``render_raw(camera)`` unclamped, ``render_points(camera)`` nearest-point
    colours, ``render_point_layers(camera)`` those with coverage and depth.

    On the CPU, ``tune_allocator`` (default) applies
    :func:`npbgpp_core.models.allocator.tune_cpu_allocator` once for the process (glibc
    only; about 15% faster frames, keeps up to 512 MB of freed memory)."""

    def __init__(
        self, scene: NeuralScene, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
        tune_allocator: bool = True,
    ):
        from .models import NPBG, NPBGConfig, NPBGPlusPlus
        from .models.allocator import tune_cpu_allocator

        self.scene = scene
        self.device = torch.device(device)
        self.dtype = dtype
        if tune_allocator and self.device.type == "cpu":
            tune_cpu_allocator()
        if not scene.model_state:
            raise ValueError("neural scene has no network weights (model_state is empty)")
        scene.check()  # before any allocation sized by the config
        n = len(scene)
        if scene.kind == "npbgpp":
            config = dict(scene.model_config)
            config["extractor_weights"] = None
            model = NPBGPlusPlus(config)
            need = {k for k in model.state_dict() if k.startswith(("basis.", "refiner."))}
            _check_state(scene.model_state, need, "NPBG++")
            model.load_state_dict(scene.model_state, strict=False)
            self.aggregated = scene.aggregated_scene(self.device)
        else:
            model = NPBG(n, NPBGConfig.from_dict(scene.model_config))
            state = dict(scene.model_state)
            state["descriptors"] = scene.features.float()
            state["active"] = scene.valid
            _check_state(state, set(model.state_dict()), "NPBG")
            model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        self.points = scene.points.float().to(self.device)
        colors = scene.colors if scene.colors is not None else torch.ones(n, 3)
        self.colors = colors.float().to(self.device)
        self.valid = scene.valid.to(self.device)
        self.rows: torch.Tensor | None = None  # the points rendered (select_points), None: all

    def select_points(self, ids: torch.Tensor | None) -> None:
        """Render only the points ``ids`` (indices into the scene, e.g. those a user kept
        after deleting some); None renders all. ValueError for ids outside the scene."""
        from .models import AggregatedScene

        n = len(self.scene)
        if ids is None:
            keep, self.rows = self.valid, None
        else:
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                raise ValueError(f"point ids must be in [0, {n}) for this bundle, got {int(ids.min())}.."
                                 f"{int(ids.max())}: the point object belongs to another bundle or dataset")
            mask = torch.zeros(n, dtype=torch.bool, device=self.device)
            mask[ids.to(self.device)] = True
            keep, self.rows = self.valid & mask, None if bool(mask.all()) else torch.nonzero(mask).squeeze(1)
        if self.scene.kind == "npbgpp":
            self.aggregated = AggregatedScene(self.aggregated.points, self.aggregated.coefficients, keep,
                                              background=self.aggregated.background)
        else:
            self.model.active.copy_(keep)

    def _model_scene(self) -> Any:
        """What the model renders: the aggregated scene (NPBG++) or the points (NPBG)."""
        return self.aggregated if self.scene.kind == "npbgpp" else self.points

    def render_raw(self, camera: Camera) -> torch.Tensor:
        return self.model.render_raw(self._model_scene(), camera)

    def render(self, camera: Camera, quality: str | float = "full", max_pixels: int = 0,
               roll_context: str | None = None) -> torch.Tensor:
        """(3, H, W) in [0, 1]. ``quality``: 'full', 'preview' (internal half resolution,
        upsampled) or an internal resolution factor in (0, 1]. ``max_pixels`` > 0 renders
        larger frames window by window (:func:`render_in_windows`, full quality only, always
        the exact roll context), so the network's memory stays bounded; the result is on
        the CPU then. ``roll_context``: 'exact' or 'bounded' for rolled views of a model that
        renders them upright (:meth:`NPBGPlusPlus.render`); None keeps the model's (``'exact'``)."""
        from .models.rendering import check_roll_context

        if roll_context is not None:
            check_roll_context(roll_context, self.model.roll_margin)
        scale = quality_scale(quality)
        h, w = camera.image_size
        if max_pixels > 0 and h * w > max_pixels and scale == 1.0:
            return self._render_windowed(camera, max_pixels)
        return self.model.render(self._model_scene(), camera, dtype=self.dtype, resolution_scale=scale,
                                 roll_context=roll_context)

    def _render_windowed(self, camera: Camera, max_pixels: int) -> torch.Tensor:
        """:meth:`render` in windows (:func:`render_model_windowed`)."""
        return render_model_windowed(self.model, self._model_scene(), camera.to(self.device), max_pixels, self.dtype)

    def render_points(self, camera: Camera) -> torch.Tensor:
        """(3, H, W): colour of the nearest point per pixel, black where empty (no network)."""
        return self.render_point_layers(camera).rgb

    def render_point_layers(self, camera: Camera, point_size: int = 1) -> PointLayers:
        """Nearest-point colour, coverage and view depth of the scene's (selected) points,
        no network; see :func:`render_point_layers`."""
        if self.rows is None:
            return render_point_layers(self.points, self.colors, camera.to(self.device), point_size)
        return render_point_layers(self.points[self.rows], self.colors[self.rows], camera.to(self.device), point_size)


WINDOW_MARGIN = 128  # pixels each window renders beyond the part it keeps (the refiner's reach)
WINDOW_ALIGN = 16  # window origins on the coarsest pyramid level's grid


def window_grid(size: tuple[int, int], max_pixels: int, margin: int = WINDOW_MARGIN) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of the parts a frame is cut into so that each part
    plus ``margin`` pixels around it (inside the image) holds at most about ``max_pixels``;
    parts start on multiples of :data:`WINDOW_ALIGN`. ValueError when even the smallest
    part cannot fit."""
    h, w = size
    side = int((max_pixels ** 0.5 - 2 * margin) // WINDOW_ALIGN) * WINDOW_ALIGN
    if side < WINDOW_ALIGN:
        raise ValueError(f"max_pixels={max_pixels} leaves no room inside the {margin}-pixel window margins; "
                         f"use at least {(2 * margin + WINDOW_ALIGN) ** 2}")
    return [(top, left, min(side, h - top), min(side, w - left))
            for top in range(0, h, side) for left in range(0, w, side)]


def render_in_windows(
    render_fn: Any, camera: Camera, max_pixels: int, margin: int = WINDOW_MARGIN
) -> torch.Tensor:
    """``render_fn(camera)`` (C, H, W) assembled from windows of ``camera``: each part of
    :func:`window_grid` is rendered with ``margin`` extra pixels on each side (clipped at
    the image border, where the full frame has its border too) and only the part is kept.
    The network's outputs depend on a bounded neighbourhood, so the parts equal the whole
    frame's up to float rounding for views the network renders unrolled; for rolled views
    the windows are resampled from slightly different canvases (see BENCHMARKS.md)."""
    h, w = camera.image_size
    out: torch.Tensor | None = None
    for top, left, ph, pw in window_grid((h, w), max_pixels, margin):
        t0, l0 = max(0, top - margin), max(0, left - margin)
        t1, l1 = min(h, top + ph + margin), min(w, left + pw + margin)
        img = render_fn(camera.cropped(t0, l0, t1 - t0, l1 - l0))
        if out is None:
            out = img.new_zeros(img.shape[0], h, w)
        out[:, top : top + ph, left : left + pw] = img[:, top - t0 : top - t0 + ph, left - l0 : left - l0 + pw]
    assert out is not None
    return out


def render_model_windowed(
    model: Any, scene: Any, camera: Camera, max_pixels: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``model.render(scene, camera)`` (3, H, W) on the CPU, rendered in windows of about
    ``max_pixels`` (:func:`render_in_windows`) so that the network's memory stays bounded.
    Views are windowed on the canvas the network really renders (the roll-aligned camera's
    when the model renders upright), which is then turned or resampled as a whole, exactly
    as the model's ``render_raw`` does: windows of an unrolled canvas equal the whole canvas
    up to float rounding. ``dtype``: autocast as in ``model.render``."""
    from .models.alignment import warp_images
    from .models.rendering import autocast_context

    camera = camera.to(model.device)
    canvas_camera, quarter_turns = model.canvas_camera(camera)

    def window(cam: Camera) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(model.device, dtype):
            return model._render_direct(scene, cam).float().cpu()

    with torch.inference_mode():
        # the margin read now, not bound at import (render_in_windows' default)
        canvas = render_in_windows(window, canvas_camera, max_pixels, WINDOW_MARGIN)
        if quarter_turns is None:
            out = warp_images(canvas.unsqueeze(0), canvas_camera.to("cpu"), camera.to("cpu"))[0]
        else:
            out = torch.rot90(canvas, quarter_turns, dims=(1, 2))
    return out[:3].clamp(0, 1).clone()


def fill_coverage(mask: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha and depth of a neural render from its nearest-point ``mask`` (H, W) bool and
    ``depth`` (H, W), for compositing: where no point landed inside the surface (holes up
    to two pixels wide) the coverage is closed with a 3x3 square, which fills them without
    growing the silhouette; alpha is that coverage times the covered fraction of each
    pixel's 3x3 neighbourhood (1 inside, softer on the silhouette's inner edge); a filled
    hole takes the nearest depth among its 3x3 neighbours. Returns (alpha, depth), +inf
    depth where alpha is 0."""
    import torch.nn.functional as F

    # The border pixels repeated twice around the image: a silhouette one pixel from the
    # border does not grow into it, and one crossing the border is not eroded there.
    m = F.pad(mask.to(torch.float32)[None, None], (2, 2, 2, 2), mode="replicate")
    dilated = F.max_pool2d(m, 3, 1, 1)
    closed = (-F.max_pool2d(-dilated, 3, 1, 1))[..., 2:-2, 2:-2]
    alpha = closed * F.avg_pool2d(closed, 3, 1, 1, count_include_pad=False)
    d = torch.where(mask, depth.to(torch.float32), torch.full_like(depth, float("inf"), dtype=torch.float32))
    nearest = -F.max_pool2d(-d[None, None], 3, 1, 1)
    filled = torch.where(mask, d, torch.where(closed[0, 0] > 0, nearest[0, 0], torch.full_like(d, float("inf"))))
    return alpha[0, 0], filled


class PointLayers(NamedTuple):
    """What the nearest point per pixel gives without a network (all on the points' device)."""

    rgb: torch.Tensor  # (3, H, W) its colour, 0 where no point lands
    mask: torch.Tensor  # (H, W) bool, True where a point lands
    depth: torch.Tensor  # (H, W) float32 view depth, +inf where no point lands


def spread_keys(keys: torch.Tensor, point_size: int) -> torch.Tensor:
    """Each point drawn as a ``point_size`` x ``point_size`` square: per pixel the nearest
    (smallest) depth+index key within that window (centred; even sizes reach one pixel
    further up and left)."""
    if point_size <= 1:
        return keys
    h, w = keys.shape
    before = (point_size - 1) // 2
    padded = torch.full((h + point_size - 1, w + point_size - 1), torch.iinfo(torch.int64).max,
                        dtype=keys.dtype, device=keys.device)
    padded[before : before + h, before : before + w] = keys
    out = keys.clone()
    for dy in range(point_size):
        for dx in range(point_size):
            out = torch.minimum(out, padded[dy : dy + h, dx : dx + w])
    return out


def render_point_layers(
    points: torch.Tensor, colors: torch.Tensor, camera: Camera, point_size: int = 1
) -> PointLayers:
    """Nearest-point colour, coverage and depth of ``points`` (N, 3) with ``colors`` (N, 3)
    seen by ``camera`` (one z-buffer pass, full resolution), each point a ``point_size``
    pixels wide square (:func:`spread_keys`)."""
    with torch.inference_mode():
        keys = spread_keys(rasterize_keys(points, camera, scales=(1.0,))[0], point_size)
        index = keys_to_index(keys)
        mask = index >= 0
        img = torch.zeros(*index.shape, 3, device=points.device)
        if points.shape[0]:
            img[mask] = colors[index[mask]].to(img.dtype)
        depth = keys_to_depth(keys)
    return PointLayers(img.permute(2, 0, 1).clone(), mask.clone(), depth.clone())


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float32:  # numpy's single-threaded check is much cheaper than torch's on small tensors
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


@functools.lru_cache(maxsize=16)
def _expected_weights(kind: str, config_json: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the weights a renderer of ``kind`` needs, from the network
    built on the ``meta`` device (shapes only, nothing allocated)."""
    from .models import NPBG, NPBGConfig, NPBGPlusPlus, NPBGPlusPlusConfig

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "npbgpp":
            state = NPBGPlusPlus(NPBGPlusPlusConfig.from_dict(config)).state_dict()
            keep = {k: v for k, v in state.items() if k.startswith(("basis.", "refiner."))}
        else:
            state = NPBG(0, NPBGConfig.from_dict(config)).state_dict()
            keep = {k: v for k, v in state.items() if k not in ("descriptors", "active")}
    return {k: (tuple(v.shape), v.dtype) for k, v in keep.items()}


def _check_state(state: dict[str, torch.Tensor], need: set[str], what: str) -> None:
    missing = sorted(need - set(state))
    if missing:
        raise ValueError(f"neural scene lacks {what} weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
