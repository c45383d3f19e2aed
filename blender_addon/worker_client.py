"""Blender's side of the renderer: a worker subprocess (default) or the same service
in-process. Never imports torch itself in process mode, so a CUDA error, an OOM or a
crash in the network only ends the worker; Blender reports it and restarts it lazily.

Both modes take the requests of ``npbgpp_core.protocol`` and return its replies:
``worker.request(RenderFrame(...))`` gives a ``Frame``; a ``Failure`` raises
:class:`WorkerError`."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from npbgpp_core import protocol as P

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class WorkerError(RuntimeError):
    """The worker answered with an error, died, or could not be started."""


_LOST_JOB = ("the NPBG++ worker stopped after the job began (a render cancelled with Esc, a worker crash, a new or "
             "opened file, or the add-on disabled) and its progress went with it; run it again")


class Cancelled(RuntimeError):
    """The caller asked to stop waiting (Esc during a render)."""


def python_for_worker(env_path: str = "") -> str:
    """The Python that runs the worker: the preferences' environment (a python executable
    or a venv folder), else this interpreter when it can import torch."""
    if env_path:
        path = os.path.abspath(os.path.expanduser(env_path))
        if os.path.isdir(path):
            for rel in ("bin/python3", "bin/python", "Scripts/python.exe", "python.exe", "python3"):
                candidate = os.path.join(path, rel)
                if os.path.isfile(candidate):
                    return candidate
            raise WorkerError(f"no python executable found in the environment folder {path}")
        if os.path.isfile(path):
            return path
        raise WorkerError(f"python environment path does not exist: {path}")
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    raise WorkerError(
        "PyTorch is not available: install it from the add-on preferences (Install PyTorch) "
        "or set the preferences' Python environment to one that has torch"
    )


class ProcessWorker:
    """One worker subprocess, started lazily and reused; requests are serialised."""

    def __init__(self, python: str, extra_paths: list[str] | None = None) -> None:
        self.python = python
        self.extra_paths = list(extra_paths or [])
        self.proc: subprocess.Popen | None = None
        self.conn: Any = None
        self.lock = threading.RLock()
        self.info: Any = None
        self.loaded_key: str | None = None  # content key of the points the worker holds
        self.selection_key: str | None = None  # content key of the bundle point ids it renders
        self.log_path = ""
        self.generation = 0  # counts the processes started: a job's state lives in one of them

    def log_tail(self, chars: int = 400) -> str:
        """The end of the worker's output (tracebacks, CUDA errors), for error messages."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        text = text.strip()
        return text[-chars:] if text else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.conn is not None

    def start(self, timeout: float = 120.0) -> dict:
        from multiprocessing.connection import Listener

        with self.lock:
            if self.alive():
                return self.info
            self.stop()
            self.loaded_key = self.selection_key = None
            authkey = secrets.token_bytes(32)
            listener = Listener(authkey=authkey)
            address = listener.address
            if isinstance(address, tuple):
                address = f"tcp:{address[0]}:{address[1]}"
            env = dict(os.environ)
            if self.extra_paths:
                env["PYTHONPATH"] = os.pathsep.join(self.extra_paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            fd, self.log_path = tempfile.mkstemp(prefix="npbgpp-worker-", suffix=".log")
            try:
                with os.fdopen(fd, "wb") as log:
                    self.proc = subprocess.Popen(
                        [self.python, WORKER_SCRIPT, str(address)], stdin=subprocess.PIPE, env=env,
                        stdout=log, stderr=subprocess.STDOUT,
                    )
                assert self.proc.stdin is not None
                self.proc.stdin.write((authkey.hex() + "\n").encode())
                self.proc.stdin.close()
            except OSError as exc:
                listener.close()
                raise WorkerError(f"cannot start the NPBG++ worker with {self.python}: {exc}") from exc
            accepted: list[Any] = []

            def accept() -> None:
                try:
                    accepted.append(listener.accept())
                except Exception as exc:  # noqa: BLE001
                    accepted.append(exc)

            thread = threading.Thread(target=accept, name="npbgpp-worker-accept", daemon=True)
            thread.start()
            end = time.monotonic() + timeout
            while thread.is_alive() and time.monotonic() < end and self.proc.poll() is None:
                thread.join(0.05)
            if not accepted or isinstance(accepted[0], Exception):
                code = self.proc.poll()
                tail = self.log_tail()
                self.stop()  # the worker is gone: nothing but the wake-up below can connect now
                if thread.is_alive():
                    _wake_listener(listener.address)
                thread.join(5.0)
                listener.close()
                if accepted and not isinstance(accepted[0], Exception):
                    accepted[0].close()  # the dead worker connected just as the wait ended
                why = f"it exited with code {code}" if code is not None else "it did not connect in time"
                raise WorkerError(
                    f"the NPBG++ worker ({self.python}) failed to start: {why}" + (f"\n{tail}" if tail else "")
                )
            listener.close()
            self.conn = accepted[0]
            self.generation += 1
            self.info = self._request(P.Hello(), None)
            return self.info

    def request(
        self, req: P.Request, should_cancel: Callable[[], bool] | None = None, timeout: float = 0.0,
        generation: int | None = None,
    ) -> Any:
        """Send ``req`` and wait for its reply (of type ``req.reply``); WorkerError on a
        failure, a dead worker, a lost connection or no answer within ``timeout`` seconds
        (> 0; the frozen worker is then stopped), :class:`Cancelled` when asked. A stopped
        worker is started again, unless ``generation`` (a job's step) names the process the
        job began in: its state went with it, so WorkerError says so."""
        with self.lock:
            if generation is not None and (not self.alive() or self.generation != generation):
                raise WorkerError(_LOST_JOB)
            if not self.alive():
                self.start()
            return self._request(req, should_cancel, timeout)

    def _request(self, req: P.Request, should_cancel: Callable[[], bool] | None, timeout: float = 0.0) -> Any:
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            self.conn.send(req)
            while not self.conn.poll(0.05):
                if deadline is not None and time.monotonic() > deadline:
                    self.stop(grace=0.0)
                    raise WorkerError(
                        f"the NPBG++ worker did not finish {req.doing} within {timeout:g} s and was "
                        "stopped (it restarts on the next render); raise Worker Timeout in Render Properties > "
                        "NPBG++ > Performance for very large frames, or render smaller"
                    )
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    tail = self.log_tail()
                    self.stop()
                    raise WorkerError(
                        (_killed(req) if _by_sigkill(code) else
                         f"the NPBG++ worker died (exit code {code}); it restarts on the next render")
                        + (f"\n{tail}" if tail else "")
                    )
                if should_cancel is not None and should_cancel():
                    # The answer is still coming: drop the connection rather than mix it up,
                    # and end the worker at once (it would read a Shutdown only after the frame).
                    self.stop(grace=0.0)
                    raise Cancelled("cancelled")
            reply = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            tail = self.log_tail()
            killed = _by_sigkill(self._exit_code(wait=2.0))  # a killed worker's connection ends first
            self.stop()
            lost = _killed(req) if killed else f"lost the NPBG++ worker: {exc}"
            raise WorkerError(lost + (f"\n{tail}" if tail else "")) from exc
        if isinstance(reply, P.SharedFrame):
            reply = reply.with_pixels(_read_shared(reply.shm, tuple(reply.shape)))
        return _checked(req, reply)

    def _exit_code(self, wait: float) -> int | None:
        """The worker's exit status, waiting up to ``wait`` seconds for it to end (None: running)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 2.0) -> None:
        """End the worker: ask it to shut down (``grace`` seconds), then kill it."""
        with self.lock:
            if self.conn is not None:
                try:
                    if self.proc is not None and self.proc.poll() is None and grace > 0:
                        self.conn.send(P.Shutdown())
                        if self.conn.poll(grace):
                            self.conn.recv()
                except Exception:  # noqa: BLE001 - best effort
                    pass
                try:
                    self.conn.close()
                except Exception:  # noqa: BLE001
                    pass
                self.conn = None
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=3.0 if grace > 0 else 0.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    try:
                        self.proc.wait(timeout=3.0)
                    except subprocess.TimeoutExpired:
                        pass  # killed; a slow teardown (e.g. CUDA) must not turn a cancel into an error
                self.proc = None
            if self.log_path:
                try:
                    os.remove(self.log_path)
                except OSError:
                    pass
                self.log_path = ""


def _wake_listener(address: Any) -> None:
    """Connect to a listener and hang up at once, so that a thread blocked in its accept()
    returns (its handshake then fails): closing a listening socket does not wake such a
    thread on Linux, and a worker that failed to start would leave it blocked for good."""
    from multiprocessing import connection

    try:
        if connection.address_type(address) == "AF_PIPE":
            client = connection.PipeClient(address)  # type: ignore[attr-defined]  # Windows only
        else:
            client = connection.SocketClient(address)  # type: ignore[attr-defined]
        client.close()
    except OSError:
        pass  # nothing listens any more: no thread is waiting either


def _by_sigkill(code: int | None) -> bool:
    """Whether an exit status is a SIGKILL's (POSIX), which nothing of the worker's own sends:
    on Linux most often the kernel's out-of-memory killer (the add-on's own stops are not
    reported as deaths)."""
    kill = getattr(signal, "SIGKILL", None)
    return kill is not None and code == -kill


def _killed(req: P.Request) -> str:
    """What a worker killed while answering ``req`` tells the user: out of memory, most likely."""
    return (f"the NPBG++ worker was killed (SIGKILL) while {req.doing}: most often by the system's out-of-memory "
            "killer, when the job needs more memory than this computer has (photos, points or a frame too large "
            "for it; on Linux the system log says so: journalctl -k or dmesg); it restarts on the next render")


def _checked(req: P.Request, reply: Any) -> Any:
    if isinstance(reply, P.Failure):
        raise WorkerError(reply.error)
    if not isinstance(reply, req.reply):
        raise WorkerError(f"the NPBG++ worker answered {type(req).__name__} with {type(reply).__name__}")
    return reply


def _read_shared(name: str, shape: tuple[int, ...]) -> np.ndarray:
    from multiprocessing import resource_tracker, shared_memory

    shm = shared_memory.SharedMemory(name=name)
    try:
        # Python < 3.13 registers attached blocks too; the worker owns and unlinks it.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    try:
        return np.ndarray(shape, dtype=np.float32, buffer=shm.buf).copy()
    finally:
        shm.close()


class InProcessWorker:
    """The same service in Blender's own process (needs torch importable here)."""

    def __init__(self) -> None:
        from npbgpp_core.service import RenderService

        self.service = RenderService()
        self.lock = threading.RLock()
        self.info: Any = None
        self.loaded_key: str | None = None
        self.selection_key: str | None = None

    def alive(self) -> bool:
        return True

    def start(self) -> Any:
        self.info = self.request(P.Hello())
        return self.info

    generation = 1  # the service lives as long as this object

    def request(
        self, req: P.Request, should_cancel: Callable[[], bool] | None = None, timeout: float = 0.0,
        generation: int | None = None,
    ) -> Any:
        """As :meth:`ProcessWorker.request`; nothing can interrupt work in this process,
        so ``should_cancel`` and ``timeout`` are not used, and its jobs outlive a stop."""
        with self.lock:
            return _checked(req, self.service.handle(req))

    def stop(self, grace: float = 2.0) -> None:
        pass


class WorkerHub:
    """The add-on's one renderer connection: chooses the mode, remembers what was sent."""

    def __init__(self) -> None:
        self.worker: ProcessWorker | InProcessWorker | None = None
        self.mode: Any = ""
        self.lock = threading.RLock()

    def get(self, mode: str, env_path: str, extra_paths: list[str]) -> ProcessWorker | InProcessWorker:
        with self.lock:
            python = python_for_worker(env_path) if mode == "PROCESS" else ""
            wanted = (mode, python, tuple(extra_paths))
            if self.worker is None or self.mode != wanted:
                self.shutdown()
                self.worker = ProcessWorker(python, extra_paths) if mode == "PROCESS" else InProcessWorker()
                self.mode = wanted
            return self.worker

    def shutdown(self) -> None:
        with self.lock:
            if self.worker is not None:
                self.worker.stop()
            self.worker = None
            self.mode = ""


HUB = WorkerHub()
