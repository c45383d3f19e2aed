"""Operators: aggregate NPBG++ descriptors into a bundle; fit it to the dataset's photos;
densify a dataset's points; export a dataset of this scene."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import bpy
import numpy as np
from bpy.props import BoolProperty, FloatProperty, IntProperty, StringProperty

from npbgpp_core.protocol import (
    ADDON_PHOTO_SIZE,
    AGGREGATE_MAX_SIDE,
    AGGREGATE_MIN_SIDE,
    photo_size_for_render,
)

from .blend_paths import linked_library, resolved, stored
from .camera_bridge import photo_format, render_size

# Network setting -> the data domain of the bundled NPBG++ file (npbgpp_core.pretrained);
# "auto": the worker detects it from the dataset (npbgpp_core.datasets.scene_domain).
NETWORK_DOMAINS = {"AUTO": "auto", "SCENE": "scene", "OBJECT": "object"}


def bundled_weights(domain: str = "scene") -> str:
    """The NPBG++ weights of ``domain`` shipped with the add-on (npbgpp_core/weights), used
    when the Weights setting is empty."""
    try:
        from npbgpp_core.pretrained import default_weights_path
    except ImportError:
        return ""
    return default_weights_path("npbgpp", domain)


def network_choice(settings: Any) -> tuple[str, str, list[str]]:
    """``(weights, domain, files)`` for Aggregate: the Weights file (domain "") when set,
    else "" and the Network's domain; ``files`` are the weights files it may read (checked
    to exist before the worker starts). No torch needed."""
    if settings.weights:
        path = resolved(settings, settings.weights)
        return path, "", [path]
    domain = NETWORK_DOMAINS[settings.network]
    files = [bundled_weights(d) for d in (("scene", "object") if domain == "auto" else (domain,))]
    return "", domain, files


def usable_network(op: Any, settings: Any) -> tuple[str, str] | None:
    """``(weights, domain)`` of :func:`network_choice` when every file it may read exists,
    else None after reporting "<op._job> needs NPBG++ weights: ..." naming what is missing."""
    weights, domain, files = network_choice(settings)
    missing = [f for f in files if not f or not os.path.isfile(f)]
    if not missing:
        return weights, domain
    where = (f"not found: {weights}" if settings.weights
             else f"none set, and the bundled file is missing: {', '.join(missing)}")
    op.report({"ERROR"}, f"{op._job} needs NPBG++ weights: set Weights in Render Properties > NPBG++ ({where}).")
    return None


def imported_dataset(op: Any, settings: Any, needs: str) -> str:
    """The imported dataset's folder, or "" after reporting "<needs>: use File > Import >
    NPBG++ Dataset Folder first." (none imported) or that its folder is gone (named)."""
    dataset = resolved(settings, settings.dataset_path)
    if not dataset:
        op.report({"ERROR"}, f"{needs}: use File > Import > NPBG++ Dataset Folder first.")
        return ""
    if not os.path.isdir(dataset):
        op.report({"ERROR"}, f"{needs}: the imported dataset folder {dataset} no longer exists (moved or deleted?); "
                             "import it again with File > Import > NPBG++ Dataset Folder.")
        return ""
    return dataset


def refused_in_linked_scene(op: Any, scene: Any, adds: str) -> bool:
    """Whether ``scene`` is linked from another .blend, after reporting why the operator
    cannot run there: it adds ``adds`` (objects), which Blender cannot link into a linked
    scene's collections (it failed at the end, after the work, with Blender's own error)."""
    library = linked_library(scene)
    if library:
        op.report({"ERROR"}, f"The scene {scene.name!r} is linked from {library}: Blender adds no objects to a "
                             f"linked scene, so {adds} cannot go into it. Open {library} and run it there, or "
                             "use a local scene.")
    return bool(library)


def warn_linked_scene(op: Any, scene: Any, setting: str) -> None:
    """After the operator stored ``setting`` in ``scene``: a warning when the scene is
    linked from another .blend, where Blender saves it, so the change lasts only until this
    file is reloaded (it said nothing)."""
    library = linked_library(scene)
    if library:
        op.report({"WARNING"}, f"The scene {scene.name!r} is linked from {library}: its {setting} changed here "
                               f"only until this file is reloaded (Blender saves a linked scene in its own file); "
                               f"set it in {library} to keep it.")


def default_output(dataset: str, suffix: str) -> str:
    """Where an output of ``dataset`` goes by default: next to the saved .blend (a place the
    user chose and can write; dataset folders may be read-only), or "" when the .blend is
    not saved yet."""
    if not bpy.data.filepath:
        return ""
    return os.path.join(os.path.dirname(bpy.path.abspath(bpy.data.filepath)), _output_name(dataset, suffix))


def _output_name(dataset: str, suffix: str) -> str:
    """<dataset folder name><suffix> (a dataset at a drive's root is "scene")."""
    return (os.path.basename(os.path.normpath(dataset)) or "scene") + suffix


def output_path(op: Any, dataset: str, suffix: str, what: str, field: str,
                inputs: tuple[tuple[str, str], ...] = (), outputs: tuple[str, ...] = ()) -> str:
    """The operator's ``filepath``, else :func:`default_output`; "" after reporting when
    neither says where the ``what`` goes (``field``: the operator's path setting), or when
    it would replace an input (:func:`replaces_an_input`)."""
    out = bpy.path.abspath(op.filepath) if op.filepath else default_output(dataset, suffix)
    if not out:
        op.report({"ERROR"}, f"Choose where to save the {what} (the operator's {field} path), or save the .blend "
                             f"first: {what}s are saved next to it by default.")
        return ""
    if replaces_an_input(op, out, field, dataset, inputs, outputs):
        return ""
    return out if output_folder_exists(op, out, field) else ""


def replaces_an_input(op: Any, out: str, field: str, dataset: str, inputs: tuple[tuple[str, str], ...] = (),
                      outputs: tuple[str, ...] = ()) -> bool:
    """Whether writing ``out`` would replace a file the job reads, after reporting which:
    an existing file inside the ``dataset`` folder other than a bundle (its cameras,
    photos, cloud: a bundle written over transforms_train.json destroyed the dataset) or
    a file ending in one of ``outputs`` (left to the worker, which knows which of them the
    dataset reads: Densify's ``.ply``, an earlier run's it may replace) or one of ``inputs``
    (``(path, what it is)``, e.g. the Weights file; the scene's bundle for Densify)."""
    from npbgpp_core.atomic import holds, same_file

    target = os.path.realpath(out)
    for path, what in inputs:
        if path and same_file(target, path):
            op.report({"ERROR"}, f"{field} {out} is {what}; choose another file.")
            return True
    # a bundle is never a dataset's input: replacing one is a re-run
    ours = target.lower().endswith((".npbgpp", *outputs))
    if dataset and not ours and os.path.isfile(target) and holds(dataset, target):
        op.report({"ERROR"}, f"{field} {out} is a file of the dataset {dataset}; writing there would replace it: "
                             "choose a path outside the dataset folder.")
        return True
    return False


def output_folder_exists(op: Any, out: str, field: str) -> bool:
    """Whether a file can be written at ``out`` (npbgpp_core.atomic.check_output_file), else
    False after reporting why (before the job: the file is written only when the job ends)."""
    from npbgpp_core.atomic import check_output_file

    try:
        check_output_file(out)
    except OSError as exc:
        op.report({"ERROR"}, f"{field} {exc}.")
        return False
    return True


def ask_for_output(op: Any, context: Any, dataset: str, suffix: str) -> bool:
    """With no output path and an unsaved .blend: open the file browser at <dataset
    name><suffix> (the operator then runs from ``execute``) and return True."""
    if op.filepath or bpy.data.filepath:
        return False
    op.filepath = _output_name(dataset, suffix)
    op._asked = True  # its execute() then starts the modal job, as invoke would have
    context.window_manager.fileselect_add(op)
    return True


def worker_reply(op: Any, request: Any, context: Any = None) -> Any:
    """``request``'s reply from the operator's worker, or None after reporting "<op._job>
    failed: ...". With ``context`` (a job's first request) the operator first connects to
    the scene's worker (``op._worker``, with the scene's ``op._timeout``)."""
    from .scene_snapshot import worker_for
    from .worker_client import WorkerError

    try:
        if context is not None:
            op._worker = worker_for(context.scene)
            op._timeout = context.scene.npbgpp.worker_timeout
            with op._worker.lock:  # no render thread may start another process in between
                reply = op._worker.request(request, None, op._timeout)
                op._generation = op._worker.generation  # the job's later requests need this process
            return reply
        return op._worker.request(request, None, op._timeout, getattr(op, "_generation", None))
    except (WorkerError, ValueError, OSError) as exc:
        op.report({"ERROR"}, f"{op._job} failed: {exc}")
        return None


def follow_bundle_points(op: Any, context: Any, count: int) -> tuple[str, str]:
    """After Aggregate wrote ``op._out`` with ``count`` points: the point object's ids must
    name rows of the bundle; when they do not (Max Points left some out, or kept another
    subset than the object's), the bundle's own points become the point object, as File >
    Import Bundle would make them. The check reads only the file's points here (no torch);
    the worker loads the bundle only for the points and colours of a new point object
    (loading it to check built a CPU renderer, and F12 then builds one again on its
    device). Returns ``(note, warning)``: a note for the report ("" when nothing changed) and
    a warning ("" when none) when the point object has no ids (it is not the aggregated
    cloud), or its points could not be checked or replaced (the bundle is saved either way)."""
    from npbgpp_core import protocol as P
    from npbgpp_core.bundle_file import read_points

    from .importers import holds_bundle_points, make_point_object, use_point_object
    from .point_source import point_ids
    from .worker_client import WorkerError

    obj = context.scene.npbgpp.point_object
    if obj is None:
        return "", ""
    ids = point_ids(obj)
    if ids is None:  # e.g. a PLY imported after the dataset
        return "", (f"The point object {obj.name!r} is not the aggregated cloud (it has no point ids): the Neural "
                    f"image shows the bundle's {count} points. To aggregate a PLY in the dataset's frame, set Dataset "
                    "Points to it.")
    top = int(ids.max()) if len(ids) else -1
    fails = top >= count
    effect = f"its point ids reach {top} but the bundle has {count} points, so F12 fails until you"
    other = "F12 shows other points than the object's"
    fix = f"use File > Import > NPBG++ Bundle on {op._out} (its own points become the point object)."
    try:
        points = read_points(op._out)
    except (ValueError, OSError) as exc:
        return "", (f"The bundle is saved, but its points could not be read to check the point object {obj.name!r} "
                    f"against them ({exc}): {effect if fails else f'if {other},'} {fix}")
    if holds_bundle_points(obj, points):
        return "", ""
    library = linked_library(context.scene)
    if library:  # make_point_object's link failed there with Blender's error, after the work
        return "", (f"The bundle holds other points than the point object {obj.name!r}, and the scene "
                    f"{context.scene.name!r} is linked from {library}, so no point object of its own can go into it "
                    f"here: {effect if fails else f'{other} until you'} open {library} and {fix}")
    try:
        op._worker.request(P.LoadBundle(op._out, "CPU", "FP32"), None, op._timeout)
        cloud = op._worker.request(P.GetBundlePoints(), None, op._timeout)
    except (WorkerError, ValueError, OSError) as exc:
        return "", (f"The bundle is saved, but it holds other points than the point object {obj.name!r} and the "
                    f"worker could not show them to replace it ({exc}): "
                    f"{effect if fails else f'{other} until you'} {fix}")
    name = os.path.splitext(os.path.basename(op._out))[0]
    use_point_object(context, make_point_object(name, cloud.points, cloud.colors, context, np.arange(count)))
    return (f" The bundle holds other points than {obj.name!r} (Max Points): the point object is now {name!r}, the "
            f"bundle's own {count} points."), ""


class _ModalJob:
    """A long operation run one step per timer tick: progress bar, status text, Esc cancels
    (the operator's own ``modal`` decides what a step and a cancel do)."""

    _timer: Any = None

    def _start_modal(self, context: Any, total: int) -> None:
        wm = context.window_manager
        wm.progress_begin(0, total)
        self._timer = wm.event_timer_add(0.05, window=context.window)
        wm.modal_handler_add(self)

    def _show_status(self, context: Any, text: str) -> None:
        if context.workspace is not None:
            context.workspace.status_text_set(text)

    def _cleanup(self, context: Any) -> None:
        wm = context.window_manager
        if self._timer is not None:
            wm.event_timer_remove(self._timer)
            self._timer = None
        wm.progress_end()
        if context.workspace is not None:
            context.workspace.status_text_set(None)


def _end_window_progress(op: Any, context: Any) -> None:
    """For cancel(): end the timer, progress cursor and status line of ``op``'s modal job
    when it started one (a file browser cancelled before the job must not end another
    job's progress)."""
    if getattr(op, "_timer", None) is None:
        return
    try:
        op._cleanup(context)
    except Exception:  # noqa: BLE001 - Blender is tearing the window down: nothing to report to
        pass


class Progress(NamedTuple):
    """How far a job is that the add-on counts itself (Aggregate: views sent)."""

    done: int
    total: int
    finished: bool


class _Claim(NamedTuple):
    """A job running in the UI: ``owner`` says whose (compared by identity only: Blender may
    have freed the operator), ``alive`` whether it runs still (a job Blender dropped
    without a last tick must not block the next run for ever)."""

    owner: Any
    alive: Callable[[], bool]


# The jobs running in the UI, one of each kind, by job name. Worker jobs: the worker holds
# one job of each kind, so a second Begin silently replaced the first, whose timer then
# stepped (and its Finish saved) the other's job (Aggregate even added views twice).
# Export Dataset: two at once interleaved their settings changes, the second saved the
# first's temporary ones (render engine, resolution, samples) as the scene's own and
# restored those at its end.
_RUNNING: dict[str, _Claim] = {}
EXPORT_JOB = "Export Dataset"


def _running(job: str, owner: Any = None) -> bool:
    """Whether a ``job`` other than ``owner``'s runs still; a claim whose job ended goes."""
    claim = _RUNNING.get(job)
    if claim is None or claim.owner is owner:
        return False
    if claim.alive():
        return True
    del _RUNNING[job]
    return False


def _release_claim(op: Any) -> None:
    """End ``op``'s claim in :data:`_RUNNING` (its modal job ended)."""
    claim = _RUNNING.get(op._job)
    if claim is not None and claim.owner is op:
        del _RUNNING[op._job]


def _worker_alive(worker: Any, generation: int | None) -> Callable[[], bool]:
    """A worker job's liveness: the worker process is the one it began in. HUB.worker
    changes on File > Open/New and add-on disable (HUB.shutdown): an in-process worker
    stays "alive" with generation 1 for ever, and disabling frees the modal operator
    without calling cancel. Holds the worker and generation, not the operator's own
    fields: Blender may have freed it."""

    def alive() -> bool:
        from .worker_client import HUB

        return worker is HUB.worker and worker.alive() and worker.generation == generation

    return alive


def _claim_export(steps: Any) -> None:
    """Export Dataset's claim: its step generator, weakly (a job Blender frees without
    cancel, e.g. on add-on disable, frees the generator and with it the claim); a finished
    or closed generator blocks nothing."""
    ref = weakref.ref(steps)

    def alive() -> bool:
        steps = ref()
        return steps is not None and steps.gi_frame is not None

    _RUNNING[EXPORT_JOB] = _Claim(ref, alive)


def job_scene(key: tuple[int, str, str]) -> Any:
    """The scene a modal job began in (``key``: its pointer, name and view layer's name), or
    None when it was deleted: by pointer (a rename keeps it), else by name (an undo may
    have rebuilt it)."""
    pointer, name, _ = key
    for scene in bpy.data.scenes:
        if scene.as_pointer() == pointer:
            return scene
    return bpy.data.scenes.get(name)


class _WorkerStepJob(_ModalJob):
    """A worker job driven one request per step (Aggregate, Densify Points, Fit to
    Photos): the subclass's ``_begin`` starts it and returns the first progress
    (``done``, ``total``, ``finished``; or None, reported), ``_step`` runs one step and
    returns the next (by default: the ``_step_request``'s reply), ``_finish`` collects the
    result, ``_status`` shows progress; ``_job`` names it in messages, ``_cancel_request``
    drops it in the worker. ``execute`` runs it to the end, ``invoke`` on timer ticks."""

    _job = ""
    _step_request = ""
    _cancel_request = ""
    _cancel_note = ""
    _worker: Any = None
    _generation: int | None = None  # the worker process the job began in (worker_reply)
    _scene_key: tuple[int, str, str] | None = None  # the scene the modal job began in (job_scene)
    _asked = False  # invoke opened the file browser (ask_for_output) or the options dialog (_ask_options)
    _out: str = ""
    _timeout: float = 0.0

    def _request(self, name: str) -> Any:
        from npbgpp_core import protocol as P

        return self._worker.request(getattr(P, name)(), None, self._timeout, self._generation)

    def _step(self) -> Any:
        return self._request(self._step_request)

    def _cancel_quietly(self) -> None:
        """Drop the worker's job (after Esc or a failure); a worker that is gone has none, and
        an operator that began none (its file browser cancelled: Blender calls cancel()) has
        no worker."""
        from .worker_client import WorkerError

        if self._worker is None:
            return
        try:
            self._request(self._cancel_request)
        except (WorkerError, ValueError, OSError):
            pass

    def _already_running(self) -> bool:
        """Whether a job of this kind runs in the UI still (reported): its worker process is
        the one the job began in (:func:`_worker_alive`), so a job whose worker stopped (File >
        New, a crash) or whose modal handler was dropped without a last tick does not block
        for ever."""
        if not _running(self._job, self):
            return False
        self.report({"ERROR"}, f"{self._job} is already running (progress in the status bar): wait for it, or "
                               "press Esc to cancel it, then run it again.")
        return True

    def cancel(self, context: Any) -> None:
        """Blender ends the modal job without a last tick (a window closed, a file loaded):
        drop the worker's job and the claim, so the next run can start, and the timer,
        progress bar and status line (left, they outlived the job)."""
        _release_claim(self)
        self._cancel_quietly()
        _end_window_progress(self, context)

    def execute(self, context: Any) -> set[str]:
        """Run to the end (scripts); after the file browser or the options dialog in a window,
        the cancellable modal job as from invoke (run to the end there, Aggregate or Densify of
        an unsaved .blend froze Blender for the whole job: no progress, no Esc)."""
        from .worker_client import WorkerError

        if getattr(self, "_asked", False):
            self._asked = False
            if context.window is not None:
                return self._start_job(context)
        if self._already_running():
            return {"CANCELLED"}
        progress = self._begin(context)
        if progress is None:
            return {"CANCELLED"}
        wm = context.window_manager
        wm.progress_begin(0, max(1, progress.total))
        try:
            while not progress.finished:
                progress = self._step()
                wm.progress_update(progress.done)
        except (WorkerError, ValueError, OSError) as exc:
            self._cancel_quietly()
            self.report({"ERROR"}, f"{self._job} failed: {exc}")
            return {"CANCELLED"}
        finally:
            wm.progress_end()
        return self._finish(context)

    def invoke(self, context: Any, event: Any) -> set[str]:
        return self._ask_options(context)

    def _ask_options(self, context: Any) -> set[str]:
        """In a window: the options (output path, Max Points, Steps ...) in a dialog whose OK
        starts the job (execute, as after the file browser). These jobs leave 'REGISTER' out
        of bl_options, so they have no Adjust Last Operation panel: its redo reran the whole
        job in execute, freezing Blender for minutes and writing the files again; the dialog
        is where the options are set instead."""
        if context.window is None:
            return self._start_job(context)
        self._asked = True
        return context.window_manager.invoke_props_dialog(self, confirm_text=self.bl_label)

    def _start_job(self, context: Any) -> set[str]:
        """Begin, then step on timer ticks (:meth:`modal`)."""
        if self._already_running():
            return {"CANCELLED"}
        progress = self._begin(context)
        if progress is None:
            return {"CANCELLED"}
        _RUNNING[self._job] = _Claim(self, _worker_alive(self._worker, self._generation))
        self._scene_key = (context.scene.as_pointer(), context.scene.name, context.view_layer.name)
        try:
            self._start_modal(context, max(1, progress.total))
            self._status(context, progress)
        except BaseException:
            self._drop_after_error(context)
            raise
        return {"RUNNING_MODAL"}

    def _drop_after_error(self, context: Any) -> None:
        """An error escaped invoke() or modal(): Blender drops the operator without calling
        cancel(), so the claim would block the next run for as long as the worker lives."""
        _release_claim(self)
        self._cancel_quietly()
        try:
            self._cleanup(context)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass

    def modal(self, context: Any, event: Any) -> set[str]:
        try:
            result = _WorkerStepJob._tick(self, context, event)
        except BaseException:
            self._drop_after_error(context)
            raise
        if "RUNNING_MODAL" not in result and "PASS_THROUGH" not in result:
            _release_claim(self)
        return result

    def _tick(self, context: Any, event: Any) -> set[str]:
        from .worker_client import WorkerError

        if event.type == "ESC":
            self._cancel_quietly()
            self._cleanup(context)
            self.report({"WARNING"}, f"{self._job} cancelled{self._cancel_note}")
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        try:
            progress = self._step()
        except (WorkerError, ValueError, OSError) as exc:
            self._cancel_quietly()
            self._cleanup(context)
            self.report({"ERROR"}, f"{self._job} failed: {exc}")
            return {"CANCELLED"}
        context.window_manager.progress_update(progress.done)
        self._status(context, progress)
        if not progress.finished:
            return {"RUNNING_MODAL"}
        self._cleanup(context)
        key = getattr(self, "_scene_key", None)
        scene = job_scene(key) if key is not None else context.scene
        if scene is None:
            self._cancel_quietly()
            self.report({"ERROR"}, f"{self._job}: the scene {key[1]!r} it was started in is gone; nothing was "
                                   "saved: run it again.")
            return {"CANCELLED"}
        if scene == context.scene:
            return self._finish(context)
        # the user switched scenes while it ran: its results (bundle, point object) belong to
        # the scene whose dataset it read, not to the one shown now
        layer = scene.view_layers.get(key[2]) or scene.view_layers[0]
        with context.temp_override(scene=scene, view_layer=layer, collection=scene.collection):
            return self._finish(context)


def held_out_note(used: int, total: int) -> str:
    """The sentence Aggregate's report ends with when the dataset's split held views out: a
    phone capture's user expects every photo to count, but COLMAP and nerfstudio folders
    without split lists hold every 8th view out for evaluation, and Aggregate, Densify and
    Fit read the training views only; "" when every view was used."""
    if total <= used:
        return ""
    return (f" It used {used} of the dataset's {total} photos: its split holds {total - used} out for evaluation "
            "(COLMAP and nerfstudio without split lists: every 8th, from the first), which Aggregate, Densify and "
            "Fit to Photos do not read; F12 through their cameras shows unseen views.")


def photo_size_note(max_side: int, largest_side: int) -> str:
    """The sentence Aggregate's report gives its Photo Size when it shrank photos (``max_side``, the
    worker's AggregationStarted, below ``largest_side``, the longest side of the photos as they are):
    the bundle was aggregated from smaller photos than the user brought; "" when none was shrunk."""
    if not max_side or largest_side <= max_side:
        return ""
    # "larger than": in a dataset of mixed sizes the smaller photos were read as they are
    return (f" Photos larger than {max_side} px read at {max_side} px long side (originals up to {largest_side}; "
            f"{ADDON_PHOTO_SIZE}: Own Size reads them at their own size).")


def default_photo_size(scene: Any) -> int:
    """Aggregate's Photo Size Follow Render (the scene setting's default, :func:`scene_photo_size`): the
    long side F12 renders ``scene`` at (Resolution times %, as the engine's camera reads it), at least
    AGGREGATE_MAX_SIDE and at most AGGREGATE_RENDER_MAX_SIDE (``protocol.photo_size_for_render``, the
    rule bench_big_photos follows too). Descriptors read from photos smaller than the render lost up to
    0.52 dB (BENCHMARKS.md "Renders above 2048 px"), so a large render raises the cap by itself; smaller
    renders keep the constant's time and memory, and the upper bound keeps 48-MP photos from being read
    whole unasked."""
    r = scene.render
    return photo_size_for_render(*render_size(r.resolution_x, r.resolution_y, r.resolution_percentage))


def scene_photo_size(scene: Any) -> int:
    """The Photo Size Aggregate reads ``scene``'s photos at (AggregateBegin.max_side; 0: each at its own
    size) by the scene's setting (``scene.npbgpp.photo_size_mode``): Follow Render, the default and a
    .blend's without the setting, :func:`default_photo_size`; Own Size 0; Fixed its Long Side. The one
    reading of the setting: the operator, its dialog, the panel and their texts use it."""
    s = scene.npbgpp
    if s.photo_size_mode == "OWN":
        return 0
    if s.photo_size_mode == "FIXED":
        return s.photo_size
    return default_photo_size(scene)


def photo_size_text(scene: Any) -> str:
    """What the panel and Aggregate's dialog say, under the Photo Size menu, Aggregate will read
    ``scene``'s photos at (:func:`scene_photo_size`): only what the menu does not show, the size
    Follow Render resolves to ("Reads photos at up to 3840 px long side"), or what Own Size costs."""
    side = scene_photo_size(scene)
    if side:
        return f"Reads photos at up to {side} px long side"
    return "Reads every photo at full size: slowest, most memory"


def draw_photo_size(layout: Any, scene: Any) -> None:
    """The scene's Photo Size setting in ``layout`` (the Data panel, Aggregate's dialog): the mode, then
    the Long Side when Fixed, else a line that says what the mode alone does not (:func:`photo_size_text`)."""
    s = scene.npbgpp
    col = layout.column()
    col.prop(s, "photo_size_mode")
    if s.photo_size_mode == "FIXED":
        col.prop(s, "photo_size")
    else:
        col.label(text=photo_size_text(scene), icon="INFO")


def aggregate_cloud(s: Any) -> tuple[str, str]:
    """(setting, file) of the cloud Aggregate reads instead of the format's own: Dataset Points
    when set (Densify's output, or Import Dataset Folder's Point Cloud), else Dataset Cloud (that
    Point Cloud, kept when Densify replaced Dataset Points); ("", "") for the format's own cloud.
    The add-on's one reading of the rule the worker applies (AggregateBegin.points, then pc_name)."""
    if s.dataset_points:
        return "Dataset Points", resolved(s, s.dataset_points)
    if s.dataset_cloud:
        return "Dataset Cloud", resolved(s, s.dataset_cloud)
    return "", ""


def unseen_points_note(points: int, seen: int, in_no_view: int) -> str:
    """What Aggregate says of the points no photo sees: NPBG++ gives a point a descriptor
    from the photos in which it is the nearest point at a pixel of the view's z-buffer; the
    others neither get one nor render. Those on no pixel of any photo are counted apart from
    those that lost each pixel they fell on to a nearer point (mouse's dense cloud: 70,365
    of 230,908, nearly all within 1% of the winner's depth: more points than the photos'
    pixels, not a hidden surface). "" when every point is seen."""
    if seen >= points:
        return ""
    lost = points - seen - in_no_view
    why = []
    if in_no_view:
        why.append(f"{in_no_view} lie in no photo's view")
    if lost:
        why.append(f"{lost} fall only on pixels where a nearer point wins (a cloud with more points than the photos "
                   "have pixels, or points behind a surface)")
    return (f"{seen} of the {points} points are seen: the nearest point at some pixel of a photo, "
            f"the ones NPBG++ takes descriptors for; the other {points - seen} get none and do not render: "
            + "; ".join(why) + ".")


class NPBGPP_OT_aggregate(_WorkerStepJob, bpy.types.Operator):
    """Compute NPBG++ descriptors of the imported dataset's points (after Densify Points: the dense cloud) from
    its views and save a bundle (in the background: progress in the status bar, Esc cancels)"""

    bl_idname = "npbgpp.aggregate"
    bl_label = "Aggregate Descriptors"
    bl_options = {"UNDO"}  # it sets the scene's bundle: Ctrl+Z must undo that step alone; no redo (_ask_options)
    filepath: StringProperty(  # type: ignore[valid-type]
        name="Bundle", subtype="FILE_PATH", default="",
        description="Bundle file to write; empty: <dataset name>.npbgpp next to the saved .blend",
    )
    max_points: IntProperty(  # type: ignore[valid-type]
        name="Max Points", default=0, min=0,
        description="Aggregate at most this many of the dataset's points (chosen at random); 0: all",
    )
    max_side: IntProperty(  # type: ignore[valid-type]
        # min 0 (own size) with 1..15 refused in _begin: Blender's min cannot say "0 or at least 16"
        # SKIP_SAVE: a run from the UI would start from the last run's value, which counts as set
        # (is_property_set), and would win over the scene's setting (_photo_size)
        name="Photo Size", default=AGGREGATE_MAX_SIDE, min=0, soft_max=8192, subtype="PIXEL", options={"SKIP_SAVE"},
        description=f"For scripts: unless set, the scene's Photo Size ({ADDON_PHOTO_SIZE}, saved with the "
                    f".blend); set, it wins over that for this run. Read each photo at most this long side in pixels "
                    f"(larger ones shrunk with their cameras, smaller ones as they are; the bundle records it). "
                    f"0: each photo at its own size; else at least {AGGREGATE_MIN_SIDE}",
    )

    _job = "Aggregate"
    _cancel_request = "AggregateCancel"
    _cancel_note = ": no bundle was written."
    _count: int = 0
    _done: int = 0
    _network: str = ""  # the weights file the worker uses, and the domain that chose it
    _cloud_note: str = ""  # the worker's warning that the cloud misses the dataset's reconstruction
    _held_out: str = ""  # held_out_note of the dataset's split
    _photo_size_note: str = ""  # photo_size_note of the Photo Size the worker applied

    def _inputs(self, context: Any) -> tuple[str, str, str] | None:
        """(weights, domain, dataset) or None (reported); see :func:`network_choice`."""
        s = context.scene.npbgpp
        network = usable_network(self, s)
        if network is None:
            return None
        dataset = imported_dataset(self, s, "Aggregate needs a dataset")
        setting, cloud = aggregate_cloud(s)
        if dataset and cloud and not os.path.isfile(cloud):
            what, fix = (("", "run Densify Points again, or clear Dataset Points to use the dataset's cloud")
                         if setting == "Dataset Points" else
                         (" (Import Dataset Folder's Point Cloud)", "import the dataset again, or set Dataset Points"))
            self.report({"ERROR"}, f"Aggregate: the {setting} file {cloud}{what} is gone; {fix}.")
            return None
        if dataset and s.dataset_no_cloud and not s.dataset_points:
            from .importers import DENSIFY_HINT

            self.report({"ERROR"}, f"Aggregate needs points, and the imported dataset {dataset} has no point cloud: "
                                   f"{DENSIFY_HINT} ({s.dataset_no_cloud})")
            return None
        return (*network, dataset) if dataset else None

    def _begin(self, context: Any) -> Progress | None:
        from npbgpp_core import protocol as P

        max_side = self._photo_size(context)
        try:  # here, not in the worker: no worker started (or dataset read) for a size nothing can mean
            P.check_aggregate_max_side(max_side)
        except ValueError as exc:
            self.report({"ERROR"}, f"Aggregate: {exc}.")
            return None
        inputs = self._inputs(context)
        if inputs is None:
            return None
        weights, domain, dataset = inputs
        s = context.scene.npbgpp
        self._out = output_path(self, dataset, ".npbgpp", "bundle", "Bundle",
                                ((weights, "the Weights file this job reads"),
                                 (resolved(s, s.dataset_points), "the Dataset Points file this job reads")))
        if not self._out:
            return None
        started = worker_reply(self, P.AggregateBegin(
            dataset, weights, s.dataset_format or None, s.device, self.max_points, s.up_axis, s.dataset_undistort,
            s.dataset_allow_external_paths, domain or "auto",
            resolved(s, s.dataset_points), pc_name=resolved(s, s.dataset_cloud),  # Dataset Points cleared: this one
            max_side=max_side,
        ), context)
        if started is None:
            return None
        self._count, self._done = started.views, 0
        self._network = os.path.basename(started.weights) + (f" ({started.domain})" if started.domain else "")
        self._cloud_note = started.cloud_note
        self._held_out = held_out_note(started.views, started.dataset_views)
        self._photo_size_note = photo_size_note(started.max_side, started.largest_side)
        return self._progress()

    def _step(self) -> Progress:
        """Aggregate the next view (the worker answers Done; the add-on counts the views)."""
        from npbgpp_core import protocol as P

        if self._done < self._count:
            self._worker.request(P.AggregateView(self._done), None, self._timeout, self._generation)
            self._done += 1
        return self._progress()

    def _progress(self) -> Progress:
        return Progress(self._done, self._count, self._done >= self._count)

    def _finish(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        reply = worker_reply(self, P.AggregateFinish(self._out))
        if reply is None:
            return {"CANCELLED"}
        context.scene.npbgpp.bundle = stored(context.scene, self._out)  # written: the scene renders it from now on
        warn_linked_scene(self, context.scene, "Bundle")
        up = ", ".join(f"{v:g}" for v in reply.world_up)
        note, unchecked = follow_bundle_points(self, context, reply.points)
        s = context.scene.npbgpp
        setting, path = aggregate_cloud(s)
        cloud = f"of {setting} ({os.path.basename(path)})" if setting else "of the dataset's cloud"
        unseen = unseen_points_note(reply.points, reply.valid, reply.in_no_view)
        if unseen:  # before the Saved line, which the status bar shows last
            self.report({"INFO"}, unseen)
        self.report({"INFO"}, f"Saved {reply.points} points {cloud} ({reply.valid} seen by the photos) to {self._out}, "
                              f"up axis ({up}), network {self._network}.{self._photo_size_note}{note}{self._held_out}")
        if unchecked:
            self.report({"WARNING"}, unchecked)
        if self._cloud_note:
            self.report({"WARNING"}, self._cloud_note + ".")
        return {"FINISHED"}

    def _photo_size(self, context: Any) -> int:
        """The Photo Size this run reads photos at: ``max_side`` when set (a script's
        ``bpy.ops.npbgpp.aggregate(max_side=1024)``), which wins, else the scene's setting
        (:func:`scene_photo_size`), read when the job starts, so an edit in the dialog counts."""
        if self.properties.is_property_set("max_side"):
            return self.max_side
        return scene_photo_size(context.scene)

    def draw(self, context: Any) -> None:
        """The options dialog (and the file browser's side panel): the scene's Photo Size setting
        itself, so that a size chosen here stays set (saved with the .blend, shown in the panel); a
        ``max_side`` a script gave, which wins over it, in its place. (A draw of its own replaces
        Blender's, which also left the Bundle path out of the file browser's panel.)"""
        layout = self.layout
        layout.use_property_split = True
        # the file browser asking for the Bundle (ask_for_output) has its own path field, and Blender's
        # draw of its side panel leaves the path out; a dialog opened over a File Browser editor
        # (Quick Favorites there) is not that browser: it has no operator of its own
        if getattr(getattr(context, "space_data", None), "active_operator", None) is None:
            layout.prop(self, "filepath")
        layout.prop(self, "max_points")
        if self.properties.is_property_set("max_side"):
            layout.prop(self, "max_side")
        else:
            draw_photo_size(layout, context.scene)

    def invoke(self, context: Any, event: Any) -> set[str]:
        inputs = self._inputs(context)
        if inputs is None:
            return {"CANCELLED"}
        if ask_for_output(self, context, inputs[2], ".npbgpp"):  # ask where the bundle goes
            return {"RUNNING_MODAL"}
        return self._ask_options(context)

    def _status(self, context: Any, progress: Any) -> None:
        self._show_status(context, f"Aggregate: view {progress.done} of {progress.total} (Esc to cancel)")


def densify_read_clouds(s: Any) -> tuple[tuple[str, str], ...]:
    """``(file, what it is)`` of the clouds the scene's dataset settings name that Densify
    must not write over (:func:`replaces_an_input`'s inputs): Dataset Cloud, and Dataset
    Points unless it is the Densify Output a re-run may replace. A .blend saved before
    Dataset Cloud existed records the Point Cloud chosen at import only as Dataset Points,
    and writing there replaced it (the worker knew only the format's own cloud)."""
    from npbgpp_core.atomic import same_file

    clouds = []
    cloud = resolved(s, s.dataset_cloud)
    if cloud:
        clouds.append((cloud, "the Dataset Cloud, the cloud the dataset was imported with (Aggregate and Densify "
                              "read it)"))
    points, own = resolved(s, s.dataset_points), resolved(s, s.densify_output)
    if points and not (own and same_file(points, own)):
        # also an earlier Densify output in a .blend saved before Densify Output existed: refused, as
        # nothing tells it from the Point Cloud chosen at import there
        clouds.append((points, "the Dataset Points file, which Aggregate reads and which is not recorded as "
                               "Densify's own output (it may be the Point Cloud the dataset was imported with; a "
                               ".blend saved before that record existed has none, even for an earlier Densify "
                               "output)"))
    return tuple(clouds)


class NPBGPP_OT_densify(_WorkerStepJob, bpy.types.Operator):
    """Dense coloured points from the imported dataset's photos (multi-view stereo), used as the point object"""

    bl_idname = "npbgpp.densify"
    bl_label = "Densify Points"
    bl_options = {"UNDO"}  # it sets the point object: Ctrl+Z undoes that step; no redo (_ask_options)
    filepath: StringProperty(  # type: ignore[valid-type]
        name="Output PLY", subtype="FILE_PATH", default="",
        description="Where the cloud is saved; empty: <dataset name>_dense.ply next to the saved .blend (never "
        "inside the dataset folder, which may be read-only)",
    )
    max_points: IntProperty(  # type: ignore[valid-type]
        name="Max Points", default=2_000_000, min=1000, description="Keep at most this many dense points",
    )
    max_views: IntProperty(  # type: ignore[valid-type]
        name="Max Views", default=0, min=0, description="Use at most this many views, evenly spread (0: all)",
    )
    min_consistent: IntProperty(  # type: ignore[valid-type]
        name="Min Consistent Views", default=2, min=1, max=8,
        description="Other views whose depth must agree before a pixel becomes a point",
    )
    image_scale: FloatProperty(  # type: ignore[valid-type]
        name="Image Scale", default=1.0, min=0.1, max=1.0, subtype="FACTOR",
        description="Match on images scaled by this factor (faster, fewer points)",
    )
    fill: BoolProperty(  # type: ignore[valid-type]
        name="Fill Texture-Poor Regions", default=False,
        description="Also add points on tables, walls and paper where stereo finds no depth: planes fitted to the "
        "depth around them, kept where neighbouring views agree on depth and colour",
    )

    _job = "Densify"
    _step_request = "DensifyStep"
    _cancel_request = "DensifyCancel"

    def _begin(self, context: Any) -> Any:
        """Start the job in the worker; returns its first progress reply or None (reported)."""
        from npbgpp_core import protocol as P

        s = context.scene.npbgpp
        dataset = imported_dataset(self, s, "Densify needs a dataset")
        if not dataset or refused_in_linked_scene(self, context.scene, "the dense cloud's point object"):
            return None
        self._out = output_path(self, dataset, "_dense.ply", "dense cloud", "Output PLY",
                                ((resolved(s, s.bundle), "the scene's bundle (a PLY written there breaks it)"),
                                 *densify_read_clouds(s)), (".ply",))
        if not self._out:
            return None
        # the worker refuses a .ply the dataset reads (its cloud, the chosen one and the format's own) and lets a
        # re-run replace its own
        return worker_reply(self, P.DensifyBegin(
            dataset, s.dataset_format or None, s.dataset_undistort, s.device, self.max_points, self.max_views,
            self.min_consistent, self.image_scale, s.dataset_allow_external_paths, fill=self.fill, out=self._out,
            pc_name=resolved(s, s.dataset_cloud),
        ), context)

    def _finish(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        from .importers import fit_unfitted_clips, make_point_object, use_point_object, widen_view_clips

        cloud = worker_reply(self, P.DensifyFinish(self._out))
        if cloud is None:
            return {"CANCELLED"}
        name = os.path.splitext(os.path.basename(self._out))[0]
        # ids: the rows of the saved PLY, which Aggregate now uses as the dataset's cloud
        obj = make_point_object(name, cloud.points, cloud.colors, context, np.arange(len(cloud.points)))
        use_point_object(context, obj)
        context.scene.npbgpp.dataset_points = stored(context.scene, self._out)
        context.scene.npbgpp.densify_output = stored(context.scene, self._out)  # a re-run may replace it
        # a dataset imported without a cloud: the first points its cameras and the 3D views show
        fit_unfitted_clips(context.scene, cloud.points)
        widen_view_clips(self, context, cloud.points)
        self.report({"INFO"}, f"densified: {len(cloud.points)} points, saved to {self._out}; Aggregate "
                              "Descriptors uses them")
        return {"FINISHED"}

    def invoke(self, context: Any, event: Any) -> set[str]:
        s = context.scene.npbgpp
        dataset = resolved(s, s.dataset_path)
        if dataset and ask_for_output(self, context, dataset, "_dense.ply"):  # ask where the cloud goes
            return {"RUNNING_MODAL"}
        return self._ask_options(context)

    def _status(self, context: Any, progress: Any) -> None:
        self._show_status(context, f"Densify: {progress.stage} {progress.done}/{progress.total} steps (Esc to cancel)")


class NPBGPP_OT_fit(_WorkerStepJob, bpy.types.Operator):
    """Fit the aggregated bundle to the dataset's photos (per-scene coefficients and refiner: sharper, closer
    to the photos) and render with the fitted bundle (in the background: progress in the status bar, Esc cancels)"""

    bl_idname = "npbgpp.fit"
    bl_label = "Fit to Photos"
    bl_options = {"UNDO"}  # it sets the scene's bundle: Ctrl+Z must undo that step alone; no redo (_ask_options)
    filepath: StringProperty(  # type: ignore[valid-type]
        name="Fitted Bundle", subtype="FILE_PATH", default="",
        description="Fitted bundle file to write; empty: <bundle name>_fitted.npbgpp next to the bundle",
    )
    # min 50: fewer steps are a transient, not a cheaper fit (BENCHMARKS.md "Few-step fits", 4 real
    # captures): 1-2 steps barely change the scene, 5-20 lost up to 2.4 dB against no fit, 50 was
    # within 0.3 dB of it, 100-200 gained.
    steps: IntProperty(  # type: ignore[valid-type]
        name="Steps", default=200, min=50, max=100_000,
        description="Fitting steps, two 128-pixel crops each. 200 added 1.75 dB on average on 9 real captures "
                    "with photos at 256 px (0.67 at their own 512 px); "
                    "the fit gets worse before it gets better (5-20 steps lost up to 2.4 dB against no fit), "
                    "so at least 50",
    )

    _job = "Fit to Photos"
    _whole_views = "OFF"  # Also Try Whole Views as the fit began (Off too without the check): the advice's words
    _step_request = "FitStep"
    _cancel_request = "FitCancel"
    _cancel_note = ": no fitted bundle was written."

    def _begin(self, context: Any) -> Any:
        """Start the fit in the worker; returns its first progress reply or None (reported)."""
        from npbgpp_core import protocol as P

        s = context.scene.npbgpp
        bundle = resolved(s, s.bundle)
        if not bundle or not os.path.isfile(bundle):
            where = f" ({bundle} not found)" if bundle else ""
            self.report({"ERROR"}, f"Fit to Photos needs an aggregated bundle{where}: run Aggregate Descriptors "
                                   "first.")
            return None
        dataset = imported_dataset(self, s, "Fit to Photos needs the dataset's photos")
        if not dataset:
            return None
        network = usable_network(self, s)
        if network is None:
            return None
        weights, domain = network
        if self.filepath:
            self._out = bpy.path.abspath(self.filepath)
        else:
            self._out = os.path.splitext(bundle)[0] + "_fitted.npbgpp"
        reads = ((weights, "the Weights file this job reads"),)
        if replaces_an_input(self, self._out, "Fitted Bundle", dataset, reads):
            return None
        if not output_folder_exists(self, self._out, "Fitted Bundle"):
            return None
        # Also Try Whole Views (only with the check, which it chooses on)
        whole = self._whole_views = s.fit_check_whole_views if s.fit_check_view else "OFF"
        recipes: tuple[str, ...] | None
        combine: str | None
        if whole == "ON":
            # the core's choosing check between its recipes (protocol.CHECK_RECIPES, the tuple npbgpp_core.fitting
            # uses); Keep: how the two fits become one (protocol.CHECK_COMBINES, upper-cased in the enum)
            recipes, combine = P.CHECK_RECIPES, s.fit_check_combine.lower()
        elif whole == "AUTO":  # the users' default: the worker's fit decides by the photos' size
            recipes, combine = None, None
        else:  # the plain check, or none: the core's default combine (choosing: what a fit naming none does)
            recipes, combine = (), P.FIT_CHECK_COMBINE
        return worker_reply(self, P.FitBegin(
            bundle, dataset, self.steps, weights, "" if domain == "auto" else domain, s.dataset_format or None,
            s.dataset_undistort, s.dataset_allow_external_paths, s.device, s.fit_upright, s.fit_check_view,
            recipes, combine,
        ), context)

    def _finish(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        reply = worker_reply(self, P.FitFinish(self._out))
        if reply is None:
            return {"CANCELLED"}
        context.scene.npbgpp.bundle = stored(context.scene, self._out)
        warn_linked_scene(self, context.scene, "Bundle")
        # a checked fit that lost on its held-apart photo saved the unfitted scene: worth a warning
        kind = {"WARNING"} if reply.kept == "unfitted" else {"INFO"}
        # the way to a fit anyway: the same fit (same seed) would be dropped again while the check is on;
        # none for a fit whose render was not finite: that fit is broken, keeping it would save the breakage;
        # but an average is broken by one broken recipe, and choosing would keep a sound one: say that setting
        if reply.render_not_finite and reply.choosing_keeps:
            from npbgpp_core.scene_fit import RECIPE_LABELS

            label = RECIPE_LABELS.get(reply.choosing_keeps, reply.choosing_keeps)
            props = type(context.scene.npbgpp).bl_rna.properties
            keep = props["fit_check_combine"]
            choose = keep.enum_items["CHOOSE"].name  # "Better on Kept Photo"
            setting = f"set {keep.name} to {choose}"
            if self._whole_views == "AUTO":  # Auto averages whatever Keep says: choosing needs On
                whole = props["fit_check_whole_views"]
                setting = f"set {whole.name} to {whole.enum_items['ON'].name} and {keep.name} to {choose}"
            remedy = (f" The average of both fits broke (its render was not finite), but the {label} fit alone "
                      f"scored within what the check allows: {setting} and fit again to keep it.")
        elif reply.render_not_finite:
            remedy = " The fit itself broke (its render was not finite), so it is not worth keeping: the scene " \
                     "renders as before the fit."
        elif reply.kept == "unfitted":
            remedy = " To keep a fit regardless, turn off Check Fit on a Photo and fit again."
        else:
            remedy = ""
        losses = f"loss {reply.loss_first:.4f} -> {reply.loss_last:.4f}"
        if reply.steps_in_all and reply.combine == "average":  # the steps and losses the first (crops) fit's
            # "averaged", not "kept": the check may still drop the average (the outcome says so next)
            fitted = (f"Fitted {reply.steps_in_all} steps in {reply.seconds:.0f} s over both recipes and averaged "
                      f"them (the {P.CHECK_RECIPES[0]} fit: {reply.steps} steps, {losses})")
        elif reply.steps_in_all:  # Also Try Whole Views: the seconds are both fits', the steps and losses the chosen's
            fitted = (f"Fitted {reply.steps_in_all} steps in {reply.seconds:.0f} s over both recipes (the one chosen: "
                      f"{reply.steps} steps, {losses})")
        else:
            fitted = f"Fitted {reply.steps} steps in {reply.seconds:.0f} s ({losses})"
        self.report(kind, f"{fitted}; {reply.outcome}; saved to {self._out}, now the scene's bundle." + remedy)
        return {"FINISHED"}

    def _status(self, context: Any, progress: Any) -> None:
        # a checked fit's scoring renders count as steps: say so, the status may stay on them a while
        doing = f", {progress.doing}" if progress.doing else ""
        self._show_status(context, f"Fit to Photos: step {progress.done} of {progress.total}{doing} (Esc to cancel)")


class NPBGPP_OT_export_dataset(_ModalJob, bpy.types.Operator):
    """Render views of this scene into a NeRF-Synthetic style dataset folder (images, cameras, points)"""

    bl_idname = "npbgpp.export_dataset"
    bl_label = "Export Dataset"
    directory: StringProperty(  # type: ignore[valid-type]
        subtype="DIR_PATH", description="Folder the dataset is written to (images, cameras, points)",
    )
    views: IntProperty(  # type: ignore[valid-type]
        name="Views", default=50, min=1, description="Number of camera views rendered around the scene",
    )
    width: IntProperty(name="Width", default=256, min=8, description="Width of each view in pixels")  # type: ignore[valid-type]
    height: IntProperty(  # type: ignore[valid-type]
        name="Height", default=256, min=8, description="Height of each view in pixels",
    )
    samples: IntProperty(  # type: ignore[valid-type]
        name="Samples", default=16, min=1, description="Cycles samples per pixel of each view",
    )
    points: IntProperty(  # type: ignore[valid-type]
        name="Points", default=100_000, min=1,
        description="Points sampled on the scene's surfaces (the point clouds and hair it renders give all their "
                    "points besides)",
    )
    overwrite: BoolProperty(  # type: ignore[valid-type]
        name="Overwrite", default=False, description="Replace a dataset already in the folder",
    )

    def invoke(self, context: Any, event: Any) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    _steps: Any = None

    @staticmethod
    def _held_file(context: Any, folder: str) -> str:
        """What of this project ``folder`` holds ("" when nothing): the saved .blend, the
        imported dataset, bundle, weights, Dataset Points or Dataset Cloud. With Overwrite the export
        replaced the folder, deleting them (a .blend saved in the folder chosen too)."""
        from npbgpp_core.atomic import holds

        s = context.scene.npbgpp
        used = [("the saved .blend", bpy.data.filepath)]
        used += [(f"the scene's {what}", resolved(s, path)) for what, path in (
            ("dataset", s.dataset_path), ("bundle", s.bundle), ("Weights file", s.weights),
            ("Dataset Points file", s.dataset_points), ("Dataset Cloud file", s.dataset_cloud))]
        for what, path in used:
            if path and os.path.exists(path) and holds(folder, path):
                return f"{what} ({path})"
        return ""

    def execute(self, context: Any) -> set[str]:
        """In the UI: a background job, one view per timer tick, with progress and Esc to
        cancel (nothing is written then); in scripts and background mode: to the end."""
        if not self.directory:
            self.report({"ERROR"}, "Choose an output folder for the dataset.")
            return {"CANCELLED"}
        if refused_in_linked_scene(self, context.scene, "the export's camera"):  # it renders through one of its own
            return {"CANCELLED"}
        if _running(EXPORT_JOB):
            self.report({"ERROR"}, f"{EXPORT_JOB} is already running (progress in the status bar): wait for it, or "
                                   "press Esc to cancel it, then export again.")
            return {"CANCELLED"}
        held = self._held_file(context, bpy.path.abspath(self.directory))
        if held:
            self.report({"ERROR"}, f"Export Dataset: the output folder {bpy.path.abspath(self.directory)} holds "
                                   f"{held}; writing the dataset there replaces the whole folder: choose an empty "
                                   "or new folder.")
            return {"CANCELLED"}
        try:
            from .datagen.render import check_renders_a_view_layer, render_views_steps
        except ImportError as exc:
            self.report({"ERROR"}, f"The dataset renderer is unavailable: {exc}")
            return {"CANCELLED"}
        try:
            check_renders_a_view_layer(context.scene)
        except ValueError as exc:
            self.report({"ERROR"}, f"Export Dataset: {exc}.")
            return {"CANCELLED"}
        self._steps = render_views_steps(
            context.scene, bpy.path.abspath(self.directory), views=self.views, size=(self.height, self.width),
            samples=self.samples, points=self.points, overwrite=self.overwrite,
        )
        _claim_export(self._steps)
        if context.window is None or bpy.app.background:
            while True:
                state = self._advance(context)
                if state != {"RUNNING_MODAL"}:
                    return state
        self._start_modal(context, self.views)
        self._status(context, 0)
        return {"RUNNING_MODAL"}

    def cancel(self, context: Any) -> None:
        """Blender ends the job without a last tick (File > Open / New, a window closed):
        as Esc, the partial output goes and the scene's settings come back now, while the
        scene still exists (not whenever the generator is collected), and the timer, progress
        cursor and status line end."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        _end_window_progress(self, context)

    def modal(self, context: Any, event: Any) -> set[str]:
        if event.type == "ESC":
            self._steps.close()  # removes the partial output and restores the scene's settings
            self._cleanup(context)
            self.report({"WARNING"}, "Export Dataset cancelled: nothing was written.")
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        state = self._advance(context)
        if state != {"RUNNING_MODAL"}:
            self._cleanup(context)
        return state

    def _advance(self, context: Any) -> set[str]:
        """Render the next view; the final state once all are done (or one failed)."""
        try:
            done, total = next(self._steps)
        except StopIteration as finished:
            from .datagen.render import left_out_note

            summary = finished.value
            note = left_out_note(summary.extra.get("left_out", ()))
            self.report({"INFO"}, f"Exported {summary.views} views and {summary.points} points to "
                                  f"{summary.out_dir} in {summary.seconds:.0f} s{'; ' + note if note else ''}.")
            return {"FINISHED"}
        except (ValueError, OSError, RuntimeError) as exc:  # the scene, the disk, Blender: each says what is wrong
            self.report({"ERROR"}, f"Export Dataset failed: {exc}")
            return {"CANCELLED"}
        except Exception as exc:  # noqa: BLE001 - the renderer is other code: report anything it raises
            self.report({"ERROR"}, f"Export Dataset failed: {type(exc).__name__}: {exc}")  # a bug: its type helps
            return {"CANCELLED"}
        if self._timer is not None:
            context.window_manager.progress_update(done)
            self._status(context, done)
        return {"RUNNING_MODAL"}

    def _status(self, context: Any, done: int) -> None:
        self._show_status(context, f"Export Dataset: view {done} of {self.views} (Esc to cancel)")


class NPBGPP_OT_stop_worker(bpy.types.Operator):
    """Stop the NPBG++ worker process (it restarts on the next render)"""

    bl_idname = "npbgpp.stop_worker"
    bl_label = "Stop Worker"

    def execute(self, context: Any) -> set[str]:
        from .worker_client import HUB

        HUB.shutdown()
        return {"FINISHED"}


class NPBGPP_OT_use_camera_photo_size(bpy.types.Operator):
    """Set the render's Resolution (and Pixel Aspect) to the scene camera's photo, so that F12 through it shows
    the photo's framing; Resolution % is kept"""

    bl_idname = "npbgpp.use_camera_photo_size"
    bl_label = "Use Camera's Photo Size"
    bl_options = {"REGISTER", "UNDO"}  # a scene setting: Ctrl+Z gives the former size back

    @classmethod
    def poll(cls, context: Any) -> bool:
        scene = getattr(context, "scene", None)
        camera = scene.camera if scene is not None else None
        if camera is None:
            cls.poll_message_set("The scene has no camera")
            return False
        if camera.type != "CAMERA":  # what F12 says of it too (camera_bridge.scene_camera_geometry)
            cls.poll_message_set(f"The scene camera {camera.name!r} is not a camera object (its type is "
                                 f"{camera.type})")
            return False
        if photo_format(camera) is None:
            cls.poll_message_set(f"The scene camera {camera.name!r} has no photo: only cameras Import Dataset "
                                 "Folder made know theirs (npbgpp_image_size)")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        scene = context.scene
        fmt = photo_format(scene.camera)
        r = scene.render
        # the arithmetic F12's framing note names (engine.framing_note): the photo's size, its pixels' aspect
        r.resolution_x, r.resolution_y = fmt.width, fmt.height
        r.pixel_aspect_x, r.pixel_aspect_y = fmt.pixel_aspect
        aspect = "" if fmt.fy_over_fx == 1.0 else f", Pixel Aspect X {r.pixel_aspect_x:.4f}, Y {r.pixel_aspect_y:.4f}"
        self.report({"INFO"}, f"Resolution {fmt.width}x{fmt.height}{aspect}: the photo of {scene.camera.name!r}")
        warn_linked_scene(self, scene, "Resolution")
        return {"FINISHED"}


CLASSES = (NPBGPP_OT_aggregate, NPBGPP_OT_densify, NPBGPP_OT_fit, NPBGPP_OT_export_dataset, NPBGPP_OT_stop_worker,
           NPBGPP_OT_use_camera_photo_size)


def menu_export(self: Any, context: Any) -> None:
    self.layout.operator(NPBGPP_OT_export_dataset.bl_idname, text="NPBG++ Dataset")


_register_classes, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def register() -> None:
    _register_classes()
    bpy.types.TOPBAR_MT_file_export.append(menu_export)


def end_running_jobs(windows: Any, context: Any) -> int:
    """End this add-on's modal jobs in ``windows`` the way cancel() does (the worker's job
    dropped, the export's scene settings restored and partial output removed, the timer,
    progress cursor and status line gone); returns how many. For unregister(): Blender
    then frees modal operators of unregistered classes without calling cancel() (their
    timer kept firing and the progress cursor stayed). Each window's modal_operators lists
    only live operators, so none is touched after Blender freed it; Blender gives an
    operator's own Python instance (wmOperator.py_instance), hence the isinstance check."""
    ended = 0
    for window in windows:
        for op in list(window.modal_operators):
            if not isinstance(op, _ModalJob):
                continue
            try:
                with context.temp_override(window=window):
                    op.cancel(context)
            except Exception:  # noqa: BLE001 - disabling must go on; the next job's claim check copes
                pass
            ended += 1
    return ended


def unregister() -> None:
    bpy.types.TOPBAR_MT_file_export.remove(menu_export)
    wm = bpy.context.window_manager
    end_running_jobs(wm.windows if wm is not None else (), bpy.context)
    _unregister_classes()
    _RUNNING.clear()  # a job end_running_jobs could not end (Blender frees it without cancel())
