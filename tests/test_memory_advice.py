"""Running out of memory reaches the user as out of memory, with advice that fits the job and the
device: a bundle or a cloud too big for this computer is never called a corrupt file, and no
advice moves a job that already runs on the CPU to the CPU (issue #11)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch
from test_bundle_checks import _npbgpp_bundle

from npbgpp_core import Camera
from npbgpp_core import protocol as P
from npbgpp_core import service as service_module
from npbgpp_core.scene import NeuralScene
from npbgpp_core.service import RenderService

GPU_HINT = ", or switch Device to CPU when the GPU is the one that is full"


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _npbgpp_bundle(str(tmp_path_factory.mktemp("oom") / "big.npbgpp"))


def _size(path: str) -> str:
    """The bundle's size and points as the advice writes them (its weights make it over 1 MB)."""
    return f" ({os.path.getsize(path) / 1e6:.1f} MB, 20 points)"


def _advice(path: str, first: str, device: str = "cpu", size: str = "") -> str:
    return (f"out of memory on {device} while loading the bundle {path}{size} ({first}). Loading a bundle takes "
            "about 4 times its file's size in memory: aggregate fewer points (Aggregate Descriptors' Max Points, or "
            "a smaller point cloud) or load it on a computer with more memory" + ("" if device == "cpu" else GPU_HINT))


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9GiB")])
def test_a_bundle_too_big_to_load_is_out_of_memory_not_corrupt(bundle, monkeypatch, error):
    """Decoding the tensors runs out of memory: NeuralScene.load raises that error itself (it was
    a ValueError 'corrupt or truncated'), and LoadBundle names the bundle's size and points (hand
    counted: the file's bytes in MB, the 20 points it was saved with) and what makes it smaller."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load", _raise(error))
    with pytest.raises(type(error)):
        NeuralScene.load(bundle)
    reply = RenderService().handle(P.LoadBundle(bundle, "CPU"))
    assert isinstance(reply, P.Failure)
    first = str(error) or type(error).__name__
    assert reply.error == _advice(bundle, first, size=_size(bundle))
    assert "corrupt" not in reply.error.lower()
    monkeypatch.undo()
    assert RenderService().handle(P.LoadBundle(bundle, "CPU")) == P.BundleInfo(20, "cpu")


def test_out_of_memory_reading_a_bundles_header_leaves_the_size_out(bundle, monkeypatch):
    """The header itself too big to decode: not 'corrupt (unreadable header)', and the advice,
    which reads the header for the point count, goes without the size instead of failing."""
    from npbgpp_core import bundle_file

    monkeypatch.setattr(bundle_file, "json", types.SimpleNamespace(loads=_raise(MemoryError())))
    with pytest.raises(MemoryError):
        bundle_file.read_points(bundle)
    reply = RenderService().handle(P.LoadBundle(bundle, "CPU"))
    assert isinstance(reply, P.Failure) and reply.error == _advice(bundle, "MemoryError")


def test_out_of_memory_building_the_renderer_names_the_requested_device(bundle, monkeypatch):
    """The renderer's copy on a GPU runs out of memory: the device asked for (no renderer is
    loaded yet, which made it 'cpu'), the load's advice (it was 'while LoadBundle'), and the
    way to the CPU."""
    monkeypatch.setattr(service_module, "pick_device", lambda name: "cuda")
    monkeypatch.setattr(NeuralScene, "renderer", _raise(torch.OutOfMemoryError("CUDA out of memory.")))
    reply = RenderService().handle(P.LoadBundle(bundle, "CUDA"))
    assert isinstance(reply, P.Failure)
    assert reply.error == _advice(bundle, "CUDA out of memory.", "cuda", _size(bundle))


def test_out_of_memory_reading_a_ply_is_not_an_unreadable_file(tmp_path, monkeypatch):
    """A PLY cloud too big for memory: the reader raises the MemoryError (it was 'not a readable
    PLY file'); a damaged file is still called unreadable."""
    import plyfile

    from npbgpp_core.ply import load_ply, save_ply

    path = str(tmp_path / "cloud.ply")
    save_ply(path, np.zeros((4, 3), np.float32))
    monkeypatch.setattr(plyfile.PlyData, "read", _raise(MemoryError("Unable to allocate 9.0 GiB")))
    with pytest.raises(MemoryError, match="9.0 GiB"):
        load_ply(path)
    monkeypatch.setattr(plyfile.PlyData, "read", _raise(RuntimeError("bad element")))
    with pytest.raises(ValueError, match="not a readable PLY file"):
        load_ply(path)


def _frame(service: RenderService, size: tuple[int, int] = (30, 40), **options) -> P.Reply:
    spec = P.CameraSpec.from_camera(Camera.look_at((0, -4, 1), (0, 0, 0), (0, 0, 1), 50.0, size))
    return service.handle(P.RenderFrame(spec, **options))


def test_out_of_memory_rendering_advises_by_frame_and_device(bundle, monkeypatch):
    """A frame's advice: fewer pixels always; a neural frame's Tile Size too (the network's memory
    follows the tile), below the tiles' side or, for a frame not tiled, below the frame's (hand
    computed: a 1920x1080 frame is 1440^2 pixels, within the default Tile Size's 2048^2, so a Tile
    Size of 1500 would change nothing; it said 'below 2048'), none where no smaller tile can be set
    (a 300x200 frame: below 272, the smallest); FP16 and the CPU only on a GPU (on the CPU the frame
    said 'switch Device to CPU' and 'FP16 on a GPU' as well). The failure comes before any pixel."""
    service = RenderService()
    assert service.handle(P.LoadBundle(bundle, "CPU")) == P.BundleInfo(20, "cpu")
    oom = _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB"))
    monkeypatch.setattr(service.renderer, "render_point_layers", oom)
    start = "out of memory on {} while rendering {} pixels (CUDA out of memory. Tried to allocate 15.00 GiB). "
    fewer = "Render fewer pixels (Output > Resolution %)"
    tiles = "set a Tile Size below {} in Render Properties > NPBG++ > Performance"
    big, hd, small = (3000, 4000), (1080, 1920), (200, 300)

    failed = _frame(service, big, source="bundle", neural=True, max_pixels=2048 * 2048)  # tiled
    assert failed.error == start.format("cpu", "4000x3000") + f"{fewer} or {tiles.format(2048)}"
    for tile in (2048, 0):
        failed = _frame(service, hd, source="bundle", neural=True, max_pixels=tile * tile)  # not tiled
        assert failed.error == start.format("cpu", "1920x1080") + f"{fewer} or {tiles.format(1440)}"
    failed = _frame(service, small, source="bundle", neural=True, max_pixels=2048 * 2048)
    assert failed.error == start.format("cpu", "300x200") + fewer
    failed = _frame(service, hd, source="bundle")  # points only: no network, no tiles
    assert failed.error == start.format("cpu", "1920x1080") + fewer

    service.device = "cuda"  # the bundle's renderer on a GPU
    failed = _frame(service, big, source="bundle", neural=True, max_pixels=2048 * 2048)
    assert failed.error == (start.format("cuda", "4000x3000") + f"{fewer}, {tiles.format(2048)}, choose FP16 "
                            "precision" + GPU_HINT)
    failed = _frame(service, hd, source="bundle")
    assert failed.error == start.format("cuda", "1920x1080") + f"{fewer}, choose FP16 precision" + GPU_HINT
    service.device = "cpu"
    monkeypatch.undo()
    assert isinstance(_frame(service, source="bundle", neural=True), P.Frame)  # the service goes on


@pytest.mark.parametrize("body", [
    "format ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    "0 0 0\n",
    "format binary_little_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\n"
    "element face {n}\nproperty list uchar int vertex_indices\nend_header\n" + "\0" * 13,
], ids=["ascii", "binary with a list"])
def test_a_ply_header_counting_more_rows_than_the_file_holds_is_damaged_not_big(tmp_path, monkeypatch, body):
    """plyfile allocates the rows a header counts before reading an ASCII file or a binary one
    with list properties: a header counting 10^11 rows in a file of a few bytes runs it out of
    memory (1.09 TiB), yet the file is damaged, not too big; the reader says so, with the
    header's count and the file's size (hand counted: 2 bytes an ASCII value at the least, the
    list's 1-byte length in binary). A real read here, and one whose failure is forced."""
    import plyfile

    from npbgpp_core.ply import load_ply

    path = tmp_path / "cloud.ply"
    path.write_bytes(("ply\n" + body.format(n=10**11)).encode("ascii"))
    fewest = "600,000,000,000" if "ascii" in body else "100,000,000,012"
    damaged = rf"not a readable PLY file \(its header counts .*100,000,000,000 .*at least {fewest} bytes of data, " \
              rf"but the file has {path.stat().st_size} bytes; fix the element counts in the header\)"
    with pytest.raises(ValueError, match=damaged):
        load_ply(str(path))
    monkeypatch.setattr(plyfile.PlyData, "read", _raise(MemoryError("Unable to allocate 1.09 TiB")))
    with pytest.raises(ValueError, match=damaged):
        load_ply(str(path))
