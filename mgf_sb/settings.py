"""Settings checked by name at start, before any object is built (every recipe and recipes/evaluate.py).

Called from the shared prologue (:func:`mgf_sb.recipe.start_experiment`; ``recipes/evaluate.py``'s own
loader), in this order:

1. :func:`check_override_keys`: a command-line key that the YAML does not define is refused with
   "did you mean" (:mod:`difflib`), instead of HyperPyYAML's ``KeyError`` listing every key;
2. :func:`check_settings`: every top-level value, after the overrides and ``!ref`` are resolved but
   before ``!new:`` / ``!apply:`` build anything, against :data:`RULES` (one declarative table for
   every recipe: a rule applies wherever its key is a setting of the YAML) and against its own YAML
   default's type (a switch stays True/False, a number stays a number); then the input folder
   (``data_folder``) must exist. Each bad setting is named with its value and what it must be.

The numbers themselves (defaults) stay in the YAML; this table only says what a value may be.
"""

import difflib
import math
import os
import re
import sys

from ruamel.yaml import YAML


class BadSetting(ValueError):
    """One or more settings have a value of the wrong type or out of range (message names each)."""


class UnknownSetting(BadSetting):
    """An override names a key the YAML does not define (message suggests the nearest)."""


class Want:
    """What a setting's value may be: a switch, a whole number, a number, or one of some words.

    Arguments
    ---------
    kind : "switch" | "whole" | "number" | "choice" | "whole list"
    lo, hi : float or None
        Inclusive bounds.
    above, below : float or None
        Exclusive bounds.
    choices : tuple of str
        For ``choice``: the words allowed; for a number kind: words allowed besides
        the number (``utterance_layer``: a layer index or ``branch``).
    optional : bool
        null (None) is allowed too.
    """

    def __init__(self, kind, lo=None, hi=None, above=None, below=None, choices=(), optional=False):
        self.kind, self.lo, self.hi, self.above, self.below = kind, lo, hi, above, below
        self.choices, self.optional = tuple(choices), optional

    def accepts(self, v):
        if v is None:
            return self.optional
        if self.kind == "switch":
            return isinstance(v, bool)
        if self.kind == "choice" or isinstance(v, str):
            return isinstance(v, str) and v in self.choices
        if self.kind == "whole list":
            return isinstance(v, list) and len(v) > 0 and all(Want("whole").accepts(x) for x in v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.kind == "whole" and not isinstance(v, int):
            return False
        return ((self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)
                and (self.above is None or v > self.above) and (self.below is None or v < self.below))

    def describe(self):
        if self.kind == "switch":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "whole list":
            text = "a non-empty list of whole numbers, e.g. [1986, 1987]"
        else:
            text = "a whole number" if self.kind == "whole" else "a number"
            bounds = [f">= {_num(self.lo)}" if self.lo is not None else None,
                      f"> {_num(self.above)}" if self.above is not None else None,
                      f"<= {_num(self.hi)}" if self.hi is not None else None,
                      f"< {_num(self.below)}" if self.below is not None else None]
            bounds = [b for b in bounds if b]
            text += f" {' and '.join(bounds)}" if bounds else ""
            text += "".join(f" or {c}" for c in self.choices)
        return text + (" (or null)" if self.optional else "")


def _num(x):
    return str(int(x)) if float(x).is_integer() else str(x)


SWITCH = Want("switch")
COUNT = Want("whole", lo=1)          # sizes, epochs, workers of prep
COUNT0 = Want("whole", lo=0)         # may be 0 (off / none)
POSITIVE = Want("number", above=0)   # learning rates, seconds, temperatures
NON_NEGATIVE = Want("number", lo=0)  # weights, decays, margins
FRACTION = Want("number", lo=0, below=1)        # ratios, dropouts: [0, 1)
PROPER_FRACTION = Want("number", above=0, below=1)
FACTOR = Want("number", above=0, hi=1)          # multiplicative decays: (0, 1]
SCALE_LOSS = Want("choice", choices=("l1", "l2", "infonce"))

# One table for every recipe: a rule applies where its key is a setting of the YAML.
RULES = {
    # running
    "seed": Want("whole"),
    "num_threads": Want("whole", lo=1, optional=True),
    "num_workers": COUNT0,
    "prep_workers": COUNT,
    "precision": Want("choice", choices=("fp32", "fp16", "bf16")),
    "nonfinite_patience": COUNT0,
    "ckpt_interval_minutes": NON_NEGATIVE,
    "ckpt_interval_steps": COUNT0,
    "ckpt_to_keep": COUNT,
    # optimisation
    "number_of_epochs": COUNT,
    "batch_size": COUNT,
    "eval_batch_size": COUNT,
    "lr": POSITIVE,
    "upstream_lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
    "grad_accumulation_factor": COUNT,
    "lr_total_steps": Want("whole", lo=1, optional=True),
    "lr_warmup_steps": Want("whole", lo=0, optional=True),
    "lr_warmup_fraction": FRACTION,
    "lr_decay_factor": FACTOR,
    "lr_annealing_factor": FACTOR,
    "lr_patience": COUNT0,
    "lr_floor": FACTOR,
    "early_stop_patience": COUNT,
    # data
    "sample_rate": COUNT,
    "min_duration": NON_NEGATIVE,
    "max_duration": Want("number", above=0, optional=True),
    "valid_fraction": PROPER_FRACTION,
    "data_format": Want("choice", choices=("manifest", "shards")),
    "shuffle_buffer": COUNT,
    "bucket_buffer": COUNT,
    "max_padding_ratio": Want("number", lo=0, hi=1),
    "max_batch_length": POSITIVE,
    "num_buckets": COUNT,
    "crop_seconds": POSITIVE,
    "n_views": Want("whole", lo=1, hi=2),
    "view_gap_seconds": NON_NEGATIVE,
    "view_gap_max_fraction": FRACTION,
    "view_length_jitter": FRACTION,
    "view_gain_db": NON_NEGATIVE,
    "view_eq": FRACTION,
    "view_gap_strict": SWITCH,
    "view_channel": SWITCH,
    "view_channel_knots": Want("whole", lo=2),
    "view_channel_eq_db": NON_NEGATIVE,
    "view_channel_gain_db": NON_NEGATIVE,
    "mask_copies": COUNT,
    "sorting": Want("choice", choices=("random", "ascending", "descending")),
    "test_session": Want("whole", lo=1, hi=5),
    "hop_length": COUNT,
    # features, encoder, heads
    **{k: COUNT for k in ("n_mels", "frame_stack", "d_model", "nhead", "num_layers", "d_ffn", "proj_dim",
                          "conv_pos_kernel", "conv_pos_groups", "bilstm_hidden", "bilstm_layers",
                          "lstm_hidden", "attentive_hidden_size", "xvector_emb_dim", "n_classes",
                          "output_neurons", "target_top_k_layers")},
    "lstm_layers": COUNT0,  # LibriSpeech: 0 is the linear CTC head
    "dropout": FRACTION,
    "layerdrop_prob": FRACTION,
    "bilstm_dropout": FRACTION,
    "layer": Want("whole", optional=True),
    "utterance_layer": Want("whole", choices=("branch",)),  # branch: the encoder's utterance branch
    "branch_layers": COUNT0,
    "branch_norm": Want("choice", choices=("layer", "batch")),
    "branch_input": Want("choice", choices=("shared", "own", "branch_only")),
    "trunk_adapter": Want("choice", choices=("linear", "mlp", "own_proj")),
    "trunk_projection_grad": Want("number", lo=0, hi=1),
    "utterance_pool": Want("choice", choices=("mean", "mean_std")),
    # scales
    **{f"{s}_weight": NON_NEGATIVE for s in ("frame", "phoneme", "word", "utterance")},
    **{f"{s}_loss": SCALE_LOSS for s in ("frame", "phoneme", "word")},
    "utterance_loss": Want("choice", choices=("l1", "l2", "infonce", "cosine")),  # cosine: BYOL's, teacher target
    **{f"{s}_temperature": POSITIVE for s in ("frame", "phoneme", "word", "utterance")},
    **{f"{s}_mask_ratio": FRACTION for s in ("frame", "phoneme", "word")},
    **{f"{s}_span_{m}_ms": POSITIVE for s in ("frame", "phoneme", "word") for m in ("min", "max")},
    **{f"{s}_negatives_{w}": COUNT0 for s in ("frame", "phoneme", "word") for w in ("same", "batch")},
    "target_mode": Want("choice", choices=("ema", "online")),
    "ema_start": Want("number", lo=0, hi=1),
    "ema_end": Want("number", lo=0, hi=1),
    "ema_anneal_fraction": Want("number", lo=0, hi=1),
    "ema_steps": Want("whole", lo=0, optional=True),
    # probes
    "exclude_trial_speakers": SWITCH,
    "aam_margin": NON_NEGATIVE,
    "aam_scale": POSITIVE,
    "convex_l2": NON_NEGATIVE,
    "dcf_p_target": PROPER_FRACTION,
    "dcf_c_miss": POSITIVE,
    "dcf_c_fa": POSITIVE,
    "token_type": Want("choice", choices=("char", "unigram", "bpe")),
    "character_coverage": FACTOR,
    "beam_size": COUNT0,
    # recipes/evaluate.py
    "seeds": Want("whole list", optional=True),
    "on_change": Want("choice", choices=("error", "rerun")),
}


# ----------------------------------------------------------------------------------------------
def read_utf8(path, hint="save the file as UTF-8"):
    """The text of a YAML file; a file that is not UTF-8 is a ValueError naming it (file:line) and ``hint``.

    (Here, not in :mod:`mgf_sb.recipe`, which imports this module: no import circle.)"""
    with open(path, "rb") as fin:
        raw = fin.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); {hint}") from None


def _yaml_text(hparams_file):
    return read_utf8(hparams_file)


def _show(v):
    """A value as it is written on the command line."""
    if isinstance(v, bool):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


def _plain(node):
    """A resolved YAML node as a plain Python value; ``_BUILT`` for a tagged (``!new:``...) node."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if tag is not None and str(tag).startswith("!"):
        return _BUILT
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, list):
        items = [_plain(x) for x in node]
        return _BUILT if any(x is _BUILT for x in items) else items
    if hasattr(node, "items"):
        items = {str(k): _plain(v) for k, v in node.items()}
        return _BUILT if any(x is _BUILT for x in items.values()) else items
    return _BUILT


_BUILT = object()  # a value made by !new:/!apply:/!name: (checked after the YAML is loaded, if at all)


def resolved_values(hparams_file, overrides=None):
    """``{key: value}``: the YAML's top-level values after ``overrides`` and ``!ref``, before anything is built.

    Values still to be built (``!new:``, ``!apply:``, ``!name:``) are left out.
    """
    from hyperpyyaml import resolve_references

    text = resolve_references(_yaml_text(hparams_file), overrides or None).getvalue()
    raw = YAML(typ="rt").load(text) or {}
    out = {}
    for k, v in raw.items():
        p = _plain(v)
        if p is not _BUILT and not str(k).startswith("__"):
            out[str(k)] = p
    return out


def check_override_keys(hparams_file, overrides):
    """Refuses an override whose key the YAML does not define; suggests the nearest keys.

    Arguments
    ---------
    hparams_file : str
    overrides : str
        The command line's overrides (YAML text, from ``sb.parse_arguments``).

    Raises
    ------
    UnknownSetting
        Naming each unknown key, its value, and "did you mean --<key>" (or where to look).
    """
    user = YAML(typ="rt").load(overrides) if overrides and overrides.strip() else None
    if not user or not hasattr(user, "keys"):
        return
    keys = [str(k) for k in (YAML(typ="rt").load(_yaml_text(hparams_file)) or {}).keys()]
    known = [k for k in keys if not k.startswith("__")]
    lines = []
    for k in user.keys():
        if str(k) in keys:
            continue
        near = difflib.get_close_matches(str(k), known, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join('--' + n for n in near)}?" if near else
                f"no setting of that name or close to it; the settings are the top-level keys of {hparams_file}")
        value = _plain(user[k])
        lines.append(f"  --{k}={'...' if value is _BUILT else _show(value)}: {hint}")
    if lines:
        raise UnknownSetting(f"{hparams_file} has no such setting (nothing was run):\n" + "\n".join(lines))


def _problems(values, defaults):
    """``[(key, value, Want)]`` of the values that break their rule (or their default's type)."""
    bad = []
    for key, value in values.items():
        want = RULES.get(key)
        if want is None:  # not in the table: the YAML default's type (a switch, or a number)
            default = defaults.get(key, _BUILT)
            if isinstance(default, bool):
                want = SWITCH
            elif isinstance(default, (int, float)):
                want = Want("number")
        if want is not None and not want.accepts(value):
            bad.append((key, value, want))
    return bad


def _report(hparams_file, bad, defaults):
    lines = []
    for key, value, want in bad:
        default = defaults.get(key, _BUILT)
        example = f", e.g. --{key}={_show(default)} (the YAML's default)" \
            if default is not _BUILT and want.accepts(default) else ""
        lines.append(f"  --{key}={_show(value)}: {key} must be {want.describe()}{example}")
    return (f"{hparams_file}: {len(bad)} setting{'s' if len(bad) > 1 else ''} with a bad value (nothing was "
            f"run); pass a valid value on the command line (or in the YAML):\n" + "\n".join(lines))


def check_settings(hparams_file, overrides):
    """Checks every setting's type and range, then the input data folder, before anything is built.

    Arguments
    ---------
    hparams_file : str
    overrides : str
        The overrides the YAML will be loaded with (command line + the sample block).

    Returns
    -------
    dict
        The resolved plain values (see :func:`resolved_values`).

    Raises
    ------
    BadSetting
        Naming each bad key, its value, what it must be and an example (the YAML's default).
    FileNotFoundError
        ``data_folder`` does not exist (when it is read: not with ``data_format: shards`` or
        ``skip_prep: True``), with the nearest existing names beside it.
    """
    defaults = resolved_values(hparams_file)
    values = resolved_values(hparams_file, overrides)
    bad = _problems(values, defaults)
    if bad:
        raise BadSetting(_report(hparams_file, bad, defaults))
    check_data_folder(values)
    return values


def check_built_settings(hparams, hparams_file):
    """The table's rules on values made at load (e.g. VoxCeleb's ``lr``, chosen by ``head``)."""
    values = {k: v for k, v in hparams.items() if k in RULES and _plain(v) is not _BUILT}
    bad = _problems(values, {})
    if bad:
        raise BadSetting(_report(hparams_file, bad, {}))


def check_data_folder(values):
    """``data_folder`` must exist when the recipe reads it; the error names the nearest existing names."""
    folder = values.get("data_folder")
    if not isinstance(folder, str) or values.get("data_format") == "shards" or values.get("skip_prep") is True:
        return
    if os.path.isdir(folder):
        return
    what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
    parent = os.path.dirname(os.path.abspath(folder))
    hint = ""
    if os.path.isdir(parent):
        names = [n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n))]
        near = difflib.get_close_matches(os.path.basename(os.path.normpath(folder)), names, n=3, cutoff=0.6)
        if near:
            hint = " (did you mean " + " or ".join(os.path.join(os.path.dirname(folder), n) for n in near) + "?)"
    else:
        hint = f" (nor does {parent})"
    raise FileNotFoundError(f"--data_folder={folder}: the data folder {what}{hint}; pass "
                            f"--data_folder=<the corpus folder>")


# ----------------------------------------------------------------------------------------------
# --help: a recipe's own settings
# ----------------------------------------------------------------------------------------------
def settings_help(hparams_file):
    """One line per top-level setting of the YAML: ``--key (default) description``.

    The description is the key's own comment, else the comment block just above it;
    keys built from others (``!ref``) are shown with their expression.
    """
    lines, out, block = read_utf8(hparams_file).splitlines(), [], []
    for line in lines:
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            block = [] if not text or set(text) <= set("-=# ") or text.startswith("----") else block + [text]
            continue
        m = re.match(r"^([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if not m:
            if not line.strip():
                block = []
            continue
        key, value, comment = m.groups()
        if key in ("sample_overrides",) or key.startswith("__"):
            block = []
            continue
        desc = comment or " ".join(block)
        desc = re.split(r"(?<!e\.g)(?<!i\.e)\. ", desc)[0].rstrip(".")  # the first sentence
        value = value or "{...}"
        out.append(f"  --{key}={value}" + (f"    {desc}" if desc else ""))
        block = []
    return "\n".join(out)


def recipe_help(argv, script_doc=None, default_yaml=None):
    """The text of a recipe's ``--help``: what it does, its usage, and one line per setting of its
    YAML (:func:`settings_help`), instead of SpeechBrain's generic run options.

    ``script_doc``: the recipe's docstring (its first paragraph is shown, and its first
    ``hparams/<name>.yaml`` is the YAML when ``argv`` names none).
    """
    doc = (script_doc or "").strip()
    yaml = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    if yaml is None:
        m = re.search(r"hparams/\w+\.ya?ml", doc) if doc else None
        yaml = default_yaml or (m.group(0) if m else None)
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "<recipe>"
    out = []
    if doc:
        out += [doc.split("\n\n")[0].strip(), ""]
    if yaml is None or not os.path.isfile(yaml):
        out += [f"usage: python {script} <hparams.yaml> [--<setting>=<value> ...]"]
        return "\n".join(out)
    out += [f"usage: python {script} {yaml} [--<setting>=<value> ...]", "",
            f"settings (from {yaml}; --<setting>=<value> overrides one, YAML syntax for lists and maps):",
            settings_help(yaml), "",
            "plus --on_change=stop|restart (a rerun with other settings: stop, or move the earlier run aside) and "
            "SpeechBrain's run options (--device, --precision, --distributed_backend, ...)."]
    return "\n".join(out)
