"""``python -m headless_train stage --corpus DIR --work DIR``: one resumable NPBG++ training
stage, sized for a lent GPU machine (at most 10 minutes a command, at most 64 MiB of
inputs), that writes new weights and their card back.

- The first call seeds the run from NPBG++ weights (``--weights``, default the bundled
  file) and trains; later calls with the same ``--work`` continue from
  ``<work>/run/checkpoints/last.ckpt`` (weights, optimiser, step count).
- Training stops after ``--minutes`` (SIGTERM: the trainer writes last.ckpt), then the
  checkpoint is exported (fp16) to ``<work>/npbgpp_sphere_stage.safetensors`` with a card
  (steps, seconds, machine, corpus, overrides) and ``<work>/stage.json`` records the call.
- The training child never outlives the stage (:func:`run_child`): SIGTERM, SIGINT or SIGHUP
  to the stage reaches it as one SIGTERM; the stage waits for last.ckpt, exports and records
  the call (``stopped_by``) and exits 128 + the signal; one that comes after training is held
  until the export and the record are written (:func:`held_stop_signals`); if the child had
  failed (an exit code other than a stop's), or the call fails otherwise (no last.ckpt, no
  step taken, the export), the stage exits 2 as without the signal, and its error line names
  the signal (the failure is the call's outcome; the stop changed nothing; :func:`stop_note`).
  A stage killed outright (SIGKILL) stops its child through :mod:`headless_train.lifeline` (the
  child still writes last.ckpt);
  the next call records those steps as ``unrecorded_steps``. The child also stops by itself
  after ``--minutes`` plus a margin (``trainer.max_minutes``).
- The corpus may mix layouts: every scene folder is read in the format detected from its
  files (``datasets.format=null``), e.g. Blender renders beside photo captures prepared with
  ``python -m headless_train prepare-capture --orient z-up`` (rotated so that one
  ``--world-up 0,0,1`` fits both).
- ``--dry-run`` runs the same pipeline on the CPU for ``--dry-steps`` steps at tiny crops
  (what the tests do).
- ``--background environment`` trains NPBG++ with the environment background
  (``system.background``); background-less starting weights get zero projections
  (``npbgpp_core.pretrained.widen_for_background``). Without the flag a call continues with
  the run's (or the starting weights') own option; ``stage.json`` records it. A resumed call
  refuses a ``--background`` / ``--input-canvas`` other than the run's, and a ``--weights``
  other than the file the run started from (recorded in ``seed.ckpt``).
- ``--warmup-steps N`` (default 200 on the first call) ramps the lr linearly up over the
  first N steps (``system.warmup_steps``), so that the fresh optimiser does not knock the
  starting weights off their optimum; resumed calls keep the run's setting and continue
  the ramp where last.ckpt left it. Its benefit is not measured yet.
- ``--targets-per-sample K`` (default 1 on the first call) trains up to K target crops per
  set of input views; resumed calls keep the run's setting (recorded in ``stage.json``) and
  refuse another.
- One rule for every option of a resumed call: left out, the run's value (recorded per call
  in ``stage.json``, :func:`stage_settings`); given another value, refused before anything
  runs when the trained state holds it (``--weights``, ``--input-canvas``, ``--background``,
  ``--world-up``, ``--lr``, ``--warmup-steps``, ``--targets-per-sample``), else used and said
  in one line. An ``--override`` of a key an option sets is refused (:data:`OPTION_KEYS`), and
  on a resumed call another ``system.background_lr_scale`` (:data:`OPTIMISER_OVERRIDES`).
  The table of options is in headless_train/README.md.
- ``pack`` makes the corpus small enough: ``python -m headless_train stage pack --corpus
  corpus_env --out .gpurun/corpus --max-side 192`` (images downscaled, clouds subsampled).

Typical GPU call (copy ``.gpurun/`` with the repository, then)::

    python -m headless_train stage --corpus .gpurun/corpus --work .gpurun/stage --minutes 8 --gpus 1
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import oom
from .lifeline import EXIT_SIGTERM, exit_status

if TYPE_CHECKING:
    from npbgpp_core.pretrained import WeightsFile

MAX_CORPUS_MIB = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StageError(ValueError):
    """A stage that cannot run; the message names the file or option."""


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path``, through symbolic links (a corpus of linked scenes)."""
    total = 0
    for dirpath, _, files in os.walk(path, followlinks=True):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def check_corpus(corpus: str, max_mib: float = MAX_CORPUS_MIB) -> list[str]:
    """Scene folder names of a training corpus, after loading every scene's cameras and
    clouds (``npbgpp_core.datasets.corpus.check_corpus``, what ``headless_train check-corpus``
    runs): a broken scene was reported only once the trainer ran, after the work folder and
    its seed were written. StageError naming the folder or file when it is missing, holds
    something that is not a scene, no scene at all or a scene that does not load, or is
    larger than ``max_mib``."""
    from npbgpp_core.datasets import DatasetError
    from npbgpp_core.datasets.corpus import check_corpus as load_corpus

    if not os.path.isdir(corpus):
        raise StageError(f"corpus folder not found: {corpus} (--corpus)")
    size = folder_bytes(corpus) / 2**20  # before loading: an oversized corpus is refused at once
    if size > max_mib:
        raise StageError(f"corpus folder {corpus} is {size:.1f} MiB, more than the {max_mib:g} MiB a device call "
                         "may carry: make it smaller with `python -m headless_train stage pack`")
    try:
        return [os.path.basename(row["scene"]) for row in load_corpus(corpus)]
    except DatasetError as exc:
        raise StageError(f"bad corpus folder (--corpus): {exc}; `python -m headless_train check-corpus {corpus}` "
                         "checks it") from exc


def seed_checkpoint(weights: str | WeightsFile, out: str, world_up: list[float] | None = None) -> str:
    """A headless_train NPBG++ checkpoint holding the network of weights file ``weights``
    (its path, or the file as :func:`start_weights` read it), so ``weights_path=`` can start
    a run from bundled weights; it records the file as ``seeded_from``."""
    from .checkpoints import atomic_torch_save, weights_file_checkpoint

    atomic_torch_save(weights_file_checkpoint(weights, world_up), out)
    return out


def train_overrides(args: argparse.Namespace, run_dir: str, seed: str | None, resume: bool,
                    max_steps: int) -> list[str]:
    """Hydra overrides of the stage's training run (options not filled in by
    :func:`stage_settings`: their first-call defaults)."""
    args = argparse.Namespace(**vars(args))
    fill_first_call_defaults(args)
    gpu = args.gpus > 0 and not args.dry_run
    crop = 16 if args.dry_run else args.crop
    o = [
        f"hydra.run.dir={run_dir}", "datasets=nerf_blender_pretrain",
        # each scene's own layout, as check_corpus detected it: Blender renders (NeRF-Synthetic)
        # and prepared photo captures (COLMAP) train together
        "datasets.format=null", f"datasets.data_root={os.path.abspath(args.corpus)}",
        f"datasets.train_image_size={crop}", "datasets.train_num_samples=2000", "datasets.point_cloud_variants=true",
        "datasets.cache_images=true", f"datasets.selection_count={args.views}",
        f"datasets.targets_per_sample={args.targets_per_sample}",
        # every scene in every epoch (the default rotates 4 scenes per epoch: one stage
        # would see only the first 4)
        "system=npbgpp_sphere", "system.max_scenes_per_train_epoch=null", "system.visibility_scale=1.0",
        f"system.lr={args.lr}",
        f"system.max_points={args.max_points}", f"system.world_up=[{args.world_up}]",
        f"system.amp={'bf16' if gpu and args.amp else 'none'}", f"system.descriptors_save_dir={run_dir}/descriptors",
        f"dataloader.batch_size={1 if args.dry_run else args.batch}",
        f"dataloader.num_workers={0 if args.dry_run else args.workers}",
        f"trainer.gpus={args.gpus if gpu else 0}", "trainer.max_epochs=100000", f"trainer.max_steps={max_steps}",
        # the child's own stop in case this stage's SIGTERM never comes (headless_train.lifeline covers a dead stage)
        f"trainer.max_minutes={child_time_limit_minutes(args.minutes):g}",
        "trainer.limit_val_batches=0", f"trainer.last_checkpoint_every_n_steps={1 if args.dry_run else 100}",
        "trainer.keep_epoch_checkpoints=1", "trainer.enable_progress_bar=false",
        f"loss.gradient_weight={args.gradient_weight}", f"system.input_canvas={args.input_canvas}",
        f"system.background={args.background}", f"system.warmup_steps={args.warmup_steps}",
    ]
    if resume:
        o.append("resume=true")
    elif seed:
        o.append(f"weights_path={seed}")
    return o + list(args.override)


def child_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The training child's command: ``python -m headless_train`` with ``overrides``; with ``--debug``
    under ``python -X faulthandler`` (native code crashing, in training or a DataLoader worker, writes
    the Python stack where it happened into train.log) and with ``hydra.verbose=headless_train`` (the
    traceback of the out-of-memory or worker-crash line it ends with), unless an ``--override`` sets
    hydra.verbose itself. Neither is an override of the run (stage.json does not record them): a
    resumed call without --debug trains the same."""
    if not args.debug:
        return [sys.executable, "-m", "headless_train", *overrides]
    verbose = [] if any(override_key(o) == "hydra.verbose" for o in args.override) else ["hydra.verbose=headless_train"]
    return [sys.executable, "-X", "faulthandler", "-m", "headless_train", *overrides, *verbose]


def checkpoint_state(path: str) -> tuple[int, dict[str, Any]]:
    """(step, headless_train metadata) of the run's last.ckpt, read with
    ``weights_only=True`` so that a planted pickle payload never runs; StageError naming
    the file when it cannot be read. One read per use: a 27 MB last.ckpt (weights, Adam
    moments) takes 0.2-0.4 s, next to a trainer start of 10 s or more."""
    from .checkpoints import META_KEY, CheckpointError, checkpoint_system, load_checkpoint_file

    try:
        ckpt = load_checkpoint_file(path)
    except CheckpointError as exc:  # corrupt, truncated, or pickled code refused
        raise StageError(f"checkpoint {path} is not readable with weights_only=True ({exc}); move it away to start "
                         "the stage afresh") from exc
    try:
        checkpoint_system(ckpt, path)
    except CheckpointError as exc:
        raise StageError(f"{exc}: not a headless_train checkpoint") from exc
    return ckpt.get("global_step", 0), ckpt[META_KEY]


def start_weights(args: argparse.Namespace) -> WeightsFile:
    """The weights a first call starts from (``--weights`` or the bundled file), read once for
    their config and the seed checkpoint; StageError naming ``--weights`` when the file is
    missing or is not NPBG++ weights (it was a traceback)."""
    from npbgpp_core.pretrained import WeightsError, default_weights_path, read_weights

    path = args.weights or default_weights_path("npbgpp")
    try:
        return read_weights(path, "npbgpp")
    except (OSError, WeightsError) as exc:
        raise StageError(f"--weights {path}: {exc}") from None


def check_resumed_weights(args: argparse.Namespace, work: str) -> None:
    """On a resumed call, a ``--weights`` other than the file the run started from (recorded
    as ``seeded_from`` in ``<work>/seed.ckpt``) raises StageError: the call continues from
    last.ckpt, so it was ignored without a word while the card suggested the new file. The
    same file, as a repeated command line gives it, is accepted; when the run records none,
    a warning says that the option is ignored."""
    if not args.weights:
        return
    from npbgpp_core.atomic import same_file

    from .checkpoints import META_KEY, CheckpointError, load_checkpoint_file

    seed = os.path.join(work, "seed.ckpt")
    try:
        recorded = load_checkpoint_file(seed).get(META_KEY, {}).get("seeded_from")
    except (CheckpointError, AttributeError):
        recorded = None
    if not isinstance(recorded, str):
        say(f"warning: --weights {args.weights} is ignored: this call continues the run in {work} from its "
            f"last.ckpt ({seed} does not record the weights it started from)", sys.stderr)
    elif not same_file(args.weights, recorded):
        raise StageError(f"--weights {args.weights}: the run in {work} started from {recorded} (recorded in {seed}) "
                         "and a resumed call continues from its last.ckpt; give that file or no --weights, or start a "
                         f"new --work folder to train from {args.weights}")


def _continued_setting(given: str | None, resumed: dict[str, Any] | None, start: dict[str, Any] | None,
                       key: str, default: str, flag: str) -> str:
    """A stored network setting the call trains with: the option ``flag`` when ``given``, else
    the resumed checkpoint's (``resumed``: its metadata), else the starting weights' (``start``:
    their config); ``default`` for files written before the setting existed. StageError when a
    resumed call is given another value than the run's: its network was trained with that
    one (the trainer applied the new one without a word)."""
    config = resumed.get("config", {}) if resumed is not None else (start or {})
    own = str(config.get(key, default))
    if given and resumed is not None and given != own:
        raise StageError(f"{flag} {given}: this run was trained with {flag} {own}, which a resumed call keeps; "
                         f"drop {flag} or give {own}, or start a new --work folder to train with {given}")
    return given or own


def stage_background(args: argparse.Namespace, resumed: dict[str, Any] | None,
                     start: dict[str, Any] | None) -> str:
    """``--background``, or the one the run continues with (:func:`_continued_setting`;
    'none' for files without it). Weights without a background start an 'environment' run
    with zero projections."""
    return _continued_setting(args.background, resumed, start, "background", "none", "--background")


def stage_input_canvas(args: argparse.Namespace, resumed: dict[str, Any] | None,
                       start: dict[str, Any] | None) -> str:
    """``--input-canvas``, or the run's own or the starting weights' canvas
    (:func:`_continued_setting`): a fixed default of 'square' trained the bundled 'bounds'
    network with another canvas, so its first call changed the network (a warning in
    train.log only)."""
    return _continued_setting(args.input_canvas, resumed, start, "input_canvas", "square", "--input-canvas")


def stage_world_up(text: str) -> list[float]:
    """``--world-up`` as numbers: ``x,y,z`` or an axis name (``+z``, ``-y``, as
    ``system.world_up``); StageError naming the option for anything else (it was a
    traceback, or an error from the trainer after the seed was written)."""
    from npbgpp_core.models.alignment import parse_world_up

    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = None
    try:
        up = parse_world_up(parts if parts is not None else text)
    except ValueError as exc:
        raise StageError(f"--world-up {text}: {exc}") from None
    if up == "auto":
        raise StageError(f"--world-up {text}: the stage needs the corpus's axis (e.g. 0,0,1 or +z), not auto")
    return [float(v) for v in up]


# lr warm-up of a call that starts from weights (--warmup-steps): a fresh Adam's first
# updates are about lr per weight whatever the gradient, which knocks trained weights off
# their optimum (measured: -0.5 to -1 dB held-out in the first ~1,000 steps at lr 1e-4).
DEFAULT_WARMUP_STEPS = 200


def warmup_arg(text: str | int | None) -> int | None:
    """``--warmup-steps`` as given (None: not given), read by the one parser of the setting
    (``npbgpp_core.fitting.warmup_steps_value``); StageError when it is not an integer >= 0."""
    if text is None:
        return None
    from npbgpp_core.fitting import warmup_steps_value

    try:
        return warmup_steps_value(text, "--warmup-steps")
    except ValueError as exc:
        raise StageError(str(exc)) from None


def stage_warmup(given: int | None, resumed: dict[str, Any] | None) -> int:
    """The warm-up of this call: ``given`` (:func:`warmup_arg`) or
    :data:`DEFAULT_WARMUP_STEPS` on a first call; the run's own setting on a resumed call
    (its scheduler state in last.ckpt holds the steps taken, so the warm-up is not
    repeated), StageError when ``given`` asks for another one."""
    if resumed is None:
        return DEFAULT_WARMUP_STEPS if given is None else given
    from npbgpp_core.fitting import warmup_steps_value

    try:
        own = warmup_steps_value(resumed.get("config", {}).get("warmup_steps"), "the run's system.warmup_steps")
    except ValueError as exc:
        raise StageError(f"{exc}: start a new --work folder") from None
    if given is not None and given != own:
        raise StageError(f"this run was started with --warmup-steps {own}; a resumed call keeps it "
                         f"(got --warmup-steps {given}); start a new --work folder to change it")
    return own


def stage_weights_path(work: str) -> str:
    """The weights every call of the stage in ``work`` exports (fp16, with their card)."""
    return os.path.join(work, "npbgpp_sphere_stage.safetensors")


def new_run_hint(work: str, setting: str) -> str:
    """How to get a setting a resumed call refuses: a new run that starts from this run's
    exported weights (a fresh optimiser and warm-up), one wording for every such refusal."""
    return (f"start a new --work folder with --weights {stage_weights_path(work)} to train on from this run's "
            f"weights with {setting}")


# The options a resumed call takes from the run when left out (dest -> flag, first-call default,
# whether another value is refused). Refused: what the trained state holds (the axis the
# network learned about; the lr, which last.ckpt's optimiser and warm-up schedule restore
# over the option's). Per call, used and said: sizes, loss weight, time and machine settings
# the trainer reads afresh on every call. --weights, --input-canvas, --background and
# --warmup-steps follow the same rule through their own readers (last.ckpt and seed.ckpt hold them).
CARRIED: dict[str, tuple[str, Any, bool]] = {
    "world_up": ("--world-up", "0,0,1", True),
    "lr": ("--lr", 2e-4, True),
    "targets_per_sample": ("--targets-per-sample", 1, True),
    "minutes": ("--minutes", 8.0, False),
    "gpus": ("--gpus", 1, False),
    "batch": ("--batch", 8, False),
    "crop": ("--crop", 256, False),
    "views": ("--views", 3, False),
    "workers": ("--workers", 8, False),
    "max_points": ("--max-points", 200000, False),
    "gradient_weight": ("--gradient-weight", 0.0, False),
    "amp": ("--amp/--no-amp", True, False),
    "max_corpus_mib": ("--max-corpus-mib", float(MAX_CORPUS_MIB), False),
    "override": ("--override", [], False),
}


# Why a resumed call refuses another value of a refused CARRIED option (said in the refusal).
REFUSED_WHY = {
    "world_up": "the network was trained about that axis",
    "lr": "last.ckpt's optimiser and warm-up restore it over the option",
    "targets_per_sample": "one run trains one recipe of target crops per set of input views",
}


def _default(name: str) -> Any:
    """The first-call default of :data:`CARRIED` option ``name`` (a list copied: args own theirs)."""
    default = CARRIED[name][1]
    return list(default) if isinstance(default, list) else default


def fill_first_call_defaults(args: argparse.Namespace) -> None:
    """Set every :data:`CARRIED` option of ``args`` left out (None or absent) to its first-call default."""
    for name in CARRIED:
        if getattr(args, name, None) is None:
            setattr(args, name, _default(name))


def _flag_text(name: str, value: Any) -> str:
    """An option as a command line gives it (``--no-amp``, ``--override a=1 --override b=2``)."""
    if name == "amp":
        return "--amp" if value else "--no-amp"
    if name == "override":
        return " ".join(f"--override {o}" for o in value) if value else "no --override"
    return f"{CARRIED[name][0]} {value:g}" if isinstance(value, float) else f"{CARRIED[name][0]} {value}"


def _typed(name: str, value: Any) -> Any:
    """A recorded value as the option's type (ValueError/TypeError when it is not one)."""
    default = CARRIED[name][1]
    if name == "override":
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise ValueError(f"not a list of overrides: {value!r}")
        return list(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"not true/false: {value!r}")
        return value
    if isinstance(default, str):
        return ",".join(f"{float(v):g}" for v in str(value).strip("[]").split(","))
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    return type(default)(value) if isinstance(default, float) else int(str(value))


def _owned_keys() -> set[str]:
    """The config keys the stage itself sets (``train_overrides``), whatever the options."""
    # the options outside CARRIED; train_overrides fills CARRIED's with their defaults
    probe = argparse.Namespace(dry_run=False, corpus=".", input_canvas="square", background="none", warmup_steps=0)
    keys = {o.split("=", 1)[0] for o in train_overrides(probe, "run", "seed", False, 1)}
    return keys | {"resume", "weights_path"}


# Config keys that an option of the stage sets: an --override of one would train with its value
# while stage.json recorded the option's (or, passed later, be lost), so it is refused.
OPTION_KEYS = {
    "datasets.train_image_size": "--crop", "datasets.selection_count": "--views",
    "datasets.targets_per_sample": "--targets-per-sample", "datasets.data_root": "--corpus",
    "system.lr": "--lr", "system.max_points": "--max-points", "system.world_up": "--world-up",
    "system.amp": "--amp/--no-amp", "system.input_canvas": "--input-canvas", "system.background": "--background",
    "system.warmup_steps": "--warmup-steps", "dataloader.batch_size": "--batch", "dataloader.num_workers": "--workers",
    "trainer.gpus": "--gpus", "trainer.max_minutes": "--minutes", "trainer.max_steps": "--minutes / --dry-steps",
    "loss.gradient_weight": "--gradient-weight", "weights_path": "--weights", "hydra.run.dir": "--work",
    "resume": "--work (a call resumes when <work>/run/checkpoints/last.ckpt exists)",
}


# --override keys that, like --lr, set a learning rate: last.ckpt's optimiser restores each
# parameter group's lr over the config (torch's Optimizer.load_state_dict, the warm-up's
# base_lrs), so a resumed call's other value would train with the run's, said as a change.
OPTIMISER_OVERRIDES = {"system.background_lr_scale": 1.0}


def override_key(override: str) -> str:
    """The config key a Hydra override sets (``+key=v``, ``~key``, ``key = v``: ``key``)."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def _override_value(overrides: list[str], key: str, default: float) -> str:
    """The value the last ``--override`` of ``key`` sets (``default`` when none does), written
    as a number when it reads as one (``10`` and ``10.0`` are one value)."""
    values = [o.split("=", 1)[1].strip() for o in overrides
              if "=" in o and override_key(o) == key]
    value = values[-1] if values else default
    try:
        return f"{float(value):g}"
    except ValueError:
        return str(value)


def check_override_keys(overrides: list[str]) -> None:
    """StageError for an ``--override`` of a key that an option sets (:data:`OPTION_KEYS`),
    naming the option to use instead."""
    for o in overrides:
        key = override_key(o)
        if key in OPTION_KEYS:
            raise StageError(f"--override {o}: {key} is set by {OPTION_KEYS[key]}; give that option instead "
                             "(stage.json records the options, and a resumed call keeps or checks them)")


def recorded_settings(call: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The :data:`CARRIED` settings a call in ``stage.json`` trained with, and the names it
    does not record: its ``settings``, else (calls recorded before that key) what its
    ``overrides`` show (a dry run's crop, batch, workers and GPUs are its tiny ones, not the
    options; ``--minutes`` from the child's time limit). ``targets_per_sample`` is always
    known: a call that does not record it trained one target per sample, as every call did
    before the option. StageError when a value is not one of the option's type."""
    settings = call.get("settings")
    overrides = call.get("overrides")
    overrides = [o for o in overrides if isinstance(o, str) and "=" in o] if isinstance(overrides, list) else []
    given = dict(o.split("=", 1) for o in overrides)
    found: dict[str, Any] = {}
    if isinstance(settings, dict):
        found = {k: v for k, v in settings.items() if k in CARRIED}
    else:
        real = not call.get("dry_run", False)
        keys = {"world_up": "system.world_up", "lr": "system.lr", "views": "datasets.selection_count",
                "max_points": "system.max_points", "gradient_weight": "loss.gradient_weight"}
        if real:
            keys.update(crop="datasets.train_image_size", batch="dataloader.batch_size",
                        workers="dataloader.num_workers", gpus="trainer.gpus")
        found = {name: given[key] for name, key in keys.items() if key in given}
        if "trainer.max_minutes" in given:  # child_time_limit_minutes inverted
            try:
                limit = float(given["trainer.max_minutes"])
                found["minutes"] = round(limit - 2.0 if limit <= 22.0 else limit / 1.1, 6)
            except ValueError:
                pass
        if real and given.get("system.amp") == "bf16":
            found["amp"] = True
        elif real and given.get("system.amp") == "none" and found.get("gpus", "0") != "0":
            found["amp"] = False
        if overrides:
            # the stage's own list ends with resume=true or weights_path=...; --override's follow
            ends = [i for i, o in enumerate(overrides) if o == "resume=true" or o.startswith("weights_path=")]
            owned = _owned_keys()
            found["override"] = (overrides[ends[0] + 1:] if ends else
                                 [o for o in overrides if o.split("=", 1)[0] not in owned])
    if "targets_per_sample" not in found:
        # calls recorded before it joined ``settings`` kept it beside them, older ones in their overrides
        found["targets_per_sample"] = next(
            (v for v in (call.get("targets_per_sample"), given.get("datasets.targets_per_sample")) if v is not None),
            _default("targets_per_sample"))
    out: dict[str, Any] = {}
    for name, value in found.items():
        try:
            out[name] = _typed(name, value)
        except (TypeError, ValueError) as exc:
            raise StageError(f"the run's last call records {CARRIED[name][0]} {value!r} ({exc})") from None
    return out, [name for name in CARRIED if name not in out]


def stage_settings(args: argparse.Namespace, resume: bool, calls: list[dict[str, Any]],
                   resumed: dict[str, Any] | None, history: str, work: str) -> list[str]:
    """Fill the :data:`CARRIED` options of ``args`` by the one rule of a resumed call: an
    option left out (None) takes the run's recorded value (its last call in ``stage.json``;
    the axis from last.ckpt itself), the default when nothing records it (said in a note); a
    given value that differs is refused for the options that the trained state holds
    (StageError before anything is written), and used for the per-call ones. A first call
    takes the defaults. Returns the changes of this call, as one line's parts."""
    if not resume:
        fill_first_call_defaults(args)
        return []
    recorded: dict[str, Any] = {}
    missing = list(CARRIED)
    if calls:
        try:
            recorded, missing = recorded_settings(calls[-1])
        except StageError as exc:
            raise StageError(f"{history}: {exc}; repair it or start a new --work folder") from None
    own_up = (resumed or {}).get("config", {}).get("world_up")
    if isinstance(own_up, list | tuple) and len(own_up) == 3:
        recorded["world_up"] = ",".join(f"{float(v):g}" for v in own_up)  # what the network was trained about
        missing = [m for m in missing if m != "world_up"]
    defaults = []
    changes = []
    for name, (flag, _, refused) in CARRIED.items():
        given = getattr(args, name)
        if name in recorded:
            own = recorded[name]
        else:
            own = _default(name)
            if given is None:
                defaults.append(_flag_text(name, own))
        if given is None or (name == "override" and not given):
            setattr(args, name, own)
            continue
        same = (_same_axis(given, own) if name == "world_up" else
                math.isclose(given, own, rel_tol=1e-9) if isinstance(own, float) else given == own)
        if same or name not in recorded:
            continue
        if refused:
            why = REFUSED_WHY[name]
            raise StageError(f"{_flag_text(name, given)}: this run was trained with {_flag_text(name, own)}, which a "
                             f"resumed call keeps ({why}); drop {flag} or give that value, or "
                             + new_run_hint(work, _flag_text(name, given)))
        for key, key_default in OPTIMISER_OVERRIDES.items() if name == "override" else ():
            before, after = _override_value(own, key, key_default), _override_value(given, key, key_default)
            if before != after:
                raise StageError(f"--override {key}={after}: this run was trained with {key}={before}, which a "
                                 "resumed call keeps (last.ckpt's optimiser restores its learning rates over the "
                                 f"config); give --override {key}={before} with the others, or leave every "
                                 "--override out, or " + new_run_hint(work, f"{key}={after}"))
        changes.append(f"{_flag_text(name, own)} -> {_flag_text(name, given)}")
    if defaults:
        why = (f"{history} records no call of the run" if not calls else
               f"the run's last call in {history} was recorded before these settings were")
        say(f"note: {why}, so this resumed call uses the defaults {', '.join(defaults)}", sys.stderr)
    return changes


def _same_axis(a: str, b: str) -> bool:
    from npbgpp_core.models.alignment import same_world_up

    return same_world_up([float(v) for v in a.split(",")], [float(v) for v in b.split(",")])


def read_history(path: str) -> list[dict[str, Any]]:
    """The calls recorded in ``stage.json`` (none when it does not exist); StageError naming
    the file when it is not a JSON list of calls."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            calls = json.load(f)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is not readable JSON ({exc}); repair it or move it away (the run's "
                         "last.ckpt is kept either way)") from None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise StageError(f"{path} is not a list of stage calls; repair it or move it away")
    return calls


def check_numbers(args: argparse.Namespace, recorded: Iterable[str] = (), origin: str = "") -> None:
    """StageError naming the first option whose value can never train: --minutes 0 or less
    started the trainer and stopped it at once ('training wrote no last.ckpt', the option
    unnamed), nan failed in the child; sizes below 1 (--max-points 0 kept no point), negative counts.
    ``recorded``: the options (dest names) whose value a resumed call took from the run's
    record, said to come from ``origin`` (a bad value written into stage.json by hand or an
    older version read as if the flag had been given)."""
    taken = set(recorded)

    def refuse(name: str, flag: str, value: str, rule: str) -> None:
        where = f" ({origin}, as the flag was left out)" if name in taken and origin else ""
        raise StageError(f"{flag} {value}{where}: {rule}")

    if not args.dry_run and args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        refuse("minutes", "--minutes", f"{args.minutes:g}", "must be a number of minutes above 0")
    for name in ("batch", "crop", "views", "targets_per_sample", "dry_steps", "max_points"):
        value = getattr(args, name)
        if value is not None and value < 1:  # None: not given (a resumed call: the run's own)
            refuse(name, "--" + name.replace("_", "-"), str(value), "must be at least 1")
    for name in ("gpus", "workers"):
        value = getattr(args, name)
        if value is not None and value < 0:  # a negative count ran on the CPU / without workers, unsaid
            refuse(name, f"--{name}", str(value), "must be 0 or more")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        refuse("lr", "--lr", f"{args.lr:g}", "must be a number above 0")


def check_gpus(gpus: int, origin: str | None) -> None:
    """StageError when ``gpus`` asks for more CUDA GPUs than this machine has, before anything
    is written: the trainer refused it only after its start, in a failed call whose log tail
    named ``trainer.gpus``. ``origin`` says where a value not on the command line came from
    (a GPU session's run resumed on a CPU machine takes ``--gpus 1`` from ``stage.json``)."""
    if gpus <= 0:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > visible:
        where = f" ({origin}, as the flag was left out)" if origin else ""
        raise StageError(f"--gpus {gpus}{where}: this machine has {visible or 'no'} CUDA GPU"
                         f"{'' if visible == 1 else 's'}; give --gpus {visible} to train "
                         f"{'on the CPU' if visible == 0 else 'on the GPUs here'}")


def run_stage(args: argparse.Namespace) -> dict[str, Any]:
    """Seed or resume, train for ``--minutes`` (or ``--dry-steps``), export weights + card."""
    warmup = warmup_arg(args.warmup_steps)  # a bad value fails before anything is read
    check_numbers(args)  # the options given, before anything is read; again once the run's are filled in
    if args.world_up is not None:
        args.world_up = ",".join(f"{v:g}" for v in stage_world_up(args.world_up))
    check_override_keys(args.override)
    work = os.path.abspath(args.work)
    if os.path.exists(work) and not os.path.isdir(work):
        raise StageError(f"--work {args.work} is a file; give a folder (new or one an earlier call used)")
    from npbgpp_core.atomic import holds

    if holds(args.corpus, work):  # before the corpus check, which would call it a broken scene
        # the trainer would read the work folder as a scene and fail, and every later call too
        raise StageError(f"--work {args.work} is inside --corpus {args.corpus}; put it outside the corpus folder")
    run_dir = os.path.join(work, "run")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    resume = os.path.isfile(last)
    start_step, resumed = checkpoint_state(last) if resume else (0, None)
    history = os.path.join(work, "stage.json")
    calls = read_history(history)  # before training: a bad file failed only after the whole call
    # the run's options (--max-corpus-mib too) before the corpus check that uses one
    left_out = {name for name in CARRIED if getattr(args, name) is None}
    changes = stage_settings(args, resume, calls, resumed, history, work)
    # the left-out options the run's last call records (read by stage_settings): a bad one is named as the record's
    from_record = left_out & set(recorded_settings(calls[-1])[0]) if resume and calls else set()
    record_origin = f"the run's value, recorded by call {len(calls)} in {history}"
    check_numbers(args, from_record, record_origin)
    if not args.dry_run:  # a dry run trains on the CPU whatever --gpus says
        check_gpus(args.gpus, record_origin if "gpus" in from_record else
                   None if "gpus" not in left_out else "the default")
    up = stage_world_up(args.world_up)
    scenes = check_corpus(args.corpus, args.max_corpus_mib)
    # every refusal before the work folder is made or written into
    weights = None if resume else start_weights(args)
    if resume:
        check_resumed_weights(args, work)
    start = None if weights is None else dict(weights.config)
    args.background = stage_background(args, resumed, start)
    args.input_canvas = stage_input_canvas(args, resumed, start)
    args.warmup_steps = stage_warmup(warmup, resumed)
    corpus_before = calls[-1].get("corpus") if resume and calls else None
    if isinstance(corpus_before, str) and corpus_before != os.path.abspath(args.corpus):
        changes.insert(0, f"--corpus {corpus_before} -> {os.path.abspath(args.corpus)}")
    if changes:
        say(f"stage: this resumed call changes {', '.join(changes)}; the run's other settings are kept", sys.stderr)
    seed = None
    if weights is not None:
        os.makedirs(work, exist_ok=True)
        seed = seed_checkpoint(weights, os.path.join(work, "seed.ckpt"), up)
    max_steps = start_step + args.dry_steps if args.dry_run else 10**9
    overrides = train_overrides(args, run_dir, seed, resume, max_steps)
    cmd = child_command(args, overrides)
    log_path = os.path.join(work, "train.log")
    os.makedirs(work, exist_ok=True)
    # from here to the record a stop signal is held (run_child passes one held before it on, and
    # those during training): one that came during the export killed the stage with no weights
    # and no record
    with held_stop_signals() as late:
        t0 = time.time()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== stage call {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {' '.join(cmd)}\n")
            log.flush()
            call_start = log.tell()  # this call's part of the log (memory_note)
            rc, timed_out, stopped_by = run_child(cmd, log, None if args.dry_run else args.minutes * 60, STOP_GRACE_S,
                                                  pending=late)
        seconds = time.time() - t0
        # out of memory: what to lower in this stage's options ("" for any other end)
        memory = memory_note(log_path, call_start, overrides, rc, timed_out or stopped_by is not None)
        if not os.path.isfile(last):
            raise StageError(f"training wrote no {last} (exit code {rc}){stop_note(late, stopped_by)}"
                             f"{memory}; see {log_path}{log_tail(log_path)}")
        end_step = checkpoint_state(last)[0]
        # 0: max_steps or the child's own time limit; EXIT_SIGTERM: the SIGTERM this call sent
        finished = rc == 0 or (rc == EXIT_SIGTERM and (timed_out or stopped_by is not None))
        if not finished and stopped_by is None and end_step == start_step:
            raise StageError(f"training exited with code {rc} and took no step{stop_note(late, stopped_by)}"
                             f"{memory}; see {log_path}{log_tail(log_path)}")
        info: dict[str, Any] = {
            "corpus": os.path.abspath(args.corpus), "scenes": scenes, "resumed": resume, "start_step": start_step,
            "end_step": end_step, "seconds": round(seconds, 1), "exit_code": rc, "overrides": overrides,
            "dry_run": bool(args.dry_run), "background": args.background, "warmup_steps": args.warmup_steps,
            "targets_per_sample": args.targets_per_sample,
            # every option a resumed call takes from the run when left out (recorded_settings)
            "settings": {name: getattr(args, name) for name in CARRIED},
            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        if stopped_by is not None:
            info["stopped_by"] = signal.Signals(stopped_by).name
        recorded = calls[-1].get("end_step", 0) if calls else 0
        if resume and recorded != start_step:
            # a call killed before it could record itself (SIGKILL): its steps are in last.ckpt
            info["unrecorded_steps"] = [recorded, start_step]
        from npbgpp_core.atomic import atomic_write_bytes

        card = os.path.join(work, "card.json")
        atomic_write_bytes(card, json.dumps({"stage": info}, indent=2).encode("utf-8"))
        out = stage_weights_path(work)
        from .export_weights import main as export_main

        debug = ["--debug"] if args.debug else []  # its error raised with the traceback, as this call's own
        if export_main(["--checkpoint", last, "--out", out, "--fp16", "--card-json", card] + debug) != 0:
            raise StageError(f"exporting {last} failed{stop_note(late, stopped_by)}")
        info["weights"] = out
        calls.append(info)
        atomic_write_bytes(history, json.dumps(calls, indent=2).encode("utf-8"))
    if not finished and stopped_by is None:
        # the failure outranks a stop that came after it: the stop changed nothing, and its exit
        # (128 + the signal: "run again to continue") would hide a failure the next call likely repeats
        note = stop_note(late, stopped_by) + (" until the call was recorded" if late else "")
        raise StageError(f"training exited with code {rc} at step {end_step} (recorded in {history}{note})"
                         f"{memory}; see {log_path}{log_tail(log_path)}")
    if late and stopped_by is None:  # asked to stop after training: the call is whole, the exit says so
        info["stopped_by"] = signal.Signals(late[0]).name
    return info


@contextlib.contextmanager
def held_stop_signals() -> Iterator[list[int]]:
    """Within the block, the first stop signal (:data:`STOP_SIGNALS`) is held, not acted on:
    the list it yields gets it, and the caller ends the call whole and exits with it; a second
    one acts at once (the default: the process ends), so a stage is never stuck
    (:func:`install_stop_handlers`)."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        held.append(signum)

    previous = install_stop_handlers(hold)
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def install_stop_handlers(handler: Any) -> dict[int, Any]:
    """``handler`` for each of :data:`STOP_SIGNALS`; the handlers it replaced, to restore.
    Only in the main thread (elsewhere Python cannot), and not for a signal this process was
    started ignoring (``nohup`` ignores SIGHUP, a background job SIGINT)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, handler)
    return previous


# How long the child may take to write last.ckpt after SIGTERM before it is killed.
STOP_GRACE_S = 120.0
# Signals that stop a stage: each is passed on to the training child as one SIGTERM.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


def child_time_limit_minutes(minutes: float) -> float:
    """The training child's own backstop (``trainer.max_minutes``): the stage's minutes plus
    a margin, so it only acts when the stage's SIGTERM never came (stage gone or stuck)."""
    return minutes + max(2.0, 0.1 * minutes)


def stop_note(late: list[int], stopped_by: int | None) -> str:
    """What the error line of a call that fails (exit 2) adds for a stop signal: one that
    stopped training (``stopped_by``), or one that came after it and was held
    (:func:`held_stop_signals`, ``late``). The failure is the call's outcome, but whoever sent
    the signal reads that it arrived."""
    if stopped_by is not None:
        return f"; {signal.Signals(stopped_by).name} stopped training"
    if late:
        return f"; {signal.Signals(late[0]).name} came after training and was held"
    return ""


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return ""
    return ":\n" + "".join("  | " + line for line in tail).rstrip("\n")


# The options of a stage that make a training step need less memory, with the config keys they set.
MEMORY_OPTIONS = (("--batch", "dataloader.batch_size"), ("--crop", "datasets.train_image_size"),
                  ("--views", "datasets.selection_count"))


def memory_note(log_path: str, start: int, overrides: list[str], rc: int | None = None,
                stopped_here: bool = False) -> str:
    """When this call's training ran out of memory, what to lower in the stage's own options,
    with the values the child trained with; "" otherwise. Out of memory is the child's own
    error line (:mod:`headless_train.oom`'s, naming config keys) at the end of this call's part
    of the log (from ``start``: an earlier call's is not this one's), or a SIGKILL the stage did
    not send (``stopped_here``: its own stop and its kill after the grace time), on Linux most
    often the kernel's out-of-memory killer, which leaves no line. A DataLoader worker's crash
    line (:data:`headless_train.oom.WORKER_CRASH_LINE`: native code, not memory) gets the stage's
    way to where it fails instead."""
    from .oom import OUT_OF_MEMORY_LINE, SHARED_MEMORY_FIX, WORKER_CRASH_LINE

    try:
        with open(log_path, "rb") as f:
            f.seek(max(start, os.path.getsize(log_path) - 65536))  # the end: a long run logs much
            tail = f.read().decode("utf-8", errors="replace").splitlines()[-15:]
    except OSError:
        tail = []
    found = next((m for line in tail if (m := OUT_OF_MEMORY_LINE.search(line))), None)
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    options = MEMORY_OPTIONS
    if found is not None and "DataLoader worker" in found.string:  # a worker killed (memory.worker_signal)
        options = (("--workers", "dataloader.num_workers"),) + options
    lower = [f"{flag} (now {values.get(key, '?')})" for flag, key in options]
    advice = f"lower {', '.join(lower[:-1])} or {lower[-1]}"
    if found is not None:
        note = f"; it ran out of {found[1]} memory: {advice}"
        if found[1] == "shared":  # a worker's bus error (memory.shared_memory_worker)
            note += f", {SHARED_MEMORY_FIX}"
    elif rc == -getattr(signal, "SIGKILL", 9) and not stopped_here:
        note = ("; it was killed (SIGKILL), most often by the system's out-of-memory killer when training needs more "
                f"memory than this computer has (on Linux the system log says so: journalctl -k or dmesg): {advice}")
    elif any(WORKER_CRASH_LINE.search(line) for line in tail):
        return (f"; a DataLoader worker crashed (native code, not memory): call again with --debug (training then runs "
                f"under python -X faulthandler, which writes where it crashed into the log), with --workers 0 (now "
                f"{values.get('dataloader.num_workers', '?')}) to crash in the training process itself")
    else:
        return ""
    if (found is None or found[1] == "host") and values.get("datasets.cache_images") == "true":
        note += ", or give --override datasets.cache_images=false (the stage keeps every view decoded in memory)"
    return note


def run_child(cmd: list[str], log: Any, timeout_s: float | None, grace_s: float,
              poll_s: float = 0.5, pending: Sequence[int] = ()) -> tuple[int, bool, int | None]:
    """Run the training command ``cmd`` (output to ``log``) until it exits; after
    ``timeout_s`` send it SIGTERM (it writes last.ckpt and exits 143). Returns
    (exit code, timed out, the signal that stopped the stage or None).

    The child can never outlive this process:
    - it runs in its own session, so a terminal's Ctrl-C or hang-up reaches only this
      process, which passes SIGTERM / SIGINT / SIGHUP on as one SIGTERM, then waits for the
      checkpoint (a second signal kills the child at once);
    - it gets ``HEADLESS_TRAIN_PARENT_PID`` (:mod:`headless_train.lifeline`): if this process
      is killed outright (SIGKILL), the child receives SIGTERM from the kernel (Linux) or its
      own watchdog;
    - a child that does not exit ``grace_s`` after its SIGTERM is killed (checkpoints are
      written atomically, so the previous last.ckpt stays intact).
    Signal handlers are installed only in the main thread (elsewhere Python cannot), and not
    for a signal this process was started ignoring (``nohup`` ignores SIGHUP). ``pending``:
    stop signals the caller held (:func:`held_stop_signals`) before these handlers took over,
    passed on at once."""
    from .lifeline import PARENT_ENV

    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    received: list[int] = []
    term_sent_at: list[float] = []

    def stop(kill: bool = False) -> None:
        if kill:
            proc.kill()
        elif not term_sent_at:
            proc.send_signal(signal.SIGTERM)  # the trainer writes last.ckpt and exits
            term_sent_at.append(time.monotonic())

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        stop(kill=len(received) > 1)

    previous = install_stop_handlers(on_signal)
    if pending:
        on_signal(pending[0], None)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out = False
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if deadline is not None and now >= deadline and not term_sent_at:
                timed_out = True
                stop()
            if term_sent_at and now - term_sent_at[0] > grace_s:
                stop(kill=True)
    finally:
        # Also on an error in this loop: the child must not run on unsupervised.
        if proc.poll() is None:
            stop()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc, timed_out, (received[0] if received else None)


def machine() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def scene_patterns(scenes: str | None) -> list[str]:
    """The names or shell patterns a ``--scenes`` value gives (comma-separated, blanks
    dropped); none: every scene."""
    return [p.strip() for p in (scenes or "").split(",") if p.strip()]


def select_scene_names(names: Iterable[str], scenes: str | None) -> list[str]:
    """The ``names`` that ``--scenes`` keeps: comma-separated names or shell patterns (case
    matters, as folder names do on Linux); every name when ``scenes`` is empty. The one rule
    of ``pack`` and of the GPU kit, which checks a pattern before it renders anything."""
    patterns = scene_patterns(scenes)
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def pack(corpus: str, out: str, max_side: int, max_points: int, max_mib: float,
         scenes: str | None = None) -> dict[str, Any]:
    """Copy ``corpus`` to ``out`` with images downscaled to ``max_side`` (PNG) and every
    .ply subsampled to ``max_points`` (seed 123); StageError when the result is still over
    ``max_mib``. ``scenes``: comma-separated names or shell patterns of the scene folders to
    copy (default: all). Pixel intrinsics of NeRF-style ``transforms_*.json`` files (``w``,
    ``h``, ``fl_x``, ``fl_y``, ``cx``, ``cy``) are scaled with their images (COLMAP models
    are left as they are: the loader scales a camera to its image). Folders a renderer is
    still writing (``*.partial-<pid>``) and hidden ones are left out; ``out`` appears only
    when complete (``npbgpp_core.atomic.atomic_directory``). Scene folders may be symbolic
    links (they are followed); a result without any image is refused. Returns ``out``, its
    MiB and ``scene_bytes`` (scene folder name -> bytes written), counted while copying."""
    import numpy as np
    from PIL import Image

    from npbgpp_core.atomic import atomic_directory, is_listed_name
    from npbgpp_core.image_size import fit_long_side
    from npbgpp_core.ply import load_scene_cloud, save_ply

    if not os.path.isdir(corpus):
        raise StageError(f"corpus folder not found: {corpus}")
    if os.path.exists(out):
        raise StageError(f"{out} exists; remove it or pick another --out")
    from npbgpp_core.atomic import holds

    if holds(corpus, out):
        # a folder in the corpus that is not a scene: every later stage or pack of it failed
        raise StageError(f"--out {out} is inside --corpus {corpus}; put it outside the corpus folder")
    resized: dict[str, tuple[float, float]] = {}  # packed image path without extension -> (sx, sy)
    transforms: list[tuple[str, str]] = []  # (scene, packed transforms_*.json): scaled after the images
    scene_bytes: dict[str, int] = {}  # bytes written per scene folder (top-level files count under "")
    images = 0
    with atomic_directory(out) as tmp:
        # one walk of the corpus; sizes are counted as files are written (no walk of the output)
        for dirpath, dirnames, files in os.walk(corpus, followlinks=True):
            rel = os.path.relpath(dirpath, corpus)
            if rel == os.curdir:
                listed = [d for d in dirnames if is_listed_name(d)]
                dirnames[:] = select_scene_names(listed, scenes)
                if not dirnames and scene_patterns(scenes):
                    raise StageError(f"no scene folder of {corpus} matches --scenes {scenes!r}")
            scene = "" if rel == os.curdir else rel.split(os.sep, 1)[0]
            dst_dir = os.path.join(tmp, rel)
            os.makedirs(dst_dir, exist_ok=True)
            for f in files:
                src, dst = os.path.join(dirpath, f), os.path.join(dst_dir, f)
                low = f.lower()
                oom.step(f"packing {src}", pack_memory_advice(low))
                if low.endswith((".png", ".jpg", ".jpeg")):
                    img = _open_corpus_image(src)
                    with img:
                        w, h = img.size
                        if max(w, h) > max_side:
                            nw, nh = fit_long_side((w, h), max_side)
                            img = img.resize((nw, nh), Image.Resampling.BOX)
                            resized[os.path.splitext(os.path.normpath(dst))[0]] = (nw / w, nh / h)
                        img.save(dst)
                    images += 1
                elif low.endswith(".ply"):
                    try:  # a splat file: the splats its scene reads, as opaque points
                        pc = load_scene_cloud(src)
                    except (OSError, ValueError) as exc:
                        # e.g. a splat file none of whose splats a scene keeps: the scene could not load it
                        raise StageError(f"{src}: not a point cloud a scene can read ({exc}); fix or remove it, "
                                         "or leave its scene out with --scenes (nothing was written)") from None
                    keep = np.arange(len(pc.points))
                    if len(keep) > max_points:
                        keep = np.sort(np.random.default_rng(123).choice(len(keep), max_points, replace=False))
                    save_ply(dst, pc.points[keep], None if pc.colors is None else pc.colors[keep])
                elif low.endswith((".json", ".txt", ".bin", ".md")):
                    # a plain copy: ``tmp`` is atomic_directory's folder, removed whole on any error
                    shutil.copyfile(src, dst)
                    if f.startswith("transforms_") and low.endswith(".json"):
                        transforms.append((scene, dst))
                        continue  # counted once rewritten
                else:
                    continue
                scene_bytes[scene] = scene_bytes.get(scene, 0) + os.path.getsize(dst)
        oom.step(f"scaling the cameras of {len(transforms)} scenes", "")  # no file's advice
        for scene, path in transforms:
            scale_transforms(path, resized)
            scene_bytes[scene] = scene_bytes.get(scene, 0) + os.path.getsize(path)
        if not images:
            raise StageError(f"corpus folder {corpus} holds no images to pack (nothing was written)")
        size = sum(scene_bytes.values()) / 2**20
        if size > max_mib:
            raise StageError(f"packed corpus {out} would be {size:.1f} MiB, over {max_mib:g}: use a smaller "
                             "--max-side, --max-points or fewer scenes (nothing was written)")
    scene_bytes.pop("", None)
    return {"out": out, "mib": round(size, 2), "scene_bytes": scene_bytes}


def pack_memory_advice(name: str) -> str:
    """What to do when packing the file ``name`` (lower case) runs out of memory: pack reads one
    photo or cloud at a time, whole, so only that file made smaller or left out helps."""
    leave_out = "leave its scene out with --scenes; nothing was written"
    if name.endswith((".png", ".jpg", ".jpeg")):
        return f"downscale it first (any image editor), or {leave_out}"
    return leave_out if name.endswith(".ply") else ""


def _open_corpus_image(path: str) -> Any:
    """``path`` opened and loaded by PIL; StageError naming it when PIL refuses it: too many
    pixels (the readers' message, :func:`~npbgpp_core.image_size.too_many_pixels`; PIL's own
    named no file and called it an attack) or not an image it reads. Torch-free, as pack is."""
    from PIL import Image

    from npbgpp_core.image_size import too_many_pixels

    leave_out = "leave its scene out with --scenes (nothing was written)"
    img = None
    try:
        img = Image.open(path)
        img.load()  # some formats check the size again as they decode (TIFF)
        return img
    except Image.DecompressionBombError as exc:
        message = too_many_pixels(path, exc, f"Downscale it first (any image editor), or {leave_out}")
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        message = f"{path}: not an image PIL reads ({exc}); fix or remove it, or {leave_out}"
    if img is not None:
        img.close()
    raise StageError(message)


PIXEL_KEYS_X, PIXEL_KEYS_Y = ("w", "fl_x", "cx"), ("h", "fl_y", "cy")


def scale_transforms(path: str, resized: dict[str, tuple[float, float]]) -> None:
    """Rewrite the NeRF-style ``transforms_*.json`` at ``path`` for images that :func:`pack`
    downscaled (``resized``: packed image path without extension -> (sx, sy)): every frame
    whose image was resized gets its pixel intrinsics (its own or the file's) scaled, as
    per-frame values; the file-level ones are scaled too when every frame shares one scale.
    Angles (``camera_angle_x``) do not depend on the image size. StageError naming the
    file when it is not a transforms file."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not readable JSON ({exc})") from exc
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list):
        return
    keys = PIXEL_KEYS_X + PIXEL_KEYS_Y
    if not any(k in meta for k in keys) and not any(isinstance(fr, dict) and k in fr for fr in frames for k in keys):
        return
    root = os.path.dirname(path)
    scales = []
    for fr in frames:
        fp = fr.get("file_path") if isinstance(fr, dict) else None
        base = os.path.splitext(os.path.normpath(os.path.join(root, fp)))[0] if isinstance(fp, str) else None
        scales.append(resized.get(base) if base is not None else None)
    if not any(scales):
        return
    shared = scales[0] if all(sc == scales[0] for sc in scales) else None

    def scaled(value: Any, factor: float, key: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StageError(f"{path}: {key} is not a number ({value!r})")
        return round(value * factor) if key in ("w", "h") else value * factor

    for fr, sc in zip(frames, scales, strict=True):
        if sc is None:
            continue
        for k in keys:
            value = fr.get(k, None if shared else meta.get(k))
            if value is not None:
                fr[k] = scaled(value, sc[0] if k in PIXEL_KEYS_X else sc[1], k)
    for k in keys:
        if k in meta:
            if shared:
                meta[k] = scaled(meta[k], shared[0] if k in PIXEL_KEYS_X else shared[1], k)
            elif all(sc is not None for sc in scales):
                del meta[k]  # every frame carries its own scaled value
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def parse_pack_args(argv: list[str]) -> argparse.Namespace:
    """Options of ``stage pack``: a corpus copied small enough for a device call."""
    p = argparse.ArgumentParser(prog="python -m headless_train stage pack",
                                description="Copy a corpus small enough for a stage: images downscaled (NeRF-style "
                                            "pixel intrinsics scaled with them), clouds subsampled.")
    p.add_argument("--corpus", required=True, help="folder of scene folders (linked scene folders are followed)")
    p.add_argument("--out", required=True,
                   help="the packed corpus folder (new, not inside --corpus; written only when complete)")
    p.add_argument("--max-side", type=int, default=192, help="longer image side in pixels (default 192)")
    p.add_argument("--max-points", type=int, default=60000, help="points kept per cloud (default 60000)")
    p.add_argument("--max-mib", type=float, default=MAX_CORPUS_MIB - 4,
                   help=f"largest packed corpus; a bigger one is refused (default {MAX_CORPUS_MIB - 4:g})")
    p.add_argument("--scenes", default=None,
                   help="comma-separated scene folder names or shell patterns (default: all)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train stage", description=__doc__.split("\n\n")[0],
                                epilog="A resumed call (same --work) takes every option it leaves out from the "
                                       "run (stage.json); --world-up, --lr, --weights, --input-canvas, "
                                       "--background, --warmup-steps and --targets-per-sample cannot change, the "
                                       "others can and the call says so (headless_train/README.md). "
                                       "`python -m headless_train stage pack --help`: make a corpus small enough.")
    p.add_argument("--corpus", required=True, help="folder of training scenes (<= 64 MiB)")
    p.add_argument("--work", required=True, help="stage folder: run/, weights, card, stage.json")
    p.add_argument("--weights", default=None,
                   help="NPBG++ weights the first call starts from (default: bundled); a resumed call accepts only "
                        "the same file")
    # None: not given; a resumed call takes the run's recorded value (stage_settings)
    p.add_argument("--minutes", type=float, default=None, help="training time of this call (default 8)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (default 1; 0: train on the CPU)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 8)")
    p.add_argument("--crop", type=int, default=None, help="training crop side in pixels (default 256)")
    p.add_argument("--views", type=int, default=None, help="input views per sample (default 3)")
    p.add_argument("--targets-per-sample", type=int, default=None,
                   help="target crops per set of input views (datasets.targets_per_sample; default 1 on a first "
                        "call: one, as published; K > 1 adds up to K - 1 other training views of the first crop's "
                        "points); a resumed call keeps the run's setting")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="system.lr (default 2e-4); a resumed call keeps the run's (its optimiser holds it)")
    p.add_argument("--max-points", type=int, default=None, help="system.max_points (default 200000)")
    p.add_argument("--world-up", default=None, help="up axis of the corpus: x,y,z or an axis name like +z "
                                                       "(default 0,0,1, Blender's); a resumed call keeps the run's")
    p.add_argument("--gradient-weight", type=float, default=None, help="loss.gradient_weight (default 0)")
    p.add_argument("--input-canvas", default=None, choices=("square", "bounds"),
                   help="system.input_canvas (default: the resumed run's, else the starting weights'; bounds: "
                        "half the extractor pixels; stored in the weights)")
    p.add_argument("--background", default=None, choices=("none", "environment"),
                   help="system.background (default: the resumed run's, else the starting weights'); "
                        "weights without one start 'environment' with zero projections")
    p.add_argument("--warmup-steps", default=None,
                   help=f"linear lr warm-up over this many steps (system.warmup_steps; default "
                        f"{DEFAULT_WARMUP_STEPS} on a call that starts from weights, 0 turns it off); a resumed "
                        "call keeps the run's setting")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on the GPU (default); --no-amp: fp32")
    p.add_argument("--max-corpus-mib", type=float, default=None,
                   help=f"largest corpus accepted (default {MAX_CORPUS_MIB:g}, what a device call carries)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override (repeatable; not for a key an option sets)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny crops, --dry-steps steps")
    p.add_argument("--dry-steps", type=int, default=2, help="steps of a --dry-run (default 2)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    oom.reset()
    packing = bool(argv) and argv[0] == "pack"
    args = parse_pack_args(argv[1:]) if packing else parse_args(argv)

    def body() -> int:
        if packing:
            print(json.dumps(pack(args.corpus, args.out, args.max_side, args.max_points, args.max_mib, args.scenes)))
            return 0
        return say_outcome(run_stage(args))

    # out of memory in the stage's own process (pack reads a photo or a cloud at a time): one line too
    return oom.run_command(body, (StageError,), args.debug, "cpu", write=lambda line: say(line, sys.stderr))


def say_outcome(info: dict[str, Any]) -> int:
    """Say how the stage call ``info`` ended; its exit status."""
    if "stopped_by" in info:
        name = info["stopped_by"]
        say(f"stage stopped by {name}: steps {info['start_step']} -> {info['end_step']} saved in last.ckpt, weights "
            f"{info['weights']}, call recorded in stage.json; run the same command again to continue", sys.stderr)
        return exit_status(signal.Signals[name])
    say(f"stage: steps {info['start_step']} -> {info['end_step']} in {info['seconds']:.0f} s; "
        f"weights {info['weights']}", sys.stdout)
    return 0


def say(text: str, stream: Any) -> None:
    """Print, ignoring a terminal that is gone (the stage may be ending because it closed)."""
    try:
        print(text, file=stream, flush=True)
    except OSError:
        pass
