"""The renderer behind the Blender add-on: answers the requests of
:mod:`npbgpp_core.protocol` (points or a NeuralScene bundle -> frames; a dataset's
points and cameras; NPBG++ aggregation of a dataset into a bundle).

Transport-free: ``blender_addon/worker.py`` feeds it requests from a pipe, the add-on's
in-process mode calls :meth:`RenderService.handle` directly. Torch is imported when the
service is used, not when this module is imported.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np

from . import protocol as P
from .image_size import SMALLER_PHOTOS_COMMAND, fit_long_side
from .memory import AGGREGATE_PHOTOS_MEMORY, BUNDLE_LOAD_TIMES_FILE, FIT_PHOTOS_MEMORY, first_line, is_out_of_memory

if TYPE_CHECKING:
    import torch

DEFAULT_POINT_COLOR = 0.8  # grey for loose points without colours
# The requests of the jobs that read a dataset's photos at their own size, whose memory grows
# with the photos' pixels (the out-of-memory advice names the photos, not the frame).
# AggregateFinish is not one: it solves per-point sums, with the photos read and dropped.
AGGREGATE_JOBS = (P.AggregateBegin, P.AggregateView)
PHOTO_JOBS = (*AGGREGATE_JOBS, P.FitBegin, P.FitStep, P.FitFinish)
# Densify Points' requests: it holds every view it matches at its processing size (at most
# DensifyOptions.max_image_size, times Image Scale), so its advice names those knobs.
DENSIFY_JOBS = (P.DensifyBegin, P.DensifyStep, P.DensifyFinish)
PRECISIONS = ("FP32", "FP16", "BF16")


def pick_device(name: str) -> str:
    """'AUTO' -> cuda, mps or cpu, whichever this torch has; otherwise check the request."""
    import torch

    name = name.upper()
    has_mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "AUTO":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "CUDA" and not torch.cuda.is_available():
        raise RuntimeError("device CUDA requested but this PyTorch has no usable CUDA GPU")
    if name == "MPS" and not has_mps:
        raise RuntimeError("device MPS requested but Metal (MPS) is not available")
    if name not in ("CUDA", "MPS", "CPU"):
        raise ValueError(f"unknown device {name!r}")
    return name.lower()


def precision_dtype(name: str) -> torch.dtype | None:
    """'FP32' -> None (the model's own), 'FP16' / 'BF16' -> the torch dtype."""
    import torch

    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {PRECISIONS}")
    return {"FP16": torch.float16, "BF16": torch.bfloat16}.get(name)


def torch_info() -> P.TorchInfo:
    import torch

    devices = ["CPU"]
    if torch.cuda.is_available():
        devices.insert(0, "CUDA")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.insert(0, "MPS")
    return P.TorchInfo(torch.__version__, devices, sys.executable)


def load_dataset(path: str, format: str | None = None, undistort: bool = False,
                 allow_external_paths: bool = False, require_points: bool = True, pc_name: str = "") -> Any:
    """``load_scene`` for the add-on. ``undistort`` applies to COLMAP models and nerfstudio
    transforms.json (the other formats hold undistorted images) and ``allow_external_paths``
    to the formats whose files name image paths (NeRF-Synthetic, COLMAP, nerfstudio); each
    is ignored for the formats without it. ``require_points=False``: a dataset without a
    point cloud loads with none (the jobs that only need its cameras and photos: Densify,
    Fit, Aggregate of another cloud). ``pc_name``: the cloud to read instead of the format's
    default (every format takes it); "": the default."""
    from .datasets import detect_format, format_options, load_scene

    root = os.path.abspath(path)
    format = format or detect_format(root)
    accepted = format_options(format)
    wanted = {"undistort": undistort, "allow_external_paths": allow_external_paths}
    options: dict[str, bool | str] = {k: True for k, on in wanted.items() if on and k in accepted}
    if not require_points:
        options["require_points"] = False
    if pc_name:
        options["pc_name"] = pc_name
    return load_scene(root, format=format, **options)


def load_dataset_or_cameras(path: str, format: str | None = None, undistort: bool = False,
                            allow_external_paths: bool = False, pc_name: str = "") -> tuple[Any, str]:
    """``(data, no_cloud)``: the dataset with its point cloud and "", or, when it has none
    (instant-ngp's transforms.json, a COLMAP model without points3D), its cameras and photos
    with no points and the loader's own message saying what it looked for. Any other error
    is raised as the loader raises it (a cloud named by ``pc_name`` that is missing or
    unreadable too: the loaders refuse it with or without require_points)."""
    from .datasets import DatasetError

    try:
        return load_dataset(path, format, undistort, allow_external_paths, pc_name=pc_name), ""
    except DatasetError as exc:
        data = load_dataset(path, format, undistort, allow_external_paths, require_points=False, pc_name=pc_name)
        if len(data.points):  # not the cloud the loader was missing: its error stands
            raise
        return data, str(exc)


def with_points(data: Any, path: str) -> Any:
    """``data`` with the points and colours of PLY file ``path`` instead of its own cloud
    (a dense cloud of the same scene, in its world frame; a splat file's splats as the
    dataset loaders read it, ``ply.load_scene_cloud``); ValueError naming the file."""
    import dataclasses

    from .ply import load_scene_cloud

    cloud = load_scene_cloud(path)  # names a missing or unreadable file
    if len(cloud) == 0:
        raise ValueError(f"point cloud to aggregate holds no points: {path}")
    return dataclasses.replace(data, points=np.asarray(cloud.points, np.float32),
                               colors=None if cloud.colors is None else np.asarray(cloud.colors, np.float32),
                               metadata={**data.metadata, "point_cloud": path})


def aggregation_dataset(req: P.AggregateBegin) -> Any:
    """The dataset Aggregate reads: its loader's cloud (``req.pc_name``, else the format's
    own), or the cloud of ``req.points`` instead (:func:`with_points`: a dense cloud of the
    dataset's frame; a dataset without a cloud of its own, Densify's input, loads too). A
    ``points`` file that is the dataset's own cloud stays as its loader reads it: a
    nerfstudio ``ply_file_path`` cloud is scaled by the file's ``applied_scale``, and Import
    Dataset Folder's Point Cloud naming it becomes Dataset Points; read as a plain file it
    lost the scale, and the bundle's points missed the photos' frame."""
    from .atomic import same_file

    data = load_dataset(req.dataset, req.format, req.undistort, req.allow_external_paths,
                        require_points=not req.points, pc_name="" if req.points else req.pc_name)
    own = data.metadata.get("point_cloud")
    if req.points and not (own and same_file(own, req.points)):
        data = with_points(data, req.points)
    return data


class DatasetAggregation:
    """NPBG++ descriptors of a dataset's points, streamed view by view into a bundle."""

    def __init__(self, req: P.AggregateBegin) -> None:
        import torch

        from .datasets import scene_domain
        from .datasets.cloud_fit import scene_cloud_note
        from .models.alignment import resolve_world_up
        from .pretrained import check_domain, default_weights_path, load_pretrained_npbgpp

        self.device = pick_device(req.device)
        # the long side each photo is read at (None: its own), checked before the dataset is read
        self.max_side = P.check_aggregate_max_side(req.max_side)
        if not req.weights and req.domain != "auto":
            check_domain(req.domain)  # before the dataset is read
        self.data = aggregation_dataset(req)
        self.cloud_note = scene_cloud_note(self.data)
        self.views = list(self.data.train) or list(range(len(self.data.views)))
        # (H, W) of the photo with the most pixels, at its own size: the out-of-memory advice names it
        self.largest_photo = self.data.largest_image_size(self.views)
        self.largest_side = max((max(self.data.views[i].camera.image_size) for i in self.views), default=0)
        # No file given: the bundled network of the data's domain (cut-out objects or scenes).
        self.domain = "" if req.weights else scene_domain(self.data) if req.domain == "auto" else req.domain
        self.weights = req.weights or default_weights_path("npbgpp", self.domain)
        # The scene's up axis for in-plane alignment: the bundle stores it in its config,
        # so rendering later rolls target views by the same rule as these input views.
        world_up = resolve_world_up(req.up_axis, [self.data.views[i].camera for i in self.views])
        self.model = load_pretrained_npbgpp(self.weights, self.device, world_up=world_up)
        if req.max_points:
            self.data = self.data.subsample_points(req.max_points)
        points = torch.as_tensor(np.asarray(self.data.points, np.float32), device=self.device)
        with torch.no_grad():
            self.state = self.model.begin_scene(points)
        # points on a pixel of some view's z-buffer, winning it or not (the result's count of the rest)
        self.in_a_view = torch.zeros(len(points), dtype=torch.bool, device=self.device)

    def add(self, k: int) -> None:
        import torch

        if not 0 <= k < len(self.views):
            raise IndexError(f"view {k} of {len(self.views)}")
        image, camera = self.data.view_at_long_side(self.views[k], self.max_side)
        image, camera = image.to(self.device), camera.to(self.device)
        with torch.no_grad():
            self.state.add_views(image[None], [camera])
            self.in_a_view |= self.model.points_in_view(self.state.points, camera)

    def finish(self, out: str) -> P.AggregationResult:
        import torch

        from .scene import NeuralScene

        with torch.no_grad():
            agg = self.state.finish()
        colors = None if self.data.colors is None else torch.from_numpy(np.asarray(self.data.colors, np.float32))
        scene = NeuralScene.from_aggregated(
            self.model, agg, colors, name=self.data.name,
            # "aggregate_max_side": the long side the photos were read at most (None: their own size); a fit's
            # fair check aggregates them again at it (scene_fit.BundleFit)
            metadata={"dataset": str(self.data.root), "views": len(self.views),
                      "weights": os.path.basename(self.weights), "domain": self.domain,
                      "aggregate_max_side": self.max_side},
        )
        scene.save(out)
        return P.AggregationResult(out, int(agg.points.shape[0]), int(agg.valid.sum()),
                                   list(self.model.config.world_up), int((~self.in_a_view).sum()))


def fused_kernels_compile(device: torch.device) -> bool:
    """Whether the fused refiner's Triton kernels are compiled on ``device`` before they
    run (on CUDA: seconds per kernel the first time, then Triton's on-disk cache), rather
    than interpreted (the CPU under ``TRITON_INTERPRET=1``, tests only)."""
    return device.type == "cuda"


class KernelWarmup:
    """Compiles a fused refiner implementation's Triton kernels on a thread, by rendering
    ``camera`` (and that view rolled 45 degrees, which runs the refiner block by block)
    with a private copy of the renderer's network: frames rendered meanwhile on the
    service's thread keep the torch refiner and are never blocked. Triton keeps what it
    compiled in memory for the process and on disk (``TRITON_CACHE_DIR``, by default
    ``~/.triton/cache``), so a later worker loads the kernels instead of compiling them."""

    def __init__(self, renderer: Any, impl: str, camera: Any, roll_context: str | None) -> None:
        clone = copy.copy(renderer)
        clone.model = copy.deepcopy(renderer.model)  # its own refiner.impl (the network is small)
        clone.model.refiner.impl = impl
        self.error = ""
        self.thread = threading.Thread(target=self._run, args=(clone, camera, roll_context), daemon=True,
                                       name=f"npbgpp-warmup-{impl}")
        self.thread.start()

    def _run(self, renderer: Any, camera: Any, roll_context: str | None) -> None:
        import torch

        try:
            with torch.inference_mode():
                for view in (camera, camera.rotated_in_plane(math.pi / 4)):
                    renderer.render(view, roll_context=roll_context)
        except Exception as exc:  # noqa: BLE001 - reported with every frame (which then runs torch)
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def ready(self) -> bool:
        return not self.thread.is_alive() and not self.error


def job_device(job: Any, req: P.Request) -> str:
    """The device a job (aggregation, densify, fit) runs on, for an out-of-memory message; its
    request's when there is no job yet (its constructor ran out of memory)."""
    device = getattr(job, "device", None)
    if device is None:
        try:
            device = pick_device(getattr(req, "device", "AUTO"))
        except (RuntimeError, ValueError):
            device = str(getattr(req, "device", "?")).lower()
    return str(device)


def gpu_full_hint(device: str) -> str:
    """The out-of-memory advice's last clause: off a GPU only when on one (the CPU's memory has no
    other device to move to)."""
    return "" if device == "cpu" else ", or switch Device to CPU when the GPU is the one that is full"


def bundle_memory_advice(req: P.LoadBundle, first: str) -> str:
    """Out of memory while loading a bundle: its size and points and what makes it smaller; the
    device is the request's (the renderer being replaced is not the one that ran out)."""
    from .bundle_file import point_count
    from .datasets.other_clouds import size_text

    device = job_device(None, req)
    try:
        size = f" ({size_text(os.path.getsize(req.path))}, {point_count(req.path):,} points)"
    except Exception:  # noqa: BLE001 - the advice must not fail (a header too big to read too): no size then
        size = ""
    return (f"out of memory on {device} while loading the bundle {req.path}{size} ({first}). Loading a bundle "
            f"takes about {BUNDLE_LOAD_TIMES_FILE} times its file's size in memory: aggregate fewer points (Aggregate "
            "Descriptors' Max Points, or a smaller point cloud) or load it on a computer with more memory"
            + gpu_full_hint(device))


def render_memory_advice(req: P.RenderFrame, device: str, first: str) -> str:
    """Out of memory while rendering a frame: fewer pixels always; a neural frame's Tile Size (the
    network's memory follows the tile, not the frame) below the side of the tiles it renders now,
    or of the whole frame when it is not tiled (0, or a frame within Tile Size squared: a Tile Size
    between that and the set one would change nothing), and only where a smaller tile can be set;
    on a GPU, FP16 or the CPU too."""
    from .scene import WINDOW_ALIGN, WINDOW_MARGIN

    h, w = req.camera.image_size
    fixes = ["render fewer pixels (Output > Resolution %)"]
    tiled = 0 < req.max_pixels < h * w
    side = math.isqrt(req.max_pixels if tiled else h * w)
    if req.neural and side > 2 * WINDOW_MARGIN + WINDOW_ALIGN:  # the smallest tile (window_grid's)
        fixes.append(f"set a Tile Size below {side} in Render Properties > NPBG++ > Performance")
    if device != "cpu":
        fixes.append("choose FP16 precision")
    hint = gpu_full_hint(device)  # the one wording of 'switch Device to CPU', never on the CPU
    advice = ", ".join(fixes) + hint if hint or len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return f"out of memory on {device} while rendering {w}x{h} pixels ({first}). {advice[0].upper()}{advice[1:]}"


def step_for(job: Any, seconds: float) -> None:
    """Run ``job.step()`` (True once finished) for about ``seconds``, at least once: a
    step request's share of a long job (densify, fit), short enough for Blender to stay
    responsive between requests."""
    import time

    t0 = time.perf_counter()
    while not job.step() and time.perf_counter() - t0 < seconds:
        pass


class RenderService:
    """Holds the scene (loose points, or a NeuralScene bundle) and answers requests."""

    def __init__(self) -> None:
        self.points: torch.Tensor | None = None  # (N, 3) float32 world
        self.colors: torch.Tensor | None = None  # (N, 3) sRGB
        self.bundle: Any = None
        self.bundle_key: tuple | None = None
        self.renderer: Any = None
        self.selection: np.ndarray | None = None  # bundle point ids to render, None: all
        self.selection_error = ""  # why the selection does not fit the loaded bundle
        self.device = "cpu"
        self.aggregation: DatasetAggregation | None = None
        self.densify: Any = None  # npbgpp_core.densify.DensifyJob
        self.fit: Any = None  # npbgpp_core.scene_fit.BundleFit
        self.warmups: dict[str, KernelWarmup] = {}  # fused refiner impl -> its compilation (this renderer)

    def handle(self, req: P.Request) -> P.Reply:
        """Answer one request; a failure becomes a :class:`~npbgpp_core.protocol.Failure`."""
        try:
            if not isinstance(req, P.Request):
                raise TypeError(f"not a renderer request: {type(req).__name__}")
            reply = getattr(self, req.op)(req)
            if not isinstance(reply, req.reply):  # a bug here, not in the caller's input
                raise TypeError(f"{type(req).__name__} answered with {type(reply).__name__}")
            return reply
        except Exception as exc:  # noqa: BLE001 - every failure goes back to Blender, the service goes on
            if is_out_of_memory(exc):
                return P.Failure(self._memory_advice(req, exc), traceback.format_exc())
            return P.Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def _memory_advice(self, req: P.Request, exc: BaseException) -> str:
        first = first_line(exc)
        if isinstance(req, PHOTO_JOBS):
            return self._photo_job_memory_advice(req, first)
        if isinstance(req, DENSIFY_JOBS):
            device = job_device(self.densify, req)
            return (f"out of memory on {device} while densifying points ({first}). Densify Points holds every view "
                    "it matches: lower its Image Scale or Max Views" + gpu_full_hint(device))
        if isinstance(req, P.LoadBundle):
            return bundle_memory_advice(req, first)
        device = self.device if self.renderer is not None else "cpu"
        if isinstance(req, P.RenderFrame):
            return render_memory_advice(req, device, first)
        # the rest (setting points, finishing an aggregation): no frame size to lower
        return f"out of memory on {device} while {req.doing} ({first})" + gpu_full_hint(device)

    def _photo_job_memory_advice(self, req: P.Request, first: str) -> str:
        """What runs out of memory in Aggregate and Fit is the photos' pixels (BENCHMARKS.md, A user's
        capture with big photos), not a frame's: the advice names the largest photo. Aggregate reads
        each photo at most at its Photo Size (AggregateBegin.max_side), so it first says to lower that
        (where the add-on keeps it, :data:`protocol.ADDON_PHOTO_SIZE`; ``headless_train export``:
        --max-side); Fit reads every photo at its own size, so it names a
        copy of the dataset with smaller photos (which it needs aggregated again: a bundle fits the
        dataset it was aggregated from), as Aggregate does after Photo Size. Aggregate's start
        (AggregateBegin) aggregates no photo (AggregateView does): it reads the dataset, its cloud and
        the network and holds a descriptor for every point, so fewer points help there (Network Auto
        reads two photos' alpha there to choose the network, no more: domain.scene_domain)."""
        aggregating = isinstance(req, AGGREGATE_JOBS)
        job: Any = self.aggregation if aggregating else self.fit
        device = job_device(job, req)
        size = getattr(job, "largest_photo", None)
        photos = "" if size is None else f" The largest photo is {size[1]}x{size[0]} pixels"
        copy = ("import a copy of the dataset with smaller photos{again} (a COLMAP capture, with this project's "
                "repository: " + SMALLER_PHOTOS_COMMAND + ")")
        if not aggregating:
            return (f"out of memory on {device} while fitting to the photos ({first}).{photos and photos + '.'} "
                    f"Fit to Photos reads every photo at its own size ({FIT_PHOTOS_MEMORY}): "
                    + copy.format(again=", aggregate it and fit that bundle") + gpu_full_hint(device))
        if isinstance(req, P.AggregateBegin):  # AggregateView aggregates the photos: none yet
            fewer = f"a Max Points below {req.max_points:,}" if req.max_points else "a Max Points"
            return (f"out of memory on {device} while starting Aggregate Descriptors (reading the point cloud and "
                    f"the network), before aggregating any photo ({first}). It holds every point of the cloud with "
                    f"its descriptor: aggregate fewer points (set {fewer} in its options, headless_train export: "
                    "--max-points, or choose a smaller point cloud) or run it on a computer with more memory"
                    + gpu_full_hint(device))
        cap = getattr(job, "max_side", None) if job is not None else getattr(req, "max_side", 0) or None
        if size is not None and cap is not None:
            h, w = fit_long_side(size, cap)
            photos += f", read at {w}x{h}" if (h, w) != tuple(size) else ", read at its own size"
        # the setting as the add-on shows it (Follow Render / Own Size / Fixed resolve to a side), named
        # so that a user finds it: "Photo Size 2048" read as a menu item the panel does not have
        read = (f"at most {cap} px on the long side (the Photo Size setting's {cap} px)" if cap else
                "at its own size (the Photo Size setting's Own Size)")
        # a smaller Photo Size only below the side the largest photo is read at, and none at the least
        # one (export's rule: P.photo_size_bound); named where the add-on keeps it (a scene setting)
        below = P.photo_size_bound(getattr(job, "largest_side", None) or None, cap)
        smaller = f"set a Photo Size below {below}" if below is not None else ""
        smaller += (f" ({P.ADDON_PHOTO_SIZE}: Fixed; headless_train export: --max-side), or "
                    if smaller else "")
        return (f"out of memory on {device} while aggregating descriptors ({first}).{photos and photos + '.'} "
                f"Aggregate Descriptors reads every photo {read}; its memory grows with those pixels "
                f"({AGGREGATE_PHOTOS_MEMORY}): {smaller}" + copy.format(again="") + gpu_full_hint(device))

    # ------------------------------------------------------------------ requests
    def hello(self, req: P.Hello) -> P.TorchInfo:
        return torch_info()

    def shutdown(self, req: P.Shutdown) -> P.Done:
        return P.Done()

    def set_points(self, req: P.SetPoints) -> P.PointCount:
        import torch

        pts = np.ascontiguousarray(req.points, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {pts.shape}")
        if req.colors is None:
            col = np.full(pts.shape, DEFAULT_POINT_COLOR, np.float32)
        else:
            col = np.ascontiguousarray(req.colors, dtype=np.float32)
            if col.shape != pts.shape:
                raise ValueError(f"colors must be {pts.shape}, got {col.shape}")
        self.points, self.colors = torch.from_numpy(pts.copy()), torch.from_numpy(col.copy())
        return P.PointCount(len(pts))

    def load_bundle(self, req: P.LoadBundle) -> P.BundleInfo:
        path = req.path
        if not path:
            raise ValueError("no NeuralScene bundle set (Render Properties > NPBG++ > Bundle)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NeuralScene bundle not found: {path}")
        from .atomic import file_version

        key = (os.path.abspath(path), file_version(path), req.device, req.precision)
        if key != self.bundle_key:
            self.bundle = self.renderer = self.bundle_key = None
            self.warmups = {}
            device = pick_device(req.device)
            dtype = precision_dtype(req.precision)
            try:
                from .scene import NeuralScene

                bundle = NeuralScene.load(path)
            except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
                if is_out_of_memory(exc):  # a big bundle, not a bad one: handle() says so (bundle_memory_advice)
                    raise
                raise ValueError(f"cannot read NeuralScene bundle {path}: {type(exc).__name__}: {exc}") from exc
            renderer = bundle.renderer(device, dtype=dtype)
            self.bundle, self.renderer, self.device, self.bundle_key = bundle, renderer, device, key
            self._apply_selection()
        return P.BundleInfo(len(self.bundle), self.device)

    def select_bundle_points(self, req: P.SelectBundlePoints) -> P.PointCount:
        self.selection = None if req.ids is None else np.asarray(req.ids, np.int64).reshape(-1)
        self._apply_selection()
        if self.selection_error:
            raise ValueError(self.selection_error)
        return P.PointCount(-1 if self.selection is None else len(self.selection))

    def _apply_selection(self) -> None:
        """Apply the selection to the loaded bundle; one that does not fit it is remembered
        as an error that every render of the bundle reports (until either changes)."""
        self.selection_error = ""
        if self.renderer is not None:
            import torch

            ids = None if self.selection is None else torch.from_numpy(self.selection)
            try:
                self.renderer.select_points(ids)
            except ValueError as exc:
                self.selection_error = str(exc)
                self.renderer.select_points(None)

    def bundle_points(self, req: P.GetBundlePoints) -> P.PointSet:
        if self.bundle is None:
            raise RuntimeError("no bundle loaded")
        pts = self.bundle.points.detach().float().cpu().numpy()
        col = self.bundle.colors
        return P.PointSet(pts, None if col is None else col.detach().float().cpu().numpy())

    def read_dataset(self, req: P.ReadDataset) -> P.DatasetSummary:
        from .datasets.cloud_fit import scene_cloud_note
        from .datasets.other_clouds import other_clouds
        from .datasets.scene_data import subsample_indices

        data, no_cloud = load_dataset_or_cameras(req.path, req.format, req.undistort, req.allow_external_paths,
                                                 req.pc_name)
        cloud_note = scene_cloud_note(data)  # before subsampling: the whole cloud is what is checked
        ids = np.arange(len(data.points))
        if req.max_points:
            ids = subsample_indices(len(data.points), req.max_points)
            data = data.subsample_points(req.max_points)
        views = [P.DatasetView(v.name, str(v.image_path), P.CameraSpec.from_camera(v.camera)) for v in data.views]
        colors = None if data.colors is None else np.asarray(data.colors, np.float32)
        cloud = data.metadata.get("point_cloud")
        return P.DatasetSummary(data.name, data.format, np.asarray(data.points, np.float32), colors, views, ids,
                                no_cloud, other_clouds(data.root, cloud), str(cloud or ""), cloud_note)

    def aggregate_begin(self, req: P.AggregateBegin) -> P.AggregationStarted:
        self.aggregation = None
        self.aggregation = DatasetAggregation(req)
        agg = self.aggregation
        return P.AggregationStarted(len(agg.views), list(agg.model.config.world_up), agg.weights, agg.domain,
                                    agg.cloud_note, len(agg.data.views), agg.max_side or 0, int(agg.largest_side))

    def aggregate_view(self, req: P.AggregateView) -> P.Done:
        self._aggregation().add(int(req.index))
        return P.Done()

    def aggregate_finish(self, req: P.AggregateFinish) -> P.AggregationResult:
        agg, self.aggregation = self._aggregation(), None
        return agg.finish(req.out)

    def aggregate_cancel(self, req: P.AggregateCancel) -> P.Done:
        self.aggregation = None
        return P.Done()

    def _aggregation(self) -> DatasetAggregation:
        if self.aggregation is None:
            raise RuntimeError("no aggregation running (AggregateBegin first)")
        return self.aggregation

    def densify_begin(self, req: P.DensifyBegin) -> P.DensifyProgress:
        from .densify import DensifyJob, DensifyOptions, check_not_the_own_cloud, check_output

        self.densify = None
        # the dataset's cloud only narrows the depth search: a capture without one densifies from its cameras
        data = load_dataset(req.dataset, req.format, req.undistort, req.allow_external_paths, require_points=False,
                            pc_name=req.pc_name)
        if req.out:  # before the work (minutes), not when the cloud is written
            check_output(req.out, data, "output")
            if req.pc_name:
                check_not_the_own_cloud(req.out, data, "output", req.allow_external_paths)
        views = list(data.train) or list(range(len(data.views)))
        if req.max_views and len(views) > req.max_views:
            views = [views[int(round(k))] for k in np.linspace(0, len(views) - 1, req.max_views)]
        options = DensifyOptions(max_points=req.max_points or DensifyOptions.max_points,
                                 min_consistent=req.min_consistent, image_scale=req.image_scale, fill=req.fill)
        self.densify = DensifyJob(data, views, options, pick_device(req.device))
        return self._densify_progress()

    def densify_step(self, req: P.DensifyStep) -> P.DensifyProgress:
        step_for(self._densify(), req.seconds)
        return self._densify_progress()

    def densify_finish(self, req: P.DensifyFinish) -> P.PointSet:
        from .ply import save_ply

        job = self._densify()
        if job.result is None:
            raise RuntimeError(f"densify is not finished ({job.done}/{job.total} steps)")
        self.densify = None
        cloud = job.result
        if len(cloud) == 0:
            raise ValueError("densify found no consistent points (views too far apart, too little texture, "
                             "or a wrong depth range)")
        save_ply(req.out, cloud.points, cloud.colors)
        return P.PointSet(cloud.points, cloud.colors)

    def densify_cancel(self, req: P.DensifyCancel) -> P.Done:
        self.densify = None
        return P.Done()

    def _densify(self) -> Any:
        if self.densify is None:
            raise RuntimeError("no densify running (DensifyBegin first)")
        return self.densify

    def _densify_progress(self) -> P.DensifyProgress:
        job = self._densify()
        return P.DensifyProgress(job.stage, job.done, job.total, job.result is not None)

    def fit_begin(self, req: P.FitBegin) -> P.FitProgress:
        from .scene_fit import BundleFit, check_steps

        self._drop_fit()
        check_steps(req.steps)  # before the dataset is read
        if not os.path.isfile(req.bundle):
            raise FileNotFoundError(f"bundle to fit not found: {req.bundle}")
        # the bundle holds the points; the dataset gives photos and cameras (it may have no cloud of its own)
        data = load_dataset(req.dataset, req.format, req.undistort, req.allow_external_paths, require_points=False)
        self.fit = BundleFit(req.bundle, data, req.steps, req.weights, req.domain, pick_device(req.device),
                             req.aligned, req.check_view, check_recipes=req.check_recipes,
                             check_combine=req.check_combine)
        return self._fit_progress()

    def fit_step(self, req: P.FitStep) -> P.FitProgress:
        step_for(self._fit_job(), req.seconds)
        return self._fit_progress()

    def fit_finish(self, req: P.FitFinish) -> P.FitResultInfo:
        job = self._fit_job()
        if job.result is None:
            raise RuntimeError(f"the fit is not finished ({job.done}/{job.total} steps)")
        job.save(req.out)
        self.fit = None
        losses = job.result.losses
        check = job.check()
        raw = job.result.check
        return P.FitResultInfo(req.out, job.result.steps, float(losses[0]), float(losses[-1]), job.result.seconds,
                               "fitted" if check is None else check["kept"], job.outcome(),
                               raw is not None and raw.render_not_finite,
                               job.result.steps_in_all,
                               raw.combine if raw is not None else "",
                               raw.choosing_keeps if raw is not None else "")

    def fit_cancel(self, req: P.FitCancel) -> P.Done:
        self._drop_fit()
        return P.Done()

    def _drop_fit(self) -> None:
        if self.fit is not None:
            self.fit.close()
        self.fit = None

    def _fit_job(self) -> Any:
        if self.fit is None:
            raise RuntimeError("no fit running (FitBegin first)")
        return self.fit

    def _fit_progress(self) -> P.FitProgress:
        job = self._fit_job()
        return P.FitProgress(job.done, job.total, job.result is not None, job.doing)

    def render(self, req: P.RenderFrame) -> P.Frame:
        """(H, W, FRAME_CHANNELS) float32 frame, rows top-down (see the protocol)."""
        import torch

        from .scene import fill_coverage, render_point_layers

        camera = req.camera.to_camera()
        h, w = camera.image_size
        size = 1 if req.neural else max(1, int(req.point_size))  # the network needs single points
        if req.source == "bundle" or req.neural:
            if self.selection_error:
                raise ValueError(self.selection_error)
        if req.source == "bundle":
            if self.renderer is None:
                raise RuntimeError("no NeuralScene bundle loaded")
            layers = self.renderer.render_point_layers(camera, size)
        elif req.source == "points":
            if self.points is None:
                raise RuntimeError("no points set")
            layers = render_point_layers(self.points, self.colors, camera, size)
        else:
            raise ValueError(f"unknown source {req.source!r}; expected one of {P.SOURCES}")
        frame = np.zeros((h, w, P.FRAME_CHANNELS), dtype=np.float32)
        frame[..., P.POINTS_RGBA.start : P.POINTS_RGBA.start + 3] = layers.rgb.permute(1, 2, 0).float().cpu().numpy()
        frame[..., P.POINTS_RGBA.stop - 1] = layers.mask.float().cpu().numpy()
        frame[..., P.DEPTH] = layers.depth.float().cpu().numpy()
        if req.neural:
            if self.renderer is None:
                raise RuntimeError("neural output needs a NeuralScene bundle (set one in Render Properties > NPBG++)")
            context = req.roll_context
            if context == "auto":
                context = "bounded" if self.renderer.device.type == "cpu" else "exact"
            refiner, note, compiling = self._refiner_impl(req, camera.to(self.device), context)
            with torch.inference_mode():
                img = self.renderer.render(camera.to(self.device), max_pixels=req.max_pixels, roll_context=context)
            frame[..., P.NEURAL] = img.detach().float().clamp(0, 1)[:3].permute(1, 2, 0).cpu().numpy()
            alpha, depth = fill_coverage(layers.mask, layers.depth)
            frame[..., P.NEURAL_ALPHA] = alpha.cpu().numpy()
            frame[..., P.NEURAL_DEPTH] = depth.cpu().numpy()
            return P.Frame(frame, refiner, note, compiling)
        return P.Frame(frame)

    def _refiner_impl(self, req: P.RenderFrame, camera: Any, roll_context: str) -> tuple[str, str, bool]:
        """Set the loaded network's refiner to the implementation ``req`` asks for where it
        can run, else torch; returns (the implementation set, a note for the user, whether
        the asked-for kernels are still compiling)."""
        wanted = req.refiner_impl
        if wanted not in P.REFINER_IMPLS:
            raise ValueError(f"refiner_impl must be one of {P.REFINER_IMPLS}, got {wanted!r}")
        refiner = self.renderer.model.refiner
        impl, note, compiling = wanted, "", False
        if wanted != "torch":
            from .models import refiner_triton

            device = self.renderer.device
            if not refiner_triton.supported(device):
                impl = "torch"
                note = ("fused kernels need Triton (not installed)" if refiner_triton.triton_version() is None
                        else f"fused kernels run on CUDA only, not {device.type}")
            elif fused_kernels_compile(device):
                warmup = self.warmups.get(wanted)
                if warmup is None:
                    warmup = self.warmups[wanted] = KernelWarmup(self.renderer, wanted, camera, roll_context)
                if req.wait_for_kernels:
                    warmup.thread.join()
                if not warmup.ready:
                    impl = "torch"
                    compiling = not warmup.error
                    note = P.COMPILING_KERNELS_NOTE if compiling else f"fused kernels failed: {warmup.error}"
        refiner.impl = impl
        return impl, note, compiling
