"""``python -m headless_train export --checkpoint C --scene DIR --out scene.npbgpp``: turn a
trained NPBG++ checkpoint + a scene (aggregated from its views), or a fitted NPBG /
coefficients_ft checkpoint + its scene, into a NeuralScene bundle the Blender add-on opens."""

from __future__ import annotations

import argparse
import logging
import os

import torch

from . import oom

log = logging.getLogger("headless_train.export")


class ExportError(RuntimeError):
    """Inputs that cannot be exported; the message says which and why."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by headless_train, or an NPBG++ "
                   "weights file (.safetensors, e.g. the bundled npbgpp_core/weights/npbgpp_sphere.safetensors)")
    p.add_argument("--scene", required=True, help="scene folder (any format load_scene reads)")
    p.add_argument("--out", required=True, help="output NeuralScene file, ending in .npbgpp (e.g. scene.npbgpp)")
    p.add_argument("--format", default=None, help="scene format (default: detected)")
    p.add_argument("--scene-name", default=None, help="NPBG/coefficients_ft: scene name in the checkpoint "
                   "(default: the folder name)")
    p.add_argument("--pc-name", default=None, metavar="FILE.ply",
                   help="the scene's point cloud file, relative to --scene (e.g. a densified dense.ply); default: "
                   "NPBG / coefficients_ft: the cloud the run was fitted to, NPBG++: the format's default cloud")
    p.add_argument("--max-points", type=float, default=None, help="NPBG++: subsample the cloud (seed 123)")
    p.add_argument("--views", choices=("non-held-out", "all", "train"), default="non-held-out",
                   help="NPBG++: which views are aggregated (default non-held-out: every view but the "
                   "scene's held-out test views; train: the train split only; all: every view)")
    p.add_argument("--max-side", type=int, default=None, help="NPBG++: read the input views at most this long side "
                   "in pixels (larger ones shrunk, cameras scaled alike; at least 16; 0 or unset: their own size), as "
                   "the add-on's Aggregate Photo Size; recorded in the bundle as aggregate_max_side (a nerfstudio "
                   "scene reads its smallest images_N/ copy still this large)")
    p.add_argument("--undistort", action="store_true",
                   help="COLMAP models and nerfstudio transforms.json with lens distortion: remap the photos to "
                   "pinhole images on load")
    p.add_argument("--allow-external-paths", action="store_true",
                   help="NeRF-Synthetic / COLMAP / nerfstudio: read image paths that leave the scene folder")
    p.add_argument("--world-up", default=None, metavar="auto|AXIS|X,Y,Z",
                   help="weights file (.safetensors): the scene's up axis the network aggregates with: 'auto' "
                   "(default: the mean image-up of the aggregated views' cameras, snapped to an axis within "
                   "5 degrees, as the add-on's Aggregate with Up Axis: Auto), an axis name (+z, -y, ...) or 3 "
                   "numbers; write --world-up=-y for a value starting with '-'. A headless_train checkpoint keeps its "
                   "run's world_up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, ... (default: cuda when available, else cpu)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def _colors(scene) -> torch.Tensor | None:
    return None if scene.colors is None else torch.from_numpy(scene.colors).float()


def world_up_spec(text: str | None) -> str | tuple[float, ...] | None:
    """``--world-up`` ('auto', an axis name or 3 numbers x,y,z) as :func:`parse_world_up`
    reads it, checked before any work; ExportError naming the option."""
    from npbgpp_core.models.alignment import UP_AXES, parse_world_up

    if text is None:
        return None
    try:
        return parse_world_up(text.split(",") if "," in text else text)
    except ValueError:
        raise ExportError(f"--world-up must be 'auto', one of {', '.join(sorted(UP_AXES))} or 3 numbers x,y,z "
                          f"(not all zero), got {text!r}") from None


def max_side_value(value: int | None) -> int | None:
    """``--max-side`` as the long side the aggregation reads photos at (None: their own size, also
    for 0), checked as the add-on's Photo Size is (``protocol.check_aggregate_max_side``: at least
    AGGREGATE_MIN_SIDE pixels); ExportError naming the option."""
    from npbgpp_core.protocol import check_aggregate_max_side

    try:
        return check_aggregate_max_side(value, "--max-side")
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def aggregated_views(scene, which: str) -> list[int]:
    """Indices of the views ``--views`` names."""
    if which == "all":
        return list(range(len(scene.views)))
    if which == "train":
        return list(scene.train)
    held = set(scene.test) if scene.test else set()
    return [i for i in range(len(scene.views)) if i not in held]


def scene_world_up(scene, which: str, spec: str | tuple[float, ...]) -> list[float]:
    """The up axis a weights file's network aggregates ``scene`` with: ``spec`` resolved on
    the cameras of the views aggregated (as the add-on's Aggregate and ``system.world_up``)."""
    from npbgpp_core.models.alignment import resolve_world_up

    up = [float(v) for v in resolve_world_up(spec, [scene.views[i].camera for i in aggregated_views(scene, which)])]
    log.info("world_up %s: %s", spec if isinstance(spec, str) else "given", up)
    return up


def seen_points_note(points: int, seen: int, in_no_view: int) -> str:
    """What export logs of the points its views see: NPBG++ takes descriptors only for the
    nearest point at some pixel of a view's z-buffer (the others do not render); the rest are
    split, as the add-on's Aggregate does, into points on no pixel of any view
    (``NPBGPlusPlus.points_in_view``) and points that lost every pixel they fell on to a nearer
    one (a cloud denser than the views' pixels, or points behind a surface)."""
    text = f"{seen} of {points} points seen (the nearest point at some pixel of a view: they get descriptors)"
    if seen >= points:
        return text
    lost = points - seen - in_no_view
    return (f"{text}; the other {points - seen} get none and do not render: {in_no_view} lie in no view, {lost} "
            "fall only on pixels where a nearer point wins")


def aggregation_advice(scene, views: list[int], max_side: int | None) -> str:
    """What needs less memory when aggregating ``views`` of ``scene``: the views read smaller
    (``--max-side`` below their long side now, when that is above the least it takes,
    AGGREGATE_MIN_SIDE) or fewer points (``--max-points``)."""
    from npbgpp_core.protocol import photo_size_bound

    read = photo_size_bound(max(max(scene.views[i].camera.image_size) for i in views), max_side)
    points = f"aggregate fewer points with --max-points (the cloud has {scene.points.shape[0]:,})"
    if read is None:  # read at AGGREGATE_MIN_SIDE or less, which --max-side refuses: only fewer points help
        return points
    return f"read the views smaller with --max-side (below {read}, the long side they are read at now) or {points}"


def export_npbgpp(ckpt: dict, scene, args, name: str):
    from npbgpp_core.image_size import fit_long_side
    from npbgpp_core.pretrained import WeightsError, build_network, bundled_domain, trainer_checkpoint_weights
    from npbgpp_core.scene import NeuralScene

    max_side = max_side_value(args.max_side)
    views = aggregated_views(scene, args.views)
    if not views:
        raise ExportError(f"scene {scene.root} has no views to aggregate")
    try:
        kind, config, state = trainer_checkpoint_weights(ckpt, args.checkpoint)
        model = build_network(kind, config, state, args.checkpoint)
    except WeightsError as exc:
        raise ExportError(str(exc)) from None
    advice = aggregation_advice(scene, views, max_side)
    oom.step(f"starting the aggregation of {scene.points.shape[0]:,} points", advice)
    model.to(args.device).eval()
    points = torch.from_numpy(scene.points).float().to(args.device)
    with torch.no_grad():
        state_agg = model.begin_scene(points)
        # points on a pixel of some view's z-buffer, winning it or not (the add-on's Aggregate counts them alike)
        in_a_view = torch.zeros(len(points), dtype=torch.bool, device=args.device)
        for k, i in enumerate(views):
            h, w = fit_long_side(tuple(scene.views[i].camera.image_size), max_side)  # view_at_long_side's size
            oom.step(f"aggregating view {k + 1} of {len(views)} ({scene.views[i].name}) at {w}x{h} px", advice)
            image, camera = scene.view_at_long_side(i, max_side)  # as the add-on's Aggregate at its Photo Size
            camera = camera.to(args.device)
            state_agg.add_views(image.unsqueeze(0).to(args.device), [camera])
            in_a_view |= model.points_in_view(state_agg.points, camera)
        oom.step(f"finishing the aggregation of {len(points):,} points", advice)
        agg = state_agg.finish()
    n_valid = int(agg.valid.sum())
    log.info("aggregated %d views; %s", len(views), seen_points_note(len(agg), n_valid, int((~in_a_view).sum())))
    if n_valid == 0:
        raise ExportError(f"no point of {scene.root} is visible in any of its {len(views)} views")
    # the keys Aggregate writes (npbgpp_core.service): Fit to Photos checks its dataset by "dataset"
    # and picks the weights of "domain"
    # "aggregate_max_side": the long side the photos were read at most (None: their own size), at which a
    # fit's fair check aggregates them again (scene_fit.BundleFit)
    meta = {"dataset": scene.root, "views": len(views), "weights": os.path.basename(args.checkpoint),
            "source_checkpoint": os.path.abspath(args.checkpoint), "aggregate_max_side": max_side}
    domain = bundled_domain(args.checkpoint)
    if domain:
        meta["domain"] = domain
    return NeuralScene.from_aggregated(model, agg.to("cpu"), _colors(scene), name=name, metadata=meta)


def export_npbg(ckpt: dict, scene, args, name: str):
    from npbgpp_core.models import NPBG, NPBGConfig
    from npbgpp_core.scene import NeuralScene

    from .systems.base import dropped_splats_note, module_key, points_digest, recorded_digest

    meta = ckpt["npbgpp"]
    system = meta["system"]
    scenes = list(meta.get("scenes", []))
    if not scenes:
        raise ExportError(f"{args.checkpoint} ({system}) holds no fitted scene (a refiner weights file or a run "
                          "without scenes): an NPBG bundle needs the descriptors of a run fitted on the scene "
                          "(system=npbg or coefficients_ft with this scene), or export with an NPBG++ network")
    if name not in scenes:
        raise ExportError(f"{args.checkpoint} ({system}) holds scenes {scenes}, not '{name}' (use --scene-name)")
    points = meta.get("points", [])
    if len(points) != len(scenes):
        raise ExportError(f"{args.checkpoint} ({system}) stores no point count per scene")
    n = int(points[scenes.index(name)])
    if scene.points.shape[0] > n:
        scene = scene.subsample_points(n, seed=123)  # the same subset the trainer used
    if scene.points.shape[0] != n:
        why = dropped_splats_note(scene, n, "--pc-name")
        raise ExportError(f"scene {scene.root} has {scene.points.shape[0]} points but the checkpoint's '{name}' "
                          f"has {n} descriptors" + (f": {why}" if why else ""))
    digest = recorded_digest(meta, name)
    if digest is not None and digest != points_digest(scene.points):  # same count, other points
        raise ExportError(f"{args.checkpoint} ({system}) fitted scene '{name}' to other points than "
                          f"{scene.metadata.get('point_cloud') or 'the scene'} holds (its descriptors would sit on the "
                          "wrong points): export with --pc-name naming the cloud that run was fitted to, unchanged")
    cfg = meta.get("config", {})
    if system == "coefficients_ft":
        from .systems.coefficients_ft import coefficients_config

        ncfg = coefficients_config(cfg)
    else:
        ncfg = NPBGConfig.from_options(cfg)
    model = NPBG(n, ncfg)
    prefix = f"scene_models.{module_key(name)}."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{args.checkpoint}: scene '{name}' weights do not fit: {exc}") from exc
    return NeuralScene.from_npbg(model, torch.from_numpy(scene.points).float(), _colors(scene), name=name,
                                 metadata={"source_checkpoint": os.path.abspath(args.checkpoint),
                                           "dataset": scene.root})


def fitted_point_cloud(ckpt: dict, system: str, name: str) -> str | None:
    """The .ply (relative to the scene folder) that an NPBG / coefficients_ft run fitted
    scene ``name``'s descriptors to, as its checkpoint records it; None when not recorded
    (NPBG++, older checkpoints, a COLMAP model's own points)."""
    if system not in ("npbg", "coefficients_ft"):
        return None
    meta = ckpt.get("npbgpp", {})
    scenes, clouds = list(meta.get("scenes", [])), list(meta.get("point_clouds", []))
    if name in scenes and len(clouds) == len(scenes):
        return clouds[scenes.index(name)]
    return None


def export(args: argparse.Namespace) -> str:
    from npbgpp_core.atomic import check_output_file, check_output_suffix
    from npbgpp_core.datasets import load_scene

    from .checkpoints import META_KEY, checkpoint_system, load_source_checkpoint

    try:
        check_output_file(args.out, "scene.npbgpp")  # before the aggregation (minutes on a CPU), not at the end
    except OSError as exc:
        raise ExportError(f"--out {exc}") from None
    from npbgpp_core.atomic import same_file

    if os.path.exists(args.checkpoint) and same_file(args.out, args.checkpoint):
        raise ExportError(f"--out {args.out} is the --checkpoint it reads; write the bundle to another file, "
                          "e.g. scene.npbgpp")
    up_spec = world_up_spec(args.world_up)
    max_side_value(args.max_side)  # before the checkpoint and the scene are read
    weights_file = args.checkpoint.lower().endswith(".safetensors")
    if up_spec is not None and not weights_file:
        # the run resolved and stored its up (system.world_up); its descriptors and
        # background were trained in that frame, so another one here would be silently wrong
        raise ExportError(f"--world-up applies to weights files (.safetensors); {args.checkpoint} keeps the "
                          "system.world_up its run stored")
    oom.step(f"reading the checkpoint {args.checkpoint}", "")
    ckpt = load_source_checkpoint(args.checkpoint)
    system, _ = checkpoint_system(ckpt, args.checkpoint)
    options: dict = {"allow_external_paths": True} if args.allow_external_paths else {}
    if args.undistort:
        options["undistort"] = True
    name = args.scene_name or os.path.basename(os.path.normpath(args.scene))
    pc_name = args.pc_name or fitted_point_cloud(ckpt, system, name)
    if pc_name and not args.pc_name and os.path.isdir(args.scene) and not os.path.isfile(
            os.path.join(args.scene, pc_name)):  # the loader's message would name a pc_name= nobody gave
        raise ExportError(f"{args.checkpoint} was fitted to the point cloud {pc_name} (its run's datasets.pc_name), "
                          f"which is not in {args.scene}: name where that cloud is now with --pc-name")
    if pc_name:
        options["pc_name"] = pc_name
    if args.max_side and system == "npbgpp" and os.path.isdir(args.scene):
        from npbgpp_core.datasets import detect_format, format_options

        if "min_side" in format_options(args.format or detect_format(args.scene)):
            # nerfstudio's smaller copies (images_2/ ...) still at least --max-side: less to decode and resize
            options["min_side"] = int(args.max_side)
    # the cloud is read whole (--max-points subsamples it after): only a smaller file reads in less, which
    # only NPBG++ can take (NPBG's descriptors belong to the cloud they were fitted to)
    oom.step(f"reading the scene {args.scene}",
             "give a smaller point cloud with --pc-name" if system == "npbgpp" else "")
    scene = load_scene(args.scene, format=args.format, **options)
    oom.step(f"preparing the export of {scene.points.shape[0]:,} points", "")  # not the reading's advice
    from npbgpp_core.datasets.scene_data import scene_input_at

    replaced = scene_input_at(scene, args.out, (".npbgpp",))  # a re-run replaces its bundle, never a cloud
    if replaced is not None:  # it wrote the bundle over the scene's cloud or camera file
        raise ExportError(f"--out {args.out} is an input of the scene ({replaced}); write the bundle to another "
                          "file, e.g. scene.npbgpp")
    try:  # after the input checks, which name a scene file given as --out better; before the aggregation
        check_output_suffix(args.out, ".npbgpp")
    except ValueError as exc:
        raise ExportError(f"--out {exc}") from None
    if scene.points.shape[0] == 0:
        raise ExportError(f"scene {args.scene} has no points")
    from npbgpp_core.datasets.cloud_fit import scene_cloud_note

    misfit = scene_cloud_note(scene)
    if misfit:
        log.warning("scene %s: %s", name, misfit)
    if system == "npbgpp":  # NPBG descriptors belong to the cloud they were fitted to: no other to suggest
        from npbgpp_core.datasets.other_clouds import other_clouds, other_clouds_note

        note = other_clouds_note(other_clouds(scene.root, scene.metadata.get("point_cloud")), "--pc-name")
        if note:
            log.info("scene %s: %s", name, note)
        if args.max_points is not None and scene.points.shape[0] > int(args.max_points):
            log.warning("subsampling %d points to %d (seed 123)", scene.points.shape[0], int(args.max_points))
            scene = scene.subsample_points(int(args.max_points), seed=123)
        if weights_file:  # the file was read above; only its up axis becomes the scene's
            ckpt[META_KEY]["config"]["world_up"] = list(scene_world_up(scene, args.views, up_spec or "auto"))
        bundle = export_npbgpp(ckpt, scene, args, name)
    elif system in ("npbg", "coefficients_ft"):
        oom.step(f"building the bundle of {scene.points.shape[0]:,} points", "")
        bundle = export_npbg(ckpt, scene, args, name)
    else:
        raise ExportError(f"{args.checkpoint}: cannot export system '{system}'")
    oom.step(f"writing {args.out} ({len(bundle.points):,} points)", "")
    bundle.save(args.out)  # atomic: a failed write leaves no part of the file
    log.info("wrote %s (%s)", args.out, bundle)
    return args.out


def main(argv: list[str]) -> int:
    """Run the export; 0 on success, 2 with a message on bad input or when memory runs out
    (what ran out, during which step, what to do: :mod:`headless_train.oom`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    oom.reset()
    from .checkpoints import CheckpointError

    try:
        from npbgpp_core.datasets import DatasetError
    except ImportError:  # pragma: no cover
        DatasetError = ValueError  # noqa: N806

    def body() -> int:
        print(export(args))
        return 0

    return oom.run_command(body, (ExportError, CheckpointError, DatasetError, FileNotFoundError, ValueError, TypeError),
                           args.debug, args.device)
