#!/usr/bin/env python3
"""IEMOCAP leave-one-session-out: all five folds, then mean +- std of UA and WA.

    python recipes/IEMOCAP/run_folds.py hparams/emotion.yaml [overrides] [--sessions=1,2,3,4,5]

Runs ``recipes/IEMOCAP/train.py`` once per test session (each in its own
process, with ``--test_session=<n>`` added to the overrides; every other
override is passed on unchanged), then reads each fold's
``test_results.json`` and writes ``<experiment_folder>/folds_results.{json,md}``:
per-fold UA/WA, their mean and standard deviation over folds (population std,
ddof=0), the confusion matrix summed over the folds, the ``head`` and, when the
folds computed it, the convex reference (UA of a full-batch logistic regression
on the same pooled features) per fold and its mean and std. Re-running resumes:
a finished fold says ``finished: ...`` and does nothing (:mod:`mgf_sb.finished`).
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from iemocap_prepare import CLASSES, SESSIONS  # noqa: E402

from mgf_sb.downstream import write_results  # noqa: E402

logger = logging.getLogger(__name__)


def aggregate_folds(fold_results):
    """Mean and std (ddof=0) of UA and WA over folds, plus the summed confusion.

    Arguments
    ---------
    fold_results : list of dict
        Each with ``test_session``, ``UA``, ``WA`` (fractions) and optionally
        ``confusion`` and ``n_utterances`` (as in a fold's test_results.json).

    Example
    -------
    >>> r = aggregate_folds([{"test_session": 1, "UA": 0.5, "WA": 0.6}, {"test_session": 2, "UA": 0.7, "WA": 0.8}])
    >>> round(r["UA_mean"], 3), round(r["UA_std"], 3), round(r["WA_mean"], 3)
    (0.6, 0.1, 0.7)
    """
    if not fold_results:
        raise ValueError("no fold results to aggregate")
    ua = np.array([float(r["UA"]) for r in fold_results])
    wa = np.array([float(r["WA"]) for r in fold_results])
    out = {
        "n_folds": len(fold_results),
        "folds": [{"test_session": int(r["test_session"]), "UA": float(r["UA"]), "WA": float(r["WA"]),
                   "n_utterances": r.get("n_utterances"), "convex_reference": r.get("convex_reference")}
                  for r in fold_results],
        "UA_mean": float(ua.mean()), "UA_std": float(ua.std()),
        "WA_mean": float(wa.mean()), "WA_std": float(wa.std()),
        "std": "population standard deviation over folds (ddof=0)",
        "classes": list(CLASSES),
    }
    if all(r.get("convex_reference") is not None for r in fold_results):
        ref = np.array([float(r["convex_reference"]) for r in fold_results])
        out["convex_reference_mean"], out["convex_reference_std"] = float(ref.mean()), float(ref.std())
    if all("confusion" in r for r in fold_results):
        out["confusion_sum"] = np.sum([np.asarray(r["confusion"]) for r in fold_results], axis=0).tolist()
    for key in ("upstream", "freeze", "layer", "head"):
        values = {json.dumps(r.get(key)) for r in fold_results}
        if len(values) == 1 and key in fold_results[0]:
            out[key] = fold_results[0][key]
    return out


def folds_markdown(agg):
    """The results table (percentages)."""
    lines = ["# IEMOCAP emotion, leave-one-session-out", ""]
    if "upstream" in agg:
        lines += [f"upstream: `{agg['upstream']}` (freeze={agg.get('freeze')}, layer={agg.get('layer')}), "
                  f"head: {agg.get('head')}", ""]
    convex = "convex_reference_mean" in agg
    lines += ["| test session | UA (%) | WA (%) | utterances |" + (" convex reference UA (%) |" if convex else ""),
              "|---|---|---|---|" + ("---|" if convex else "")]
    for f in agg["folds"]:
        lines.append(f"| {f['test_session']} | {100 * f['UA']:.2f} | {100 * f['WA']:.2f} | {f['n_utterances']} |"
                     + (f" {100 * f['convex_reference']:.2f} |" if convex else ""))
    lines.append(f"| **mean ± std** | **{100 * agg['UA_mean']:.2f} ± {100 * agg['UA_std']:.2f}** | "
                 f"**{100 * agg['WA_mean']:.2f} ± {100 * agg['WA_std']:.2f}** | |"
                 + (f" {100 * agg['convex_reference_mean']:.2f} ± {100 * agg['convex_reference_std']:.2f} |"
                    if convex else ""))
    lines += ["", f"std: {agg['std']}."]
    if convex:
        lines += ["", "Convex reference: full-batch class-balanced logistic regression on the same pooled "
                      "features (mean+std of the layer mix the probe learned), fitted on each fold's training "
                      "sessions; a probe far below it is under-trained."]
    if "confusion_sum" in agg:
        lines += ["", "Confusion matrix summed over the folds (rows: reference, columns: prediction):", "",
                  "| reference \\ predicted | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
        for c, row in zip(CLASSES, agg["confusion_sum"]):
            lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def fold_folders(hparams_file, argv, session):
    """(output_folder, experiment_folder) of one fold, as train.py will compute them."""
    _, _, overrides = sb.parse_arguments([hparams_file] + argv + [f"--test_session={session}"])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    return hparams["output_folder"], hparams["experiment_folder"]


def run_folds(hparams_file, argv, sessions=SESSIONS, train_script=os.path.join(HERE, "train.py")):
    """Trains/evaluates each fold, aggregates, writes the table; returns the aggregate."""
    results, experiment_folder, seen = [], None, set()
    for i, s in enumerate(sessions, 1):
        output_folder, experiment_folder = fold_folders(hparams_file, argv, s)
        if output_folder in seen:
            raise ValueError(f"every fold would write to {output_folder}: pass --experiment_folder=... "
                             f"(each fold goes to <experiment_folder>/session<n>) instead of --output_folder")
        seen.add(output_folder)
        cmd = [sys.executable, train_script, hparams_file] + argv + [f"--test_session={s}"]
        print(f"[fold {i}/{len(sessions)}] test session {s} -> {output_folder}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            raise RuntimeError(f"fold test_session={s} failed (exit {rc}): {' '.join(cmd)}; "
                               f"see {os.path.join(output_folder, 'log.txt')}")
        with open(os.path.join(output_folder, "test_results.json")) as f:
            results.append(json.load(f))
    agg = aggregate_folds(results)
    if experiment_folder:
        write_results(experiment_folder, "folds_results", agg, folds_markdown(agg))
        agg["table"] = os.path.join(experiment_folder, "folds_results.md")
    print(folds_markdown(agg), flush=True)
    print(f"results table: {agg.get('table')} (+ .json)", flush=True)
    return agg


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    hparams_file, rest = argv[0], argv[1:]
    sessions, passed = list(SESSIONS), []
    for a in rest:
        if a.startswith("--sessions="):
            sessions = [int(x) for x in a.split("=", 1)[1].strip("[]").split(",") if x.strip()]
        elif a.startswith("--test_session"):
            print(f"run_folds.py sets --test_session itself; ignoring {a}", file=sys.stderr)
        else:
            passed.append(a)
    bad = [s for s in sessions if s not in SESSIONS]
    if bad:
        sys.exit(f"--sessions must be among {SESSIONS}, got {bad}")
    run_folds(hparams_file, passed, sessions)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s - %(message)s")  # the folds' (SpeechBrain's) format
    main(sys.argv[1:])
