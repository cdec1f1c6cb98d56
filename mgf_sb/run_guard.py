"""Run guard and output-folder lock of every recipe (used by :func:`mgf_sb.recipe.start_experiment`).

- :class:`OutputLock` (:mod:`mgf_sb.output_lock`, re-exported here): one live run per ``output_folder`` (rank 0 holds ``.mgf_lock``; a lock left
  by a killed run is detected and taken over);
- :func:`check_run_config`: the settings that define a run are recorded in
  ``<output_folder>/run_config.json`` (and ``<save_folder>/run_config.json`` when the save folder
  lies elsewhere, so that it cannot be resumed from another output folder) at the first run. They
  bind once the run has trained (:func:`run_started`: a checkpoint, a train-log line or results);
  from then on a rerun that changes any of them stops before anything is written, listing each
  change, unless ``--on_change=restart`` (every output of the earlier run is moved aside, never
  deleted). Before that, the corrected command of a failed start replaces the record.
  ``resumable_keys`` may change;
- :func:`rank0_decides` / :func:`leave_process_group`: under DDP rank 0 decides and every
  process gets the same answer (or the same error), and the process group is left cleanly.
"""

import datetime
import json
import logging
import os

import torch

# the output-folder lock lives in its own module; its names are re-exported here for callers
from mgf_sb.output_lock import (LOCK_FILE, OutputFolderLocked, OutputLock, _pid_alive, _process_start,  # noqa: F401
                                release_locks)

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
ON_CHANGE = ("stop", "restart")
# --on_change=restart moves every output of the earlier run aside, into <folder>/replaced-<time>/,
# except: what the output folder held before the run's first start, and the folders of these keys
# (each preparation redoes its manifests when their options change).
REPLACED_PREFIX = "replaced-"
KEEP_ON_RESTART = ("manifest_folder",)
# Written by the prologue itself (not user files).
PROLOGUE_FILES = ("hyperparams.yaml", "log.txt", "env.log", RUN_CONFIG)
# A run that wrote any of these (or a checkpoint, or a train-log line) has trained: its settings bind.
RESULT_FILES = ("results.json", "test_results.json", "verification.json")
# Settings that are locations: recorded as absolute paths even before they exist.
LOCATION_SUFFIXES = ("_folder", "_file", "train_log")
# Top-level keys that are not settings themselves (what they select is in the other values).
NOT_SETTINGS = ("resumable_keys", "output_folder", "sample_overrides", "use_sample_overrides")
# Keys whose value, when it is a pretrained folder, is recorded by content hash.
UPSTREAM_KEYS = ("upstream", "upstream_reference", "pretrained")


class RunConfigChanged(RuntimeError):
    """A rerun changed settings that define the run (message lists them)."""


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
    while the interpreter is still alive (:func:`mgf_sb.distributed.end_process_group`).
    """
    from mgf_sb.distributed import end_process_group

    end_process_group()


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


def _is_location(key, value):
    """A path-valued setting (``*_folder``, ``*_file``, ``train_log``), recorded absolute even before it exists."""
    return (key.endswith(LOCATION_SUFFIXES) and isinstance(value, str) and value
            and not value.startswith(("hf:", "pipe:")) and "://" not in value)


def run_settings(hparams):
    """The settings that define a run: ``{key: value}`` for :func:`check_run_config`.

    Every top-level plain value of the loaded YAML (sizes, objectives, data,
    optimisation...) except: keys listed in ``resumable_keys`` (may change on
    resume), ``output_folder`` and the paths inside it (derived locations), the
    ``sample_overrides`` block (its values are in force as top-level values), and
    built objects (they are made from the plain values). An upstream that is a
    pretrained folder (``upstream``, ``upstream_reference``, ``pretrained``) is
    recorded by the content hash of its weights
    (:func:`mgf_sb.pretrained_folder.weights_digest`; ``hf:<folder>``: of its weight
    files, :func:`files_digest`), not by its path. Existing paths, and locations
    (``*_folder``, ``*_file``, ``train_log``) whether they exist yet or not, are made absolute.
    """
    from mgf_sb.pretrained_folder import CONFIG_FILE, weights_digest

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
        elif isinstance(value, str) and value and (os.path.exists(value) or _is_location(key, value)):
            value = os.path.abspath(value)
        settings[key] = json.loads(json.dumps(value))
    return settings


# Settings added to hparams/mgf.yaml after runs were recorded, each with the value that gives the
# behaviour from before it existed. A run recorded without such a key, resumed or re-checked with
# the key at that value, is unchanged (the new switch is off); at any other value it is a change.
# Add each new switch here with its "off" value, or every earlier run folder stops on resume.
ADDED_SETTINGS = {
    # issue "Hierarchy in the network": depth per scale, input block, frame-scale alterations
    "conv_pos_norm": "none", "conv_pos_scale_init": None, "frame_layer": -1, "phoneme_layer": -1,
    "frame_target_layers": None, "phoneme_target_layers": None, "word_target_layers": None,
    "utterance_target_layers": None, "frame_freq_mask_bins": 0, "frame_freq_mask_count": 1, "frame_noise_std": 0.0,
    # utterance views (issue 33 part 4): off = views that share the recording's channel, a gap that
    # shrinks on short crops (the utterance_loss "cosine" and the spk_id column add no key)
    "view_channel": False, "view_channel_knots": 6, "view_channel_eq_db": 3.0, "view_channel_gain_db": 3.0,
    "view_channel_noise_floor_db": [30.0, 50.0], "view_gap_strict": False,
    # phoneme-scale unit targets (HuBERT's form; issue 33 part 3): off = span-vs-span InfoNCE
    "phoneme_units": "none", "phoneme_n_units": 100, "phoneme_units_source": "teacher", "phoneme_units_decay": 0.99,
    # the utterance scale's own branch (issue 33, "each scale at its own depth"): off = no branch, mean pooling
    "branch_layers": 0, "branch_norm": "layer", "branch_input": "shared",
    "trunk_adapter": "linear",
    "trunk_projection_grad": 0.0,
    "utterance_pool": "mean",
}


def settings_changes(before, now, resumable=()):
    """``{key: [before, now]}`` for each setting that differs (``"<absent>"`` on the side that
    lacks it), keys in ``resumable`` left out: what a rerun changed. A key the record lacks that
    is now at its :data:`ADDED_SETTINGS` value (the behaviour from before it existed) is no change."""
    resumable = set(resumable or ())

    def differs(k):
        if k in resumable:
            return False
        if k not in before and k in now and k in ADDED_SETTINGS:
            return json.loads(json.dumps(ADDED_SETTINGS[k])) != now[k]
        return before.get(k, "<absent>") != now.get(k, "<absent>")

    return {k: [before.get(k, "<absent>"), now.get(k, "<absent>")] for k in sorted(set(before) | set(now))
            if differs(k)}


def show_value(v):
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _checkpoints(folder):
    """Names of the checkpoint folders in ``folder`` (``CKPT+...``, complete or not)."""
    try:
        return [n for n in os.listdir(folder) if n.startswith(("CKPT+", "incomplete-CKPT+"))]
    except OSError:
        return []


def _save_folder(hparams):
    out = hparams["output_folder"]
    save = hparams.get("save_folder")
    return save if isinstance(save, str) and save else os.path.join(out, "save")


def _separate_save_folder(hparams):
    """The save folder when it lies outside ``output_folder`` (then it carries its own record), else None."""
    save = _save_folder(hparams)
    return None if _inside(save, hparams["output_folder"]) else os.path.abspath(save)


def run_started(hparams):
    """True once the run in ``output_folder`` has trained: its save folder holds a checkpoint, its
    train log a line, or the output folder results. Until then its recorded settings do not bind."""
    out = hparams["output_folder"]
    if _checkpoints(_save_folder(hparams)):
        return True
    log = hparams.get("train_log") if isinstance(hparams.get("train_log"), str) else os.path.join(out, "train_log.txt")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        return True
    return any(os.path.exists(os.path.join(out, f)) for f in RESULT_FILES)


def _derived_names(hparams, out):
    """Top-level names in ``out`` of the locations the YAML derives from it (save/, data/, train_log.txt...)."""
    names = set(PROLOGUE_FILES) | {LOCK_FILE}
    for value in hparams.values():
        if isinstance(value, str) and value and _inside(value, out) and os.path.abspath(value) != os.path.abspath(out):
            names.add(os.path.relpath(os.path.abspath(value), os.path.abspath(out)).split(os.sep)[0])
    return names


def _found_before(hparams, out):
    """What ``out`` held before this run's first start (a user's files): kept by every restart."""
    try:
        names = os.listdir(out)
    except OSError:
        return []
    derived = _derived_names(hparams, out)
    return sorted(n for n in names if n not in derived and not n.startswith(REPLACED_PREFIX))


def _fresh_dest(folder, stamp):
    """``<folder>/replaced-<stamp>``, or ``...-2``, ``-3``... when a restart in the same second made one."""
    dest, i = os.path.join(folder, REPLACED_PREFIX + stamp), 2
    while os.path.lexists(dest):
        dest, i = os.path.join(folder, f"{REPLACED_PREFIX}{stamp}-{i}"), i + 1
    return dest


def _move_entries(folder, names, dest):
    """Moves ``folder/<name>`` for each name into ``dest`` (created); -> the names moved."""
    moved = []
    for name in names:
        src = os.path.join(folder, name)
        if not os.path.lexists(src):
            continue
        os.makedirs(dest, exist_ok=True)
        os.replace(src, os.path.join(dest, name))
        moved.append(name)
    return moved


def _move_aside(hparams, out, found, stamp):
    """Moves every output of the earlier run in ``out`` into ``<out>/replaced-<stamp>/``.

    Kept in place: files that were there before its first start (``found``), the lock,
    earlier ``replaced-*`` folders, and the manifest folder (each preparation redoes its
    manifests when their options change). The save folder is made again, empty (the
    checkpointer built with the YAML writes into it).
    """
    keep = set(found) | {LOCK_FILE}
    for key in KEEP_ON_RESTART:
        p = hparams.get(key)
        if isinstance(p, str) and p and _inside(p, out) and os.path.abspath(p) != os.path.abspath(out):
            keep.add(os.path.relpath(os.path.abspath(p), os.path.abspath(out)).split(os.sep)[0])
    try:
        names = sorted(n for n in os.listdir(out) if n not in keep and not n.startswith(REPLACED_PREFIX))
    except OSError:
        names = []
    dest = _fresh_dest(out, stamp)
    moved = _move_entries(out, names, dest)
    save = _save_folder(hparams)
    if _inside(save, out):
        os.makedirs(save, exist_ok=True)
    return dest, moved


def _move_save_aside(save, out, stamp):
    """A save folder outside ``out``: its content goes to ``<save>/replaced-<stamp>/`` (same filesystem)."""
    names = sorted(n for n in os.listdir(save) if not n.startswith(REPLACED_PREFIX)
                   and not _inside(out, os.path.join(save, n)))  # never move the output folder itself
    dest = _fresh_dest(save, stamp)
    return dest, _move_entries(save, names, dest)


def _read_record(path, unreadable_is_error=True):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as e:
        if not unreadable_is_error:
            logger.warning(f"ignoring the unreadable {path} ({e})")
            return None
        raise RunConfigChanged(f"{path} is unreadable ({e}); pass another --output_folder, or "
                               f"--on_change=restart to start a fresh run in this folder") from e


def _write_record(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _say(msg):
    logger.warning(msg)
    print(msg, flush=True)


def check_run_config(hparams, on_change="stop"):
    """The run guard: records the run's settings, or checks a rerun against them.

    The record (``<output_folder>/run_config.json``, and ``<save_folder>/run_config.json`` when the
    save folder lies outside the output folder) binds once the run has trained
    (:func:`run_started`): until then a rerun with other settings (the corrected command after a
    failed start) replaces it, and the failed attempt's files are moved aside.

    Arguments
    ---------
    hparams : dict
        The loaded YAML (needs ``output_folder``).
    on_change : "stop" or "restart"
        What to do when the settings of a run that has trained changed: stop with a
        :class:`RunConfigChanged` listing each change (``key: old -> new``) before anything is
        written, or move every output of the earlier run aside into ``<output_folder>/replaced-<time>/``
        (and a separate save folder's content into ``<save_folder>/replaced-<time>/``; nothing is
        deleted) and start fresh. A separate save folder recorded for another output folder is
        refused the same way (its checkpoints would be resumed by a run they do not belong to).

    Returns
    -------
    dict
        ``{"changed": {key: [old, new]}, "moved_to": folder or None, "started": bool}``
        (``started``: the earlier run had trained; False when there was none).
    """
    if on_change not in ON_CHANGE:
        raise ValueError(f"--on_change must be one of {ON_CHANGE}, got {on_change!r}")
    out = hparams["output_folder"]
    path = os.path.join(out, RUN_CONFIG)
    save = _separate_save_folder(hparams)
    settings = run_settings(hparams)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    old = _read_record(path)
    theirs = _read_record(os.path.join(save, RUN_CONFIG), unreadable_is_error=False) if save else None
    if theirs is not None and os.path.abspath(str(theirs.get("output_folder"))) != os.path.abspath(out):
        owner = theirs.get("output_folder")
        if _checkpoints(save) and on_change == "stop":
            raise RunConfigChanged(
                f"save_folder {save} holds the checkpoints of another run: the one in {owner} (see "
                f"{os.path.join(save, RUN_CONFIG)}); a save folder belongs to one output folder, and "
                f"{out} would resume them. Nothing was written. Either\n"
                f"  - resume that run: --output_folder={owner}, or\n"
                f"  - give this run its own save folder: --save_folder=<new folder>, or\n"
                f"  - start a fresh run here: --on_change=restart (the content of {save} is moved to "
                f"{save}/replaced-<time>/, nothing is deleted)."
            )
        dest, moved = _move_save_aside(save, out, stamp)
        if moved:
            _say(f"save_folder {save} was bound to the run in {owner}: its "
                 f"{'checkpoints' if on_change == 'restart' else 'files (it never trained)'} "
                 f"({', '.join(moved)}) moved to {dest}; it now belongs to {out}")
        theirs = None
    elif theirs is not None and old is None:
        old = theirs  # the output folder lost its record; the save folder kept it
    changed = {} if old is None else settings_changes(old.get("settings", old), settings,
                                                      hparams.get("resumable_keys"))
    started = old is not None and run_started(hparams)
    if changed and on_change == "stop" and started:
        lines = "\n".join(f"  {k}: {show_value(a)} -> {show_value(b)}" for k, (a, b) in changed.items())
        raise RunConfigChanged(
            f"{out} holds a run with other settings; changed since its first run (old -> new):\n{lines}\n"
            f"Nothing was written. Either\n"
            f"  - keep that run and use another folder: --output_folder=<new folder>, or\n"
            f"  - start a fresh run here: --on_change=restart (every output of the earlier run is moved "
            f"to {out}/replaced-<time>/, nothing is deleted).\n"
            f"Settings that may change on resume: {', '.join(hparams.get('resumable_keys') or []) or 'none'} "
            f"(resumable_keys in the YAML)."
        )
    found = old.get("found_at_first_run", []) if old is not None else _found_before(hparams, out)
    moved_to = None
    if changed:
        moved_to, moved = _move_aside(hparams, out, found, stamp)
        if save:
            save_dest, save_moved = _move_save_aside(save, out, stamp)
            moved += [os.path.join(save, m) for m in save_moved]
        where = f"{', '.join(moved)} moved to {moved_to}" if moved else "nothing to move"
        if started:
            _say(f"--on_change=restart: settings changed ({', '.join(changed)}); the earlier run's {where}; "
                 f"starting a fresh run in {out}")
        else:
            _say(f"the earlier attempt in {out} never trained (no checkpoint, train log or results), so its "
                 f"settings do not bind: replaced ({', '.join(changed)}); its {where}")
    record = {"format": "mgf-sb-run-config", "version": 1, "settings": settings,
              "resumable_keys": list(hparams.get("resumable_keys") or []),
              "output_folder": os.path.abspath(out), "found_at_first_run": found}
    if old is None or changed or old.get("output_folder") is None:
        _write_record(path, record)
    if save and (theirs is None or theirs.get("settings") != settings):
        _write_record(os.path.join(save, RUN_CONFIG), record)
    return {"changed": changed, "moved_to": moved_to, "started": started}


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
