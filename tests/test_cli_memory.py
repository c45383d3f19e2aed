"""The headless commands out of memory: one line through the command's own exit path (exit 2,
``error: ...``) saying what ran out (the computer's memory or the GPU's), during which step and
what to do in the command's own options, nothing written; no MemoryError / OutOfMemoryError
traceback. The failures are injected into the step that reads or computes (a real one would
need gigabytes)."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import tiny_scene_and_bundle  # noqa: E402

from headless_train import oom  # noqa: E402

HOST_OOM = "Unable to allocate 90.9 TiB for an array with shape (100000000000000,) and data type uint8"


@pytest.fixture(scope="module")
def scene_and_bundle(tmp_path_factory):
    return tiny_scene_and_bundle(str(tmp_path_factory.mktemp("cli_memory")), views=3, splits=(3, 0, 0))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("step ", "\r", "frame "))]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_export_out_of_memory_reading_a_view_names_it_and_max_side(scene_and_bundle, tmp_path, monkeypatch,
                                                                     capsys):
    """numpy's MemoryError while the second view is read: the view, its size, --max-side below
    that size and --max-points with the cloud's count; no bundle written."""
    from headless_train.export import main as export_main
    from npbgpp_core.datasets.scene_data import SceneData
    from npbgpp_core.pretrained import default_weights_path

    folder, _ = scene_and_bundle
    real = SceneData.load_image
    calls = []

    def load_image(self, i, size=None):
        calls.append(i)
        if len(calls) == 2:
            raise MemoryError(HOST_OOM)
        return real(self, i, size)

    monkeypatch.setattr(SceneData, "load_image", load_image)
    out = str(tmp_path / "b.npbgpp")
    capsys.readouterr()
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", out, "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("error: out of host memory (RAM) while aggregating view 2 of 3 (images/r_1) at 24x24 px "
                    f"({HOST_OOM}). Read the views smaller with --max-side (below 24, the long side they are read at "
                    "now) or aggregate fewer points with --max-points (the cloud has 300)"), line
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
    # with --max-side the advice asks for less than that
    calls.clear()
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", out, "--device", "cpu", "--max-side", "20", "--max-points", "200"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "at 20x20 px" in line and "--max-side (below 20," in line and "(the cloud has 200)" in line, line
    # at the least --max-side takes (AGGREGATE_MIN_SIDE, 16) it cannot go lower: fewer points only
    calls.clear()
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", out, "--device", "cpu", "--max-side", "16"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.endswith(f"at 16x16 px ({HOST_OOM}). Aggregate fewer points with --max-points (the cloud has "
                         "300)"), line


def test_export_out_of_memory_after_reading_the_scene_has_not_the_reading_s_advice(scene_and_bundle, tmp_path,
                                                                                      monkeypatch, capsys):
    """A step after the scene is read (building the network) is not 'reading the scene' and does
    not advise another cloud (--pc-name)."""
    from headless_train.export import main as export_main
    from npbgpp_core import pretrained

    folder, _ = scene_and_bundle

    def build_network(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(pretrained, "build_network", build_network)
    out = str(tmp_path / "b.npbgpp")
    assert export_main(["--checkpoint", pretrained.default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", out, "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("error: out of host memory (RAM) while preparing the export of 300 points (MemoryError). Run it "
                    "on a computer with more memory"), line
    assert os.listdir(tmp_path) == []


def test_fit_out_of_memory_while_fitting_names_the_step_and_a_copy_with_smaller_photos(scene_and_bundle, tmp_path,
                                                                                       monkeypatch, capsys):
    from headless_train.fit import main as fit_main
    from npbgpp_core import scene_fit

    folder, bundle = scene_and_bundle
    real = scene_fit.BundleFit.step

    def step(self):
        if self.done == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 10000000000000 bytes.\nError code 12")
        return real(self)

    monkeypatch.setattr(scene_fit.BundleFit, "step", step)
    out = str(tmp_path / "fitted.npbgpp")
    assert fit_main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "3", "--device", "cpu",
                     "--no-check-view"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith("error: out of host memory (RAM) while fitting, step 1/3 ([enforce fail at "
                           "alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 10000000000000 bytes.). The fit holds every training photo at its own size "
                           "(the largest here is 24x24 px; about 4 GiB to fit"), line
    assert "prepare-capture SRC --out DST --max-size 2048), export a bundle of it and fit that one" in line
    assert "--device cpu" not in line  # the host's memory: no GPU to leave
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_render_out_of_memory_names_the_frame_size_and_leaves_no_folder(scene_and_bundle, tmp_path, monkeypatch,
                                                                        capsys):
    from headless_train.render import main as render_main
    from npbgpp_core.scene import SceneRenderer

    folder, bundle = scene_and_bundle
    real = SceneRenderer.render
    calls = []

    def render(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SceneRenderer, "render", render)
    out = str(tmp_path / "frames")
    assert render_main(["--bundle", bundle, "--scene", folder, "--out", out, "--device", "cpu",
                        "--max-side", "20"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("error: out of host memory (RAM) while rendering frame 2 of 3 at 20x20 px (MemoryError). "
                    "Render smaller frames with --max-side (below 20, their long side now)"), line
    assert os.listdir(tmp_path) == []  # neither the folder nor its partial one


def test_render_out_of_memory_loading_the_bundle_names_its_size(scene_and_bundle, tmp_path, monkeypatch, capsys):
    from headless_train.render import main as render_main
    from npbgpp_core import scene as scene_module

    folder, bundle = scene_and_bundle

    def load(path):
        raise MemoryError(HOST_OOM)

    monkeypatch.setattr(scene_module.NeuralScene, "load", staticmethod(load))
    assert render_main(["--bundle", bundle, "--scene", folder, "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    size = os.path.getsize(bundle)  # the add-on's worker's formatting (other_clouds.size_text): MB, one decimal
    assert size >= 1_000_000, size
    assert line == (f"error: out of host memory (RAM) while loading the bundle {bundle} ({HOST_OOM}). Loading a "
                    f"bundle takes about 4 times its file's size ({size / 1e6:.1f} MB) in memory: export one of "
                    "fewer points (export --max-points)"), line


def _no_memory(*args, **kwargs):
    raise MemoryError(HOST_OOM)


@pytest.mark.parametrize("command", ["export-weights", "average-weights", "capture-sfm"])
def test_the_weights_and_sfm_commands_out_of_memory_are_one_line_and_with_debug_the_error(command, tmp_path,
                                                                                           monkeypatch, capsys):
    """export-weights, average-weights and capture-sfm out of memory (injected where they read):
    one line naming the step and what to do, exit 2, nothing written (oom.run_command; they
    raised the MemoryError before); --debug raises it."""
    from headless_train import capture_sfm, checkpoints, export_weights
    from npbgpp_core import pretrained

    more = "Run it on a computer with more memory"  # they have no advice of their own

    monkeypatch.chdir(tmp_path)
    if command == "export-weights":
        monkeypatch.setattr(checkpoints, "load_checkpoint_file", lambda path: {})
        monkeypatch.setattr(export_weights, "weights_from_checkpoint", _no_memory)
        main, argv = export_weights.main, ["--checkpoint", "last.ckpt", "--out", "w.safetensors"]
        line = f"error: out of host memory (RAM) while exporting the weights of last.ckpt ({HOST_OOM}). {more}"
    elif command == "average-weights":
        from headless_train import average_weights

        monkeypatch.setattr(pretrained, "read_weights", _no_memory)
        main, argv = average_weights.main, ["--out", "m.safetensors", "a.safetensors", "b.safetensors"]
        line = f"error: out of host memory (RAM) while averaging 2 weights files ({HOST_OOM}). {more}"
    else:
        monkeypatch.setattr(capture_sfm, "capture_sfm", _no_memory)
        main, argv = capture_sfm.main, ["photos", "model"]
        line = (f"capture-sfm: out of host memory (RAM) while recovering a model from the photos of photos "
                f"({HOST_OOM}). Lower --max-side or use fewer photos (--every), or r{more[1:]}")
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(MemoryError, match="Unable to allocate"):
        main(argv + ["--debug"])
    assert os.listdir(tmp_path) == []


def test_a_gpu_that_is_full_is_named_and_the_cpu_advised():
    """torch's CUDA OutOfMemoryError (several lines): the GPU's memory, its first line, the
    step's advice and the command's way to the CPU; the CPU allocator's failure and a
    MemoryError are the computer's memory, without it."""
    oom.reset()
    oom.step("rendering frame 1 of 2 at 4000x3000 px", "render smaller frames with --max-side (below 4000, ...)")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                  "8 GiB\nOf the allocated memory ...")
    assert oom.memory_error(cuda, "cuda") == (
        "out of GPU memory (cuda) while rendering frame 1 of 2 at 4000x3000 px (CUDA out of memory. Tried to "
        "allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB). Render smaller frames with --max-side (below "
        "4000, ...), or --device cpu when the GPU is the one that is full")
    assert oom.memory_error(cuda, "cuda", "trainer.gpus=0").endswith(", or trainer.gpus=0 when the GPU is the one "
                                                                     "that is full")
    # a GPU's failure reported as a RuntimeError: a CUDA call's, Apple's MPS allocator's
    for exc, device in ((RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."), "cuda"),
                        (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 "
                                      "GB, max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."),
                         "mps")):
        assert oom.is_out_of_memory(exc)
        text = oom.memory_error(exc, device)
        assert text.startswith(f"out of GPU memory ({device}) while rendering"), text
        assert text.endswith(", or --device cpu when the GPU is the one that is full"), text
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    for exc in (cpu, MemoryError()):
        assert oom.is_out_of_memory(exc)
        text = oom.memory_error(exc, "cuda")
        assert text.startswith("out of host memory (RAM) while rendering") and "--device cpu" not in text
    oom.reset()
    assert oom.memory_error(MemoryError(), "cpu") == ("out of host memory (RAM) while starting (MemoryError). "
                                                      "Run it on a computer with more memory")


def test_out_of_memory_exit_ends_out_of_memory_alike_and_raises_anything_else_again():
    """The one end every command's ``except Exception`` takes: out of memory, 2 and the
    message's one line to the writer given; any other error raised again, unchanged."""
    oom.reset()
    lines: list[str] = []
    assert oom.out_of_memory_exit(MemoryError(), "cpu", write=lines.append) == 2
    assert lines == ["error: out of host memory (RAM) while starting (MemoryError). Run it on a computer with more "
                     "memory"]
    bug = KeyError("not memory")
    with pytest.raises(KeyError) as raised:
        oom.out_of_memory_exit(bug, "cpu", write=lines.append)
    assert raised.value is bug and len(lines) == 1


class _DyingDataset(torch.utils.data.Dataset):
    """A dataset whose worker ends itself at its first item: by the signal ``kill`` (SIGKILL:
    what the system's out-of-memory killer sends; SIGBUS: what a worker gets when shared memory
    is full) or, when None, with an exit status (a worker's own failure)."""

    def __init__(self, kill: int | None):
        self.kill = kill

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import resource

        if self.kill is not None:
            import faulthandler

            faulthandler.disable()  # pytest's, inherited: its dump of this worker's stack is noise here
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a bus error dumps core: not into the test's folder
            if sys.platform.startswith("linux"):  # nor to a core_pattern pipe (which ignores the limit)
                import ctypes

                ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
            if self.kill not in (signal.SIGKILL, signal.SIGSTOP):  # inherited dispositions: nohup ignores SIGHUP
                signal.signal(self.kill, signal.SIG_DFL)
            os.kill(os.getpid(), self.kill)
        os._exit(3)


def _loader_error(kill: int | None) -> BaseException:
    """torch's error for a DataLoader whose one worker dies as :class:`_DyingDataset` says, with
    the failed loader freed: torch's SIGCHLD handler, left installed in this process, holds the
    worker's pid until its loader is freed, and the error's frames hold the loader. Kept, a later
    test's child given that pid (pids wrap) and exiting with an error would raise torch's worker
    error inside that test."""
    import traceback
    import weakref

    loader = iter(torch.utils.data.DataLoader(_DyingDataset(kill), num_workers=1))
    freed = weakref.ref(loader)
    with pytest.raises(RuntimeError) as raised:
        list(loader)
    del loader
    link: BaseException | None = raised.value
    while link is not None:
        traceback.clear_frames(link.__traceback__)  # the locals of the frames it passed: the loader
        link = link.__cause__
    assert freed() is None, "the failed DataLoader is still held"
    return raised.value


def test_a_dataloader_worker_killed_is_out_of_host_memory_with_the_workers_advice():
    """torch's own error for a worker killed by SIGKILL (a real DataLoader whose worker is
    killed: "exited unexpectedly", raised from "is killed by signal: Killed"): the computer's
    memory, the kill quoted, dataloader.num_workers and the cached views to lower; a worker
    that exited by itself is not out of memory."""
    from headless_train.cli import training_memory_advice, workers_memory_advice
    from npbgpp_core.memory import killed_worker, ran_out_on_gpu

    exc = _loader_error(signal.SIGKILL)
    assert oom.is_out_of_memory(exc) and not ran_out_on_gpu(exc)
    killed = killed_worker(exc)
    assert killed is not None and killed is exc.__cause__
    pid = str(killed).split("(pid ")[1].split(")")[0]
    assert str(exc) == f"DataLoader worker (pid(s) {pid}) exited unexpectedly"
    assert str(killed) == f"DataLoader worker (pid {pid}) is killed by signal: Killed. "
    assert oom.is_out_of_memory(killed)  # the same error raised at once (torch's SIGCHLD handler)
    container = {"datasets": {"train_image_size": 256, "cache_images": True, "cache_images_max_gb": 4},
                 "dataloader": {"batch_size": 2, "num_workers": 8}}
    oom.reset()
    oom.step("training", training_memory_advice(container), workers_memory_advice(container))
    assert oom.memory_error(exc, "cuda", "") == (
        f"out of host memory (RAM) while training (DataLoader worker (pid {pid}) is killed by signal: Killed: most "
        "often the system's out-of-memory killer; on Linux journalctl -k or dmesg says so). Lower "
        "dataloader.num_workers (now 8; 0 loads the data in the training process, with no worker), or keep fewer "
        "decoded views with datasets.cache_images_max_gb (now 4) or datasets.cache_images=false")
    container["datasets"]["cache_images"] = False
    assert workers_memory_advice(container) == ("lower dataloader.num_workers (now 8; 0 loads the data in the "
                                                "training process, with no worker)")
    oom.reset()
    exited = _loader_error(None)
    assert "exited unexpectedly" in str(exited) and not oom.is_out_of_memory(exited)
    assert killed_worker(RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated. ")) is None


def test_torch_s_worker_text_with_macos_signal_numbers_reads_alike():
    """macOS's C library names a signal with its number ("Killed: 9", "Bus error: 10"), which
    torch's worker error quotes: the same readings as Linux's names (torch's exact text with
    macOS's names: no Mac here to kill a real worker on)."""
    from npbgpp_core.memory import killed_worker, shared_memory_worker

    killed = RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed: 9. ")
    assert killed_worker(killed) is killed and oom.is_out_of_memory(killed)
    bus = RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error: 10. It is possible that "
                       "dataloader's workers are out of shared memory. Please try to raise your shared memory limit.")
    assert shared_memory_worker(bus) is bus and killed_worker(bus) is None
    oom.reset()
    segv = RuntimeError("DataLoader worker (pid 7) is killed by signal: Segmentation fault: 11. ")
    assert not oom.is_out_of_memory(segv) and oom.worker_crash(segv).startswith(
        "a DataLoader worker crashed while starting (DataLoader worker (pid 7) is killed by signal: Segmentation "
        "fault: 11, SIGSEGV): ")
    term = RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated: 15. ")
    assert oom.worker_crash(term) is None and not oom.is_out_of_memory(term)


@pytest.mark.parametrize("kill, name", [(signal.SIGSEGV, "Segmentation fault"),
                                        (signal.SIGFPE, "Floating point exception"),
                                        (signal.SIGABRT, "Aborted")])
def test_a_dataloader_worker_crashed_by_another_signal_is_one_line_naming_it(kill, name):
    """A real worker killed by SIGSEGV or SIGFPE (native code's crash, not memory): one line
    naming the signal, no traceback, exit 1 (a failure, not bad input), how to see where it
    happens in this process; --debug raises torch's error as it is."""
    from headless_train.cli import fewer_workers_advice, training_memory_advice, workers_memory_advice

    exc = _loader_error(kill)
    assert not oom.is_out_of_memory(exc)
    pid = str(exc).split("(pid(s) ")[1].split(")")[0]
    assert str(exc.__cause__) == f"DataLoader worker (pid {pid}) is killed by signal: {name}. "
    container = {"datasets": {"train_image_size": 256, "cache_images": False}, "dataloader": {"num_workers": 8}}
    oom.reset()
    oom.step("training", training_memory_advice(container), workers_memory_advice(container),
             fewer_workers_advice(container))
    lines: list[str] = []
    assert oom.out_of_memory_exit(exc, "cuda", "", write=lines.append) == 1
    assert lines == [
        f"error: a DataLoader worker crashed while training (DataLoader worker (pid {pid}) is killed by signal: "
        f"{name}, {kill.name}): the error is in that process, which leaves no traceback here (its own message, if "
        "any, is above). Lower dataloader.num_workers (now 8; 0 loads the data in the training process, with no "
        "worker) and run it again with python -X faulthandler to see where it fails"]
    with pytest.raises(RuntimeError) as raised:
        oom.out_of_memory_exit(exc, "cuda", "", write=lines.append, debug=True)
    assert raised.value is exc and len(lines) == 1
    oom.reset()
    assert oom.worker_crash(exc.__cause__).endswith(  # torch's SIGCHLD handler's error, raised as is
        "Load the data without worker processes and run it again with python -X faulthandler to see where it fails")
    assert oom.worker_crash(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly")) is None
    assert oom.worker_crash(_loader_error(signal.SIGKILL)) is None  # out of memory: memory_error's


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGHUP])
def test_a_dataloader_worker_stopped_by_a_signal_sent_to_it_is_no_crash(kill):
    """A real worker killed by SIGTERM or SIGHUP (a stop sent to the whole process group: timeout,
    docker stop, a closed terminal, the training process stopping too) is neither native code's
    crash nor memory running out: no crash line, torch's error raised as it is, as before the
    crash line existed; nor is a worker's SIGINT or SIGQUIT (a terminal's Ctrl-C and quit keys), by torch's text."""
    exc = _loader_error(kill)
    assert str(exc.__cause__).endswith(f"is killed by signal: {signal.strsignal(kill)}. ")
    assert not oom.is_out_of_memory(exc) and oom.worker_crash(exc) is None
    lines: list[str] = []
    with pytest.raises(RuntimeError) as raised:
        oom.out_of_memory_exit(exc, "cuda", "", write=lines.append)
    assert raised.value is exc and lines == []
    for sent in (signal.SIGINT, signal.SIGQUIT):
        text = RuntimeError(f"DataLoader worker (pid 7) is killed by signal: {signal.strsignal(sent)}. ")
        assert oom.worker_crash(text) is None and not oom.is_out_of_memory(text)


def test_a_dataloader_worker_killed_by_a_bus_error_is_out_of_shared_memory_with_its_own_advice():
    """torch's own error for a worker killed by SIGBUS (a real DataLoader whose worker gets it),
    in practice shared memory (/dev/shm) full, e.g. a Docker container's 64 MB: out of shared
    memory, not of RAM, with fewer workers and a larger /dev/shm as the advice (no cached views,
    no out-of-memory killer)."""
    from headless_train.cli import fewer_workers_advice, training_memory_advice, workers_memory_advice
    from npbgpp_core.memory import killed_worker, ran_out_on_gpu, shared_memory_worker

    exc = _loader_error(signal.SIGBUS)
    assert oom.is_out_of_memory(exc) and not ran_out_on_gpu(exc) and killed_worker(exc) is None
    bus = shared_memory_worker(exc)
    assert bus is not None and bus is exc.__cause__
    pid = str(bus).split("(pid ")[1].split(")")[0]
    assert str(exc) == f"DataLoader worker (pid(s) {pid}) exited unexpectedly"
    assert str(bus) == (f"DataLoader worker (pid {pid}) is killed by signal: Bus error. It is possible that "
                        "dataloader's workers are out of shared memory. Please try to raise your shared memory limit.")
    assert oom.is_out_of_memory(bus) and shared_memory_worker(bus) is bus  # torch's SIGCHLD handler raises it as is
    container = {"datasets": {"train_image_size": 256, "cache_images": True, "cache_images_max_gb": 4},
                 "dataloader": {"batch_size": 2, "num_workers": 8}}
    oom.reset()
    oom.step("training", training_memory_advice(container), workers_memory_advice(container),
             fewer_workers_advice(container))
    line = (f"out of shared memory (/dev/shm) while training (DataLoader worker (pid {pid}) is killed by signal: Bus "
            "error: the DataLoader's workers pass their batches through shared memory, /dev/shm, and a bus error "
            "there most often means it is full). "
            "Lower dataloader.num_workers (now 8; 0 loads the data in the training process, with no worker), or give "
            "the system more shared memory (/dev/shm; a Docker container: docker run --shm-size=8g)")
    assert oom.memory_error(exc, "cuda", "") == line
    lines: list[str] = []
    assert oom.out_of_memory_exit(exc, "cuda", "", write=lines.append) == 2
    assert lines == [f"error: {line}"] and oom.OUT_OF_MEMORY_LINE.search(lines[0])[1] == "shared"
    oom.reset()  # a command that announced no way to fewer workers
    assert oom.memory_error(bus, "cpu").endswith(
        "is full). Load the data without worker processes, or give the system more shared memory (/dev/shm; a "
        "Docker container: docker run --shm-size=8g)")


# The hydra path's out-of-memory ends, each failure injected: host memory at the second training
# step (global_step 1, the system's training step), a GPU's while evaluating (the evaluation), a
# training's DataLoader worker killed by SIGKILL (workers only: the other runs load without). The
# runs share one process (each of its starts imports torch, Lightning and Hydra: most of a run's
# time), one after another as separate command lines; each run's stderr ends with "@@ exit N".
_HYDRA_OOM = """
import json
import sys
import traceback
import torch
from headless_train import evaluate
from headless_train.systems.npbg import NPBGSystem
real = NPBGSystem.training_step
def training_step(self, batch, batch_idx):
    if self.global_step >= 1:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10000000000000 bytes.")
    return real(self, batch, batch_idx)
NPBGSystem.training_step = training_step
def failing(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.\\nOf the allocated memory ...")
evaluate.evaluate = failing
import os
import signal
from headless_train.data import TrainSamples
real_item = TrainSamples.__getitem__
def item(self, i):
    if torch.utils.data.get_worker_info() is not None:  # in a DataLoader worker: killed as the OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    return real_item(self, i)
TrainSamples.__getitem__ = item
from headless_train.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv[1:] = argv  # what Hydra reads
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except Exception:  # a run that fails otherwise: its traceback in its part, the next run still runs
        traceback.print_exc()
        code = "raised"
    print(f"@@ exit {code}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def hydra_runs(tmp_path_factory) -> dict[str, tuple[str, str, str]]:
    """name -> (exit code as printed, stderr, run folder) of each run."""
    import json
    import re
    import subprocess

    from _train_fixtures import make_dataset

    tmp = tmp_path_factory.mktemp("hydra_oom")
    root = make_dataset(str(tmp / "data"), ("sceneA",))
    scene = [f"datasets.data_root={root}", "datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA",
             "dataloader=small"]
    runs = {
        "training": [f"hydra.run.dir={tmp / 'train'}", *scene, "system=npbg", "datasets.selection_count=0",
                     "datasets.train_num_samples=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                     "trainer.limit_val_batches=0", "datasets.train_image_size=16"],
        "evaluation": [f"hydra.run.dir={tmp / 'eval'}", *scene, "system=npbgpp_sphere", "eval_only=true",
                       "datasets.input_view_max_side=64"],
        "workers": [f"hydra.run.dir={tmp / 'workers'}", *scene, "system=npbg", "datasets.selection_count=0",
                    "datasets.train_num_samples=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                    "trainer.limit_val_batches=0", "datasets.train_image_size=16", "dataloader.num_workers=1",
                    "datasets.cache_images=true"],
        # last: Hydra leaves the headless_train logger at DEBUG after the run
        "evaluation_verbose": [f"hydra.run.dir={tmp / 'eval_verbose'}", *scene, "system=npbgpp_sphere",
                               "eval_only=true", "datasets.input_view_max_side=64", "hydra.verbose=headless_train"],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, "-c", _HYDRA_OOM, json.dumps(list(runs.values()))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = re.split(r"^@@ exit (\S+)\n", proc.stderr, flags=re.M)  # [err, code, err, code, '']
    assert len(parts) == 2 * len(runs) + 1, proc.stderr[-3000:]
    return {name: (parts[2 * k + 1], parts[2 * k], argv[0].split("=", 1)[1])
            for k, (name, argv) in enumerate(runs.items())}


def test_training_out_of_memory_is_one_line_with_its_settings_and_keeps_the_saved_step(hydra_runs):
    """The hydra training path: exit 2 with the batch, crop and input-view settings to lower, no
    traceback on stderr; the checkpoint saver wrote last.ckpt at the last step taken (its
    atomic writer: no temporary file left)."""
    code, err, run_dir = hydra_runs["training"]
    assert code == "2", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line == ("error: out of host memory (RAM) while training (DefaultCPUAllocator: can't allocate memory: you "
                    "tried to allocate 10000000000000 bytes.). Lower dataloader.batch_size (now 1) or "
                    "datasets.train_image_size (the crop side, now 16)"), line
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["last.ckpt"]
    assert torch.load(os.path.join(ckpt, "last.ckpt"), map_location="cpu", weights_only=True)["global_step"] == 1


def test_evaluation_out_of_memory_on_the_gpu_advises_the_cpu(hydra_runs):
    code, err, _ = hydra_runs["evaluation"]
    assert code == "2" and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: out of GPU memory (cuda) while evaluating (CUDA out of memory. Tried to allocate 3.00 GiB.). The "
        "evaluation renders each held-out view whole at its own size: evaluate on a computer with more memory, or "
        "aggregate smaller input views with datasets.input_view_max_side (below 64), or trainer.gpus=0 (the CPU) "
        "when the GPU is the one that is full"), err[-2000:]


def test_hydra_verbose_writes_the_traceback_of_the_one_line_end_into_the_run_s_log(hydra_runs):
    """What the README and stage --debug rely on: with hydra.verbose=headless_train the error a
    training or evaluation run ends with in one line is in the run's log with its traceback; the
    line on stderr is the same as without it, and without it the log has no traceback."""
    code, err, run_dir = hydra_runs["evaluation_verbose"]
    assert code == "2" and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == hydra_runs["evaluation"][1].strip().splitlines()[-1]
    with open(os.path.join(run_dir, "headless_train.log"), encoding="utf-8") as f:
        logged = f.read()
    assert "Traceback (most recent call last)" in logged and "torch.OutOfMemoryError: CUDA out of memory" in logged
    with open(os.path.join(hydra_runs["evaluation"][2], "headless_train.log"), encoding="utf-8") as f:
        assert "Traceback" not in f.read()


def test_training_whose_dataloader_worker_is_killed_names_the_workers(hydra_runs):
    """torch's own error for a worker killed by SIGKILL, through Lightning and the hydra path:
    exit 2, one line saying the computer's memory, quoting the kill, with the workers and the
    cached views to lower."""
    import re

    code, err, _ = hydra_runs["workers"]
    assert code == "2" and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: out of host memory \(RAM\) while training \(DataLoader worker \(pid \d+\) is killed by signal: "
        r"Killed: most often the system's out-of-memory killer; on Linux journalctl -k or dmesg says so\)\. Lower "
        r"dataloader\.num_workers \(now 1; 0 loads the data in the training process, with no worker\), or keep "
        r"fewer decoded views with datasets\.cache_images_max_gb \(now 4\) or datasets\.cache_images=false", line), line


def test_stage_names_its_own_options_when_training_ran_out_of_memory(tmp_path, monkeypatch, capsys):
    """`stage` runs training as a child: that child's out-of-memory line (hydra keys) becomes the
    stage's --batch / --crop / --views (and --workers for a killed DataLoader worker) with the
    values the child trained with."""
    from _train_fixtures import make_dataset

    from headless_train import stage

    root = make_dataset(str(tmp_path / "data"), ("sceneA",))

    def child_logging(line: str):
        """A training child that logs ``error: line`` (as cli.hydra_main does) and exits 2."""
        def child(cmd, log, *args, **kwargs):
            log.write(f"[2026-12-01 06:50:00,000][headless_train][ERROR] - error: {line}\n")
            log.flush()
            return 2, False, None
        return child

    work = str(tmp_path / "work")
    # (the child's line, the stage's options beyond the corpus, work and --dry-run, what the stage says)
    cases = [
        ("out of host memory (RAM) while training (MemoryError). Lower dataloader.batch_size (now 1), ...",
         ["--views", "2"],
         f"training wrote no {work}/run/checkpoints/last.ckpt (exit code 2); it ran out of host memory: lower "
         "--batch (now 1), --crop (now 16) or --views (now 2), or give --override datasets.cache_images=false "
         "(the stage keeps every view decoded in memory); see "),
        # a DataLoader worker of the child killed (memory.killed_worker's line): --workers first (a dry
        # run's child trains without workers, so 0 here)
        ("out of host memory (RAM) while training (DataLoader worker (pid 12) is killed by signal: Killed: most often "
         "...). Lower dataloader.num_workers (now 8; ...)", [],
         "; it ran out of host memory: lower --workers (now 0), --batch (now 1), --crop (now 16) or --views "
         "(now 3), or give --override datasets.cache_images=false"),
        # a worker killed by a bus error (memory.shared_memory_worker's line): shared memory, no cache advice
        ("out of shared memory (/dev/shm) while training (DataLoader worker (pid 12) is killed by signal: Bus error: "
         "the DataLoader's ...). Lower dataloader.num_workers (now 8; ...)", [],
         "; it ran out of shared memory: lower --workers (now 0), --batch (now 1), --crop (now 16) or --views "
         "(now 3), or give the system more shared memory (/dev/shm; a Docker container: docker run "
         "--shm-size=8g); see "),
        # a worker crashed (oom.worker_crash's line, exit 1): not memory; --debug's faulthandler and --workers
        ("a DataLoader worker crashed while training (DataLoader worker (pid 12) is killed by signal: Segmentation "
         "fault, SIGSEGV): the error is in that process, ... Lower dataloader.num_workers (now 8; ...)", [],
         "; a DataLoader worker crashed (native code, not memory): call again with --debug (training then runs "
         "under python -X faulthandler, which writes where it crashed into the log), with --workers 0 (now 0) to "
         "crash in the training process itself; see "),
    ]
    for line, options, said in cases:
        monkeypatch.setattr(stage, "run_child", child_logging(line))
        assert stage.main(["--corpus", root, "--work", work, "--dry-run", *options]) == 2
        err = capsys.readouterr().err
        assert said in err, err
        assert ("ran out of" in err) == line.startswith("out of"), err

    # a SIGKILL the stage did not send (Linux's out-of-memory killer), the earlier call's line above in the log
    def killed(cmd, log, *args, **kwargs):
        return -9, False, None

    monkeypatch.setattr(stage, "run_child", killed)
    assert stage.main(["--corpus", root, "--work", work, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (f"training wrote no {work}/run/checkpoints/last.ckpt (exit code -9); it was killed (SIGKILL), most often "
            "by the system's out-of-memory killer when training needs more memory than this computer has (on Linux "
            "the system log says so: journalctl -k or dmesg): lower --batch (now 1), --crop (now 16) or --views "
            "(now 3), or give --override datasets.cache_images=false") in err, err

    # a SIGKILL the stage sent itself (its time limit's or a second Ctrl-C's, after the SIGTERM's grace time)
    import signal

    for timed_out, stopped_by in ((True, None), (False, int(signal.SIGINT))):
        monkeypatch.setattr(stage, "run_child", lambda *a, t=timed_out, s=stopped_by, **k: (-9, t, s))
        assert stage.main(["--corpus", root, "--work", work, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "training wrote no" in err and "SIGKILL" not in err and "ran out of" not in err.split("; see ")[0], err

    def failing(cmd, log, *args, **kwargs):  # any other failure: no such note
        log.write("RuntimeError: something else\n")
        return 1, False, None

    monkeypatch.setattr(stage, "run_child", failing)
    assert stage.main(["--corpus", root, "--work", work, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "training wrote no" in err and "ran out of" not in err.split("; see ")[0], err


def test_training_advice_without_a_crop_asks_for_one():
    """datasets.train_image_size null trains on whole views: the advice says so and gives a crop
    side to set, not 'now None'."""
    from headless_train.cli import training_memory_advice

    advice = training_memory_advice({"datasets": {"train_image_size": None, "selection_count": 3},
                                     "dataloader": {"batch_size": 2}})
    assert advice == ("lower dataloader.batch_size (now 2), datasets.train_image_size (the crop side, now null: "
                      "whole views; give one, e.g. 256) or datasets.selection_count (input views per sample, now 3)")
