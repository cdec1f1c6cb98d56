"""The output-folder lock of every recipe: one live run per ``output_folder``.

:class:`OutputLock` (``<output_folder>/.mgf_lock``, held by rank 0 of a job) and
:func:`release_locks`; split out of :mod:`mgf_sb.run_guard`, which re-exports them, and which
takes the lock through :func:`mgf_sb.recipe.start_experiment`.
"""

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time

logger = logging.getLogger("mgf_sb.run_guard")  # the messages keep their logger name

LOCK_FILE = ".mgf_lock"


class OutputFolderLocked(RuntimeError):
    """Another live run holds the output folder's lock (message names it)."""


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
