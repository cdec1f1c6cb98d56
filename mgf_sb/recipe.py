"""The opening every recipe's ``main`` shares (SpeechBrain's usual prologue).

:func:`start_experiment` is the one place (pretraining, the four probes, and
therefore every step of ``recipes/evaluate.py``, which runs them) that

1. parses ``hparams.yaml --overrides`` (plus ``--on_change=stop|restart``, see 4) and checks
   the settings by name before anything is built (:mod:`mgf_sb.settings`): a misspelt key gets
   "did you mean", a value of the wrong type or out of range is refused naming the key, the
   value and what it must be, and a missing ``data_folder`` is reported as such (before the
   run guard compares anything);
2. joins the DDP group when launched by torchrun, and makes sure the process
   leaves it cleanly at exit, on success and on error (:func:`leave_process_group`,
   registered with ``atexit``): without it gloo's threads are torn down during
   interpreter finalisation and a finished run can die with SIGABRT;
3. takes a lock on ``output_folder`` (:class:`~mgf_sb.run_guard.OutputLock`, rank 0 only): a
   second run on the same folder stops at once naming the running process; a
   lock left by a killed run is detected and taken over;
4. checks the run guard (:func:`mgf_sb.run_guard.check_run_config`): the settings that define a
   run are recorded in ``<output_folder>/run_config.json`` (and in a save folder
   outside it); once the run has trained, a rerun that changes any of them stops
   *before anything is written*, listing each change, unless ``--on_change=restart``
   (every output of the earlier run is moved aside, never deleted). A run that
   never trained binds nothing: the corrected command replaces its record. Keys in
   the YAML's ``resumable_keys`` may change on resume;
5. creates ``output_folder`` with a copy of the YAML and the overrides.
"""

import atexit
import contextlib
import logging
import os
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from mgf_sb.distributed import import_before_process_group
from mgf_sb.run_guard import (OutputLock, check_run_config, leave_process_group, pop_on_change, rank0_decides,
                              release_locks)
from mgf_sb.settings import (check_built_settings, check_override_keys, check_settings, read_utf8,  # noqa: F401
                             recipe_help)
from mgf_sb.train_log import readable_numbers

logger = logging.getLogger(__name__)


def load_hparams(hparams_file, overrides=None):
    """Loads a YAML with HyperPyYAML (non-UTF-8 files: see :func:`read_utf8`)."""
    return load_hyperpyyaml(read_utf8(hparams_file), overrides)


def _lock_output_folder(folder):
    OutputLock(folder).acquire()


_EXIT_HOOKS = []


def _register_exit_hooks():
    if not _EXIT_HOOKS:  # once per process; atexit runs them last-registered first
        atexit.register(leave_process_group)
        atexit.register(release_locks)
        _EXIT_HOOKS.append(True)


# ----------------------------------------------------------------------------------------------
# Real-data defaults, sample overrides (one mechanism for every recipe and recipes/evaluate.py)
# ----------------------------------------------------------------------------------------------
SAMPLE_FOLDER_NAME = "samples"


def is_bundled_sample(folder):
    """True for a corpus inside a ``samples/`` folder (the repository's bundled sample corpora;
    the same rule as :func:`mgf_sb.downstream.announce_data`)."""
    return SAMPLE_FOLDER_NAME in os.path.normpath(os.path.abspath(str(folder))).split(os.sep)


def use_sample_settings(mode, data_folder):
    """``use_sample_overrides`` (``auto`` | True | False) and the data folder -> apply them?"""
    if isinstance(mode, bool):
        return mode
    if str(mode).lower() in ("true", "false"):
        return str(mode).lower() == "true"
    if str(mode) != "auto":
        raise ValueError(f"use_sample_overrides must be auto, True or False, got {mode!r}")
    return data_folder is not None and is_bundled_sample(data_folder)


def _merge(base, top):
    """Deep merge of two YAML mappings; ``top`` wins."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _say(msg):
    """Logged, and printed once (rank 0) so that it shows above the progress bars."""
    logger.info(msg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def apply_sample_overrides(hparams_file, overrides):
    """The YAML's ``sample_overrides:`` block under the command-line overrides, when it applies.

    A recipe YAML's defaults are its real-data settings (SpeechBrain's convention); its
    ``sample_overrides:`` block holds the small-data settings of the bundled sample corpus.
    With ``use_sample_overrides: auto`` (the default) the block is applied when ``data_folder``
    is a bundled sample (:func:`is_bundled_sample`); ``True`` / ``False`` force it on / off.
    Command-line overrides always win over the block. Says which set is in force.

    Arguments
    ---------
    hparams_file : str
    overrides : str
        The command line's overrides (YAML text, from ``sb.parse_arguments``).

    Returns
    -------
    str
        The overrides to load the YAML with (unchanged when the block does not apply).
    """
    from ruamel.yaml import YAML, YAMLError

    yaml = YAML(typ="rt")
    try:
        with open(hparams_file, encoding="utf-8") as fin:
            raw = yaml.load(fin) or {}
    except (UnicodeDecodeError, ValueError, YAMLError):
        return overrides  # load_hparams reports a bad file with its name and line
    user = (yaml.load(overrides) if overrides and overrides.strip() else None) or {}
    if not hasattr(raw, "get") or "sample_overrides" not in raw:
        return overrides
    block = raw.get("sample_overrides") or {}
    data_folder = user.get("data_folder", raw.get("data_folder"))
    if user.get("data_format", raw.get("data_format")) == "shards":  # the data is the shards, not data_folder
        data_folder = user.get("shards", raw.get("shards"))
        data_folder = data_folder if isinstance(data_folder, str) and os.path.isdir(data_folder) else None
    mode = user.get("use_sample_overrides", raw.get("use_sample_overrides", "auto"))
    name = os.path.basename(hparams_file)
    if not block:
        _say(f"settings: {name} defaults (they serve real data and the bundled sample alike: no sample_overrides)")
        return overrides
    if not use_sample_settings(mode, data_folder):
        why = "use_sample_overrides=False" if str(mode).lower() == "false" else \
            f"data_folder {data_folder} is not a bundled sample"
        _say(f"settings: {name} defaults (real-data settings; sample_overrides not applied: {why})")
        return overrides
    merged = _merge(dict(block), dict(user))
    shown = ", ".join(f"{k}={v}" for k, v in block.items() if k not in user)
    why = "use_sample_overrides=True" if str(mode).lower() == "true" else \
        f"data_folder {data_folder} is the bundled sample"
    _say(f"settings: {name} defaults + its sample_overrides ({why}): {shown or 'all overridden on the command line'}. "
         f"Real data: pass --data_folder=<corpus> (or --use_sample_overrides=False)")
    import io

    stream = io.StringIO()
    yaml.dump(merged, stream)
    return stream.getvalue()


def command_settings(argv):
    """The settings a recipe run with ``argv`` (``hparams.yaml --overrides``) records in its
    ``run_config.json`` (:func:`mgf_sb.run_guard.run_settings`), computed from the YAML as it is
    *now*, without running anything. Lets a grid tell a finished step whose YAML defaults have
    changed since (same command, other settings) from one that is still current."""
    from mgf_sb.run_guard import run_settings

    argv, _ = pop_on_change(list(argv))
    hparams_file, _, overrides = sb.parse_arguments(argv)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            overrides = apply_sample_overrides(hparams_file, overrides)
        return run_settings(load_hparams(hparams_file, overrides))
    finally:
        logging.getLogger().setLevel(level)


def start_experiment(argv):
    """Command line -> hyperparameters, with the experiment folder created.

    Parses ``hparams.yaml --overrides [--on_change=stop|restart]`` with
    SpeechBrain, joins the DDP group when launched by torchrun (a no-op for a
    plain single-process run) and registers a clean exit from it, checks the
    settings (:mod:`mgf_sb.settings`), loads the YAML, applies ``num_threads``
    (torch's CPU threads; one job using all cores is fastest, oversubscribed
    jobs run many times slower), locks
    ``output_folder``, checks the run guard and creates ``output_folder`` with a
    copy of the YAML and the overrides (see the module docstring).

    Returns
    -------
    hparams : dict
    run_opts : dict
        SpeechBrain's run options (device, precision, distributed backend...).
    """
    if any(a in ("--help", "-h") for a in argv):  # the recipe's own settings, not SpeechBrain's generic options
        print(recipe_help(argv, getattr(sys.modules.get("__main__"), "__doc__", None)))
        sys.exit(0)
    _quiet_user_errors()
    try:
        return _prologue(argv)
    except Exception as e:  # a setting, a folder, a rerun: the message says it all (no traceback)
        e.mgf_user_error = True
        raise


def _quiet_user_errors():
    """An error of the prologue (a bad or misspelt setting, a missing data folder or upstream, a rerun
    with other settings, a busy output folder) ends the script with ``error: <message>`` on stderr and
    exit code 1, without a traceback; ``MGF_TRACEBACK=1`` shows it. Uncaught errors elsewhere keep
    Python's traceback. (In-process callers still get the exception.)"""
    if getattr(sys.excepthook, "mgf_quiet", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if getattr(exc, "mgf_user_error", False) and not os.environ.get("MGF_TRACEBACK"):
            sys.stderr.write(f"error ({exc_type.__name__}): {exc}\n(MGF_TRACEBACK=1 shows the traceback)\n")
            sys.stderr.flush()
        else:
            previous(exc_type, exc, tb)

    hook.mgf_quiet = True
    sys.excepthook = hook


def _prologue(argv):
    argv, on_change = pop_on_change(argv)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    import_before_process_group()  # else the group outlives destroy_process_group (see there)
    sb.utils.distributed.ddp_init_group(run_opts)
    _register_exit_hooks()
    read_utf8(hparams_file)  # a non-UTF-8 YAML: an error naming the file, not a UnicodeDecodeError
    check_override_keys(hparams_file, overrides)  # a misspelt key: "did you mean", not a list of every key
    overrides = apply_sample_overrides(hparams_file, overrides)  # real-data defaults or the sample's
    check_settings(hparams_file, overrides)  # types, ranges, data_folder: by name, before anything is built
    hparams = load_hparams(hparams_file, overrides)
    check_built_settings(hparams, hparams_file)  # values made at load (VoxCeleb's lr, chosen by head)
    readable_numbers(hparams)  # train_log.txt: 100.0, not 1.00e+02
    if hparams.get("num_threads"):
        torch.set_num_threads(int(hparams["num_threads"]))
    out = hparams["output_folder"]
    rank0_decides(_lock_output_folder, out)  # one lock per job: rank 0 takes it
    rank0_decides(check_run_config, hparams, on_change)
    sb.create_experiment_directory(
        experiment_directory=out, hyperparams_to_save=hparams_file, overrides=overrides
    )
    return hparams, run_opts
