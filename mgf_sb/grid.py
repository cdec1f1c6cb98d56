"""One grid runner for the tools that run many recipe commands and report on them:
``recipes/evaluate.py`` (pretraining variants x downstream probes -> the report) and
``benchmarks/quality.py`` (pretraining variants x seeds -> frozen-feature probes -> the table).

A :class:`Step` is one recipe command with its own folder. When it finishes, a *mark file* in
that folder records the command (its *signature*: the arguments, with this repository's paths
made relative so a moved checkout keeps its marks), the wall seconds and the process's own CPU
seconds. A rerun skips the steps whose mark matches and whose output reads back, so an
interrupted grid continues where it stopped; a step whose mark holds another command, or whose
recipe run recorded settings (``run_config.json``) that its command no longer gives because a
YAML default moved since, is ``changed`` and :func:`execute` refuses to go on (or, ``on_change="rerun"``, moves its folder
aside and runs it again), so a rerun never silently mixes settings.

:func:`execute` runs the steps that are not done, ``jobs`` at a time, each after the steps it
``depends`` on; ``on_poll(step)`` is called about twice a second while a step runs (the quality
benchmark snapshots each epoch's export), and ``background`` work (the benchmark's probes of
finished runs) takes one of the ``jobs`` slots between polls.
"""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK_FILE = "evaluate_step.json"  # the name evaluate.py always used: earlier output folders stay valid
STDOUT_FILE = "evaluate_stdout.txt"


@dataclass
class Step:
    """One recipe command.

    ``kind``: ``pretrain`` | ``probe`` (what the caller reads back); ``row`` / ``task`` /
    ``head`` / ``seed``: where its result goes in the caller's report; ``depends``: names of
    steps that must have finished first; ``result_path``: a pretraining step's exported folder.
    """

    name: str
    kind: str
    folder: str
    command: list
    row: str = ""
    task: str = ""
    head: str = None
    seed: int = None
    depends: list = field(default_factory=list)
    result_path: str = ""
    cpu_seconds: float = None  # of the last run in this process (set by run_step)
    changes: dict = None  # settings recorded by the finished run that its command no longer gives

    @property
    def mark_path(self):
        return os.path.join(self.folder, MARK_FILE)

    @property
    def log_path(self):
        return os.path.join(self.folder, STDOUT_FILE)

    @property
    def signature(self):
        return canonical_signature({"command": self.command[1:]})


def _in_repo(arg):
    """An absolute path inside this repository -> relative to it; any other argument as it is."""
    if isinstance(arg, str) and os.path.isabs(arg) and (arg == REPO or arg.startswith(REPO + os.sep)):
        return os.path.relpath(arg, REPO)
    return arg


def canonical_signature(sig):
    """A recorded or computed signature with this repository's absolute paths made relative, so that a
    mark written by a run started from another checkout (a snapshot whose repository did not hold the
    output folder, so it recorded the folder's absolute path) still matches the same command here."""
    if not isinstance(sig, dict) or not isinstance(sig.get("command"), list):
        return sig
    return {**sig, "command": [_in_repo(c) for c in sig["command"]]}


def yaml_value(v):
    """A Python value as a one-line YAML override (JSON is YAML flow style)."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if v is None:
        return "null"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def recipe_command(script, hparams, overrides, extra_argv=()):
    """``python <script> <hparams> --key=value ...`` with paths resolved against the repository."""
    return [sys.executable, os.path.join(REPO, script), os.path.join(REPO, hparams)] + \
        [f"--{k}={yaml_value(v)}" for k, v in overrides.items()] + list(extra_argv)


def read_mark(step):
    try:
        with open(step.mark_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


RUN_CONFIG = "run_config.json"  # what the recipe's run guard records (mgf_sb.run_guard)


def settings_drift(step):
    """Settings a finished recipe step recorded (``<folder>/run_config.json``) that its command
    would no longer give, e.g. a YAML default changed since: ``{key: [recorded, now]}`` (empty
    when current, or when the step is not a recipe run). Keys the YAML lists as
    ``resumable_keys`` do not count, as in the run guard."""
    try:
        with open(os.path.join(step.folder, RUN_CONFIG)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    if len(step.command) < 3 or not str(step.command[2]).endswith((".yaml", ".yml")):
        return {}
    key = tuple(step.command[2:])
    if key not in _SETTINGS_NOW:
        from mgf_sb.recipe import command_settings

        _SETTINGS_NOW[key] = command_settings(step.command[2:])
    from mgf_sb.run_guard import settings_changes

    return settings_changes(recorded.get("settings", {}), _SETTINGS_NOW[key], recorded.get("resumable_keys"))


_SETTINGS_NOW = {}  # command -> its settings now (a YAML is read once per process)


def step_status(step, output):
    """``done`` (mark matches, ``output(step)`` reads back and the settings it recorded are those
    its command gives today), ``changed`` (mark of another command, or the YAML's defaults moved
    since: ``step.changes`` lists them) or ``todo``."""
    mark = read_mark(step)
    if mark is None:
        return "todo"
    if canonical_signature(mark.get("signature")) != step.signature:
        return "changed"
    try:
        output(step)
    except Exception:
        return "todo"
    step.changes = settings_drift(step)
    if step.changes:
        return "changed"
    return "done"


def _changes(step, shown=4):
    if not step.changes:
        return ""
    from mgf_sb.run_guard import show_value

    items = [f"{k}: {show_value(a)} -> {show_value(b)}" for k, (a, b) in step.changes.items()]
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return "; YAML defaults changed since it ran: " + ", ".join(items[:shown]) + more


def write_mark(step, seconds, cpu_seconds=None, **extra):
    mark = {"signature": step.signature, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "step": step.name, **extra}
    if cpu_seconds is not None:
        mark["cpu_seconds"] = round(cpu_seconds, 2)
    os.makedirs(step.folder, exist_ok=True)
    tmp = step.mark_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(mark, f, indent=2)
    os.replace(tmp, step.mark_path)


def run_step(step, env, verbose=False):
    """Runs a step's command with its output in ``<folder>/evaluate_stdout.txt``; returns the
    exit code and sets ``step.cpu_seconds`` (user + system time of the process, ``os.wait4``)."""
    os.makedirs(step.folder, exist_ok=True)
    with open(step.log_path, "a") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(step.command)}\n")
        f.flush()
        proc = subprocess.Popen(step.command, stdout=subprocess.PIPE if verbose else f, stderr=subprocess.STDOUT,
                                text=True, env=env)
        if verbose:
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write("    " + line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        step.cpu_seconds = usage.ru_utime + usage.ru_stime
        return proc.returncode


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def fmt_seconds(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def move_aside(folder):
    """A changed step's folder -> ``<folder>.replaced-<time>`` (kept, never deleted)."""
    dest = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    k = 2
    while os.path.exists(dest):
        dest = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{k}"
        k += 1
    os.replace(folder, dest)
    return dest


def execute(steps, output, runner=run_step, jobs=1, on_change="error", keep_going=True, env=None, verbose=False,
            log=print, on_poll=None, on_done=None, background=None, name="grid"):
    """Runs the steps not yet done; returns {step name: done | ran | failed | blocked | not run}.

    Arguments
    ---------
    steps : list of Step
        In run order (a step starts once everything it ``depends`` on has finished).
    output : callable
        ``output(step)`` -> the step's result; raises when it is missing (then the step failed).
    runner : callable
        ``runner(step, env, verbose)`` -> exit code (tests pass a fake one).
    jobs : int
        Steps run side by side (each in its own thread waiting on its process).
    on_change : str
        ``error``: refuse when a step's mark holds another command; ``rerun``: move that step's
        folder aside (``<folder>.replaced-<time>``) and run it again.
    on_poll, on_done : callable, optional
        ``on_poll(step)`` while a step runs; ``on_done(step, out)`` once it finished well.
    background : object, optional
        ``pending()`` -> bool and ``run_one()``: work done in this thread between polls; while
        any is pending it holds one of the ``jobs`` slots.
    """
    status = {s.name: step_status(s, output) for s in steps}
    changed = [s for s in steps if status[s.name] == "changed"]
    if changed:
        if on_change != "rerun":
            raise RuntimeError(
                "these steps were run before with other settings: "
                + "; ".join(f"{s.name} ({s.folder}{_changes(s)})" for s in changed)
                + ". Pass --on_change=rerun to move those step folders aside and run them again, "
                  "or another --output_folder to keep both.")
        for s in changed:
            log(f"[{name}] {s.name}: settings changed, moved {s.folder} to {move_aside(s.folder)}; running it again")
            status[s.name] = "todo"
    todo = [s for s in steps if status[s.name] == "todo"]
    log(f"[{name}] plan: {len(steps)} steps, {len(steps) - len(todo)} already done, {len(todo)} to run")
    for s in steps:
        log(f"    {'[done]' if status[s.name] == 'done' else '[todo]'} {s.name}")
    env = dict(os.environ) if env is None else env
    t0 = time.time()
    running = {}  # name -> (step, thread, start, box)
    n_total, n_started = len(todo), 0

    def finish(s, start, rc):
        seconds = time.time() - start
        try:
            if rc != 0:
                raise RuntimeError(f"exit code {rc}")
            out = output(s)
        except Exception as e:
            status[s.name] = "failed"
            log(f"[{name}] step {s.name} FAILED after {fmt_seconds(seconds)} ({e}); last lines of "
                f"{s.log_path}:\n{tail(s.log_path)}")
            return False
        write_mark(s, seconds, s.cpu_seconds)
        status[s.name] = "ran"
        log(f"[{name}] {s.name}: done in {fmt_seconds(seconds)}"
            + (f" ({s.cpu_seconds:.0f} CPU s)" if s.cpu_seconds else "")
            + (f" -> { {k: v for k, v in out.items() if not k.startswith('_')} }" if isinstance(out, dict) else ""))
        if on_done is not None:
            on_done(s, out)
        return True

    # on_poll runs on its own thread, so that it keeps going while background work holds this one
    polling = threading.Event()

    def poll_running():
        while not polling.wait(0.25):
            for s, th, _, _ in list(running.values()):
                if th.is_alive():
                    try:
                        on_poll(s)
                    except Exception as e:  # a failing hook must not end the grid
                        log(f"[{name}] {s.name}: on_poll: {type(e).__name__}: {e}")

    if on_poll is not None:
        threading.Thread(target=poll_running, daemon=True).start()
    stop = False
    while (todo and not stop) or running or (background is not None and background.pending()):
        for key, (s, th, start, box) in list(running.items()):
            if th.is_alive():
                continue
            del running[key]
            if not finish(s, start, box.get("rc", 1)) and not keep_going:
                stop = True
        # launch what is ready, leaving a slot to pending background work
        slots = jobs - len(running) - (1 if background is not None and background.pending() else 0)
        k = 0
        while not stop and slots > 0 and k < len(todo):
            s = todo[k]
            deps = [status.get(d) for d in s.depends]
            if any(d in ("failed", "blocked", "not run") for d in deps):
                todo.pop(k)
                status[s.name] = "blocked"
                log(f"[{name}] {s.name}: skipped, it needs {[d for d in s.depends if status.get(d) != 'ran']}")
                continue
            if not all(d in ("done", "ran") for d in deps):
                k += 1
                continue
            todo.pop(k)
            n_started += 1
            left = [x.name for x in todo]
            log(f"[{name}] step {n_started}/{n_total} {s.name}: running (elapsed {fmt_seconds(time.time() - t0)}; "
                f"{len(left)} left after it{': ' + ', '.join(left[:6]) + (' ...' if len(left) > 6 else '') if left else ''})")
            log(f"    log: {s.log_path}")
            box = {}

            def work(s=s, box=box):
                try:
                    box["rc"] = runner(s, env, verbose)
                except Exception as e:  # a runner that raises is a failed step, not a dead grid
                    box["rc"] = 1
                    log(f"[{name}] {s.name}: {type(e).__name__}: {e}")

            th = threading.Thread(target=work, daemon=True)
            running[s.name] = (s, th, time.time(), box)
            if jobs == 1 and background is None and on_poll is None:
                work()  # one at a time, nothing to do meanwhile: run it right here
            else:
                th.start()
            slots -= 1
        if running and jobs == 1 and background is None and on_poll is None:
            continue  # the step ran inline; reap it at the top of the loop
        if background is not None and background.pending():
            background.run_one()
            continue
        if not running and todo and not stop and not any(
                all(status.get(d) in ("done", "ran") for d in s.depends) for s in todo):
            for s in todo:  # dependencies that can never finish
                status[s.name] = "blocked"
            todo = []
        time.sleep(0.2 if running else 0)
    polling.set()
    for s in steps:
        if status[s.name] == "todo":
            status[s.name] = "not run"
    return status
