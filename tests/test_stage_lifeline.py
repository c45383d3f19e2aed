"""The training child of ``python -m headless_train stage`` never outlives the stage (issue
#11): a killed stage (SIGKILL) stops its child, which still writes last.ckpt; SIGTERM to the
stage is passed on, the stage records the call and exits 143, and the next call resumes; the
child's own backstops (parent watchdog, ``trainer.max_minutes``) stop a run whose parent is
gone. Real processes on tiny scenes; every wait is a bounded poll, no timing is asserted
beyond "ends within a generous bound"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _train_fixtures import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
BOUND_S = 180.0  # generous: a loaded 2-core machine; a healthy run takes seconds


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_for(condition, what: str, bound: float = BOUND_S, log: str | None = None) -> None:
    end = time.monotonic() + bound
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    tail = open(log, encoding="utf-8", errors="replace").read()[-3000:] if log and os.path.isfile(log) else ""
    pytest.fail(f"{what} not within {bound:.0f} s\n{tail}")


def step_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def lock_pid(run_dir: str) -> int | None:
    """The training child's pid, from the run folder's lock (headless_train.runlock)."""
    try:
        with open(os.path.join(run_dir, "run.lock"), encoding="utf-8") as f:
            first = f.read().split()
    except OSError:
        return None
    return int(first[0]) if first and first[0].isdigit() else None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("lifeline")), ("s1",), views=5, size=24, n_points=150)


def default_signals() -> None:
    # A job started in the background inherits SIGINT as ignored, which the stage respects:
    # give it the dispositions a terminal's foreground job has.
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def start_endless_stage(corpus: str, work: str) -> subprocess.Popen:
    """A dry-run stage whose child would train ~forever (last.ckpt after every step)."""
    return subprocess.Popen([sys.executable, "-m", "headless_train", "stage", "--corpus", corpus, "--work", work,
                             "--dry-run", "--dry-steps", "1000000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_signals)


def wait_for_training(stage: subprocess.Popen, work: str) -> tuple[int, str]:
    """Wait until the child has written a last.ckpt; returns (child pid, last.ckpt path)."""
    run_dir = os.path.join(work, "run")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    log = os.path.join(work, "train.log")
    wait_for(lambda: os.path.isfile(last) or stage.poll() is not None, "a first last.ckpt", log=log)
    assert stage.poll() is None, stage.communicate()[1][-3000:]
    child = lock_pid(run_dir)
    assert child is not None and child != stage.pid and alive(child)
    return child, last


def test_stopped_then_killed_stage_saves_each_time_and_the_next_call_resumes(corpus, tmp_path):
    """(1) SIGTERM to the stage: passed on, last.ckpt written, the call recorded, exit 143.
    (2) SIGKILL to the next stage: its child stops by itself (parent-death signal) and still
    writes last.ckpt. (3) A third call resumes from there and records the steps (2) could not."""
    from headless_train.stage import main
    from npbgpp_core.pretrained import read_weights

    work = str(tmp_path / "stage")
    log = os.path.join(work, "train.log")
    stage = start_endless_stage(corpus, work)
    try:
        child, last = wait_for_training(stage, work)
        os.kill(stage.pid, signal.SIGTERM)
        _, err = stage.communicate(timeout=BOUND_S)
    finally:
        stop_own(stage, work)
    assert stage.returncode == 143, err[-3000:]  # 128 + SIGTERM: not success
    assert "stage stopped by SIGTERM" in err and "run the same command again" in err
    assert not alive(child)
    assert open(log, encoding="utf-8").read().count("interrupted (SIGTERMException): saved") == 1
    calls = json.load(open(os.path.join(work, "stage.json")))
    assert len(calls) == 1
    first = calls[0]
    assert first["stopped_by"] == "SIGTERM" and first["exit_code"] == 143 and first["start_step"] == 0
    assert first["end_step"] == step_of(last) >= 1  # the record matches the checkpoint on disk
    wf = read_weights(os.path.join(work, "npbgpp_sphere_stage.safetensors"), "npbgpp")
    assert wf.card["stage"]["end_step"] == first["end_step"]
    assert not [f for f in os.listdir(os.path.dirname(last)) if f.endswith(".tmp")]  # nothing half-written

    stage = start_endless_stage(corpus, work)
    try:
        wait_for(lambda: stage.poll() is not None or step_of(last) > first["end_step"], "the resumed run's step",
                 log=log)
        child, _ = wait_for_training(stage, work)
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait(timeout=30)
        wait_for(lambda: not alive(child), "the orphaned training child's exit", log=log)
    finally:
        stop_own(stage, work)
    assert open(log, encoding="utf-8").read().count("interrupted (SIGTERMException): saved") == 2
    killed_at = step_of(last)
    assert killed_at > first["end_step"]
    assert len(json.load(open(os.path.join(work, "stage.json")))) == 1  # the killed stage recorded nothing

    assert main(["--corpus", corpus, "--work", work, "--dry-run", "--dry-steps", "1"]) == 0
    calls = json.load(open(os.path.join(work, "stage.json")))
    assert [(c["resumed"], c["start_step"], c["end_step"]) for c in calls][1] == (True, killed_at, killed_at + 1)
    assert calls[1]["unrecorded_steps"] == [first["end_step"], killed_at]
    assert "stopped_by" not in calls[1]


def stop_own(stage: subprocess.Popen, work: str) -> None:
    """Cleanup after a failed test: kill only this test's stage and its child (found by the
    lock in this test's own temporary folder)."""
    if stage.poll() is None:
        stage.kill()
        stage.wait()
    child = lock_pid(os.path.join(work, "run"))
    if child is not None and child != os.getpid() and alive(child):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            mine = work.encode() in f.read()
        if mine:
            os.kill(child, signal.SIGKILL)


# A stand-in for the training child: reports its pid, answers SIGTERM like the trainer
# (a line in a file, exit 143), or ignores it (a stuck trainer). It starts with SIGTERM
# blocked (DRIVER) and unblocks it once its handler is set and its pid written, so a SIGTERM
# sent while Python starts up (a 0.5 s time limit on a loaded machine) is answered, not fatal
# by default, and drive() still learns the pid (an obeying child would exit before writing it).
FAKE_CHILD = """
import os, signal, sys, time
folder, mode = sys.argv[1], sys.argv[2]
def on_term(signum, frame):
    with open(os.path.join(folder, "terms"), "a") as f:
        f.write("TERM\\n")
    if mode == "obey":
        sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
# the pid before the unblock: a SIGTERM held since start-up must not end it unannounced
open(os.path.join(folder, "child.pid"), "w").write(str(os.getpid()))
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # one sent while Python started: now
time.sleep(600)
"""

# run_child as the stage runs it: inside held_stop_signals (a signal that comes before
# run_child's own handlers is held, not fatal: the signal tests send theirs once the child
# runs, which can be before this process got past Popen), its children started with
# SIGTERM blocked (FAKE_CHILD)
DRIVER = """
import signal, subprocess, sys
from headless_train.stage import held_stop_signals, run_child
folder, mode, timeout, grace = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
popen = subprocess.Popen
def popen_sigterm_blocked(*args, **kwargs):
    return popen(*args, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]), **kwargs)
subprocess.Popen = popen_sigterm_blocked
with open(folder + "/child.log", "a") as log, held_stop_signals() as held:
    held.extend(int(v) for v in sys.argv[6:])
    rc, timed_out, stopped = run_child([sys.executable, "-c", sys.argv[5], folder, mode], log,
                                       timeout if timeout > 0 else None, grace, poll_s=0.1, pending=held)
print(rc, timed_out, stopped)
"""


def pid_from(marker, what: str) -> int:
    """The pid a started process writes to ``marker``, once it is there (bounded wait)."""
    wait_for(lambda: marker.exists() and marker.read_text().isdigit(), f"the {what}'s start", bound=60)
    return int(marker.read_text())


def kill_leftovers(proc: subprocess.Popen, pid: int | None) -> None:
    """Cleanup after a test: kill ``proc`` and the process ``pid`` if they still run."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)


def drive(tmp_path, mode: str, timeout: float, grace: float, signals: tuple[int, ...] = (),
          held: tuple[int, ...] = ()) -> tuple[str, list[str]]:
    """Run run_child (in a process of its own, as the stage does) over FAKE_CHILD, with
    ``held`` as the stop signals held before it (``pending``), send it ``signals`` once the
    child runs, each after the child has answered the first (its SIGTERM line); returns (its
    printed result, the child's SIGTERM log)."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), mode, str(timeout), str(grace),
                               FAKE_CHILD, *(str(int(s)) for s in held)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True, start_new_session=True, preexec_fn=default_signals)
    pid_file, terms = tmp_path / "child.pid", tmp_path / "terms"
    child = None
    try:
        child = pid_from(pid_file, "fake child")
        for signum in signals:
            os.kill(driver.pid, signum)
            # a second signal sent after a fixed pause (0.3 s) could kill a child that had not
            # yet been scheduled to write its line: no TERM logged on a loaded machine
            wait_for(lambda: terms.exists() and terms.read_text() != "", "the child's SIGTERM line", bound=60)
        out, _ = driver.communicate(timeout=60)
        assert not alive(child)
    finally:
        kill_leftovers(driver, child)
    return out.strip(), terms.read_text().split() if terms.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signals_reach_the_child_as_one_sigterm(tmp_path, signum):
    out, terms = drive(tmp_path, "obey", 0, 60, (signum,))
    assert out == f"143 False {int(signum)}" and terms == ["TERM"]


def test_the_time_limit_sends_sigterm(tmp_path):
    out, terms = drive(tmp_path, "obey", 0.5, 60)
    assert out == "143 True None" and terms == ["TERM"]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_time(tmp_path):
    # the child must start, write its pid and answer the SIGTERM within limit + grace: 3 s of
    # grace (not 1) keeps a slow Python start-up on a loaded CI machine from failing it
    out, terms = drive(tmp_path, "ignore", 0.5, 3.0)
    assert out == f"{-signal.SIGKILL} True None" and terms == ["TERM"]


def test_a_signal_held_before_the_child_started_stops_it_at_once(tmp_path):
    """A stop signal the stage held before run_child took over (``pending``) is passed on at
    once, not after the child's whole time: the child answers it (143; FAKE_CHILD holds it
    until its handler is set); the result names the signal."""
    out, terms = drive(tmp_path, "obey", 0, 60, held=(signal.SIGTERM,))  # the child sleeps 600 s unless stopped
    assert out.split() == ["143", "False", str(int(signal.SIGTERM))], out
    assert terms == ["TERM"]


def test_a_second_signal_kills_the_child_at_once(tmp_path):
    out, terms = drive(tmp_path, "ignore", 0, 600, (signal.SIGINT, signal.SIGINT))
    assert out == f"{-signal.SIGKILL} False {int(signal.SIGINT)}" and terms == ["TERM"]


def orphan_must_stop(tmp_path, child: str, what: str) -> None:
    """Run the script ``child`` as this test's grandchild, under a middle process; ``child``
    gets the middle process's pid and a marker path as arguments and writes its own pid to
    the marker once tied to its parent. SIGKILL the middle process, then wait (bounded) for
    the orphaned grandchild to end."""
    marker = tmp_path / "grandchild.pid"
    middle = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid()), {str(marker)!r}])
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", middle], cwd=ROOT, env=ENV, start_new_session=True)
    pid = None
    try:
        pid = pid_from(marker, what)
        assert alive(pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not alive(pid), f"the {what}'s exit", bound=60)
    finally:
        kill_leftovers(proc, pid)


def test_parent_watchdog_without_pdeathsig_stops_an_orphan(tmp_path):
    """The portable fallback alone (no prctl): a middle process starts a grandchild tied to
    it, then dies by SIGKILL; the grandchild's watchdog SIGTERMs it."""
    orphan_must_stop(tmp_path, textwrap.dedent("""
        import os, sys, time
        from headless_train.lifeline import tie_to_parent
        assert tie_to_parent(int(sys.argv[1]), grace_s=60, poll_s=0.2, use_pdeathsig=False) is False
        open(sys.argv[2], "w").write(str(os.getpid()))
        time.sleep(600)
    """), "orphan")


def test_parent_watchdog_hard_exit_when_sigterm_is_ignored(tmp_path):
    """A child that does not stop on SIGTERM (stuck) ends after the grace period anyway."""
    orphan_must_stop(tmp_path, textwrap.dedent("""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from headless_train.lifeline import tie_to_parent
        tie_to_parent(int(sys.argv[1]), grace_s=1.0, poll_s=0.2)
        open(sys.argv[2], "w").write(str(os.getpid()))
        time.sleep(600)
    """), "stuck orphan")


def test_parent_already_gone_stops_at_once(tmp_path):
    code = "from headless_train.lifeline import tie_to_parent; import time; tie_to_parent(1); time.sleep(600)"
    # pid 1 is never this process's parent here (its parent is the test)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_parent_pid_env_is_checked_and_not_inherited(monkeypatch):
    from headless_train import lifeline

    tied: list[int] = []
    monkeypatch.setattr(lifeline, "tie_to_parent", lambda pid, **kw: tied.append(pid))
    env = {lifeline.PARENT_ENV: str(os.getppid())}
    assert lifeline.tie_to_parent_from_env(env) == os.getppid() and tied == [os.getppid()]
    assert lifeline.PARENT_ENV not in env  # DDP ranks / workers started from here do not watch it
    assert lifeline.tie_to_parent_from_env({}) is None
    with pytest.raises(ValueError, match="HEADLESS_TRAIN_PARENT_PID must be a process id, got 'x1'"):
        lifeline.tie_to_parent_from_env({lifeline.PARENT_ENV: "x1"})


# a dry-run stage that gets SIGTERM while it exports (after its child ended): the export runs
# the real code after the signal
_SIGTERM_IN_EXPORT = """
import os, signal, sys
import headless_train.export_weights as export_weights
from headless_train.stage import main
real = export_weights.main
def export(argv):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(argv)
export_weights.main = export
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_exporting_still_exports_and_records_the_call(corpus, tmp_path):
    """A stop signal that comes after the child ended (the device tool's time limit, a
    backstop, Ctrl-C) is held while the stage exports and records the call: the weights and
    stage.json are written, and the stage exits 143 (it was asked to stop). The signal
    handlers were run_child's only, so such a SIGTERM killed the stage with no export."""
    work = str(tmp_path / "stage")
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_EXPORT, "--corpus", corpus, "--work", work,
                           "--dry-run", "--dry-steps", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=BOUND_S, preexec_fn=default_signals)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-3000:])
    assert "stage stopped by SIGTERM" in proc.stderr
    calls = json.load(open(os.path.join(work, "stage.json")))
    assert [(c["start_step"], c["end_step"]) for c in calls] == [(0, 1)]
    assert "stopped_by" not in calls[0]  # the call trained its steps; the signal came after
    from npbgpp_core.pretrained import read_weights

    assert read_weights(os.path.join(work, "npbgpp_sphere_stage.safetensors"), "npbgpp").card["stage"]["end_step"] == 1


# as _SIGTERM_IN_EXPORT, with a child that trained its step and then failed (exit code 1, as
# a trainer that crashed after writing last.ckpt): the real child runs, its code is replaced
_FAILED_CHILD_THEN_SIGTERM_IN_EXPORT = _SIGTERM_IN_EXPORT.replace("""
sys.exit(main""", """
import headless_train.stage as stage
real_child = stage.run_child
def failed_child(*args, **kwargs):
    rc, timed_out, stopped_by = real_child(*args, **kwargs)
    assert (rc, stopped_by) == (0, None), (rc, stopped_by)
    return 1, timed_out, stopped_by
stage.run_child = failed_child
sys.exit(main""")


def test_a_failed_child_exits_2_even_when_a_stop_signal_came_after_training(corpus, tmp_path):
    """The child trained a step and failed (exit code 1); SIGTERM came while the stage exported.
    The call is still exported and recorded whole (held signal), and the stage exits 2, the
    training's failure, not 143: the stop changed nothing (training had ended), and 143 says
    "stopped, run again to continue", hiding a failure the next call would likely repeat. The
    error line names the child's code and the signal."""
    assert "failed_child" in _FAILED_CHILD_THEN_SIGTERM_IN_EXPORT  # the replacement above took
    work = str(tmp_path / "stage")
    proc = subprocess.run([sys.executable, "-c", _FAILED_CHILD_THEN_SIGTERM_IN_EXPORT, "--corpus", corpus, "--work",
                           work, "--dry-run", "--dry-steps", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=BOUND_S, preexec_fn=default_signals)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: training exited with code 1 at step 1"), proc.stderr[-3000:]
    assert "SIGTERM came after training" in error[0] and "stage stopped by" not in proc.stderr
    calls = json.load(open(os.path.join(work, "stage.json")))
    assert [(c["start_step"], c["end_step"], c["exit_code"]) for c in calls] == [(0, 1, 1)]
    assert "stopped_by" not in calls[0]
    from npbgpp_core.pretrained import read_weights

    assert read_weights(os.path.join(work, "npbgpp_sphere_stage.safetensors"), "npbgpp").card["stage"]["end_step"] == 1


# a dry-run stage whose child and export are replaced by mode (STAGE_TEST_MODE): "no-ckpt" a child
# that wrote nothing and fails; "export" the real child, then an export that fails; "no-step" a
# child that fails without a step; in these three a SIGTERM comes after the child ended (held).
# "stopped-export": a child that SIGTERM stopped (no signal sent here), then an export that fails.
_FAILING_ENDS = """
import os, signal, sys
import headless_train.export_weights as export_weights
import headless_train.stage as stage
mode = os.environ["STAGE_TEST_MODE"]
real_child = stage.run_child
def child(*args, **kwargs):
    if mode == "export":
        return real_child(*args, **kwargs)
    if mode == "stopped-export":
        return stage.EXIT_SIGTERM, False, signal.SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)
    return 1, False, None
def export(argv):
    if mode == "export":
        os.kill(os.getpid(), signal.SIGTERM)
    return 1
stage.run_child = child
export_weights.main = export
sys.exit(stage.main(sys.argv[1:]))
"""


def test_every_failing_end_names_the_stop_signal(corpus, tmp_path):
    """A call that fails (exit 2) after a stop signal says so in its one error line, as a
    failed child's does: a SIGTERM held after training (no last.ckpt written; the export failed;
    the child took no step) is named as having come after training, one that stopped training
    as having stopped it. Nothing is recorded and no weights are written."""
    work = str(tmp_path / "stage")
    last = os.path.join(work, "run", "checkpoints", "last.ckpt")
    held = "; SIGTERM came after training and was held"
    for mode, expected in (("no-ckpt", f"training wrote no {last} (exit code 1){held}; see "),
                           ("export", f"exporting {last} failed{held}"),
                           ("no-step", f"training exited with code 1 and took no step{held}; see "),
                           ("stopped-export", f"exporting {last} failed; SIGTERM stopped training")):
        proc = subprocess.run([sys.executable, "-c", _FAILING_ENDS, "--corpus", corpus, "--work", work,
                               "--dry-run", "--dry-steps", "1"], cwd=ROOT, env={**ENV, "STAGE_TEST_MODE": mode},
                              capture_output=True, text=True, timeout=BOUND_S, preexec_fn=default_signals)
        assert proc.returncode == 2, (mode, proc.returncode, proc.stderr[-3000:])
        error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and error[0].startswith(f"error: {expected}"), (mode, proc.stderr[-3000:])
        assert "stage stopped by" not in proc.stderr
        assert not os.path.exists(os.path.join(work, "stage.json"))
        assert not os.path.exists(os.path.join(work, "npbgpp_sphere_stage.safetensors"))
    assert step_of(last) == 1  # the one real child's step: the later calls resumed it


def test_max_minutes_stops_training_and_writes_last_ckpt(corpus, tmp_path):
    """The child's own backstop: an endless run with trainer.max_minutes ends by itself
    (exit 0) and leaves a last.ckpt a resume can use."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "headless_train", f"hydra.run.dir={run}", "datasets=nerf_blender_pretrain",
         f"datasets.data_root={corpus}", "datasets.train_image_size=16", "datasets.train_num_samples=1000000",
         "dataloader=small", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
         f"system.descriptors_save_dir={tmp_path}/d", "trainer.max_minutes=0.02"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=BOUND_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "trainer.max_minutes: 0.0 min of training reached" in out, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert step_of(str(last)) >= 1


def test_max_minutes_rejects_non_positive():
    from headless_train.checkpoints import TrainTimeLimit

    with pytest.raises(ValueError, match="trainer.max_minutes must be > 0"):
        TrainTimeLimit(0.0)


def test_a_child_that_cannot_start_is_reported_with_its_log(corpus, tmp_path):
    """The run folder is held by another run: the child exits 2 at once; the stage's error
    names the exit code and quotes the child's own message from train.log."""
    from headless_train.runlock import RunLock
    from headless_train.stage import StageError, parse_args, run_stage

    work = tmp_path / "stage"
    with RunLock(str(work / "run")):
        expected = r"(?s)training wrote no .*last.ckpt \(exit code 2\).*in use by another run"
        with pytest.raises(StageError, match=expected):
            run_stage(parse_args(["--corpus", corpus, "--work", str(work), "--dry-run", "--dry-steps", "1"]))
    assert not (work / "stage.json").exists()
