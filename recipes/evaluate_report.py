"""``recipes/evaluate.py``'s report: collect the finished steps' results, aggregate them over
seeds and folds, and write ``report.md`` (opening with the verdict per task), ``report.json``
and the plots (:mod:`mgf_sb.report` draws them).
"""

import json
import os
import platform
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from evaluate_tasks import SCALES, SHORT, TASKS, probe_name, step_output, task_heads  # noqa: E402
from mgf_sb.grid import fmt_seconds as _fmt_s  # noqa: E402
from mgf_sb.grid import read_mark  # noqa: E402
from mgf_sb.recipe import is_bundled_sample  # noqa: E402
from mgf_sb.report import (  # noqa: E402
    bar_chart_png,
    column_ranks,
    layer_weights_png,
    loss_curves_png,
    markdown_table,
    mean_ranks,
    mean_std,
    parse_train_log,
    ranking_changes,
    ranking_text,
    verdict_lines,
)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def collect_runs(steps, status):
    """(row, task, head) -> the metrics of each finished seed; row -> note for cells without a value."""
    runs, notes = {}, {}
    for s in steps:
        if s.kind != "probe":
            continue
        runs.setdefault((s.row, s.task, s.head), [])
        try:
            runs[(s.row, s.task, s.head)].append(step_output(s))
        except Exception:
            st = status.get(s.name, "missing")
            if st != "done":
                notes.setdefault(s.row, st)
    return runs, notes


def _spread_values(got, key):
    """Every sample of ``key`` over the seeds: a run's folds when it has them, else its value."""
    values = []
    for r in got:
        samples = (r.get("_samples") or {}).get(key)
        values += list(samples) if samples else ([r[key]] if r.get(key) is not None else [])
    return values


def aggregate(runs):
    """Mean ± std over seeds (and IEMOCAP folds) of every probe -> ``results`` and ``layer_weights``.

    Returns
    -------
    results : dict
        row -> {``<metric>/<head>``: mean, ``<metric>/<head>_std``: std (when more than one
        sample), ``<metric>/<head>_n``: samples, ``<metric>/convex``: the convex reference};
        the first head's values are also under the bare ``<metric>`` keys (as before heads).
    layer_weights : dict
        row -> {"<task>/<head>": mean layer weights over seeds and folds}.
    """
    results, weights, seen = {}, {}, set()
    for (row, t, head), got in runs.items():  # in plan order: a row's first head of a task comes first
        out = results.setdefault(row, {})
        first = (row, t) not in seen
        seen.add((row, t))
        if not got:
            continue
        task = TASKS[t]
        for c in task.columns:
            mean, std, n = mean_std(_spread_values(got, c.key))
            if mean is None:
                continue
            if n == 1 and len(got) == 1 and got[0].get(c.key + "_std") is not None:
                std, n = got[0][c.key + "_std"], 0  # a spread the recipe computed (old folds files)
            key = f"{c.key}/{head}" if head else c.key
            out[key], out[key + "_n"] = mean, n
            if n != 1 and std is not None:
                out[key + "_std"] = std
            if first and head:
                out[c.key] = mean
                if key + "_std" in out:
                    out[c.key + "_std"] = out[key + "_std"]
            conv = task.convex.get(c.key)
            if conv and first:
                cmean, cstd, cn = mean_std(_spread_values(got, conv))
                if cmean is not None:
                    out[f"{c.key}/convex"] = cmean
                    if cn > 1:
                        out[f"{c.key}/convex_std"] = cstd
        for extra in ("wer_split", "n_folds"):
            if got[0].get(extra) is not None:
                out[extra] = got[0][extra]
        lw = [w for r in got for w in (r.get("_layer_weights") or []) if isinstance(w, list) and len(w) > 1]
        lw = [w for w in lw if len(w) == len(lw[0])] if lw else []
        if lw:
            weights.setdefault(row, {})[probe_name(t, head)] = [float(v) for v in np.mean(np.array(lw, float), 0)]
    return results, weights


def head_columns(tasks, hp, ablation=False, convex=True):
    """Columns ``<metric>/<head>`` (the heads of a metric side by side) + unranked convex references."""
    cols = []
    for t in tasks:
        heads = task_heads(hp, t, ablation)
        for c in TASKS[t].columns:
            for h in heads:
                label = f"{c.label} · {h}" if h else c.label
                cols.append(c.like(f"{c.key}/{h}" if h else c.key, label))
            if convex and c.key in TASKS[t].convex:
                cols.append(c.like(f"{c.key}/convex", f"{c.label} · convex ref", ranked=False))
    return cols


def _has_values(results, rows, col):
    return any(results.get(r, {}).get(col.key) is not None for r in rows)


def spread_notes(tasks, hp, results, rows):
    """task -> how its ± is measured (one seed: no spread; the table says so)."""
    seeds = list(hp.get("seeds") or [])
    notes = {}
    for t in tasks:
        task = TASKS[t]
        if task.spread == "folds":
            n_folds = next((results[r].get("n_folds") for r in rows if results.get(r, {}).get("n_folds")), 5)
            notes[t] = f"± std over {n_folds} folds" + (f" × {len(seeds)} seeds {seeds}" if len(seeds) > 1 else "")
        elif len(seeds) > 1:
            notes[t] = f"± std over {len(seeds)} seeds {seeds}"
        else:
            notes[t] = (f"one seed ({seeds[0] if seeds else 'the recipe default'}): **no spread**; "
                        "pass --seeds='[1986, 1987]' for mean ± std over seeds")
    return notes


def head_rankings(results, tasks, hp, rows):
    """Per metric: the ranking under each head and whether (and how) it changes."""
    out, md = {}, []
    for t in tasks:
        heads = task_heads(hp, t)
        for c in TASKS[t].columns:
            cols = [c.like(f"{c.key}/{h}" if h else c.key, f"{c.label} · {h}") for h in heads]
            cols = [x for x in cols if _has_values(results, rows, x)]
            if not cols:
                continue
            ch = ranking_changes(results, cols, rows)
            entry = {"orders": ch["orders"], "changed": ch["changed"],
                     "swaps": [{"rows": [a, b], "columns": [k1, k2], "within_spread": w}
                               for a, b, k1, k2, w in ch["swaps"]],
                     "text": {x.key: ranking_text(results, x, rows) for x in cols}}
            for x in cols:
                md.append(f"| {c.label} | {x.key.split('/', 1)[1] if '/' in x.key else '—'} | {entry['text'][x.key]} |")
            both = [r for r in rows if all(results.get(r, {}).get(x.key) is not None for x in cols)]
            if len(cols) < 2 or len(both) < 2:
                entry["summary"] = f"{c.label}: nothing to compare yet (fewer than two heads or upstreams with results)"
            elif not ch["changed"]:
                entry["summary"] = f"{c.label}: no two upstreams swap places between {' and '.join(heads)}."
            else:
                parts = []
                for a, b, k1, k2, w in ch["swaps"]:
                    h1, h2 = k1.split("/", 1)[1], k2.split("/", 1)[1]
                    std_known = any(results[r].get(k + "_std") is not None for r in (a, b) for k in (k1, k2))
                    why = ("a difference smaller than the spread: not a real change" if w else
                           "beyond the spread" if std_known else "no spread measured (one seed)")
                    parts.append(f"{a} and {b} swap places between {h1} and {h2} ({why})")
                entry["summary"] = f"{c.label}: **the ranking changes**: " + "; ".join(parts) + "."
            out[c.key] = entry
    return out, md


def mean_rank_by_head(results, tasks, hp, rows):
    """Mean rank of each row over the i-th head of every task (i = 1, 2, ...): label -> {row: rank}."""
    n = max((len(task_heads(hp, t)) for t in tasks), default=0)
    out = {}
    for i in range(n):
        cols, names = [], []
        for t in tasks:
            heads = task_heads(hp, t)
            if i < len(heads) and heads[i]:
                names.append(heads[i]) if heads[i] not in names else None
                cols += [c.like(f"{c.key}/{heads[i]}", c.label) for c in TASKS[t].columns]
        cols = [c for c in cols if _has_values(results, rows, c)]
        if cols:
            out[f"head {i + 1}: {', '.join(names)}"] = mean_ranks(results, cols, rows)
    return out


def pretrain_logs(steps, hp, sources):
    """variant -> train_log.txt path (pretraining steps; the given folder's run if next to it)."""
    logs = {}
    for s in steps:
        if s.kind == "pretrain":
            logs[s.row] = os.path.join(s.folder, "train_log.txt")
    given = hp.get("pretrained")
    if given:
        cand = os.path.join(os.path.dirname(os.path.abspath(given).rstrip(os.sep)), "train_log.txt")
        logs.setdefault("mgf", cand)
    return {k: v for k, v in logs.items() if os.path.isfile(v)}


def loss_panels(entries):
    """Train-log entries -> {panel: {"train"/"valid": (epochs, values)}} for each scale + total."""
    panels = {}
    keys = [k for k in SCALES if any(k in e["train"] for e in entries)] + ["loss"]
    for k in keys:
        series = {}
        for stage in ("train", "valid"):
            pts = [(e["epoch"], e[stage][k]) for e in entries if k in e[stage]]
            if pts:
                series[stage] = ([p[0] for p in pts], [p[1] for p in pts])
        panels["total" if k == "loss" else k] = series
    return panels


def _bars(path, results, columns, rows, title):
    """Grouped bars of the ranked columns (one group per metric × head), error bars = std."""
    cols = [c for c in columns if c.ranked and _has_values(results, rows, c)]
    if not cols:
        return None
    groups = [SHORT.get(c.key.split("/")[0], c.key.split("/")[0]) + ("\n" + c.key.split("/", 1)[1] if "/" in c.key
                                                                      else "") for c in cols]
    return bar_chart_png(path, groups, {r: [results.get(r, {}).get(c.key) for c in cols] for r in rows},
                         errors={r: [results.get(r, {}).get(c.key + "_std") for c in cols] for r in rows},
                         title=title, ylabel="%", lower_better=[not c.higher_better for c in cols])


def write_report(hp, steps, rows, sources, status, wall_seconds, log=print):
    out = os.path.abspath(hp["output_folder"])
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    tasks = list(hp["tasks"])
    runs, notes = collect_runs(steps, status)
    results, layer_weights = aggregate(runs)
    main_rows = rows["main"]
    main = {r: results.get(r, {}) for r in main_rows}
    columns = [c for c in head_columns(tasks, hp) if c.ranked or _has_values(main, main_rows, c)]
    ranked = [c for c in columns if c.ranked]
    main_ranks = mean_ranks(main, ranked, main_rows) if len(main_rows) > 1 else None
    spreads = spread_notes(tasks, hp, main, main_rows)
    rankings, ranking_md = head_rankings(main, tasks, hp, main_rows)
    by_head = mean_rank_by_head(main, tasks, hp, main_rows)
    report = {
        "tasks": tasks, "columns": [c.to_dict() for c in columns],
        "heads": {t: task_heads(hp, t) for t in tasks}, "seeds": list(hp.get("seeds") or []), "spread": spreads,
        "main": {"rows": main_rows, "results": main, "mean_rank": main_ranks,
                 "column_ranks": column_ranks(main, ranked, main_rows), "sources": {r: sources.get(r) for r in main_rows},
                 "head_rankings": rankings, "mean_rank_by_head": by_head},
        "layer_weights": layer_weights,
        "data": {k: os.path.abspath(hp[k]) for k in ("pretrain_data_folder",) + tuple(TASKS[t].corpus for t in tasks)},
        "pretrained": sources.get("mgf"),
        "steps": {}, "plots": [],
    }
    report["bundled_sample"] = any(is_bundled_sample(v) for v in report["data"].values())
    total = 0.0
    for s in steps:
        mark = read_mark(s) or {}
        report["steps"][s.name] = {"status": status.get(s.name), "folder": s.folder, "seconds": mark.get("seconds"),
                                   "command": " ".join(s.command[1:])}
        total += mark.get("seconds") or 0.0
    report["timing"] = {"steps_seconds_total": round(total, 1), "this_run_wall_seconds": round(wall_seconds, 1),
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, "
                                   f"num_threads={hp.get('num_threads')}, {platform.platform()}"}

    md = ["# MGF evaluation report", ""]
    if report["bundled_sample"]:
        md += ["**Bundled sample corpora (synthetic speech, tiny models): these numbers only show that the "
               "pipeline runs; they say nothing about the method.**", ""]
    if "mgf" in main_rows and len(main_rows) > 1:
        groups = [(TASKS[t].title, [c for c in ranked if c.key.split("/")[0] in {x.key for x in TASKS[t].columns}])
                  for t in tasks]
        verdict = verdict_lines(main, groups, "mgf", [r for r in main_rows if r != "mgf"])
        report["verdict"] = verdict
        md += ["## Verdict: MGF against each baseline, per task", "",
               "`better` / `worse`: by more than the spread (the larger std over seeds or folds); `level`: "
               "within it. Without a spread (one seed) every difference counts, however small.", ""]
        md += [line if line.startswith("- ") else "\n" + line for line in verdict] + [""]
    md += ["## Upstreams × tasks", "", markdown_table(main, columns, main_rows, "upstream", main_ranks, notes), "",
           "↑ higher is better, ↓ lower is better; best value in bold (not when it is no better than a useless "
           "model: a WER of 100 % or more, an EER of 50 %); `metric · head`: the same task with "
           "each downstream head, side by side. `≈`: the difference to the column's best is smaller than the "
           "spread (the larger of the two std): not a real difference. Mean rank: average over the ranked "
           "columns of each row's rank (1 = best; ties share their mean rank)."]
    md += ["", "Spread (population std):", ""] + [f"- {TASKS[t].title}: {spreads[t]}" for t in tasks]
    if any(c.key.endswith("/convex") for c in columns):
        md += ["", "`convex ref`: a full-batch logistic regression on the same pooled features, written by the "
                   "recipe beside its probe: a head far below it is under-trained. Not ranked."]
    ls_split = {r: main[r].get("wer_split") for r in main_rows if main[r].get("wer_split")}
    if ls_split:
        md += ["", f"LibriSpeech WER on {', '.join(sorted(set(ls_split.values())))} (beam search when enabled)."]
    md += ["", "Upstream sources:", ""] + [f"- `{r}`: `{sources.get(r)}`" for r in main_rows]
    if ranking_md and len(main_rows) > 1:
        md += ["", "## Rank of each upstream under each head", "",
               "| metric | head | ranking, best first (`≈`: difference smaller than the spread) |", "|---|---|---|"]
        md += ranking_md + [""] + [f"- {v['summary']}" for v in rankings.values() if "summary" in v]
        if len(by_head) > 1:
            md += ["", "Mean rank over the tasks under each task's first / second head:", "",
                   "| upstream | " + " | ".join(by_head) + " |", "|---|" + "---|" * len(by_head)]
            for r in main_rows:
                md.append(f"| {r} | " + " | ".join("—" if by_head[k].get(r) is None else f"{by_head[k][r]:.2f}"
                                                   for k in by_head) + " |")

    plot_files = []
    p = _bars(os.path.join(plots, "tasks_by_upstream.png"), main, columns, main_rows,
              "Tasks per upstream and head (%; EER, WER: lower is better; error bars: std)")
    if p:
        plot_files.append(p)

    if rows["ablation"]:
        abl_tasks = [t for t in (hp.get("ablation_tasks") or tasks)]
        acols = head_columns(abl_tasks, hp, ablation=True, convex=False)
        abl = {v: results.get(key, {}) for v, key in rows["ablation"]}
        anotes = {v: notes[key] for v, key in rows["ablation"] if key in notes}
        names = [v for v, _ in rows["ablation"]]
        aranks = mean_ranks(abl, acols, names)
        report["ablation"] = {"rows": names, "results": abl, "mean_rank": aranks,
                              "columns": [c.to_dict() for c in acols],
                              "column_ranks": column_ranks(abl, acols, names),
                              "overrides": {v: (hp.get("ablations") or {}).get(v) for v in names},
                              "sources": {v: sources.get(key) for v, key in rows["ablation"]}}
        md += ["", "## Ablations (pretraining variants × tasks)", "",
               markdown_table(abl, acols, names, "variant", aranks, anotes), "",
               "Mean rank over the variants only (baselines: see the table above). Pretraining overrides:", ""]
        md += [f"- `{v}`: `{json.dumps((hp.get('ablations') or {}).get(v) or {})}`" for v in names]
        p = _bars(os.path.join(plots, "tasks_by_variant.png"), abl, acols, names,
                  "Tasks per pretraining variant (%; error bars: std)")
        if p:
            plot_files.append(p)

    lw_md = []
    for row, probes in layer_weights.items():
        p = os.path.join(plots, f"layer_weights_{row}.png")
        layer_weights_png(p, probes, title=f"Layer weights each probe learned: {row}")
        plot_files.append(p)
        lw_md.append(f"![layer weights {row}](plots/{os.path.basename(p)})")

    loss_md = []
    for variant, path in pretrain_logs(steps, hp, sources).items():
        entries = parse_train_log(path)
        if not entries:
            continue
        p = os.path.join(plots, f"pretrain_loss_{variant}.png")
        loss_curves_png(p, loss_panels(entries), title=f"MGF pretraining loss per scale: {variant}")
        plot_files.append(p)
        loss_md.append(f"![pretraining loss {variant}](plots/{os.path.basename(p)})")
    md += ["", "## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plot_files
                                  if "tasks_by" in os.path.basename(p)] + [""] + loss_md
    if lw_md:
        md += ["", "Layer weights (softmax over the encoder's layers, mean over seeds and folds; 0 = input "
                   "embedding):", ""] + lw_md
    report["plots"] = plot_files

    counts = {}
    for st in status.values():
        counts[st] = counts.get(st, 0) + 1
    md += ["", "## Steps and time", "",
           f"Steps: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}. "
           f"Compute time of all finished steps: {_fmt_s(total)}; this invocation took {_fmt_s(wall_seconds)} "
           f"(wall clock) on {report['timing']['machine']}.", "",
           "| step | status | time | folder |", "|---|---|---|---|"]
    for name, s in report["steps"].items():
        t = "—" if s["seconds"] is None else _fmt_s(s["seconds"])
        md.append(f"| {name} | {s['status']} | {t} | `{os.path.relpath(s['folder'], out)}` |")
    md += ["", "Each step's full command is in report.json; its output in `<folder>/evaluate_stdout.txt`."]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    log(f"[evaluate] report: {os.path.join(out, 'report.md')} (+ report.json, {len(plot_files)} plots in {plots})")
    return report
