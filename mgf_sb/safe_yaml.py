"""A model folder's ``hyperparams.yaml``, checked before HyperPyYAML evaluates it.

:func:`check_hparams_safe` refuses a YAML that could run code (anything but plain values, ``!ref``
and ``!new:``/``!name:`` of allowed classes and functions), naming the line;
:func:`read_hparams_text` reads it as UTF-8. Split out of :mod:`mgf_sb.inference`, which
re-exports these names and calls them from ``from_hparams``.
"""

import re

import yaml

from mgf_sb.settings import read_utf8

EXPORT_HINT = "Export (or re-export) the trained folder with `python -m mgf_sb.export <trained folder> <model folder>`."


# ----------------------------------------------------------------------------------------------
# hyperparams.yaml: read as UTF-8, checked before HyperPyYAML evaluates it
# ----------------------------------------------------------------------------------------------
# What a model folder's hyperparams.yaml may contain (unless from_hparams(trust_code=True)):
# plain YAML values, `!ref`, `!new:` of a class and `!name:` of a class from these modules, and
# `!name:` of a function from SAFE_FUNCTION_MODULES (the Pretrainer hooks).
SAFE_CLASS_MODULES = ("mgf_sb", "speechbrain.nnet", "speechbrain.lobes.features", "speechbrain.processing",
                      "speechbrain.dataio.encoder", "speechbrain.utils.parameter_transfer")
SAFE_FUNCTION_MODULES = ("mgf_sb.inference",)
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class UnsafeModelFolder(ValueError):
    """A model folder's hyperparams.yaml would run code that is not allowed (message: file:line)."""


def _in_modules(module, prefixes):
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _check_target(kind, name, where):
    """``!new:``/``!name:`` target -> None if allowed, else raises :class:`UnsafeModelFolder`."""
    import inspect
    import pydoc

    allowed = "classes from " + ", ".join(SAFE_CLASS_MODULES)
    if kind == "!name:":
        allowed += " or functions from " + ", ".join(SAFE_FUNCTION_MODULES)
    modules = SAFE_CLASS_MODULES + (SAFE_FUNCTION_MODULES if kind == "!name:" else ())
    if not _DOTTED.match(name) or not _in_modules(name.rsplit(".", 1)[0], modules):
        raise UnsafeModelFolder(f"{where}: {kind}{name} is not allowed in a model folder (only {allowed})")
    try:
        obj = pydoc.locate(name)  # imports an allowed module only (checked above)
    except Exception as e:
        raise UnsafeModelFolder(f"{where}: {kind}{name} cannot be imported ({e})") from None
    module = getattr(obj, "__module__", None) or ""
    ok = (inspect.isclass(obj) and _in_modules(module, SAFE_CLASS_MODULES)) or (
        kind == "!name:" and inspect.isfunction(obj) and _in_modules(module, SAFE_FUNCTION_MODULES))
    if not ok:
        what = "nothing" if obj is None else f"{type(obj).__name__} from {module or '?'}"
        raise UnsafeModelFolder(f"{where}: {kind}{name} ({what}) is not allowed in a model folder (only {allowed})")


def check_hparams_safe(text, path):
    """Refuses a model-folder YAML that could run code, before HyperPyYAML evaluates it.

    Allowed: plain YAML values (strings, numbers, booleans, null, lists,
    mappings), ``!ref`` (references and arithmetic), ``!new:`` / ``!name:`` of
    a class from :data:`SAFE_CLASS_MODULES`, and ``!name:`` of a function from
    :data:`SAFE_FUNCTION_MODULES`. Anything else (``!apply:``, ``!module:``,
    ``!include:``, ``!copy``, ``!tuple``, ``!!python/...``, a function or class
    from any other module: ``!name:os.system``...) raises
    :class:`UnsafeModelFolder` naming ``file:line``.

    Arguments
    ---------
    text : str
        The file's content.
    path : str
        For messages.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    stack, seen = [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        tag, where = node.tag, f"{path}:{node.start_mark.line + 1}"
        if tag in _PLAIN_TAGS or tag == "!ref":
            pass
        elif tag.startswith(("!new:", "!name:")):
            kind, name = tag.split(":", 1)
            _check_target(kind + ":", name, where)
        else:
            raise UnsafeModelFolder(
                f"{where}: the tag {tag} is not allowed in a model folder (it could run code when loaded). "
                f"Allowed: plain values, !ref, !new:/!name: of classes from {', '.join(SAFE_CLASS_MODULES)}. "
                f"Load a folder you trust with from_hparams(..., trust_code=True)."
            )
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack += [k, v]
        elif isinstance(node, yaml.SequenceNode):
            stack += list(node.value)


def read_hparams_text(path):
    """A model folder's hyperparams.yaml as text; not UTF-8 -> ValueError naming the file."""
    return read_utf8(path, hint=f"the file is damaged or was saved in another encoding. {EXPORT_HINT}")
