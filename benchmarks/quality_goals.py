"""The design goals of the issue "Hierarchy in the network", checked on one benchmark folder.

Each goal is read off what the benchmark already measured (the report's paired intervals and the
runs' last-epoch validation diagnostics), so that a method change is judged by one fixed list
instead of by the rows someone chose to quote. A goal is ``met``, ``not met`` (with by how much)
or ``not measured`` (a row it needs is missing, e.g. the speaker reference at the tiny budget).

Intervals are the report's (95 %, paired bootstrap over test items and seeds); "resolved above"
means the interval's lower end is above 0 (for EER: its upper end below 0).
"""

import os

import numpy as np

from mgf_sb.report import parse_train_log

PHONEME_MARGIN = 0.15  # student accuracy at least the context-only baseline + this (valid)
FRAME_RATIO = 0.8  # frame L1 at most this x the interpolation baseline's (valid)
UTTERANCE_EER_GAP = 10.0  # the utterance scale's zero-shot EER within this many points of the reference's
FULL_EER_GAP = 15.0  # full MGF's zero-shot EER within this many points of the reference's


def last_epoch_stats(folder, variant, seeds, slug, split="valid"):
    """Mean over seeds of the last epoch's ``split`` (train / valid) statistics of ``variant``'s runs
    in ``folder`` (``runs/<slug>/seed<k>/train_log.txt``) -> dict."""
    vals = {}
    for seed in seeds:
        path = os.path.join(folder, "runs", slug(variant), f"seed{seed}", "train_log.txt")
        if not os.path.isfile(path):
            continue
        rows = parse_train_log(path)
        for k, v in (rows[-1][split] if rows else {}).items():
            vals.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in vals.items()}


def _above(c, lower_is_better=False):
    """True when interval ``c`` (A - B) says A is resolved better than B."""
    if c is None:
        return None
    return bool(c["resolved"] and ((c["diff"] < 0) if lower_is_better else (c["diff"] > 0)))


def _not_below(c, lower_is_better=False):
    """True when A is not resolved worse than B."""
    if c is None:
        return None
    return not (c["resolved"] and ((c["diff"] > 0) if lower_is_better else (c["diff"] < 0)))


def _goal(name, ok, evidence):
    return {"goal": name, "status": "not measured" if ok is None else ("met" if ok else "NOT met"),
            "evidence": evidence}


def _fmt(c):
    if c is None:
        return "n/a"
    return f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def design_goals(folder, table, comparisons, vs_random, picks, seeds, slug, ref_row=None,
                 metrics=("phones", "speakers", "eer", "emotion")):
    """The issue's "Done when" list, each goal with its status and the numbers it rests on -> list of dict."""
    lower = {"eer"}
    goals = []
    for v in ("full MGF", "phoneme"):
        d = last_epoch_stats(folder, v, seeds, slug)
        if "phoneme_acc" in d and "phoneme_context_acc" in d:
            gap = d["phoneme_acc"] - d["phoneme_context_acc"]
            evidence = f"student {d['phoneme_acc']:.3f} - context {d['phoneme_context_acc']:.3f} = {gap:+.3f}"
            if "phoneme_self_context_acc" in d:
                # the same read-out of the student's own layers: the baseline is then the student minus its head
                evidence += f"; the student's own layers read the same way {d['phoneme_self_context_acc']:.3f}"
            if "phoneme_interp_acc" in d:
                evidence += (f"; no network (the visible neighbours' targets) {d['phoneme_interp_acc']:.3f}: "
                             f"student {d['phoneme_acc'] - d['phoneme_interp_acc']:+.3f} over it")
            goals.append(_goal(f"{v}: phoneme student >= its context-only baseline + {PHONEME_MARGIN} (valid)",
                               gap >= PHONEME_MARGIN, evidence))
    for v in ("full MGF", "frame"):
        d = last_epoch_stats(folder, v, seeds, slug)
        if "frame" in d and "frame_interp_l1" in d:
            ratio = d["frame"] / d["frame_interp_l1"]
            goals.append(_goal(f"{v}: frame L1 <= {FRAME_RATIO} x its interpolation baseline (valid)",
                               ratio <= FRAME_RATIO, f"{d['frame']:.3f} / {d['frame_interp_l1']:.3f} = {ratio:.2f}"))
    u = vs_random.get("utterance", {})
    for m in ("speakers", "emotion"):
        goals.append(_goal(f"utterance scale alone above random-init on {m} (resolved)",
                           _above(u.get(m)) if "utterance" in vs_random else None, _fmt(u.get(m))))
    has_ref = ref_row is not None and ref_row in table and table[ref_row].get("eer") is not None
    for v, gap in (("utterance", UTTERANCE_EER_GAP), ("full MGF", FULL_EER_GAP)):
        if v in table and has_ref:
            d = table[v]["eer"] - table[ref_row]["eer"]
            goals.append(_goal(f"{v}: zero-shot EER within {gap:.0f} points of the speaker reference's",
                               d <= gap, f"{table[v]['eer']:.1f} vs {table[ref_row]['eer']:.1f} ({d:+.1f} points)"))
        else:
            goals.append(_goal(f"{v}: zero-shot EER within {gap:.0f} points of the speaker reference's", None,
                               "no speaker reference row"))
    r = vs_random.get("full MGF", {})
    goals.append(_goal("full MGF: zero-shot EER resolved below random-init's",
                       _above(r.get("eer"), True) if "full MGF" in vs_random else None, _fmt(r.get("eer"))))
    goals.append(_goal("full MGF above random-init on every axis (resolved)",
                       all(_above(r.get(m), m in lower) for m in metrics) if "full MGF" in vs_random else None,
                       "; ".join(f"{m} {_fmt(r.get(m))}" for m in metrics)))
    for kind in ("single", "pair"):
        best = picks.get(kind)
        c = comparisons.get(best) or {}
        ok = None if not c else (all(_not_below(c.get(m), m in lower) for m in metrics)
                                 and any(_above(c.get(m), m in lower) for m in metrics))
        goals.append(_goal(f"full MGF at or above the best {kind} ({best}, chosen on dev) on every axis and above it "
                           "on one (resolved)", ok, "; ".join(f"{m} {_fmt(c.get(m))}" for m in metrics)))
    c = comparisons.get("fbank+-5", {}).get("phones")
    goals.append(_goal("full MGF above fbank +-5 on phones (resolved)", _above(c), _fmt(c)))
    return goals


def goals_markdown(goals):
    """The goals as a report section (list of lines)."""
    n_met = sum(g["status"] == "met" for g in goals)
    lines = [f"Design goals (issue \"Hierarchy in the network\"; {n_met} of {len(goals)} met; the numbers each rests "
             "on: minus = the first named minus the other, 95 % interval):", "",
             "| goal | status | evidence |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['status']} | {g['evidence']} |" for g in goals]
    return lines + [""]
