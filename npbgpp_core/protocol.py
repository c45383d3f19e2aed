"""The renderer protocol: every request the Blender add-on sends to its renderer and
every reply, as dataclasses shared by both sides.

The renderer is :class:`npbgpp_core.service.RenderService`; it runs in a worker process
(``blender_addon/worker.py``, which only moves these objects over a pipe) or inside
Blender. Each request names the service method that answers it (``op``) and the reply
type it gets. Cameras travel as OpenCV ``K``, ``R``, ``t`` lists (:class:`CameraSpec`),
points and frames as numpy arrays.

This module imports numpy only (no torch): Blender builds requests without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from .camera import Camera

# A rendered frame is float32 (H, W, FRAME_CHANNELS), rows top-down: neural sRGB, point
# colours sRGB + coverage, view depth (+inf where no point lands), and with a neural
# render its alpha and depth for compositing (holes filled: npbgpp_core.scene.fill_coverage).
FRAME_CHANNELS = 10
NEURAL = slice(0, 3)
POINTS_RGBA = slice(3, 7)
DEPTH = 7
NEURAL_ALPHA = 8
NEURAL_DEPTH = 9

SOURCES = ("points", "bundle")
# The refiner's inference implementations (npbgpp_core.models.refiner.IMPLS): the torch
# reference, or the fused Triton kernels of npbgpp_core/models/refiner_triton.py.
REFINER_IMPLS = ("torch", "triton", "triton_conv")
# The recipes a checked fit can choose between on its kept-apart photo (FitBegin.check_recipes;
# fit_coefficients' check_recipes: what each recipe is, and what was measured, in
# npbgpp_core.fitting, which re-exports this tuple): here because the add-on's Also Try Whole
# Views sends it and this module is torch-free.
CHECK_RECIPES = ("crops", "whole")
# Steps of the "whole" recipe of CHECK_RECIPES (npbgpp_core.fitting runs it and re-exports this
# number): here so that the add-on's Also Try Whole Views can say it without importing torch.
WHOLE_VIEW_STEPS = 50
# The long side (pixels) the "whole" recipe of CHECK_RECIPES fits its photos at (fit_coefficients'
# whole_max_side): larger photos are shrunk to it for every whole-view step (FitRecipe.coarse_fraction 1 at
# coarse_side this), photos no larger are fitted as they are, and the check still scores the kept photo at
# its own size. Why a cap: the whole-view steps cost more with every pixel (both recipes about 4x the crops
# fit at 768 px, BENCHMARKS.md "The choosing and averaging checks at 384 and 768 px"), which is why the
# users' averaged check stops at AUTO_AVERAGE_HIGH_SIDE. None: no cap (what every figure so far measured).
WHOLE_VIEW_MAX_SIDE: int | None = None
# How a choosing check (CHECK_RECIPES) turns its recipes' fits into one (FitBegin.check_combine;
# fit_coefficients' check_combine, re-exported by npbgpp_core.fitting): "choose" keeps the one
# scoring best on the kept photo, "average" the element-wise mean of them all (then checked as usual).
CHECK_COMBINES = ("choose", "average")
# The check_combine of a fit that names none (FitBegin's, fit_coefficients', fit_bundle's and the
# command lines'): choosing, what a choosing check did before averaging was added; averaging is opt-in.
FIT_CHECK_COMBINE = CHECK_COMBINES[0]
# The users' default for a checked fit (Fit to Photos' Also Try Whole Views on Auto, headless_train
# fit without --check-recipes, scene_fit.BundleFit's check_recipes None): both CHECK_RECIPES averaged
# when the fitting photos' long side is within this inclusive range of pixels, the plain check
# otherwise (BENCHMARKS.md, Averaged fits ("soups") of a choosing check's states, and The choosing and
# averaging checks at 384 and 768 px: ahead of the plain check at 384, 512 and 768 px with no capture
# 0.3 dB below it, behind on a capture at 256 px; the whole-view steps cost more with every pixel,
# about 4x the fit at 768 px, and no larger size was measured). The library's own defaults
# (fit_coefficients, FitBegin) stay the plain check.
AUTO_AVERAGE_LOW_SIDE = 384
AUTO_AVERAGE_HIGH_SIDE = 768


def auto_check_recipes(long_side: int) -> tuple[tuple[str, ...], str]:
    """The (check_recipes, check_combine) the users' default gives fitting photos whose long side
    is ``long_side`` pixels: every CHECK_RECIPES averaged within AUTO_AVERAGE_LOW_SIDE..
    AUTO_AVERAGE_HIGH_SIDE (inclusive), else no recipes and FIT_CHECK_COMBINE (the plain check)."""
    if AUTO_AVERAGE_LOW_SIDE <= long_side <= AUTO_AVERAGE_HIGH_SIDE:
        return CHECK_RECIPES, "average"
    return (), FIT_CHECK_COMBINE


# The add-on's Photo Size, Aggregate Descriptors' default for renders up to this side and the least one for
# larger renders (AggregateBegin.max_side; blender_addon.operators.default_photo_size): the long side, in
# pixels, it reads each photo at (larger photos shrunk with their cameras, npbgpp_core.image_size.fit_long_side;
# smaller ones kept as they are). Why: aggregating reads every photo whole through the extractor, about
# 0.34 GiB per megapixel since it decodes big photos in tiles, 0.74 before (BENCHMARKS.md "A user's capture
# with big photos", "Aggregate at own size in tiles": 20 photos at 4032 px took 591 s and 3.6 GiB, 144 s and
# 2.9 GiB at 2048); aggregating from half the size the views are looked at stayed within the quality bar at 1024 px
# (BENCHMARKS.md "Aggregating from smaller photos": mean +0.05 / -0.03 dB, worst -0.28). Renders up to 2048 px
# lose nothing at this cap (it leaves their photos at the render's size: "... at 2048 px"); renders above it of
# bigger photos do: 12-13 MP photos aggregated at 2048 lost up to 0.52 dB rendered at their own size, at 3072 up
# to 0.23 (BENCHMARKS.md "Renders above 2048 px"), so the add-on's Photo Size, by default (Follow Render), follows
# the render's long side above this cap (up to AGGREGATE_RENDER_MAX_SIDE below); the cap stays for renders up to
# 2048 px, for time and memory (own size took 4.9x the time). The add-on's property, the READMEs and the tests
# read this one number.
AGGREGATE_MAX_SIDE = 2048
# The most the add-on's Photo Size follows the render by itself (Follow Render, the default)
# (blender_addon.operators.default_photo_size): 4K renders (3840) and 12-MP phone photos (4032-4080 px) are
# read at their size, about 3.6 GiB for 20 photos of 11 MP on a CPU (BENCHMARKS.md "Aggregate at own size in
# tiles"); photos of 3840x2160 decode in tiles too (the extractor's TILE_ABOVE_SIDE), 1.2 GiB an extractor
# call, 3.8 whole (BENCHMARKS.md "The extractor at the render sizes Photo Size now follows"); a
# 48-MP photo (8064 px) would take ~6.6 GiB and 86 s an extractor call there, so larger renders or photos need
# Photo Size set (Fixed, or Own Size; a script's max_side 0).
AGGREGATE_RENDER_MAX_SIDE = 4096
# The smallest long side an aggregation reads photos at (below it a photo is a few encoder cells: nothing
# to aggregate); Photo Size, export --max-side and bench_quality --aggregate-max-side refuse less (0 aside).
AGGREGATE_MIN_SIDE = 16


def photo_size_for_render(width: int, height: int) -> int:
    """Aggregate's Photo Size Follow Render (the add-on's default), for a render of ``width`` x ``height``:
    its long side, at least :data:`AGGREGATE_MAX_SIDE` and at most :data:`AGGREGATE_RENDER_MAX_SIDE`.
    The one rule of the add-on's default (``operators.default_photo_size``, with the size F12
    renders at) and of ``bench/bench_big_photos.py run``'s (with the render Import Dataset sets)."""
    return min(AGGREGATE_RENDER_MAX_SIDE, max(AGGREGATE_MAX_SIDE, int(width), int(height)))


def photo_size_bound(long_side: int | None, max_side: int | None) -> int | None:
    """The long side an aggregation reads the largest photo at now, which a smaller Photo Size (export
    --max-side) must go below to read it smaller: ``long_side`` (the photos' largest; None: not known)
    capped at ``max_side`` (None: own size). None when no smaller one can be set (at most
    :data:`AGGREGATE_MIN_SIDE`: both refuse less) or when neither side is known. The one rule of the
    out-of-memory advice of the add-on's Aggregate and of export."""
    read = long_side if max_side is None else max_side if long_side is None else min(long_side, max_side)
    return read if read is not None and read > AGGREGATE_MIN_SIDE else None


def check_aggregate_max_side(value: Any, what: str = "Photo Size") -> int | None:
    """The long side an aggregation reads photos at (AggregateBegin.max_side, export --max-side, a
    bundle's "aggregate_max_side"): None for 0 or None (each photo at its own size), else ``value``
    when it is a whole number of at least :data:`AGGREGATE_MIN_SIDE`; ValueError naming ``what``
    and saying what to give otherwise."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if value is None or (whole and value == 0):
        return None
    if not whole or value < AGGREGATE_MIN_SIDE:
        raise ValueError(f"{what} must be 0 (each photo at its own size) or a whole number of pixels of at least "
                         f"{AGGREGATE_MIN_SIDE}, got {value!r}")
    return int(value)


# Where the add-on's Photo Size lives: a scene setting (saved with the .blend) in the panel Render Properties >
# NPBG++ > Data, which the worker's out-of-memory advice to the add-on's Aggregate names (tests check it against
# the panel's labels and the setting's name).
ADDON_PHOTO_SIZE = "Render Properties > NPBG++ > Data > Photo Size"


# Frame.note while the service compiles a fused refiner's kernels (text for the user; the
# viewport reads Frame.compiling).
COMPILING_KERNELS_NOTE = "compiling fused kernels..."
# The clip range that clips nothing: CameraSpec's and npbgpp_core.camera.Camera's defaults
# (here because this module must stay torch-free; camera.py imports them).
NO_CLIP_NEAR: float = 0.0
NO_CLIP_FAR: float = float("inf")


# --------------------------------------------------------------------------- values
@dataclass(frozen=True)
class CameraSpec:
    """An OpenCV pinhole camera as plain lists: ``K`` 3x3, world-to-camera ``R`` 3x3 and
    ``t`` (3,), ``image_size`` (H, W); pixel (row i, column j) has its centre at (j, i).
    ``near`` / ``far``: the clip range in view depth (``Camera.near`` / ``far``; the
    defaults clip nothing)."""

    K: list[list[float]]
    R: list[list[float]]
    t: list[float]
    image_size: tuple[int, int]
    near: float = NO_CLIP_NEAR
    far: float = NO_CLIP_FAR

    @classmethod
    def from_opencv(cls, K: Any, R: Any, t: Any, image_size: Sequence[int], near: float = NO_CLIP_NEAR,
                    far: float = NO_CLIP_FAR) -> CameraSpec:
        return cls(
            np.asarray(K, np.float64).reshape(3, 3).tolist(), np.asarray(R, np.float64).reshape(3, 3).tolist(),
            np.asarray(t, np.float64).reshape(3).tolist(), (int(image_size[0]), int(image_size[1])),
            float(near), float(far),
        )

    @classmethod
    def from_camera(cls, camera: Camera) -> CameraSpec:
        K, R, t = camera.to_opencv()
        return cls.from_opencv(K, R, t, camera.image_size, camera.near, camera.far)

    def to_camera(self, **kwargs: Any) -> Camera:
        """The core :class:`~npbgpp_core.camera.Camera` (imports torch)."""
        from .camera import Camera

        return Camera.from_opencv(self.K, self.R, self.t, self.image_size, near=self.near, far=self.far, **kwargs)


@dataclass
class DatasetView:
    """One input view of a dataset: its name, image file and camera."""

    name: str
    image_path: str
    camera: CameraSpec


# --------------------------------------------------------------------------- replies
class Reply:
    """Base of every answer."""


@dataclass
class Done(Reply):
    """A request that returns nothing."""


@dataclass
class Failure(Reply):
    """The request raised: ``error`` is '<ExceptionType>: message'; the service goes on."""

    error: str
    trace: str = ""


@dataclass
class TorchInfo(Reply):
    torch: str
    devices: list[str]
    python: str


@dataclass
class PointCount(Reply):
    count: int


@dataclass
class BundleInfo(Reply):
    points: int
    device: str


@dataclass
class PointSet(Reply):
    """(N, 3) float32 points and (N, 3) display-sRGB colours or None."""

    points: np.ndarray
    colors: np.ndarray | None


@dataclass
class DatasetSummary(Reply):
    name: str
    format: str
    points: np.ndarray
    colors: np.ndarray | None
    views: list[DatasetView]
    point_ids: np.ndarray | None = None  # (N,) index of each point in the dataset's whole cloud
    no_cloud: str = ""  # the dataset has no point cloud (points empty): the loader's message saying why
    # .ply files in the folder the loader did not read, (path relative to it, bytes): datasets.other_clouds
    other_clouds: list[tuple[str, int]] = field(default_factory=list)
    cloud_file: str = ""  # the point cloud file the loader read (metadata "point_cloud"); "": none
    # a warning that the cloud misses the dataset's own reconstruction (datasets.cloud_fit); "" when it fits
    cloud_note: str = ""


@dataclass
class AggregationStarted(Reply):
    views: int
    world_up: list[float]
    weights: str = ""  # the NPBG++ weights file in use (the bundled one chosen, when none was given)
    domain: str = ""  # the data domain that chose it ("scene" / "object"); "" when a file was given
    cloud_note: str = ""  # DatasetSummary.cloud_note of the cloud aggregated
    # every view of the dataset; more than ``views`` when its split holds some out for evaluation
    # (COLMAP and nerfstudio without split lists: every 8th), which Aggregate, Densify and Fit skip
    dataset_views: int = 0
    max_side: int = 0  # AggregateBegin.max_side as applied (0: each photo at its own size)
    largest_side: int = 0  # the longest side of the photos aggregated, at their own size


@dataclass
class AggregationResult(Reply):
    """``valid``: the points nearest to the camera at some pixel of a view's z-buffer (at
    the model's visibility scale of the photo's size), which get descriptors and render;
    ``in_no_view``: the points on no pixel of any view (behind, outside). The rest lost
    each pixel they fell on to a nearer point."""

    path: str
    points: int
    valid: int
    world_up: list[float]
    in_no_view: int


@dataclass
class DensifyProgress(Reply):
    """Where a densify job stands: ``done`` of ``total`` steps (``stage``: load, depth,
    fuse, done); ``finished`` when the cloud is ready for :class:`DensifyFinish`."""

    stage: str
    done: int
    total: int
    finished: bool


@dataclass
class FitProgress(Reply):
    """Where a fit job stands: ``done`` of ``total`` steps (a checked fit's two scoring
    renders count as one step each, :class:`FitBegin`); ``finished`` when the fitted
    bundle is ready for :class:`FitFinish`. ``doing``: what the next step does when it is
    not a fitting step (``BundleFit.doing``: a checked fit scoring its kept photo), else ""."""

    done: int
    total: int
    finished: bool
    doing: str = ""


@dataclass
class FitResultInfo(Reply):
    """The fitted bundle written: its path, steps, first and last loss, seconds fitting.
    ``kept``: "fitted", or "unfitted" when a checked fit (:class:`FitBegin` ``check_view``)
    scored more than ``CHECK_TOLERANCE_DB`` below the unfitted scene on the photo kept apart, so
    the bundle written is the unfitted one; ``outcome``: one line saying so for the user (``BundleFit.outcome``);
    ``render_not_finite``: the fit was dropped because its render of that photo was not finite
    (``FitCheck.render_not_finite``): the fit itself is broken, not merely worse.
    ``steps_in_all``: a choosing check (:class:`FitBegin` ``check_recipes``) fitted each recipe
    and chose one (or averaged them all: ``combine``): the steps of them all (``FitResult.steps_in_all``),
    of which ``steps`` and the losses are the chosen fit's while ``seconds`` count every fit; 0 for any
    other fit.
    ``combine``: what a choosing check was asked to do with the recipes' fits (:class:`FitBegin`
    ``check_combine``, ``FitCheck.combine``: "choose" or "average"), also when it could not apply
    (then ``steps_in_all`` is 0); "" for any other fit. "average" with ``steps_in_all`` above 0: the
    check took the mean of every recipe's fit and judged it, kept or not (``steps`` and the losses are
    then the first recipe's).
    ``choosing_keeps``: such an average dropped because its render was not finite, while a choosing
    check (``check_combine`` "choose") would have kept one recipe's own fit (``FitCheck.choosing_keeps``):
    that recipe (one of :data:`CHECK_RECIPES`), for the add-on's advice; else ""."""

    path: str
    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    kept: str = "fitted"
    outcome: str = ""
    render_not_finite: bool = False
    steps_in_all: int = 0
    combine: str = ""
    choosing_keeps: str = ""


@dataclass
class Frame(Reply):
    """float32 (H, W, FRAME_CHANNELS), see the module doc. ``refiner``: the refiner
    implementation that ran (one of REFINER_IMPLS; "" without the network), which may be
    'torch' when a fused one was asked for; ``note``: why, or what the worker is doing
    (e.g. compiling the fused kernels), "" when nothing to say, for display only;
    ``compiling``: the fused kernels asked for are still compiling, so a later frame of
    the same view would run them (the viewport asks again)."""

    pixels: np.ndarray
    refiner: str = ""
    note: str = ""
    compiling: bool = False


@dataclass
class SharedFrame(Reply):
    """A :class:`Frame` left in a shared-memory block (the worker's transport)."""

    shm: str
    shape: tuple[int, ...]
    refiner: str = ""
    note: str = ""
    compiling: bool = False

    @classmethod
    def of(cls, frame: Frame, shm: str) -> SharedFrame:
        """``frame`` with its pixels left in the shared-memory block named ``shm``."""
        return cls(shm, tuple(frame.pixels.shape), frame.refiner, frame.note, frame.compiling)

    def with_pixels(self, pixels: np.ndarray) -> Frame:
        """The :class:`Frame` again, with the pixels read back from the block."""
        return Frame(pixels, self.refiner, self.note, self.compiling)


# --------------------------------------------------------------------------- requests
class Request:
    """Base of every request: ``op`` is the :class:`RenderService` method answering it;
    ``doing`` what it does in the add-on's words, for messages ("rendering a frame"), which
    never show the request's own name."""

    op: ClassVar[str]
    reply: ClassVar[type[Reply]]
    doing: ClassVar[str]


@dataclass
class Hello(Request):
    op: ClassVar[str] = "hello"
    reply: ClassVar[type[Reply]] = TorchInfo
    doing: ClassVar[str] = "starting"


@dataclass
class SetPoints(Request):
    """Loose points to render (source 'points'): world (N, 3), display-sRGB colours or None."""

    points: np.ndarray
    colors: np.ndarray | None = None
    op: ClassVar[str] = "set_points"
    reply: ClassVar[type[Reply]] = PointCount
    doing: ClassVar[str] = "taking the scene's points"


@dataclass
class LoadBundle(Request):
    """Load a NeuralScene file (kept while its path, saved version (atomic.file_version), device and
    precision match)."""

    path: str
    device: str = "AUTO"
    precision: str = "FP32"
    op: ClassVar[str] = "load_bundle"
    reply: ClassVar[type[Reply]] = BundleInfo
    doing: ClassVar[str] = "loading the bundle"


@dataclass
class GetBundlePoints(Request):
    op: ClassVar[str] = "bundle_points"
    reply: ClassVar[type[Reply]] = PointSet
    doing: ClassVar[str] = "reading the bundle's points"


@dataclass
class SelectBundlePoints(Request):
    """Render only these bundle points (indices, the point object's ``npbgpp_id``
    attribute); None: all. Kept across bundle loads until changed."""

    ids: np.ndarray | None = None
    op: ClassVar[str] = "select_bundle_points"
    reply: ClassVar[type[Reply]] = PointCount
    doing: ClassVar[str] = "selecting the bundle's points"


@dataclass
class ReadDataset(Request):
    path: str
    format: str | None = None
    max_points: int = 0  # 0: all
    undistort: bool = False  # COLMAP, nerfstudio: remap distorted photos on load
    allow_external_paths: bool = False  # NeRF / COLMAP / nerfstudio: image paths may leave the dataset folder
    pc_name: str = ""  # the loaders' pc_name: a .ply (relative to the dataset folder, or absolute); "": the default
    op: ClassVar[str] = "read_dataset"
    reply: ClassVar[type[Reply]] = DatasetSummary
    doing: ClassVar[str] = "importing the dataset"


@dataclass
class AggregateBegin(Request):
    """Start aggregating NPBG++ descriptors of a dataset's points with ``weights``; empty
    ``weights``: the bundled file of ``domain`` ("scene", "object", or "auto": the
    dataset's own, ``npbgpp_core.datasets.scene_domain``). ``points``: a PLY file whose
    points (and colours) replace the dataset's own cloud (Densify's output; the dataset's own
    cloud file is read as its loader reads it, ``service.aggregation_dataset``); empty: the
    dataset's cloud, the one ``pc_name`` names (as :class:`ReadDataset`) or the format's own."""

    dataset: str
    weights: str
    format: str | None = None
    device: str = "AUTO"
    max_points: int = 0
    up_axis: str = "AUTO"
    undistort: bool = False
    allow_external_paths: bool = False
    domain: str = "auto"
    points: str = ""
    pc_name: str = ""  # the dataset's chosen cloud (ReadDataset.pc_name), read when ``points`` is empty
    max_side: int = 0
    op: ClassVar[str] = "aggregate_begin"
    reply: ClassVar[type[Reply]] = AggregationStarted
    doing: ClassVar[str] = "aggregating descriptors"


@dataclass
class AggregateView(Request):
    index: int  # 0 .. AggregationStarted.views - 1
    op: ClassVar[str] = "aggregate_view"
    reply: ClassVar[type[Reply]] = Done
    doing: ClassVar[str] = "aggregating descriptors"


@dataclass
class AggregateCancel(Request):
    """Drop the running aggregation (its memory is freed); nothing is written."""

    op: ClassVar[str] = "aggregate_cancel"
    reply: ClassVar[type[Reply]] = Done
    doing: ClassVar[str] = "cancelling Aggregate Descriptors"


@dataclass
class AggregateFinish(Request):
    out: str  # the bundle file to write
    op: ClassVar[str] = "aggregate_finish"
    reply: ClassVar[type[Reply]] = AggregationResult
    doing: ClassVar[str] = "finishing Aggregate Descriptors"


@dataclass
class DensifyBegin(Request):
    """Start a dense reconstruction of a dataset (``npbgpp_core.densify``); then
    :class:`DensifyStep` until finished, :class:`DensifyFinish` or :class:`DensifyCancel`."""

    dataset: str
    format: str | None = None
    undistort: bool = False
    device: str = "AUTO"
    max_points: int = 2_000_000
    max_views: int = 0  # 0: every training view
    min_consistent: int = 2
    image_scale: float = 1.0
    allow_external_paths: bool = False
    fill: bool = False  # DensifyOptions.fill: points on texture-poor regions without stereo depth
    out: str = ""  # where DensifyFinish will write: refused now when it is an input of the dataset
    pc_name: str = ""  # the dataset's chosen cloud (ReadDataset.pc_name): read, and refused as ``out``
    op: ClassVar[str] = "densify_begin"
    reply: ClassVar[type[Reply]] = DensifyProgress
    doing: ClassVar[str] = "densifying points"


@dataclass
class DensifyStep(Request):
    """Work for about ``seconds`` (at least one step: one view loaded, matched or fused)."""

    seconds: float = 0.25
    op: ClassVar[str] = "densify_step"
    reply: ClassVar[type[Reply]] = DensifyProgress
    doing: ClassVar[str] = "densifying points"


@dataclass
class DensifyFinish(Request):
    """Write the finished cloud to ``out`` (PLY) and send it back."""

    out: str
    op: ClassVar[str] = "densify_finish"
    reply: ClassVar[type[Reply]] = PointSet
    doing: ClassVar[str] = "finishing Densify Points"


@dataclass
class DensifyCancel(Request):
    """Drop the running densify job (if any)."""

    op: ClassVar[str] = "densify_cancel"
    reply: ClassVar[type[Reply]] = Done
    doing: ClassVar[str] = "cancelling Densify Points"


@dataclass
class FitBegin(Request):
    """Start fitting the aggregated ``bundle`` to the training views of ``dataset`` for
    ``steps`` steps (``npbgpp_core.scene_fit``); then :class:`FitStep` until finished,
    :class:`FitFinish` or :class:`FitCancel`. ``weights``: the NPBG++ file whose encoder
    the fit's perceptual loss uses; empty: the bundled file of ``domain`` (empty: the
    bundle's own domain). ``aligned``: whether the fitted scene renders rolled views
    upright (``fit_coefficients``' ``aligned``); None: its default, ``FIT_ALIGNED``.
    ``check_view``: keep one training photo apart and write the unfitted scene if the fit
    scores more than ``CHECK_TOLERANCE_DB`` lower on it (``fit_coefficients``' ``check_view``); None: its default,
    ``FIT_CHECK_VIEW``. A checked fit's ``total`` counts its two scoring renders as steps.
    ``check_recipes`` (with ``check_view``): the fit's choosing check (``fit_coefficients``'
    ``check_recipes``, names from ``CHECK_RECIPES``: each recipe fitted, the best on the kept
    photo kept); empty: the fit's own recipe alone. ``total`` then counts every recipe's steps.
    ``check_combine`` (with two or more ``check_recipes``): ``fit_coefficients``' ``check_combine``,
    one of ``CHECK_COMBINES``: "choose" the best recipe, "average" the mean of every recipe's fit.
    Both None: the users' default, by the training photos' long side (:func:`auto_check_recipes`,
    ``scene_fit.BundleFit``'s check_recipes None), what the add-on's Also Try Whole Views on Auto sends."""

    bundle: str
    dataset: str
    steps: int = 200
    weights: str = ""
    domain: str = ""
    format: str | None = None
    undistort: bool = False
    allow_external_paths: bool = False
    device: str = "AUTO"
    aligned: bool | None = None
    check_view: bool | None = None
    check_recipes: tuple[str, ...] | None = ()
    check_combine: str | None = FIT_CHECK_COMBINE
    op: ClassVar[str] = "fit_begin"
    reply: ClassVar[type[Reply]] = FitProgress
    doing: ClassVar[str] = "fitting to the photos"


@dataclass
class FitStep(Request):
    """Fit for about ``seconds`` (at least one step)."""

    seconds: float = 0.25
    op: ClassVar[str] = "fit_step"
    reply: ClassVar[type[Reply]] = FitProgress
    doing: ClassVar[str] = "fitting to the photos"


@dataclass
class FitFinish(Request):
    """Write the fitted bundle to ``out`` (atomically)."""

    out: str
    op: ClassVar[str] = "fit_finish"
    reply: ClassVar[type[Reply]] = FitResultInfo
    doing: ClassVar[str] = "finishing Fit to Photos"


@dataclass
class FitCancel(Request):
    """Drop the running fit (if any); nothing is written."""

    op: ClassVar[str] = "fit_cancel"
    reply: ClassVar[type[Reply]] = Done
    doing: ClassVar[str] = "cancelling Fit to Photos"


@dataclass
class RenderFrame(Request):
    camera: CameraSpec
    source: str = "points"  # one of SOURCES
    neural: bool = False
    max_pixels: int = 0  # > 0: the network renders larger frames in windows of about this many pixels
    point_size: int = 1  # points as squares of this many pixels (without the network only)
    # Rolled views: 'exact' (the published network's whole reach), 'bounded' (it sees the
    # view plus a margin: nearer the cost of an unrolled view on the CPU, an approximation;
    # see npbgpp_core/models/bounded.py) or 'auto' (bounded on the CPU, exact elsewhere:
    # the band executor was measured on the CPU only). Unrolled views are the same in all.
    roll_context: str = "exact"
    # The refiner's implementation (REFINER_IMPLS). A fused one runs only on CUDA with
    # Triton installed (Frame.refiner says what ran). Its kernels compile on a thread of
    # the service the first time: meanwhile frames run torch, unless wait_for_kernels
    # (F12 renders: every frame of an animation the same implementation).
    refiner_impl: str = "torch"
    wait_for_kernels: bool = False
    op: ClassVar[str] = "render"
    reply: ClassVar[type[Reply]] = Frame
    doing: ClassVar[str] = "rendering a frame"


@dataclass
class Shutdown(Request):
    op: ClassVar[str] = "shutdown"
    reply: ClassVar[type[Reply]] = Done
    doing: ClassVar[str] = "shutting down"


REQUESTS: tuple[type[Request], ...] = (
    Hello, SetPoints, LoadBundle, GetBundlePoints, SelectBundlePoints, ReadDataset, AggregateBegin, AggregateView,
    AggregateFinish, AggregateCancel, DensifyBegin, DensifyStep, DensifyFinish, DensifyCancel, FitBegin, FitStep,
    FitFinish, FitCancel, RenderFrame, Shutdown,
)
