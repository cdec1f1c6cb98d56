#!/usr/bin/env python3
"""Quality benchmark: does full MGF beat each scale alone, its peers, a random encoder and fbank?

    python benchmarks/quality.py                      # default budget (sized for <= 60 min on 2 idle cores)
    python benchmarks/quality.py --budget=long --device=cuda   # longer runs, larger encoder, a GPU
    python benchmarks/quality.py --budget=tiny        # the whole pipeline on a few utterances (the test's)

1. **Corpus** (generated on first use, cached under ``--cache``, default
   ``~/.cache/mgf_sb/quality``; ``benchmarks/quality_corpus.py``): pretraining speech from
   espeak-ng and flite voices, and held-out probe speech from festival voices (the only engine
   with phone timings). No probe voice shares a synthesiser base voice with a pretraining voice,
   probe sentences come from a vocabulary disjoint from the pretraining sentences', and every
   utterance has its own random channel (EQ, noise, level), so no speaker is known by its channel.
2. **Pretraining**: each variant is ``recipes/pretrain/train.py hparams/mgf.yaml`` plus overrides
   (the command a user runs, so the YAML's defaults flow through): full MGF, each scale alone,
   each pair, and SpeechBrain's BEST-RQ and wav2vec 2.0 objectives on the same encoder, front end,
   corpus and steps, for each seed. Every variant gets the same settings (no per-variant tuning).
   ``--jobs`` runs go side by side (one thread each); the export is snapshotted after each epoch
   for the time-to-quality curve; each run's CPU seconds are measured.
3. **Probes** on frozen features of the held-out voices (``benchmarks/quality_probe.py``): frame
   phone classification (linear; labels at each representation's own frame centres; layer and
   L2 chosen on dev voices, scored on test voices at 100 frames/s) and speaker identification
   (linear on pooled mean + std; layer and L2 chosen on dev utterances; >= 625 test utterances),
   for every variant and for the baselines fbank, fbank with +-5 frames of context and the
   random-init encoder (same architecture and normaliser as full MGF).
4. **Report** in ``--out`` (default ``results/quality/<budget>``): ``report.md`` (table with
   mean +- sample std over seeds; every difference the report states as a paired bootstrap
   interval over test utterances and seeds, "not resolved" where it spans 0; the time to pass
   fbank +-5), ``results.json``, ``quality_bars.png`` and ``quality_curve.png`` (probe accuracy
   vs pretraining CPU seconds, full MGF vs the best single scale, baselines as lines).

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
import shutil
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mgf_sb import grid  # noqa: E402
from mgf_sb import report as rp  # noqa: E402
from mgf_sb.pretrained_folder import read_config  # noqa: E402
from quality_corpus import CorpusSpec, build_corpus  # noqa: E402


_PEER = {"use_frame": False, "use_phoneme": False, "use_utterance": False}
# Variant name -> overrides of hparams/mgf.yaml (the README's ablation grid + SpeechBrain's peers).
VARIANTS = {
    "full MGF": {},
    "frame": {"use_phoneme": False, "use_utterance": False},  # the TERA / Mockingjay-style row
    "phoneme": {"use_frame": False, "use_utterance": False},
    "utterance": {"use_frame": False, "use_phoneme": False},
    "frame+phoneme": {"use_utterance": False},
    "frame+utterance": {"use_phoneme": False},
    "phoneme+utterance": {"use_frame": False},
    "BEST-RQ": {**_PEER, "use_bestrq": True},
    "wav2vec 2.0": {**_PEER, "use_wav2vec2": True},
}
SINGLE_SCALES = ("frame", "phoneme", "utterance")
PAIRS = ("frame+phoneme", "frame+utterance", "phoneme+utterance")
PEERS = ("BEST-RQ", "wav2vec 2.0")
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
    speaker_split: tuple = (4, 20)  # dev / test utterances per probe voice (the rest train)


BUDGETS = {
    # the test's: a few voices and utterances, two variants, 2 epochs of a 2-layer d=32 encoder
    "tiny": Budget(CorpusSpec(n_pretrain_speakers=3, pretrain_utts=3, n_probe_speakers=4, probe_utts=4,
                              two_sentence_prob=0.0), TINY_ENCODER, epochs=2, batch_size=4, variants=["full MGF", "frame"],
                   seeds=[0, 1], curve_variants=["full MGF"], max_train_frames=3000, max_iter=50,
                   overrides={"crop_seconds": 3.0}, speaker_split=(1, 2)),
    # sized for <= 60 min on 2 idle CPU cores (one-time corpus generation apart): see
    # benchmarks/RESULTS.md for the measured CPU seconds per step and per probe
    "default": Budget(CorpusSpec(), SMALL_ENCODER, epochs=3, batch_size=8, variants=list(VARIANTS), seeds=[0, 1, 2],
                      curve_variants=["full MGF", *SINGLE_SCALES, *PEERS], max_train_frames=15000,
                      overrides={"crop_seconds": 3.0}),
    # longer runs (a GPU): more audio, the YAML's own encoder size, 5 seeds
    "long": Budget(dataclasses.replace(CorpusSpec(), n_pretrain_speakers=96, pretrain_utts=40),
                   {}, epochs=30, batch_size=16, variants=list(VARIANTS), seeds=[0, 1, 2, 3, 4],
                   curve_variants=["full MGF", *SINGLE_SCALES, *PEERS], max_train_frames=60000),
}


def log(msg):
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(name):
    return name.replace(" ", "_").replace("+", "_").replace("-", "m").replace(".", "")


# ----------------------------------------------------------------------------------------------
# Pretraining (the recipe, as a user runs it)
# ----------------------------------------------------------------------------------------------
def peer_schedules(variant, steps):
    """Schedules of a peer stretched to the run, as the lr and EMA schedules are: SpeechBrain's
    wav2vec 2.0 recipe decays the Gumbel temperature 2.0 -> 0.25 by 0.999995 per step, reaching
    its floor near the end of its 400 k steps; here the same start and floor over ``steps``."""
    if VARIANTS[variant].get("use_wav2vec2"):
        return {"wav2vec2_temperature_decay": f"[2.0, 0.25, {(0.25 / 2.0) ** (1.0 / max(1, steps)):.6f}]"}
    return {}


def recipe_overrides(budget, corpus, variant, seed, run_dir, threads, device, extra, steps=None):
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
        **(peer_schedules(variant, steps) if steps else {}),
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


def pretrain_step(variant, seed, run_dir, overrides, epochs):
    """One pretraining run as a grid step: the recipe command; its output is the export of the
    last epoch, snapshotted (with every earlier epoch's) under ``<run_dir>/snapshots``."""
    cmd = grid.recipe_command(os.path.join("recipes", "pretrain", "train.py"), os.path.join("hparams", "mgf.yaml"),
                              overrides)
    return grid.Step(name=f"pretrain {variant} / seed {seed}", kind="pretrain", folder=run_dir, command=cmd,
                     row=variant, seed=seed, result_path=os.path.join(run_dir, "snapshots", f"epoch{epochs}"))


def snapshot_run(step):
    """Snapshots a new export of a running (or just finished) pretraining step."""
    pretrained = os.path.join(step.folder, "pretrained")
    if os.path.isfile(os.path.join(pretrained, "mgf_config.json")):
        try:
            _snapshot(pretrained, os.path.join(step.folder, "snapshots"))
        except OSError:  # the recipe is rewriting the export: the next poll takes it
            pass


def run_output(step):
    """A pretraining step's result: its last epoch's snapshot (raises while it is missing)."""
    snapshot_run(step)
    if not os.path.isfile(os.path.join(step.result_path, "mgf_config.json")):
        raise FileNotFoundError(f"{step.result_path}: no export of the last epoch")
    return step.result_path


class ProbeQueue:
    """Probes waiting to run in the benchmark's own process (the grid's ``background`` work)."""

    def __init__(self, probe):
        self.probe, self.items = probe, []

    def add(self, items):
        self.items += items

    def pending(self):
        return bool(self.items)

    def run_one(self):
        key, kw = self.items.pop(0)
        if kw.get("source") and not os.path.isdir(kw["source"]):
            return
        self.probe(key, **kw)


def run_steps(snapshot):
    return int(read_config(snapshot)["meta"]["step"])


def run_record(step):
    """Wall and CPU seconds of a finished pretraining step (its grid mark) and its steps."""
    mark = grid.read_mark(step) or {}
    steps = run_steps(step.result_path)
    cpu = mark.get("cpu_seconds")
    return {"variant": step.row, "seed": step.seed, "wall_seconds": mark.get("seconds"), "cpu_seconds": cpu,
            "steps": steps, "cpu_seconds_per_step": None if cpu is None else round(cpu / max(1, steps), 4)}


# ----------------------------------------------------------------------------------------------
# Aggregation and comparisons
# ----------------------------------------------------------------------------------------------
COLUMNS = [rp.Column("phones", "phones, frame acc. % (test voices)"),
           rp.Column("speakers", "speakers, acc. % (test utts)")]
METRICS = ("phones", "speakers")


def sample_std(values):
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else None


def aggregate(probes, rows, seeds):
    """probes[row][seed] = run_probes() output -> table dict row -> {metric, metric_std, ...}."""
    table = {}
    for row in rows:
        got = [probes[row][s] for s in seeds if s in probes.get(row, {})]
        if not got:
            continue
        entry = {"n_seeds": len(got)}
        for m in METRICS:
            vals = [g[m]["test"] for g in got]
            entry[m], entry[m + "_std"] = float(np.mean(vals)), sample_std(vals)
            entry[m + "_dev"] = float(np.mean([g[m]["dev_best"] for g in got]))
            entry[m + "_layers"] = [g[m]["layer"] for g in got]
            entry[m + "_l2"] = [g[m].get("l2") for g in got]
            entry[m + "_per_seed"] = vals
        entry["speakers_n_test"] = got[0]["speakers"].get("n_test")
        table[row] = entry
    return table


def best_on_dev(table, candidates):
    """The candidate with the highest mean of its dev phone and dev speaker accuracies (chosen on
    dev, so the test comparison that follows is not a selection on test)."""
    cands = [c for c in candidates if c in table]
    if not cands:
        return None
    return max(cands, key=lambda c: (table[c]["phones_dev"] + table[c]["speakers_dev"], table[c]["phones_dev"]))


def compare(probes, a, b, seeds, n_boot=4000, split="test", probes_b=None):
    """Paired bootstrap A - B on both probes -> {metric: paired_bootstrap dict}.

    ``split`` "dev" compares the dev utterances (at each run's own chosen layer and L2): the
    split on which defaults are chosen. ``probes_b`` holds B when it comes from another folder.
    """
    from quality_probe import paired_bootstrap

    probes_b = probes if probes_b is None else probes_b
    out = {}
    for m in METRICS:
        sa = [probes[a][s][m][split + "_items"] for s in seeds if s in probes.get(a, {})]
        sb = [probes_b[b][s][m][split + "_items"] for s in seeds if s in probes_b.get(b, {})]
        if sa and sb:
            out[m] = paired_bootstrap(sa, sb, n_boot=n_boot)
    return out


def load_probes(folder, variant, seeds, epochs):
    """probes[variant][seed] of another output folder (seeds not probed there are left out)."""
    out = {}
    for seed in seeds:
        path = os.path.join(folder, "probes", slug(f"{variant}/seed{seed}/epoch{epochs}").replace("/", "__") + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                out[seed] = json.load(f)
    return {variant: out}


def compare_with_before(probes, before, variants, seeds, epochs):
    """Each variant here minus the same variant in the folder ``before`` (e.g. the previous defaults),
    on dev and test -> {variant: {"dev": {...}, "test": {...}, "seeds": [...]}}; variants or seeds
    missing on either side are left out."""
    out = {}
    for v in variants:
        old = load_probes(before, v, seeds, epochs)
        done = sorted(set(probes.get(v, {})) & set(old[v]))
        if done:
            # a folder probed before per-utterance dev outcomes were kept compares on test only
            both = [by_seed[s] for by_seed in (probes[v], old[v]) for s in done]
            out[v] = {"seeds": done}
            for split in ("dev", "test"):
                has_items = all(split + "_items" in p[m] for p in both for m in METRICS)
                out[v][split] = compare(probes, v, v, done, split=split, probes_b=old) if has_items else {}
    return out


def fmt_diff(c):
    """'+0.81 [+0.31, +1.39] ▲' (▲/▼: the 95 % interval excludes 0)."""
    if c is None:
        return "n/a"
    mark = "" if not c["resolved"] else (" ▲" if c["diff"] > 0 else " ▼")
    return f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]{mark}"


def verdict(c, a, b):
    if c is None:
        return "n/a"
    txt = f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
    if not c["resolved"]:
        return txt + " not resolved"
    return txt + (f" **{a} better**" if c["diff"] > 0 else f" **{b} better**")


def time_to_pass(points, threshold):
    """First x at which a rising curve passes ``threshold`` (linear between points).

    points: [(x, value)] sorted by x. Returns x (float), or None if never passed.
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
    """Two panels (phones, speakers): accuracy vs pretraining CPU seconds.

    curves: name -> {"cpu_seconds": [...], "phones": [...], "speakers": [...]};
    hlines: name -> {"phones": v, "speakers": v} (baselines, dashed).
    """
    fig = rp._figure((980, 380))
    axes = fig.subplots(1, 2)
    names = list(curves) + list(hlines)
    colors = {n: rp.PALETTE[i % len(rp.PALETTE)] for i, n in enumerate(names)}
    for ax, metric in zip(axes, METRICS):
        for name, c in curves.items():
            ax.plot(c["cpu_seconds"], c[metric], marker="o", linewidth=2, color=colors[name], label=name)
        for name, v in hlines.items():
            if v.get(metric) is not None:
                ax.axhline(v[metric], linestyle="--", linewidth=1.2, color=colors[name], label=name)
        ax.set_xlabel("pretraining CPU seconds (1 thread)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title({"phones": "frame phone accuracy (test voices)", "speakers": "speaker ID accuracy"}[metric])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return rp._save(fig, path)


def machine_info(threads, device, jobs):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(), "jobs": jobs,
            "device": device}
    try:
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(v, std=None):
    return "—" if v is None else (f"{v:.2f}" + (f" ± {std:.2f}" if std is not None else ""))


def write_report(out, budget_name, budget, corpus, table, comparisons, picks, curves, ttp, info, timing, steps,
                 spe, runs, before=None, before_folder=None):
    rows = list(table)
    lines = ["| representation | phones, frame acc. % (test voices) | speakers, acc. % (test utts) | dev phones / "
             "dev speakers | layers chosen (phones; speakers) | CPU s / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = table[r]
        cps = runs.get(r, {}).get("cpu_seconds_per_step")
        lines.append(f"| {r} | {_fmt(t['phones'], t['phones_std'])} | {_fmt(t['speakers'], t['speakers_std'])} | "
                     f"{t['phones_dev']:.1f} / {t['speakers_dev']:.1f} | {t['phones_layers']}; {t['speakers_layers']} "
                     f"| {'—' if cps is None else f'{cps:.2f}'} |")
    comp = ["| full MGF minus | phones (points, 95 % interval) | speakers (points, 95 % interval) |", "|---|---|---|"]
    for other, c in comparisons.items():
        comp.append(f"| {other} | {verdict(c.get('phones'), 'full MGF', other)} | "
                    f"{verdict(c.get('speakers'), 'full MGF', other)} |")
    ttp_line = ("not crossed within the budget" if ttp is None else f"{ttp:.0f} CPU s")
    n_test_spk = next(iter(table.values())).get("speakers_n_test")
    text = [
        f"# Quality benchmark ({budget_name} budget)",
        "",
        f"Corpus: {corpus['pretrain_hours']:.2f} h of pretraining audio "
        f"({len(corpus['pretrain_speakers'])} espeak-ng / flite voices), {corpus['probe_hours']:.2f} h of held-out "
        f"probe audio ({len(corpus['probe_speakers'])} festival voices, no shared base voice, disjoint sentence "
        f"vocabulary, a random channel per utterance); generated in {corpus['generation_seconds']:.0f} s "
        f"with {corpus['procs']} processes ({corpus['folder']}).",
        f"Pretraining: {budget.epochs} epochs x {spe} steps = **{steps} optimiser steps** per run, batch "
        f"{budget.batch_size} utterances (crop_seconds {budget.overrides.get('crop_seconds', 'from the YAML')}), "
        f"encoder {budget.encoder or 'YAML default'}, seeds {budget.seeds}; every variant with the same settings "
        f"(no per-variant tuning).",
        f"Probes: phones: labels at each representation's frame centres, scored at 100 frames/s on "
        f"the test voices, layer and L2 chosen on the dev voices; speakers: {n_test_spk} test utterances "
        f"(binomial SE <= {100 * math.sqrt(0.25 / max(1, n_test_spk or 1)):.1f} points), layer and L2 chosen on dev.",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, {info['jobs']} runs side "
        f"by side x {info['threads']} thread(s), device {info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}; "
        f"load average at start {info.get('load_average_start')}, at end {info.get('load_average_end')}.",
        f"Wall time: corpus {timing['corpus']:.0f} s (0 = cached), pretraining + probes {timing['grid']:.0f} s, "
        f"total {timing['total']:.0f} s; CPU time (load-independent): pretraining {timing['pretrain_cpu']:.0f} s, "
        f"probes {timing['probes_cpu']:.0f} s (runs and probes reused from an earlier invocation count 0).",
        "",
        "Mean ± sample std over seeds; CPU s / step measured on the run itself (1 thread, teacher pass included).",
        "",
        *lines,
        "",
        f"Differences (paired bootstrap over the test utterances and, independently per row, the seeds; "
        f"4,000 replicates; 'not resolved' = the 95 % interval spans 0). Best single scale (chosen on dev): "
        f"**{picks.get('single')}**; best pair (chosen on dev): **{picks.get('pair')}**.",
        "",
        *comp,
        "",
        f"Pretraining CPU seconds full MGF needs to pass fbank +-5 on phones (first seed's curve): **{ttp_line}**.",
        "",
    ]
    if before:
        text += [f"This folder minus `{before_folder}` (the same variant there; paired bootstrap over utterances "
                 "and seeds, 95 %; ▲/▼ resolved; dev is the split defaults are chosen on):", "",
                 "| variant | dev phones | dev speakers | test phones | test speakers |", "|---|---|---|---|---|"]
        for v, c in before.items():
            text.append(f"| {v} | {fmt_diff(c['dev'].get('phones'))} | {fmt_diff(c['dev'].get('speakers'))} | "
                        f"{fmt_diff(c['test'].get('phones'))} | {fmt_diff(c['test'].get('speakers'))} |")
        text.append("")
    if curves:
        text += ["Curves (first seed; test accuracy after each epoch; step 0 = the random-init encoder):", ""]
        for name, c in curves.items():
            pts = ", ".join(f"{s} steps / {x:.0f} CPU s: {p:.1f} / {k:.1f}"
                            for s, x, p, k in zip(c["steps"], c["cpu_seconds"], c["phones"], c["speakers"]))
            text.append(f"- {name} (phones / speakers): {pts}")
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
                   help="variants probed after every epoch (first seed); default: full MGF, each scale alone "
                        "(so that the curve shows the best single scale) and the peers")
    p.add_argument("--max_train_frames", type=int, default=None, help="phone-probe training frames")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides of hparams/mgf.yaml for every variant")
    p.add_argument("--jobs", type=int, default=None,
                   help="pretraining runs side by side (default: the CPU count, at most 2 on CPU; 1 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default 1 when several runs go side by side)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, default=2, help="processes for corpus generation")
    p.add_argument("--corpus_only", action="store_true", help="generate the corpus and stop")
    p.add_argument("--on_change", default="error", choices=["error", "rerun"],
                   help="a run folder made with other settings: stop (error) or move it aside and train again")
    p.add_argument("--baselines_from", default=None,
                   help="a finished output folder of the same budget whose fbank, fbank +-5 and random-encoder "
                        "probes are reused (they do not depend on the pretraining settings); used by "
                        "benchmarks/quality_switches.py")
    p.add_argument("--before", default=None,
                   help="an output folder of the same budget (e.g. made with the previous defaults): the report "
                        "adds each variant here minus the same variant there, on dev and test")
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
    jobs = args.jobs or (1 if args.device != "cpu" else max(1, min(2, os.cpu_count() or 1)))
    threads = args.threads or (1 if jobs > 1 else None)
    out = os.path.abspath(args.out or os.path.join(REPO, "results", "quality", args.budget))
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, threads or torch.get_num_threads()))
    info = machine_info(threads, args.device, jobs)
    t_start = time.time()
    timing = {"corpus": 0.0, "grid": 0.0, "pretrain_cpu": 0.0, "probes_cpu": 0.0}

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
        f"{spe} steps = {steps} steps each; {jobs} run(s) side by side; output {out}")

    from quality_probe import ProbeData, run_probes

    data = ProbeData(corpus, speaker_split=budget.speaker_split)
    probe_dir = os.path.join(out, "probes")
    os.makedirs(probe_dir, exist_ok=True)
    seed0 = budget.seeds[0]

    def probe_path(key):
        return os.path.join(probe_dir, slug(key).replace("/", "__") + ".json")

    def probe(key, **kw):
        """Runs (or reloads) the probes of one representation."""
        path = probe_path(key)
        if os.path.isfile(path):
            with open(path) as f:
                res = json.load(f)
            if all("dev_items" in res[m] for m in METRICS) or args.report_only:
                return res
            log(f"  probe {key}: written by a version without per-utterance dev outcomes; probing again")
        shared = key.split("/")[0] in ("fbank", "fbank+-5", "random") and args.baselines_from
        if shared and os.path.isfile(os.path.join(args.baselines_from, "probes", os.path.basename(path))):
            # fbank needs no pretraining; the random encoder is drawn from the seed and the encoder
            # shape alone: both the same in every folder made with the same budget.
            with open(os.path.join(args.baselines_from, "probes", os.path.basename(path))) as f:
                res = json.load(f)
            if all("dev_items" in res[m] for m in METRICS):
                return res
        if args.report_only:
            return None
        t, cpu0 = time.time(), time.thread_time()
        res = run_probes(data, max_train_frames=budget.max_train_frames, max_iter=budget.max_iter,
                         device=args.device, **kw)
        res["seconds"], res["cpu_seconds"] = time.time() - t, time.thread_time() - cpu0
        timing["probes_cpu"] += res["cpu_seconds"]
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(path + ".tmp", path)
        log(f"  probe {key}: phones {res['phones']['test']:.1f} (layer {res['phones']['layer']}, l2 "
            f"{res['phones']['l2']:g}), speakers {res['speakers']['test']:.1f} (layer {res['speakers']['layer']}) "
            f"[{res['seconds']:.0f} s]")
        return res

    # -- the grid: pretraining runs side by side, each probed as soon as it is done ----------------
    runs = {}
    for seed in budget.seeds:
        for variant in budget.variants:
            run_dir = os.path.join(out, "runs", slug(variant), f"seed{seed}")
            ov = recipe_overrides(budget, corpus, variant, seed, run_dir, threads, args.device, extra, steps)
            runs[(variant, seed)] = pretrain_step(variant, seed, run_dir, ov, budget.epochs)
    queue = ProbeQueue(probe)
    if not args.report_only:
        queue.add([(f"{kind}/seed{seed}", {"kind": kind, "seed": seed})
                   for seed in budget.seeds for kind in ("fbank", "fbank+-5")])

    def probes_of_run(step, _out=None):
        variant, seed = step.row, step.seed
        final = step.result_path
        jobs_ = [(f"{variant}/seed{seed}/epoch{budget.epochs}", {"kind": "encoder", "source": final, "seed": seed})]
        if variant == "full MGF":
            jobs_.append((f"random/seed{seed}", {"kind": "random", "reference": final, "seed": seed}))
        if seed == seed0 and variant in budget.curve_variants:
            for e in range(1, budget.epochs):
                jobs_.append((f"{variant}/seed{seed}/epoch{e}", {
                    "kind": "encoder", "source": os.path.join(step.folder, "snapshots", f"epoch{e}"), "seed": seed}))
        queue.add(jobs_)

    t_grid = time.time()
    status = {s.name: grid.step_status(s, run_output) for s in runs.values()}
    log(f"{sum(v == 'done' for v in status.values())} pretraining run(s) already done, "
        f"{sum(v != 'done' for v in status.values())} to train")
    if args.report_only:
        status = {k: v if v == "done" else "not run" for k, v in status.items()}
    else:
        for s in runs.values():
            if status[s.name] == "done":
                probes_of_run(s)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        status = grid.execute(list(runs.values()), run_output, jobs=jobs, on_change=args.on_change, env=env,
                              log=log, on_poll=snapshot_run, on_done=probes_of_run, background=queue, name="quality")
    timing["grid"] = time.time() - t_grid
    failed = [k for k, s in runs.items() if status[s.name] in ("failed", "blocked")]
    if failed:
        log(f"{len(failed)} run(s) failed: {failed} (left out of the report; their logs are in their run folders)")

    # -- collect -----------------------------------------------------------------------------------
    probes, curves, run_records = {}, {}, {}
    for (variant, seed), r in runs.items():
        res = probe(f"{variant}/seed{seed}/epoch{budget.epochs}", kind="encoder", source=r.result_path,
                    seed=seed) if status[r.name] in ("done", "ran") else None
        if res is None:
            continue
        probes.setdefault(variant, {})[seed] = res
        rec = run_record(r)
        timing["pretrain_cpu"] += rec["cpu_seconds"] if status[r.name] == "ran" else 0.0
        run_records.setdefault(variant, []).append(rec)
        if variant == "full MGF":
            rnd = probe(f"random/seed{seed}", kind="random", reference=r.result_path, seed=seed)
            if rnd is not None:
                probes.setdefault("random", {})[seed] = rnd
        if seed == seed0 and variant in budget.curve_variants:
            c = {"steps": [], "cpu_seconds": [], "phones": [], "speakers": []}
            for e in range(1, budget.epochs + 1):
                snap = os.path.join(r.folder, "snapshots", f"epoch{e}")
                rr = res if e == budget.epochs else (
                    probe(f"{variant}/seed{seed}/epoch{e}", kind="encoder", source=snap, seed=seed)
                    if os.path.isdir(snap) else None)
                if rr is not None:
                    st = run_steps(snap)
                    c["steps"].append(st)
                    c["cpu_seconds"].append(st * (rec["cpu_seconds_per_step"] or float("nan")))
                    c["phones"].append(rr["phones"]["test"])
                    c["speakers"].append(rr["speakers"]["test"])
            curves[variant] = c
    for seed in budget.seeds:
        for kind in ("fbank", "fbank+-5"):
            res = probe(f"{kind}/seed{seed}", kind=kind, seed=seed)
            if res is not None:
                probes.setdefault(kind, {})[seed] = res
    start = probes.get("random", {}).get(seed0)
    for c in curves.values():  # step 0: the random-init encoder (full MGF's shape, seed0's draw)
        if start is not None:
            for k, v in (("steps", 0), ("cpu_seconds", 0.0), ("phones", start["phones"]["test"]),
                         ("speakers", start["speakers"]["test"])):
                c[k].insert(0, v)
    trained = [v for v in budget.variants if v in probes]
    if not trained or "fbank+-5" not in probes:
        log("finished without a report (nothing trained or probed yet)")
        return None
    recs = [x for v in run_records.values() for x in v if x.get("steps")]
    if recs and recs[0]["steps"] != steps:
        log(f"the runs took {recs[0]['steps']} steps, not the {steps} planned; reporting {recs[0]['steps']}")
        steps, spe = recs[0]["steps"], recs[0]["steps"] // budget.epochs

    # -- report ------------------------------------------------------------------------------------
    rows = list(budget.variants) + list(BASELINES)
    table = aggregate(probes, rows, budget.seeds)
    runs_summary = {v: {"cpu_seconds_per_step": float(np.mean([x["cpu_seconds_per_step"] for x in recs_]))}
                    for v, recs_ in run_records.items() if recs_ and all(x["cpu_seconds_per_step"] for x in recs_)}
    picks = {"single": best_on_dev(table, SINGLE_SCALES), "pair": best_on_dev(table, PAIRS)}
    comparisons = {}
    if "full MGF" in table:
        others = [v for v in SINGLE_SCALES if v in table] + [p for p in (picks["pair"],) if p] + \
                 [v for v in PEERS if v in table] + [b for b in ("fbank+-5", "random") if b in table]
        for o in others:
            comparisons[o] = compare(probes, "full MGF", o, budget.seeds)
    ttp = None
    if "full MGF" in curves and "fbank+-5" in table:
        pts = list(zip(curves["full MGF"]["cpu_seconds"], curves["full MGF"]["phones"]))
        ttp = time_to_pass(pts, table["fbank+-5"]["phones"])
    single = picks["single"] if picks["single"] in curves else next((v for v in SINGLE_SCALES if v in curves), None)
    shown = {k: v for k, v in curves.items() if k in ("full MGF", single, *PEERS)}
    hlines = {b: {m: table[b][m] for m in METRICS} for b in ("fbank+-5", "random") if b in table}
    what = "the best single scale (chosen on dev)" if single == picks["single"] else "a single scale"
    curve_png(os.path.join(out, "quality_curve.png"), shown, hlines,
              title=f"full MGF vs {what} ({single}) and the peers; seed {seed0}")
    rp.bar_chart_png(os.path.join(out, "quality_bars.png"), ["phones (frame acc.)", "speakers (acc.)"],
                     {r: [table[r]["phones"], table[r]["speakers"]] for r in table},
                     errors={r: [table[r]["phones_std"], table[r]["speakers_std"]] for r in table},
                     title=f"Quality benchmark ({args.budget}): {steps} steps, seeds {budget.seeds} (± sample std)",
                     ylabel="accuracy (%)")
    timing["total"] = time.time() - t_start
    try:
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    before = None
    if args.before:
        before = compare_with_before(probes, os.path.abspath(args.before), [v for v in budget.variants if v in probes],
                                     budget.seeds, budget.epochs)
    text = write_report(out, args.budget, budget, corpus, table, comparisons, picks, curves, ttp, info, timing,
                        steps, spe, runs_summary, before=before, before_folder=args.before)
    result = {"budget": args.budget, "steps": steps, "steps_per_epoch": spe, "epochs": budget.epochs,
              "seeds": budget.seeds, "encoder": budget.encoder, "overrides": {**budget.overrides, **extra},
              "table": table, "comparisons": comparisons, "picks": picks, "curves": curves,
              "cpu_seconds_to_pass_fbank_pm5_phones": ttp, "machine": info, "timing": timing,
              "before": {"folder": args.before, "comparisons": before} if args.before else None,
              "runs": {v: recs_ for v, recs_ in run_records.items()}, "failed_runs": [list(k) for k in failed],
              "corpus": {k: v for k, v in corpus.items() if k not in ("probe", "pretrain")},
              "probes": {r: {str(s): {m: {k: v for k, v in res[m].items() if k not in ("test_items", "test_ids", "dev_items")}
                                      for m in METRICS} for s, res in by_seed.items()} for r, by_seed in probes.items()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
