"""``python -m headless_train render --bundle B.npbgpp --scene S --out DIR [--views all]
[--between N]``: render a scene bundle (NPBG++, fitted or NPBG) along the cameras of a
dataset without Blender: one PNG per frame, the chosen views in order with ``N`` frames
between each pair (centre and intrinsics linear, rotation along the shortest arc), at the
first view's size.
``DIR`` is built as ``DIR.partial-<pid>`` and renamed when complete; ``frames.json``
lists every frame's camera and the views it lies between."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from . import oom


class RenderError(RuntimeError):
    """An input the render command refuses (one line, exit 2)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train render", description=__doc__)
    p.add_argument("--bundle", required=True, help="a scene bundle (.npbgpp: export, the add-on, fit_bundle)")
    p.add_argument("--scene", required=True, help="the dataset folder whose cameras make the path")
    p.add_argument("--out", required=True, help="output folder (frame_0000.png ..., frames.json)")
    p.add_argument("--views", default="all", help="all (default), train, test, or indices / names like 0,2,5-9")
    p.add_argument("--between", type=int, default=0, help="frames rendered between consecutive views (default 0)")
    p.add_argument("--max-side", type=int, default=None, help="long side of the frames (default: the first view's)")
    p.add_argument("--format", default=None, help="dataset format (default: detected)")
    p.add_argument("--undistort", action="store_true", help="distorted COLMAP / nerfstudio cameras (as export)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def _rotation(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by ``|axis_angle|`` radians about its direction."""
    angle = float(np.linalg.norm(axis_angle))
    if angle < 1e-12:
        return np.eye(3)
    k = axis_angle / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * kx @ kx


def _log_rotation(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector of a rotation matrix (angle in [0, pi])."""
    angle = math.acos(max(-1.0, min(1.0, (float(np.trace(rot)) - 1.0) / 2.0)))
    if angle < 1e-12:
        return np.zeros(3)
    if math.pi - angle < 1e-6:  # half-turn: the axis is the eigenvector of eigenvalue 1
        w, v = np.linalg.eigh((rot + rot.T) / 2.0)
        return v[:, int(np.argmax(w))] * angle
    skew = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    return skew / (2.0 * math.sin(angle)) * angle


def interpolate_pose(ra: np.ndarray, ca: np.ndarray, rb: np.ndarray, cb: np.ndarray,
                     s: float) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera rotation and camera centre at ``s`` in [0, 1] between two poses:
    the centre on the straight line, the rotation on the shortest arc (constant speed)."""
    rot = ra @ _rotation(s * _log_rotation(ra.T @ rb))
    return rot, (1.0 - s) * ca + s * cb


def path_cameras(scene, views: list[int], between: int, max_side: int | None) -> list[dict]:
    """The frames' cameras (K, R, t, size) along ``views``, ``between`` frames between each
    pair, at the first view's size (long side at most ``max_side``). A view of another size
    or aspect (portrait among landscape photos) is scaled by one factor to fit inside the
    frame and centred in it (never stretched: its pixels stay square)."""
    from npbgpp_core.image_size import fit_long_side

    size = fit_long_side(tuple(scene.views[views[0]].camera.image_size), max_side)
    poses = []
    for i in views:
        h, w = scene.views[i].camera.image_size
        scale = min(size[0] / h, size[1] / w)
        fitted = (max(1, round(h * scale)), max(1, round(w * scale)))
        K, R, t = (np.array(m, dtype=np.float64) for m in scene.camera(i, fitted).to_opencv())
        K[0, 2] += (size[1] - fitted[1]) / 2.0  # centred: the same offset on both sides
        K[1, 2] += (size[0] - fitted[0]) / 2.0
        poses.append((i, K, R, -R.T @ t))
    frames = []
    for k in range(len(poses)):
        ia, Ka, Ra, Ca = poses[k]
        ib, Kb, Rb, Cb = poses[min(k + 1, len(poses) - 1)]
        for j in range(between + 1 if k + 1 < len(poses) else 1):  # the last view ends the path
            s = j / (between + 1)
            R, C = interpolate_pose(Ra, Ca, Rb, Cb, s)
            frames.append({"views": [scene.views[ia].name, scene.views[ib].name], "s": s,
                           "K": ((1 - s) * Ka + s * Kb).tolist(), "R": R.tolist(), "t": (-R @ C).tolist(),
                           "size": list(size)})
    return frames


def chosen_views(scene, text: str) -> list[int]:
    from npbgpp_core.densify import _parse_views

    if text == "test":
        views = list(scene.test)
    else:
        try:
            views = _parse_views(text, len(scene.views), list(scene.train), [v.name for v in scene.views])
        except ValueError as exc:
            raise RenderError(str(exc)) from None
    bad = [i for i in views if not 0 <= i < len(scene.views)]
    if bad:
        raise RenderError(f"--views {text!r}: no view {bad[0]} (the scene has {len(scene.views)})")
    if not views:
        raise RenderError(f"--views {text!r}: no view of {scene.root} chosen")
    return views


def render(args: argparse.Namespace) -> str:
    """Write the frames; returns the output folder."""
    import torch
    from PIL import Image

    from npbgpp_core import Camera
    from npbgpp_core.atomic import atomic_directory, holds, same_file
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.images import eight_bit_levels
    from npbgpp_core.scene import NeuralScene

    if args.between < 0:
        raise RenderError(f"--between {args.between}: must be >= 0")
    if args.max_side is not None and args.max_side < 1:
        raise RenderError(f"--max-side {args.max_side}: must be >= 1")
    for source in (args.scene, args.bundle):
        if os.path.exists(source) and (same_file(args.out, source) or holds(args.out, source)):
            raise RenderError(f"--out {args.out} is or holds the input {source}: render into another folder")
    oom.step(f"loading the bundle {args.bundle}", bundle_advice(args.bundle))
    bundle = NeuralScene.load(args.bundle)
    oom.step(f"reading the cameras of {args.scene}", "")  # not the bundle's advice
    options: dict = {"undistort": True} if args.undistort else {}
    # the bundle holds the points: only the dataset's cameras are used, its cloud is not needed
    scene = load_scene(args.scene, format=args.format, require_points=False, **options)
    frames = path_cameras(scene, chosen_views(scene, args.views), args.between, args.max_side)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = device  # the device the out-of-memory message names
    oom.step(f"moving the bundle to {device}", bundle_advice(args.bundle))
    renderer = bundle.renderer(device)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        try:
            for k, frame in enumerate(frames):
                cam = Camera.from_opencv(np.asarray(frame["K"]), np.asarray(frame["R"]), np.asarray(frame["t"]),
                                         tuple(frame["size"]))
                h, w = frame["size"]
                oom.step(f"rendering frame {k + 1} of {len(frames)} at {w}x{h} px",
                         f"render smaller frames with --max-side (below {max(h, w)}, their long side now)")
                # the frame being rendered (a big one takes a while), as fit's step line
                print(f"\rframe {k + 1}/{len(frames)}", end="", file=sys.stderr, flush=True)
                with torch.no_grad():
                    image = eight_bit_levels(renderer.render(cam).cpu())
                frame["file"] = f"frame_{k:04d}.png"
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(tmp, frame["file"]))
        finally:
            print(file=sys.stderr)  # ends the frame line, also before a failing frame's error line
        with open(os.path.join(tmp, "frames.json"), "w", encoding="utf-8") as f:
            json.dump({"bundle": os.path.abspath(args.bundle), "scene": os.path.abspath(args.scene),
                       "views": args.views, "between": args.between, "frames": frames}, f, indent=1)
    return os.path.abspath(args.out)


def bundle_advice(path: str) -> str:
    """What needs less memory in loading a bundle: one of fewer points (loading takes about
    :data:`~npbgpp_core.memory.BUNDLE_LOAD_TIMES_FILE` times its file's size, written as the
    add-on's advice writes it: ``other_clouds.size_text``)."""
    from npbgpp_core.datasets.other_clouds import size_text
    from npbgpp_core.memory import BUNDLE_LOAD_TIMES_FILE

    try:
        size = f" ({size_text(os.path.getsize(path))})"
    except OSError:
        size = ""
    return (f"loading a bundle takes about {BUNDLE_LOAD_TIMES_FILE} times its file's size{size} in memory: export "
            "one of fewer points (export --max-points)")


def main(argv: list[str]) -> int:
    """0 on success, 2 with a one-line message on bad input or when memory runs out (what ran
    out, during which step, what to do: :mod:`headless_train.oom`); the output folder is then
    left as it was (frames are written into a temporary folder, renamed when complete)."""
    args = parse_args(argv)
    oom.reset()

    def body() -> int:
        print(render(args))
        return 0

    # DatasetError and the bundle's errors are ValueErrors
    return oom.run_command(body, (RenderError, OSError, ValueError), args.debug, args.device)
