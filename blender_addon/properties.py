"""Scene settings: ``scene.npbgpp``."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from npbgpp_core.protocol import (
    AGGREGATE_MAX_SIDE,
    AGGREGATE_MIN_SIDE,
    AGGREGATE_RENDER_MAX_SIDE,
    AUTO_AVERAGE_HIGH_SIDE,
    AUTO_AVERAGE_LOW_SIDE,
    FIT_CHECK_COMBINE,
    WHOLE_VIEW_STEPS,
)

# Blender 5.0 refuses "//" in a file path setting unless it says it resolves it (else each
# set warns); these settings are stored relative by blend_paths and read with
# blend_paths.resolved (relative to the .blend holding the scene: a linked one's library).
RELATIVE_OK = {"PATH_SUPPORTS_BLEND_RELATIVE"} if bpy.app.version >= (5, 0, 0) else set()


# What was measured for Also Try Whole Views' Auto (averaging both fits by the photos' size), in one
# place so that new figures replace these alone (BENCHMARKS.md names the runs).
AUTO_AVERAGE_FIGURES = (
    "averaging both fits beat the plain check at 384 px (4 runs: +0.10 to +0.21 dB mean on held-out views), "
    "512 px (4 runs: +0.09 to +0.27) and 768 px (2 runs, 6 / all photos on 9 captures: +0.33 / +0.46), no capture "
    "more than 0.3 dB below it, but not at 256 px (desk 0.38-0.49 dB below in all 4 runs); it takes 1.6-1.7x the "
    "fitting time at 384 px, 2.0-2.2x at 512 px, 4.1-4.4x at 768 px (BENCHMARKS.md, The choosing and averaging "
    "checks at 384 and 768 px)"
)


def _is_point_object(_self: bpy.types.PropertyGroup, obj: bpy.types.Object) -> bool:
    return obj.type in {"MESH", "POINTCLOUD"}


def _snap_tile_size(self: bpy.types.PropertyGroup, _context: bpy.types.Context) -> None:
    """Tile Size 1 .. MIN_TILE_SIZE - 1 cannot render (a tile is smaller than its margins):
    it becomes the smallest that can, so no value the field takes fails a render. (One
    range cannot say "0, or at least 272".)"""
    from .render_job import MIN_TILE_SIZE

    if 0 < self.tile_size < MIN_TILE_SIZE:
        self.tile_size = MIN_TILE_SIZE


class NPBGPPSceneSettings(bpy.types.PropertyGroup):
    """What NPBG++ renders and how."""

    output: EnumProperty(  # type: ignore[valid-type]
        name="Output",
        description="What the Combined pass and the viewport show",
        items=[
            ("NEURAL", "Neural", "The NPBG++ network's image (needs a bundle)"),
            ("POINTS", "Points", "Raw nearest-point colours, no network"),
            ("DEPTH", "Depth", "View depth of the nearest point as grey"),
        ],
        default="NEURAL",
    )
    bundle: StringProperty(  # type: ignore[valid-type]
        name="Bundle", description="NeuralScene bundle file (points, descriptors, network weights)",
        subtype="FILE_PATH", default="", options=RELATIVE_OK,
    )
    network: EnumProperty(  # type: ignore[valid-type]
        name="Network",
        description="Which bundled NPBG++ network Aggregate Descriptors uses (when Weights is empty)",
        items=[
            ("AUTO", "Auto", "Objects on a plain background when the dataset's views are RGBA images with transparent "
             "pixels, otherwise Scenes and Captures"),
            ("SCENE", "Scenes and Captures", "The general network: photo captures, rooms, scenes with a background"),
            ("OBJECT", "Objects on a Plain Background", "The network trained on cut-out objects rendered on a plain "
             "colour (e.g. Export Dataset with Film > Transparent)"),
        ],
        default="AUTO",
    )
    weights: StringProperty(  # type: ignore[valid-type]
        name="Weights", description="NPBG++ network weights (a checkpoint) used to aggregate descriptors instead of "
        "the bundled network; empty: the bundled network chosen by Network",
        subtype="FILE_PATH", default="", options=RELATIVE_OK,
    )
    up_axis: EnumProperty(  # type: ignore[valid-type]
        name="Up Axis",
        description="World axis that NPBG++ turns upright in every view (in-plane alignment) when aggregating; "
        "the bundle keeps it for rendering",
        items=[
            ("AUTO", "Auto", "The input cameras' mean up direction, snapped to an axis within 5 degrees"),
            ("POS_Z", "+Z", "Blender's up (scenes rendered by Blender, NeRF-Synthetic)"),
            ("POS_Y", "+Y", "The published NPBG++ rule"),
            ("NEG_Y", "-Y", "OpenCV-style reconstructions (COLMAP) whose photos were upright"),
            ("POS_X", "+X", "The world's +X axis"), ("NEG_X", "-X", "The world's -X axis"),
            ("NEG_Z", "-Z", "The world's -Z axis"),
        ],
        default="AUTO",
    )
    device: EnumProperty(  # type: ignore[valid-type]
        name="Device",
        description="Where the network runs; the point rasterizer follows it",
        items=[
            ("AUTO", "Auto", "CUDA, then Metal, then CPU"),
            ("CUDA", "CUDA", "An NVIDIA GPU"), ("MPS", "Metal", "An Apple GPU"), ("CPU", "CPU", "The processor"),
        ],
        default="AUTO",
    )
    precision: EnumProperty(  # type: ignore[valid-type]
        name="Precision",
        description="Number format of the network on the GPU (FP16/BF16: faster, less memory, tiny differences)",
        items=[("FP32", "FP32", "Full precision"), ("FP16", "FP16", "Half precision"), ("BF16", "BF16", "bfloat16")],
        default="FP32",
    )
    viewport_roll_context: EnumProperty(  # type: ignore[valid-type]
        name="Viewport Rolled Views",
        description="How the viewport renders views rolled against the up axis (F12 renders are always Exact)",
        items=[
            ("AUTO", "Auto", "Bounded on the CPU, Exact on a GPU"),
            ("BOUNDED", "Bounded", "The network sees the view plus a margin: nearer the cost of an upright view on "
             "the CPU, nearly the same image (differences near the border)"),
            ("EXACT", "Exact", "The published network's whole reach on the upright canvas (slower when rolled)"),
        ],
        default="AUTO",
    )
    refiner_impl: EnumProperty(  # type: ignore[valid-type]
        name="Refiner Kernels",
        description="How the network's refiner runs. The fused kernels apply on a CUDA GPU with Triton installed "
        "(elsewhere Torch runs; the viewport's status line says which ran) and compile once, into Triton's cache, "
        "while the viewport keeps showing Torch frames; not timed on a GPU yet (the repository's BENCHMARKS.md)",
        items=[
            ("TORCH", "Torch", "PyTorch's own operations (the reference)"),
            ("TRITON", "Fused (Triton)", "cuDNN convolutions, everything between them in fused Triton kernels"),
            ("TRITON_CONV", "Fused GEMM (Triton)", "Each gated block one Triton kernel, convolutions included"),
        ],
        default="TORCH",
    )
    preview_scale: FloatProperty(  # type: ignore[valid-type]
        name="Preview Scale", description="Viewport resolution scale once the view stops moving",
        default=1.0, min=0.1, max=1.0, subtype="FACTOR",
    )
    point_object: PointerProperty(  # type: ignore[valid-type]
        name="Point Object", description="Mesh or point cloud holding the points (its transform is applied)",
        type=bpy.types.Object, poll=_is_point_object,
    )
    fit_upright: BoolProperty(  # type: ignore[valid-type]
        name="Fit Upright", default=True,  # npbgpp_core.fitting.FIT_ALIGNED (that module imports torch)
        description="Fit to Photos fits the scene to render views rolled against the up axis upright, as the "
        "NPBG++ network sees them (the fitted bundle keeps the choice); off: in the view's own frame, as the "
        "published NPBG fits. Upright scored 0.2 to 0.5 dB better on real captures (BENCHMARKS.md, Upright "
        "fitted scenes)",
    )
    fit_check_view: BoolProperty(  # type: ignore[valid-type]
        name="Check Fit on a Photo", default=True,  # npbgpp_core.fitting.FIT_CHECK_VIEW (that module imports torch)
        description="Fit to Photos keeps the middle training photo apart (3 photos or more), fits on the others, "
        "and keeps the unfitted scene when the fit scores more than 0.5 dB lower on that photo (the photo also "
        "built the unfitted scene, which starts ahead there), so a fit cannot make the scene clearly worse "
        "there; the report says which was kept. With 6 photos at 256 px the unchecked fit lost to no fit on 2 to "
        "3 of 9 captures, the checked one on none; one photo does not judge every view: at 512 px it kept a fit that "
        "lost on the held-out view (BENCHMARKS.md, A fit that cannot make a scene worse; The check at the photos' "
        "own size)",
    )
    fit_check_whole_views: EnumProperty(  # type: ignore[valid-type]
        # a BoolProperty before Auto: the item numbers make a .blend's stored False / True read back as
        # Off / On, one that never set it as the default Auto (measured in bpy 5.0.1; tests/test_addon_render.py)
        name="Also Try Whole Views", default="AUTO",
        items=(
            ("OFF", "Off", "Fit the usual crops only, checked on the kept photo as usual (the plain check)", 0),
            ("ON", "On", f"Fit twice on the photos less the kept one, the usual crops and {WHOLE_VIEW_STEPS} steps of "
             "whole photos, and keep what Keep says: the fit scoring better on the kept photo, or their average. "
             "Keeping the better, measured at 512 px with 6 photos on 9 captures: +0.2 to +0.5 dB mean on held-out "
             "views, one capture 1.5 to 3.5 dB, for about 2.3x the fitting time (1.3x at 256 px); with all photos "
             "or at 256 px it lost up to 0.84 dB on some captures (BENCHMARKS.md, A checked fit that chooses its "
             "recipe on the kept photo)", 1),
            ("AUTO", "Auto", "By the photos' size: both fits (crops and whole photos) averaged when the photos' long "
             f"side (the largest training photo's) is {AUTO_AVERAGE_LOW_SIDE} to {AUTO_AVERAGE_HIGH_SIDE} px, the "
             "usual crops alone otherwise (Keep is not used); the report says when it averaged. Measured: "
             f"{AUTO_AVERAGE_FIGURES}", 2),
        ),
        description="Only with Check Fit on a Photo: whether Fit to Photos also fits whole photos besides the usual "
        "crops and keeps the better or the average of both fits, checked as usual; the report names what it kept "
        "(protocol.CHECK_RECIPES; Auto: protocol.auto_check_recipes)",
    )
    fit_check_combine: EnumProperty(  # type: ignore[valid-type]
        # identifiers: protocol.CHECK_COMBINES upper-cased (the operator sends them lower-cased); the default
        # the core's (FIT_CHECK_COMBINE: choosing)
        name="Keep", default=FIT_CHECK_COMBINE.upper(),
        items=(
            ("CHOOSE", "Better on Kept Photo", "Keep the fit scoring better on the kept photo (one photo judges "
             "between two fits often a few tenths of a dB apart)"),
            ("AVERAGE", "Average of Both", "Keep the average of both fits (each number of the scene the mean of "
             "the two), scored on the kept photo and checked as usual: no single photo picks between them "
             "(opt-in: on 9 captures with 6 / all photos, +0.26 / +0.27 dB (seed 0) and +0.09 / +0.16 (seed 1) mean "
             "over the plain check at 512 px, no capture 0.3 dB below it; Better on Kept Photo +0.47 / +0.36 and "
             "+0.21 / +0.14, up to 0.84 dB below on a capture; at 256 px -0.02 / -0.12 (seed 0), +0.04 / +0.11 "
             "(seed 1), desk 0.38-0.49 dB below; BENCHMARKS.md, "
             "Averaged fits of a choosing check's states)"),
        ),
        description="Only with Also Try Whole Views On and Check Fit on a Photo: what Fit to Photos keeps of its "
        "two fits (Auto averages them)",
    )
    dataset_path: StringProperty(  # type: ignore[valid-type]
        name="Dataset", description="Dataset folder the input cameras came from (Aggregate reads its images)",
        subtype="DIR_PATH", default="", options=RELATIVE_OK,
    )
    dataset_points: StringProperty(  # type: ignore[valid-type]
        name="Dataset Points", subtype="FILE_PATH", default="", options=RELATIVE_OK,
        description="PLY file (in the dataset's frame, e.g. python -m npbgpp_core.densify's output) whose points "
        "Aggregate uses instead of the dataset's own cloud; set by Densify Points and by Import Dataset "
        "Folder's Point Cloud (cleared without one); empty: the dataset's cloud (Dataset Cloud when set)",
    )
    dataset_cloud: StringProperty(  # type: ignore[valid-type]
        name="Dataset Cloud", subtype="FILE_PATH", default="", options=RELATIVE_OK,
        description="The .ply Import Dataset Folder's Point Cloud named, which the dataset's loader reads as its "
        "cloud (empty: the format's own); Aggregate reads it when Dataset Points is empty. Densify Points reads "
        "it too (its depth range) and refuses to write over it; unlike Dataset Points, Densify does not replace it. "
        "Read-only in the panel: importing the dataset again changes it",
    )
    densify_output: StringProperty(  # type: ignore[valid-type]
        name="Densify Output", subtype="FILE_PATH", default="", options=RELATIVE_OK,
        description="The .ply Densify Points last wrote for the imported dataset (set by Densify Points, cleared "
        "by Import Dataset Folder): a re-run may write over it. Densify refuses to write over Dataset Points when "
        "it names another file (e.g. the Point Cloud the dataset was imported with, in a .blend saved before "
        "Dataset Cloud existed)",
    )
    dataset_no_cloud: StringProperty(  # type: ignore[valid-type]
        name="Dataset Without Cloud", default="",
        description="Why the imported dataset has no point cloud (its loader's message), set by Import Dataset "
        "Folder; empty: it has one. Aggregate and renders then point at Densify Points",
    )
    dataset_format: StringProperty(  # type: ignore[valid-type]
        name="Dataset Format", default="", description="Format of the imported dataset (empty: detected)",
    )
    photo_size_mode: EnumProperty(  # type: ignore[valid-type]
        # numbered: a .blend stores the number; one saved before this setting stores none and reads
        # the default, Follow Render, which was Aggregate's rule then (operators.scene_photo_size)
        name="Photo Size", default="FOLLOW_RENDER",
        items=(
            ("FOLLOW_RENDER", "Follow Render", "The long side F12 renders at (Resolution times %), at least "
             f"{AGGREGATE_MAX_SIDE} and at most {AGGREGATE_RENDER_MAX_SIDE} px", 0),
            ("OWN", "Own Size", "Each photo at its own size (slowest, most memory)", 1),
            ("FIXED", "Fixed", "At most the Long Side given below", 2),
        ),
        description="The long side, in pixels, Aggregate Descriptors reads each photo at most (larger ones shrunk "
        "with their cameras, smaller ones as they are; the bundle records it). Aggregate's time and memory grow "
        "with the pixels read: 20 photos of 11 megapixels (4032 px) took 3.6 GiB on a CPU at their own size, 2.9 "
        "GiB and 4x less time at 2048 (BENCHMARKS.md); descriptors from photos read at half the render's size "
        "lost up to 0.52 dB, at three quarters up to 0.23 dB. Out of memory: a Fixed size below the largest "
        "photo's. A script's bpy.ops.npbgpp.aggregate(max_side=...) wins over it for that run",
    )
    photo_size: IntProperty(  # type: ignore[valid-type]
        name="Long Side", default=AGGREGATE_MAX_SIDE, min=AGGREGATE_MIN_SIDE, soft_max=8192, subtype="PIXEL",
        description="Photo Size Fixed: Aggregate Descriptors reads each photo at most this long side in pixels "
        f"(at least {AGGREGATE_MIN_SIDE}: smaller photos hold too few pixels to aggregate)",
    )
    point_size: IntProperty(  # type: ignore[valid-type]
        name="Point Size", default=1, min=1, max=15,
        description="Side in pixels of each point's square in Points and Depth output (nearer points win)",
        subtype="PIXEL",
    )
    tile_size: IntProperty(  # type: ignore[valid-type]
        name="Tile Size",
        description="Neural frames with more pixels than Tile Size squared render in overlapping tiles, so "
        "memory stays bounded at any resolution (same image); 0 renders the whole frame at once; otherwise "
        "at least 272 (each tile renders a 128-pixel margin on every side): smaller values become 272",
        default=2048, min=0, soft_max=8192, subtype="PIXEL", update=_snap_tile_size,
    )
    worker_timeout: FloatProperty(  # type: ignore[valid-type]
        name="Worker Timeout",
        description="Seconds to wait for the worker process to answer one request (a frame, a view) before "
        "stopping it as frozen; 0 waits forever",
        default=600.0, min=0.0, soft_max=3600.0, subtype="TIME_ABSOLUTE", unit="TIME_ABSOLUTE",
    )
    dataset_undistort: BoolProperty(  # type: ignore[valid-type]
        name="Undistort Dataset", default=False,
        description="The dataset was imported with lens undistortion (COLMAP, nerfstudio; Aggregate and Densify "
        "read it the same way)",
    )
    dataset_allow_external_paths: BoolProperty(  # type: ignore[valid-type]
        name="Dataset Allows External Paths", default=False,
        description="The dataset was imported with Allow External Paths: its image paths may leave its folder "
        "(Aggregate and Densify read it the same way)",
    )
    worker_mode: EnumProperty(  # type: ignore[valid-type]
        name="Worker",
        description="Where the network runs: a separate process (safe) or inside Blender",
        items=[
            ("PROCESS", "Separate Process", "Run the network in a subprocess: a crash or OOM never takes Blender down"),
            ("IN_PROCESS", "In Blender", "Run the network inside Blender (torch must be importable here)"),
        ],
        default="PROCESS",
    )


CLASSES = (NPBGPPSceneSettings,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.npbgpp = PointerProperty(type=NPBGPPSceneSettings)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "npbgpp"):
        del bpy.types.Scene.npbgpp
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
