"""CSV manifests and skip reports, written the same way by every prep script.

Every manifest has the columns ``ID, duration, wav`` followed by the task's
labels. Every prep reports skipped files in ``<name>_skipped.tsv``
(``path<TAB>reason``) and counts them in the log.
"""

import csv
import json
import logging
import os
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

    def write(self, folder):
        """Writes ``<name>_skipped.tsv`` (and ``<name>_converted.tsv``); logs a summary."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{self.name}_skipped.tsv")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("path\treason\n")
            for p, r in self.items:
                f.write(f"{p}\t{r}\n")
        if self.notes:
            with open(os.path.join(folder, f"{self.name}_converted.tsv"), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write("path\tconversion\n")
                for p, r in self.notes:
                    f.write(f"{p}\t{r}\n")
            logger.info(f"{self.name}: {len(self.notes)} files converted (listed in {self.name}_converted.tsv)")
        if self.items:
            summary = ", ".join(f"{n} {k}" for k, n in self.counts().most_common())
            logger.warning(f"{self.name}: skipped {len(self.items)} files ({summary}); see {path}")
        else:
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
