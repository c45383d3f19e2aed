"""A lent GPU session in two `run` calls: training first (issue #11), then speed (#16, #12).

Prepared here on the CPU, run there (a bare H200/H100 machine: python3 with a CUDA torch,
no registry, at most 64 MiB of carried files, 10 minutes a command, 15 minutes of device
time in all, results only through ``$OUT``: at most 8 files of 16 MiB)::

    .venv/bin/python bench/gpu_session.py prepare --corpus /work/trainD/ready   # or `make gpu-kit`
    .venv/bin/python bench/gpu_session.py plan          # prints the two `run` calls again

On a machine without a corpus, ``prepare --render-envs N|auto --render-objects N|auto
--captures DIR`` (``make gpu-kit-fresh [CAPTURES=DIR]``) first renders the environment scenes
``env_1..env_N`` and the objects on white ``random_1..random_N`` missing in ``.gpurun/scenes``
(or ``--corpus``) with MODEL_CARD's commands (``auto``: as many of each as fill the corpus
budget), and packs the three Z-up training captures of ``DIR`` (``skull``, ``lund``,
``socketed_axe``, each once) with them: the model card's three families. Without them the kit
is built all the same, with a warning naming the command that rebuilds them. Each part's time
is printed; a prepare stopped by a signal or an error says what is done and what remains, and
the same command resumes (finished scenes and kit parts are kept).

``prepare`` builds the ignored folder ``.gpurun/`` (the kit):

- ``whl/``       pure-Python wheels of what the device's python lacks (hydra-core, omegaconf,
                 antlr4 runtime, plyfile; pinned as in requirements.txt), installed there with
                 ``pip install --no-index`` into a temporary folder only when missing;
- ``corpus/``    the training corpus downscaled by ``python -m headless_train stage pack``
                 and cut to a balanced set of scenes that fits the carried-size budget (room
                 is kept for the stage state of a resumed call, see below): taken round-robin
                 over the families (:func:`balanced_choice`), so each is represented and
                 environments and objects stay equal, as in the card; each capture once (the
                 card's 3 links a capture to 80 rendered scenes are under one entry a capture
                 at the kit's 10-30 scenes);
- ``scenes/``    only with ``--render-envs`` / ``--render-objects`` and no ``--corpus``: the
                 full-size renders that ``corpus/`` is packed from (never carried);
- ``densify/``   the scene of ``bench_densify.py --gpu`` (100 Cycles views of 1280x720: bpy
                 exists only here, so it is rendered here, about 15-20 minutes on 2 cores);
- ``stage/``     only with ``--resume-from DIR``: the stage folder returned by an earlier
                 ``train`` call, so the next one continues it exactly (weights, Adam, steps);
- ``start.safetensors`` only with ``--start-weights FILE``: the weights a first call starts from.

Modes on the device (``--out`` defaults to ``$OUT``; each step has its own time limit inside
``--budget-s``, a failed step is reported and the next one runs; the log is tee'd into
``$OUT/<mode>.log`` and a summary table ends the output):

- ``train``: python deps, CUDA rasterizer build, ``bench/bench_train.py`` on CUDA at batch 8,
  256^2 crops, 3 input views, bf16 (first and time-boxed, so the throughput figures come
  back whatever the stage does): the recipe's rate with DataLoader workers, then
  ``--compare batched,batched_k3`` (one target against three per set of input views,
  interleaved on the same batches; each round's batches are loaded in the main process
  before the steps are timed, so the step seconds are the step alone, comparable with the
  recipe's rate, and the loading is reported apart); then ``python -m headless_train stage --gpus
  1`` on ``.gpurun/corpus`` for the minutes the budget leaves (first call: from the shipped
  ``npbgpp_sphere.safetensors`` with the default 200-step warm-up; with ``.gpurun/stage``:
  resumed), with ``--targets-per-sample K`` when ``prepare``/``plan`` (and so the call) got
  it (left out: 1 on a first call, today's recipe, the run's own on a resumed one; a K the
  kit's run did not train with is refused by ``prepare`` and named by ``plan``). Returns the
  new weights, ``stage.json``, the two bench JSONs, the BENCHMARKS.md sections written there,
  the log, and the stage state (last.ckpt with Adam moments is 26 MiB, more than one returned
  file may hold) as a tar in parts of at most 15 MiB, which ``prepare --resume-from`` joins
  again: 8 files, the most that come back.
- ``speed``: ``bench/gpu_speed.py`` within its budget, then ``bench/bench_densify.py --gpu``
  on the carried scene; returns their JSON / the BENCHMARKS.md sections and the log.

Time (the constants after ``SESSION_DEVICE_S``, the one source of these figures): one machine
start (about 90 s) and both calls must fit the session's 15 minutes of device time, so each
call gets ``timeout_s`` 405, of which its ``--budget-s`` 360 (45 s go to python's start, the
copies and the summary; up to 20 of them to a hung stage's backstop, SIGTERM 10 s after
the stage's own end, SIGKILL 30 s later), and the second call should follow the first at
once (a machine stays warm 30 s; a new start costs minutes and none starts with under 4
left). ``--budget-s`` and ``prepare --budgets`` take 60..555 s (``--budgets train=540`` for
one long training call alone: ``plan`` then says the two no longer fit together). Training
gets the device first:
each bench step (limits 110 and 45 s; unmeasured on a GPU) runs only when its whole limit
still leaves the stage ``MIN_STAGE_MINUTES`` (2) of training, else it is skipped and the log
says so. In the default split, after python's checks, the deps and the CUDA build (26-34 s
measured, about 50 s in all), the 310 s left hold bench_train (110 s, 2 minutes still left
for the stage); the compare runs when bench_train took at most 70 s; the stage gets the
rest, never under 2 minutes: 2.2 after a whole-limit bench_train (the compare skipped),
2.1 after a 70 s bench_train and a whole-limit compare, 3.0 after a 40 s bench_train and a
25 s compare (was 0.5-1.5 minutes, with a 90 s compare limit and no such rule); gpu_speed.py
gets about 2.5 minutes (its later steps, compile last, are cut first).

Continuing a stage: exactly, with ``prepare --resume-from <files_at>`` (the corpus leaves
room for the 26 MiB state: about 20 MiB of corpus); or from the returned weights with
``prepare --start-weights npbgpp_sphere_stage.safetensors`` (a new run: fresh Adam and the
200-step warm-up), which with ``--no-resume-room --rebuild-corpus`` gives the corpus about
47 MiB.

``--dry-run`` runs either mode on the CPU with tiny sizes (a 0.3-minute stage, 2 bench
steps, ``gpu_speed.py --dry-run`` on two steps, ``bench_densify.py --gpu --dry-run``), to
check the plumbing here (tests/test_gpu_session.py). The script needs only the standard
library itself; torch is imported by the steps it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless_train.lifeline import exit_status  # noqa: E402  (standard library only)

KIT = ".gpurun"
MIB = 2**20
TREE_LIMIT_MIB = 64.0  # what one `run` call may carry: tracked + untracked-not-ignored + carried
TREE_MARGIN_MIB = 2.0
OUT_MAX_FILES = 8
OUT_FILE_LIMIT = 16 * MIB
PART_BYTES = 15 * MIB  # one returned piece of the stage state
COMMAND_MAX_CHARS = 2000
STATE_RESERVE_MIB = 27.5  # room kept for a returned stage state (last.ckpt 26 MiB + logs)
# Modules the steps import that the device image lacks (KINDS.md's package list).
NEEDED_MODULES = ("hydra", "omegaconf", "plyfile")
# Wheels for them: versions pinned in requirements.txt where it names them; omegaconf and
# the antlr4 runtime are what hydra-core 1.3.2 resolved to in .venv.
WHEEL_PINS = ("hydra-core==1.3.2", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3", "plyfile==1.0.3")
DENSIFY_SCENE = ("textured_monkey", 100, (720, 1280))  # bench_densify.py gpu_plan: name, views, (h, w)
DENSIFY_DONE = "transforms_train.json"  # written last by the render (bench_densify.render_scene's cache test)
# The two rendered families of the training corpus (MODEL_CARD "Training data"), rendered by
# `prepare --render-envs / --render-objects` on a machine that has none: the documented
# commands and settings. Environment scenes env_<seed>, one generator call for all seeds:
ENV_GENERATOR = ("-m", "blender_addon.datagen.environments")
ENV_RENDER_ARGS = ("--views", "24", "--size", "256x256", "--samples", "8")
# Procedural objects on white random_<seed>, one call a scene (the command takes one --out):
OBJECT_GENERATOR = ("-m", "blender_addon.datagen")
OBJECT_RENDER_ARGS = ("--views", "24", "--size", "256x256")
RENDER_FOLDER = "scenes"  # <kit>/scenes: the full-size renders (ignored with the kit, never carried)
# One scene packed at --max-side 192 / --max-points 20000 (2026-11-30): env, the mean of env_1,
# env_2 and env_901..904 (2.10-3.02 MiB); random, of random_1..3 (0.62-0.82 MiB); capture, of
# the three training captures rebuilt by bench/rebuild_captures.py (0.26-0.42 MiB). What `auto`
# divides the corpus budget by.
PACKED_MIB = {"env": 2.4, "random": 0.75, "capture": 0.35}
# The real captures trained on (MODEL_CARD "Real captures", use training), prepared Z-up, and
# the command that rebuilds them (bench/rebuild_captures.py, from the card's git snapshots).
TRAINING_CAPTURES = ("skull", "lund", "socketed_axe")
CAPTURES_REBUILD = ("python bench/rebuild_captures.py --mirrors /work/.mirror --out DIR --use training "
                    "--sfm-python <python with pycolmap> (snapshots: MODEL_CARD.md, 'Real captures')")

# Time: the one source of every time figure of the kit (the calls it prints, the bounds of
# --budget-s and --budgets, the check of a plan against the session).
SESSION_DEVICE_S = 15 * 60  # a session's device time: machine starts, calls and idle waits
MACHINE_START_S = 90  # a fresh machine's start (1-2 minutes); the second call follows at once, warm
WARM_S = 30  # how long a machine stays warm after a call
CALL_MAX_S = 600  # one call's timeout_s at most
CALL_MARGIN_S = 45  # a call's timeout_s over its --budget-s: python start, copies, the summary, a hung stage's kill
# One machine start, then the two calls share the rest: timeout_s 405, --budget-s 360 each
# (--budgets changes them, e.g. train=540 for one long training call alone).
CALL_TIMEOUT_S = (SESSION_DEVICE_S - MACHINE_START_S) // 2
DEFAULT_BUDGET_S = {"train": CALL_TIMEOUT_S - CALL_MARGIN_S, "speed": CALL_TIMEOUT_S - CALL_MARGIN_S}
MIN_BUDGET_S, MAX_BUDGET_S = 60, CALL_MAX_S - CALL_MARGIN_S


def check_budget(seconds: int, what: str) -> int:
    """``seconds`` when a mode may run that long within one call, else KitError naming ``what``
    (the bound of both ``--budget-s`` and ``--budgets``)."""
    if not MIN_BUDGET_S <= seconds <= MAX_BUDGET_S:
        raise KitError(f"{what} must be in {MIN_BUDGET_S}..{MAX_BUDGET_S} s (a call's timeout_s is at most "
                       f"{CALL_MAX_S}, {CALL_MARGIN_S} of them beyond the budget)")
    return seconds


class KitError(RuntimeError):
    """A kit that cannot be built or a mode that cannot run; the message says what to do."""


# ------------------------------------------------------------------ sizes and parts
def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what every call carries: tracked and untracked-not-ignored files of the
    checkout (links count as links: only the link travels)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KitError(f"cannot list the files of {root} with git: {exc}") from exc
    total = 0
    for name in {n for n in out.decode("utf-8", "surrogateescape").split("\0") if n}:
        try:
            total += os.lstat(root / name).st_size
        except OSError:
            pass  # listed by the index, deleted in the work tree: it does not travel
    return total


def path_bytes(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; links not followed, as they travel)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    return total


def densify_scene_name() -> str:
    name, views, (h, w) = DENSIFY_SCENE
    return f"{name}_{views}_{w}x{h}"  # the folder bench_densify.py looks for under --cache


def densify_scene_ready(kit: Path) -> bool:
    """Whether the kit holds the whole render of the bench_densify --gpu scene (an
    interrupted render is neither carried nor timed)."""
    return (kit / "densify" / densify_scene_name() / DENSIFY_DONE).is_file()


def carry_paths(mode: str, kit: str = KIT, root: Path = ROOT) -> list[str]:
    """The ``carry`` list of a mode: the kit's paths that exist (a resumed call adds the
    stage folder, a call from other weights adds them; the densify scene only when its
    render is complete)."""
    densify = f"densify/{densify_scene_name()}"
    names = {"train": ["whl", "corpus", "stage", "start.safetensors"], "speed": ["whl", densify]}[mode]
    ready = {densify: densify_scene_ready(root / kit)}
    return [f"{kit}/{n}" for n in names if ready.get(n, (root / kit / n).exists())]


def corpus_budget_mib(tree: int, wheels: int, state: int | None) -> float:
    """MiB left for the packed corpus in the train call: the carried-size limit less the
    checkout, the wheels, the stage state (its real size, else :data:`STATE_RESERVE_MIB`
    when ``state`` is None; 0 keeps no room) and a margin."""
    reserve = STATE_RESERVE_MIB * MIB if state is None else state
    return (TREE_LIMIT_MIB - TREE_MARGIN_MIB) - (tree + wheels + reserve) / MIB


def split_file(path: Path, out_dir: Path, stem: str, part_bytes: int = PART_BYTES) -> list[Path]:
    """Cut ``path`` into ``<stem>.<sha256 first 12>.tar.NN`` pieces of at most ``part_bytes``
    in ``out_dir`` (the digest lets :func:`join_parts` check the whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    parts = []
    with open(path, "rb") as f:
        k = 0
        while True:
            data = f.read(part_bytes)
            if not data and k:
                break
            part = out_dir / f"{stem}.{digest.hexdigest()[:12]}.tar.{k:02d}"
            part.write_bytes(data)
            parts.append(part)
            k += 1
            if len(data) < part_bytes:
                break
    return parts


PART_RE = re.compile(r"^(?P<stem>.+)\.(?P<sha>[0-9a-f]{12})\.tar\.(?P<k>\d{2})$")


def join_parts(folder: Path, stem: str, dest: Path) -> Path:
    """Join the pieces ``<stem>.<sha>.tar.NN`` in ``folder`` into ``dest``; KitError naming
    the folder when pieces are missing, of two different states, or the digest differs."""
    found = [(m, p) for p in sorted(folder.iterdir()) if (m := PART_RE.match(p.name)) and m["stem"] == stem]
    if not found:
        raise KitError(f"no {stem}.<digest>.tar.NN pieces in {folder}")
    digests = {m["sha"] for m, _ in found}
    if len(digests) != 1:
        raise KitError(f"{folder} holds pieces of {len(digests)} different stage states ({sorted(digests)}); "
                       "keep one call's pieces")
    numbers = [int(m["k"]) for m, _ in found]
    if numbers != list(range(len(found))):
        raise KitError(f"{folder}: pieces {numbers} of {stem} are not 00..{len(found) - 1:02d} (one is missing)")
    digest = hashlib.sha256()
    with open(dest, "wb") as f:
        for _, p in found:
            data = p.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest()[:12] != next(iter(digests)):
        dest.unlink()
        raise KitError(f"the pieces of {stem} in {folder} do not add up to the state they were cut from "
                       "(digest differs): fetch them again")
    return dest


# ------------------------------------------------------------------ the two run calls
def run_command(mode: str, budget_s: int, targets_per_sample: int | None = None) -> str:
    """The shell command of a mode's `run` call (the train call passes ``targets_per_sample``
    on to its stage when given)."""
    extra = f" --targets-per-sample {targets_per_sample}" if mode == "train" and targets_per_sample is not None else ""
    return (f"set -o pipefail; export PYTHONUNBUFFERED=1; python3 bench/gpu_session.py {mode} "
            f"--out \"$OUT\" --budget-s {budget_s}{extra} 2>&1")


def run_calls(kit: str = KIT, root: Path = ROOT, budgets: dict[str, int] | None = None,
              targets_per_sample: int | None = None) -> list[dict[str, Any]]:
    """The `run` calls of a session, in order: {mode, command, carry, timeout_s}."""
    budgets = {**DEFAULT_BUDGET_S, **(budgets or {})}
    calls = []
    for mode in ("train", "speed"):
        b = int(budgets[mode])
        calls.append({"mode": mode, "command": run_command(mode, b, targets_per_sample),
                      "carry": carry_paths(mode, kit, root), "timeout_s": b + CALL_MARGIN_S})
    return calls


def stage_targets_problem(stage_dir: Path, targets_per_sample: int | None) -> str | None:
    """Why the stage in ``stage_dir`` would refuse ``--targets-per-sample`` (None: it would
    not): a resumed run keeps the value its ``stage.json`` records (headless_train stage's
    rule, read by its own reader), and that refusal on the device would cost the call's stage."""
    if targets_per_sample is None or not (stage_dir / "run" / "checkpoints" / "last.ckpt").is_file():
        return None
    from headless_train.stage import StageError, read_history, recorded_settings

    history = stage_dir / "stage.json"
    try:
        calls = read_history(str(history))
        own = recorded_settings(calls[-1])[0]["targets_per_sample"] if calls else None
    except StageError as exc:
        return f"{history}: {exc}"
    if own is None or own == targets_per_sample:
        return None
    return (f"--targets-per-sample {targets_per_sample}: the kit's stage run ({stage_dir}) was trained with "
            f"--targets-per-sample {own}, which its next (resumed) call keeps; give {own} or leave the flag out, "
            "or start a new run from its weights (remove that folder, prepare --start-weights "
            "<returned npbgpp_sphere_stage.safetensors>)")


def check_calls(calls: Sequence[dict[str, Any]]) -> list[str]:
    """What is wrong with these `run` calls under the device tool's limits (empty: fine)."""
    problems = []
    for c in calls:
        if len(c["command"]) > COMMAND_MAX_CHARS:
            problems.append(f"{c['mode']}: command is {len(c['command'])} characters, over {COMMAND_MAX_CHARS}")
        if len(c["carry"]) > 8 or any(len(p) > 200 for p in c["carry"]):
            problems.append(f"{c['mode']}: carry takes at most 8 paths of 200 characters")
        if not 1 <= c["timeout_s"] <= CALL_MAX_S:
            problems.append(f"{c['mode']}: timeout_s {c['timeout_s']} is not in 1..{CALL_MAX_S}")
    total = sum(c["timeout_s"] for c in calls) + MACHINE_START_S
    if total > SESSION_DEVICE_S:
        problems.append(f"the calls' timeout_s and a machine start ({MACHINE_START_S} s) add up to {total} s, over "
                        f"the session's {SESSION_DEVICE_S} s of device time: run one of them, or lower --budgets")
    return problems


def plan_text(kit: str = KIT, root: Path = ROOT, budgets: dict[str, int] | None = None,
              targets_per_sample: int | None = None) -> str:
    """The sizes of both calls against the 64 MiB limit and the exact `run` calls."""
    tree = tree_bytes(root)
    lines = [f"checkout (tracked + untracked-not-ignored): {tree / MIB:.1f} MiB"]
    calls = run_calls(kit, root, budgets, targets_per_sample)
    for c in calls:
        carried = sum(path_bytes(root / p) for p in c["carry"])
        total = (tree + carried) / MIB
        verdict = "ok" if total <= TREE_LIMIT_MIB - TREE_MARGIN_MIB else f"OVER the {TREE_LIMIT_MIB:g} MiB limit"
        lines.append(f"{c['mode']} call carries {carried / MIB:.1f} MiB -> {total:.1f} MiB in all ({verdict})")
    problems = check_calls(calls)
    targets = stage_targets_problem(root / kit / "stage", targets_per_sample)
    lines += [f"problem: {p}" for p in [*problems, *([targets] if targets else [])]]
    lines.append(f"The two `run` calls (device tool), one right after the other (the machine stays warm {WARM_S} s):")
    for c in calls:
        lines.append(json.dumps({k: c[k] for k in ("command", "carry", "timeout_s")}))
    lines.append("Keep what comes back (files_at) before the next call: $OUT is emptied for each command. "
                 "To continue the stage later: bench/gpu_session.py prepare --resume-from <files_at of train>.")
    return "\n".join(lines)


# ------------------------------------------------------------------ prepare (here, on the CPU)
def build_wheels(dest: Path, pins: Sequence[str] = WHEEL_PINS, python: str = sys.executable) -> list[Path]:
    """Pure-Python wheels of ``pins`` in ``dest`` (``pip wheel --no-deps``: downloaded, or
    built from the sdist when the project publishes none, e.g. antlr4-python3-runtime);
    KitError when one is not pure Python (it would not install on the device's 3.12)."""
    dest.mkdir(parents=True, exist_ok=True)
    for pin in pins:
        name, version = pin.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        if any(p.name.lower().startswith(stem.lower()) for p in dest.glob("*.whl")):
            continue
        r = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), pin],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise KitError(f"pip wheel {pin} failed (a registry is needed while preparing): {r.stderr[-800:]}")
    wheels = sorted(dest.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if impure:
        raise KitError(f"{dest}: {impure} are not pure-Python wheels; remove them")
    return wheels


# The model card's generated families; every other scene (the real captures) is one more.
RENDERED_FAMILIES = ("env", "random")


def scene_group(name: str) -> str:
    """A scene's family for a balanced choice: the name without a trailing ``_<number>`` and
    without ``_x2``-style variants (``env_12`` -> ``env``, ``skull_x3`` -> ``skull``)."""
    return re.sub(r"(_x\d+)?(_\d+)?$", "", name) or name


def scene_family(name: str) -> str:
    """A scene's family in the model card's corpus: ``env``, ``random`` (objects on white) or
    ``capture`` (any other name: the real captures, ``skull``, ``lund_x2``, ...)."""
    group = scene_group(name)
    return group if group in RENDERED_FAMILIES else "capture"


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def balanced_choice(sizes: dict[str, int], budget: int) -> list[str]:
    """Scene names taken round-robin over the families (:func:`scene_family`; the smallest
    family first) while they fit in ``budget`` bytes: every family is represented before any
    has a second scene, and environments and objects stay about equal, as in the model card
    (40 and 40 scenes). Within a family, round-robin over its groups (``skull``, ``lund``,
    then ``skull_x2``, ...), scenes in natural order."""
    families: dict[str, dict[str, list[str]]] = {}
    for name in sorted(sizes, key=_natural):
        families.setdefault(scene_family(name), {}).setdefault(scene_group(name), []).append(name)
    queues = []
    for groups in families.values():
        rounds = max(len(g) for g in groups.values())
        queues.append([g[k] for k in range(rounds) for g in groups.values() if k < len(g)])
    queues.sort(key=lambda q: (len(q), scene_family(q[0])))
    chosen, used = [], 0
    while any(queues):
        for q in queues:
            if q:
                name = q.pop(0)
                if used + sizes[name] <= budget:
                    chosen.append(name)
                    used += sizes[name]
    return sorted(chosen, key=_natural)


def linked_sources(corpus: str, extra: Sequence[Path], links: Path) -> str:
    """The folder to pack: ``corpus`` itself, or with ``extra`` scene folders (the training
    captures, kept elsewhere) ``links``, a fresh folder of links to ``corpus``'s scenes and
    to them (``stage pack`` follows links). KitError when an extra scene's name is taken."""
    if not extra:
        return corpus
    from npbgpp_core.atomic import is_listed_name

    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    for scene in sorted(Path(corpus).iterdir()):
        if scene.is_dir() and is_listed_name(scene.name):
            (links / scene.name).symlink_to(scene.resolve())
    for scene in extra:
        if (links / scene.name).exists():
            raise KitError(f"{corpus} already holds a scene {scene.name}: the capture {scene} would replace it in "
                           "the kit's corpus; rename one of them")
        (links / scene.name).symlink_to(scene.resolve())
    return str(links)


def pack_corpus(corpus: str, dest: Path, max_side: int, max_points: int, budget_mib: float,
                scenes: str | None = None, extra: Sequence[Path] = ()) -> dict[str, Any]:
    """``stage pack`` of ``corpus`` and the ``extra`` scene folders (each once) into a scratch
    folder, then the balanced choice of their scenes that fits ``budget_mib`` moved to ``dest``."""
    from headless_train.stage import StageError, pack

    if budget_mib < 1:
        raise KitError(f"only {budget_mib:.1f} MiB are left for the corpus: carry less (no --resume-from, "
                       "fewer untracked files)")
    scratch = dest.parent / (dest.name + ".all")
    links = dest.parent / (dest.name + ".sources")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        sizes = pack(linked_sources(corpus, extra, links), str(scratch), max_side, max_points, 10**6,
                     scenes)["scene_bytes"]
    except StageError as exc:
        raise KitError(str(exc)) from exc
    finally:
        shutil.rmtree(links, ignore_errors=True)
    try:
        chosen = balanced_choice(sizes, int(budget_mib * MIB))
        if not chosen:
            raise KitError(f"no scene of {corpus} fits in {budget_mib:.1f} MiB at --max-side {max_side}")
        tmp = dest.parent / (dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in chosen:
            os.rename(scratch / name, tmp / name)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    families = {f: sum(scene_family(c) == f for c in chosen) for f in (*RENDERED_FAMILIES, "capture")}
    return {"scenes": chosen, "of": len(sizes), "mib": round(sum(sizes[c] for c in chosen) / MIB, 2),
            "families": families}


def kit_scene_names(corpus: str, counts: dict[str, int], captures: Sequence[Path]) -> list[str]:
    """The scenes the kit's corpus is packed from: ``corpus``'s scene folders, the renders
    ``counts`` asks for (``<family>_1..<family>_<count>``, finished or not) and ``captures``."""
    from npbgpp_core.atomic import is_listed_name

    names = {p.name for p in Path(corpus).iterdir() if p.is_dir() and is_listed_name(p.name)} \
        if Path(corpus).is_dir() else set()
    names.update(f"{family}_{seed}" for family, count in counts.items() for seed in range(1, count + 1))
    names.update(c.name for c in captures)
    return sorted(names, key=_natural)


def scene_selection_note(scenes: str | None, names: Sequence[str]) -> str | None:
    """What ``--scenes`` leaves out of ``names`` (the kit's scenes), by family: a family it
    leaves out whole (``--scenes 'env_*'`` drops the captures) is said, not dropped silently.
    KitError, before anything is rendered, when it keeps none; None without ``--scenes`` or
    when it keeps every scene."""
    from headless_train.stage import scene_patterns, select_scene_names

    if not scene_patterns(scenes):
        return None

    kept = set(select_scene_names(names, scenes))
    families = [f for f in (*RENDERED_FAMILIES, "capture") if any(scene_family(n) == f for n in names)]
    have = ", ".join(f"{f} {sum(scene_family(n) == f for n in names)}" for f in families)
    if not kept:
        raise KitError(f"--scenes {scenes!r} matches none of the kit's {len(names)} scenes ({have or 'none'}"
                       + (f": {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ")")
                       + "; names or shell patterns, comma-separated, e.g. 'env_*,random_*,beer'")
    if len(kept) == len(names):
        return None
    left = []
    for f in families:
        total = [n for n in names if scene_family(n) == f]
        out = [n for n in total if n not in kept]
        if out:
            whole = " (the whole family" + (f": {', '.join(out)})" if f == "capture" else ")") \
                if len(out) == len(total) else ""
            left.append(f"{f} {len(out)} of {len(total)}{whole}")
    return (f"note: --scenes {scenes!r} keeps {len(kept)} of the kit's {len(names)} scenes; left out: "
            + "; ".join(left))


def render_densify_scene(dest: Path) -> Path:
    """The Cycles scene of ``bench_densify.py --gpu`` under ``dest`` (its --cache layout),
    rendered once."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_densify import render_scene

    name, views, (h, w) = DENSIFY_SCENE
    return render_scene(name, views, (h, w), dest / densify_scene_name())


def restore_state(parts_dir: Path, stage_dir: Path) -> dict[str, Any]:
    """Join the stage-state pieces a ``train`` call returned and unpack them to
    ``stage_dir`` (replacing it), so the next call resumes that run."""
    tmp_tar = stage_dir.parent / "stage_state.tar"
    join_parts(parts_dir, "stage_state", tmp_tar)
    new = stage_dir.parent / (stage_dir.name + ".partial")
    shutil.rmtree(new, ignore_errors=True)
    try:
        with tarfile.open(tmp_tar) as tar:
            tar.extractall(new, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise KitError(f"stage state from {parts_dir} does not unpack: {exc}") from exc
    finally:
        tmp_tar.unlink(missing_ok=True)
    if not (new / "run" / "checkpoints" / "last.ckpt").is_file():
        shutil.rmtree(new)
        raise KitError(f"the stage state from {parts_dir} holds no run/checkpoints/last.ckpt")
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.rename(new, stage_dir)
    return {"stage": str(stage_dir), "mib": round(path_bytes(stage_dir) / MIB, 1)}


def render_count(flag: str) -> Any:
    """The argument type of ``flag`` (``--render-envs``, ``--render-objects``): a count of
    scenes >= 1, or ``auto`` (what the corpus budget carries)."""
    def parse(text: str) -> int | str:
        if text == "auto":
            return text
        if not text.isdigit() or int(text) < 1:
            raise KitError(f"{flag} takes a number of scenes >= 1 or 'auto', got {text!r}")
        return int(text)

    return parse


def scene_counts(requested: dict[str, int | str], budget_mib: float, captures: int = 0) -> dict[str, int]:
    """How many scenes of each rendered family (``env``, ``random``) to render: the given
    counts, and for ``auto`` equal counts (the card's 40 and 40) filling what ``budget_mib``
    leaves after the given ones and ``captures`` training captures (~:data:`PACKED_MIB` each;
    rounded up: the kit is filled, and at most about one scene a family is rendered that it
    does not carry)."""
    counts = {f: int(n) for f, n in requested.items() if n != "auto"}
    auto = [f for f, n in requested.items() if n == "auto"]
    if auto:
        left = budget_mib - captures * PACKED_MIB["capture"] - sum(n * PACKED_MIB[f] for f, n in counts.items())
        per_round = sum(PACKED_MIB[f] for f in auto)
        if left < 1:
            raise KitError(f"the corpus budget ({budget_mib:.1f} MiB, {left:.1f} after the other scenes) holds no "
                           f"more scenes of ~{per_round:.1f} MiB: carry less (no --resume-from, fewer untracked "
                           "files), give --no-resume-room, or give counts instead of auto")
        counts.update({f: math.ceil(left / per_round) for f in auto})
    return counts


def scene_done(family: str, folder: Path) -> bool:
    """Whether ``folder`` holds a finished scene of ``family``: the generator's own test, so
    what it would skip is what counts as finished."""
    if family == "env":
        from blender_addon.datagen.environments import env_scene_done

        return env_scene_done(str(folder))
    from blender_addon.datagen.render import procedural_scene_done

    return procedural_scene_done(str(folder))


def missing_seeds(family: str, corpus: Path, count: int) -> list[int]:
    """The seeds of 1..``count`` whose ``<family>_<seed>`` is not finished in ``corpus``."""
    return [seed for seed in range(1, count + 1) if not scene_done(family, corpus / f"{family}_{seed}")]


def check_renderable(family: str, corpus: Path, seeds: Sequence[int]) -> None:
    """KitError for an object scene folder of ``seeds`` that is neither finished nor empty:
    its command refuses a non-empty ``--out`` (the environment generator redoes such a
    folder itself)."""
    from npbgpp_core.atomic import occupied

    stale = [str(corpus / f"{family}_{seed}") for seed in seeds if occupied(corpus / f"{family}_{seed}")]
    if family != "env" and stale:
        raise KitError(f"{', '.join(stale)}: not a finished render (no transforms_train.json) and not empty, so "
                       "the generator would refuse it: remove it and run the same command again")


def render_commands(family: str, corpus: Path, seeds: Sequence[int]) -> list[list[str]]:
    """The MODEL_CARD's commands that render ``seeds`` of ``family`` into ``corpus``."""
    if family == "env":
        return [[sys.executable, *ENV_GENERATOR, "--seeds", ",".join(map(str, seeds)), *ENV_RENDER_ARGS,
                 "--out", str(corpus)]]
    return [[sys.executable, *OBJECT_GENERATOR, "--procedural", f"{family}_{seed}", "--seed", str(seed),
             *OBJECT_RENDER_ARGS, "--out", str(corpus / f"{family}_{seed}")] for seed in seeds]


def run_generator(cmd: Sequence[str]) -> None:
    """Run one generator command (output shown as it comes); a stopped prepare stops it too
    (its unfinished scene is a ``.partial-<pid>`` folder, redone next time). KitError when
    it fails."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT)
    try:
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if rc != 0:
        raise KitError(f"the generator exited with {rc} (its output is above): {shlex.join(cmd)}")


def training_captures(folder: Path) -> tuple[list[Path], list[str]]:
    """The prepared training captures in ``folder`` (``<name>/capture.json``, written last)
    and the names missing there. KitError for one not prepared Z-up: the stage trains with
    one up axis (+Z) for every scene."""
    found, missing = [], []
    for name in TRAINING_CAPTURES:
        info = folder / name / "capture.json"
        if not info.is_file():
            missing.append(name)
            continue
        try:
            orient = json.loads(info.read_text(encoding="utf-8")).get("orient", "keep")
        except (OSError, ValueError, AttributeError) as exc:
            raise KitError(f"{info}: not a capture.json prepare-capture writes ({exc})") from exc
        if orient != "z-up":
            raise KitError(f"{folder / name} was prepared with orient {orient!r}, the training stage needs its Z-up "
                           f"copy (prepare-capture --orient z-up): {CAPTURES_REBUILD}")
        found.append(folder / name)
    return found, missing


def check_corpus_folder(corpus: Path, root: Path = ROOT) -> None:
    """KitError when ``corpus`` is a file, or lies in the checkout where git does not ignore
    it: every `run` call carries such files (64 MiB in all), so the kit would not fit."""
    if corpus.exists() and not corpus.is_dir():
        raise KitError(f"--corpus {corpus} is not a folder")
    try:
        rel = corpus.resolve().relative_to(root.resolve())
    except ValueError:
        return  # outside the checkout
    ignored = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=root).returncode == 0
    if not ignored:
        raise KitError(f"--corpus {corpus} is inside the checkout and not ignored by git, so every `run` call would "
                       f"carry it: put it outside the checkout or under {KIT}/ (the default of --render-envs is "
                       f"{KIT}/{RENDER_FOLDER})")


class Interrupted(Exception):
    """A signal stopped prepare (SIGTERM, SIGINT, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@dataclass
class Progress:
    """The parts of one prepare: each one's time as it ends, and, when prepare stops early,
    what was done and what remains (``notes``: a part's live state, e.g. scenes left)."""

    todo: list[str]
    done: list[tuple[str, float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # part -> callable returning a line
    current: str | None = None
    started: float = 0.0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.current, self.started = name, time.time()
        yield
        seconds = time.time() - self.started
        self.done.append((name, seconds))
        self.todo.remove(name)
        self.current = None
        print(f"--- {name}: done in {seconds:.0f} s", flush=True)

    def report(self, why: str) -> str:
        lines = [f"prepare {why}" + (f" during '{self.current}', {time.time() - self.started:.0f} s into it"
                                     if self.current else "")]
        lines.append("done: " + (", ".join(f"{n} ({s:.0f} s)" for n, s in self.done) or "nothing"))
        for name in self.todo:
            lines.append(f"remaining: {name}" + (f": {self.notes[name]()}" if name in self.notes else ""))
        if self.todo:
            lines.append("The same command resumes (finished scenes and kit parts are kept).")
        return "\n".join(lines)


RENDER_PARTS = {"env": "env scenes", "random": "object scenes"}  # family -> its part of prepare


def requested_renders(args: argparse.Namespace) -> dict[str, int | str]:
    """The rendered families prepare is asked for (family -> count or ``auto``)."""
    given = {"env": args.render_envs, "random": args.render_objects}
    return {f: n for f, n in given.items() if n is not None}


def captures_note(captures: str | None, missing: Sequence[str]) -> str | None:
    """The warning for training captures the corpus will lack (None: it has them all)."""
    if captures is None:
        return (f"warning: no --captures: the corpus holds no real captures (the model card trains on "
                f"{', '.join(TRAINING_CAPTURES)}, prepared Z-up); rebuild them with {CAPTURES_REBUILD}, then give "
                "--captures DIR (make gpu-kit-fresh CAPTURES=DIR) and --rebuild-corpus")
    if missing:
        return (f"warning: {captures} lacks the training capture(s) {', '.join(missing)} (a folder with "
                f"capture.json each): the corpus holds "
                + ("no real captures" if len(missing) == len(TRAINING_CAPTURES) else "the others only")
                + f"; rebuild them with {CAPTURES_REBUILD}")
    return None


def prepare(args: argparse.Namespace) -> int:
    """Build the kit; on a signal or an error say what was done and what remains."""
    kit = ROOT / args.kit
    corpus_dir = kit / "corpus"
    renders = requested_renders(args)
    if renders and not args.corpus:
        args.corpus = str(kit / RENDER_FOLDER)
    if not args.corpus and (args.rebuild_corpus or not corpus_dir.exists()):
        # before anything is built; `make gpu-kit` relies on this check
        raise KitError(f"no corpus yet: give --corpus DIR (scene folders; make gpu-kit CORPUS=DIR) to pack "
                       f"{corpus_dir}, or --render-envs / --render-objects N|auto to render scenes first "
                       "(make gpu-kit-fresh)")
    if args.corpus:
        check_corpus_folder(Path(args.corpus))
    packs = args.rebuild_corpus or not corpus_dir.exists()
    captures: list[Path] = []
    if args.captures is not None:
        if not Path(args.captures).is_dir():
            raise KitError(f"--captures {args.captures}: folder not found (the prepared training captures "
                           f"{', '.join(TRAINING_CAPTURES)}: {CAPTURES_REBUILD})")
        captures, missing = training_captures(Path(args.captures))
        note = captures_note(args.captures, missing)
    else:
        note = captures_note(None, ()) if renders else None
    if not packs:
        note = None  # a kept corpus: nothing is linked into it
    if note:
        print(note, flush=True)
    parts = ["wheels"] + ([RENDER_PARTS[f] for f in renders] if packs else []) + (["corpus"] if packs else []) + \
        ([] if args.no_densify else ["densify scene"])
    progress = Progress(parts)
    progress.notes["densify scene"] = lambda: (f"{densify_scene_name()}, one Cycles render (15-20 min on 2 cores); "
                                               "an unfinished one starts over")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        build_kit(args, kit, corpus_dir, progress, captures)
    except Interrupted as exc:
        print(progress.report(f"stopped by {exc}"), file=sys.stderr, flush=True)
        return exit_status(exc.signum)
    except KitError as exc:
        raise KitError(f"{exc}\n{progress.report('stopped by this error')}") from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"kit built: {', '.join(f'{n} {s:.0f} s' for n, s in progress.done)}", flush=True)
    if note:
        print(note, flush=True)  # again: the renders' output above is long
    return 0


def unfinished_note(family: str, corpus: Path, count: int) -> str:
    """What a stopped prepare says remains of a family's renders."""
    left = missing_seeds(family, corpus, count)
    return (f"{len(left)} of {family}_1..{family}_{count} unfinished in {corpus}"
            + (f" ({', '.join(f'{family}_{s}' for s in left)})" if left else ""))


def render_family(family: str, corpus: Path, count: int, budget: float) -> None:
    """Render the unfinished ``<family>_1..<family>_<count>`` into ``corpus``."""
    missing = missing_seeds(family, corpus, count)
    cmds = render_commands(family, corpus, missing) if missing else []
    print(f"{RENDER_PARTS[family]}: {family}_1..{family}_{count} in {corpus} (~{PACKED_MIB[family]} MiB packed "
          f"each, corpus budget {budget:.1f} MiB); {count - len(missing)} finished, {len(missing)} to render"
          + (f": {shlex.join(cmds[0])}" + (f" and {len(cmds) - 1} more like it" if len(cmds) > 1 else "")
             if cmds else ""), flush=True)
    for cmd in cmds:
        run_generator(cmd)


def build_kit(args: argparse.Namespace, kit: Path, corpus_dir: Path, progress: Progress,
              captures: Sequence[Path] = ()) -> None:
    say = print
    kit.mkdir(exist_ok=True)
    if args.resume_from:
        say(f"stage state: {restore_state(Path(args.resume_from), kit / 'stage')}")
    problem = stage_targets_problem(kit / "stage", args.targets_per_sample)  # before any part is built
    if problem:
        raise KitError(problem)
    with progress.part("wheels"):
        wheels = build_wheels(kit / "whl")
        say(f"wheels: {', '.join(w.name for w in wheels)}")
    if args.start_weights:
        if not os.path.isfile(args.start_weights):
            raise KitError(f"--start-weights: file not found: {args.start_weights}")
        from npbgpp_core.atomic import atomic_copy_file

        # the kit is built in place and carried as it is: a copy cut short must not look whole
        atomic_copy_file(args.start_weights, kit / "start.safetensors")
        say(f"first call starts from {args.start_weights} ({kit / 'start.safetensors'})")
    if args.rebuild_corpus:
        shutil.rmtree(corpus_dir, ignore_errors=True)
    renders = requested_renders(args)
    if corpus_dir.exists():
        say(f"corpus: kept {corpus_dir} ({path_bytes(corpus_dir) / MIB:.1f} MiB; --rebuild-corpus to redo it"
            f"{', and to render scenes and link captures for it' if renders or captures else ''})")
    else:
        stage_dir = kit / "stage"
        state = path_bytes(stage_dir) if stage_dir.exists() else (0 if args.no_resume_room else None)
        budget = corpus_budget_mib(tree_bytes(), sum(w.stat().st_size for w in wheels), state)
        if args.corpus_mib is not None:
            budget = min(budget, args.corpus_mib)
        counts = scene_counts(renders, budget, len(captures)) if renders else {}
        note = scene_selection_note(args.scenes, kit_scene_names(args.corpus, counts, captures))
        if note:
            say(note)
        if renders:
            try:
                Path(args.corpus).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise KitError(f"cannot make the corpus folder {args.corpus}: {exc}") from exc
            for family, count in counts.items():  # a stopped prepare names the scenes left of each
                progress.notes[RENDER_PARTS[family]] = partial(unfinished_note, family, Path(args.corpus), count)
            for family, count in counts.items():  # before any render: the env scenes take minutes
                check_renderable(family, Path(args.corpus), missing_seeds(family, Path(args.corpus), count))
            for family, count in counts.items():
                with progress.part(RENDER_PARTS[family]):
                    render_family(family, Path(args.corpus), count, budget)
        with progress.part("corpus"):
            r = pack_corpus(args.corpus, corpus_dir, args.max_side, args.max_points, budget, args.scenes, captures)
            say(f"corpus: {len(r['scenes'])} of {r['of']} scenes, {r['mib']} MiB (budget {budget:.1f} MiB; "
                f"{', '.join(f'{f} {n}' for f, n in r['families'].items())}): {', '.join(r['scenes'])}")
    if args.no_densify:
        say("densify scene: skipped (--no-densify); the speed call then times gpu_speed.py only")
    else:
        with progress.part("densify scene"):
            scene = render_densify_scene(kit / "densify")
            say(f"densify scene: {scene} ({path_bytes(scene) / MIB:.1f} MiB)")
    say(plan_text(args.kit, ROOT, args.budgets, args.targets_per_sample))


# ------------------------------------------------------------------ the device modes
@dataclass
class Session:
    """One mode's run: where output goes, the deadline, the environment of the steps, the
    steps' outcomes."""

    mode: str
    out: Path
    kit: Path
    deadline: float
    dry_run: bool
    log: TextIO
    scratch: Path  # installed wheels, the state tar: removed at the end
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    results: list[tuple[str, str, float]] = field(default_factory=list)
    current: subprocess.Popen | None = None  # the step running now
    stopped_by: int | None = None  # a signal this process got: no new step starts

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM / SIGINT / SIGHUP (the call's time limit, Ctrl-C): pass SIGTERM on to the
        running step's process group (a stage still saves and exports) and start no more."""
        self.stopped_by = signum
        if self.current is not None:
            _signal_group(self.current, signal.SIGTERM)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def step_limit(self, limit_s: float, grace_s: float, reserve_s: float) -> float:
        """Seconds a step may run before its SIGTERM: ``limit_s``, cut so that its SIGKILL
        (``grace_s`` later) still comes ``reserve_s`` before the deadline."""
        return min(limit_s, self.left() - reserve_s - grace_s)

    def step(self, name: str, cmd: Sequence[str], limit_s: float, grace_s: float = 10.0,
             reserve_s: float = 0.0) -> int | None:
        """Run ``cmd`` (output tee'd to stdout and the log) for at most ``limit_s`` and
        never past the deadline less ``reserve_s``; at its limit SIGTERM to its process
        group, SIGKILL after ``grace_s``. Returns the exit code (None: skipped)."""
        limit = self.step_limit(limit_s, grace_s, reserve_s)
        if self.stopped_by is not None:
            self.say(f"=== {name}: skipped, stopped by {signal.Signals(self.stopped_by).name}")
            self.results.append((name, "skipped (stopped)", 0.0))
            return None
        if limit < 5:
            self.say(f"=== {name}: skipped, {self.left():.0f} s left of the budget")
            self.results.append((name, "skipped (budget spent)", 0.0))
            return None
        self.say(f"=== {name} (limit {limit:.0f} s): {shlex.join(cmd)}")
        t0 = time.time()
        # its own process group (DataLoader workers, compile workers go with it), in this
        # session: whatever ends this call also ends the steps
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                process_group=0, text=True, errors="replace", bufsize=1)
        self.current = proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                self.log.write(line)
            self.log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"=== {name}: time limit reached, SIGTERM")
            _signal_group(proc, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                rc = proc.wait()
        self.current = None
        reader.join(timeout=10)
        seconds = time.time() - t0
        outcome = f"rc={rc}" + (" (time limit)" if timed_out else "")
        self.say(f"=== {name}: {outcome} after {seconds:.0f} s")
        self.results.append((name, outcome, seconds))
        return rc

    def summary(self) -> None:
        self.say(f"=== gpu_session {self.mode}{' (dry run)' if self.dry_run else ''}: summary")
        for name, outcome, seconds in self.results:
            self.say(f"  {name:14s} {outcome:26s} {seconds:6.0f} s")
        files = sorted(p for p in self.out.iterdir() if p.is_file())
        for p in files:
            self.say(f"  $OUT/{p.name}: {p.stat().st_size / MIB:.2f} MiB")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_info(s: Session) -> bool:
    """Log the machine, torch and CUDA; whether CUDA is usable (a clear line when not)."""
    code = ("import sys, platform, torch; c = torch.cuda.is_available(); "
            "print('python', platform.python_version(), sys.executable, '| torch', torch.__version__, "
            "'| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name(0) if c else None); "
            "sys.exit(0 if c else 3)")
    if shutil.which("nvidia-smi"):
        s.step("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 20)
    rc = s.step("info", [sys.executable, "-c", code], 60)
    if rc == 0:
        return True
    if s.dry_run and rc == 3:
        name, _, seconds = s.results.pop()
        s.results.append((name, "ok (no CUDA: dry run)", seconds))
    elif not s.dry_run:
        s.say("error: CUDA is not usable from this python (torch.cuda.is_available() is False, or torch is "
              "missing): the GPU steps are skipped. Is this the GPU machine, and is `python3` the one with a "
              "CUDA torch (KINDS.md: /opt/torch/.venv/bin/python3)?")
    return False


def install_deps(s: Session) -> bool:
    """Install the kit's wheels into a scratch folder on PYTHONPATH when the python lacks a
    module the steps import (always in a dry run, to check the plumbing)."""
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    wheels = sorted((s.kit / "whl").glob("*.whl"))
    if not missing and not (s.dry_run and wheels):
        s.say(f"=== deps: {', '.join(NEEDED_MODULES)} importable, nothing to install")
        return True
    if not wheels:
        s.say(f"error: {', '.join(missing)} missing and no wheels in {s.kit / 'whl'} (run prepare here)")
        s.results.append(("deps", "missing, no wheels", 0.0))
        return False
    site = s.scratch / "site"
    rc = s.step("deps", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--disable-pip-version-check", "--target", str(site), *map(str, wheels)], 90)
    if rc != 0:
        return False
    s.env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [s.env.get("PYTHONPATH")])])
    return s.step("deps check", [sys.executable, "-c", "import " + ", ".join(NEEDED_MODULES)], 30) == 0


def build_kernels(s: Session) -> None:
    if s.dry_run:
        s.say("=== kernels: skipped in a dry run (needs nvcc and a GPU)")
        return
    s.env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    s.step("kernels", [sys.executable, "-m", "kernels.build", "--quiet"], 180, reserve_s=60)


@contextmanager
def returned_benchmarks(out: Path, path: Path = ROOT / "BENCHMARKS.md") -> Iterator[None]:
    """The sections a mode's steps append to ``path`` (on the device) go back in
    ``out/BENCHMARKS_appended.md``, also when a step failed or the mode was stopped."""

    def text() -> str:
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return ""

    before = text()
    try:
        yield
    finally:
        now = text()
        tail = now[len(before):] if now.startswith(before) else now
        if tail.strip():
            (out / "BENCHMARKS_appended.md").write_text(tail, encoding="utf-8")


# Seconds of a stage call besides its --minutes: the stage's own start (torch import, seed
# checkpoint), the last checkpoint after SIGTERM and the fp16 export.
STAGE_OVERHEAD_S = 45
BENCH_TRAIN_LIMIT_S = 110  # python start, scene loading, workers, 10 warm-up and 100 timed steps
# The step variants timed side by side (bench_train.py --compare, interleaved on the same
# batches, the step timed alone, its loading reported apart): today's step and
# three target crops per set of input views (stage --targets-per-sample 3).
COMPARED_VARIANTS = "batched,batched_k3"
# Python start, scene loading, 3 warm-up and 15 timed rounds of both variants: 30 steps of batch 8
# at the target 30 steps/s are 1-3 s of GPU time (k3 three crops a set); the rest is fixed cost,
# 9 s of the CPU dry run (2 busy cores, 2026-11-30), so 45 s leaves it room (was 90 s, unmeasured).
BENCH_COMPARE_LIMIT_S = 45
COLLECT_RESERVE_S = 20
# Training gets the device first: a bench step runs only when its whole limit still leaves the
# stage this many minutes (else it is skipped, and the log says so); a bench cut short returns nothing.
MIN_STAGE_MINUTES = 2.0
BENCH_GRACE_S = 10  # Session.step's default SIGTERM-to-SIGKILL wait, part of a step's time
# The stage's backstop (a stage that hangs): SIGTERM this long after its own end (--minutes +
# STAGE_OVERHEAD_S), SIGKILL STAGE_KILL_GRACE_S later: at most 20 s past the deadline, within
# the call's CALL_MARGIN_S (python's start and the copies take a few seconds of its 45).
STAGE_BACKSTOP_S = 10
STAGE_KILL_GRACE_S = 30


def stage_minutes(left_s: float) -> float:
    """Training minutes for a stage that must end, exported, within ``left_s`` seconds and
    leave the copies their time (one decimal, at least 0.5; 0: no time for one)."""
    m = (left_s - STAGE_OVERHEAD_S - COLLECT_RESERVE_S) / 60.0
    return 0.0 if m < 0.5 else int(m * 10) / 10.0


def stage_reserve_s() -> float:
    """Seconds a train call keeps for its stage before any bench step: the stage's overhead,
    the copies and :data:`MIN_STAGE_MINUTES` of training (:func:`stage_minutes` of it)."""
    return MIN_STAGE_MINUTES * 60 + STAGE_OVERHEAD_S + COLLECT_RESERVE_S


def bench_fits(left_s: float, limit_s: float) -> bool:
    """Whether a bench step of ``limit_s`` (and its SIGKILL grace) fits in ``left_s`` and
    still leaves the stage :func:`stage_reserve_s`."""
    return left_s - limit_s - BENCH_GRACE_S >= stage_reserve_s()


def bench_step(s: Session, name: str, cmd: Sequence[str], limit_s: float) -> int | None:
    """Run the bench step ``cmd`` within ``limit_s`` when it fits before the stage's share
    (:func:`bench_fits`), else skip it, saying so (None)."""
    if not bench_fits(s.left(), limit_s):
        s.say(f"=== {name}: skipped, {s.left():.0f} s left: its {limit_s:.0f} s limit would leave the stage under "
              f"{MIN_STAGE_MINUTES:g} minutes (training first)")
        s.results.append((name, "skipped (stage first)", 0.0))
        return None
    return s.step(name, cmd, limit_s, grace_s=BENCH_GRACE_S, reserve_s=stage_reserve_s())


def mode_train(s: Session, corpus: Path | None, targets_per_sample: int | None = None) -> None:
    """bench_train first (short, time-boxed: the throughput figures come back whatever the
    stage does): the recipe's rate, then one target against three per set of input views
    (``--compare batched,batched_k3``); then the stage for the minutes left (with
    ``targets_per_sample`` when given), then the copies to $OUT."""
    corpus = corpus or s.kit / "corpus"
    work = s.kit / "stage"
    common = [sys.executable, "bench/bench_train.py", "--data-root", str(corpus), "--format", "null", "--views", "3"]
    bench = [*common, "--json", str(s.out / "bench_train.json")]
    compare = [*common, "--compare", COMPARED_VARIANTS, "--json", str(s.out / "bench_train_compare.json")]
    if s.dry_run:
        bench += ["--device", "cpu", "--batch", "1", "--crop", "32", "--steps", "2", "--warmup", "1"]
        compare += ["--device", "cpu", "--batch", "1", "--crop", "32", "--steps", "1", "--warmup", "0"]
    else:
        bench += ["--device", "cuda", "--batch", "8", "--crop", "256", "--amp", "bf16", "--steps", "100",
                  "--warmup", "10", "--workers", str(min(8, os.cpu_count() or 1)), "--record"]
        compare += ["--device", "cuda", "--batch", "8", "--crop", "256", "--amp", "bf16", "--steps", "15",
                    "--warmup", "3"]
    bench_step(s, "bench_train", bench, BENCH_TRAIN_LIMIT_S)
    bench_step(s, "bench_compare", compare, BENCH_COMPARE_LIMIT_S)
    cmd = [sys.executable, "-m", "headless_train", "stage", "--corpus", str(corpus), "--work", str(work)]
    if not (work / "run" / "checkpoints" / "last.ckpt").is_file() and (s.kit / "start.safetensors").is_file():
        cmd += ["--weights", str(s.kit / "start.safetensors")]
    if targets_per_sample is not None:  # left out: 1 on a first call, the run's own on a resumed one
        cmd += ["--targets-per-sample", str(targets_per_sample)]
    if s.dry_run:
        minutes = 0.3
        cmd += ["--gpus", "0", "--batch", "1", "--workers", "0", "--crop", "32", "--minutes", str(minutes)]
    else:
        minutes = stage_minutes(s.left())
        cmd += ["--gpus", "1", "--minutes", str(minutes), "--workers", str(min(8, os.cpu_count() or 1))]
    if minutes <= 0:
        s.say(f"=== stage: skipped, {s.left():.0f} s left is too little for a stage")
        s.results.append(("stage", "skipped (budget spent)", 0.0))
    else:
        # Its own --minutes ends it (SIGTERM to the trainer, last.ckpt, export) within
        # minutes + STAGE_OVERHEAD_S, COLLECT_RESERVE_S before the deadline; this limit is a
        # backstop for a stage that hangs, STAGE_BACKSTOP_S after that end: SIGTERM (the stage
        # still saves and exports), SIGKILL STAGE_KILL_GRACE_S later, past the deadline into the
        # call's CALL_MARGIN_S (the negative reserve). Cut to the deadline less a 60 s grace, it
        # came 5-11 s after --minutes, before the stage's own end.
        s.step("stage", cmd, minutes * 60 + STAGE_OVERHEAD_S + STAGE_BACKSTOP_S, grace_s=STAGE_KILL_GRACE_S,
               reserve_s=COLLECT_RESERVE_S - STAGE_BACKSTOP_S - STAGE_KILL_GRACE_S)
        log_tail(s, work / "train.log", 40)
    collect_train(s, work)


def log_tail(s: Session, path: Path, lines: int) -> None:
    """The last ``lines`` of a step's own log (the stage writes the trainer's output there)."""
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    s.say(f"--- last {len(tail)} lines of {path}:")
    for line in tail:
        s.say("  | " + line)


def collect_train(s: Session, work: Path) -> None:
    """Weights, stage.json and the stage state (tar pieces) to $OUT."""
    from npbgpp_core.atomic import atomic_copy_file

    t0 = time.time()
    for name in ("npbgpp_sphere_stage.safetensors", "stage.json"):
        if (work / name).is_file():
            atomic_copy_file(work / name, s.out / name)  # $OUT comes back as it is: whole files or none
    last = work / "run" / "checkpoints" / "last.ckpt"
    if last.is_file():
        tar_path = s.scratch / "stage_state.tar"
        with tarfile.open(tar_path, "w") as tar:
            for rel in ("run/checkpoints/last.ckpt", "run/.hydra", "run/headless_train.log", "stage.json", "card.json",
                        "train.log"):
                if (work / rel).exists():
                    tar.add(work / rel, arcname=rel)
        parts = split_file(tar_path, s.out, "stage_state")
        s.say(f"=== stage state: {len(parts)} piece(s) of at most {PART_BYTES // MIB} MiB "
              f"({', '.join(p.name for p in parts)}); here: bench/gpu_session.py prepare --resume-from <files_at>")
        s.results.append(("collect", "ok", time.time() - t0))
    else:
        s.say(f"=== stage state: none ({last} missing)")
        s.results.append(("collect", "no stage state", time.time() - t0))


DENSIFY_LIMIT_S = 120  # bench_densify --gpu: 10-view warm-up, 100 timed views, accuracy on the host
SPEED_SLACK_S = 40


def mode_speed(s: Session) -> None:
    """gpu_speed.py within the budget, then bench_densify.py --gpu on the carried scene."""
    scene_dir = s.kit / "densify"
    densify_s = DENSIFY_LIMIT_S if (densify_scene_ready(s.kit) or s.dry_run) else 0
    speed = [sys.executable, "bench/gpu_speed.py", "--json", str(s.out / "gpu_speed.json")]
    if s.dry_run:
        speed += ["--dry-run", "--steps", "info,stages"]
    else:
        # gpu_speed.py cuts its own later steps (compile first) when its budget runs out
        # (a step under way when its budget ends still finishes: SPEED_SLACK_S for it)
        speed += ["--budget-s", str(max(30, int(s.left() - densify_s - COLLECT_RESERVE_S - SPEED_SLACK_S)))]
    s.step("gpu_speed", speed, s.left() - densify_s - COLLECT_RESERVE_S, grace_s=20, reserve_s=0)
    if densify_s:
        densify = [sys.executable, "bench/bench_densify.py", "--gpu", "--cache", str(scene_dir)]
        s.step("bench_densify", densify + (["--dry-run"] if s.dry_run else []), densify_s,
               reserve_s=COLLECT_RESERVE_S - 10)
    else:
        s.say(f"=== bench_densify: skipped, no {scene_dir / densify_scene_name()} (prepare renders it; bpy is "
              "not on the device)")
        s.results.append(("bench_densify", "skipped (no scene)", 0.0))


def check_out(s: Session) -> None:
    """Say which files would not come back (over 8 files or 16 MiB each)."""
    files = sorted((p for p in s.out.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
    if len(files) > OUT_MAX_FILES:
        s.say(f"warning: {len(files)} files in $OUT, only {OUT_MAX_FILES} come back")
    for p in files:
        if p.stat().st_size > OUT_FILE_LIMIT:
            s.say(f"warning: $OUT/{p.name} is {p.stat().st_size / MIB:.1f} MiB, over 16 MiB: it will not come back")


def run_mode(args: argparse.Namespace) -> int:
    out = args.out or os.environ.get("OUT")
    if not out:
        raise KitError("no output folder: give --out DIR (on the device the tool sets $OUT)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    kit = (ROOT / args.kit).resolve()
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[args.mode]
    if not args.dry_run:  # a dry run here is not bound by the device's limits
        check_budget(budget, "--budget-s")
    with open(out_dir / f"{args.mode}.log", "a", encoding="utf-8") as log, \
            tempfile.TemporaryDirectory(prefix="gpu_session_") as scratch:
        s = Session(args.mode, out_dir, kit, time.time() + budget, args.dry_run, log, Path(scratch))
        s.env["PYTHONUNBUFFERED"] = "1"
        if args.dry_run:
            s.env["OMP_NUM_THREADS"] = "1"  # shared CPUs here; torch picks its own on the device
        previous = {sig: signal.signal(sig, s.on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            return run_steps(s, args, kit, budget)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_steps(s: Session, args: argparse.Namespace, kit: Path, budget: int) -> int:
    """A mode's steps, the summary and the exit code (0: every step passed; 1: one failed
    or was skipped; 2: no kit; 3: no CUDA; 128 + N: stopped by signal N, :func:`exit_status`)."""
    s.say(f"=== gpu_session {args.mode}{' --dry-run' if args.dry_run else ''}: budget {budget} s, kit {kit}, "
          f"out {s.out}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    if not kit.is_dir() and args.corpus is None:
        s.say(f"error: no kit folder {kit}: run `bench/gpu_session.py prepare` here and carry its paths")
        return 2
    cuda = python_info(s)
    if not cuda and not args.dry_run:
        s.summary()
        return 3
    ok = install_deps(s)
    if ok:
        build_kernels(s)
        with returned_benchmarks(s.out):
            if args.mode == "train":
                mode_train(s, Path(args.corpus).resolve() if args.corpus else None, args.targets_per_sample)
            else:
                mode_speed(s)
    s.summary()
    check_out(s)
    if s.stopped_by is not None:
        s.say(f"=== gpu_session {args.mode}: stopped by {signal.Signals(s.stopped_by).name}")
        return exit_status(s.stopped_by)
    failed = [n for n, outcome, _ in s.results if not outcome.startswith(("rc=0", "ok"))]
    if failed or not ok:
        s.say(f"=== gpu_session {args.mode}: FAILED or skipped: {', '.join(failed) or 'deps'}")
        return 1
    s.say(f"=== gpu_session {args.mode}: all steps passed")
    return 0


def parse_budgets(text: str | None) -> dict[str, int]:
    """``train=400,speed=300`` -> {"train": 400, "speed": 300}; KitError on anything else."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        mode, _, value = item.partition("=")
        if mode not in DEFAULT_BUDGET_S or not value.strip().isdigit():
            raise KitError(f"--budgets takes train=SECONDS,speed=SECONDS, got {text!r}")
        out[mode] = check_budget(int(value), f"--budgets {mode}")
    return out


TARGETS_HELP = ("the stage's --targets-per-sample: target crops per set of input views (default: left out, i.e. 1 "
                "on a first call, today's recipe, and the run's own on a resumed one)")


def targets_count(text: str) -> int:
    """``--targets-per-sample`` K: a whole number >= 1, refused here rather than by the stage
    on the device."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_session.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("train", "speed"):
        m = sub.add_parser(mode, help=f"the {mode} call (on the GPU machine)")
        m.add_argument("--out", default=None, help="where results go (default: $OUT)")
        m.add_argument("--budget-s", type=int, default=None,
                       help=f"wall seconds for the whole mode (default {DEFAULT_BUDGET_S[mode]})")
        m.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the plumbing")
        m.add_argument("--kit", default=KIT, help="kit folder relative to the repository (default .gpurun)")
        if mode == "train":
            m.add_argument("--corpus", default=None, help="corpus folder (default: <kit>/corpus)")
            m.add_argument("--targets-per-sample", type=targets_count, default=None, metavar="K",
                           help=TARGETS_HELP)
    for mode in ("prepare", "plan"):
        m = sub.add_parser(mode, help="build the kit here and print the run calls" if mode == "prepare"
                           else "print the run calls and sizes of the kit as it is")
        m.add_argument("--kit", default=KIT)
        m.add_argument("--budgets", type=parse_budgets, default={},
                       help="train=SECONDS,speed=SECONDS of the two calls (default "
                            f"train={DEFAULT_BUDGET_S['train']},speed={DEFAULT_BUDGET_S['speed']})")
        m.add_argument("--targets-per-sample", type=targets_count, default=None, metavar="K",
                       help=TARGETS_HELP + " (the train call passes it on)")
        if mode == "prepare":
            m.add_argument("--corpus", default=None, help="training corpus to pack (scene folders; links followed; "
                           f"with --render-envs / --render-objects default {KIT}/{RENDER_FOLDER})")
            m.add_argument("--render-envs", type=render_count("--render-envs"), default=None, metavar="N|auto",
                           help="first render the environment scenes env_1..env_N missing in the corpus folder "
                                "(MODEL_CARD's command, resumable); auto: as many as the corpus budget carries "
                                "(as many as objects when both are auto)")
            m.add_argument("--render-objects", type=render_count("--render-objects"), default=None,
                           metavar="N|auto", help="the same for the procedural objects on white random_1..random_N")
            m.add_argument("--captures", default=None,
                           help=f"folder of the prepared Z-up training captures ({', '.join(TRAINING_CAPTURES)}), "
                                "each packed into the corpus once")
            m.add_argument("--scenes", default=None, help="only these scene folders (comma list, shell patterns); "
                           "prepare says which families they leave out")
            m.add_argument("--max-side", type=int, default=192)
            m.add_argument("--max-points", type=int, default=20000)
            m.add_argument("--corpus-mib", type=float, default=None, help="at most this many MiB of corpus")
            m.add_argument("--no-resume-room", action="store_true",
                           help="use the room kept for a returned stage state for corpus (later calls then start "
                                "from the returned weights with --start-weights instead of resuming)")
            m.add_argument("--rebuild-corpus", action="store_true")
            m.add_argument("--resume-from", default=None,
                           help="folder with the stage_state.*.tar.NN pieces a train call returned")
            m.add_argument("--start-weights", default=None, help="weights a first (not resumed) call starts from")
            m.add_argument("--no-densify", action="store_true", help="do not render the bench_densify --gpu scene")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.mode == "plan":
            print(plan_text(args.kit, ROOT, args.budgets, args.targets_per_sample))
            return 0
        if args.mode == "prepare":
            return prepare(args)
        return run_mode(args)
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
