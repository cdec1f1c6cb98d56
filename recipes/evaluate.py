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

The jobs are split: the plan, the runner and the command line here; the task adapters in
``evaluate_tasks.py`` (``TASKS``: recipe, hparams, the corpus key, how to read its metrics; adding a
recipe is a few lines there plus its corpus folder and heads in the YAML); the report in
``evaluate_report.py``.
"""

import json
import os
import sys
import time

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
from mgf_sb.settings import check_override_keys, check_settings, settings_help  # noqa: E402,F401
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling modules, also when imported
# The task adapters and the report are modules of their own; their names stay reachable here.
from evaluate_tasks import BASELINES, SCALES, SHORT, TASKS, Task, probe_name, step_output, task_heads  # noqa: E402,F401
from evaluate_report import (  # noqa: E402,F401
    aggregate,
    collect_runs,
    head_columns,
    head_rankings,
    loss_panels,
    mean_rank_by_head,
    pretrain_logs,
    spread_notes,
    write_report,
)


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


def execute(steps, hp, runner=run_step, log=print):
    """Runs the steps not yet done, in order (mgf_sb.grid.execute); returns {step name: status}."""
    env = dict(os.environ)
    if hp.get("num_threads"):
        env["OMP_NUM_THREADS"] = str(hp["num_threads"])
    return grid.execute(steps, step_output, runner=runner, jobs=1, on_change=hp.get("on_change", "error"),
                        keep_going=hp.get("keep_going", True), env=env, verbose=hp.get("verbose", False), log=log,
                        name="evaluate")


# ----------------------------------------------------------------------------------------------
# The command line: --help, list settings, --dry_run
# ----------------------------------------------------------------------------------------------
DEFAULT_HPARAMS = os.path.join(REPO, "hparams", "evaluate.yaml")
LIST_KEYS = ("upstreams", "tasks", "seeds", "ablation_variants", "ablation_tasks")  # a scalar is one item
NONEMPTY_KEYS = ("upstreams", "tasks")


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
