"""CSV manifests and skip reports, written the same way by every prep script.

Every manifest has the columns ``ID, duration, wav`` followed by the task's
labels. Every prep reports skipped files in ``<name>_skipped.tsv``
(``path<TAB>reason``; a tab, newline or backslash inside a field is written
``\\t``, ``\\n``, ``\\\\``) and counts them in the log.
"""

import csv
import json
import logging
import os
import re
from collections import Counter

logger = logging.getLogger(__name__)

BASE_COLUMNS = ["ID", "duration", "wav"]


def write_manifest(rows, path, extra_columns=()):
    """Writes rows (dicts with ID, duration, wav + extra columns) atomically."""
    columns = BASE_COLUMNS + [c for c in extra_columns if c not in BASE_COLUMNS]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            out = dict(row)
            out["duration"] = f"{float(out['duration']):.3f}"
            w.writerow({c: out[c] for c in columns})
    os.replace(tmp, path)
    logger.info(f"wrote {len(rows)} rows to {path}")


def read_manifest(path):
    """Reads a manifest back as a list of dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_field(text):
    r"""One TSV field: backslash, tab, newline and carriage return written as ``\\``, ``\t``, ``\n``, ``\r``.

    Example
    -------
    >>> escape_field("a\tb\nc")
    'a\\tb\\nc'
    """
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def unescape_field(text):
    """Inverse of :func:`escape_field`."""
    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(0)), text)


def read_skip_list(path):
    """``[(path, reason)]`` of a ``*_skipped.tsv`` written by :class:`SkipReport` (unescaped)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        next(f, None)
        rows = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    return [(unescape_field(p), unescape_field(r)) for p, r in rows]


def check_disjoint(splits, key="wav"):
    """Raises ValueError if one audio file is in two splits (the last check of every prep).

    Arguments
    ---------
    splits : dict
        ``{split name: rows}``; each row's ``key`` is an audio path. Files are
        compared by identity (:func:`mgf_sb.data.audio.file_identity`: symlinks
        and hard links too), not by name.
    """
    from mgf_sb.data.audio import file_identity

    where = {}
    for name, rows in splits.items():
        for row in rows:
            ident = file_identity(row[key])
            first = where.setdefault(ident, (name, row[key]))
            if first[0] != name:
                raise ValueError(
                    f"{row[key]} is in both the {first[0]} split ({first[1]}) and the {name} split: a file "
                    f"must be in one split only (a symlink or a duplicated file in the corpus?)"
                )


class SkipReport:
    """Collects skipped files with a reason; writes them and logs the counts.

    Example
    -------
    >>> r = SkipReport("demo")
    >>> r.add("a.wav", "empty (zero samples)")
    >>> len(r)
    1
    """

    def __init__(self, name):
        self.name = name
        self.items = []
        self.notes = []

    def add(self, path, reason):
        self.items.append((path, reason))

    def note(self, path, what):
        """A file that was kept but changed (resampled, downmixed...)."""
        self.notes.append((path, what))

    def __len__(self):
        return len(self.items)

    def counts(self):
        """{reason category: count}; the category is the text before '('."""
        return Counter(r.split(" (")[0] for _, r in self.items)

    def write(self, folder, log=True):
        """Writes ``<name>_skipped.tsv`` (and ``<name>_converted.tsv``); logs a summary unless ``log``
        is False (a caller that adds to the list and writes it again logs the final one)."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{self.name}_skipped.tsv")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("path\treason\n")
            for p, r in self.items:
                f.write(f"{escape_field(p)}\t{escape_field(r)}\n")
        if self.notes:
            with open(os.path.join(folder, f"{self.name}_converted.tsv"), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write("path\tconversion\n")
                for p, r in self.notes:
                    f.write(f"{escape_field(p)}\t{escape_field(r)}\n")
            if log:
                logger.info(f"{self.name}: {len(self.notes)} files converted (listed in {self.name}_converted.tsv)")
        if log and self.items:
            summary = ", ".join(f"{n} {k}" for k, n in self.counts().most_common())
            logger.warning(f"{self.name}: skipped {len(self.items)} files ({summary}); see {path}")
        elif log:
            logger.info(f"{self.name}: no file skipped")
        return path


def prep_is_done(save_folder, name, options):
    """True when ``name``'s outputs exist and were made with the same options.

    The options are stored next to the outputs (``<name>_opts.json``), so
    changing any of them re-runs the preparation (SpeechBrain's ``skip`` idiom).
    """
    path = os.path.join(save_folder, f"{name}_opts.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        try:
            return json.load(f) == json.loads(json.dumps(options))
        except json.JSONDecodeError:
            return False


def mark_prep_done(save_folder, name, options):
    """Records the options of a finished preparation (written last)."""
    os.makedirs(save_folder, exist_ok=True)
    with open(os.path.join(save_folder, f"{name}_opts.json"), "w") as f:
        json.dump(options, f, indent=2, sort_keys=True)
