#!/usr/bin/env python3
"""Quality benchmark: does full MGF beat each scale alone, a random encoder and fbank?

    python benchmarks/quality.py                      # default budget (sized for <= 60 min on 2 idle cores)
    python benchmarks/quality.py --budget=long --device=cuda   # longer runs, larger encoder, a GPU
    python benchmarks/quality.py --budget=tiny        # the whole pipeline on a few utterances (the test's)

1. **Corpus** (generated on first use, cached under ``--cache``, default
   ``~/.cache/mgf_sb/quality``): pretraining speech from many synthetic voices (every TTS engine,
   per-speaker pitch / rate / channel, per-utterance session channel) and a held-out set of
   festival voices with phone timings for the probes (:mod:`mgf_sb.data.quality_corpus`).
2. **Pretraining**: each variant is ``recipes/pretrain/train.py hparams/mgf.yaml`` plus overrides
   (the command a user runs, so the YAML's defaults flow through): full MGF, each scale alone,
   each pair, at the same budget in optimiser steps, for each seed; a small encoder so that the
   grid fits the time. The exported encoder is snapshotted after each epoch for the curves.
3. **Probes** on frozen features of the held-out voices (``benchmarks/quality_probe.py``): frame
   phone classification (linear; layer chosen on dev voices, scored on test voices) and speaker
   identification (linear on pooled mean + std), for every variant and for the baselines fbank,
   fbank with +-5 frames of context and the random-init encoder (same architecture and
   normaliser as full MGF).
4. **Report** in ``--out`` (default ``results/quality/<budget>``): ``report.md`` (table with
   mean +- std over seeds, mean ranks, time to pass fbank +-5 on phones), ``results.json``,
   ``quality_bars.png`` and ``quality_curve.png`` (probe accuracy vs pretraining steps, full
   MGF vs the best single scale).

A rerun reuses the corpus, finished pretraining runs and finished probes (delete ``--out`` to
start again). ``--set key=value`` adds an override of ``hparams/mgf.yaml`` to every variant
(for experiments; the output folder should then differ).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mgf_sb import report as rp  # noqa: E402
from mgf_sb.checkpoint import read_config  # noqa: E402
from mgf_sb.data.quality_corpus import CorpusSpec, build_corpus  # noqa: E402

HPARAMS = os.path.join(REPO, "hparams", "mgf.yaml")
RECIPE = os.path.join(REPO, "recipes", "pretrain", "train.py")

# Variant name -> overrides of hparams/mgf.yaml (the README's ablation grid).
VARIANTS = {
    "full MGF": {},
    "frame": {"use_phoneme": False, "use_utterance": False},
    "phoneme": {"use_frame": False, "use_utterance": False},
    "utterance": {"use_frame": False, "use_phoneme": False},
    "frame+phoneme": {"use_utterance": False},
    "frame+utterance": {"use_phoneme": False},
    "phoneme+utterance": {"use_frame": False},
}
SINGLE_SCALES = ("frame", "phoneme", "utterance")
BASELINES = ("fbank", "fbank+-5", "random")

SMALL_ENCODER = {"d_model": 128, "num_layers": 3, "nhead": 4, "d_ffn": 512, "proj_dim": 64,
                 "conv_pos_kernel": 33, "conv_pos_groups": 16}
TINY_ENCODER = {"d_model": 32, "num_layers": 2, "nhead": 4, "d_ffn": 64, "proj_dim": 32, "conv_pos_kernel": 9,
                "conv_pos_groups": 4, "dropout": 0.0}


@dataclasses.dataclass
class Budget:
    """Everything a budget fixes. ``epochs``: pretraining epochs (steps = epochs x steps/epoch,
    stated in the report); ``curve_variants``: variants probed after every epoch (first seed)."""

    corpus: CorpusSpec
    encoder: dict
    epochs: int
    batch_size: int
    variants: list
    seeds: list
    curve_variants: list
    max_train_frames: int = 20000
    max_iter: int = 100
    overrides: dict = dataclasses.field(default_factory=dict)


BUDGETS = {
    # the test's: a few voices and utterances, two variants, 2 epochs of a 2-layer d=32 encoder
    "tiny": Budget(CorpusSpec(n_pretrain_speakers=3, pretrain_utts=3, n_probe_speakers=4, probe_utts=4,
                              two_sentence_prob=0.0),
                   TINY_ENCODER, epochs=2, batch_size=4, variants=["full MGF", "frame"], seeds=[0],
                   curve_variants=["full MGF"], max_train_frames=3000, max_iter=50,
                   overrides={"crop_seconds": 3.0}),
    # sized for <= 60 min on 2 idle CPU cores, estimated from measured CPU time (1 thread; see
    # benchmarks/RESULTS.md): ~0.9-1.0 CPU s per step of this encoder -> 7 variants x 2 seeds x 360
    # steps ~ 4,800 CPU s, + ~24 probes x ~18 CPU s, i.e. 40-60 min on 2 cores, plus the one-time
    # corpus generation; 1.8 h of audio, 48 + 24 voices
    "default": Budget(CorpusSpec(), SMALL_ENCODER, epochs=2, batch_size=8, variants=list(VARIANTS), seeds=[0, 1],
                      curve_variants=["full MGF", *SINGLE_SCALES]),
    # longer runs (a GPU): 5 h of audio, the YAML's own encoder size, 3 seeds
    "long": Budget(CorpusSpec(n_pretrain_speakers=96, pretrain_utts=40, n_probe_speakers=36, probe_utts=20),
                   {}, epochs=30, batch_size=16, variants=list(VARIANTS), seeds=[0, 1, 2],
                   curve_variants=["full MGF", *SINGLE_SCALES], max_train_frames=60000),
}


def cpu_seconds(who=resource.RUSAGE_SELF):
    """User + system CPU seconds of this process (or of its finished children)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def log(msg):
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(name):
    return name.replace(" ", "_").replace("+", "_").replace("-", "m")


# ----------------------------------------------------------------------------------------------
# Pretraining (the recipe, as a user runs it)
# ----------------------------------------------------------------------------------------------
def recipe_overrides(budget, corpus, variant, seed, run_dir, threads, device, extra):
    """The command-line overrides of hparams/mgf.yaml for one pretraining run."""
    ov = {
        "data_folder": corpus["pretrain_folder"],
        "train_splits": "[train]",
        "valid_splits": "[valid]",
        "output_folder": run_dir,
        "seed": seed,
        "number_of_epochs": budget.epochs,  # lr and EMA schedules follow from the steps (YAML defaults)
        "dynamic_batching": False,  # a fixed batch size: steps per epoch = ceil(utterances / batch_size)
        "batch_size": budget.batch_size,
        "ckpt_interval_minutes": 0,
        **budget.encoder,
        **budget.overrides,
        **VARIANTS[variant],
        **extra,
    }
    if threads:
        ov["num_threads"] = threads
    if device != "cpu":
        ov["device"] = device
    return ov


def _config_epoch(folder):
    try:
        return int(read_config(folder)["meta"].get("epoch"))
    except (FileNotFoundError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _snapshot(pretrained, snaps):
    """Copies the exported encoder to ``snaps/epoch<k>`` (k read from its config) -> k or None."""
    epoch = _config_epoch(pretrained)
    if epoch is None:
        return None
    dest = os.path.join(snaps, f"epoch{epoch}")
    if os.path.isdir(dest):
        return epoch
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pretrained, tmp)
    if _config_epoch(tmp) != epoch:  # overwritten while copying: take it next time
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    os.replace(tmp, dest)
    return epoch


def pretrain(run_dir, overrides, epochs, timeout=None):
    """Runs the recipe in a subprocess; snapshots the export after each epoch.

    Returns the wall seconds (0 when the final snapshot already existed).
    """
    snaps = os.path.join(run_dir, "snapshots")
    if os.path.isdir(os.path.join(snaps, f"epoch{epochs}")):
        return 0.0
    os.makedirs(snaps, exist_ok=True)
    cmd = [sys.executable, RECIPE, HPARAMS] + [f"--{k}={v}" for k, v in overrides.items()]
    pretrained = os.path.join(run_dir, "pretrained")
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "a") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        # PYTHONPATH: the recipe imports mgf_sb from this tree (also when it is a copy of the repo)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        last = None
        while proc.poll() is None:
            time.sleep(0.2)
            if os.path.isfile(os.path.join(pretrained, "mgf_config.json")):
                mtime = os.path.getmtime(os.path.join(pretrained, "mgf_config.json"))
                if mtime != last and _snapshot(pretrained, snaps) is not None:
                    last = mtime
            if timeout and time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"pretraining in {run_dir} ran over {timeout} s")
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "stdout.log")) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"pretraining failed ({run_dir}):\n{tail}")
    _snapshot(pretrained, snaps)
    if not os.path.isdir(os.path.join(snaps, f"epoch{epochs}")):
        raise RuntimeError(f"{run_dir}: no export of epoch {epochs} after the run")
    return time.time() - t0


def run_steps(snapshot):
    return int(read_config(snapshot)["meta"]["step"])


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
COLUMNS = [rp.Column("phones", "phones, frame acc. % (test voices)"),
           rp.Column("speakers", "speakers, acc. % (test utts)")]


def aggregate(probes, rows, seeds):
    """probes[row][seed] = run_probes() output -> table dict row -> {metric, metric_std, ...}."""
    table = {}
    for row in rows:
        got = [probes[row][s] for s in seeds if s in probes.get(row, {})]
        if not got:
            continue
        entry = {"n_seeds": len(got)}
        for m in ("phones", "speakers"):
            mean, std, n = rp.mean_std([g[m]["test"] for g in got])
            entry[m], entry[m + "_std"] = mean, (std if n > 1 else None)
            entry[m + "_dev"] = rp.mean_std([g[m]["dev_best"] for g in got])[0]
            entry[m + "_layers"] = [g[m]["layer"] for g in got]
        table[row] = entry
    return table


def time_to_pass(points, threshold):
    """First step at which a rising curve passes ``threshold`` (linear between points).

    points: [(step, value)] sorted by step. Returns the step (float), or None if never passed.
    """
    prev = None
    for step, value in points:
        if value > threshold:
            if prev is None or prev[1] > threshold:
                return float(step)
            (s0, v0) = prev
            return s0 + (threshold - v0) / (value - v0) * (step - s0)
        prev = (step, value)
    return None


def curve_png(path, curves, hlines, title=""):
    """Two panels (phones, speakers): accuracy vs pretraining steps.

    curves: name -> {"steps": [...], "phones": [...], "speakers": [...]};
    hlines: name -> {"phones": v, "speakers": v} (baselines, dashed).
    """
    fig = rp._figure((980, 380))
    axes = fig.subplots(1, 2)
    names = list(curves) + list(hlines)
    colors = {n: rp.PALETTE[i % len(rp.PALETTE)] for i, n in enumerate(names)}
    for ax, metric in zip(axes, ("phones", "speakers")):
        for name, c in curves.items():
            ax.plot(c["steps"], c[metric], marker="o", linewidth=2, color=colors[name], label=name)
        for name, v in hlines.items():
            if v.get(metric) is not None:
                ax.axhline(v[metric], linestyle="--", linewidth=1.2, color=colors[name], label=name)
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel("accuracy (%)")
        ax.set_title({"phones": "frame phone accuracy (test voices)", "speakers": "speaker ID accuracy"}[metric])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return rp._save(fig, path)


def machine_info(threads, device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(), "device": device}
    try:
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_report(out, budget_name, budget, corpus, table, ranks, curves, ttp, info, timing, steps, spe):
    rows = list(table)
    md = rp.markdown_table(table, COLUMNS, rows=rows, row_header="representation", ranks=ranks)
    layers = "\n".join(f"- {r} ({table[r]['n_seeds']} seed(s)): phone-probe layer(s) {table[r]['phones_layers']}, speaker-probe layer(s) "
                       f"{table[r]['speakers_layers']}; dev accuracy phones {table[r]['phones_dev']:.1f}, "
                       f"speakers {table[r]['speakers_dev']:.1f}" for r in rows)
    ttp_line = ("not reached within the budget" if ttp is None else f"{ttp:.0f} steps")
    text = [
        f"# Quality benchmark ({budget_name} budget)",
        "",
        f"Corpus: {corpus['pretrain_hours']:.2f} h of pretraining audio "
        f"({len(corpus['pretrain_speakers'])} voices), {corpus['probe_hours']:.2f} h of held-out probe audio "
        f"({len(corpus['probe_speakers'])} festival voices); generated in {corpus['generation_seconds']:.0f} s "
        f"with {corpus['procs']} processes ({corpus['folder']}).",
        f"Pretraining: {budget.epochs} epochs x {spe} steps = **{steps} optimiser steps** per variant, batch "
        f"{budget.batch_size} utterances (crop_seconds {budget.overrides.get('crop_seconds', 'from the YAML')}), encoder "
        f"{budget.encoder or 'YAML default'}, seeds {budget.seeds}.",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, {info['threads']} "
        f"threads, device {info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}; load average at start "
        f"{info.get('load_average_start')}.",
        f"Wall time: corpus {timing['corpus']:.0f} s (0 = cached), pretraining {timing['pretrain']:.0f} s, "
        f"probes {timing['probes']:.0f} s, total {timing['total']:.0f} s; CPU time (load-independent): "
        f"pretraining {timing['pretrain_cpu']:.0f} s, probes {timing['probes_cpu']:.0f} s (runs reused from an "
        f"earlier invocation count 0).",
        "",
        md,
        "",
        "Mean rank over the two probes (1 = best on both): "
        + ", ".join(f"{r} {ranks[r]:.2f}" for r in sorted(ranks, key=lambda r: ranks[r]) if ranks[r] is not None),
        "",
        f"Steps full MGF needs to pass fbank +-5 on phones (first seed's curve): **{ttp_line}**.",
        "",
        "Chosen layers (0 = input embedding) and dev accuracies:",
        "",
        layers,
        "",
    ]
    if curves:
        text += ["Curves (first seed; test accuracy after each epoch):", ""]
        for name, c in curves.items():
            pts = ", ".join(f"{s}: {p:.1f} / {k:.1f}" for s, p, k in zip(c["steps"], c["phones"], c["speakers"]))
            text.append(f"- {name} (step: phones / speakers): {pts}")
        text.append("")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(text))
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    p.add_argument("--cache", default=os.path.join("~", ".cache", "mgf_sb", "quality"),
                   help="corpus cache folder (reused when present)")
    p.add_argument("--out", default=None, help="output folder (default results/quality/<budget>)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the budget's pretraining epochs")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--curve_variants", nargs="*", default=None, choices=list(VARIANTS),
                   help="variants probed after every epoch (first seed); default: full MGF and each scale alone, "
                        "so that the curve shows the best single scale")
    p.add_argument("--max_train_frames", type=int, default=None, help="phone-probe training frames")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides of hparams/mgf.yaml for every variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, default=2, help="processes for corpus generation")
    p.add_argument("--corpus_only", action="store_true", help="generate the corpus and stop")
    p.add_argument("--skip_fbank", action="store_true",
                   help="do not probe the fbank baselines (e.g. when another invocation on the same --out does)")
    p.add_argument("--report_only", action="store_true",
                   help="train and probe nothing: write the report from the finished runs and probes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    budget = copy.deepcopy(BUDGETS[args.budget])
    if args.seeds:
        budget.seeds = list(args.seeds)
    if args.epochs:
        budget.epochs = args.epochs
    if args.variants:
        budget.variants = list(args.variants)
    if args.curve_variants is not None:
        budget.curve_variants = list(args.curve_variants)
    budget.curve_variants = [v for v in budget.curve_variants if v in budget.variants]
    if args.max_train_frames:
        budget.max_train_frames = args.max_train_frames
    extra = dict(kv.split("=", 1) for kv in args.set)
    out = os.path.abspath(args.out or os.path.join(REPO, "results", "quality", args.budget))
    os.makedirs(out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args.threads, args.device)
    t_start = time.time()
    # wall seconds per phase, and CPU seconds (load-independent: on an idle machine with 2 cores
    # the wall time is about CPU / 2 for the 2-thread pretraining)
    timing = {"corpus": 0.0, "pretrain": 0.0, "probes": 0.0, "pretrain_cpu": 0.0, "probes_cpu": 0.0}

    t0 = time.time()
    corpus = build_corpus(args.cache, budget.corpus, procs=args.procs, log=log)
    timing["corpus"] = time.time() - t0 if time.time() - t0 > 1 else 0.0
    if args.corpus_only:
        return None
    n_train = sum(len(files) for _, _, files in os.walk(os.path.join(corpus["pretrain_folder"], "train"))
                  if files)
    spe = math.ceil(n_train / budget.batch_size)
    steps = budget.epochs * spe
    log(f"budget {args.budget}: {len(budget.variants)} variants x seeds {budget.seeds}, {budget.epochs} epochs x "
        f"{spe} steps = {steps} steps each; output {out}")

    from quality_probe import ProbeData, run_probes

    data = ProbeData(corpus)
    probe_dir = os.path.join(out, "probes")
    os.makedirs(probe_dir, exist_ok=True)

    def probe(key, **kw):
        """Runs (or reloads) the probes of one representation."""
        path = os.path.join(probe_dir, slug(key).replace("/", "__") + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        if args.report_only:
            return None
        t, cpu0 = time.time(), cpu_seconds()
        res = run_probes(data, max_train_frames=budget.max_train_frames, max_iter=budget.max_iter,
                         device=args.device, **kw)
        res["seconds"], res["cpu_seconds"] = time.time() - t, cpu_seconds() - cpu0
        timing["probes"] += res["seconds"]
        timing["probes_cpu"] += res["cpu_seconds"]
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(path + ".tmp", path)
        log(f"  probe {key}: phones {res['phones']['test']:.1f} (layer {res['phones']['layer']}), "
            f"speakers {res['speakers']['test']:.1f} (layer {res['speakers']['layer']}) [{res['seconds']:.0f} s]")
        return res

    def keep(row, seed, res):
        if res is not None:
            probes.setdefault(row, {})[seed] = res

    # Each run is probed as soon as it is trained, so an interrupted benchmark keeps its results
    # (--report_only writes the report from whatever is finished).
    probes, curves, seed0 = {}, {}, budget.seeds[0]
    # random-init encoder: full MGF's architecture and normaliser (skipped when full MGF is not run)
    reference_variant = "full MGF"
    for seed in budget.seeds:
        for kind in ("fbank", "fbank+-5") if not args.skip_fbank else ():
            keep(kind, seed, probe(f"{kind}/seed{seed}", kind=kind, seed=seed))
        for variant in budget.variants:
            run_dir = os.path.join(out, "runs", slug(variant), f"seed{seed}")
            final = os.path.join(run_dir, "snapshots", f"epoch{budget.epochs}")
            if not args.report_only:
                os.makedirs(run_dir, exist_ok=True)
                ov = recipe_overrides(budget, corpus, variant, seed, run_dir, args.threads, args.device, extra)
                log(f"pretraining {variant} (seed {seed})")
                cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)
                sec = pretrain(run_dir, ov, budget.epochs)
                timing["pretrain"] += sec
                timing["pretrain_cpu"] += cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0
                log(f"  done in {sec:.0f} s" if sec else "  already done")
            if not os.path.isdir(final):
                log(f"  {variant} (seed {seed}) not trained: left out of the report")
                continue
            res = probe(f"{variant}/seed{seed}/epoch{budget.epochs}", kind="encoder", source=final, seed=seed)
            if res is not None:
                res["steps"] = run_steps(final)
            keep(variant, seed, res)
            if variant == reference_variant:
                keep("random", seed, probe(f"random/seed{seed}", kind="random", reference=final, seed=seed))
            if seed == seed0 and variant in budget.curve_variants:  # accuracy after every epoch
                c = {"steps": [], "phones": [], "speakers": []}
                for e in range(1, budget.epochs + 1):
                    snap = os.path.join(run_dir, "snapshots", f"epoch{e}")
                    r = res if e == budget.epochs else (
                        probe(f"{variant}/seed{seed}/epoch{e}", kind="encoder", source=snap, seed=seed)
                        if os.path.isdir(snap) else None)
                    if r is not None:
                        c["steps"].append(run_steps(snap))
                        c["phones"].append(r["phones"]["test"])
                        c["speakers"].append(r["speakers"]["test"])
                curves[variant] = c

    trained = [v for v in budget.variants if v in probes]
    if not trained or args.skip_fbank:
        log("finished without a report (nothing trained, or --skip_fbank); --report_only writes it")
        return None
    measured = probes[trained[0]][min(probes[trained[0]])]["steps"]
    if measured != steps:
        log(f"the runs took {measured} steps, not the {steps} planned; reporting {measured}")
        steps, spe = measured, measured // budget.epochs

    # -- report ------------------------------------------------------------------------------
    rows = list(budget.variants) + list(BASELINES)
    table = aggregate(probes, rows, budget.seeds)
    if "fbank+-5" not in table:
        raise SystemExit("the fbank +-5 probe has not run")
    ranks = rp.mean_ranks(table, COLUMNS, rows=list(table))
    singles = [v for v in SINGLE_SCALES if v in table]
    best_single = min(singles, key=lambda v: (ranks[v], -table[v]["phones"])) if singles else None
    ttp = None
    if "full MGF" in curves:
        pts = list(zip(curves["full MGF"]["steps"], curves["full MGF"]["phones"]))
        ttp = time_to_pass(pts, table["fbank+-5"]["phones"])
    # the curve: full MGF vs the best single scale (or the single scale that has a curve)
    single = best_single if best_single in curves else next((v for v in SINGLE_SCALES if v in curves), None)
    shown = {k: v for k, v in curves.items() if k in ("full MGF", single)}
    hlines = {b: {m: table[b][m] for m in ("phones", "speakers")} for b in BASELINES if b in table}
    what = "the best single scale" if single == best_single else "a single scale"
    curve_png(os.path.join(out, "quality_curve.png"), shown, hlines,
              title=f"full MGF vs {what} ({single}); seed {seed0}")
    rp.bar_chart_png(os.path.join(out, "quality_bars.png"), ["phones (frame acc.)", "speakers (acc.)"],
                     {r: [table[r]["phones"], table[r]["speakers"]] for r in table},
                     errors={r: [table[r]["phones_std"], table[r]["speakers_std"]] for r in table},
                     title=f"Quality benchmark ({args.budget}): {steps} steps, seeds {budget.seeds}",
                     ylabel="accuracy (%)")
    timing["total"] = time.time() - t_start
    try:
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    text = write_report(out, args.budget, budget, corpus, table, ranks, curves, ttp, info, timing, steps, spe)
    result = {"budget": args.budget, "steps": steps, "steps_per_epoch": spe, "epochs": budget.epochs,
              "seeds": budget.seeds, "encoder": budget.encoder, "overrides": {**budget.overrides, **extra},
              "table": table, "mean_ranks": ranks, "best_single_scale": best_single, "curves": curves,
              "steps_to_pass_fbank_pm5_phones": ttp, "machine": info, "timing": timing,
              "corpus": {k: v for k, v in corpus.items() if k != "probe"}, "probes": probes}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
