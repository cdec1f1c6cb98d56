#!/usr/bin/env python3
"""One command: pretrain MGF, probe it and the baselines on four tasks, write the report.

    python recipes/evaluate.py hparams/evaluate.yaml [--data_root=/data] [--pretrained=<folder>]
        [--run_ablations=True] [--tasks='[timit, iemocap]'] [--output_folder=results]

The plan (printed first) is a list of steps, each one a recipe run in its own process:

1. ``pretrain <variant>``: ``recipes/pretrain/train.py hparams/mgf.yaml`` (skipped when
   ``--pretrained`` names a folder); with ``--run_ablations=True`` one more per ablation
   variant (``ablations:`` in the YAML);
2. ``<task> / <upstream>``: each downstream recipe (TIMIT frame probe, VoxCeleb1 speaker
   identification + verification, LibriSpeech CTC, IEMOCAP 5 folds) for the MGF encoder,
   the ``fbank`` and ``random`` baselines and every ablation variant.

Each finished step writes a mark file (``evaluate_step.json``: the step's command and its
duration) in its folder; a rerun skips the steps whose mark matches the command it would
run, so an interrupted evaluation continues where it stopped. The report is rebuilt from
the recipes' result files at the end of every run:

    <output_folder>/report.md     main table (rows: upstreams, columns: task metrics),
                                  ablation table (rows: variants, + mean rank), timings
    <output_folder>/report.json   every number, folder and timing
    <output_folder>/plots/*.png   pretraining loss per scale, task bars per upstream/variant

A task is one adapter in ``TASKS`` below (recipe, hparams, the corpus key, how to read its
metrics); adding a recipe is a few lines there plus its corpus folder in the YAML.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mgf_sb.checkpoint import REQUIRED_FILES  # noqa: E402
from mgf_sb.report import (  # noqa: E402
    Column,
    bar_chart_png,
    column_ranks,
    loss_curves_png,
    markdown_table,
    mean_ranks,
    parse_train_log,
)

MARK_FILE = "evaluate_step.json"
STDOUT_FILE = "evaluate_stdout.txt"
BASELINES = ("fbank", "random")
SCALES = ("frame", "phoneme", "word", "utterance")


# ----------------------------------------------------------------------------------------------
# Task adapters: the recipe to run and how to read its metrics (percentages)
# ----------------------------------------------------------------------------------------------
def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_timit(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    return {"timit_acc": 100 * r["test"]["acc"]}


def read_voxceleb(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    out = {"sid_acc": 100 * r["sid_test_acc"]}
    if r.get("eer") is not None:
        out["eer"] = 100 * r["eer"]
    return out


def read_librispeech(folder):
    splits = _load_json(os.path.join(folder, "results.json"))["splits"]
    name = "test-clean" if "test-clean" in splits else sorted(splits)[0]
    s = splits[name]
    wer = s["beam_WER"] if s.get("beam_WER") is not None else s["greedy_WER"]
    return {"wer": wer, "wer_split": name}


def read_iemocap(folder):
    r = _load_json(os.path.join(folder, "folds_results.json"))
    return {"ua": 100 * r["UA_mean"], "ua_std": 100 * r["UA_std"], "wa": 100 * r["WA_mean"],
            "wa_std": 100 * r["WA_std"], "n_folds": r["n_folds"]}


@dataclass
class Task:
    """One downstream task: ``script hparams --<corpus arg>=... --<output_arg>=<folder> ...``."""

    script: str
    hparams: str
    corpus: str  # the evaluate.yaml key holding this task's corpus folder
    columns: list
    read: callable
    output_arg: str = "output_folder"
    extra_args: callable = field(default=lambda folder: {})


TASKS = {
    "timit": Task("recipes/TIMIT/train.py", "hparams/timit.yaml", "timit_folder",
                  [Column("timit_acc", "TIMIT frame acc (%)")], read_timit),
    "voxceleb": Task("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml", "voxceleb_folder",
                     [Column("sid_acc", "VoxCeleb1 SID acc (%)"), Column("eer", "VoxCeleb1 EER (%)", False)],
                     read_voxceleb),
    "librispeech": Task("recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml", "librispeech_folder",
                        [Column("wer", "LibriSpeech WER (%)", False)], read_librispeech),
    "iemocap": Task("recipes/IEMOCAP/run_folds.py", "hparams/emotion.yaml", "iemocap_folder",
                    [Column("ua", "IEMOCAP UA (%)"), Column("wa", "IEMOCAP WA (%)")], read_iemocap,
                    output_arg="experiment_folder",
                    extra_args=lambda folder: {"manifest_folder": os.path.join(folder, "manifest")}),
}

# Short labels for the bar charts (the 3x5 font is small).
SHORT = {"timit_acc": "TIMIT ACC", "sid_acc": "SID ACC", "eer": "EER", "wer": "WER", "ua": "EMO UA", "wa": "EMO WA"}


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    kind: str  # pretrain | probe
    folder: str
    command: list
    row: str = ""
    task: str = ""
    depends: list = field(default_factory=list)
    result_path: str = ""  # pretrain: the pretrained folder

    @property
    def mark_path(self):
        return os.path.join(self.folder, MARK_FILE)

    @property
    def signature(self):
        return {"command": [os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO) else c
                            for c in self.command[1:]]}


def yaml_value(v):
    """A Python value as a one-line YAML override (JSON is YAML flow style)."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if v is None:
        return "null"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def recipe_command(script, hparams, overrides, extra_argv=()):
    return [sys.executable, os.path.join(REPO, script), os.path.join(REPO, hparams)] + \
        [f"--{k}={yaml_value(v)}" for k, v in overrides.items()] + list(extra_argv)


def is_bundled_sample(folder):
    """True for the corpora under the repository's ``samples/`` (as ``announce_data`` decides)."""
    return "samples" in os.path.normpath(os.path.abspath(folder)).split(os.sep)


def _use_sample(hp, folder):
    mode = hp.get("use_sample_overrides", "auto")
    if isinstance(mode, bool):
        return mode
    return is_bundled_sample(folder)


def _overrides(hp, key, folder):
    """Common + sample (when the corpus is the bundled sample) + user overrides for a step."""
    out = dict(hp.get("common_overrides") or {})
    if _use_sample(hp, folder):
        out.update((hp.get("sample_overrides") or {}).get(key) or {})
    out.update((hp.get("task_overrides") or {}).get(key) or {})
    return out


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
    upstreams = list(hp["upstreams"])
    bad = [u for u in upstreams if u not in ("mgf",) + BASELINES]
    if bad:
        raise ValueError(f"upstreams must be among mgf, fbank, random; got {bad}")
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
            folder = os.path.join(work, "probes", row, t)
            ov = dict(_overrides(hp, t, data), **extra)
            ov.update(upstream=source, data_folder=data, **{task.output_arg: folder}, **task.extra_args(folder))
            hparams = (hp.get("task_hparams") or {}).get(t, task.hparams)
            steps.append(Step(f"{t} / {row}", "probe", folder, recipe_command(task.script, hparams, ov),
                              row=row, task=t, depends=[dep.name] if dep else []))
        sources[row] = source
    return steps, rows, sources


# ----------------------------------------------------------------------------------------------
# Marks and running
# ----------------------------------------------------------------------------------------------
def read_mark(step):
    try:
        return _load_json(step.mark_path)
    except (OSError, ValueError):
        return None


def step_status(step):
    """``done`` (mark matches and results readable), ``changed`` (mark from other settings) or ``todo``."""
    mark = read_mark(step)
    if mark is None:
        return "todo"
    if mark.get("signature") != step.signature:
        return "changed"
    try:
        step_output(step)
    except Exception:
        return "todo"
    return "done"


def step_output(step):
    """A finished step's output: the pretrained folder, or the task's metrics."""
    if step.kind == "pretrain":
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(step.result_path, f))]
        if missing:
            raise FileNotFoundError(f"{step.result_path} lacks {missing}")
        return step.result_path
    return TASKS[step.task].read(step.folder)


def write_mark(step, seconds):
    mark = {"signature": step.signature, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "step": step.name}
    os.makedirs(step.folder, exist_ok=True)
    tmp = step.mark_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(mark, f, indent=2)
    os.replace(tmp, step.mark_path)


def run_step(step, env, verbose=False):
    """Runs a step's command; its output goes to ``<folder>/evaluate_stdout.txt``. Returns the exit code."""
    os.makedirs(step.folder, exist_ok=True)
    log = os.path.join(step.folder, STDOUT_FILE)
    with open(log, "a") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(step.command)}\n")
        f.flush()
        if verbose:
            proc = subprocess.Popen(step.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write("    " + line)
            return proc.wait()
        return subprocess.call(step.command, stdout=f, stderr=subprocess.STDOUT, env=env)


def _tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _fmt_s(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def execute(steps, hp, runner=run_step, log=print):
    """Runs the steps not yet done, in order; returns {step name: status} (done | ran | failed | blocked)."""
    status = {s.name: step_status(s) for s in steps}
    changed = [s for s in steps if status[s.name] == "changed"]
    if changed:
        if hp.get("on_change", "error") != "rerun":
            raise RuntimeError(
                "these steps were run before with other settings: "
                + "; ".join(f"{s.name} ({s.folder})" for s in changed)
                + ". Pass --on_change=rerun to delete those step folders and run them again, "
                  "or another --output_folder to keep both.")
        for s in changed:
            log(f"[evaluate] {s.name}: settings changed, deleting {s.folder} and running it again")
            shutil.rmtree(s.folder)
            status[s.name] = "todo"
    todo = [s for s in steps if status[s.name] == "todo"]
    log(f"[evaluate] plan: {len(steps)} steps, {len(steps) - len(todo)} already done, {len(todo)} to run")
    for s in steps:
        log(f"    {'[done]' if status[s.name] == 'done' else '[todo]'} {s.name}")
    env = dict(os.environ)
    if hp.get("num_threads"):
        env["OMP_NUM_THREADS"] = str(hp["num_threads"])
    t0 = time.time()
    for k, s in enumerate(todo, 1):
        failed_deps = [d for d in s.depends if status.get(d) in ("failed", "blocked")]
        if failed_deps:
            status[s.name] = "blocked"
            log(f"[evaluate] step {k}/{len(todo)} {s.name}: skipped, it needs {failed_deps}")
            continue
        left = [x.name for x in todo[k:]]
        log(f"[evaluate] step {k}/{len(todo)} {s.name}: running (elapsed {_fmt_s(time.time() - t0)}; "
            f"{len(left)} left after it{': ' + ', '.join(left[:6]) + (' ...' if len(left) > 6 else '') if left else ''})")
        log(f"    log: {os.path.join(s.folder, STDOUT_FILE)}")
        start = time.time()
        rc = runner(s, env, hp.get("verbose", False))
        seconds = time.time() - start
        try:
            if rc != 0:
                raise RuntimeError(f"exit code {rc}")
            out = step_output(s)
        except Exception as e:
            status[s.name] = "failed"
            log(f"[evaluate] step {s.name} FAILED after {_fmt_s(seconds)} ({e}); last lines of "
                f"{os.path.join(s.folder, STDOUT_FILE)}:\n{_tail(os.path.join(s.folder, STDOUT_FILE))}")
            if not hp.get("keep_going", True):
                break
            continue
        write_mark(s, seconds)
        status[s.name] = "ran"
        log(f"[evaluate] step {k}/{len(todo)} {s.name}: done in {_fmt_s(seconds)}"
            + (f" -> {out}" if s.kind == "probe" else ""))
    for s in steps:
        if status[s.name] == "todo":
            status[s.name] = "not run"
    return status


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def collect_results(steps, status):
    """row -> {metric: value}; row -> note for cells without a value."""
    results, notes = {}, {}
    for s in steps:
        if s.kind != "probe":
            continue
        results.setdefault(s.row, {})
        try:
            results[s.row].update(step_output(s))
        except Exception:
            st = status.get(s.name, "missing")
            if st != "done":
                notes.setdefault(s.row, st)
    return results, notes


def _columns(tasks):
    return [c for t in tasks for c in TASKS[t].columns]


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


def write_report(hp, steps, rows, sources, status, wall_seconds, log=print):
    out = os.path.abspath(hp["output_folder"])
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    tasks = list(hp["tasks"])
    columns = _columns(tasks)
    results, notes = collect_results(steps, status)
    main_rows = rows["main"]
    main = {r: results.get(r, {}) for r in main_rows}
    main_ranks = mean_ranks(main, columns, main_rows) if len(main_rows) > 1 else None
    report = {
        "tasks": tasks, "columns": [c.to_dict() for c in columns],
        "main": {"rows": main_rows, "results": main, "mean_rank": main_ranks,
                 "column_ranks": column_ranks(main, columns, main_rows), "sources": {r: sources.get(r) for r in main_rows}},
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
    md += ["## Upstreams × tasks", "", markdown_table(main, columns, main_rows, "upstream", main_ranks, notes), "",
           "↑ higher is better, ↓ lower is better; best value in bold. Mean rank: average over the columns of "
           "each row's rank (1 = best; ties share their mean rank). IEMOCAP: mean ± std over the folds."]
    ls_split = {r: main[r].get("wer_split") for r in main_rows if main[r].get("wer_split")}
    if ls_split:
        md += [f"LibriSpeech WER on {', '.join(sorted(set(ls_split.values())))} (beam search when enabled)."]
    md += ["", "Upstream sources:", ""] + [f"- `{r}`: `{sources.get(r)}`" for r in main_rows]

    plot_files = []
    if any(main[r] for r in main_rows):
        p = os.path.join(plots, "tasks_by_upstream.png")
        bar_chart_png(p, [SHORT.get(c.key, c.key) for c in columns],
                      {r: [main[r].get(c.key) for c in columns] for r in main_rows},
                      title="TASKS PER UPSTREAM (%; EER, WER: LOWER IS BETTER)", ylabel="%")
        plot_files.append(p)

    if rows["ablation"]:
        abl_tasks = [t for t in (hp.get("ablation_tasks") or tasks)]
        acols = _columns(abl_tasks)
        abl = {v: results.get(key, {}) for v, key in rows["ablation"]}
        anotes = {v: notes[key] for v, key in rows["ablation"] if key in notes}
        names = [v for v, _ in rows["ablation"]]
        aranks = mean_ranks(abl, acols, names)
        report["ablation"] = {"rows": names, "results": abl, "mean_rank": aranks,
                              "column_ranks": column_ranks(abl, acols, names),
                              "overrides": {v: (hp.get("ablations") or {}).get(v) for v in names},
                              "sources": {v: sources.get(key) for v, key in rows["ablation"]}}
        md += ["", "## Ablations (pretraining variants × tasks)", "",
               markdown_table(abl, acols, names, "variant", aranks, anotes), "",
               "Mean rank over the variants only (baselines: see the table above). Pretraining overrides:", ""]
        md += [f"- `{v}`: `{json.dumps((hp.get('ablations') or {}).get(v) or {})}`" for v in names]
        if any(abl.values()):
            p = os.path.join(plots, "tasks_by_variant.png")
            bar_chart_png(p, [SHORT.get(c.key, c.key) for c in acols], {v: [abl[v].get(c.key) for c in acols]
                                                                         for v in names},
                          title="TASKS PER PRETRAINING VARIANT (%)", ylabel="%")
            plot_files.append(p)

    loss_md = []
    for variant, path in pretrain_logs(steps, hp, sources).items():
        entries = parse_train_log(path)
        if not entries:
            continue
        p = os.path.join(plots, f"pretrain_loss_{variant}.png")
        loss_curves_png(p, loss_panels(entries), title=f"MGF PRETRAINING LOSS PER SCALE: {variant}")
        plot_files.append(p)
        loss_md.append(f"![pretraining loss {variant}](plots/{os.path.basename(p)})")
    md += ["", "## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plot_files
                                  if "pretrain_loss" not in p] + [""] + loss_md
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
def load_hparams(argv):
    hparams_file, _, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as fin:
        return load_hyperpyyaml(fin, overrides)


def main(argv, runner=run_step, log=print):
    t0 = time.time()
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
    status = execute(steps, hp, runner=runner, log=log)
    report = write_report(hp, steps, rows, sources, status, time.time() - t0, log=log)
    failed = [n for n, s in status.items() if s in ("failed", "blocked")]
    log(f"[evaluate] finished in {_fmt_s(time.time() - t0)} (all steps together: "
        f"{_fmt_s(report['timing']['steps_seconds_total'])})" + (f"; FAILED: {failed}" if failed else ""))
    return report, status


if __name__ == "__main__":
    _, status = main(sys.argv[1:])
    sys.exit(1 if any(s in ("failed", "blocked") for s in status.values()) else 0)
