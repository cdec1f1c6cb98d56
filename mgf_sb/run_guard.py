"""Run guard and output-folder lock of every recipe (used by :func:`mgf_sb.recipe.start_experiment`).

- :class:`OutputLock`: one live run per ``output_folder`` (rank 0 holds ``.mgf_lock``; a lock left
  by a killed run is detected and taken over);
- :func:`check_run_config`: the settings that define a run are recorded in
  ``<output_folder>/run_config.json`` at the first run; a rerun that changes any of them stops
  before anything is written, listing each change, unless ``--on_change=restart`` (the earlier
  run's checkpoints and logs are moved aside, never deleted); ``resumable_keys`` may change;
- :func:`rank0_decides` / :func:`leave_process_group`: under DDP rank 0 decides and every
  process gets the same answer (or the same error), and the process group is left cleanly.
"""

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time

import torch

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
LOCK_FILE = ".mgf_lock"
ON_CHANGE = ("stop", "restart")
# Run products moved aside by --on_change=restart (when inside output_folder).
RESTART_KEYS = ("save_folder", "train_log", "pretrained_folder", "model_folder")
RESTART_FILES = ("hyperparams.yaml", RUN_CONFIG)
# Top-level keys that are not settings themselves (what they select is in the other values).
NOT_SETTINGS = ("resumable_keys", "output_folder", "sample_overrides", "use_sample_overrides")
# Keys whose value, when it is a pretrained folder, is recorded by content hash.
UPSTREAM_KEYS = ("upstream", "upstream_reference", "pretrained")


class RunConfigChanged(RuntimeError):
    """A rerun changed settings that define the run (message lists them)."""


class OutputFolderLocked(RuntimeError):
    """Another live run holds the output folder's lock (message names it)."""


# ----------------------------------------------------------------------------------------------
# DDP: agreement between processes and a clean exit
# ----------------------------------------------------------------------------------------------
def _ddp_active():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_rank0():
    return not _ddp_active() or torch.distributed.get_rank() == 0


def leave_process_group():
    """Destroys the DDP process group if this process is in one (idempotent).

    Registered with ``atexit`` by :func:`start_experiment`, so it runs when a
    recipe returns *and* when it raises: the communication threads are joined
    while the interpreter is still alive.
    """
    if _ddp_active():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # already torn down by a failing peer: nothing left to clean
            logger.debug(f"destroy_process_group: {e}")


def rank0_decides(fn, *args, **kwargs):
    """Runs ``fn`` on rank 0 only; every process returns its result or raises its error.

    Without DDP it is a plain call. Under DDP the outcome (a JSON-able value,
    or the exception's type and message) is broadcast, so all processes stop
    together with the same message instead of waiting forever for rank 0.
    """
    if not _ddp_active():
        return fn(*args, **kwargs)
    outcome = [None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # re-raised below, on every rank
            outcome[0] = ("error", type(e).__name__, str(e))
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "ok":
        return outcome[0][1]
    kinds = {c.__name__: c for c in (RunConfigChanged, OutputFolderLocked, ValueError, FileNotFoundError)}
    raise kinds.get(outcome[0][1], RuntimeError)(outcome[0][2])


# ----------------------------------------------------------------------------------------------
# Output-folder lock
# ----------------------------------------------------------------------------------------------
def _process_start(pid):
    """Start time of ``pid`` (clock ticks since boot, Linux /proc) or None; tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class OutputLock:
    """An exclusive lock on an output folder: ``<folder>/.mgf_lock`` (JSON: pid, host, job, start).

    Taken by rank 0 of a job only (one lock per job, whatever its number of
    processes). The holder refreshes the file's time every ``heartbeat_s``.
    A lock is *stale*, and taken over with a warning, when its process is gone:
    on the same host, its pid is dead (or was reused by another process); on
    another host (shared filesystem), it was not refreshed for ``stale_s``.

    Arguments
    ---------
    folder : str
    heartbeat_s, stale_s : float
    """

    held = {}  # path -> OutputLock, every lock this process holds

    def __init__(self, folder, heartbeat_s=60.0, stale_s=600.0):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()

    @staticmethod
    def me():
        job = os.environ.get("TORCHELASTIC_RUN_ID")
        if os.environ.get("MASTER_ADDR"):
            job = f"{job or 'torchrun'} ({os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')}, " \
                  f"{os.environ.get('WORLD_SIZE', '?')} processes)"
        return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(os.getpid()),
                "job": job, "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def stale_reason(self, info):
        """Why the lock described by ``info`` is stale, or None when its run may be alive."""
        if info is None:
            return "unreadable lock file"
        if info.get("host") == socket.gethostname():
            pid = int(info.get("pid", -1))
            if pid <= 0 or not _pid_alive(pid):
                return f"process {pid} is gone"
            start = _process_start(pid)
            if info.get("proc_start") is not None and start is not None and start != info["proc_start"]:
                return f"pid {pid} now belongs to another process"
            return None
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return "lock file vanished"
        return f"not refreshed for {age:.0f} s (host {info.get('host')})" if age > self.stale_s else None

    def acquire(self):
        """Takes the lock or raises :class:`OutputFolderLocked` naming the running process."""
        if self.path in OutputLock.held:
            return OutputLock.held[self.path]
        os.makedirs(self.folder, exist_ok=True)
        mine = self.me()
        for _ in range(3):
            try:
                self._create(mine)
            except FileExistsError:
                info = self.read()
                if info is not None and info.get("pid") == mine["pid"] and info.get("host") == mine["host"]:
                    break  # this very process (a recipe's main() called twice in one interpreter)
                why = self.stale_reason(info)
                if why is None:
                    raise OutputFolderLocked(
                        f"{self.folder} is in use by another run: pid {info.get('pid')} on host "
                        f"{info.get('host')}, started {info.get('started')}"
                        + (f", job {info['job']}" if info.get("job") else "")
                        + f". Wait for it to finish, or use another --output_folder. (If that run is "
                        f"really gone, delete {self.path}.)"
                    )
                # Stale: move it aside atomically (only one contender wins), then retry.
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    if self.read() != info:  # someone else took it over meanwhile
                        continue
                    os.replace(self.path, aside)
                    os.remove(aside)
                    msg = f"taking over the stale lock of {self.folder} ({why}; it was {info})"
                    logger.warning(msg)
                    print(msg, file=sys.stderr, flush=True)  # before the experiment's log file exists
                except OSError:
                    pass
                continue
            break
        else:
            raise OutputFolderLocked(f"could not take the lock {self.path}")
        OutputLock.held[self.path] = self
        thread = threading.Thread(target=self._heartbeat, name="mgf-output-lock", daemon=True)
        thread.start()
        return self

    def _create(self, mine):
        """Creates the lock file with its content at once (FileExistsError if there is one)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        try:
            os.link(tmp, self.path)  # atomic, and never seen half-written
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(mine, f)
        finally:
            os.remove(tmp)

    def _heartbeat(self):
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        """Removes the lock if this process holds it."""
        self._stop.set()
        OutputLock.held.pop(self.path, None)
        info = self.read()
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except OSError:
                pass


def release_locks():
    """Releases every output-folder lock of this process (registered with ``atexit``)."""
    for lock in list(OutputLock.held.values()):
        lock.release()


# ----------------------------------------------------------------------------------------------
# Run guard
# ----------------------------------------------------------------------------------------------
def _plain(value):
    """True for JSON-like values (the settings); False for built objects."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _inside(path, folder):
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)
    except ValueError:
        return False


WEIGHT_EXTENSIONS = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def files_digest(folder, extensions=WEIGHT_EXTENSIONS):
    """``sha256:<16 hex>`` of the weight files (by extension) under ``folder``: names and bytes."""
    import hashlib

    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(extensions):
                path = os.path.join(root, f)
                h.update(os.path.relpath(path, folder).encode("utf-8", "surrogateescape"))
                with open(path, "rb") as fin:
                    for block in iter(lambda: fin.read(1 << 20), b""):
                        h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def run_settings(hparams):
    """The settings that define a run: ``{key: value}`` for :func:`check_run_config`.

    Every top-level plain value of the loaded YAML (sizes, objectives, data,
    optimisation...) except: keys listed in ``resumable_keys`` (may change on
    resume), ``output_folder`` and the paths inside it (derived locations), the
    ``sample_overrides`` block (its values are in force as top-level values), and
    built objects (they are made from the plain values). An upstream that is a
    pretrained folder (``upstream``, ``upstream_reference``, ``pretrained``) is
    recorded by the content hash of its weights
    (:func:`mgf_sb.checkpoint.weights_digest`; ``hf:<folder>``: of its weight
    files, :func:`files_digest`), not by its path. Existing paths are made absolute.
    """
    from mgf_sb.checkpoint import CONFIG_FILE, weights_digest

    resumable = set(hparams.get("resumable_keys") or [])
    out = hparams.get("output_folder")
    settings = {}
    for key, value in hparams.items():
        if key.startswith("__") or key in resumable or key in NOT_SETTINGS:
            continue
        if not _plain(value):
            continue
        if isinstance(value, str) and out and value.startswith(str(out).rstrip("/") + "/"):
            continue  # a location derived from output_folder (save/, train_log.txt...)
        if isinstance(value, str) and key in UPSTREAM_KEYS and os.path.isfile(os.path.join(value, CONFIG_FILE)):
            value = weights_digest(value)
        elif isinstance(value, str) and key in UPSTREAM_KEYS and value.startswith("hf:") and os.path.isdir(value[3:]):
            value = "hf:" + files_digest(value[3:])
        elif isinstance(value, str) and value and os.path.exists(value):
            value = os.path.abspath(value)
        settings[key] = json.loads(json.dumps(value))
    return settings


def _show(v):
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _move_aside(hparams, out):
    """--on_change=restart: moves the earlier run's products into ``<out>/replaced-<time>/``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out, f"replaced-{stamp}")
    paths = [hparams.get(k) for k in RESTART_KEYS] + [os.path.join(out, f) for f in RESTART_FILES]
    moved = []
    for p in paths:
        if isinstance(p, str) and os.path.exists(p) and _inside(p, out) and os.path.abspath(p) != os.path.abspath(out):
            os.makedirs(dest, exist_ok=True)
            target = os.path.join(dest, os.path.relpath(os.path.abspath(p), os.path.abspath(out)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            was_dir = os.path.isdir(p)
            os.replace(p, target)
            if was_dir:  # the checkpointer (built with the YAML) expects its folder
                os.makedirs(p)
            moved.append(os.path.relpath(os.path.abspath(p), os.path.abspath(out)))
    return dest, moved


def check_run_config(hparams, on_change="stop"):
    """The run guard: records the run's settings, or checks a rerun against them.

    Arguments
    ---------
    hparams : dict
        The loaded YAML (needs ``output_folder``).
    on_change : "stop" or "restart"
        What to do when settings changed: stop with a :class:`RunConfigChanged`
        listing each change (``key: old -> new``) before anything is written,
        or move the earlier run's checkpoints, logs and exports aside into
        ``<output_folder>/replaced-<time>/`` (nothing is deleted) and start fresh.

    Returns
    -------
    dict
        ``{"changed": {key: [old, new]}, "moved_to": folder or None}``.
    """
    if on_change not in ON_CHANGE:
        raise ValueError(f"--on_change must be one of {ON_CHANGE}, got {on_change!r}")
    out = hparams["output_folder"]
    path = os.path.join(out, RUN_CONFIG)
    settings = run_settings(hparams)
    record = {"format": "mgf-sb-run-config", "version": 1, "settings": settings,
              "resumable_keys": list(hparams.get("resumable_keys") or [])}
    old = None
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise RunConfigChanged(f"{path} is unreadable ({e}); pass another --output_folder, or "
                                   f"--on_change=restart to start a fresh run in this folder") from e
    changed, moved_to = {}, None
    if old is not None:
        before = old.get("settings", old) if isinstance(old, dict) else {}
        for key in sorted(set(before) | set(settings)):
            if key in record["resumable_keys"]:
                continue
            a, b = before.get(key, "<absent>"), settings.get(key, "<absent>")
            if a != b:
                changed[key] = [a, b]
    if changed and on_change == "stop":
        lines = "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items())
        raise RunConfigChanged(
            f"{out} holds a run with other settings; changed since its first run (old -> new):\n{lines}\n"
            f"Nothing was written. Either\n"
            f"  - keep that run and use another folder: --output_folder=<new folder>, or\n"
            f"  - start a fresh run here: --on_change=restart (the earlier run's checkpoints, logs and "
            f"exports are moved to {out}/replaced-<time>/, nothing is deleted).\n"
            f"Settings that may change on resume: {', '.join(record['resumable_keys']) or 'none'} "
            f"(resumable_keys in the YAML)."
        )
    if changed:
        moved_to, moved = _move_aside(hparams, out)
        msg = (f"--on_change=restart: settings changed ({', '.join(changed)}); the earlier run's "
               f"{', '.join(moved) or 'files'} moved to {moved_to}; starting a fresh run in {out}")
        logger.warning(msg)
        print(msg, flush=True)
    if old is None or changed:
        os.makedirs(out, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return {"changed": changed, "moved_to": moved_to}


# ----------------------------------------------------------------------------------------------
# The prologue
# ----------------------------------------------------------------------------------------------
def pop_on_change(argv):
    """Removes ``--on_change=X`` / ``--on_change X`` from ``argv``; -> (argv, X or "stop")."""
    argv, rest, value = list(argv), [], "stop"
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--on_change="):
            value = a.split("=", 1)[1]
        elif a == "--on_change" and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        else:
            rest.append(a)
        i += 1
    if value not in ON_CHANGE:
        raise ValueError(f"--on_change must be one of {ON_CHANGE}, got {value!r}")
    return rest, value
