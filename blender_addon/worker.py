"""The NPBG++ renderer's process: transport only. The renderer itself is
``npbgpp_core.service.RenderService``; requests and replies are the dataclasses of
``npbgpp_core.protocol``.

Run as a script (``python .../worker.py ADDRESS``, the add-on folder works installed or
from the repository) or ``python -m blender_addon.worker ADDRESS``; the auth key comes
on stdin as hex. It connects back to Blender over ``multiprocessing.connection``,
answers each request with the service's reply and leaves frames in shared memory
(:class:`~npbgpp_core.protocol.SharedFrame`) instead of pickling them. A failing request
is answered with a ``Failure`` and the worker keeps serving; a crash of this process
never takes Blender down. This file never imports bpy.
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

from typing import Any

import numpy as np


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


def serve(address: Any, authkey: bytes) -> None:
    from multiprocessing.connection import Client

    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService

    conn = Client(address, authkey=authkey)
    service = RenderService()
    frames = _FrameBuffer()
    try:
        while True:
            try:
                req = conn.recv()
            except (EOFError, OSError):
                break
            reply = service.handle(req)
            if isinstance(reply, P.Frame):
                pixels = np.ascontiguousarray(reply.pixels, dtype=np.float32)
                reply = P.SharedFrame.of(reply, frames.put(pixels))
            conn.send(reply)
            if isinstance(req, P.Shutdown):
                break
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
