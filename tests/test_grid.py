"""The grid runner (mgf_sb.grid): marks, reruns, dependencies, side-by-side steps, background work."""

import os
import sys
import threading
import time

import pytest

from mgf_sb import grid


def _steps(tmp_path, names, depends=None):
    depends = depends or {}
    return [grid.Step(name=n, kind="probe", folder=str(tmp_path / n),
                      command=[sys.executable, "-c", f"open('out.txt','w').write('{n}')"],
                      depends=depends.get(n, [])) for n in names]


def _output(step):
    with open(os.path.join(step.folder, "out.txt")) as f:
        return f.read()


def _fake(calls, sleep=0.0, fail=()):
    lock = threading.Lock()

    def runner(step, env, verbose):
        with lock:
            calls.append(("start", step.name, time.time()))
        time.sleep(sleep)
        os.makedirs(step.folder, exist_ok=True)
        if step.name not in fail:
            with open(os.path.join(step.folder, "out.txt"), "w") as f:
                f.write(step.name)
        with lock:
            calls.append(("end", step.name, time.time()))
        return 0
    return runner


def test_marks_skip_finished_steps_and_changed_settings_stop(tmp_path):
    steps = _steps(tmp_path, ["a", "b"])
    calls = []
    st = grid.execute(steps, _output, runner=_fake(calls), log=lambda *a: None)
    assert st == {"a": "ran", "b": "ran"} and len(calls) == 4
    assert grid.execute(steps, _output, runner=_fake(calls), log=lambda *a: None) == {"a": "done", "b": "done"}
    changed = _steps(tmp_path, ["a", "b"])
    changed[0].command = changed[0].command + ["--lr=1"]
    with pytest.raises(RuntimeError, match="other settings"):
        grid.execute(changed, _output, runner=_fake(calls), log=lambda *a: None)
    st = grid.execute(changed, _output, runner=_fake(calls), on_change="rerun", log=lambda *a: None)
    assert st == {"a": "ran", "b": "done"}
    assert any(p.startswith("a.replaced-") for p in os.listdir(tmp_path))  # moved aside, not deleted


def test_a_mark_written_from_another_checkout_matches_the_same_command_here(tmp_path, monkeypatch):
    """A run started from a snapshot records its output folder (outside that snapshot) as an absolute
    path; run from the repository that holds the folder, the same command makes it relative. Both are
    the same step (done), while a different folder or argument is still a change."""
    repo = tmp_path / "repo"
    out = repo / "results" / "a"
    monkeypatch.setattr(grid, "REPO", str(repo))
    step = grid.Step(name="a", kind="probe", folder=str(out),
                     command=[sys.executable, str(repo / "tool.py"), "--out", str(out)])
    assert step.signature["command"] == ["tool.py", "--out", os.path.join("results", "a")]
    os.makedirs(out)
    (out / "out.txt").write_text("a")
    snapshot_mark = {"signature": {"command": ["tool.py", "--out", str(out)]}}  # as the snapshot recorded it
    import json
    (out / grid.MARK_FILE).write_text(json.dumps(snapshot_mark))
    assert grid.step_status(step, _output) == "done"
    other = {"signature": {"command": ["tool.py", "--out", str(tmp_path / "elsewhere")]}}
    (out / grid.MARK_FILE).write_text(json.dumps(other))
    assert grid.step_status(step, _output) == "changed"
    sibling = {"signature": {"command": ["tool.py", "--out", str(repo) + "2/results/a"]}}  # not inside the repo
    (out / grid.MARK_FILE).write_text(json.dumps(sibling))
    assert grid.step_status(step, _output) == "changed"


def test_real_runner_records_cpu_seconds(tmp_path):
    (step,) = _steps(tmp_path, ["real"])
    step.command = [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\n"
                    "open('out.txt','w').write('x')"]
    os.makedirs(step.folder)
    cwd = os.getcwd()
    os.chdir(step.folder)
    try:
        st = grid.execute([step], _output, log=lambda *a: None)
    finally:
        os.chdir(cwd)
    assert st == {"real": "ran"} and grid.read_mark(step)["cpu_seconds"] >= 0.25


def test_side_by_side_respects_dependencies_and_failures_block(tmp_path):
    steps = _steps(tmp_path, ["pre1", "pre2", "p1", "p2"], depends={"p1": ["pre1"], "p2": ["pre2"]})
    calls = []
    st = grid.execute(steps, _output, runner=_fake(calls, sleep=0.3, fail=("pre2",)), jobs=2, log=lambda *a: None)
    assert st == {"pre1": "ran", "pre2": "failed", "p1": "ran", "p2": "blocked"}
    t = {(k, n): x for k, n, x in calls}
    assert t[("start", "pre2")] < t[("end", "pre1")]  # the two pretraining steps overlapped
    assert t[("start", "p1")] >= t[("end", "pre1")]  # a probe waits for its pretraining


def test_background_work_runs_between_polls_and_on_poll_sees_running_steps(tmp_path):
    steps = _steps(tmp_path, ["a", "b"])
    polled, done = set(), []

    class Queue:
        def __init__(self):
            self.items = ["x", "y"]

        def pending(self):
            return bool(self.items)

        def run_one(self):
            done.append(self.items.pop(0))

    st = grid.execute(steps, _output, runner=_fake([], sleep=0.6), jobs=2, on_poll=lambda s: polled.add(s.name),
                      on_done=lambda s, out: done.append(out), background=Queue(), log=lambda *a: None)
    assert st == {"a": "ran", "b": "ran"}
    assert done[:2] == ["x", "y"] and sorted(done[2:]) == ["a", "b"] and polled == {"a", "b"}


def test_a_finished_recipe_step_whose_yaml_default_moved_is_changed_not_done(tmp_path):
    """Same command, but the YAML's default changed since the run recorded its settings: the grid
    must not report the old run as today's (benchmarks/quality.py reuses finished runs)."""
    from mgf_sb.recipe import command_settings

    yaml = tmp_path / "h.yaml"
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nschedule: ramp  # a comment\n")
    folder = tmp_path / "run"
    step = grid.Step(name="pretrain x", kind="pretrain", folder=str(folder),
                     command=[sys.executable, "train.py", str(yaml), f"--output_folder={folder}", "--lr=0.002"])
    folder.mkdir()
    (folder / "out.txt").write_text("x")
    grid.write_mark(step, 1.0)
    settings = command_settings(step.command[2:])
    assert settings["lr"] == 0.002 and settings["schedule"] == "ramp"  # the override wins, the default is read
    (folder / grid.RUN_CONFIG).write_text(__import__("json").dumps({"settings": settings, "resumable_keys": []}))
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "done"
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nschedule: ramp  # another comment\n")
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "done"  # a comment is not a setting
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nschedule: half_life\n")
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "changed"
    assert step.changes == {"schedule": ["ramp", "half_life"]}
    with pytest.raises(RuntimeError, match='schedule: "ramp" -> "half_life"'):
        grid.execute([step], _output, runner=_fake([]), log=lambda *a: None)
    st = grid.execute([step], _output, runner=_fake([]), on_change="rerun", log=lambda *a: None)
    assert st == {"pretrain x": "ran"}
    assert any(p.startswith("run.replaced-") for p in os.listdir(tmp_path))  # the old run kept aside


def test_a_switch_added_since_a_run_is_no_change_while_off_and_a_change_when_on(tmp_path, monkeypatch):
    """A key added to the YAML after a run was recorded (listed in run_guard.ADDED_SETTINGS with its
    "off" value) leaves the old run done while it is off; switched on, the run is changed."""
    from mgf_sb import run_guard
    from mgf_sb.recipe import command_settings

    monkeypatch.setitem(run_guard.ADDED_SETTINGS, "new_switch", 0)
    yaml = tmp_path / "h.yaml"
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\n")
    folder = tmp_path / "run"
    step = grid.Step(name="pretrain x", kind="pretrain", folder=str(folder),
                     command=[sys.executable, "train.py", str(yaml), f"--output_folder={folder}"])
    folder.mkdir()
    (folder / "out.txt").write_text("x")
    grid.write_mark(step, 1.0)
    (folder / grid.RUN_CONFIG).write_text(__import__("json").dumps(
        {"settings": command_settings(step.command[2:]), "resumable_keys": []}))
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nnew_switch: 0\nother_new: 0\n")
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "changed"  # other_new is not declared: it counts
    assert step.changes == {"other_new": ["<absent>", 0]}
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nnew_switch: 0\n")
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "done"
    yaml.write_text("output_folder: !PLACEHOLDER\nlr: 0.001\nnew_switch: 3\n")
    grid._SETTINGS_NOW.clear()
    assert grid.step_status(step, _output) == "changed" and step.changes == {"new_switch": ["<absent>", 3]}


def test_every_added_setting_is_a_key_of_the_yaml():
    """ADDED_SETTINGS names keys of hparams/mgf.yaml (a misspelt key would leave old runs stopping);
    the switches added so far are still off by default."""
    from mgf_sb.recipe import command_settings
    from mgf_sb.run_guard import ADDED_SETTINGS

    now = command_settings([os.path.join(grid.REPO, "hparams", "mgf.yaml")])
    assert ADDED_SETTINGS and set(ADDED_SETTINGS) <= set(now), set(ADDED_SETTINGS) - set(now)
