"""Configuration dataclasses for NPBG++ and NPBG (plain data, JSON-friendly)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from ..rasterizer import DEFAULT_SCALES

AGGREGATORS = ("sphere", "mean")
# Upper bound on every channel count (feature_dim, basis_dim, descriptor_dim): configs
# come from files, and a claimed size must fail before it allocates (published sizes: 8, 6, 56).
MAX_CHANNELS = 1024


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_ok(annotation: str, value: Any) -> bool:
    """Whether a JSON-like ``value`` fits a field annotation of these dataclasses."""
    ann = annotation.replace(" ", "")
    if ann.endswith("|None"):
        return value is None or _type_ok(ann[: -len("|None")], value)
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return _is_number(value)
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    if ann.startswith("tuple["):
        return isinstance(value, list | tuple) and len(value) <= 64 and all(_is_number(x) for x in value)
    return True


def _from_dict(cls: type, d: dict[str, Any] | None) -> Any:
    """Build dataclass ``cls`` from a dict (a file's JSON), rejecting unknown keys and values
    of the wrong type with a message naming the option."""
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a dict of options, got {type(d).__name__}")
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(fields)}")
    for name, value in d.items():
        annotation = str(fields[name].type)
        if not _type_ok(annotation, value):
            raise ValueError(f"{cls.__name__}: option {name!r} must be {annotation}, "
                             f"got {type(value).__name__} {value!r:.60}")
    if "scales" in d and d["scales"] is not None:
        d["scales"] = tuple(float(s) for s in d["scales"])
    return cls(**d)


def _check_channels(cls_name: str, **dims: int) -> None:
    for name, value in dims.items():
        if not 1 <= value <= MAX_CHANNELS:
            raise ValueError(f"{cls_name}: {name}={value} is outside 1..{MAX_CHANNELS}")


def _check_scales(scales: tuple[float, ...]) -> None:
    if len(scales) != 5 or any(not (0 < s <= 1) for s in scales):
        raise ValueError(f"scales must be 5 numbers in (0, 1] (the refiner has 5 levels), got {scales}")


# NPBGPlusPlusConfig options that two configs of one network may differ in (differences).
_NOT_THE_NETWORK = ("world_up", "extractor_weights")


class _NetworkOptions:
    """What both network configs share: reading a file's dict (checked by
    :func:`_from_dict`), writing a JSON-friendly one (tuples as lists) and the size of the
    environment map their ``background`` option asks for."""

    feature_dim: int
    background: str

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Self:
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["scales"] = list(d["scales"])
        d["world_up"] = list(d["world_up"])
        return d

    @property
    def background_channels(self) -> int:
        """Channels of a scene's environment map (features + confidence), 0 without one."""
        return self.feature_dim + 1 if self.background == "environment" else 0


@dataclass
class NPBGPlusPlusConfig(_NetworkOptions):
    """Options of :class:`NPBGPlusPlus`; the one source of the network's options (the
    headless trainer's system options and scene bundles take their keys from here)."""

    feature_dim: int = 8
    aggregator: str = "sphere"  # 'sphere' (learnable_v, view dependent) or 'mean'
    basis_dim: int = 6
    ridge_alpha: float = 1.0
    visibility_scale: float = 1.0
    align_input_views: bool = True
    align_during_rendering: bool = True
    # Aligned render canvas: 'bounds' renders only the bounding box of the rolled target
    # (exact rot90, no resampling, when the roll is a multiple of 90 degrees); 'square'
    # is the published ceil(sqrt(H^2 + W^2)) square (about 2x the pixels, slower).
    render_canvas: str = "bounds"
    # Aligned input-view canvas for aggregation: 'square' (published) pads every view to
    # its ceil(sqrt(H^2 + W^2)) diagonal square; 'bounds' uses the rolled view's bounding
    # box (the image itself, unresampled, when the roll is a multiple of 90 degrees): about
    # half the extractor's pixels. The extractor sees no black frame, so weights trained
    # with one canvas should aggregate with the same one (weights files store it).
    input_canvas: str = "square"
    # The world axis that alignment turns upright (published: +Y). Use +Z for Z-up scenes
    # (Blender, NeRF-Synthetic). Aggregation and rendering of a scene must use the same
    # axis; scene bundles store it with the rest of this config.
    world_up: tuple[float, float, float] = (0.0, 1.0, 0.0)
    scales: tuple[float, ...] = field(default_factory=lambda: tuple(DEFAULT_SCALES))
    predict_mask: bool = False
    min_view_depth: float = 0.0  # published quirk drops input-view depth <= 1; off by default
    near: float = 1e-3
    extractor_weights: str | None = None  # local file with encoder weights (optional)
    # What the refiner sees where no point lands: 'none' (published: nothing, zeros) or
    # 'environment' (a map of extractor features over world directions aggregated from the
    # input views' uncovered pixels, see models/background.py; background_rows x 2*rows bins).
    background: str = "none"
    background_rows: int = 16

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        from .alignment import check_world_up
        from .background import BACKGROUND_MODES, check_rows

        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        check_rows(self.background_rows)

        self.world_up = check_world_up(self.world_up)
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.render_canvas not in ("bounds", "square"):
            raise ValueError(f"render_canvas must be 'bounds' or 'square', got {self.render_canvas!r}")
        if self.input_canvas not in ("bounds", "square"):
            raise ValueError(f"input_canvas must be 'bounds' or 'square', got {self.input_canvas!r}")
        _check_channels("NPBGPlusPlusConfig", feature_dim=self.feature_dim, basis_dim=self.basis_dim)
        if not self.ridge_alpha > 0:
            raise ValueError(f"ridge_alpha must be > 0, got {self.ridge_alpha}")
        if not 0 < self.visibility_scale <= 1:
            raise ValueError(f"visibility_scale must be in (0, 1], got {self.visibility_scale}")
        _check_scales(self.scales)

    @classmethod
    def from_options(cls, options: dict[str, Any], **overrides: Any) -> NPBGPlusPlusConfig:
        """The network's own fields of a wider options dict (a training system's config, whose
        other keys, e.g. ``lr``, are the trainer's), with ``overrides`` on top."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({**{k: v for k, v in options.items() if k in names}, **overrides})

    def differences(self, other: NPBGPlusPlusConfig) -> list[tuple[str, Any, Any]]:
        """``(option, self's value, other's value)`` (:meth:`to_dict` values), by option
        name, for every option in which ``other`` builds another network. ``world_up`` is
        left out (it belongs to the scenes, their up axis) and so is ``extractor_weights``
        (where the encoder's first weights came from, not what the network is)."""
        a, b = self.to_dict(), other.to_dict()
        return [(k, a[k], b[k]) for k in sorted(a) if k not in _NOT_THE_NETWORK and a[k] != b[k]]

    @property
    def coefficient_rows(self) -> int:
        """Rows of the saved coefficients: 1 + basis_dim (sphere) or 1 (mean)."""
        return 1 + self.basis_dim if self.aggregator == "sphere" else 1


@dataclass
class NPBGConfig(_NetworkOptions):
    """Options of :class:`NPBG`.

    ``descriptor_dim`` is the per-point learnable size: ``feature_dim`` for plain NPBG,
    ``(1 + basis_dim) * feature_dim`` with ``use_basis=True`` for coefficients_ft (the
    frozen NPBG++ basis MLP turns the coefficients into ``feature_dim`` descriptors).
    """

    descriptor_dim: int = 8
    feature_dim: int = 8
    use_basis: bool = False
    basis_dim: int = 6
    scales: tuple[float, ...] = field(default_factory=lambda: tuple(DEFAULT_SCALES))
    predict_mask: bool = False
    near: float = 1e-3
    # 'environment': besides the constant background vector, a learnable NPBG++ environment
    # map (feature_dim + 1, background_rows, 2 rows) over directions about world_up, fed to
    # the refiner's background projections (coefficients_ft of an NPBG++ model that has one).
    background: str = "none"
    background_rows: int = 16
    world_up: tuple[float, float, float] = (0.0, 1.0, 0.0)
    # Render a view rolled against world_up on its upright canvas, as NPBG++ does
    # (NPBGPlusPlusConfig.align_during_rendering, same render_canvas). Off: the published
    # NPBG, which renders every view in its own frame; files without the field keep that.
    align_during_rendering: bool = False
    render_canvas: str = "bounds"

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        _check_scales(self.scales)
        if self.render_canvas not in ("bounds", "square"):
            raise ValueError(f"render_canvas must be 'bounds' or 'square', got {self.render_canvas!r}")
        from .alignment import check_world_up
        from .background import BACKGROUND_MODES, check_rows

        self.world_up = check_world_up(self.world_up)
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        check_rows(self.background_rows)
        _check_channels("NPBGConfig", descriptor_dim=self.descriptor_dim, feature_dim=self.feature_dim,
                        basis_dim=self.basis_dim)
        if self.use_basis:
            want = (1 + self.basis_dim) * self.feature_dim
            if self.descriptor_dim != want:
                raise ValueError(
                    f"with use_basis the descriptors are (1 + basis_dim) * feature_dim = {want} numbers, "
                    f"got descriptor_dim={self.descriptor_dim}"
                )
        elif self.descriptor_dim != self.feature_dim:
            raise ValueError(
                f"without use_basis descriptor_dim ({self.descriptor_dim}) must equal feature_dim ({self.feature_dim})"
            )

    @classmethod
    def for_coefficients(cls, source: NPBGPlusPlusConfig, aligned: bool) -> NPBGConfig:
        """The NPBG model that renders an NPBG++ network's per-point coefficients
        (coefficients_ft): (1 + basis_dim) * feature_dim numbers per point through the
        network's basis, its scales, near plane, background and world_up. ``aligned``: render
        rolled views upright as the network does (its ``align_during_rendering`` and
        ``render_canvas``); False: every view in its own frame, the published NPBG. The one
        mapping, for the library's fits and headless coefficients_ft runs and their exports."""
        return cls(
            descriptor_dim=(1 + source.basis_dim) * source.feature_dim, feature_dim=source.feature_dim,
            use_basis=True, basis_dim=source.basis_dim, scales=source.scales, predict_mask=source.predict_mask,
            near=source.near, background=source.background, background_rows=source.background_rows,
            world_up=source.world_up, align_during_rendering=bool(aligned) and source.align_during_rendering,
            render_canvas=source.render_canvas,
        )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> NPBGConfig:
        """The plain-NPBG network of a training system's options (``system=npbg``; its other
        keys, e.g. ``lr_refiner``, are the trainer's): ``descriptor_dim`` numbers per point
        (default 8) and as many features. The one mapping, shared by the trainer's system and
        the readers of its checkpoints (:func:`npbgpp_core.pretrained.trainer_checkpoint_weights`,
        ``headless_train export``), so that they build the network the run trained."""
        d = int(options.get("descriptor_dim", 8))
        return cls.from_dict({"descriptor_dim": d, "feature_dim": d})
