#!/usr/bin/env python3
"""One command: pretrain MGF, probe it and the baselines on four tasks, write the report.

    python recipes/evaluate.py hparams/evaluate.yaml [--data_root=/data] [--pretrained=<folder>]
        [--run_ablations=True] [--tasks='[timit, iemocap]'] [--seeds='[1986, 1987]']
        [--output_folder=results] [--dry_run=True] [--help]

The plan (printed first) is a list of steps, each one a recipe run in its own process:

1. ``pretrain <variant>``: ``recipes/pretrain/train.py hparams/mgf.yaml`` (skipped when
   ``--pretrained`` names a folder); with ``--run_ablations=True`` one more per ablation
   variant (``ablations:`` in the YAML);
2. ``<task>/<head> / <upstream>``: each downstream recipe (TIMIT frame probe, VoxCeleb1
   speaker identification + verification, LibriSpeech CTC, IEMOCAP 5 folds) with each
   head of ``heads:`` (``--head=<name>``), for the MGF encoder, the ``fbank`` and
   ``random`` baselines, any anchor encoder given as ``hf:<local folder>`` in ``upstreams``
   (wav2vec 2.0 / HuBERT / WavLM in Hugging Face format, row ``hf-<folder name>``) and every
   ablation variant; once per seed of ``seeds:`` (the
   probes' seed: initialisation and data order; the pretrained model is the same).

Each finished step writes a mark file (``evaluate_step.json``: the step's command and its
duration) in its folder; a rerun skips the steps whose mark matches the command it would
run, so an interrupted evaluation continues where it stopped. The report is rebuilt from
the recipes' result files at the end of every run:

    <output_folder>/report.md     main table (rows: upstreams, columns: task metric x head,
                                  mean ± std over seeds / IEMOCAP folds, convex references),
                                  the ranking under each head and where it changes,
                                  ablation table (rows: variants, + mean rank), timings
    <output_folder>/report.json   every number, folder and timing
    <output_folder>/plots/*.png   pretraining loss per scale, task bars per upstream/variant
                                  (value labels, error bars), the layer weights each probe learned

A task is one adapter in ``TASKS`` below (recipe, hparams, the corpus key, how to read its
metrics); adding a recipe is a few lines there plus its corpus folder and heads in the YAML.
"""

import glob
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mgf_sb.pretrained_folder import REQUIRED_FILES  # noqa: E402
from mgf_sb.upstream import HF_PREFIX, check_hf_folder, is_hf_source, upstream_tag  # noqa: E402
from mgf_sb import grid  # noqa: E402
from mgf_sb.grid import MARK_FILE, Step, read_mark, recipe_command, run_step  # noqa: E402,F401  (MARK_FILE, Step: for callers)
from mgf_sb.grid import fmt_seconds as _fmt_s  # noqa: E402
from mgf_sb.recipe import is_bundled_sample, read_utf8, use_sample_settings  # noqa: E402,F401  (one rule for every recipe)
from mgf_sb.settings import check_override_keys, check_settings  # noqa: E402
from mgf_sb.report import (  # noqa: E402
    Column,
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

BASELINES = ("fbank", "random")
SCALES = ("frame", "phoneme", "word", "utterance")


# ----------------------------------------------------------------------------------------------
# Task adapters: the recipe to run and how to read its metrics (percentages)
# ----------------------------------------------------------------------------------------------
def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _convex(value, *keys):
    """A recipe's ``convex_reference`` (a fraction, or a dict holding one under ``keys``) -> %."""
    if isinstance(value, dict):
        value = next((value[k] for k in keys if isinstance(value.get(k), (int, float))), None)
    return None if value is None or isinstance(value, bool) else 100 * float(value)


def read_timit(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    return {"timit_acc": 100 * r["test"]["acc"], "_layer_weights": [r.get("layer_weights")]}


def read_voxceleb(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    out = {"sid_acc": 100 * r["sid_test_acc"], "_layer_weights": [r.get("layer_weights")]}
    if r.get("eer") is not None:
        out["eer"] = 100 * r["eer"]
    convex = _convex(r.get("convex_reference"), "sid_test_acc", "test_acc", "acc", "accuracy")
    if convex is not None:
        out["sid_acc_convex"] = convex
    return out


def read_librispeech(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    splits = r["splits"]
    name = "test-clean" if "test-clean" in splits else sorted(splits)[0]
    s = splits[name]
    wer = s["beam_WER"] if s.get("beam_WER") is not None else s["greedy_WER"]
    return {"wer": wer, "wer_split": name, "_layer_weights": [r.get("layer_weights")]}


def read_iemocap(folder):
    """The folds' mean UA/WA; ``_samples`` keeps each fold's value (the spread is over folds)."""
    r = _load_json(os.path.join(folder, "folds_results.json"))
    out = {"ua": 100 * r["UA_mean"], "ua_std": 100 * r["UA_std"], "wa": 100 * r["WA_mean"],
           "wa_std": 100 * r["WA_std"], "n_folds": r["n_folds"], "_samples": {}}
    if r.get("folds"):
        out["_samples"] = {"ua": [100 * f["UA"] for f in r["folds"]], "wa": [100 * f["WA"] for f in r["folds"]]}
    folds = [_load_json(p) for p in sorted(glob.glob(os.path.join(folder, "**", "test_results.json"), recursive=True))]
    out["_layer_weights"] = [f.get("layer_weights") for f in folds]
    with_convex = r.get("folds") if all("convex_reference" in f for f in r.get("folds") or [{}]) else folds
    convex = [_convex(f.get("convex_reference"), "UA", "ua") for f in with_convex]
    convex = [c for c in convex if c is not None]
    if convex:
        out["ua_convex"] = sum(convex) / len(convex)
        out["_samples"]["ua_convex"] = convex
    return out


@dataclass
class Task:
    """One downstream task: ``script hparams --<corpus arg>=... --<output_arg>=<folder> ...``.

    ``columns``: its metrics; ``convex``: metric key -> the key of the convex reference
    (full-batch logistic regression on the same pooled features) its results carry;
    ``spread``: where its spread comes from without several seeds (``folds`` or None).
    """

    script: str
    hparams: str
    corpus: str  # the evaluate.yaml key holding this task's corpus folder
    columns: list
    read: callable
    output_arg: str = "output_folder"
    extra_args: callable = field(default=lambda folder: {})
    convex: dict = field(default_factory=dict)
    spread: str = None
    title: str = ""


TASKS = {
    "timit": Task("recipes/TIMIT/train.py", "hparams/timit.yaml", "timit_folder",
                  [Column("timit_acc", "TIMIT frame acc (%)")], read_timit, title="TIMIT"),
    "voxceleb": Task("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml", "voxceleb_folder",
                     [Column("sid_acc", "VoxCeleb1 SID acc (%)"), Column("eer", "VoxCeleb1 EER (%)", False, no_skill=50.0)],
                     read_voxceleb, convex={"sid_acc": "sid_acc_convex"}, title="VoxCeleb1"),
    "librispeech": Task("recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml", "librispeech_folder",
                        [Column("wer", "LibriSpeech WER (%)", False, no_skill=100.0)], read_librispeech, title="LibriSpeech"),
    "iemocap": Task("recipes/IEMOCAP/run_folds.py", "hparams/emotion.yaml", "iemocap_folder",
                    [Column("ua", "IEMOCAP UA (%)"), Column("wa", "IEMOCAP WA (%)")], read_iemocap,
                    output_arg="experiment_folder",
                    extra_args=lambda folder: {"manifest_folder": os.path.join(folder, "manifest")},
                    convex={"ua": "ua_convex"}, spread="folds", title="IEMOCAP"),
}

# Short labels for the bar charts.
SHORT = {"timit_acc": "TIMIT acc", "sid_acc": "SID acc", "eer": "EER", "wer": "WER", "ua": "emo UA", "wa": "emo WA"}


def task_heads(hp, task, ablation=False):
    """The heads a task runs with (``heads:``; ablation rows: ``ablation_heads:`` or the first head)."""
    heads = list((hp.get("heads") or {}).get(task) or [None])
    if ablation:
        chosen = hp.get("ablation_heads")
        heads = list(chosen.get(task) or heads[:1]) if isinstance(chosen, dict) else heads[:1]
    return heads


def probe_name(task, head):
    return task if head is None else f"{task}/{head}"


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
# Steps, marks and the runner: mgf_sb.grid (shared with benchmarks/quality.py).


def _use_sample(hp, folder):
    """The recipes' own rule (``mgf_sb.recipe``): auto = the corpus is a bundled sample."""
    return use_sample_settings(hp.get("use_sample_overrides", "auto"), folder)


def _overrides(hp, key, folder):
    """Common + sample (when the corpus is the bundled sample) + user overrides for a step."""
    out = dict(hp.get("common_overrides") or {})
    if _use_sample(hp, folder):
        out.update((hp.get("sample_overrides") or {}).get(key) or {})
    out.update((hp.get("task_overrides") or {}).get(key) or {})
    return out


def anchor_source(source):
    """``hf:<folder>`` -> ``hf:<absolute folder>``, checked now rather than at its first probe."""
    try:
        return HF_PREFIX + check_hf_folder(str(source)[len(HF_PREFIX):])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"upstreams: {source} is not a local Hugging Face model folder: {e}") from None


def build_plan(hp):
    """Steps (in run order) and the rows of the two tables.

    Returns
    -------
    steps : list of Step
    rows : dict
        ``{"main": [row names], "ablation": [variant names]}``; each row maps to its probe
        steps through ``step.row``.
    sources : dict
        row -> the ``upstream`` value its probes use.
    """
    work = os.path.abspath(hp["work_folder"])
    tasks = list(hp["tasks"])
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose among {list(TASKS)}")
    upstreams = [anchor_source(u) if is_hf_source(u) else u for u in hp["upstreams"]]
    bad = [u for u in upstreams if u not in ("mgf",) + BASELINES and not is_hf_source(u)]
    if bad:
        raise ValueError(f"upstreams must be among mgf, fbank, random, hf:<local folder>; got {bad}")
    anchor_tags = [upstream_tag(u) for u in upstreams if is_hf_source(u)]
    if len(set(anchor_tags)) != len(anchor_tags):
        raise ValueError(f"two hf: upstreams share a folder name ({upstreams}): their rows would collide")
    steps, sources, pretrain_of = [], {}, {}
    pre_folder = os.path.abspath(hp["pretrain_data_folder"])
    base_pretrain = _overrides(hp, "pretrain", pre_folder)

    def pretrain_step(variant, extra):
        ov = dict(base_pretrain, **extra)
        key = json.dumps(ov, sort_keys=True)
        if key in pretrain_of:  # identical settings: one pretraining serves both rows
            return pretrain_of[key]
        folder = os.path.join(work, "pretrain", variant)
        ov = dict(ov, data_folder=pre_folder, output_folder=folder)
        step = Step(f"pretrain {variant}", "pretrain", folder,
                    recipe_command(hp["pretrain_script"], hp["pretrain_hparams"], ov),
                    row=variant, result_path=os.path.join(folder, "pretrained"))
        steps.append(step)
        pretrain_of[key] = step
        return step

    mgf_step = None
    given = hp.get("pretrained")
    if "mgf" in upstreams or hp["run_ablations"]:
        if given:
            given = os.path.abspath(given)
            missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(given, f))]
            if missing:
                raise FileNotFoundError(f"--pretrained={given} is not a pretrained MGF folder (missing "
                                        f"{', '.join(missing)}): give the 'pretrained' folder a pretraining run "
                                        f"writes, or leave pretrained empty to pretrain here")
            pretrain_of[json.dumps(base_pretrain, sort_keys=True)] = None
        else:
            mgf_step = pretrain_step("mgf", {})
    mgf_source = given if given else (mgf_step.result_path if mgf_step else None)
    reference = mgf_source if hp.get("baseline_reference", True) else None

    rows = {"main": [], "ablation": []}
    row_source = {}  # row -> (upstream value, pretrain step or None, extra overrides)
    for u in upstreams:
        if u == "mgf":
            row_source[u] = (mgf_source, mgf_step, {})
        elif is_hf_source(u):  # an anchor encoder: its own row, probed as it is, no pretraining step
            u, source = upstream_tag(u), u
            row_source[u] = (source, None, {})
        else:
            row_source[u] = (u, mgf_step if reference else None,
                             {"upstream_reference": reference} if reference else {})
        rows["main"].append(u)
    if hp["run_ablations"]:
        grid = hp.get("ablations") or {}
        chosen = list(hp.get("ablation_variants") or grid)
        unknown = [v for v in chosen if v not in grid]
        if unknown:
            raise ValueError(f"unknown ablation variant(s) {unknown}: define them under `ablations` ({list(grid)})")
        for variant in chosen:
            extra = dict(grid[variant] or {})
            if not extra and mgf_source:  # the full model: the same probes as the mgf row
                key = "mgf" if "mgf" in row_source else variant
                row_source.setdefault(key, (mgf_source, mgf_step, {}))
                rows["ablation"].append((variant, key))
                continue
            ps = pretrain_step(variant, extra)
            if ps is None:  # same settings as the given pretrained folder
                row_source.setdefault("mgf", (mgf_source, None, {}))
                rows["ablation"].append((variant, "mgf"))
                continue
            key = ps.row if ps.row in row_source else variant
            row_source.setdefault(key, (ps.result_path, ps, {}))
            rows["ablation"].append((variant, key))
    ablation_tasks = list(hp.get("ablation_tasks") or tasks)
    seeds = [int(s) for s in (hp.get("seeds") or [])]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ from each other, got {seeds}")

    ablation_rows = {key for _, key in rows["ablation"]}
    for row, (source, dep, extra) in row_source.items():
        needed = list(tasks) if row in rows["main"] else []
        if row in ablation_rows:
            needed += [t for t in ablation_tasks if t not in needed]
        unknown = [t for t in needed if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown ablation task(s) {unknown}: choose among {list(TASKS)}")
        for t in needed:
            task = TASKS[t]
            data = os.path.abspath(hp[task.corpus])
            heads = task_heads(hp, t) if row in rows["main"] else []
            if row in ablation_rows:
                heads += [h for h in task_heads(hp, t, ablation=True) if h not in heads]
            for head in heads:
                for seed in seeds or [None]:
                    folder = os.path.join(work, "probes", row, t, *([head] if head else []),
                                          *([f"seed{seed}"] if seed is not None else []))
                    ov = dict(_overrides(hp, t, data), **extra)
                    if head is not None:
                        ov["head"] = head
                    if seed is not None:
                        ov["seed"] = seed
                    ov.update(upstream=source, data_folder=data, **{task.output_arg: folder}, **task.extra_args(folder))
                    hparams = (hp.get("task_hparams") or {}).get(t, task.hparams)
                    name = f"{probe_name(t, head)} / {row}" + (f" / seed {seed}" if seed is not None else "")
                    steps.append(Step(name, "probe", folder, recipe_command(task.script, hparams, ov),
                                      row=row, task=t, head=head, seed=seed, depends=[dep.name] if dep else []))
        sources[row] = source
    return steps, rows, sources


# ----------------------------------------------------------------------------------------------
# Marks and running
# ----------------------------------------------------------------------------------------------
def step_status(step):
    """``done`` | ``changed`` | ``todo`` of one step (its mark and its task's result files)."""
    return grid.step_status(step, step_output)


def step_output(step):
    """A finished step's output: the pretrained folder, or the task's metrics."""
    if step.kind == "pretrain":
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(step.result_path, f))]
        if missing:
            raise FileNotFoundError(f"{step.result_path} lacks {missing}")
        return step.result_path
    return TASKS[step.task].read(step.folder)


def execute(steps, hp, runner=run_step, log=print):
    """Runs the steps not yet done, in order (mgf_sb.grid.execute); returns {step name: status}."""
    env = dict(os.environ)
    if hp.get("num_threads"):
        env["OMP_NUM_THREADS"] = str(hp["num_threads"])
    return grid.execute(steps, step_output, runner=runner, jobs=1, on_change=hp.get("on_change", "error"),
                        keep_going=hp.get("keep_going", True), env=env, verbose=hp.get("verbose", False), log=log,
                        name="evaluate")


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


# ----------------------------------------------------------------------------------------------
# The command line: --help, list settings, --dry_run
# ----------------------------------------------------------------------------------------------
DEFAULT_HPARAMS = os.path.join(REPO, "hparams", "evaluate.yaml")
LIST_KEYS = ("upstreams", "tasks", "seeds", "ablation_variants", "ablation_tasks")  # a scalar is one item
NONEMPTY_KEYS = ("upstreams", "tasks")


def settings_help(hparams_file=DEFAULT_HPARAMS):
    """One line per top-level setting of the YAML: ``--key (default) description``.

    The description is the key's own comment, else the comment block just above it;
    keys built from others (``!ref``) are shown with their expression.
    """
    import re

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
        if key in ("sample_overrides",):
            block = []
            continue
        desc = comment or " ".join(block)
        desc = re.split(r"(?<!e\.g)(?<!i\.e)\. ", desc)[0].rstrip(".")  # the first sentence
        value = value or "{...}"
        out.append(f"  --{key}={value}" + (f"    {desc}" if desc else ""))
        block = []
    return "\n".join(out)


def print_help(argv):
    """``--help`` / ``-h``: evaluate.py's own settings (SpeechBrain's parser knows none of them)."""
    hparams_file = next((a for a in argv if a.endswith((".yaml", ".yml"))), DEFAULT_HPARAMS)
    print(__doc__.split("\n\n")[0].strip() + "\n")
    print(f"usage: python recipes/evaluate.py {os.path.relpath(hparams_file, REPO)} [--<setting>=<value> ...]\n")
    print(f"settings (from {os.path.relpath(hparams_file, REPO)}; --<setting>=<value> overrides one, YAML syntax "
          f"for lists, e.g. --tasks='[timit, iemocap]'):")
    print(settings_help(hparams_file))
    print("\nplus SpeechBrain's run options (--device, --precision, ...: python -m speechbrain --help).")


def normalize_lists(hp):
    """``--upstreams=mgf`` is one upstream (YAML reads it as a string, not a list of letters);
    an empty ``upstreams`` or ``tasks`` is an empty plan: refused, naming the key and the fix."""
    for key in LIST_KEYS:
        v = hp.get(key)
        if v is not None and not isinstance(v, (list, tuple)):
            hp[key] = [v]
    for key in NONEMPTY_KEYS:
        if not hp.get(key):
            example = "mgf, fbank, random or hf:<local folder>" if key == "upstreams" else ", ".join(TASKS)
            raise ValueError(f"{key}={hp.get(key)!r}: nothing to evaluate (an empty plan). Give at least one, "
                             f"e.g. --{key}='[{example.split(' or ')[0]}]' (choices: {example})")
    return hp


def load_hparams(argv):
    hparams_file, _, overrides = sb.parse_arguments(argv)
    check_override_keys(hparams_file, overrides)  # a misspelt key: "did you mean", before anything runs
    check_settings(hparams_file, overrides)  # types and ranges by name (mgf_sb.settings.RULES)
    with open(hparams_file, encoding="utf-8") as fin:
        return normalize_lists(load_hyperpyyaml(fin, overrides))


def estimate_seconds(step, hp):
    """(seconds, source) of one step: the duration its last mark recorded (same folder,
    even under other settings), else ``dry_run_step_seconds`` of its kind."""
    mark = read_mark(step)
    if mark and mark.get("seconds") is not None:
        return float(mark["seconds"]), "last run"
    table = hp.get("dry_run_step_seconds") or {}
    key = "pretrain" if step.kind == "pretrain" else step.task
    return float(table.get(key, table.get("default", 60))), "estimate"


def dry_run(steps, hp, log=print):
    """Prints the plan, each step's status and estimated time, and the total; runs nothing."""
    total_todo, lines = 0.0, []
    for k, s in enumerate(steps, 1):
        status = step_status(s)
        seconds, source = estimate_seconds(s, hp)
        if status != "done":
            total_todo += seconds
        lines.append(f"    {k:3d}. [{status}] {s.name}: ~{_fmt_s(seconds)} ({source})")
    todo = sum(step_status(s) != "done" for s in steps)
    log(f"[evaluate] dry run: {len(steps)} steps, {len(steps) - todo} already done, {todo} to run")
    for line in lines:
        log(line)
    log(f"[evaluate] estimated time of the steps to run: ~{_fmt_s(total_todo)} (from the last run's marks where "
        f"present, else dry_run_step_seconds; real corpora take far longer than its sample-run figures). "
        f"Nothing was run.")
    return total_todo


def main(argv, runner=run_step, log=print):
    t0 = time.time()
    if any(a in ("--help", "-h") for a in argv):
        print_help(argv)
        return None, {}
    hp = load_hparams(argv)
    for key in ("pretrain_data_folder",) + tuple(TASKS[t].corpus for t in hp["tasks"]):
        if not os.path.isdir(hp[key]):
            raise FileNotFoundError(f"{key}={hp[key]!r} is not a folder: pass --{key}=<corpus root> "
                                    f"(or --data_root=<folder holding them all>)")
    steps, rows, sources = build_plan(hp)
    if any(is_bundled_sample(hp[k]) for k in ("pretrain_data_folder",) + tuple(TASKS[t].corpus for t in hp["tasks"])):
        tiny = "tiny settings from sample_overrides" if hp.get("use_sample_overrides", "auto") is not False \
            else "the recipes' own settings: use_sample_overrides=False"
        log(f"[evaluate] USING THE BUNDLED SAMPLE CORPORA (synthetic speech; {tiny}). "
            "Pass --data_root=... (or each corpus folder) for real results.")
    if hp.get("dry_run"):  # the plan and its estimated time, nothing run
        dry_run(steps, hp, log=log)
        return None, {}
    if hp.get("report_only"):  # rebuild the report from the finished steps, run nothing
        status = {s.name: step_status(s) for s in steps}
        status = {k: v if v == "done" else "not run" for k, v in status.items()}
        log(f"[evaluate] report only: {sum(v == 'done' for v in status.values())} of {len(steps)} steps finished")
    else:
        status = execute(steps, hp, runner=runner, log=log)
    report = write_report(hp, steps, rows, sources, status, time.time() - t0, log=log)
    failed = [n for n, s in status.items() if s in ("failed", "blocked")]
    log(f"[evaluate] finished in {_fmt_s(time.time() - t0)} (all steps together: "
        f"{_fmt_s(report['timing']['steps_seconds_total'])})" + (f"; FAILED: {failed}" if failed else ""))
    return report, status


if __name__ == "__main__":
    _, status = main(sys.argv[1:])
    sys.exit(1 if any(s in ("failed", "blocked") for s in status.values()) else 0)
