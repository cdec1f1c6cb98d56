#!/usr/bin/env python3
"""The speaker reference's own random-init rows: how much of its speaker skill is training's.

    python benchmarks/quality_ref_random.py --seeds 0 1 2 --out results/quality/ref-random

For each seed, the reference TDNN with the weights its training starts from (same seed), nothing
trained, its BatchNorm statistics calibrated on the pretraining audio
(:func:`quality_speaker_ref.random_init`), probed exactly as the trained reference rows of the
quality benchmark (same corpus, same probes; ``probes/speaker_ref_random__seed<N>.json``). A probe
on which the trained reference does not beat this row cannot tell learnt speaker knowledge from an
architecture's random features (benchmarks/RESULTS.md "Quality v3.4"). Compare with
``--baseline`` (the folder holding the trained reference's probes): a table of trained minus random,
paired over the test items and seeds.
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import quality  # noqa: E402
from quality_corpus import build_corpus  # noqa: E402
from quality_probe import ProbeData, run_probes  # noqa: E402
from quality_speaker_ref import REF_ROW, RefSettings, random_init  # noqa: E402

RANDOM_ROW = "speaker reference at random init"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", default="default", choices=sorted(quality.BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the budget's reference seeds")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results", "quality", "ref-random"))
    p.add_argument("--baseline", default=None, help="folder with the trained reference's probes "
                   "(default results/quality/<budget>)")
    p.add_argument("--cache", default=os.path.join("~", ".cache", "mgf_sb", "quality"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = quality.BUDGETS[args.budget]
    seeds = args.seeds or budget.speaker_ref["seeds"]
    corpus = build_corpus(args.cache, budget.corpus, log=quality.log)
    data = ProbeData(corpus, speaker_split=budget.speaker_split, n_trials=budget.n_trials)
    settings = {k: v for k, v in budget.speaker_ref.items() if k != "seeds"}
    probes = {RANDOM_ROW: {}, REF_ROW: {}}
    baseline = os.path.abspath(args.baseline or os.path.join(os.path.dirname(HERE), "results", "quality", args.budget))
    for seed in seeds:
        path = os.path.join(args.out, "probes", f"speaker_ref_random__seed{seed}.json")
        if not os.path.isfile(path):
            folder = os.path.join(args.out, "runs", f"seed{seed}")
            random_init(corpus["pretrain_folder"], folder, RefSettings(seed=seed, **settings), log=quality.log)
            res = run_probes(data, kind="speaker_ref", source=folder, seed=seed,
                             max_train_frames=budget.max_train_frames, max_iter=budget.max_iter)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            quality.write_probe(path, res)
        with open(path) as f:
            probes[RANDOM_ROW][seed] = json.load(f)
        trained = quality.probe_file(baseline, f"{quality.REF_KEY}/seed{seed}")
        if os.path.isfile(trained):
            with open(trained) as f:
                probes[REF_ROW][seed] = json.load(f)
    done = sorted(set(probes[RANDOM_ROW]) & set(probes[REF_ROW]))
    probes = {row: {s: probes[row][s] for s in done} for row in probes}
    if done:  # one layer per row for SID / EER / emotion, chosen on dev, as the benchmark's report does
        quality.choose_per_variant(probes, data, quality.CHOSEN_PER_VARIANT)
    lines = [f"# The speaker reference against its own random init (seeds {done}, test)", "",
             "| row | " + " | ".join(quality.METRICS) + " |", "|---" * (len(quality.METRICS) + 1) + "|"]
    for row in (REF_ROW, RANDOM_ROW):
        vals = [[probes[row][s][m]["test"] for s in done if probes[row][s].get(m)] for m in quality.METRICS]
        lines.append(f"| {row} | " + " | ".join(f"{sum(v) / len(v):.2f}" if v else "n/a" for v in vals) + " |")
    if done:
        diff = quality.compare(probes, REF_ROW, RANDOM_ROW, done)
        lines.append("| trained minus random (95 %, paired over items and seeds) | " + " | ".join(
            f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" if c else "n/a"
            for c in (diff.get(m) for m in quality.METRICS)) + " |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
