#!/usr/bin/env python3
"""Quality benchmark: does full MGF beat each scale alone, its peers, a random encoder and fbank?

    python benchmarks/quality.py                      # default budget (sized for <= 60 min on 2 idle cores)
    python benchmarks/quality.py --budget=long          # 4x the steps: full MGF, phoneme, the peers, 3 seeds (its own flag)
    python benchmarks/quality.py --budget=gpu --device=cuda    # longer runs, larger encoder, a GPU
    python benchmarks/quality.py --dry_run           # the plan, what is cached, the estimated CPU and wall time
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
   (linear on pooled mean + std; layer and L2 chosen on dev utterances, one choice per variant
   over all its seeds' dev utterances; >= 2,000 test utterances),
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
from mgf_sb.report_plots import PALETTE, _figure, _save  # noqa: E402
from mgf_sb.pretrained_folder import read_config  # noqa: E402
from quality_corpus import CorpusSpec, build_corpus  # noqa: E402
from quality_speaker_ref import REF_ROW, RefSettings, finished_model, settings_args  # noqa: E402


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
# representations probed without pretraining: one probe each, whatever the seed (fbank's phone
# probe draws its training frames with the seed, so fbank and fbank +-5 are probed per seed)
ENERGY, CEILING = "level (log-energy)", "Resemblyzer (real voices)"


@dataclasses.dataclass
class Budget:
    """Everything a budget fixes. ``epochs``: pretraining epochs (steps = epochs x steps/epoch,
    stated in the report); ``curve_variants``: variants probed after the ``curve_epochs``
    (default every epoch; first seed); ``speaker_split``: (dev, test) utterances per voice of
    the speaker-identification probe; ``n_trials``: (dev, test) target trials of zero-shot
    verification, as many non-target trials."""

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
    speaker_split: tuple = (4, 28)
    n_trials: tuple = (1000, 2000)
    curve_epochs: list = None
    compare_with: str = None  # the budget whose curves the time-to-quality plot shows beside
    # the speaker reference row (quality_speaker_ref): RefSettings fields (steps, batch_size, model
    # size...) and "seeds" (those of ``seeds`` it is trained for); None: no reference row
    speaker_ref: dict = None


# the issue's recipe (357 steps reached EER 10.8 % on look-alike voices): 360 steps of 64
# utterances, ~2.0 CPU s a step on 1 thread (12 CPU min a seed); 3 seeds; the same at the long budget
SPEAKER_REF = {"steps": 360, "batch_size": 64, "seeds": [0, 1, 2]}
TINY_CORPUS = CorpusSpec(n_pretrain_speakers=3, pretrain_utts=3, n_probe_speakers=4, probe_utts=4, n_speaker_voices=9,
                         speaker_utts=4, n_emotion_voices=4, emotion_utts=1, two_sentence_prob=0.0)
BUDGETS = {
    # the test's: a few voices and utterances, two variants, 2 epochs of a 2-layer d=32 encoder
    "tiny": Budget(TINY_CORPUS, TINY_ENCODER, epochs=2, batch_size=4, variants=["full MGF", "frame"],
                   seeds=[0, 1], curve_variants=["full MGF"], max_train_frames=3000, max_iter=50,
                   overrides={"crop_seconds": 3.0}, speaker_split=(1, 2), n_trials=(20, 40),
                   speaker_ref={"steps": 4, "batch_size": 4, "seeds": [0, 1], "channels": (16, 16, 16, 16),
                                "emb_dim": 16, "proj_dim": 16, "crop_seconds": 1.0}),
    # sized for <= 90 min wall on 2 idle CPU cores (one-time corpus generation apart): see
    # benchmarks/RESULTS.md for the measured CPU seconds per step and per probe
    "default": Budget(CorpusSpec(), SMALL_ENCODER, epochs=3, batch_size=8, variants=list(VARIANTS),
                      seeds=[0, 1, 2, 3, 4], curve_variants=["full MGF", "phoneme", "BEST-RQ"], max_train_frames=15000,
                      overrides={"crop_seconds": 3.0}, speaker_ref=SPEAKER_REF),
    # 4x the default's steps on the same corpus and encoder: full MGF, the default's best single
    # scale (phoneme), the peers; the random encoder comes with full MGF; its own flag (--budget=long)
    "long": Budget(CorpusSpec(), SMALL_ENCODER, epochs=12, batch_size=8, variants=["full MGF", "phoneme", "BEST-RQ",
                                                                               "wav2vec 2.0"],
                   seeds=[0, 1, 2], curve_variants=["full MGF", "phoneme", "BEST-RQ", "wav2vec 2.0"],
                   max_train_frames=15000, overrides={"crop_seconds": 3.0}, curve_epochs=[3, 6, 9],
                   compare_with="default", speaker_ref=SPEAKER_REF),
    # longer runs on a GPU: more audio, the YAML's own encoder size, 5 seeds
    "gpu": Budget(dataclasses.replace(CorpusSpec(), n_pretrain_speakers=96, pretrain_utts=40),
                  {}, epochs=30, batch_size=16, variants=list(VARIANTS), seeds=[0, 1, 2, 3, 4],
                  curve_variants=["full MGF", *SINGLE_SCALES, *PEERS], max_train_frames=60000,
                  speaker_ref={**SPEAKER_REF, "steps": 1440}),
}
# measured CPU seconds (1 thread, 2-core VM; benchmarks/RESULTS.md) for --dry_run's estimate when
# the output folder has no measurement of its own: per pretraining step, per probe of each kind,
# per generated utterance
EST_CPU_PER_STEP = {"full MGF": 0.29, "frame": 0.26, "phoneme": 0.28, "utterance": 0.24, "frame+phoneme": 0.29,
                    "frame+utterance": 0.27, "phoneme+utterance": 0.28, "BEST-RQ": 0.38, "wav2vec 2.0": 0.60}
EST_PROBE_CPU = {"encoder": 53.0, "random": 53.0, "fbank": 13.0, "fbank+-5": 29.0, "energy": 2.0, "resemblyzer": 92.0,
                 "speaker_ref": 90.0}  # speaker_ref: not yet measured (5 layers of 320 channels)
EST_CPU_PER_STEP[REF_ROW] = 1.64  # batch 64, 1 thread: 1.63-1.65 CPU s / step measured (3 seeds, default budget)
EST_CPU_PER_UTTERANCE = 0.5  # 1,740 s with 2 processes for 6,780 utterances, under load


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


def random_reference_variant(variants):
    """The variant whose runs give the random-init rows their shape and normaliser: full MGF where it
    is run, else the first variant (a folder of other variants then has random rows of its shape)."""
    return "full MGF" if "full MGF" in variants else variants[0]


def encoder_architecture(folder):
    """The encoder config of a pretrained folder (``mgf_config.json``), or None where unreadable."""
    try:
        with open(os.path.join(folder, "mgf_config.json")) as f:
            return json.load(f)["encoder"]
    except (OSError, TypeError, ValueError, KeyError):
        return None


def same_architecture(folder_a, folder_b):
    """Whether two pretrained folders hold encoders of one shape: then their random-init rows (drawn
    from the seed and the shape alone) are the same, and one folder may reuse the other's. A switch
    that changes the shape (``branch_layers``, ...) gets its own random-init rows. False where either
    is unreadable."""
    a = encoder_architecture(folder_a)
    return a is not None and a == encoder_architecture(folder_b)


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
# The speaker reference row (benchmarks/quality_speaker_ref.py), trained as a grid step
# ----------------------------------------------------------------------------------------------
REF_KEY = "speaker_ref"  # its run folders (runs/speaker_ref/seed<k>) and probe keys


def ref_seeds(budget):
    """Seeds the reference is trained for: its own, those of the budget's seeds (at least the first)."""
    if not budget.speaker_ref:
        return []
    return [s for s in budget.speaker_ref.get("seeds", budget.seeds) if s in budget.seeds] or budget.seeds[:1]


def ref_settings(budget, seed):
    """The reference's :class:`quality_speaker_ref.RefSettings` for one seed."""
    return RefSettings(**{k: v for k, v in budget.speaker_ref.items() if k != "seeds"}, seed=seed)


def ref_step(budget, corpus, seed, run_dir, device):
    """One reference training run as a grid step (its command holds every setting, so a changed
    setting is a changed step; threads come from OMP_NUM_THREADS)."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality_speaker_ref.py"),
           "--pretrain_folder", corpus["pretrain_folder"], "--out", run_dir,
           *settings_args(ref_settings(budget, seed)), *(["--device", device] if device != "cpu" else [])]
    return grid.Step(name=f"{REF_KEY} / seed {seed}", kind="pretrain", folder=run_dir, command=cmd, row=REF_ROW,
                     seed=seed, result_path=run_dir)


def ref_output(step):
    """A reference step's result: its run folder once the finished model is there (raises before)."""
    finished_model(step.result_path)
    return step.result_path


def ref_record(step):
    """CPU seconds of a finished reference run: its process's (the grid mark) when this benchmark ran
    it, else its training loop's own count; its steps."""
    res = finished_model(step.result_path)
    mark = grid.read_mark(step) or {}
    cpu = mark.get("cpu_seconds") or res["cpu_seconds"]
    return {"variant": REF_ROW, "seed": step.seed, "wall_seconds": mark.get("seconds"), "cpu_seconds": cpu,
            "steps": res["steps"], "cpu_seconds_per_step": round(cpu / max(1, res["steps"]), 4),
            "final_nt_xent": res["loss"], "final_partner_acc": res["acc"]}


# ----------------------------------------------------------------------------------------------
# Aggregation and comparisons
# ----------------------------------------------------------------------------------------------
METRICS = ("phones", "speakers", "eer", "emotion")
LOWER_IS_BETTER = {"eer"}
LABELS = {"phones": "phones, frame acc. %", "speakers": "speaker ID acc. %", "eer": "zero-shot speaker EER %",
          "emotion": "emotion acc. %"}
SEEDLESS = (ENERGY, CEILING)  # probed once: nothing in them depends on a seed
# the issue's targets for the 95 % interval half-width of pretrained-vs-pretrained differences
HALF_WIDTH_TARGETS = {"phones": 0.6, "speakers": 1.5, "eer": 2.0}


def sample_std(values):
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else None


def _seeds_of(probes, row, seeds):
    have = probes.get(row, {})
    return sorted(have) if row in SEEDLESS else [s for s in seeds if s in have]


def aggregate(probes, rows, seeds):
    """probes[row][seed] = run_probes() output -> table dict row -> {metric, metric_std, ...}
    (a metric a representation has no probe for, e.g. phones of an utterance embedding: None)."""
    table = {}
    for row in rows:
        got = [probes[row][s] for s in _seeds_of(probes, row, seeds)]
        if not got:
            continue
        entry = {"n_seeds": len(got)}
        for m in METRICS:
            if any(g.get(m) is None for g in got):
                entry[m] = entry[m + "_std"] = entry[m + "_dev"] = None
                continue
            vals = [g[m]["test"] for g in got]
            entry[m], entry[m + "_std"] = float(np.mean(vals)), sample_std(vals)
            entry[m + "_dev"] = float(np.mean([g[m]["dev_best"] for g in got]))
            entry[m + "_layers"] = [g[m]["layer"] for g in got]
            entry[m + "_per_variant"] = all(g[m].get("chosen_on") == "variant" or g.get("n_layers") == 1 for g in got)
            entry[m + "_l2"] = [g[m].get("l2") for g in got]
            entry[m + "_per_seed"] = vals
        entry["speakers_n_test"] = got[0]["speakers"].get("n_test")
        entry["emotion_n_test"] = got[0]["emotion"].get("n_test")
        entry["eer_n_trials"] = got[0]["eer"].get("n_trials")
        heads = [g.get("eer_head") for g in got]  # the utterance head's own embedding (variants with one)
        if all(h is not None for h in heads):
            entry["eer_head"], entry["eer_head_std"] = float(np.mean([h["test"] for h in heads])), \
                sample_std([h["test"] for h in heads])
        hard = [g["eer"].get("same_base_test") for g in got]
        entry["eer_same_base"] = float(np.mean(hard)) if all(x is not None for x in hard) else None
        ib = [g.get("speakers_input_proj") for g in got]  # the input block's diagnostic (MGF encoders)
        if ib and all(x is not None for x in ib):
            entry["sid_input_proj"] = float(np.mean([x["input_proj"] for x in ib]))
            entry["sid_layer0"] = float(np.mean([x["layer0"] for x in ib]))
        sb = [g["speakers"].get("same_base_errors") for g in got]
        entry["same_base_errors"] = float(np.mean(sb)) if all(x is not None for x in sb) else None
        table[row] = entry
    return table


CHOSEN_PER_VARIANT = ("speakers", "emotion", "eer")
# phones too, where every seed's probe file keeps its candidates (files written before that keep
# each run's own choice unless --phone_candidates probes their phones again)
CHOSEN_PER_VARIANT_IF_ALL = ("phones",)


def at_choice(res, choice, data):
    """Rewrites one probe result (in memory) at the candidate ``choice[metric]`` (an index into its
    ``candidates``) for each utterance-level metric: layer, L2, dev and test outcomes."""
    from quality_probe import emotion_test_scores, eer, speaker_test_scores

    for m, i in choice.items():
        r = res.get(m)
        if r is None or not r.get("candidates") or i >= len(r["candidates"]):
            continue
        c = r["candidates"][i]
        r["layer"], r["choice"], r["chosen_on"] = c["layer"], i, "variant"
        if m == "phones":
            dev, test = np.asarray(c["dev_items"]).reshape(-1, 2), np.asarray(c["test_items"]).reshape(-1, 2)
            r["l2"], r["dev_items"], r["test_items"] = c["l2"], c["dev_items"], c["test_items"]
            r["dev_best"] = 100.0 * dev[:, 0].sum() / dev[:, 1].sum()
            r["test"] = 100.0 * test[:, 0].sum() / test[:, 1].sum()
        elif m == "eer":
            r["dev_best"], r["test_scores"] = c["dev_eer"], c["test_scores"]
            r["test"] = eer(np.asarray(c["test_scores"]), np.asarray(r["test_trials"]["target"], dtype=bool))
        else:
            r["l2"], r["dev_items"] = c["l2"], c["dev_items"]
            r["dev_best"] = 100.0 * float(np.mean(c["dev_items"]))
            r.update(speaker_test_scores(c["test_pred"], data.speakers) if m == "speakers"
                     else emotion_test_scores(c["test_pred"], data.emotion))


def choose_per_variant(probes, data, metrics=CHOSEN_PER_VARIANT + CHOSEN_PER_VARIANT_IF_ALL):
    """For each row and metric (SID, emotion, EER; phones): the (layer, L2) with the best dev score
    over all the row's seeds together (:func:`quality_probe.choose_on_pooled_dev`), applied to every
    seed's result in ``probes`` (in memory) -> {row: {metric: candidate index}}. Rows where a seed's
    probe has no candidates (an earlier version) keep each run's own choice."""
    from quality_probe import choose_on_pooled_dev

    choices = {}
    for row, by_seed in probes.items():
        for m in metrics:
            rs = [r[m] for r in by_seed.values() if r.get(m) is not None]
            i = choose_on_pooled_dev(rs, "dev_eer" if m == "eer" else "dev_items") if rs else None
            if i is not None:
                choices.setdefault(row, {})[m] = i
        for r in by_seed.values():
            at_choice(r, choices.get(row, {}), data)
    return choices


def best_on_dev(table, candidates):
    """The candidate with the highest mean of its dev phone and dev speaker accuracies (chosen on
    dev, so the test comparison that follows is not a selection on test)."""
    cands = [c for c in candidates if c in table]
    if not cands:
        return None
    return max(cands, key=lambda c: (table[c]["phones_dev"] + table[c]["speakers_dev"], table[c]["phones_dev"]))


def compare(probes, a, b, seeds, n_boot=4000, split="test", probes_b=None, metrics=METRICS, parts=False):
    """Paired bootstrap A - B on every probe -> {metric: interval dict} (``half_width`` added).

    ``parts``: for the metrics of ``HALF_WIDTH_TARGETS`` also the half-width from the test items alone
    (``half_width_items``) and from the seeds alone (``half_width_seeds``), and the seeds per row that
    would meet the target (``seeds_needed``, :func:`quality_probe.seeds_for_half_width`).

    Accuracies: :func:`quality_probe.paired_bootstrap` over the test utterances and the seeds;
    EER: :func:`quality_probe.paired_bootstrap_eer` over the test voices and the seeds (1,000
    replicates; test split only). ``split`` "dev" compares the dev utterances (at each run's own
    chosen layer and L2): the split on which defaults are chosen. ``probes_b`` holds B when it
    comes from another folder.
    """
    from quality_probe import paired_bootstrap, paired_bootstrap_eer, seeds_for_half_width

    probes_b = probes if probes_b is None else probes_b
    out = {}
    for m in metrics:
        ga = [probes[a][s][m] for s in _seeds_of(probes, a, seeds)]
        gb = [probes_b[b][s][m] for s in _seeds_of(probes_b, b, seeds)]
        if not ga or not gb or any(g is None for g in ga + gb):
            continue
        if m == "eer":
            if split != "test":
                continue
            args = ([g["test_scores"] for g in ga], [g["test_scores"] for g in gb], ga[0]["test_trials"])
            boot, nb = paired_bootstrap_eer, min(n_boot, 1000)
        else:
            key = split + "_items"
            if not all(key in g for g in ga + gb):
                continue
            args = ([g[key] for g in ga], [g[key] for g in gb])
            boot, nb = paired_bootstrap, n_boot
        c = boot(*args, n_boot=nb)
        c["half_width"] = (c["high"] - c["low"]) / 2
        if parts and m in HALF_WIDTH_TARGETS:
            for part in ("items", "seeds"):
                p = boot(*args, n_boot=max(nb // 4, 200), resample=part)
                c["half_width_" + part] = (p["high"] - p["low"]) / 2
            c["seeds_needed"] = seeds_for_half_width(c["half_width_items"], c["half_width_seeds"],
                                                     min(len(ga), len(gb)), HALF_WIDTH_TARGETS[m])
        out[m] = c
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


def compare_with_before(probes, before, variants, seeds, epochs, data=None):
    """Each variant here minus the same variant in the folder ``before`` (e.g. the previous defaults),
    on dev and test -> {variant: {"dev": {...}, "test": {...}, "seeds": [...]}}; variants or seeds
    missing on either side are left out. With ``data`` (the probe sets), the variant there gets its
    own per-variant layer choice (:func:`choose_per_variant`), as it does here."""
    out = {}
    for v in variants:
        old = load_probes(before, v, seeds, epochs)
        if data is not None:
            choose_per_variant(old, data)
        done = sorted(set(probes.get(v, {})) & set(old[v]))
        if done:
            # a probe without per-utterance outcomes of a split (an earlier version) is left out of it
            out[v] = {"seeds": done}
            for split in ("dev", "test"):
                out[v][split] = compare(probes, v, v, done, split=split, probes_b=old)
    return out


def fmt_diff(c):
    """'+0.81 [+0.31, +1.39] ▲' (▲/▼: the 95 % interval excludes 0)."""
    if c is None:
        return "n/a"
    mark = "" if not c["resolved"] else (" ▲" if c["diff"] > 0 else " ▼")
    return f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]{mark}"


def verdict(c, a, b, lower_is_better=False):
    """'+0.81 [+0.31, +1.39] ±0.54 **a better**' or '... not resolved' (for an error rate, a
    negative difference is A better)."""
    if c is None:
        return "n/a"
    hw = c.get("half_width", (c["high"] - c["low"]) / 2)
    txt = f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] ±{hw:.2f}"
    if not c["resolved"]:
        return txt + " not resolved"
    a_better = (c["diff"] < 0) if lower_is_better else (c["diff"] > 0)
    return txt + (f" **{a} better**" if a_better else f" **{b} better**")


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


def curve_png(path, curves, hlines, title="", other=None):
    """Four panels (phones, speaker ID, zero-shot EER, emotion): each vs pretraining CPU seconds.

    curves: name -> {"cpu_seconds": [...], metric: [...]}; hlines: name -> {metric: v}
    (baselines, dashed); other: curves of a second budget, drawn dotted with the same colours.
    """
    fig = _figure((1100, 760))
    axes = fig.subplots(2, 2).reshape(-1)
    names = list(dict.fromkeys(list(curves) + list(other or {}) + list(hlines)))
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    for ax, metric in zip(axes, METRICS):
        for style, group, suffix in (("-", curves, ""), (":", other or {}, " (other budget)")):
            for name, c in group.items():
                if c.get(metric):
                    ax.plot(c["cpu_seconds"], c[metric], marker="o", linestyle=style, linewidth=2,
                            color=colors[name], label=name + suffix)
        for name, v in hlines.items():
            if v.get(metric) is not None:
                ax.axhline(v[metric], linestyle="--", linewidth=1.2, color=colors[name], label=name)
        ax.set_xlabel("pretraining CPU seconds (1 thread)")
        ax.set_ylabel(LABELS[metric] + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_title(LABELS[metric] + " (test)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def bars_png(path, table, title=""):
    """One panel per probe, each on its own axis and direction: horizontal bars (mean over seeds,
    sample std as the error bar), one per representation; chance / level drawn where known."""
    fig = _figure((1200, 120 + 26 * len(table) * 1))
    axes = fig.subplots(1, len(METRICS), sharey=True)
    rows = list(table)
    y = np.arange(len(rows))
    for ax, m in zip(axes, METRICS):
        vals = [table[r][m] if table[r][m] is not None else np.nan for r in rows]
        errs = [table[r][m + "_std"] or 0.0 if table[r][m] is not None else 0.0 for r in rows]
        colors = [PALETTE[0] if r in VARIANTS else PALETTE[3] if r in SEEDLESS else PALETTE[2] if r == REF_ROW
                  else PALETTE[1] for r in rows]
        ax.barh(y, vals, xerr=errs, color=colors, alpha=0.85)
        for yi, v in zip(y, vals):
            if not np.isnan(v):
                ax.text(v, yi, f" {v:.1f}", va="center", fontsize=7)
        if m == "eer":
            ax.axvline(50.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(LABELS[m] + ("\n(lower is better)" if m in LOWER_IS_BETTER else "\n(higher is better)"),
                     fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(rows, fontsize=8)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


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


def _half_width_summary(comparisons, rows):
    """{metric: largest half-width} over the comparisons with ``rows``."""
    out = {}
    for m in METRICS:
        hws = [c[m]["half_width"] for o, c in comparisons.items() if o in rows and m in c]
        if hws:
            out[m] = max(hws)
    return out


def _seeds_needed_line(comparisons, rows):
    """Where the largest half-width of each targeted metric comes from (test items or seeds), and
    the seeds per row that would meet the target, or "" where no comparison has the parts."""
    parts = []
    for m in HALF_WIDTH_TARGETS:
        cs = [(o, c[m]) for o, c in comparisons.items() if o in rows and m in c and "seeds_needed" in c[m]]
        if not cs:
            continue
        o, c = max(cs, key=lambda oc: oc[1]["half_width"])
        need = ("more test items, not seeds (the items' part alone is over the target)"
                if c["seeds_needed"] == float("inf") else f"~{c['seeds_needed']} seeds per row")
        parts.append(f"{LABELS[m]} (full MGF minus {o}): ±{c['half_width_items']:.2f} from the test items, "
                     f"±{c['half_width_seeds']:.2f} from the seeds; target {HALF_WIDTH_TARGETS[m]} needs {need}")
    if not parts:
        return ""
    return ("Where the largest half-width comes from (each part bootstrapped alone; the two add about in "
            "quadrature, so the seeds needed are an estimate): " + "; ".join(parts) + ".")


def input_block_markdown(table):
    """The input block's speaker diagnostic, for the rows whose every probe has it (else nothing)."""
    rows = [r for r, t in table.items() if "sid_input_proj" in t]
    if not rows:
        return []
    lines = ["Where the speaker goes (diagnostic): speaker ID from the pooled input projection (before the "
             "positional term) and from layer 0 (the input block's output, after it), each its own linear probe "
             "with L2 chosen on dev, mean over seeds:", "",
             "| representation | SID, input projection % | SID, layer 0 % | lost in the positional term (points) |",
             "|---|---|---|---|"]
    for r in rows:
        t = table[r]
        lines.append(f"| {r} | {t['sid_input_proj']:.2f} | {t['sid_layer0']:.2f} | "
                     f"{t['sid_input_proj'] - t['sid_layer0']:+.2f} |")
    return lines + [""]


def write_report(out, budget_name, budget, corpus, table, comparisons, picks, curves, ttp, info, timing, steps,
                 spe, runs, before=None, before_folder=None, vs_random=None, other_ttp=None, ceiling_note=None,
                 vs_ref=None, goals=None):
    rows = list(table)
    lines = ["| representation | " + " | ".join(LABELS[m] for m in METRICS) + " | EER, same-base non-targets only % "
             "| EER of the utterance head's embedding % | SID errors inside one base voice % "
             "| dev phones / SID / emotion (EER) | layers chosen (phones; SID; EER; emotion) | CPU s / step |",
             "|---|" + "---|" * (len(METRICS) + 6)]
    for r in rows:
        t = table[r]
        cps = runs.get(r, {}).get("cpu_seconds_per_step")
        devs = " / ".join("—" if t[m + "_dev"] is None else f"{t[m + '_dev']:.1f}" for m in ("phones", "speakers", "emotion"))
        devs += f" ({'—' if t['eer_dev'] is None else format(t['eer_dev'], '.1f')})"
        layers = "; ".join(str(t.get(m + "_layers", "—")) + ("" if t.get(m + "_per_variant", True) or
                                                             len(t.get(m + "_layers") or []) < 2 else " (per run)")
                           for m in METRICS)
        lines.append(f"| {r} | " + " | ".join(_fmt(t[m], t[m + "_std"]) for m in METRICS) + f" | "
                     f"{_fmt(t.get('eer_same_base'))} | {_fmt(t.get('eer_head'), t.get('eer_head_std'))} | "
                     f"{_fmt(t['same_base_errors'])} | {devs} | {layers} | {'—' if cps is None else f'{cps:.2f}'} |")
    head = "| " + " | ".join(f"{LABELS[m]} (points, 95 % interval, ±half-width)" for m in METRICS) + " |"
    comp = ["| full MGF minus " + head, "|---|" + "---|" * len(METRICS)]
    for other, c in comparisons.items():
        comp.append(f"| {other} | " + " | ".join(verdict(c.get(m), "full MGF", other, m in LOWER_IS_BETTER)
                                                 for m in METRICS) + " |")
    rnd = []
    if vs_random:
        rnd = ["| variant minus random-init " + head, "|---|" + "---|" * len(METRICS)]
        for v, c in vs_random.items():
            rnd.append(f"| {v} | " + " | ".join(verdict(c.get(m), v, "random", m in LOWER_IS_BETTER) for m in METRICS) + " |")
    ref = []
    if vs_ref:  # the speaker axis against its existence proof (the self-supervised TDNN)
        ref = ["| variant minus the speaker reference " + head, "|---|" + "---|" * len(METRICS)]
        for v, c in vs_ref.items():
            ref.append(f"| {v} | " + " | ".join(verdict(c.get(m), v, "reference", m in LOWER_IS_BETTER)
                                                for m in METRICS) + " |")
        ref.append("")
    pretrained = [r for r in comparisons if r in VARIANTS]
    hw = _half_width_summary(comparisons, pretrained)
    hw_line = "; ".join(f"{LABELS[m]}: {hw[m]:.2f}" + (f" (target <= {HALF_WIDTH_TARGETS[m]}: "
                                                        f"{'met' if hw[m] <= HALF_WIDTH_TARGETS[m] else 'NOT met'})"
                                                        if m in HALF_WIDTH_TARGETS else "") for m in hw)
    ttp_line = ("not crossed within the budget" if ttp is None else f"{ttp:.0f} CPU s")
    t0 = next(iter(table.values()))
    n_sid, n_emo, n_tr = t0.get("speakers_n_test"), t0.get("emotion_n_test"), t0.get("eer_n_trials")
    text = [
        f"# Quality benchmark ({budget_name} budget)",
        "",
        f"Corpus: {corpus['pretrain_hours']:.2f} h of pretraining audio "
        f"({len(corpus['pretrain_speakers'])} espeak-ng / flite voices); held out from it in base voice and "
        f"sentence vocabulary: {corpus['probe_hours']:.2f} h phone probe ({len(corpus['probe_speakers'])} festival "
        f"voices), {corpus.get('speaker_hours', 0):.2f} h speaker probe ({len(corpus.get('speaker_voices', []))} voices "
        f"of {len({v['base_voice'] for v in corpus.get('speaker_voices', [])})} base voices), "
        f"{corpus.get('emotion_hours', 0):.2f} h emotion probe ({len(corpus.get('emotion_voices', []))} voices x "
        f"{len(corpus.get('emotions', {}))} prosody classes); a random channel per utterance (EQ, noise, level), "
        f"drawn independently of voice and class; {corpus.get('n_utterances', '?')} utterances, "
        f"{corpus.get('bytes', 0) / 1e6:.0f} MB, generated in {corpus['generation_seconds']:.0f} s with "
        f"{corpus['procs']} processes ({corpus['folder']}).",
        f"Pretraining: {budget.epochs} epochs x {spe} steps = **{steps} optimiser steps** per run, batch "
        f"{budget.batch_size} utterances (crop_seconds {budget.overrides.get('crop_seconds', 'from the YAML')}), "
        f"encoder {budget.encoder or 'YAML default'}, seeds {budget.seeds}; every variant with the same settings "
        f"(no per-variant tuning).",
        f"Probes (frozen features, linear; layer and L2 chosen on dev, scored on test): phones at each "
        f"representation's frame centres, scored at 100 frames/s on test voices (layer and L2 chosen per variant "
        f"as below where every seed's probe keeps its candidates, else per run: 'per run' in the layers column; "
        f"`--phone_candidates` probes those again); "
        f"for SID, verification and emotion one layer (and L2) per variant, chosen on the dev items of all its "
        f"seeds together (one run's 288 dev utterances pick a layer with about 3 points of noise); speaker ID (SID) on pooled "
        f"mean + std, {n_sid} test utterances of every speaker-probe voice; zero-shot verification (no trained "
        f"probe): cosine of z-scored pooled statistics, layer chosen on dev voices' trials, {n_tr} trials between "
        f"the other (test) voices, half of them targets (also scored against only the non-target trials whose two "
        f"voices share a base voice: the voice, not the synthesiser); emotion on pooled statistics, {n_emo} test utterances of "
        f"voices the probe never saw (chance 25 %).",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, {info['jobs']} runs side "
        f"by side x {info['threads']} thread(s), device {info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}; "
        f"load average at start {info.get('load_average_start')}, at end {info.get('load_average_end')}.",
        f"Wall time: corpus {timing['corpus']:.0f} s (0 = cached), pretraining + probes {timing['grid']:.0f} s, "
        f"total {timing['total']:.0f} s; CPU time (load-independent): pretraining {timing['pretrain_cpu']:.0f} s, "
        f"probes {timing['probes_cpu']:.0f} s (runs and probes reused from an earlier invocation count 0).",
        "",
        "Mean ± sample std over seeds (rows without pretraining that depend on no seed: one probe). "
        f"{ceiling_note or ''}",
        "",
        *lines,
        "",
        f"Differences: paired bootstrap (accuracies: over the test utterances; EER: over the test voices, each "
        f"trial weighted by its voices' draws; both: independently per row, over the seeds; 95 %; 'not resolved' = "
        f"the interval spans 0). Best single scale (chosen on dev): **{picks.get('single')}**; best pair (chosen "
        f"on dev): **{picks.get('pair')}**.",
        "",
        *comp,
        "",
        f"Largest interval half-width of a pretrained-vs-pretrained difference above: {hw_line or 'n/a'}.",
        "",
        *([sn, ""] if (sn := _seeds_needed_line(comparisons, pretrained)) else []),
        *rnd,
        "",
        *ref,
        f"Pretraining CPU seconds full MGF needs to pass fbank +-5 on phones (first seed's curve): **{ttp_line}**"
        + (f"; at the other budget: **{other_ttp}**." if other_ttp else "."),
        "",
    ]
    if goals:
        from quality_goals import goals_markdown

        text += goals_markdown(goals)
    text += input_block_markdown(table)
    if before:
        text += [f"This folder minus `{before_folder}` (the same variant there; paired bootstrap over utterances "
                 "and seeds, 95 %; ▲/▼ resolved; dev is the split defaults are chosen on):", "",
                 "| variant | dev phones | dev speakers | test phones | test speakers | test EER | test emotion |",
                 "|---|---|---|---|---|---|---|"]
        for v, c in before.items():
            text.append(f"| {v} | {fmt_diff(c['dev'].get('phones'))} | {fmt_diff(c['dev'].get('speakers'))} | "
                        f"{fmt_diff(c['test'].get('phones'))} | {fmt_diff(c['test'].get('speakers'))} | "
                        f"{fmt_diff(c['test'].get('eer'))} | {fmt_diff(c['test'].get('emotion'))} |")
        text.append("")
    if curves:
        text += ["Curves (first seed; test scores after the probed epochs; step 0 = the random-init encoder):", ""]
        for name, c in curves.items():
            pts = ", ".join(f"{s} steps / {x:.0f} CPU s: " + " / ".join(f"{c[m][i]:.1f}" for m in METRICS)
                            for i, (s, x) in enumerate(zip(c["steps"], c["cpu_seconds"])))
            text.append(f"- {name} (phones / SID / EER / emotion): {pts}")
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
                        "benchmarks/quality_switches.py; the speaker reference too, where it has finished there (it is "
                        "never trained in a folder given --baselines_from)")
    p.add_argument("--before", default=None,
                   help="an output folder of the same budget (e.g. made with the previous defaults): the report "
                        "adds each variant here minus the same variant there, on dev and test")
    p.add_argument("--phone_candidates", action="store_true",
                   help="probe phones again where a probe file keeps no (layer, L2) candidates, so that the phone "
                        "layer is chosen once per variant on all its seeds' dev utterances (about 25 CPU s a probe on a 2-core VM)")
    p.add_argument("--report_only", action="store_true",
                   help="train and probe nothing: write the report from the finished runs and probes")
    p.add_argument("--speaker_ref", action="store_true",
                   help="also train the speaker reference row (a self-supervised TDNN, benchmarks/quality_speaker_ref.py;"
                        " ~10 CPU-min per seed at the default budget); a finished one is reported without the flag")
    p.add_argument("--no_write", action="store_true",
                   help="train and probe what is missing, write no report, plots or results.json (the folder's own "
                        "report stays as it was; benchmarks/quality_switches.py's use of the baseline folder)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan (variants x seeds x budget), what is cached, and the estimated CPU and wall "
                        "time; run nothing")
    return p.parse_args(argv)


def _probe_key(variant, seed, epoch):
    return f"{variant}/seed{seed}/epoch{epoch}"


def probe_file(out, key):
    return os.path.join(out, "probes", slug(key).replace("/", "__") + ".json")


def probe_is_current(res, metrics=METRICS, phone_candidates=False):
    """A probe file written by this version (every probe, per-utterance dev outcomes, and for the
    utterance-level probes every (layer, L2) candidate, for :func:`choose_per_variant`; with
    ``phone_candidates`` the phone probe's candidates too)."""
    def current(m):
        r = res[m]
        if r is None:
            return True
        if (m in CHOSEN_PER_VARIANT or (phone_candidates and m in CHOSEN_PER_VARIANT_IF_ALL
                                        and res.get("n_layers", 2) > 1)) and "candidates" not in r:
            return False  # (one layer, as fbank: only an L2 to choose; not worth a minute's probe)
        return (m == "eer" and "test_trials" in r) or "dev_items" in r

    return all(m in res for m in metrics) and all(current(m) for m in metrics)


def write_probe(path, res):
    """Writes a probe file whole or not at all (a killed run never leaves half a file to reuse)."""
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)


def probe_done(out, key, phone_candidates=False):
    """A probe file of this version is there (an older one is probed again: not done)."""
    try:
        with open(probe_file(out, key)) as f:
            return probe_is_current(json.load(f), phone_candidates=phone_candidates)
    except (OSError, ValueError):
        return False


def curve_epochs(budget):
    """Epochs (before the last) whose snapshots the curve probes."""
    eps = budget.curve_epochs if budget.curve_epochs is not None else range(1, budget.epochs)
    return [e for e in eps if 0 < e < budget.epochs]


def plan(budget, out, corpus_ready, resemblyzer, baselines_from=None, train_ref=True, phone_candidates=False):
    """The work of one invocation -> dict: pretraining runs [(variant, seed, steps, done)], probes
    [(key, kind, done)], steps per run (from the corpus spec)."""
    spec = budget.corpus
    n_train = spec.n_pretrain_speakers * spec.pretrain_utts
    spe = math.ceil(n_train / budget.batch_size)
    steps = budget.epochs * spe
    runs, probes = [], []
    seed0 = budget.seeds[0]
    for seed in budget.seeds:
        for v in budget.variants:
            run_dir = os.path.join(out, "runs", slug(v), f"seed{seed}")
            done = os.path.isfile(os.path.join(run_dir, "snapshots", f"epoch{budget.epochs}", "mgf_config.json"))
            runs.append((v, seed, steps, done))
            probes.append((_probe_key(v, seed, budget.epochs), "encoder"))
            if seed == seed0 and v in budget.curve_variants:
                probes += [(_probe_key(v, seed, e), "encoder") for e in curve_epochs(budget)]
        if budget.variants:
            probes.append((f"random/seed{seed}", "random"))
        probes += [(f"fbank/seed{seed}", "fbank"), (f"fbank+-5/seed{seed}", "fbank+-5")]
    probes.append((f"{ENERGY}/seed{seed0}", "energy"))
    if resemblyzer:
        probes.append((f"{CEILING}/seed{seed0}", "resemblyzer"))
    shared = ("fbank", "fbank+-5", "random", ENERGY, CEILING)  # reused from --baselines_from (main())
    probes = [(k, kind, probe_done(out, k, phone_candidates) or bool(
        baselines_from and k.split("/")[0] in shared and probe_done(baselines_from, k, phone_candidates)))
        for k, kind in probes]
    ref_runs, ref_probes = [], []  # the speaker reference row: its training runs and their probes
    for seed in ref_seeds(budget):
        key = f"{REF_KEY}/seed{seed}"
        if baselines_from:  # reused from there where finished, else left out (main())
            if os.path.isfile(os.path.join(baselines_from, "runs", REF_KEY, f"seed{seed}", "speaker_ref.pt")):
                ref_probes.append((key, "speaker_ref", probe_done(out, key, phone_candidates)
                                   or probe_done(baselines_from, key, phone_candidates)))
            continue
        done = os.path.isfile(os.path.join(out, "runs", REF_KEY, f"seed{seed}", "speaker_ref.pt"))
        if not done and not train_ref:  # trained only with --speaker_ref; a finished one is always reported
            continue
        ref_runs.append((REF_ROW, seed, budget.speaker_ref["steps"], done))
        ref_probes.append((key, "speaker_ref", probe_done(out, key, phone_candidates)))
    return {"runs": runs, "probes": probes, "steps": steps, "steps_per_epoch": spe, "corpus_ready": corpus_ready,
            "ref_runs": ref_runs, "ref_probes": ref_probes}


def measured_cpu_per_step(out):
    """{variant: CPU s / step} of the runs an earlier invocation measured in ``out``."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError):
        return {}
    return {v: float(np.mean([x["cpu_seconds_per_step"] for x in recs])) for v, recs in runs.items()
            if recs and all(x.get("cpu_seconds_per_step") for x in recs)}


def print_plan(budget_name, budget, pl, out, jobs, cache_folder):
    """--dry_run: the plan, what is cached, the estimated CPU and wall time -> the estimate dict."""
    cps = {**EST_CPU_PER_STEP, **measured_cpu_per_step(out)}
    spec = budget.corpus
    n_utts = (spec.n_pretrain_speakers * (spec.pretrain_utts + 1) + spec.n_probe_speakers * spec.probe_utts
              + spec.n_speaker_voices * spec.speaker_utts + spec.n_emotion_voices * spec.emotion_utts * 4)
    corpus_cpu = 0.0 if pl["corpus_ready"] else n_utts * EST_CPU_PER_UTTERANCE
    run_cpu = sum(cps.get(v, 0.3) * st for v, _, st, done in pl["runs"] if not done)
    probe_cpu = sum(EST_PROBE_CPU[kind] for _, kind, done in pl["probes"] if not done)
    todo_runs = sum(not d for *_, d in pl["runs"])
    todo_probes = sum(not d for *_, d in pl["probes"])
    ref_runs, ref_probes = pl.get("ref_runs", []), pl.get("ref_probes", [])
    ref_cpu = sum(cps.get(REF_ROW, EST_CPU_PER_STEP[REF_ROW]) * st for *_, st, done in ref_runs if not done)
    ref_cpu += sum(EST_PROBE_CPU["speaker_ref"] for *_, done in ref_probes if not done)
    cores = max(1, min(jobs, os.cpu_count() or 1))
    wall = corpus_cpu / 2 + (run_cpu + probe_cpu + ref_cpu) / cores
    print(f"budget {budget_name}: {len(budget.variants)} variants x {len(budget.seeds)} seeds {budget.seeds} = "
          f"{len(pl['runs'])} pretraining runs of {pl['steps']} steps ({budget.epochs} epochs x {pl['steps_per_epoch']})")
    print(f"corpus: {'cached' if pl['corpus_ready'] else 'to generate'} ({cache_folder}, {n_utts} utterances)")
    print(f"output: {out}")
    print("| variant | seeds done | seeds to train | est. CPU s / run |")
    print("|---|---|---|---|")
    for v in budget.variants:
        done = [s for vv, s, _, d in pl["runs"] if vv == v and d]
        todo = [s for vv, s, _, d in pl["runs"] if vv == v and not d]
        print(f"| {v} | {done or '-'} | {todo or '-'} | {cps.get(v, 0.3) * pl['steps']:.0f} |")
    if ref_runs:
        st = ref_runs[0][2]
        print(f"| {REF_ROW}: {st} steps x {budget.speaker_ref['batch_size']} utterances (2 crops each) | "
              f"{[s for _, s, _, d in ref_runs if d] or '-'} | {[s for _, s, _, d in ref_runs if not d] or '-'} | "
              f"{cps.get(REF_ROW, EST_CPU_PER_STEP[REF_ROW]) * st:.0f} |")
    print(f"probes: {len(pl['probes'])} ({len(pl['probes']) - todo_probes} cached, {todo_probes} to run)")
    print(f"estimate: corpus {corpus_cpu:.0f} CPU s, pretraining {run_cpu:.0f} CPU s ({todo_runs} runs), probes "
          f"{probe_cpu:.0f} CPU s ({todo_probes}), speaker reference {ref_cpu:.0f} CPU s "
          f"({sum(not d for *_, d in ref_runs)} runs, {sum(not d for *_, d in ref_probes)} probes); "
          f"wall ~{wall / 60:.0f} min with {cores} run(s) side by side on an "
          f"idle machine (CPU s per step: measured in {out} where an earlier invocation ran, else "
          f"benchmarks/RESULTS.md's)")
    return {"corpus_cpu": corpus_cpu, "pretrain_cpu": run_cpu, "probe_cpu": probe_cpu, "wall_seconds": wall,
            "runs_to_train": todo_runs, "probes_to_run": todo_probes, "ref_cpu": ref_cpu,
            "ref_runs_to_train": sum(not d for *_, d in ref_runs),
            "ref_probes_to_run": sum(not d for *_, d in ref_probes)}


def other_budget_curves(budget, out):
    """(curves, time to pass fbank +-5) of the budget this one is plotted beside (``compare_with``,
    read from its default output folder beside ``out``), or (None, None)."""
    if not budget.compare_with:
        return None, None
    path = os.path.join(os.path.dirname(out), budget.compare_with, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None, None
    ttp = res.get("cpu_seconds_to_pass_fbank_pm5_phones")
    return (res.get("curves", {}),
            f"{budget.compare_with} budget: " + ("not crossed" if ttp is None else f"{ttp:.0f} CPU s"))


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
    from quality_corpus import corpus_folder
    from quality_probe import ProbeData, resemblyzer_available, run_probes

    resemblyzer = resemblyzer_available()
    if args.dry_run:
        cf = corpus_folder(args.cache, budget.corpus)
        pl = plan(budget, out, os.path.isfile(os.path.join(cf, "corpus.json")), resemblyzer,
                  baselines_from=args.baselines_from and os.path.abspath(args.baselines_from),
                  train_ref=args.speaker_ref, phone_candidates=args.phone_candidates)
        return print_plan(args.budget, budget, pl, out, jobs, cf)
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
    if not resemblyzer:
        log(f"the ceiling row '{CEILING}' is left out: the optional package resemblyzer is not installed "
            "(pip install resemblyzer; its speaker encoder ships in the wheel, no download at run time)")

    data = ProbeData(corpus, speaker_split=budget.speaker_split, n_trials=budget.n_trials)
    os.makedirs(os.path.join(out, "probes"), exist_ok=True)
    seed0 = budget.seeds[0]

    def probe(key, **kw):
        """Runs (or reloads) the probes of one representation."""
        path = probe_file(out, key)
        if os.path.isfile(path):
            with open(path) as f:
                res = json.load(f)
            if probe_is_current(res, phone_candidates=args.phone_candidates) or args.report_only:
                if "speakers_input_proj" not in res and kw.get("kind") in ("encoder", "random") \
                        and not args.report_only:
                    # written before the input block's diagnostic: add it alone (one pooling pass)
                    from quality_probe import input_block_probe

                    res["speakers_input_proj"] = input_block_probe(data, res["speakers"], max_iter=budget.max_iter,
                                                                   device=args.device, **kw)
                    write_probe(path, res)
                return res
            if probe_is_current(res) and res.get("phones") is not None:
                # --phone_candidates: only the phone probe predates its candidates: redo it alone
                log(f"  probe {key}: its phone probe keeps no candidates (per-variant choice); probing phones again")
                cpu0 = time.thread_time()
                res["phones"] = run_probes(data, max_train_frames=budget.max_train_frames, max_iter=budget.max_iter,
                                           device=args.device, utterance=False, **kw)["phones"]
                res["phone_probe_cpu_seconds"] = time.thread_time() - cpu0
                timing["probes_cpu"] += res["phone_probe_cpu_seconds"]
                write_probe(path, res)
                return res
            if probe_is_current(res, ("phones",)) and "phones" in res:
                # only the utterance-level probes are older: redo those (minutes less than everything)
                log(f"  probe {key}: its SID / EER / emotion probes are from an earlier version; probing them again")
                t, cpu0 = time.time(), time.thread_time()
                new = run_probes(data, max_iter=budget.max_iter, device=args.device, phones=False, **kw)
                res.update({m: new[m] for m in CHOSEN_PER_VARIANT})
                res["utterance_probes_cpu_seconds"] = time.thread_time() - cpu0
                timing["probes_cpu"] += res["utterance_probes_cpu_seconds"]
                write_probe(path, res)
                return res
            log(f"  probe {key}: written by an earlier version of the probes; probing again")
        shared = key.split("/")[0] in ("fbank", "fbank+-5", "random", ENERGY, CEILING, REF_KEY) and args.baselines_from
        if shared and key.startswith("random/"):  # only where this folder's encoder is the baseline's shape
            base_ref = os.path.join(args.baselines_from, "runs", slug("full MGF"), f"seed{kw.get('seed')}",
                                    "snapshots", f"epoch{budget.epochs}")
            shared = same_architecture(kw.get("reference"), base_ref)
        if shared and os.path.isfile(os.path.join(args.baselines_from, "probes", os.path.basename(path))):
            # fbank, the level and the ceiling need no pretraining; the random encoder is drawn from the
            # seed and the encoder shape alone: the same in every folder of the same budget and shape.
            with open(os.path.join(args.baselines_from, "probes", os.path.basename(path))) as f:
                res = json.load(f)
            if probe_is_current(res, phone_candidates=args.phone_candidates):
                return res
        if args.report_only:
            return None
        t, cpu0 = time.time(), time.thread_time()
        res = run_probes(data, max_train_frames=budget.max_train_frames, max_iter=budget.max_iter,
                         device=args.device, **kw)
        res["seconds"], res["cpu_seconds"] = time.time() - t, time.thread_time() - cpu0
        timing["probes_cpu"] += res["cpu_seconds"]
        write_probe(path, res)
        ph = "—" if res["phones"] is None else f"{res['phones']['test']:.1f} (layer {res['phones']['layer']})"
        log(f"  probe {key}: phones {ph}, SID {res['speakers']['test']:.1f}, EER {res['eer']['test']:.1f}, "
            f"emotion {res['emotion']['test']:.1f} [{res['seconds']:.0f} s, {res['cpu_seconds']:.0f} CPU s]")
        return res

    # -- the grid: pretraining runs side by side, each probed as soon as it is done ----------------
    runs = {}
    for seed in budget.seeds:
        for variant in budget.variants:
            run_dir = os.path.join(out, "runs", slug(variant), f"seed{seed}")
            ov = recipe_overrides(budget, corpus, variant, seed, run_dir, threads, args.device, extra, steps)
            runs[(variant, seed)] = pretrain_step(variant, seed, run_dir, ov, budget.epochs)
    ref_runs = {}  # seed -> the speaker reference's training step
    for seed in ref_seeds(budget):
        ref_runs[seed] = ref_step(budget, corpus, seed, os.path.join(out, "runs", REF_KEY, f"seed{seed}"), args.device)
        if args.baselines_from:  # it depends on the corpus and its own settings only: reuse a finished one
            other = ref_step(budget, corpus, seed, os.path.join(args.baselines_from, "runs", REF_KEY, f"seed{seed}"),
                             args.device)
            if grid.step_status(other, ref_output) == "done":
                ref_runs[seed] = other
            else:  # a baseline like the others: never trained here (quality_switches' folders need none)
                del ref_runs[seed]
                log(f"{REF_ROW} / seed {seed}: not finished in {args.baselines_from}; left out of this folder")
        elif not args.speaker_ref and grid.step_status(ref_runs[seed], ref_output) != "done":
            del ref_runs[seed]  # its own flag: it would take the default invocation past its 90 min
            log(f"{REF_ROW} / seed {seed}: not trained (add --speaker_ref: "
                f"~{EST_CPU_PER_STEP[REF_ROW] * budget.speaker_ref['steps'] / 60:.0f} CPU-min per seed); "
                "a finished one is always reported")
    queue = ProbeQueue(probe)
    if not args.report_only:
        queue.add([(f"{ENERGY}/seed{seed0}", {"kind": "energy", "seed": seed0})])
        queue.add([(f"{kind}/seed{seed}", {"kind": kind, "seed": seed})
                   for seed in budget.seeds for kind in ("fbank", "fbank+-5")])
        if resemblyzer:
            queue.add([(f"{CEILING}/seed{seed0}", {"kind": "resemblyzer", "seed": seed0})])

    def probes_of_run(step, _out=None):
        variant, seed = step.row, step.seed
        if variant == REF_ROW:
            queue.add([(f"{REF_KEY}/seed{seed}", {"kind": "speaker_ref", "source": step.result_path, "seed": seed})])
            return
        final = step.result_path
        jobs_ = [(_probe_key(variant, seed, budget.epochs), {"kind": "encoder", "source": final, "seed": seed})]
        if variant == random_reference_variant(budget.variants):
            jobs_.append((f"random/seed{seed}", {"kind": "random", "reference": final, "seed": seed}))
        if seed == seed0 and variant in budget.curve_variants:
            for e in curve_epochs(budget):
                jobs_.append((_probe_key(variant, seed, e), {
                    "kind": "encoder", "source": os.path.join(step.folder, "snapshots", f"epoch{e}"), "seed": seed}))
        queue.add(jobs_)

    t_grid = time.time()
    all_steps = list(runs.values()) + list(ref_runs.values())

    def step_output(s):
        return ref_output(s) if s.row == REF_ROW else run_output(s)

    status = {s.name: grid.step_status(s, step_output) for s in all_steps}
    log(f"{sum(status[s.name] == 'done' for s in runs.values())} pretraining run(s) already done, "
        f"{sum(status[s.name] != 'done' for s in runs.values())} to train")
    if ref_runs:
        log(f"{REF_ROW}: {sum(status[s.name] == 'done' for s in ref_runs.values())} run(s) already done, "
            f"{sum(status[s.name] != 'done' for s in ref_runs.values())} to train "
            f"({budget.speaker_ref['steps']} steps of {budget.speaker_ref['batch_size']} utterances each)")
    if args.report_only:
        status = {k: v if v == "done" else "not run" for k, v in status.items()}
    else:
        for s in all_steps:
            if status[s.name] == "done":
                probes_of_run(s)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        status = grid.execute(all_steps, step_output, jobs=jobs, on_change=args.on_change, env=env,
                              log=log, on_poll=snapshot_run, on_done=probes_of_run, background=queue, name="quality")
    timing["grid"] = time.time() - t_grid
    failed = [k for k, s in runs.items() if status[s.name] in ("failed", "blocked")]
    if failed:
        log(f"{len(failed)} run(s) failed: {failed} (left out of the report; their logs are in their run folders)")

    # -- collect -----------------------------------------------------------------------------------
    probes, curves, run_records = {}, {}, {}
    for (variant, seed), r in runs.items():
        res = probe(_probe_key(variant, seed, budget.epochs), kind="encoder", source=r.result_path,
                    seed=seed) if status[r.name] in ("done", "ran") else None
        if res is None:
            continue
        if "eer_head" not in res and not args.report_only:  # the utterance head's own embedding, once
            from quality_probe import head_verification

            res["eer_head"] = head_verification(r.folder, r.result_path, data, device=args.device)
            path = probe_file(out, _probe_key(variant, seed, budget.epochs))
            write_probe(path, res)
        probes.setdefault(variant, {})[seed] = res
        rec = run_record(r)
        timing["pretrain_cpu"] += rec["cpu_seconds"] if status[r.name] == "ran" else 0.0
        run_records.setdefault(variant, []).append(rec)
        if variant == random_reference_variant(budget.variants):
            rnd = probe(f"random/seed{seed}", kind="random", reference=r.result_path, seed=seed)
            if rnd is not None:
                probes.setdefault("random", {})[seed] = rnd
        if seed == seed0 and variant in budget.curve_variants:
            c = {"steps": [], "cpu_seconds": [], "probes": []}
            for e in curve_epochs(budget) + [budget.epochs]:
                snap = os.path.join(r.folder, "snapshots", f"epoch{e}")
                rr = res if e == budget.epochs else (
                    probe(_probe_key(variant, seed, e), kind="encoder", source=snap, seed=seed)
                    if os.path.isdir(snap) else None)
                if rr is not None:
                    st = run_steps(snap)
                    c["steps"].append(st)
                    c["cpu_seconds"].append(st * (rec["cpu_seconds_per_step"] or float("nan")))
                    c["probes"].append(rr)
            curves[variant] = c
    for seed in budget.seeds:
        for kind in ("fbank", "fbank+-5"):
            res = probe(f"{kind}/seed{seed}", kind=kind, seed=seed)
            if res is not None:
                probes.setdefault(kind, {})[seed] = res
    for seed, r in ref_runs.items():
        if status[r.name] not in ("done", "ran"):
            continue
        res = probe(f"{REF_KEY}/seed{seed}", kind="speaker_ref", source=r.result_path, seed=seed)
        if res is not None:
            probes.setdefault(REF_ROW, {})[seed] = res
            rec = ref_record(r)
            timing["pretrain_cpu"] += rec["cpu_seconds"] if status[r.name] == "ran" else 0.0
            run_records.setdefault(REF_ROW, []).append(rec)
    for row, kind in ((ENERGY, "energy"), (CEILING, "resemblyzer")):
        if kind == "resemblyzer" and not resemblyzer and not os.path.isfile(probe_file(out, f"{row}/seed{seed0}")):
            continue
        res = probe(f"{row}/seed{seed0}", kind=kind, seed=seed0)
        if res is not None:
            probes.setdefault(row, {})[seed0] = res
    from quality_probe import eer

    # one (layer, L2) per variant, chosen on the dev items of all its seeds (not one per run)
    choices = choose_per_variant(probes, data)
    for variant, c in curves.items():  # every point of a curve at its variant's choice
        rrs = c.pop("probes")
        for rr in rrs[:-1]:  # the last is the variant's final probe, already at its choice
            at_choice(rr, choices.get(variant, {}), data)
        for m in METRICS:
            c[m] = [rr[m]["test"] for rr in rrs]
    for by_seed in probes.values():  # the verification EER with non-targets of one base voice only
        for res in by_seed.values():
            for r_ in (res["eer"], res.get("eer_head")):
                if r_ is None:
                    continue
                tr = r_["test_trials"]
                base = data.speakers.voice_base[np.asarray(tr["voices"])]
                t = np.asarray(tr["target"], dtype=bool)
                keep = t | (base[:, 0] == base[:, 1])
                r_["same_base_test"] = eer(np.asarray(r_["test_scores"])[keep], t[keep])
                r_["same_base_nontargets"] = int((keep & ~t).sum())
    start = probes.get("random", {}).get(seed0)
    for c in curves.values():  # step 0: the random-init encoder (full MGF's shape, seed0's draw)
        if start is not None:
            for k, v in (("steps", 0), ("cpu_seconds", 0.0), *((m, start[m]["test"]) for m in METRICS)):
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
    rows = list(budget.variants) + list(BASELINES) + [REF_ROW, ENERGY, CEILING]
    table = aggregate(probes, rows, budget.seeds)
    runs_summary = {v: {"cpu_seconds_per_step": float(np.mean([x["cpu_seconds_per_step"] for x in recs_]))}
                    for v, recs_ in run_records.items() if recs_ and all(x["cpu_seconds_per_step"] for x in recs_)}
    picks = {"single": best_on_dev(table, SINGLE_SCALES), "pair": best_on_dev(table, PAIRS)}
    log("comparing (paired bootstrap intervals)")
    comparisons, vs_random = {}, {}
    if "full MGF" in table:
        others = [v for v in (*SINGLE_SCALES, *PAIRS, *PEERS, "fbank+-5", "random", REF_ROW, CEILING) if v in table]
        for o in others:
            comparisons[o] = compare(probes, "full MGF", o, budget.seeds, parts=o in VARIANTS)
    if "random" in table:
        for v in budget.variants:
            if v in table:
                vs_random[v] = compare(probes, v, "random", budget.seeds)
    vs_ref = {}  # full MGF and the utterance scale against the speaker reference (the issue's goal)
    if REF_ROW in table:
        for v in ("full MGF", "utterance"):
            if v in table:
                vs_ref[v] = compare(probes, v, REF_ROW, budget.seeds)
    from quality_goals import design_goals

    goals = design_goals(out, table, comparisons, vs_random, picks, budget.seeds, slug, ref_row=REF_ROW)
    ttp = None
    if "full MGF" in curves and "fbank+-5" in table:
        pts = list(zip(curves["full MGF"]["cpu_seconds"], curves["full MGF"]["phones"]))
        ttp = time_to_pass(pts, table["fbank+-5"]["phones"])
    other_curves, other_ttp = other_budget_curves(budget, out)
    single = picks["single"] if picks["single"] in curves else next((v for v in SINGLE_SCALES if v in curves), None)
    shown = {k: v for k, v in curves.items() if k in ("full MGF", single, *PEERS)}
    hlines = {b: {m: table[b][m] for m in METRICS} for b in ("fbank+-5", "random", REF_ROW, CEILING) if b in table}
    what = "the best single scale (chosen on dev)" if single == picks["single"] else "a single scale"
    if args.no_write:  # a caller's baseline folder (quality_switches): its own full report stays as it was
        return {"budget": args.budget, "steps": steps, "steps_per_epoch": spe, "epochs": budget.epochs,
                "seeds": budget.seeds, "table": table, "goals": goals}
    curve_png(os.path.join(out, "quality_curve.png"), shown, hlines,
              title=f"{args.budget} budget: full MGF vs {what} ({single}) and the peers; seed {seed0}"
                    + (f"; dotted: the {budget.compare_with} budget" if other_curves else ""),
              other={k: v for k, v in (other_curves or {}).items() if k in shown})
    bars_png(os.path.join(out, "quality_bars.png"), table,
             title=f"Quality benchmark ({args.budget}): {steps} steps, seeds {budget.seeds} (mean ± sample std)")
    timing["total"] = time.time() - t_start
    try:
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    before = None
    if args.before:
        before = compare_with_before(probes, os.path.abspath(args.before), [v for v in budget.variants if v in probes],
                                     budget.seeds, budget.epochs, data=data)
    note = None if CEILING in table else (f"'{CEILING}' row: not measured (the optional package resemblyzer is not "
                                          "installed).")
    text = write_report(out, args.budget, budget, corpus, table, comparisons, picks, curves, ttp, info, timing,
                        steps, spe, runs_summary, before=before, before_folder=args.before, vs_random=vs_random,
                        other_ttp=other_ttp, ceiling_note=note, vs_ref=vs_ref, goals=goals)

    def slim(res_m):
        drop = ("test_items", "test_ids", "dev_items", "test_scores", "test_trials", "candidates")
        return None if res_m is None else {k: v for k, v in res_m.items() if k not in drop}

    result = {"budget": args.budget, "steps": steps, "steps_per_epoch": spe, "epochs": budget.epochs,
              "seeds": budget.seeds, "encoder": budget.encoder, "overrides": {**budget.overrides, **extra},
              "table": table, "comparisons": comparisons, "vs_random": vs_random, "vs_speaker_ref": vs_ref,
              "goals": goals,
              "picks": picks, "curves": curves,
              "cpu_seconds_to_pass_fbank_pm5_phones": ttp, "machine": info, "timing": timing,
              "before": {"folder": args.before, "comparisons": before} if args.before else None,
              "runs": {v: recs_ for v, recs_ in run_records.items()}, "failed_runs": [list(k) for k in failed],
              "corpus": {k: v for k, v in corpus.items() if k not in ("probe", "pretrain", "speaker", "emotion")},
              "probes": {r: {str(s): {m: slim(res[m]) for m in METRICS} for s, res in by_seed.items()}
                         for r, by_seed in probes.items()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
