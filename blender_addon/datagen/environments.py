"""Environment scenes for the training corpus: objects in rooms, on tables, floors and
terrain, with walls, ceiling, ground and sky, so the whole frame is scene (bpy; imported
inside functions only). Seeded: ``env_<seed>`` is always the same scene, path and noise.

``render_env_scene(seed, out_dir, views=24, size=(256, 256))`` builds scene ``env_<seed>``,
picks a camera path like a real capture (``camera_paths``: hand-held orbit, close-ups,
forward-facing sweep, walk-through), renders it with Cycles on the CPU, degrades every
saved image like a phone photo (``photo.jitter_photo``), ray-casts exact depth and
specularity per pixel, and writes::

    transforms_train.json / transforms_test.json   exact intrinsics (fl_x, fl_y, cx, cy, w, h)
    train/r_<k>.png, test/r_<k>.png                RGB, no alpha (every 8th view of the path is test)
    points3d.ply                                   = points/surface.ply
    points/surface.ply   uniform on all surfaces (100k), albedo colours
    points/mvs.ply       dense MVS-like  (pointsim.simulate_mvs, colours from the photos)
    points/sfm.ply       sparse SfM-like (pointsim.simulate_sfm, 5k-50k points on corners)
    points/lidar.ply     LiDAR-like scans from 1-3 sensor positions (pointsim.simulate_lidar)
    env.json             seed, scene kind, camera path, per-view photo jitter, counts, timings

Scene kinds: ``room`` (floor, four walls, ceiling, a table with objects on it, objects on
the floor, posters with text, rugs, ceiling and lamp lights) and ``outdoor`` (displaced
terrain, gradient sky, sun, rocks, trees, a small building with signs, objects around a
bench, a ring of distant hills). Materials: generated image textures (planks, tiles,
bricks, fine multi-octave noise, grass, stripes, checkers, dots, text), flat, glossy and
metallic; glossy/metallic surfaces are flagged specular for the MVS simulator.

Command line (resumable: finished ``env_<seed>`` folders are skipped; the folder is
built as ``env_<seed>.partial-<pid>`` and renamed when complete, and one a killed run left
behind is removed when that seed is rendered again; ``npbgpp_core.atomic.atomic_directory``)::

    python -m blender_addon.datagen.environments --seeds 1-40 --views 24 --size 256x256 \
        --out /work/corpus_env [--samples 8] [--denoise]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npbgpp_core.atomic import atomic_directory, atomic_write_bytes

from ..srgb import srgb_to_linear
from . import camera_paths as cp
from . import pointsim as ps
from .photo import jitter_photo

KINDS = ("room", "outdoor")
POINT_KINDS = ("mvs", "sfm", "lidar", "surface")
WORDS = ("CAFE", "OPEN", "EXIT", "SALE", "NPBG", "HELLO", "PARIS", "NO 42", "DATA", "LAB", "ROOM 7", "TEA",
         "BOOKS", "MENU", "PARK", "STOP", "A-12", "2026", "NORTH", "LIVE")


# ------------------------------------------------------------------ textures (numpy)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth tileable noise in [0, 1] (bicubic-ish interpolation of a periodic grid)."""
    g = rng.uniform(0, 1, (cells, cells))
    y, x = np.mgrid[0:size, 0:size] / size * cells
    i, j = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - i, y - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a = g[j % cells, i % cells] * (1 - fx) + g[j % cells, (i + 1) % cells] * fx
    b = g[(j + 1) % cells, i % cells] * (1 - fx) + g[(j + 1) % cells, (i + 1) % cells] * fx
    return a * (1 - fy) + b * fy


def _fbm(rng: np.random.Generator, size: int, base: int = 4, octaves: int = 5) -> np.ndarray:
    out, amp, tot = np.zeros((size, size)), 1.0, 0.0
    for k in range(octaves):
        cells = min(base * 2 ** k, size)
        out += amp * _value_noise(rng, size, cells)
        tot += amp
        amp *= 0.55
    return out / tot


def _mix(c1, c2, t) -> np.ndarray:
    t = np.asarray(t)[..., None]
    return np.asarray(c1) * (1 - t) + np.asarray(c2) * t


def _palette(rng: np.random.Generator, muted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    c1 = rng.uniform(0.05, 0.95, 3)
    if muted:
        c1 = 0.5 * c1 + 0.5 * c1.mean()
    c2 = np.clip(c1 + rng.normal(0, 0.25, 3) + rng.choice([-0.3, 0.3]), 0.03, 0.97)
    return c1, c2


def env_texture(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An (size, size, 3) sRGB float32 texture in [0, 1], tileable where it matters."""
    y, x = np.mgrid[0:size, 0:size] / size
    c1, c2 = _palette(rng, muted=kind in ("planks", "plaster", "tiles", "bricks"))
    fine = _fbm(rng, size, 16, 4)
    if kind == "planks":
        n = int(rng.integers(3, 7))
        row = np.floor(y * n)
        shift = (row * 0.37) % 1
        grain = 0.5 + 0.5 * np.sin(2 * math.pi * (y * n * 6 + 0.3 * _fbm(rng, size, 4, 3) * 8))
        seam = ((y * n) % 1 < 0.03) | (((x + shift) * 2) % 1 < 0.01)
        t = 0.35 * grain + 0.4 * fine + 0.25 * (row % 3) / 2
        out = _mix(c1, c2, t)
        out[seam] *= 0.45
    elif kind == "tiles":
        n = int(rng.integers(4, 9))
        gx, gy = (x * n) % 1, (y * n) % 1
        grout = (gx < 0.06) | (gy < 0.06)
        tile_id = (np.floor(x * n) + 7 * np.floor(y * n)) % 5 / 4
        out = _mix(c1, c2, 0.6 * tile_id + 0.25 * fine)
        out[grout] = 0.85 * np.array([0.8, 0.8, 0.78])
    elif kind == "bricks":
        rows = int(rng.integers(6, 12))
        r = np.floor(y * rows)
        xs = x * rows / 2 + 0.5 * (r % 2)
        mortar = ((y * rows) % 1 < 0.1) | (xs % 1 < 0.05)
        bid = (np.floor(xs) * 13 + r * 7) % 6 / 5
        out = _mix(c1, c2, 0.5 * bid + 0.5 * fine)
        out[mortar] = np.array([0.75, 0.73, 0.7])
    elif kind == "plaster":
        out = _mix(c1, c2, 0.15 + 0.5 * _fbm(rng, size, 8, 5))
    elif kind == "fine_noise":
        out = _mix(c1, c2, _fbm(rng, size, 32, 3))
    elif kind == "grass":
        base = _fbm(rng, size, 8, 5)
        blades = _value_noise(rng, size, min(size, 128))
        out = _mix(np.array([0.15, 0.3, 0.08]), np.array([0.45, 0.55, 0.2]), 0.5 * base + 0.5 * blades)
        dirt = _fbm(rng, size, 4, 3) > 0.62
        out[dirt] = _mix(np.array([0.35, 0.27, 0.18]), np.array([0.5, 0.42, 0.3]), fine)[dirt]
    elif kind == "stripes":
        n = int(rng.integers(4, 20))
        t = (np.sin(2 * math.pi * n * (x + 0.2 * y)) > 0).astype(float)
        out = _mix(c1, c2, 0.85 * t + 0.15 * fine)
    elif kind == "checker":
        n = int(rng.integers(4, 12))
        t = (np.floor(x * n) + np.floor(y * n)) % 2
        out = _mix(c1, c2, 0.85 * t + 0.15 * fine)
    elif kind == "dots":
        n = int(rng.integers(5, 14))
        d = np.hypot((x * n) % 1 - 0.5, (y * n) % 1 - 0.5)
        out = _mix(c1, c2, (d < 0.25).astype(float))
    elif kind == "text":
        out = text_texture(rng, size)
    else:
        raise ValueError(f"unknown environment texture kind {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32)


def text_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A poster/sign: coloured background, a border, a few lines of words and shapes."""
    from PIL import Image, ImageDraw, ImageFont

    bg, fg = _palette(rng)
    if abs(bg.mean() - fg.mean()) < 0.3:
        fg = 1.0 - bg
    img = Image.new("RGB", (size, size), tuple(int(v * 255) for v in bg))
    draw = ImageDraw.Draw(img)
    draw.rectangle([4, 4, size - 5, size - 5], outline=tuple(int(v * 255) for v in fg), width=max(2, size // 64))
    lines = int(rng.integers(1, 4))
    for k in range(lines):
        font = ImageFont.load_default(size=int(size * rng.uniform(0.1, 0.2)))
        word = str(rng.choice(WORDS))
        yy = int(size * (0.12 + 0.75 * k / max(lines, 1)))
        draw.text((int(size * rng.uniform(0.05, 0.25)), yy), word, fill=tuple(int(v * 255) for v in fg), font=font)
    for _ in range(int(rng.integers(0, 4))):
        cx, cy, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.03, 0.1) * size
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        else:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    return np.asarray(img, np.float32) / 255.0


# ------------------------------------------------------------------ bpy building blocks


@dataclass
class EnvInfo:
    kind: str
    seed: int
    bounds: tuple[float, float, float, float]  # walkable x0, x1, y0, y1
    height: float  # ceiling height (room) or typical camera ceiling (outdoor)
    subject: np.ndarray  # centre of the main subject (table top centre, bench area)
    subject_radius: float
    walls: list = field(default_factory=list)  # (point on wall, inward normal) for forward sweeps
    specular_objects: set = field(default_factory=set)
    lidar_sensors: list = field(default_factory=list)


class _Builder:
    def __init__(self, scene, rng: np.random.Generator, tex_size: int) -> None:
        self.scene, self.rng, self.tex_size = scene, rng, tex_size
        self.specular: set[str] = set()
        self.count = 0

    def material(self, kind: str | None = None, roughness: float | None = None, metallic: float = 0.0):
        import bpy

        from .procedural import _image

        rng = self.rng
        kind = kind or str(rng.choice(["flat", "fine_noise", "stripes", "checker", "dots", "plaster", "text",
                                       "planks", "tiles"]))
        self.count += 1
        mat = bpy.data.materials.new(f"env_mat{self.count}_{kind}")
        if mat.node_tree is None:
            mat.use_nodes = True
        nodes = mat.node_tree.nodes
        bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
        if kind == "flat":
            srgb = rng.uniform(0.05, 0.95, 3)
            bsdf.inputs["Base Color"].default_value = (*srgb_to_linear(srgb, np.float64), 1.0)
        else:
            tex = nodes.new("ShaderNodeTexImage")
            tex.image = _image(f"env_tex{self.count}_{kind}", env_texture(kind, rng, self.tex_size))
            tex.interpolation = "Linear"
            mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
        if roughness is None:
            roughness = float(rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.4, 0.9)], p=[0.25, 0.75]))
        bsdf.inputs["Roughness"].default_value = roughness
        bsdf.inputs["Metallic"].default_value = metallic
        mat["npbgpp_specular"] = bool(roughness < 0.3 or metallic > 0.5)
        return mat

    def link(self, obj, mat) -> Any:
        if mat is not None and mat.get("npbgpp_specular"):
            self.specular.add(obj.name)
        return obj

    def quad(self, name: str, corners: np.ndarray, mat, tile: float = 1.0):
        """A quad (4 corners, counter-clockwise seen from the front) with UVs in metres / tile."""
        import bmesh
        import bpy

        bm = bmesh.new()
        uv = bm.loops.layers.uv.verify()
        vs = [bm.verts.new(tuple(c)) for c in corners]
        f = bm.faces.new(vs)
        e1 = corners[1] - corners[0]
        e2 = corners[3] - corners[0]
        l1, l2 = np.linalg.norm(e1), np.linalg.norm(e2)
        for loop, (a, b) in zip(f.loops, ((0, 0), (1, 0), (1, 1), (0, 1)), strict=True):
            loop[uv].uv = (a * l1 / tile, b * l2 / tile)
        mesh = bpy.data.meshes.new(name)
        bm.to_mesh(mesh)
        bm.free()
        mesh.materials.append(mat)
        obj = bpy.data.objects.new(name, mesh)
        self.scene.collection.objects.link(obj)
        return self.link(obj, mat)

    def box(self, name: str, center, half, mat, rot_z: float = 0.0):
        from .procedural import make_mesh_object

        obj = make_mesh_object(self.scene, name, "cube", mat, tuple(center), (0, 0, rot_z), tuple(half), self.rng)
        return self.link(obj, mat)

    def prim(self, name: str, shape: str, center, scale, mat, rot=(0, 0, 0), **kw):
        from .procedural import make_mesh_object

        obj = make_mesh_object(self.scene, name, shape, mat, tuple(center), tuple(rot), tuple(scale), self.rng, **kw)
        return self.link(obj, mat)

    def small_object(self, name: str, base: np.ndarray, size: float):
        """A random object standing on a surface at ``base`` (its bottom centre)."""
        rng = self.rng
        shape = str(rng.choice(["cube", "uv_sphere", "cylinder", "cone", "torus", "monkey", "ico_sphere", "book"]))
        mat = self.material(metallic=1.0 if rng.random() < 0.12 else 0.0)
        s = size * rng.uniform(0.6, 1.2)
        rz = float(rng.uniform(0, 2 * math.pi))
        if shape == "book":
            h = s * rng.uniform(0.15, 0.4)
            return self.box(name, base + [0, 0, h / 2], (s * 0.7, s, h / 2), self.material("text"), rz)
        if shape == "cube":
            hz = s * rng.uniform(0.3, 0.8)
            return self.box(name, base + [0, 0, hz], (s * 0.5, s * 0.6, hz), mat, rz)
        if shape in ("cylinder", "cone"):
            hz = s * rng.uniform(0.4, 1.2)
            return self.prim(name, shape, base + [0, 0, hz], (s * 0.35, s * 0.35, hz), mat, (0, 0, rz),
                             tip=float(rng.uniform(0.0, 0.7)))
        if shape == "torus":
            return self.prim(name, "torus", base + [0, 0, s * 0.25], (s * 0.6,) * 3, mat, (0, 0, rz), minor=0.35)
        if shape == "monkey":
            return self.prim(name, "monkey", base + [0, 0, s * 0.5], (s * 0.6,) * 3, mat, (math.pi / 2, 0, rz))
        disp = 0.15 if shape == "ico_sphere" else 0.0
        return self.prim(name, shape, base + [0, 0, s * 0.5], (s * 0.5,) * 3, mat, (0, 0, rz), displace=disp)


def _world(scene, top, horizon, strength: float) -> None:
    """A sky: colour blended from ``horizon`` to ``top`` by the view direction's height."""
    import bpy

    world = bpy.data.worlds.new(f"{scene.name}_world")
    if world.node_tree is None:
        world.use_nodes = True
    nt = world.node_tree
    bg = next(n for n in nt.nodes if n.type == "BACKGROUND")
    coord = nt.nodes.new("ShaderNodeTexCoord")
    sep = nt.nodes.new("ShaderNodeSeparateXYZ")
    ramp = nt.nodes.new("ShaderNodeValToRGB")
    nt.links.new(coord.outputs["Generated"], sep.inputs[0])
    nt.links.new(sep.outputs["Z"], ramp.inputs["Fac"])
    ramp.color_ramp.elements[0].position = 0.0
    ramp.color_ramp.elements[0].color = (*srgb_to_linear(np.asarray(horizon), np.float64), 1.0)
    ramp.color_ramp.elements[1].position = 0.6
    ramp.color_ramp.elements[1].color = (*srgb_to_linear(np.asarray(top), np.float64), 1.0)
    nt.links.new(ramp.outputs["Color"], bg.inputs["Color"])
    bg.inputs["Strength"].default_value = strength
    scene.world = world


def _light(scene, name: str, kind: str, loc, energy: float, color=(1, 1, 1), size: float = 1.0, rot=(0, 0, 0)):
    import bpy
    from mathutils import Euler

    light = bpy.data.lights.new(name, kind)
    light.energy = energy
    light.color = color
    if kind == "AREA":
        light.size = size
    elif kind == "SUN":
        light.angle = math.radians(size)
    else:
        light.shadow_soft_size = size
    obj = bpy.data.objects.new(name, light)
    obj.location = loc
    obj.rotation_euler = Euler(rot)
    scene.collection.objects.link(obj)
    return obj


def _warm_cool(rng: np.random.Generator) -> tuple[float, float, float]:
    t = rng.uniform(-1, 1)
    return (1.0, 1.0 - 0.12 * max(t, 0) + 0.03 * min(t, 0), 1.0 - 0.3 * max(t, 0) - 0.0 * min(t, 0))


def _build_room(b: _Builder, seed: int) -> EnvInfo:
    rng = b.rng
    W, D, H = rng.uniform(3.5, 6.5), rng.uniform(3.5, 6.5), rng.uniform(2.4, 3.1)
    x0, x1, y0, y1 = -W / 2, W / 2, -D / 2, D / 2
    floor_mat = b.material(str(rng.choice(["planks", "tiles", "checker", "fine_noise"])),
                           roughness=rng.uniform(0.2, 0.8))
    b.quad("floor", np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]]), floor_mat, rng.uniform(0.8, 2.0))
    b.quad("ceiling", np.array([[x0, y0, H], [x0, y1, H], [x1, y1, H], [x1, y0, H]]),
           b.material("plaster", roughness=0.9), 2.0)
    walls = []
    wall_kind = str(rng.choice(["plaster", "bricks", "stripes", "tiles", "fine_noise"]))
    corners = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]
    for k, ((ax, ay), (bx, by)) in enumerate(corners):
        kind = wall_kind if rng.random() < 0.7 else str(rng.choice(["plaster", "bricks", "stripes"]))
        q = np.array([[ax, ay, 0], [bx, by, 0], [bx, by, H], [ax, ay, H]])
        b.quad(f"wall{k}", q, b.material(kind, roughness=rng.uniform(0.5, 0.95)), rng.uniform(1.0, 2.5))
        mid = np.array([(ax + bx) / 2, (ay + by) / 2, 0.0])
        inward = -mid / max(np.linalg.norm(mid), 1e-9)
        inward[2] = 0
        inward /= np.linalg.norm(inward)
        walls.append((mid, inward, np.array([bx - ax, by - ay, 0.0])))
        # posters / signs / a bright "window" on the wall
        for p in range(int(rng.integers(1, 4))):
            along = walls[-1][2] / np.linalg.norm(walls[-1][2])
            L = np.linalg.norm(walls[-1][2])
            w, h = rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.0)
            c = np.array([ax, ay, 0]) + along * rng.uniform(w / 2 + 0.2, max(L - w / 2 - 0.2, w / 2 + 0.21))
            c = c + inward * 0.01 + [0, 0, rng.uniform(0.9, min(H - h / 2 - 0.1, 2.0))]
            up = np.array([0, 0, 1.0])
            # u runs against ``along`` so text reads correctly from inside the room
            quad = np.array([c + along * w / 2 - up * h / 2, c - along * w / 2 - up * h / 2,
                             c - along * w / 2 + up * h / 2, c + along * w / 2 + up * h / 2])
            mat = b.material("text" if rng.random() < 0.7 else str(rng.choice(["dots", "checker", "stripes"])),
                             roughness=rng.uniform(0.1, 0.6))
            b.quad(f"poster{k}_{p}", quad, mat, max(w, h))
    # table with objects
    tx, ty = rng.uniform(x0 * 0.3, x1 * 0.3), rng.uniform(y0 * 0.3, y1 * 0.3)
    tw, td, th = rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.7), rng.uniform(0.7, 0.8)
    rz = float(rng.uniform(0, math.pi))
    top_mat = b.material(str(rng.choice(["planks", "fine_noise", "flat", "tiles"])))
    b.box("table_top", (tx, ty, th - 0.02), (tw, td, 0.02), top_mat, rz)
    leg_mat = b.material("flat", metallic=float(rng.random() < 0.5), roughness=0.3)
    c, s = math.cos(rz), math.sin(rz)
    for k, (sx, sy) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
        lx, ly = (tw - 0.06) * sx, (td - 0.06) * sy
        b.box(f"leg{k}", (tx + c * lx - s * ly, ty + s * lx + c * ly, (th - 0.04) / 2), (0.025, 0.025, (th - 0.04) / 2),
              leg_mat, rz)
    for k in range(int(rng.integers(3, 7))):
        lx, ly = rng.uniform(-tw * 0.75, tw * 0.75), rng.uniform(-td * 0.7, td * 0.7)
        base = np.array([tx + c * lx - s * ly, ty + s * lx + c * ly, th])
        b.small_object(f"on_table{k}", base, rng.uniform(0.08, 0.18))
    # rug and floor objects near the walls
    if rng.random() < 0.7:
        rw, rd = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.2)
        b.quad("rug", np.array([[tx - rw, ty - rd, 0.005], [tx + rw, ty - rd, 0.005], [tx + rw, ty + rd, 0.005],
                                [tx - rw, ty + rd, 0.005]]), b.material(str(rng.choice(["stripes", "dots", "checker",
                                                                                          "fine_noise"]))), 1.0)
    for k in range(int(rng.integers(2, 6))):
        side = int(rng.integers(0, 4))
        mid, inward, along = walls[side]
        L = np.linalg.norm(along)
        pos = mid + along / L * rng.uniform(-L / 2 + 0.5, L / 2 - 0.5) + inward * rng.uniform(0.3, 0.6)
        if rng.random() < 0.4:  # a cabinet / shelf block with things on it
            hh = rng.uniform(0.3, 0.6)
            b.box(f"cabinet{k}", pos + [0, 0, hh], (rng.uniform(0.3, 0.6), 0.25, hh),
                  b.material(str(rng.choice(["planks", "flat", "fine_noise"]))),
                  math.atan2(inward[1], inward[0]) + math.pi / 2)
            b.small_object(f"on_cabinet{k}", pos + [0, 0, 2 * hh], rng.uniform(0.08, 0.15))
        else:
            b.small_object(f"floor{k}", pos, rng.uniform(0.2, 0.45))
    # lights: ceiling panel(s), a lamp, dim ambient
    tint = _warm_cool(rng)
    for k in range(int(rng.integers(1, 3))):
        loc = (rng.uniform(x0 / 2, x1 / 2), rng.uniform(y0 / 2, y1 / 2), H - 0.02)
        energy = rng.uniform(40, 120) * W * D / 20
        _light(b.scene, f"ceiling_light{k}", "AREA", loc, energy, tint, rng.uniform(0.5, 1.5))
    if rng.random() < 0.6:
        _light(b.scene, "lamp", "POINT", (rng.uniform(x0 + 0.5, x1 - 0.5), rng.uniform(y0 + 0.5, y1 - 0.5),
                                          rng.uniform(1.2, 2.0)), rng.uniform(20, 80), _warm_cool(rng), 0.2)
    _world(b.scene, (0.4, 0.4, 0.42), (0.35, 0.35, 0.35), rng.uniform(0.2, 0.6))
    return EnvInfo("room", seed, (x0 + 0.45, x1 - 0.45, y0 + 0.45, y1 - 0.45), H, np.array([tx, ty, th + 0.1]),
                   max(tw, td), walls, b.specular,
                   [np.array([rng.uniform(x0 / 2, x1 / 2), rng.uniform(y0 / 2, y1 / 2), rng.uniform(1.0, 1.8)])
                    for _ in range(int(rng.integers(1, 3)))])


def _build_outdoor(b: _Builder, seed: int) -> EnvInfo:
    import bmesh
    import bpy

    rng = b.rng
    R = 40.0
    bm = bmesh.new()
    uv = bm.loops.layers.uv.verify()
    bmesh.ops.create_grid(bm, x_segments=96, y_segments=96, size=R)
    hf = _fbm(rng, 97, 3, 4)
    amp = rng.uniform(0.3, 1.5)
    for v in bm.verts:
        i = int(round((v.co.x / R * 0.5 + 0.5) * 96))
        j = int(round((v.co.y / R * 0.5 + 0.5) * 96))
        r = math.hypot(v.co.x, v.co.y)
        flat = min(1.0, max(0.0, (r - 6.0) / 10.0))  # flat around the subject, hills further out
        v.co.z = amp * flat * (hf[j, i] - 0.5) * 2 + flat * flat * rng.uniform(0, 0.02) * r * r * 0.1
    tile = rng.uniform(1.0, 3.0)
    for f in bm.faces:
        for loop in f.loops:
            loop[uv].uv = (loop.vert.co.x / tile, loop.vert.co.y / tile)
    mesh = bpy.data.meshes.new("terrain")
    bm.to_mesh(mesh)
    bm.free()
    ground = b.material(str(rng.choice(["grass", "grass", "fine_noise", "tiles"])), roughness=0.9)
    mesh.materials.append(ground)
    for p in mesh.polygons:
        p.use_smooth = True
    obj = bpy.data.objects.new("terrain", mesh)
    b.scene.collection.objects.link(obj)
    # subject: a bench/table with things, rocks, posts around
    sx, sy = rng.uniform(-1, 1), rng.uniform(-1, 1)
    th = rng.uniform(0.45, 0.8)
    tw, td = rng.uniform(0.6, 1.2), rng.uniform(0.3, 0.6)
    rz = float(rng.uniform(0, math.pi))
    b.box("bench_top", (sx, sy, th), (tw, td, 0.04), b.material(str(rng.choice(["planks", "fine_noise"]))), rz)
    c, s = math.cos(rz), math.sin(rz)
    for k, sgn in enumerate((-1, 1)):
        lx = sgn * (tw - 0.1)
        b.box(f"bench_leg{k}", (sx + c * lx, sy + s * lx, th / 2), (0.05, td * 0.9, th / 2),
              b.material("flat", roughness=0.5), rz)
    for k in range(int(rng.integers(2, 6))):
        lx, ly = rng.uniform(-tw * 0.8, tw * 0.8), rng.uniform(-td * 0.7, td * 0.7)
        b.small_object(f"on_bench{k}", np.array([sx + c * lx - s * ly, sy + s * lx + c * ly, th + 0.04]),
                       rng.uniform(0.1, 0.2))
    for k in range(int(rng.integers(3, 9))):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(1.5, 6)
        pos = np.array([sx + r * math.cos(a), sy + r * math.sin(a), 0.0])
        what = rng.random()
        if what < 0.4:
            sc = rng.uniform(0.2, 0.8)
            b.prim(f"rock{k}", "ico_sphere", pos + [0, 0, sc * 0.3], (sc, sc * rng.uniform(0.7, 1.2), sc * 0.7),
                   b.material(str(rng.choice(["fine_noise", "plaster"])), roughness=0.9),
                   (0, 0, rng.uniform(0, 6)), displace=0.25, subdivisions=3)
        elif what < 0.7:
            h = rng.uniform(1.5, 4)
            b.prim(f"trunk{k}", "cylinder", pos + [0, 0, h / 2], (0.12, 0.12, h / 2),
                   b.material("stripes", roughness=0.9))
            cr = rng.uniform(0.7, 1.5)
            b.prim(f"crown{k}", "ico_sphere", pos + [0, 0, h + cr * 0.6], (cr, cr, cr * 1.1),
                   b.material("grass", roughness=0.8), displace=0.2, subdivisions=3)
        else:
            b.small_object(f"thing{k}", pos, rng.uniform(0.3, 0.7))
    # a small building with a sign
    a = rng.uniform(0, 2 * math.pi)
    bx, by = sx + 10 * math.cos(a), sy + 10 * math.sin(a)  # beyond every camera path
    bw, bd, bh = rng.uniform(1.5, 3), rng.uniform(1.5, 3), rng.uniform(2.5, 4)
    b.box("building", (bx, by, bh / 2), (bw, bd, bh / 2), b.material(str(rng.choice(["bricks", "plaster", "tiles"]))),
          float(a))
    face = np.array([bx, by, 0]) - np.array([math.cos(a), math.sin(a), 0]) * (bw + 0.02)
    along = np.array([-math.sin(a), math.cos(a), 0])
    up = np.array([0, 0, 1.0])
    c0 = face + up * bh * 0.7
    b.quad("sign", np.array([c0 + along * 0.8 - up * 0.3, c0 - along * 0.8 - up * 0.3, c0 - along * 0.8 + up * 0.3,
                             c0 + along * 0.8 + up * 0.3]), b.material("text", roughness=0.4), 1.6)
    # distant hills / buildings ring so the horizon is not empty
    for k in range(int(rng.integers(6, 14))):
        a2, r2 = rng.uniform(0, 2 * math.pi), rng.uniform(18, 30)
        h2 = rng.uniform(2, 8)
        b.box(f"far{k}", (r2 * math.cos(a2), r2 * math.sin(a2), h2 / 2), (rng.uniform(1, 4), rng.uniform(1, 4), h2 / 2),
              b.material(str(rng.choice(["bricks", "plaster", "fine_noise", "grass"]))), float(rng.uniform(0, 3)))
    sun_el = rng.uniform(20, 70)
    _light(b.scene, "sun", "SUN", (0, 0, 10), rng.uniform(2.5, 5), _warm_cool(rng), rng.uniform(1, 5),
           (math.radians(90 - sun_el), 0, rng.uniform(0, 2 * math.pi)))
    top = rng.uniform([0.2, 0.35, 0.6], [0.4, 0.55, 0.9])
    _world(b.scene, top, rng.uniform([0.7, 0.75, 0.8], [0.9, 0.9, 0.95]), rng.uniform(0.7, 1.3))
    return EnvInfo("outdoor", seed, (sx - 8, sx + 8, sy - 8, sy + 8), 3.0, np.array([sx, sy, th + 0.1]), max(tw, td),
                   [], b.specular, [np.array([sx + rng.uniform(-3, 3), sy + rng.uniform(-3, 3), rng.uniform(1.2, 2.0)])
                                    for _ in range(int(rng.integers(1, 4)))])


def build_env_scene(seed: int, kind: str | None = None, tex_size: int = 256):
    """Create a new bpy scene ``npbgpp_env_<seed>``; returns (scene, EnvInfo)."""
    import bpy

    rng = np.random.default_rng([seed, 7919])
    # drawn even when ``kind`` is given, so that the geometry after it depends on the seed
    # alone: resimulate_points passes the kind a default render drew, and skipping the draw
    # there built another scene (other depth, other clouds than the images)
    drawn = str(rng.choice(KINDS, p=[0.6, 0.4]))
    kind = kind or drawn
    if kind not in KINDS:
        raise ValueError(f"unknown environment kind {kind!r}; choose one of {KINDS}")
    scene = bpy.data.scenes.new(f"npbgpp_env_{seed}")
    b = _Builder(scene, rng, tex_size)
    info = _build_room(b, seed) if kind == "room" else _build_outdoor(b, seed)
    return scene, info


# ------------------------------------------------------------------ camera path choice


def choose_path(info: EnvInfo, n: int, rng: np.random.Generator, kind: str | None = None) -> cp.CameraPath:
    """A camera path like a real capture of this environment."""
    kinds = ("orbit", "closeup", "forward", "walk")
    kind = kind or str(rng.choice(kinds, p=[0.4, 0.2, 0.2, 0.2]))
    x0, x1, y0, y1 = info.bounds
    c = info.subject
    if kind == "orbit":
        room = min(c[0] - x0, x1 - c[0], c[1] - y0, y1 - c[1])
        rmax = max(min(room, 3.5 if info.kind == "outdoor" else room), info.subject_radius + 0.6)
        rmin = min(info.subject_radius + 0.4, rmax - 0.2)
        top = min(info.height - 0.4, 2.2) if info.kind == "room" else 2.5
        return cp.orbit(c, n, rng, radius=(rmin, rmax), height=(max(0.9, c[2] + 0.1), max(top, c[2] + 0.4)))
    if kind == "closeup":
        return cp.closeup(c, n, rng, distance=(0.45, 0.9), elevation_deg=(15, 60))
    if kind == "forward":
        if info.kind == "room" and info.walls:
            mid, inward, _ = info.walls[int(rng.integers(0, len(info.walls)))]
            dist = rng.uniform(1.4, 2.4)
            origin = mid + inward * dist + [0, 0, rng.uniform(1.2, 1.6)]
            yaw = math.atan2(-inward[1], -inward[0])
            return cp.forward(origin, yaw, n, rng, extent=(rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.6)),
                              target_distance=dist)
        a = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(2.5, 4.5)
        origin = c + np.array([math.cos(a), math.sin(a), 0]) * dist
        origin[2] = rng.uniform(1.2, 1.7)
        return cp.forward(origin, a + math.pi, n, rng, extent=(rng.uniform(0.6, 1.2), rng.uniform(0.3, 0.6)),
                          target_distance=dist)
    # walk: a loop or an L past the subject, inside the walkable area
    m = 0.2
    pts = [(x0 + m, y0 + m), (x1 - m, y0 + m), (x1 - m, y1 - m), (x0 + m, y1 - m)]
    start = int(rng.integers(0, 4))
    way = [pts[(start + k) % 4] for k in range(int(rng.integers(2, 5)))]
    # through the middle of the room / around the subject rather than along the walls
    shrink = 0.5 if info.kind == "outdoor" else 0.6
    way = [(c[0] + shrink * (x - c[0]), c[1] + shrink * (y - c[1])) for x, y in way]
    hi = min(info.height - 0.5, 1.7)
    return cp.walk(way, n, rng, eye_height=(min(1.4, hi - 0.1), hi), focus=c, focus_weight=rng.uniform(0.3, 0.7))


# ------------------------------------------------------------------ ray casting


class SceneRays:
    """A BVH over the scene's evaluated triangles: exact depth and specular flags per pixel."""

    def __init__(self, bpy_scene, specular_objects: set[str]) -> None:
        from mathutils.bvhtree import BVHTree

        from .surface_points import evaluated_depsgraph, scene_triangles

        dg = evaluated_depsgraph(bpy_scene)
        verts, tris, spec = [], [], []
        offset = 0
        for obj in bpy_scene.collection.all_objects:
            if obj.type != "MESH":
                continue
            for m in scene_triangles(bpy_scene, [obj], dg):
                verts.append(m.world)
                tris.append(m.tri_verts + offset)
                spec.append(np.full(len(m.tri_verts), obj.name in specular_objects))
                offset += len(m.world)
        self.verts = np.concatenate(verts)
        self.tris = np.concatenate(tris)
        self.specular = np.concatenate(spec)
        self.bvh = BVHTree.FromPolygons(self.verts.tolist(), self.tris.tolist(), all_triangles=True)

    def cast(self, origins: np.ndarray, dirs: np.ndarray, max_dist: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
        """Distance to the first hit along each unit ray (inf for none) and its specular flag."""
        from mathutils import Vector

        dist = np.full(len(dirs), np.inf)
        spec = np.zeros(len(dirs), bool)
        cast = self.bvh.ray_cast
        for k in range(len(dirs)):
            loc, _n, idx, d = cast(Vector(origins[k]), Vector(dirs[k]), max_dist)
            if loc is not None:
                dist[k] = d
                spec[k] = self.specular[idx]
        return dist, spec

    def nearest(self, p: np.ndarray) -> float:
        from mathutils import Vector

        hit = self.bvh.find_nearest(Vector(p))
        return float("inf") if hit[0] is None else float(hit[3])

    def view_maps(self, K: np.ndarray, c2w_cv: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        rays = ps.pixel_rays(K, shape).reshape(-1, 3)
        world = rays @ c2w_cv[:3, :3].T
        norm = np.linalg.norm(world, axis=1)
        dist, spec = self.cast(np.repeat(c2w_cv[:3, 3][None], len(world), 0), world / norm[:, None])
        depth = np.where(np.isfinite(dist), dist / norm, 0.0)  # along the ray -> z-depth
        return depth.reshape(shape), spec.reshape(shape)


def _push_clear(path: cp.CameraPath, rays: SceneRays, clearance: float = 0.25) -> int:
    """Move cameras that sit inside or against geometry towards their aim point."""
    moved = 0
    for k in range(len(path.c2w)):
        eye = path.c2w[k, :3, 3].copy()
        aim = path.aims[k]
        steps = 0
        while rays.nearest(eye) < clearance and steps < 12:
            d = aim - eye
            if np.linalg.norm(d) < 0.3:
                break
            eye = eye + d / np.linalg.norm(d) * 0.1
            steps += 1
        if steps:
            path.c2w[k, :3, 3] = eye
            moved += 1
    return moved


# ------------------------------------------------------------------ rendering


def _sim_kwargs(info: EnvInfo, path: cp.CameraPath) -> dict:
    dist = np.linalg.norm(path.positions - path.aims, axis=1)
    # "little or no background": MVS keeps what lies within a few subject distances
    return dict(max_depth=float(np.median(dist) * (2.5 if info.kind == "room" else 2.0) + 1.0))


POINTS_SEED = 15485863


def _simulate_points(scene, info: EnvInfo, rays: SceneRays, train_maps: list[ps.ViewMaps], seed: int,
                     max_depth: float, surface_points: int, points_dir: str) -> tuple[dict, dict]:
    """Write ``points_dir/<kind>.ply`` for a rendered scene (the caller copies surface.ply
    to points3d.ply). The simulators draw from their own generator (seeded by the scene
    seed), so ``resimulate_points`` on a finished folder reproduces exactly what rendering
    wrote."""
    from npbgpp_core.ply import save_ply

    from .surface_points import sample_surface_points

    rng = np.random.default_rng([seed, POINTS_SEED])
    os.makedirs(points_dir, exist_ok=True)
    mvs = ps.simulate_mvs(train_maps, rng, max_depth=max_depth, depth_noise=float(rng.uniform(0.001, 0.006)),
                          outlier_fraction=float(rng.uniform(0.0, 0.05)),
                          max_points=int(rng.integers(50_000, 300_000)))
    sfm = ps.simulate_sfm(train_maps, rng)

    def lidar_cast(o: np.ndarray, d: np.ndarray) -> np.ndarray:
        return rays.cast(o, d, 60.0)[0]

    lidar = ps.simulate_lidar(lidar_cast, info.lidar_sensors, train_maps, rng,
                              rings=int(rng.choice([16, 32, 64])), azimuth_step_deg=float(rng.uniform(0.3, 0.8)),
                              range_noise=float(rng.uniform(0.005, 0.03)), elevation_deg=(-30.0, 20.0))
    sp, sc = sample_surface_points(scene, surface_points, seed)
    counts = {}
    for name, (p, col) in {"mvs": (mvs.points, mvs.colors), "sfm": (sfm.points, sfm.colors),
                           "lidar": (lidar.points, lidar.colors), "surface": (sp, sc)}.items():
        save_ply(os.path.join(points_dir, f"{name}.ply"), p, col)
        counts[name] = int(len(p))
    info_out = {"mvs_max_depth": max_depth, "mvs_depth_noise": mvs.info["depth_noise"],
                "mvs_outlier_fraction": mvs.info["outlier_fraction"], "sfm_requested": sfm.info.get("requested"),
                "sfm_available": sfm.info.get("available"), "lidar_range_noise": lidar.info["range_noise"],
                "lidar_rings": len(lidar.info["ring_elevations_deg"]),
                "lidar_sensors": [v.tolist() for v in info.lidar_sensors]}
    return counts, info_out


def _train_maps(scene_dir: str, rays: SceneRays) -> list[ps.ViewMaps]:
    from PIL import Image

    with open(os.path.join(scene_dir, "transforms_train.json"), encoding="utf-8") as f:
        meta = json.load(f)
    w, h = int(meta["w"]), int(meta["h"])
    K = np.array([[meta["fl_x"], 0, meta["cx"] - 0.5], [0, meta["fl_y"], meta["cy"] - 0.5], [0, 0, 1.0]])
    maps = []
    for fr in meta["frames"]:
        c2w = ps.opengl_to_opencv(np.array(fr["transform_matrix"], np.float64))
        depth, spec = rays.view_maps(K, c2w, (h, w))
        with Image.open(os.path.join(scene_dir, fr["file_path"] + ".png")) as im:
            rgb = np.asarray(im.convert("RGB"), np.float64) / 255.0
        maps.append(ps.ViewMaps(rgb, depth, K, c2w, spec))
    return maps


def resimulate_points(scene_dir: str) -> dict:
    """Recompute the point clouds of a finished ``env_<seed>`` folder with the current
    simulators (rebuilds the scene's geometry from its seed; the images are not
    re-rendered). Returns the new counts; env.json is updated."""
    from .procedural import remove_scene

    with open(os.path.join(scene_dir, "env.json"), encoding="utf-8") as f:
        env = json.load(f)
    seed = int(env["seed"])
    scene, info = build_env_scene(seed, env["kind"], int(env.get("tex_size", 256)))
    try:
        rays = SceneRays(scene, info.specular_objects)
        maps = _train_maps(scene_dir, rays)
        with atomic_directory(os.path.join(scene_dir, "points"), overwrite=True) as tmp:
            counts, sim_info = _simulate_points(scene, info, rays, maps, seed, float(env["mvs_max_depth"]),
                                                int(env.get("surface_points", 100_000)), tmp)
    finally:
        remove_scene(scene)
    with open(os.path.join(scene_dir, "points", "surface.ply"), "rb") as f:
        atomic_write_bytes(os.path.join(scene_dir, "points3d.ply"), f.read())
    env.update(points=counts, **sim_info)
    with open(os.path.join(scene_dir, "env.json"), "w", encoding="utf-8") as f:
        json.dump(env, f, indent=1)
    return counts


def render_env_scene(seed: int, out_dir: str, views: int = 24, size: Sequence[int] = (256, 256), *,
                     samples: int = 8, denoise: bool = False, fov_deg: tuple[float, float] = (55.0, 70.0),
                     surface_points: int = 100_000, holdout_every: int = 8, kind: str | None = None,
                     path_kind: str | None = None, overwrite: bool = False, tex_size: int = 256) -> dict:
    """Build, render and simulate ``env_<seed>`` into ``out_dir`` (see the module docstring)."""
    import bpy
    from mathutils import Matrix

    from ..camera_bridge import opencv_intrinsics
    from .procedural import remove_scene
    from .render import _configure, _Settings

    h, w = int(size[0]), int(size[1])
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 104729])
    with atomic_directory(out_dir, overwrite) as tmp:
        scene, info = build_env_scene(seed, kind, tex_size)
        settings = _Settings()
        cam_data = bpy.data.cameras.new(f"env_{seed}_camera")
        cam_obj = bpy.data.objects.new(f"env_{seed}_camera", cam_data)
        scene.collection.objects.link(cam_obj)
        try:
            rays = SceneRays(scene, info.specular_objects)
            path = choose_path(info, views, rng, path_kind)
            moved = _push_clear(path, rays)
            fov = float(rng.uniform(*fov_deg))
            cam_data.sensor_fit = "HORIZONTAL"
            cam_data.sensor_width = 36.0
            cam_data.lens = 18.0 / math.tan(math.radians(fov) / 2.0)
            cam_data.clip_start = 0.02
            cam_data.clip_end = 500.0
            _configure(scene, settings, (h, w), samples, seed, denoise)
            settings.set(scene.render, "film_transparent", False)
            settings.set(scene.render.image_settings, "color_mode", "RGB")
            settings.set(scene.cycles, "sample_clamp_indirect", 3.0)
            settings.set(scene.cycles, "diffuse_bounces", 2)
            # Fast GI (AO-approximated indirect light) cut render time ~40% at the same samples.
            settings.set(scene.cycles, "use_fast_gi", True)
            # AgX rolls highlights off like a camera's tone curve instead of clipping them.
            settings.set(scene.view_settings, "view_transform", "AgX")
            settings.set(scene, "camera", cam_obj)
            K = opencv_intrinsics(cam_data.lens, cam_data.sensor_width, cam_data.sensor_height, cam_data.sensor_fit,
                                  cam_data.shift_x, cam_data.shift_y, w, h)
            train_idx, test_idx = cp.holdout_split(views, holdout_every)
            frames: dict[str, list] = {"train": [], "test": []}
            maps: list[ps.ViewMaps] = []
            render_s = rays_s = 0.0
            for k in range(views):
                split = "test" if k in test_idx else "train"
                rel = f"{split}/r_{len(frames[split])}"
                cam_obj.matrix_world = Matrix(path.c2w[k].tolist())
                os.makedirs(os.path.join(tmp, split), exist_ok=True)
                png = os.path.join(tmp, rel + ".png")
                scene.render.filepath = png
                t1 = time.perf_counter()
                bpy.ops.render.render(write_still=True, scene=scene.name)
                render_s += time.perf_counter() - t1
                if not os.path.isfile(png):
                    raise RuntimeError(f"Blender did not write {png} (render failed)")
                from PIL import Image

                with Image.open(png) as im:
                    clean = np.asarray(im.convert("RGB"))
                photo, jit = jitter_photo(clean, rng)
                Image.fromarray(photo).save(png)
                c2w = np.array(cam_obj.matrix_world, dtype=np.float64)
                frames[split].append({"file_path": f"./{rel}", "transform_matrix": c2w.tolist(), "path_index": k,
                                      "photo": jit})
                t1 = time.perf_counter()
                c2w_cv = ps.opengl_to_opencv(c2w)
                depth, spec = rays.view_maps(K, c2w_cv, (h, w))
                rays_s += time.perf_counter() - t1
                maps.append(ps.ViewMaps(photo.astype(np.float64) / 255.0, depth, K, c2w_cv, spec))
            for split, fr in frames.items():
                meta = {"camera_angle_x": 2.0 * math.atan(w / (2.0 * K[0, 0])), "fl_x": float(K[0, 0]),
                        "fl_y": float(K[1, 1]), "cx": float(K[0, 2]) + 0.5, "cy": float(K[1, 2]) + 0.5, "w": w, "h": h,
                        "frames": fr}
                with open(os.path.join(tmp, f"transforms_{split}.json"), "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=1)
            # point clouds: simulators see the training views only (test views stay unseen)
            train_maps = [maps[k] for k in train_idx]
            t1 = time.perf_counter()
            max_depth = _sim_kwargs(info, path)["max_depth"]
            counts, sim_info = _simulate_points(scene, info, rays, train_maps, seed, max_depth, surface_points,
                                                os.path.join(tmp, "points"))
            # a plain copy: ``tmp`` is atomic_directory's folder, removed whole on any error
            shutil.copyfile(os.path.join(tmp, "points", "surface.ply"), os.path.join(tmp, "points3d.ply"))
            sim_s = time.perf_counter() - t1
            total = time.perf_counter() - t0
            summary = {
                "name": f"env_{seed}", "seed": seed, "kind": info.kind, "views": views,
                "splits": {"train": len(frames["train"]), "test": len(frames["test"])},
                "size": [h, w], "fov_deg": fov, "samples": samples, "denoise": denoise,
                "path": {"kind": path.kind, **{k: v for k, v in path.params.items()}, "cameras_moved_clear": moved},
                "tex_size": tex_size, "surface_points": surface_points, "points": counts, **sim_info,
                "seconds": {"total": total, "render": render_s, "render_per_view": render_s / views, "rays": rays_s,
                            "points": sim_s},
            }
            with open(os.path.join(tmp, "env.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
        finally:
            settings.restore()
            bpy.data.objects.remove(cam_obj)
            bpy.data.cameras.remove(cam_data)
            remove_scene(scene)
    return summary


def env_scene_done(scene_dir: str) -> bool:
    """Whether ``scene_dir`` holds a finished scene: ``env.json`` is written last, and the
    folder only appears complete (``atomic_directory``). The test of the resumable command
    line and of ``bench/gpu_session.py prepare --render-envs``."""
    return os.path.isfile(os.path.join(scene_dir, "env.json"))


def parse_seeds(text: str) -> list[int]:
    """'1-40', '901,902', '1-3,7' -> list of ints."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blender_addon.datagen.environments",
                                description="Render env_<seed> environment scenes (resumable).")
    p.add_argument("--seeds", required=True, help="e.g. 1-40 or 901-904 or 1,5,9")
    p.add_argument("--out", required=True, help="corpus folder; each scene goes to OUT/env_<seed>")
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--size", default="256x256", help="WxH")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--denoise", action="store_true", help="OpenImageDenoise (slow on a busy CPU)")
    p.add_argument("--holdout-every", type=int, default=8)
    p.add_argument("--kind", choices=KINDS, default=None)
    p.add_argument("--path", choices=cp.KINDS, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resimulate-points", action="store_true",
                   help="recompute points/ of finished scenes with the current simulators (no re-rendering)")
    a = p.parse_args(argv)
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must look like 256x256, got {a.size!r}")
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError:
        p.error(f"--seeds must look like 1-40, 901,902 or 1-3,7, got {a.seeds!r}")
    os.makedirs(a.out, exist_ok=True)
    for seed in seeds:
        dst = os.path.join(a.out, f"env_{seed}")
        if a.resimulate_points:
            if env_scene_done(dst):
                print(f"env_{seed}: points {resimulate_points(dst)}", flush=True)
            continue
        if env_scene_done(dst) and not a.overwrite:
            print(f"env_{seed}: done already, skipped", flush=True)
            continue
        s = render_env_scene(seed, dst, a.views, (h, w), samples=a.samples, denoise=a.denoise,
                             holdout_every=a.holdout_every, kind=a.kind, path_kind=a.path, overwrite=True)
        print(f"env_{seed}: {s['kind']} {s['path']['kind']}, {s['views']} views, points {s['points']}, "
              f"{s['seconds']['total']:.0f} s ({s['seconds']['render_per_view']:.2f} s/view render)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
