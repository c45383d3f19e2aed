"""The NPBG++ renderer that runs outside Blender (or inside it, in-process mode).

Run as a script (``python .../worker.py ADDRESS``, the add-on folder works installed or
from the repository) or ``python -m blender_addon.worker ADDRESS``; the auth key comes
on stdin as hex. It connects back to Blender over ``multiprocessing.connection`` and
answers requests (dicts with an ``op``):

- ``hello`` -> torch version and devices
- ``set_points`` (``points`` (N, 3) float32 world, ``colors`` (N, 3) display sRGB or None)
- ``load_bundle`` (``path``, ``device``, ``precision``)
- ``render`` (``camera`` a Camera state dict, ``source`` 'points' or 'bundle', ``neural``
  bool) -> a float32 (H, W, 8) frame in shared memory, rows top-down: channels 0-2 neural
  sRGB, 3-6 point colours sRGB + alpha, 7 view depth (``inf`` where empty).
- ``shutdown``

This file never imports bpy. A failing request is answered ``{"ok": False, "error": ...}``
and the worker keeps serving; a crash of this process never takes Blender down.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # script mode: find npbgpp_core (vendored in the zip, or the repository)
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
        sys.path.pop(0)  # the add-on's own modules must not shadow anything
    for _candidate in (os.path.join(_here, "vendor"), os.path.dirname(_here)):
        if os.path.isdir(os.path.join(_candidate, "npbgpp_core")):
            sys.path.insert(0, _candidate)
            break

import traceback
from typing import Any

import numpy as np

FRAME_CHANNELS = 8


class _LazyDtypes:
    """precision name -> torch dtype (torch imported on first use)."""

    def get(self, name: str) -> Any:
        import torch

        return {"FP16": torch.float16, "BF16": torch.bfloat16}.get(name)


_DTYPES = _LazyDtypes()
NEURAL = slice(0, 3)
POINTS_RGBA = slice(3, 7)
DEPTH = 7


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


class RenderService:
    """Holds the scene (points or a NeuralScene bundle) and renders cameras."""

    def __init__(self) -> None:
        self.points = None  # torch (N, 3) float32
        self.colors = None  # torch (N, 3) sRGB
        self.bundle_path: str | None = None
        self.bundle_key: tuple | None = None
        self.bundle = None
        self.renderer = None
        self.device = "cpu"
        self.precision = "FP32"
        self.aggregation: Any = None

    # ------------------------------------------------------------------ scene
    def set_points(self, points: np.ndarray, colors: np.ndarray | None) -> int:
        import torch

        pts = np.ascontiguousarray(points, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {pts.shape}")
        self.points = torch.from_numpy(pts.copy())
        if colors is None:
            self.colors = torch.full((len(pts), 3), 0.8)
        else:
            col = np.ascontiguousarray(colors, dtype=np.float32)
            if col.shape != pts.shape:
                raise ValueError(f"colors must be {pts.shape}, got {col.shape}")
            self.colors = torch.from_numpy(col.copy())
        return len(pts)

    def load_bundle(self, path: str, device: str = "AUTO", precision: str = "FP32") -> dict:
        """Load a NeuralScene file (cached by path, size and mtime)."""
        if not path:
            raise ValueError("no NeuralScene bundle set (Render Properties > NPBG++ > Bundle)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NeuralScene bundle not found: {path}")
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, device, precision)
        if key != self.bundle_key:
            self.bundle = None
            self.renderer = None
            dev = pick_device(device)
            try:
                from npbgpp_core.scene import NeuralScene

                bundle = NeuralScene.load(path)
            except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
                raise ValueError(f"cannot read NeuralScene bundle {path}: {type(exc).__name__}: {exc}") from exc
            self.bundle = bundle
            self.renderer = bundle.renderer(dev, dtype=_DTYPES.get(precision))
            self.device = dev
            self.precision = precision
            self.bundle_key = key
        return {"points": int(len(self.bundle.points)), "device": self.device}

    def bundle_points(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.bundle is None:
            raise RuntimeError("no bundle loaded")
        import torch

        pts = torch.as_tensor(self.bundle.points).detach().float().cpu().numpy()
        col = getattr(self.bundle, "colors", None)
        col = None if col is None else torch.as_tensor(col).detach().float().cpu().numpy()
        return pts, col

    # ----------------------------------------------------------------- render
    def render(self, camera_state: dict, source: str = "points", neural: bool = False) -> np.ndarray:
        """(H, W, 8) float32 frame, rows top-down (see module doc)."""
        import torch

        from npbgpp_core import Camera
        from npbgpp_core.rasterizer import keys_to_depth, keys_to_index, rasterize_keys

        camera = Camera.from_state_dict(camera_state)
        h, w = camera.image_size
        frame = np.zeros((h, w, FRAME_CHANNELS), dtype=np.float32)
        if source == "bundle":
            if self.bundle is None:
                raise RuntimeError("no NeuralScene bundle loaded")
            pts, col = self.bundle_points()
            points = torch.from_numpy(pts)
            colors = torch.from_numpy(col) if col is not None else torch.full((len(pts), 3), 0.8)
        else:
            if self.points is None:
                raise RuntimeError("no points set")
            points, colors = self.points, self.colors
        keys = rasterize_keys(points, camera, scales=(1.0,))[0]
        index = keys_to_index(keys)
        depth = keys_to_depth(keys)
        hit = index >= 0
        rgb = torch.zeros(h, w, 3)
        if points.shape[0]:
            rgb[hit] = colors[index[hit]].float()
        frame[..., 3:6] = rgb.numpy()
        frame[..., 6] = hit.float().numpy()
        frame[..., DEPTH] = depth.numpy()
        if neural:
            if self.renderer is None:
                raise RuntimeError("neural output needs a NeuralScene bundle (set one in Render Properties > NPBG++)")
            frame[..., NEURAL] = self._neural(camera)
        return frame

    def _neural(self, camera: Any) -> np.ndarray:
        import torch

        cam = camera.to(self.device)
        with torch.inference_mode():
            img = self.renderer.render(cam)
        img = img.detach().float().clamp(0, 1).cpu()
        if img.shape[0] != 3:
            img = img[:3]
        return img.permute(1, 2, 0).contiguous().numpy()


def load_weights(path: str) -> tuple[dict, dict]:
    """(model config dict, state dict) from a NeuralScene bundle, a safetensors file (config
    as JSON in its metadata "config") or a torch checkpoint ({"state_dict"|"model", "config"})."""
    import json

    import torch

    if not path:
        raise ValueError("no NPBG++ weights set (Render Properties > NPBG++ > Weights)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NPBG++ weights not found: {path}")
    try:
        from npbgpp_core.scene import NeuralScene

        bundle = NeuralScene.load(path)
        return dict(bundle.model_config or {}), dict(bundle.model_state or {})
    except Exception:  # noqa: BLE001 - not a bundle: try the other formats
        pass
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - any parse failure: a damaged file
            raise ValueError(f"cannot read NPBG++ weights {path} (corrupt or not safetensors): {exc}") from exc
        if meta.get("format") == "npbgpp-weights":  # a bundled / exported weights file (fp16 -> fp32)
            from npbgpp_core.pretrained import read_weights

            wf = read_weights(path, "npbgpp")
            return wf.config, wf.state
        return json.loads(meta.get("config", "{}")), load_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read NPBG++ weights {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"NPBG++ weights {path} hold a {type(ckpt).__name__}, not a state dict")
    config = ckpt.get("config") or ckpt.get("model_config") or {}
    state = ckpt.get("state_dict") or ckpt.get("model") or ckpt
    prefix = "model."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(config), dict(state)


class Aggregation:
    """NPBG++ descriptors of a dataset's points, streamed view by view."""

    def __init__(
        self, path: str, fmt: str | None, weights: str, device: str, max_points: int, up_axis: str = "AUTO"
    ) -> None:
        import torch

        from npbgpp_core.datasets import load_scene
        from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig
        from npbgpp_core.models.alignment import resolve_world_up

        config, state = load_weights(weights)
        self.device = pick_device(device)
        self.data = load_scene(path, format=fmt)
        self.views = list(self.data.train) or list(range(len(self.data.views)))
        # The scene's up axis for in-plane alignment: the bundle stores it in its config,
        # so rendering later rolls target views by the same rule as these input views.
        world_up = resolve_world_up(up_axis, [self.data.views[i].camera for i in self.views])
        config = {**(config or {}), "world_up": list(world_up)}
        self.model = NPBGPlusPlus(NPBGPlusPlusConfig.from_dict(config))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"weights {weights} miss {len(missing)} parameters, e.g. {missing[:3]}")
        self.model.to(self.device).eval()
        if max_points:
            self.data = self.data.subsample_points(max_points)
        points = torch.as_tensor(np.asarray(self.data.points, np.float32), device=self.device)
        with torch.no_grad():
            self.state = self.model.begin_scene(points)

    def add(self, k: int) -> None:
        import torch

        i = self.views[k]
        image = self.data.load_image(i).to(self.device)
        with torch.no_grad():
            self.state.add_views(image[None], [self.data.views[i].camera.to(self.device)])

    def finish(self, out: str) -> dict:
        import torch

        from npbgpp_core.scene import NeuralScene

        with torch.no_grad():
            agg = self.state.finish()
        colors = None if self.data.colors is None else torch.from_numpy(np.asarray(self.data.colors, np.float32))
        scene = NeuralScene.from_aggregated(
            self.model, agg, colors, name=self.data.name,
            metadata={"dataset": str(self.data.root), "views": len(self.views)},
        )
        scene.save(out)
        return {"path": out, "points": int(agg.points.shape[0]), "valid": int(agg.valid.sum()),
                "world_up": list(self.model.config.world_up)}


def load_dataset(path: str, fmt: str | None, max_points: int) -> dict:
    from npbgpp_core.datasets import load_scene

    data = load_scene(path, format=fmt)
    if max_points:
        data = data.subsample_points(max_points)
    views = []
    for v in data.views:
        K, R, t = v.camera.to_opencv()
        views.append({"name": v.name, "image_path": str(v.image_path), "K": K, "R": R, "t": t,
                      "size": list(v.camera.image_size)})
    colors = None if data.colors is None else np.asarray(data.colors, np.float32)
    return {"name": data.name, "format": data.format, "points": np.asarray(data.points, np.float32),
            "colors": colors, "views": views}


def torch_info() -> dict:
    import torch

    devices = ["CPU"]
    if torch.cuda.is_available():
        devices.insert(0, "CUDA")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.insert(0, "MPS")
    return {"torch": torch.__version__, "devices": devices, "python": sys.executable}


class _FrameBuffer:
    """One shared-memory block, grown as needed; the client copies out of it."""

    def __init__(self) -> None:
        self.shm = None

    def put(self, frame: np.ndarray) -> str:
        from multiprocessing import shared_memory

        if self.shm is None or self.shm.size < frame.nbytes:
            self.close()
            self.shm = shared_memory.SharedMemory(create=True, size=max(frame.nbytes, 1))
        view = np.ndarray(frame.shape, dtype=np.float32, buffer=self.shm.buf)
        view[...] = frame
        del view
        return self.shm.name

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            self.shm = None


def handle(service: RenderService, msg: dict, frames: _FrameBuffer | None) -> dict:
    """Answer one request (also used directly by the in-process mode with ``frames=None``)."""
    op = msg.get("op")
    if op == "hello":
        return {"ok": True, **torch_info()}
    if op == "set_points":
        return {"ok": True, "count": service.set_points(msg["points"], msg.get("colors"))}
    if op == "load_bundle":
        return {"ok": True, **service.load_bundle(msg["path"], msg.get("device", "AUTO"), msg.get("precision", "FP32"))}
    if op == "bundle_points":
        pts, col = service.bundle_points()
        return {"ok": True, "points": pts, "colors": col}
    if op == "dataset":
        return {"ok": True, **load_dataset(msg["path"], msg.get("format"), int(msg.get("max_points", 0)))}
    if op == "aggregate_begin":
        service.aggregation = Aggregation(
            msg["path"], msg.get("format"), msg["weights"], msg.get("device", "AUTO"), int(msg.get("max_points", 0)),
            msg.get("up_axis", "AUTO"),
        )
        agg = service.aggregation
        return {"ok": True, "views": len(agg.views), "world_up": list(agg.model.config.world_up)}
    if op == "aggregate_view":
        service.aggregation.add(int(msg["index"]))
        return {"ok": True}
    if op == "aggregate_finish":
        agg, service.aggregation = service.aggregation, None
        return {"ok": True, **agg.finish(msg["out"])}
    if op == "render":
        frame = service.render(msg["camera"], msg.get("source", "points"), bool(msg.get("neural")))
        if frames is None:
            return {"ok": True, "frame": frame}
        return {"ok": True, "shm": frames.put(frame), "shape": frame.shape}
    raise ValueError(f"unknown request {op!r}")


def serve(address: Any, authkey: bytes) -> None:
    from multiprocessing.connection import Client

    conn = Client(address, authkey=authkey)
    service = RenderService()
    frames = _FrameBuffer()
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg.get("op") == "shutdown":
                conn.send({"ok": True})
                break
            try:
                reply = handle(service, msg, frames)
            except Exception as exc:  # noqa: BLE001 - report every failure to Blender
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            conn.send(reply)
    finally:
        frames.close()
        conn.close()


def _leave_a_core_for_blender() -> None:
    """Use all cores but one: Blender's UI runs beside the worker, and oversubscribed
    torch threads made frames up to 5x slower on a 2-core machine."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: worker.py ADDRESS  (auth key as hex on stdin)", file=sys.stderr)
        return 2
    address: Any = argv[0]
    if address.startswith("tcp:"):
        host, port = address[4:].rsplit(":", 1)
        address = (host, int(port))
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    _leave_a_core_for_blender()
    serve(address, authkey)
    return 0


if __name__ == "__main__":
    sys.exit(main())
