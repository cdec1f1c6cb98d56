"""A finished run, rerun, does nothing but say so.

When a recipe has trained and written its results it calls :func:`mark_finished`, which writes
``<output_folder>/finished.json``: how training ended (epochs, early-stopped or at the epoch limit,
the best epoch), the result files and the settings in force. A rerun of the same command
(:func:`finished_rerun`, called by each recipe right after :func:`mgf_sb.recipe.start_experiment`)
then prints one line::

    finished: 12 epochs, early-stopped (best dev at epoch 7); results in results/TIMIT/.../results.md

and returns without training or evaluating anything. Without it a probe's rerun trained more: the
checkpointer keeps only the *best* dev checkpoint, whose epoch counter predates early stopping.

What may change on a rerun (``resumable_keys``) decides:

- only run-time keys (threads, workers, precision, checkpoint intervals...): finished, as above;
- ``number_of_epochs`` raised above the epochs trained, and training ended at the epoch limit
  (not early-stopped): training goes on (the marker is removed);
- an evaluation setting (``beam_size``, ``verification``...): the run evaluates again, but trains
  nothing more (:func:`training_done`, used by :class:`mgf_sb.downstream.DownstreamBrain`).

``--on_change=restart`` moves the marker aside with every other output (:mod:`mgf_sb.run_guard`).
"""

import json
import logging
import os

logger = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"
# Resumable keys that change how a run is executed, not what it computes.
RUNTIME_KEYS = ("num_workers", "num_threads", "skip_prep", "precision", "prep_workers", "ckpt_interval_minutes",
                "ckpt_interval_steps", "ckpt_num_to_keep", "ckpt_to_keep", "nonfinite_patience", "eval_batch_size")


def _show_path(path):
    """``path`` relative to the working folder when it lies below it, else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def _path(hparams):
    return os.path.join(hparams["output_folder"], FINISHED_FILE)


def _plain(value):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _resumable_values(hparams):
    return {k: _plain(hparams.get(k)) for k in (hparams.get("resumable_keys") or []) if k not in RUNTIME_KEYS}


def read_finished(hparams):
    """The record of :func:`mark_finished` in ``output_folder``, or None."""
    try:
        with open(_path(hparams), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def describe(record):
    """One line: ``12 epochs, early-stopped (best dev at epoch 7); results in <files>``."""
    n = record.get("epochs")
    how = record.get("stopped")
    parts = [f"{n} epoch{'s' if n != 1 else ''}" if n is not None else "trained"]
    if how == "early":
        parts[0] += ", early-stopped"
        if record.get("best_epoch"):
            parts[0] += f" (best dev at epoch {record['best_epoch']})"
    elif how == "limit":
        parts[0] += " (the epoch limit)"
    files = record.get("results") or []
    if files:
        parts.append("results in " + ", ".join(files))
    return "; ".join(parts)


def counter_state(counter):
    """``(epochs, stopped, best_epoch)`` of an epoch counter (with or without early stopping)."""
    epochs = int(getattr(counter, "current", 0))
    early = bool(getattr(counter, "should_stop", False))
    best = getattr(counter, "best_limit", None)
    return epochs, ("early" if early else "limit"), (int(best) if best else None)


def mark_finished(hparams, counter, results=()):
    """Writes ``<output_folder>/finished.json`` (rank 0 calls it once results are written).

    Arguments
    ---------
    hparams : dict
    counter : the run's epoch counter (``EpochCounter`` or ``EpochCounterWithStopper``) as training
        left it, or its :func:`counter_state` taken then (a probe's evaluation reloads the best
        checkpoint, and with it an earlier counter: :attr:`DownstreamBrain.fit_state`).
    results : paths of what the run produced (shown on a rerun).
    """
    old = read_finished(hparams)
    epochs, stopped, best = counter if isinstance(counter, tuple) else counter_state(counter)
    if old is not None and old.get("epochs", 0) >= epochs:  # an evaluation-only rerun: how training ended stays
        epochs, stopped, best = old["epochs"], old.get("stopped"), old.get("best_epoch")
    record = {"epochs": epochs, "stopped": stopped, "best_epoch": best,
              "number_of_epochs": _plain(hparams.get("number_of_epochs")),
              "results": [_show_path(p) for p in results],
              "resumable": _resumable_values(hparams)}
    tmp = _path(hparams) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, _path(hparams))
    return record


def _more_epochs(record, hparams):
    """True when a rerun asks for more epochs than a run that ended at its epoch limit trained."""
    try:
        limit = int(hparams.get("number_of_epochs"))
    except (TypeError, ValueError):
        return False
    return record.get("stopped") != "early" and limit > int(record.get("epochs") or 0)


def finished_rerun(hparams, say=print):
    """On the rerun of a finished run: says ``finished: ...`` and returns its record; else None.

    A rerun that changes an evaluation setting, or raises ``number_of_epochs`` of a run that
    ended at its epoch limit, is not a rerun of the finished run: None (and, for more epochs,
    the marker is removed so that training goes on).
    """
    record = read_finished(hparams)
    if record is None:
        return None
    if _more_epochs(record, hparams):
        try:
            os.remove(_path(hparams))
        except FileNotFoundError:  # another process of the same DDP job removed it first
            pass
        say(f"continuing: {record.get('epochs')} epochs were trained, number_of_epochs is now "
            f"{hparams.get('number_of_epochs')}")
        return None
    now = _resumable_values(hparams)
    before = record.get("resumable") or {}
    changed = sorted(k for k in set(now) | set(before) if k != "number_of_epochs" and now.get(k) != before.get(k))
    if changed:
        say(f"evaluating again ({', '.join(changed)} changed); training finished earlier: {describe(record)}")
        return None
    say(f"finished: {describe(record)}. Nothing to do (--on_change=restart starts a fresh run here, "
        f"--output_folder=<new folder> another)")
    return record


def training_done(hparams):
    """True when the run in ``output_folder`` finished training earlier (it may evaluate again)."""
    record = read_finished(hparams)
    return record is not None and not _more_epochs(record, hparams)
