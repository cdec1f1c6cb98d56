#!/usr/bin/env python3
"""One objectives switch at a time, measured by the quality benchmark against today's defaults.

    python benchmarks/quality_switches.py                       # every group on full MGF, 3 seeds
    python benchmarks/quality_switches.py --groups teacher views --variant phoneme
    python benchmarks/quality_switches.py --groups pos_gate --dry_run     # the plan and its time; runs nothing

Each group of ``SWITCHES`` (the objectives issue's switches, grouped where they only make sense
together) is ``benchmarks/quality.py --variants <variant> --set <switches>`` in its own folder
``<out>/<group>``; the baseline is the same variant with no switch in ``--baseline`` (default
``results/quality/default``, trained when missing). fbank and random-encoder probes are reused
from the baseline folder (they do not depend on the pretraining settings).

Each switch is compared with the baseline by the paired bootstrap of ``quality_probe`` (utterances
and seeds resampled), **on the dev split first**: a default may move only when the dev interval
of one probe excludes 0 in favour of the switch and the other probe shows no resolved dev loss
(``decide``); the test split is reported beside it, not used to decide. The last epoch's
diagnostics of each run (``train_log.txt``) are averaged over seeds beside the numbers, so a
switch that does not do what it claims shows it.

``PREVIOUS_DEFAULTS`` are the groups that bring back a default this script moved (the teacher's
ramp, the learned target projection): the same measurement, read as an ablation of the move.

Writes ``<out>/switches.md`` and ``<out>/switches.json``.
"""

import argparse
import json
import os
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from quality_goals import last_epoch_stats  # noqa: E402

# group -> overrides of hparams/mgf.yaml (README "Objectives" table describes each switch). Each
# must differ from the YAML's default (tests/test_quality_stats.py): a group that sets a default
# measures noise.
SWITCHES = {
    "local_distractors": ["phoneme_negatives_within_ms=500"],
    "span_only_teacher": ["target_input=complement", "target_final_norm=instance"],
    "balance": ["scale_balance=grad_norm"],
    "views": ["view_min_seconds=1.0", "view_eq=0.3", "view_noise_snr_db=[10,30]", "utterance_queue_size=128"],
    "utterance_branch": ["utterance_branch=attentive", "utterance_layer=-2"],
    "whole_spans": ["whole_frame_spans=True", "normalizer_update_steps=100"],
}
SWITCHES["all"] = [kv for group in list(SWITCHES.values()) for kv in group]
# defaults that moved by this script's evidence (benchmarks/RESULTS.md), and the switches that
# bring the earlier behaviour back: measured the same way, as ablations of the move
PREVIOUS_DEFAULTS = {
    "ramp_teacher": ["ema_schedule=ramp", "ema_scope=encoder"],  # moved from: the teacher that stayed near its init
    "learned_target_projection": ["phoneme_target_projection=learned"],
}
SWITCHES.update(PREVIOUS_DEFAULTS)
# issue "Hierarchy in the network" (each scale at its own depth, a frame scale that keeps timbre, an
# input block that keeps each frame): not measured yet. Layer numbers are for the benchmark's
# 3-layer encoder (0: input embedding, 1-3: layers).
HIERARCHY = {
    "pos_weight_norm": ["conv_pos_norm=weight"],
    "pos_gate": ["conv_pos_scale_init=0.1"],
    "depth_hierarchy": ["frame_layer=1", "utterance_layer=2"],  # frame low, utterance middle, phoneme top
    "depth_reversed": ["phoneme_layer=1"],  # phoneme low, frame and utterance top: which way it runs
    "band_masking": ["frame_freq_mask_bins=16", "frame_noise_std=0.2"],  # TERA's alterations
}
# the same issue's targets and views (phoneme units, views that differ in channel, no negatives)
HIERARCHY.update({
    "phoneme_units": ["phoneme_units=kmeans"],  # HuBERT-style: the distractors are the other units
    "view_channel": ["view_channel=True", "view_gap_seconds=1.0", "view_gap_strict=True"],
    "byol_views": ["view_channel=True", "utterance_loss=cosine", "utterance_target=teacher", "utterance_target_layers=[-1]"],
})
# together: the depth assignment and the views that helped zero-shot EER one at a time (RESULTS.md)
HIERARCHY["hierarchy_views"] = HIERARCHY["depth_hierarchy"] + HIERARCHY["view_channel"]
# views with their own channel helped the utterance scale alone (EER -4.5) but not full MGF at weight
# 0.05: the same views at a weight that reaches the shared trunk, and read where the speaker is lost
# (layer 0, right after the positional term: RESULTS.md "Where the speaker goes")
HIERARCHY["views_weight"] = HIERARCHY["view_channel"] + ["utterance_weight=0.2"]
HIERARCHY["views_input"] = HIERARCHY["view_channel"] + ["utterance_weight=0.2", "utterance_layer=0"]
# their controls and doses: the weight without the views; the input block read at a larger weight; the
# whole hierarchy (frame scale low, phoneme top, utterance scale at the input block)
HIERARCHY["weight_only"] = ["utterance_weight=0.2"]
HIERARCHY["views_input_strong"] = HIERARCHY["view_channel"] + ["utterance_weight=0.5", "utterance_layer=0"]
HIERARCHY["views_input_depth"] = HIERARCHY["views_input"] + ["frame_layer=1"]
# the utterance scale on its own branch (x-vector TDNN blocks on the input projection, statistics
# pooling), sharing only the input projection with the trunk: the trade above (speakers for phones
# through the shared layers) should not arise. At today's weight (Adam: the branch's own weights learn
# at any weight; the weight sets only its pull on the input projection), and at 0.2
HIERARCHY["tdnn_branch"] = HIERARCHY["view_channel"] + ["branch_layers=4", "utterance_layer=branch",
                                                        "utterance_pool=mean_std"]
HIERARCHY["tdnn_branch_weight"] = HIERARCHY["tdnn_branch"] + ["utterance_weight=0.2"]
# the reference TDNN's choices where the branch differs from it (RESULTS.md v3.4): BatchNorm, which
# keeps each frame's level (LayerNorm per frame erases it), and more negatives (a queue of earlier views)
HIERARCHY["tdnn_branch_bn"] = HIERARCHY["tdnn_branch"] + ["branch_norm=batch"]
HIERARCHY["tdnn_branch_bn_queue"] = HIERARCHY["tdnn_branch_bn"] + ["utterance_queue_size=256"]
# the branch on its own input projection: the utterance scale alone with a branch verifies within ~1.3 points
# of the reference, full MGF's shared-projection branch does not (the masked scales shape the projection)
HIERARCHY["tdnn_branch_own"] = HIERARCHY["tdnn_branch"] + ["branch_input=own"]
# ... and the reverse: the utterance scale owns the lowest level (alone with a branch it put the speaker
# there, EER 22.4), the masked scales read it through an adapter of their own (RESULTS.md v3.4)
HIERARCHY["tdnn_branch_only_input"] = HIERARCHY["tdnn_branch"] + ["branch_input=branch_only"]
# ... which cost the phones 1.8 points (the trunk reads the speaker's projection through one linear map):
# a non-linear reading, or a projection of the masked scales' own beside it (both start as the linear one)
HIERARCHY["tdnn_branch_only_mlp"] = HIERARCHY["tdnn_branch_only_input"] + ["trunk_adapter=mlp"]
HIERARCHY["tdnn_branch_only_own"] = HIERARCHY["tdnn_branch_only_input"] + ["trunk_adapter=own_proj"]
# ... or a tenth of the masked scales' gradient let back into the projection (wav2vec 2.0 scales its
# feature encoder's gradient by 0.1): between branch_only (none) and the shared projection (all)
HIERARCHY["tdnn_branch_only_grad"] = HIERARCHY["tdnn_branch_only_input"] + ["trunk_projection_grad=0.1"]
SWITCHES.update(HIERARCHY)

# last-epoch diagnostics shown beside each group (those its switches should move): the valid split's,
# where the student meets its context-only / interpolation baselines (issue "Hierarchy in the network"),
# and the train split's gradient norms (valid has no gradients). A column shows where any row has it.
DIAGNOSTICS_VALID = ["phoneme_acc", "phoneme_context_acc", "phoneme_self_context_acc", "phoneme_interp_acc", "frame", "frame_interp_l1",
                     "frame_band_interp_l1", "encoder_pos_ratio", "utterance_acc", "utterance_same_speaker_negatives"]
DIAGNOSTICS_TRAIN = ["teacher_init_share", "frame_short_runs", "frame_grad_norm", "phoneme_grad_norm",
                     "utterance_grad_norm"]


def decide(dev):
    """``dev``: {metric: paired_bootstrap of switch - baseline on dev}. -> "move default" | "keep".

    Move only when one probe's dev interval lies above 0 and no probe's lies below 0.
    """
    up = any(c["resolved"] and c["diff"] > 0 for c in dev.values())
    down = any(c["resolved"] and c["diff"] < 0 for c in dev.values())
    return "move default" if up and not down else "keep"


def diagnostics(folder, variant, seeds):
    """Mean over seeds of each ``DIAGNOSTICS_VALID`` (valid) and ``DIAGNOSTICS_TRAIN`` (train) value in
    the runs' last train-log entry, with the two baselines' margins: ``phoneme_acc - context`` (issue
    goal >= +0.15) and ``frame / interp`` (frame L1 over its interpolation baseline, goal <= 0.8)."""
    valid = last_epoch_stats(folder, variant, seeds, quality.slug, split="valid")
    train = last_epoch_stats(folder, variant, seeds, quality.slug, split="train")
    out = {k: valid[k] for k in DIAGNOSTICS_VALID if k in valid}
    out.update({k: train[k] for k in DIAGNOSTICS_TRAIN if k in train})
    if "phoneme_acc" in out and "phoneme_context_acc" in out:
        out["phoneme_acc - context"] = out["phoneme_acc"] - out["phoneme_context_acc"]
    if "phoneme_acc" in out and "phoneme_interp_acc" in out:  # over no network at all (RESULTS.md v3.3)
        out["phoneme_acc - interp"] = out["phoneme_acc"] - out["phoneme_interp_acc"]
    if out.get("frame_interp_l1") and "frame" in out:
        out["frame / interp"] = out["frame"] / out["frame_interp_l1"]
    return out


def random_probes(folder, seeds, data, metrics):
    """{"random": {seed: probe}} of the random-init encoder in ``folder`` (its probes carry no epoch),
    at one layer for the row as every other row, or {} where none is there."""
    out = {}
    for seed in seeds:
        path = quality.probe_file(folder, f"random/seed{seed}")
        if os.path.isfile(path):
            with open(path) as f:
                out[seed] = json.load(f)
    if not out:
        return {}
    probes = {"random": out}
    quality.choose_per_variant(probes, data, metrics)
    return probes


def vs_random_markdown(rows, variant):
    """Each group's (and the baseline's) ``variant`` minus the random-init encoder, test split: the
    distance to the design goals that are stated against random init."""
    have = [r for r in rows if r.get("vs_random")]
    have += [{"group": f"{r['group']} (random init of its own shape)", "vs_random": r["vs_random_same_shape"]}
             for r in rows if r.get("vs_random_same_shape")]
    if not have:
        return []
    lines = ["", f"{variant} minus the random-init encoder (test; paired bootstrap over items and seeds, 95 %; "
             "▲/▼: resolved better / worse than random):", "",
             "| group | phones | speakers | EER (lower is better) | emotion |", "|---|---|---|---|---|"]
    for r in have:
        cells = []
        for m in ("phones", "speakers", "eer", "emotion"):
            c = r["vs_random"].get(m)
            if c is None:
                cells.append("n/a")
                continue
            better = c["resolved"] and ((c["diff"] < 0) if m == "eer" else (c["diff"] > 0))
            worse = c["resolved"] and not better
            cells.append(f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" + (" ▲" if better else " ▼" if worse else ""))
        lines.append(f"| {r['group']} | " + " | ".join(cells) + " |")
    return lines


def versus_markdown(rows, versus):
    """Each group minus the group ``versus`` (both switches on today's defaults, same seeds): which of two
    switches is better, paired, dev and test (e.g. a stronger adapter minus the linear one)."""
    have = [r for r in rows if r.get("vs_group")]
    if not have:
        return []
    lines = ["", f"Each group minus **{versus}** (paired bootstrap over items and seeds, 95 %; ▲/▼ resolved):", "",
             "| group | dev phones | dev speakers | dev emotion | test phones | test speakers | "
             "test EER (lower is better) | test emotion |", "|---|---|---|---|---|---|---|---|"]
    for r in have:
        cells = [r["vs_group"]["dev"].get(m) for m in ("phones", "speakers", "emotion")]
        cells += [r["vs_group"]["test"].get(m) for m in ("phones", "speakers", "eer", "emotion")]
        lines.append(f"| {r['group']} | " + " | ".join(quality.fmt_diff(c) for c in cells) + " |")
    return lines


def quality_path(path):
    """``path`` relative to the repository where it is inside it, else as it is (a snapshot's run)."""
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def report(rows, variant, seeds, baseline, steps, versus=None):
    lines = [f"# Objectives switches, one group at a time ({variant}, seeds {seeds}, {steps} steps)", "",
             f"Switch minus baseline (`{quality_path(baseline)}`: today's defaults), accuracy points, "
             "paired bootstrap over utterances and seeds (95 %); ▲/▼ resolved. Defaults move on **dev** only "
             "(one probe resolved up, none resolved down); test shown beside it.", "",
             "| group | switches | dev phones | dev speakers | dev emotion | test phones | test speakers | "
             "test EER (lower is better) | test emotion | decision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["dev"].get(m) for m in ("phones", "speakers", "emotion")]
        cells += [r["test"].get(m) for m in ("phones", "speakers", "eer", "emotion")]
        lines.append(f"| {r['group']} | `{' '.join(r['switches'])}` | "
                     + " | ".join(quality.fmt_diff(c) for c in cells) + f" | {r['decision']} |")
    order = (["phoneme_acc", "phoneme_context_acc", "phoneme_acc - context"] + DIAGNOSTICS_VALID[2:4]
             + ["phoneme_acc - interp"] + DIAGNOSTICS_VALID[4:6] + ["frame / interp"] + DIAGNOSTICS_VALID[6:]
             + DIAGNOSTICS_TRAIN)
    keys = [k for k in order if any(k in r["diagnostics"] for r in rows)]
    lines += vs_random_markdown(rows, variant)
    lines += versus_markdown(rows, versus)
    lines += ["", "Last-epoch diagnostics, mean over seeds (valid split; the gradient norms and "
              "teacher_init_share / frame_short_runs: train split):", "",
              "| group | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['group']} | " + " | ".join(
            f"{r['diagnostics'][k]:.3g}" if k in r["diagnostics"] else "–" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", nargs="+", default=[g for g in SWITCHES if g != "all"], choices=list(SWITCHES))
    p.add_argument("--variant", default="full MGF", choices=list(quality.VARIANTS))
    p.add_argument("--budget", default="default", choices=sorted(quality.BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--baseline", default=None, help="baseline folder (default results/quality/<budget>)")
    p.add_argument("--out", default=None, help="default results/quality/switches-<budget>")
    p.add_argument("--cache", default=None)
    p.add_argument("--report_only", action="store_true", help="compare what is finished; train nothing")
    p.add_argument("--versus", default=None, choices=list(SWITCHES),
                   help="also report each group minus this group (one of --groups): which of two switches wins")
    args, rest = p.parse_known_args(argv)  # the rest goes to quality.py (--jobs, --threads, --device...)
    if args.versus and args.versus not in args.groups:
        raise SystemExit(f"--versus {args.versus}: give it in --groups too (it is compared as a group)")
    budget = quality.BUDGETS[args.budget]
    seeds = args.seeds or budget.seeds
    baseline = os.path.abspath(args.baseline or os.path.join(REPO, "results", "quality", args.budget))
    out = os.path.abspath(args.out or os.path.join(REPO, "results", "quality", f"switches-{args.budget}"))
    common = ["--budget", args.budget, "--variants", args.variant, "--curve_variants", "--seeds",
              *map(str, seeds), *(["--cache", args.cache] if args.cache else []),
              *(["--report_only"] if args.report_only else []), *rest]
    # reuses what is there (probes what is missing); --no_write: the baseline folder's own full report stays
    base = quality.main(common + ["--out", baseline, "--no_write"])
    if "--dry_run" in rest:  # the plan of the baseline and of each group; nothing runs, nothing to compare
        for group in args.groups:
            quality.log(f"group {group}: --set {' '.join(SWITCHES[group])}")
            quality.main(common + ["--out", os.path.join(out, group), "--baselines_from", baseline,
                                   "--set", *SWITCHES[group]])
        return []
    if base is None:
        raise SystemExit(f"no baseline in {baseline}")
    epochs, steps = base["epochs"], base["steps"]
    from quality_corpus import build_corpus
    from quality_probe import ProbeData

    corpus = build_corpus(args.cache or os.path.join("~", ".cache", "mgf_sb", "quality"), budget.corpus, log=quality.log)
    data = ProbeData(corpus, speaker_split=budget.speaker_split, n_trials=budget.n_trials)
    rows, group_probes = [], {}
    randoms = {}  # the random-init rows, loaded and chosen once per set of per-variant metrics
    for group in args.groups:
        folder = os.path.join(out, group)
        quality.main(common + ["--out", folder, "--baselines_from", baseline, "--set", *SWITCHES[group]])
        probes = quality.load_probes(folder, args.variant, seeds, epochs)
        probes_base = quality.load_probes(baseline, args.variant, seeds, epochs)  # fresh: chosen per group
        # one layer per variant, as the report: SID / EER / emotion always, phones only where both
        # folders' phone probes keep their candidates (else both keep each run's choice: like with like)
        metrics = quality.CHOSEN_PER_VARIANT + (quality.CHOSEN_PER_VARIANT_IF_ALL if all(
            (r.get("phones") or {}).get("candidates") for p in (probes, probes_base)
            for r in p.get(args.variant, {}).values()) else ())
        quality.choose_per_variant(probes_base, data, metrics)
        quality.choose_per_variant(probes, data, metrics)
        group_probes[group] = probes
        done = sorted(set(probes[args.variant]) & set(probes_base[args.variant]))
        if not done:
            quality.log(f"{group}: no finished seed; left out")
            continue
        row = {"group": group, "switches": SWITCHES[group], "seeds": done,
               "diagnostics": diagnostics(folder, args.variant, done)}
        for split in ("dev", "test"):
            row[split] = quality.compare(probes, args.variant, args.variant, done, split=split, probes_b=probes_base)
        row["decision"] = decide(row["dev"])
        if metrics not in randoms:
            randoms[metrics] = random_probes(baseline, seeds, data, metrics)
        random = randoms[metrics]
        if random:  # the design goals are stated against random init: each group's distance to it (test)
            row["vs_random"] = quality.compare(probes, args.variant, "random", done, probes_b=random)
            base_vs_random = quality.compare(probes_base, args.variant, "random", done, probes_b=random)
        own = random_probes(folder, done, data, metrics)  # a group that changes the encoder's shape
        if own:  # has random-init rows of its own shape (quality.py probes them in its folder)
            row["vs_random_same_shape"] = quality.compare(probes, args.variant, "random", done, probes_b=own)
        rows.append(row)
    other = group_probes.get(args.versus)  # None without --versus
    for row in rows:
        if other and row["group"] != args.versus:
            done = sorted(set(group_probes[row["group"]][args.variant]) & set(other[args.variant]))
            if done:
                row["vs_group"] = {split: quality.compare(group_probes[row["group"]], args.variant, args.variant, done,
                                                          split=split, probes_b=other) for split in ("dev", "test")}
    base_row = {"group": "baseline", "switches": [], "dev": {}, "test": {}, "decision": "",
                "diagnostics": diagnostics(baseline, args.variant, seeds)}
    if rows and "vs_random" in rows[-1]:
        base_row["vs_random"] = base_vs_random
    text = report([base_row] + rows, args.variant, seeds, baseline, steps, versus=args.versus)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "switches.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "switches.json"), "w") as f:
        json.dump({"variant": args.variant, "seeds": seeds, "steps": steps, "baseline": baseline,
                   "rows": [base_row] + rows}, f, indent=1)
    print(text)
    return rows


if __name__ == "__main__":
    main()
