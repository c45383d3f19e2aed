"""bench/gpu_session.py, the kit for a lent GPU session: the `run` calls it prints fit the
device tool's limits, the size budget and the balanced scene choice (hand-computed), the
stage state's round trip through $OUT pieces, argument errors, ``prepare --render-envs``
with a stand-in generator (only unfinished scenes rendered, what remains when stopped), and
(slow) the train mode's whole plumbing on the CPU twice, the second call resuming the first
from its pieces."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, os.path.dirname(__file__))

import gpu_session as gs  # noqa: E402
from _train_fixtures import make_dataset  # noqa: E402

MIB = 2**20


def test_run_calls_fit_the_device_tool_limits(tmp_path):
    scene = gs.densify_scene_name()
    for name in ("whl", "corpus", "stage", f"densify/{scene}"):
        (tmp_path / ".gpurun" / name).mkdir(parents=True)
    assert gs.run_calls(".gpurun", tmp_path)[1]["carry"] == [".gpurun/whl"]  # the render is not complete
    (tmp_path / ".gpurun" / "densify" / scene / "transforms_train.json").write_text("{}")
    calls = gs.run_calls(".gpurun", tmp_path)
    assert [c["mode"] for c in calls] == ["train", "speed"]
    assert calls[0]["carry"] == [".gpurun/whl", ".gpurun/corpus", ".gpurun/stage"]  # no start.safetensors here
    assert calls[1]["carry"] == [".gpurun/whl", ".gpurun/densify/textured_monkey_100_1280x720"]
    for c, budget in zip(calls, (gs.DEFAULT_BUDGET_S["train"], gs.DEFAULT_BUDGET_S["speed"]), strict=True):
        assert len(c["command"]) <= 2000 and c["timeout_s"] <= 600
        assert f"--budget-s {budget}" in c["command"] and c["timeout_s"] > budget
        assert c["command"].startswith("set -o pipefail; export PYTHONUNBUFFERED=1; python3 bench/gpu_session.py")
    assert gs.check_calls(calls) == []
    # the calls last session's note prints: (15 min - a 90 s machine start) / 2 = 405 s a call,
    # 45 of them beyond the mode's own budget
    assert [(c["timeout_s"], c["command"]) for c in calls] == [
        (405, f'set -o pipefail; export PYTHONUNBUFFERED=1; python3 bench/gpu_session.py {m} --out "$OUT" '
              "--budget-s 360 2>&1") for m in ("train", "speed")]
    assert sum(c["timeout_s"] for c in calls) + 90 <= 15 * 60
    long_train = gs.run_calls(".gpurun", tmp_path, {"train": 540})
    assert long_train[0]["timeout_s"] == 585
    assert [p for p in gs.check_calls(long_train) if "1080 s, over the session's 900 s" in p]  # 585 + 405 + 90
    bad = [{"mode": "train", "command": "x" * 2001, "carry": ["a"] * 9, "timeout_s": 601}]
    assert len(gs.check_calls(bad)) == 3


def test_targets_per_sample_goes_to_the_train_call_and_is_checked_against_the_kits_run(tmp_path, capsys):
    """plan/prepare --targets-per-sample K puts the option into the train call's command only
    (left out: today's command, above). Against a kit whose stage run recorded another K,
    which the resumed stage would refuse on the device (losing the call's stage), plan names
    the problem and prepare refuses before building any part; the same K, or none, passes."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    calls = gs.run_calls(".gpurun", tmp_path, None, 3)
    assert calls[0]["command"] == ('set -o pipefail; export PYTHONUNBUFFERED=1; python3 bench/gpu_session.py train '
                                   '--out "$OUT" --budget-s 360 --targets-per-sample 3 2>&1')
    assert "--targets-per-sample" not in calls[1]["command"] and gs.check_calls(calls) == []
    stage = tmp_path / ".gpurun" / "stage"
    assert gs.stage_targets_problem(stage, 3) is None  # no run yet: the first call takes any K
    (stage / "run" / "checkpoints").mkdir(parents=True)
    (stage / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (stage / "stage.json").write_text(json.dumps([{"end_step": 5, "settings": {"targets_per_sample": 2}}]))
    assert gs.stage_targets_problem(stage, 2) is None and gs.stage_targets_problem(stage, None) is None
    problem = gs.stage_targets_problem(stage, 3)
    assert problem and "--targets-per-sample 3: the kit's stage run" in problem and "trained with " \
        "--targets-per-sample 2" in problem
    assert f"problem: {problem}" in gs.plan_text(".gpurun", tmp_path, None, 3)
    assert "problem" not in gs.plan_text(".gpurun", tmp_path, None, 2)
    kit = tmp_path / ".gpurun"
    (kit / "corpus").mkdir()  # a kept corpus: prepare goes straight to building the kit
    assert gs.main(["prepare", "--kit", str(kit), "--no-densify", "--targets-per-sample", "3"]) == 2
    err = capsys.readouterr().err
    assert problem in err and "done: nothing" in err and not (kit / "whl").exists(), err
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            gs.parse_args(["plan", "--targets-per-sample", bad])
        assert "--targets-per-sample: must be a whole number >= 1" in capsys.readouterr().err


def test_corpus_budget_and_balanced_scene_choice():
    # 62 MiB usable - 14 checkout - 0.5 wheels - 27.5 kept for a returned stage state
    assert gs.corpus_budget_mib(14 * MIB, MIB // 2, None) == pytest.approx(20.0)
    assert gs.corpus_budget_mib(14 * MIB, MIB // 2, 0) == pytest.approx(47.5)
    assert gs.corpus_budget_mib(14 * MIB, MIB // 2, 30 * MIB) == pytest.approx(17.5)
    assert [gs.scene_group(n) for n in ("env_12", "skull_x3", "skull", "random_3", "lund_x2")] == [
        "env", "skull", "skull", "random", "lund"]
    sizes = {"env_1": 3, "env_2": 3, "env_10": 3, "random_1": 1, "random_2": 1, "skull": 1, "skull_x2": 1}
    # groups by size: skull (2), random (2), env (3); round 1: skull, random_1, env_1 (5 bytes);
    # round 2: skull_x2 (6), random_2 (7), env_2 would make 10 > 7
    assert gs.balanced_choice(sizes, 7) == ["env_1", "random_1", "random_2", "skull", "skull_x2"]
    assert gs.balanced_choice(sizes, 100) == ["env_1", "env_2", "env_10", "random_1", "random_2", "skull", "skull_x2"]
    assert gs.balanced_choice(sizes, 0) == []
    # the model card's three families: env, random (objects on white), capture (every other
    # name); the captures count as one family, not one each, so they cannot crowd out the others
    assert [gs.scene_family(n) for n in ("env_3", "random_12", "skull", "lund_x2", "socketed_axe")] == [
        "env", "random", "capture", "capture", "capture"]
    sizes = {"env_1": 3, "env_2": 3, "random_1": 1, "random_2": 1, "random_3": 1, "skull": 2, "lund": 2,
             "socketed_axe": 2}
    # families by size: env (2), capture (3), random (3); round 1: env_1, lund (natural order:
    # lund before skull), random_1 (6 bytes); round 2: env_2 (9), skull (11), random_2 (12)
    assert gs.balanced_choice(sizes, 12) == ["env_1", "env_2", "lund", "random_1", "random_2", "skull"]
    # one group each for a capture: lund, skull, then their second links
    assert gs.balanced_choice({"skull": 1, "skull_x2": 1, "lund": 1, "lund_x2": 1}, 3) == ["lund", "lund_x2", "skull"]
    # tight: each family's first scene still comes before any second one
    assert gs.balanced_choice(sizes, 6) == ["env_1", "lund", "random_1"]


def test_stage_minutes_leave_the_stage_overhead_and_the_copies_their_time():
    # (235 s - 45 stage overhead - 20 copies) / 60 = 2.83 -> 2.8
    assert gs.stage_minutes(235) == 2.8
    assert gs.stage_minutes(65 + 30) == 0.5
    assert gs.stage_minutes(65 + 29) == 0.0


def test_bench_steps_leave_the_stage_its_minutes(tmp_path):
    """Training first: a bench step runs only when its whole limit and SIGKILL grace still
    leave the stage MIN_STAGE_MINUTES (2). Hand-computed for the default split (about 310 s
    left after python's checks, the deps and the CUDA build): bench_train (110 s) fits; the
    compare (45 s) after a whole-limit bench_train (200 s left) does not, with 240 s left it
    does; the stage then gets at least 2 minutes. A skipped step says why in the log; one
    that fits runs."""
    assert gs.stage_reserve_s() == 2 * 60 + 45 + 20
    assert gs.bench_fits(310, gs.BENCH_TRAIN_LIMIT_S) and not gs.bench_fits(304, gs.BENCH_TRAIN_LIMIT_S)
    assert not gs.bench_fits(200, gs.BENCH_COMPARE_LIMIT_S)
    assert gs.bench_fits(240, gs.BENCH_COMPARE_LIMIT_S) and not gs.bench_fits(239, gs.BENCH_COMPARE_LIMIT_S)
    assert gs.stage_minutes(200) == 2.2 and gs.stage_minutes(gs.stage_reserve_s()) == 2.0
    log = io.StringIO()
    s = gs.Session(mode="train", out=tmp_path, kit=tmp_path, deadline=time.time() + 200, dry_run=True, log=log,
                   scratch=tmp_path)
    exits_7 = [sys.executable, "-c", "raise SystemExit(7)"]
    assert gs.bench_step(s, "bench_compare", exits_7, gs.BENCH_COMPARE_LIMIT_S) is None
    assert "=== bench_compare: skipped, " in log.getvalue() and \
        "its 45 s limit would leave the stage under 2 minutes (training first)" in log.getvalue(), log.getvalue()
    assert s.results == [("bench_compare", "skipped (stage first)", 0.0)]
    s.deadline = time.time() + 300
    assert gs.bench_step(s, "bench_compare", exits_7, gs.BENCH_COMPARE_LIMIT_S) == 7


def test_stage_backstop_comes_after_the_stages_own_end_and_its_kill_before_the_call_ends(tmp_path, monkeypatch):
    """The stage's backstop (Session.step's time limit) is for a stage that hangs: it must
    come after the stage's own end (its --minutes plus STAGE_OVERHEAD_S, the start, last.ckpt
    and the export), and its SIGKILL (limit + grace) before the call's timeout_s ends it
    (the deadline plus CALL_MARGIN_S, less python's start and the copies). Checked on a
    non-dry train call at the docstring's splits (the benches skipped at 200 s left), the
    steps recorded with the limit Session.step would give them, not run."""
    steps = []

    def record(self, name, cmd, limit_s, grace_s=10.0, reserve_s=0.0):
        steps.append((name, cmd, self.step_limit(limit_s, grace_s, reserve_s), grace_s, self.left()))
        return 0

    monkeypatch.setattr(gs.Session, "step", record)
    for left in (200.0, 195.0, 245.0, 310.0, 555.0):
        steps.clear()
        s = gs.Session(mode="train", out=tmp_path, kit=tmp_path, deadline=time.time() + left, dry_run=False,
                       log=io.StringIO(), scratch=tmp_path)
        gs.mode_train(s, tmp_path / "corpus")
        name, cmd, limit, grace, at = steps[-1]
        assert name == "stage", steps
        minutes = float(cmd[cmd.index("--minutes") + 1])
        assert minutes >= gs.MIN_STAGE_MINUTES
        own_end = minutes * 60 + gs.STAGE_OVERHEAD_S
        assert limit >= own_end + 10, (left, minutes, limit)  # was 140 s at 200 s left: 37 s before its end
        assert limit + grace <= at + gs.CALL_MARGIN_S - 20, (left, limit, grace)


def test_state_pieces_round_trip_and_damage_is_refused(tmp_path):
    data = os.urandom(2500)
    src = tmp_path / "state.tar"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    parts = gs.split_file(src, out, "stage_state", part_bytes=1000)
    assert [p.stat().st_size for p in parts] == [1000, 1000, 500]
    assert gs.join_parts(out, "stage_state", tmp_path / "joined").read_bytes() == data
    # a piece whose bytes changed
    bad = bytearray(parts[1].read_bytes())
    bad[7] ^= 1
    parts[1].write_bytes(bytes(bad))
    with pytest.raises(gs.KitError, match="digest differs"):
        gs.join_parts(out, "stage_state", tmp_path / "joined")
    assert not (tmp_path / "joined").exists()
    parts[1].unlink()
    with pytest.raises(gs.KitError, match="one is missing"):
        gs.join_parts(out, "stage_state", tmp_path / "joined")
    mixed = tmp_path / "mixed"  # pieces of two calls' states in one folder
    mixed.mkdir()
    gs.split_file(src, mixed, "stage_state", part_bytes=1000)
    other = tmp_path / "other.tar"
    other.write_bytes(b"other")
    gs.split_file(other, mixed, "stage_state", part_bytes=1000)
    with pytest.raises(gs.KitError, match="2 different stage states"):
        gs.join_parts(mixed, "stage_state", tmp_path / "joined")
    with pytest.raises(gs.KitError, match="no stage_state"):
        gs.join_parts(tmp_path, "stage_state", tmp_path / "joined")
    # an exact multiple of the piece size ends with a full piece, no empty one
    src.write_bytes(data[:2000])
    exact = tmp_path / "exact"
    exact.mkdir()
    assert [p.stat().st_size for p in gs.split_file(src, exact, "s", part_bytes=1000)] == [1000, 1000]


def test_benchmarks_sections_come_back_also_after_a_failure(tmp_path):
    bench, out = tmp_path / "BENCHMARKS.md", tmp_path / "out"
    out.mkdir()
    bench.write_text("# Benchmarks\n")
    with gs.returned_benchmarks(out, bench):
        pass
    assert not (out / "BENCHMARKS_appended.md").exists()  # nothing appended: no file
    with pytest.raises(RuntimeError), gs.returned_benchmarks(out, bench):
        bench.write_text("# Benchmarks\n\n### one\n")
        raise RuntimeError("a step failed")
    assert (out / "BENCHMARKS_appended.md").read_text() == "\n### one\n"


def test_tree_bytes_counts_tracked_and_untracked_files_not_ignored_ones(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/.gpurun/\n")  # 10 bytes
    (tmp_path / "tracked.txt").write_bytes(b"x" * 100)
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.txt", ".gitignore"], check=True)
    (tmp_path / "untracked.txt").write_bytes(b"y" * 50)
    (tmp_path / ".gpurun").mkdir()
    (tmp_path / ".gpurun" / "big").write_bytes(b"z" * 5000)
    assert gs.tree_bytes(tmp_path) == 160  # 10 + 100 + 50
    assert gs.path_bytes(tmp_path / ".gpurun") == 5000


def test_wheel_pins_follow_requirements_txt():
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pinned[name.lower()] = version
    kit = dict(p.split("==") for p in gs.WHEEL_PINS)
    assert kit["hydra-core"] == pinned["hydra-core"] and kit["plyfile"] == pinned["plyfile"]


def test_mode_arguments_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    assert gs.main(["train", "--kit", str(tmp_path)]) == 2
    assert "no output folder: give --out" in capsys.readouterr().err
    assert gs.main(["speed", "--out", str(tmp_path / "o"), "--budget-s", "700"]) == 2
    assert "--budget-s must be in 60..555 s" in capsys.readouterr().err
    assert gs.main(["train", "--out", str(tmp_path / "o"), "--kit", str(tmp_path / "nokit")]) == 2
    assert "no kit folder" in (tmp_path / "o" / "train.log").read_text()
    with pytest.raises(gs.KitError, match="train=SECONDS"):
        gs.parse_budgets("train=abc")
    with pytest.raises(gs.KitError, match="must be in 60"):
        gs.parse_budgets("speed=10")
    assert gs.parse_budgets("train=540") == {"train": 540}
    # one bound for --budget-s and --budgets: a budget and its 45 s margin within a 600 s call
    assert gs.parse_budgets("train=555,speed=60") == {"train": 555, "speed": 60}
    with pytest.raises(gs.KitError, match=r"--budgets train must be in 60\.\.555 s"):
        gs.parse_budgets("train=556")
    assert gs.main(["train", "--out", str(tmp_path / "o"), "--budget-s", "556"]) == 2
    assert "--budget-s must be in 60..555 s" in capsys.readouterr().err
    # prepare without a corpus refuses before building anything (the check `make gpu-kit` relies on)
    assert gs.main(["prepare", "--kit", str(tmp_path / "newkit")]) == 2
    assert "no corpus yet: give --corpus DIR" in capsys.readouterr().err and not (tmp_path / "newkit").exists()
    with pytest.raises(SystemExit):
        gs.parse_args(["render"])


@pytest.mark.slow
def test_train_mode_dry_run_twice_resumes_from_the_returned_pieces(tmp_path):
    """The train call's plumbing on the CPU: wheels installed from the kit, a 0.3-minute
    stage, bench_train, the weights/state pieces in $OUT; the pieces restored into a new
    kit make the second call resume the first run's steps."""
    corpus = make_dataset(str(tmp_path / "corpus"), ("s1", "s2"), views=5, size=24, n_points=150)
    kit1, kit2 = tmp_path / "kit1", tmp_path / "kit2"
    wheels = sorted((ROOT / gs.KIT / "whl").glob("*.whl"))
    for kit in (kit1, kit2):
        (kit / "whl").mkdir(parents=True)
        for w in wheels:  # the real wheelhouse when prepared here; without it the deps step checks imports only
            (kit / "whl" / w.name).write_bytes(w.read_bytes())

    def call(kit: Path, out: Path, extra: tuple[str, ...] = ()) -> list[dict]:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "train", "--dry-run",
                            "--kit", str(kit), "--corpus", corpus, "--out", str(out), *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "gpu_session train: all steps passed" in r.stdout
        names = sorted(p.name for p in out.iterdir())
        assert len(names) <= gs.OUT_MAX_FILES and all(p.stat().st_size <= gs.OUT_FILE_LIMIT for p in out.iterdir())
        assert {"npbgpp_sphere_stage.safetensors", "stage.json", "bench_train.json", "train.log"} <= set(names)
        assert sum(n.startswith("stage_state.") for n in names) == 2  # last.ckpt with Adam: 26 MiB in 2 pieces
        assert json.loads((out / "bench_train.json").read_text())["steps"] == 2
        compared = json.loads((out / "bench_train_compare.json").read_text())["modes"]
        assert {m: v["targets_per_sample"] for m, v in compared.items()} == {"batched": 1, "batched_k3": 3}
        return json.loads((out / "stage.json").read_text())

    # the first call trains 2 targets per sample; the second, given none, keeps the run's
    first = call(kit1, tmp_path / "out1", ("--targets-per-sample", "2"))
    assert [(c["resumed"], c["start_step"]) for c in first] == [(False, 0)] and first[0]["end_step"] > 0
    gs.restore_state(tmp_path / "out1", kit2 / "stage")
    second = call(kit2, tmp_path / "out2")
    assert [(c["resumed"], c["start_step"]) for c in second] == [(False, 0), (True, first[0]["end_step"])]
    assert second[1]["end_step"] > second[1]["start_step"]
    assert [c["settings"]["targets_per_sample"] for c in second] == [2, 2]


@pytest.mark.slow
def test_speed_mode_dry_run_runs_gpu_speed_and_densify_and_keeps_benchmarks_md(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    kit, out = tmp_path / "kit", tmp_path / "out"
    kit.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "speed", "--dry-run",
                        "--kit", str(kit), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    log = (out / "speed.log").read_text()
    assert "=== gpu_speed: rc=0" in log and "=== bench_densify: rc=0" in log
    assert "plan: textured_monkey, 100 views 1280x720, device cuda, target 20 s" in log
    assert json.loads((out / "gpu_speed.json").read_text())["failed"] == []
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before and not (out / "BENCHMARKS_appended.md").exists()


# A stand-in for the environment generator (`prepare --render-envs` runs it as
# `python <ENV_GENERATOR> --seeds ... --out DIR`): records its arguments, writes a tiny scene
# with env.json (what the real one writes last) per seed, and optionally fails or stops.
ENV_STUB = r"""
import json, os, signal, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from _train_fixtures import make_tiny_scene
args = sys.argv[1:]
seeds = [int(s) for s in args[args.index("--seeds") + 1].split(",")]
out = args[args.index("--out") + 1]
with open(os.path.join({log!r}), "a") as f:
    f.write(json.dumps(args) + "\n")
for k, seed in enumerate(seeds):
    if k == {fail_after}:
        if {stop!r}:
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(60)
        sys.exit(1)
    make_tiny_scene(os.path.join(out, f"env_{{seed}}"), views=4, size=16, n_points=50, seed=seed, splits=(3, 0, 1))
    with open(os.path.join(out, f"env_{{seed}}", "env.json"), "w") as f:
        json.dump({{"seed": seed}}, f)
"""


def _kit_with_wheels(path: Path) -> Path:
    """A kit folder whose wheelhouse already holds a file for each pin (build_wheels then
    downloads nothing)."""
    (path / "whl").mkdir(parents=True)
    for pin in gs.WHEEL_PINS:
        name, version = pin.split("==")
        (path / "whl" / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    return path


def _stub_generator(monkeypatch, tmp_path: Path, fail_after: int = -1, stop: bool = False) -> Path:
    log = tmp_path / "generator_calls.jsonl"
    code = ENV_STUB.format(tests=str(ROOT / "tests"), root=str(ROOT), log=str(log), fail_after=fail_after, stop=stop)
    monkeypatch.setattr(gs, "ENV_GENERATOR", ("-c", code))
    return log


def _finished_env(corpus: Path, seed: int) -> None:
    from _train_fixtures import make_tiny_scene

    make_tiny_scene(str(corpus / f"env_{seed}"), views=4, size=16, n_points=50, seed=seed, splits=(3, 0, 1))
    (corpus / f"env_{seed}" / "env.json").write_text("{}")


def test_render_envs_renders_only_the_missing_scenes_then_packs(tmp_path, monkeypatch, capsys):
    kit, corpus = _kit_with_wheels(tmp_path / "kit"), tmp_path / "envs"
    _finished_env(corpus, 1)
    (corpus / "env_2").mkdir()  # a scene without env.json is not finished: rendered again
    (corpus / "env_2" / "transforms_train.json").write_text("{}")
    log = _stub_generator(monkeypatch, tmp_path)
    args = ["prepare", "--kit", str(kit), "--corpus", str(corpus), "--no-densify", "--corpus-mib", "5"]
    assert gs.main([*args, "--render-envs", "3"]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["--seeds", "2,3", *gs.ENV_RENDER_ARGS, "--out", str(corpus)]]
    out = capsys.readouterr().out
    assert "env_1..env_3" in out and "1 finished, 2 to render" in out
    assert "--- env scenes: done in" in out and "--- corpus: done in" in out and "kit built: wheels" in out
    assert sorted(p.name for p in (kit / "corpus").iterdir()) == ["env_1", "env_2", "env_3"]
    # again, corpus repacked: every scene finished, the generator is not started
    assert gs.main([*args, "--render-envs", "3", "--rebuild-corpus"]) == 0
    assert len(log.read_text().splitlines()) == 1
    assert "3 finished, 0 to render" in capsys.readouterr().out
    # a kept corpus needs no scenes: none are rendered for it
    assert gs.main([*args, "--render-envs", "5"]) == 0
    assert len(log.read_text().splitlines()) == 1 and not (corpus / "env_4").exists()
    assert "corpus: kept" in capsys.readouterr().out


def test_render_envs_stopped_says_what_is_done_and_what_remains(tmp_path, monkeypatch, capsys):
    kit, corpus = _kit_with_wheels(tmp_path / "kit"), tmp_path / "envs"
    args = ["prepare", "--kit", str(kit), "--corpus", str(corpus), "--render-envs", "3", "--corpus-mib", "5"]
    _stub_generator(monkeypatch, tmp_path, fail_after=1)
    assert gs.main(args) == 2
    err = capsys.readouterr().err
    assert "the generator exited with 1" in err
    assert "prepare stopped by this error during 'env scenes'" in err and "done: wheels (" in err
    assert "remaining: env scenes: 2 of env_1..env_3 unfinished in" in err and "(env_2, env_3)" in err
    assert "remaining: corpus\n" in err and "remaining: densify scene: textured_monkey_100_1280x720" in err
    assert not (kit / "corpus").exists()
    # a signal (here SIGTERM from the generator to prepare) stops the generator and reports the same way
    _stub_generator(monkeypatch, tmp_path, fail_after=0, stop=True)
    assert gs.main(args) == 128 + 15
    err = capsys.readouterr().err
    assert "prepare stopped by SIGTERM during 'env scenes'" in err and "(env_2, env_3)" in err
    assert "The same command resumes" in err and not (kit / "corpus").exists()


def test_render_envs_arguments_and_corpus_folder_are_checked(tmp_path, capsys):
    kit = tmp_path / "kit"
    for bad in ("0", "-2", "abc", "2.5"):
        assert gs.main(["prepare", "--kit", str(kit), "--render-envs", bad]) == 2
        assert f"--render-envs takes a number of scenes >= 1 or 'auto', got '{bad}'" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert gs.main(["prepare", "--kit", str(kit), "--render-envs", "2", "--corpus", str(a_file)]) == 2
    assert f"--corpus {a_file} is not a folder" in capsys.readouterr().err
    # a corpus in the checkout that git does not ignore would travel with every run call
    inside = ROOT / "corpus_env_not_ignored" / "train"
    assert gs.main(["prepare", "--kit", str(kit), "--render-envs", "2", "--corpus", str(inside)]) == 2
    assert "is inside the checkout and not ignored by git" in capsys.readouterr().err
    assert not inside.parent.exists() and not kit.exists()  # refused before anything was made
    gs.check_corpus_folder(ROOT / gs.KIT / gs.RENDER_FOLDER)  # the default: ignored with the kit
    # auto: enough ~2.4 MiB packed scenes to fill the budget (19.1 MiB: the default kit with
    # room for a stage state, 7.96 -> 8; 46.6 MiB: --no-resume-room, 19.4 -> 20)
    assert [gs.scene_counts({"env": "auto"}, b)["env"] for b in (19.1, 46.6, 2.4, 1.0)] == [8, 20, 1, 1]
    assert gs.scene_counts({"env": 30}, 2.0) == {"env": 30}
    with pytest.raises(gs.KitError, match="holds no more scenes"):
        gs.scene_counts({"env": "auto"}, 0.9)
    # both auto: equal counts of env (2.4) and objects (0.75) in what 3 captures (0.35 each)
    # leave: (19.1 - 1.05) / 3.15 = 5.7 -> 6 of each; (46.6 - 1.05) / 3.15 = 14.5 -> 15
    assert gs.scene_counts({"env": "auto", "random": "auto"}, 19.1, 3) == {"env": 6, "random": 6}
    assert gs.scene_counts({"env": "auto", "random": "auto"}, 46.6, 3) == {"env": 15, "random": 15}
    # a given count is taken off first: (19.1 - 4 x 0.75) / 2.4 = 6.7 -> 7
    assert gs.scene_counts({"env": "auto", "random": 4}, 19.1) == {"random": 4, "env": 7}
    assert gs.main(["prepare", "--kit", str(kit), "--render-objects", "0"]) == 2
    assert "--render-objects takes a number of scenes >= 1 or 'auto', got '0'" in capsys.readouterr().err


# A stand-in for the objects command (`python <OBJECT_GENERATOR> --procedural random_<i> --seed
# <i> ... --out DIR`, one scene a call): records its arguments, refuses a non-empty --out as the
# real one does, writes a tiny scene (transforms_train.json included) at --out.
OBJECT_STUB = r"""
import json, os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from _train_fixtures import make_tiny_scene
args = sys.argv[1:]
out = args[args.index("--out") + 1]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\n")
if os.path.isdir(out) and os.listdir(out):
    sys.exit(2)
make_tiny_scene(out, views=4, size=16, n_points=50, seed=int(args[args.index("--seed") + 1]), splits=(3, 0, 1))
"""


def _stub_objects(monkeypatch, tmp_path: Path) -> Path:
    log = tmp_path / "object_calls.jsonl"
    code = OBJECT_STUB.format(tests=str(ROOT / "tests"), root=str(ROOT), log=str(log))
    monkeypatch.setattr(gs, "OBJECT_GENERATOR", ("-c", code))
    return log


def _capture(folder: Path, name: str, orient: str | None = "z-up") -> Path:
    """A stand-in prepared capture: a tiny scene with the capture.json prepare-capture writes
    (``orient`` recorded only for a Z-up copy, as prepare_capture does)."""
    from _train_fixtures import make_tiny_scene

    make_tiny_scene(str(folder / name), views=4, size=16, n_points=50, seed=7, splits=(3, 0, 1))
    (folder / name / "capture.json").write_text(json.dumps({"use": "training", **({"orient": orient} if orient
                                                                                   else {})}))
    return folder / name


def test_fresh_kit_mixes_envs_objects_and_captures(tmp_path, monkeypatch, capsys):
    kit, corpus, captures = _kit_with_wheels(tmp_path / "kit"), tmp_path / "scenes", tmp_path / "captures"
    env_log, obj_log = _stub_generator(monkeypatch, tmp_path), _stub_objects(monkeypatch, tmp_path)
    from _train_fixtures import make_tiny_scene

    make_tiny_scene(str(corpus / "random_1"), views=4, size=16, n_points=50, seed=1, splits=(3, 0, 1))  # finished
    _capture(captures, "skull")
    _capture(captures, "lund")
    (captures / "socketed_axe").mkdir()  # no capture.json: not prepared (missing)
    args = ["prepare", "--kit", str(kit), "--corpus", str(corpus), "--no-densify", "--corpus-mib", "5",
            "--render-envs", "2", "--render-objects", "3", "--captures", str(captures)]
    assert gs.main(args) == 0
    # only the unfinished object scenes, one call each, with the model card's command
    assert [json.loads(line) for line in obj_log.read_text().splitlines()] == [
        ["--procedural", f"random_{i}", "--seed", str(i), *gs.OBJECT_RENDER_ARGS, "--out", str(corpus / f"random_{i}")]
        for i in (2, 3)]
    assert len(env_log.read_text().splitlines()) == 1
    out = capsys.readouterr().out
    assert "object scenes: random_1..random_3" in out and "1 finished, 2 to render" in out
    assert "--- object scenes: done in" in out
    # the missing capture is named with the command that rebuilds it, before and after the build
    assert out.count(f"warning: {captures} lacks the training capture(s) socketed_axe") == 2
    assert "bench/rebuild_captures.py" in out and "--use training" in out
    assert "env 2, random 3, capture 2" in out
    packed = sorted(p.name for p in (kit / "corpus").iterdir())
    assert packed == ["env_1", "env_2", "lund", "random_1", "random_2", "random_3", "skull"]
    assert not (kit / "corpus" / "skull").is_symlink() and (kit / "corpus" / "skull" / "capture.json").is_file()
    # the captures and the render folder are left as they were: no links, no scratch folders
    assert sorted(p.name for p in corpus.iterdir()) == ["env_1", "env_2", "random_1", "random_2", "random_3"]
    assert sorted(p.name for p in captures.iterdir()) == ["lund", "skull", "socketed_axe"]
    assert sorted(p.name for p in kit.iterdir()) == ["corpus", "whl"]
    # rebuilt: all finished, nothing rendered; a capture whose name the corpus holds is refused
    _capture(corpus, "lund")
    assert gs.main([*args, "--rebuild-corpus"]) == 2
    assert f"{corpus} already holds a scene lund" in capsys.readouterr().err
    assert len(obj_log.read_text().splitlines()) == 2 and not (kit / "corpus.sources").exists()


def test_fresh_kit_without_captures_warns_and_bad_captures_are_refused(tmp_path, monkeypatch, capsys):
    kit, corpus = _kit_with_wheels(tmp_path / "kit"), tmp_path / "scenes"
    _stub_generator(monkeypatch, tmp_path)
    obj_log = _stub_objects(monkeypatch, tmp_path)
    args = ["prepare", "--kit", str(kit), "--corpus", str(corpus), "--no-densify", "--corpus-mib", "5",
            "--render-objects", "1"]
    assert gs.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("warning: no --captures: the corpus holds no real captures") == 2
    assert "skull, lund, socketed_axe" in out and "bench/rebuild_captures.py" in out
    assert sorted(p.name for p in (kit / "corpus").iterdir()) == ["random_1"]
    # a capture prepared without --orient z-up would train with the wrong up axis: refused
    # before anything is built, as is a captures folder that does not exist
    captures = tmp_path / "captures"
    _capture(captures, "skull")
    _capture(captures, "lund", orient=None)
    assert gs.main([*args, "--rebuild-corpus", "--captures", str(captures)]) == 2
    err = capsys.readouterr().err
    assert f"{captures / 'lund'} was prepared with orient 'keep'" in err and "--orient z-up" in err
    assert "prepare stopped" not in err and (kit / "corpus").exists()  # the kept corpus is untouched
    assert gs.main([*args, "--captures", str(tmp_path / "nowhere")]) == 2
    assert f"--captures {tmp_path / 'nowhere'}: folder not found" in capsys.readouterr().err
    # an object folder neither finished nor empty: the generator would refuse it, so prepare does
    (corpus / "random_2").mkdir()
    (corpus / "random_2" / "stray.txt").write_text("x")
    assert gs.main([*args[:-1], "2", "--rebuild-corpus"]) == 2
    err = capsys.readouterr().err
    assert f"{corpus / 'random_2'}: not a finished render" in err and "remove it" in err
    assert "remaining: object scenes: 1 of random_1..random_2 unfinished" in err and "(random_2)" in err
    assert len(obj_log.read_text().splitlines()) == 1
    # refused before any render, also when env scenes (minutes each) come first
    env_log = _stub_generator(monkeypatch, tmp_path)
    assert gs.main([*args[:-1], "2", "--rebuild-corpus", "--render-envs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{corpus / 'random_2'}: not a finished render" in err and "remaining: env scenes" in err
    assert not env_log.exists() and len(obj_log.read_text().splitlines()) == 1


def test_scene_patterns_say_which_families_they_leave_out():
    """--scenes 'env_*' dropped the captures (and objects) without a word; a pattern keeping
    no scene is refused naming what the kit holds."""
    names = ["env_1", "env_2", "random_1", "beer", "mouse"]
    assert gs.scene_selection_note(None, names) is None and gs.scene_selection_note(" , ", names) is None
    assert gs.scene_selection_note("*", names) is None  # keeps every scene
    assert gs.scene_selection_note("env_*", names) == (
        "note: --scenes 'env_*' keeps 2 of the kit's 5 scenes; left out: random 1 of 1 (the whole family); "
        "capture 2 of 2 (the whole family: beer, mouse)")
    assert gs.scene_selection_note("env_1, random_*,beer", names) == (
        "note: --scenes 'env_1, random_*,beer' keeps 3 of the kit's 5 scenes; left out: env 1 of 2; capture 1 of 2")
    with pytest.raises(gs.KitError, match=r"--scenes 'Env_\*' matches none of the kit's 5 scenes \(env 2, random 1, "
                                          r"capture 2: env_1, env_2, random_1, beer, mouse\)"):
        gs.scene_selection_note("Env_*", names)  # case matters, as in stage pack


def test_kit_scene_patterns_are_checked_before_rendering(tmp_path, monkeypatch, capsys):
    kit, corpus, captures = _kit_with_wheels(tmp_path / "kit"), tmp_path / "scenes", tmp_path / "captures"
    env_log, obj_log = _stub_generator(monkeypatch, tmp_path), _stub_objects(monkeypatch, tmp_path)
    _capture(captures, "skull")
    args = ["prepare", "--kit", str(kit), "--corpus", str(corpus), "--no-densify", "--corpus-mib", "5",
            "--render-envs", "2", "--render-objects", "1", "--captures", str(captures)]
    # nothing matches: refused before the env scenes (minutes each) are rendered
    assert gs.main([*args, "--scenes", "envs_*"]) == 2
    err = capsys.readouterr().err
    assert "--scenes 'envs_*' matches none of the kit's 4 scenes (env 2, random 1, capture 1: env_1, env_2, " \
           "random_1, skull)" in err
    assert not env_log.exists() and not obj_log.exists() and not (kit / "corpus").exists()
    # env_*: the objects and the capture are said to be left out
    assert gs.main([*args, "--scenes", "env_*"]) == 0
    out = capsys.readouterr().out
    assert ("note: --scenes 'env_*' keeps 2 of the kit's 4 scenes; left out: random 1 of 1 (the whole family); "
            "capture 1 of 1 (the whole family: skull)") in out
    assert sorted(p.name for p in (kit / "corpus").iterdir()) == ["env_1", "env_2"]


def test_fresh_kit_stopped_names_what_remains_of_each_family(tmp_path, monkeypatch, capsys):
    kit, corpus = _kit_with_wheels(tmp_path / "kit"), tmp_path / "scenes"
    _stub_generator(monkeypatch, tmp_path, fail_after=1)
    _stub_objects(monkeypatch, tmp_path)
    assert gs.main(["prepare", "--kit", str(kit), "--corpus", str(corpus), "--corpus-mib", "5",
                    "--render-envs", "2", "--render-objects", "2"]) == 2
    err = capsys.readouterr().err
    assert "prepare stopped by this error during 'env scenes'" in err
    assert "remaining: env scenes: 1 of env_1..env_2 unfinished" in err and "(env_2)" in err
    assert "remaining: object scenes: 2 of random_1..random_2 unfinished" in err and "(random_1, random_2)" in err


def test_procedural_scene_done_is_the_renders_own_finished_test(tmp_path):
    """A finished render holds transforms_train.json (written inside the atomic folder), so
    the kit's test and the command's refusal of a non-empty --out agree on every state."""
    from blender_addon.datagen.render import procedural_scene_done, render_procedural_scene

    out = tmp_path / "random_5"
    assert not procedural_scene_done(str(out))
    render_procedural_scene("random_5", str(out), views=2, size=(8, 8), seed=5, samples=1, points=10)
    assert procedural_scene_done(str(out))
    assert gs.missing_seeds("random", tmp_path, 6) == [1, 2, 3, 4, 6]


def test_training_captures_and_their_rebuild_command_follow_the_captures_manifest():
    """The kit's training captures are bench/captures.json's (the model card's table) training
    entries, each prepared Z-up there; the command the kit's warning prints is one
    bench/rebuild_captures.py accepts, for those captures."""
    import shlex

    import rebuild_captures

    manifest = json.loads((ROOT / "bench" / "captures.json").read_text())["captures"]
    training = [c for c in manifest if c["use"] == "training"]
    assert tuple(c["name"] for c in training) == gs.TRAINING_CAPTURES
    assert {c["orient"] for c in training} == {"z-up"}
    command = gs.CAPTURES_REBUILD.split(" (snapshots")[0].replace("<python with pycolmap>", "python3")
    words = shlex.split(command)
    assert words[:2] == ["python", "bench/rebuild_captures.py"]
    args = rebuild_captures.parse_args(words[2:])
    assert (args.use, args.out, args.names) == ("training", "DIR", None)
