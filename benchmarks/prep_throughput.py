#!/usr/bin/env python3
"""Pretraining data-preparation throughput, extrapolated to 100 h.

    python benchmarks/prep_throughput.py [--copies=20] [--workers=1] [--work=/tmp/mgf_prep_bench]

Copies the bundled LibriSpeech sample's training files ``--copies`` times (as new speakers) into
``--work``, runs the pretraining prep on them (``mgf_sb.data.prepare_audio.prepare_pretraining``,
``--workers`` processes: what ``--prep_workers`` sets) and prints the hours of audio checked, the
seconds it took, the real-time factor and the time per 100 h (extrapolated: a linear scaling of
the measured rate).
"""

import argparse
import glob
import json
import os
import shutil
import sys
import time

import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mgf_sb.data.prepare_audio import prepare_pretraining  # noqa: E402


def build(root, copies):
    files = sorted(glob.glob(os.path.join(REPO, "samples", "LibriSpeech", "train-clean-100", "*", "*", "*.flac")))
    for c in range(copies):
        for f in files:
            spk, chap, name = f.split(os.sep)[-3:]
            d = os.path.join(root, "train-clean-100", f"{spk}{c:03d}", chap)
            os.makedirs(d, exist_ok=True)
            shutil.copy(f, os.path.join(d, name.replace(spk, f"{spk}{c:03d}", 1)))
    return glob.glob(os.path.join(root, "**", "*.flac"), recursive=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default="/tmp/mgf_prep_bench")
    args = p.parse_args(argv)
    root = os.path.join(args.work, f"corpus{args.copies}")
    files = glob.glob(os.path.join(root, "**", "*.flac"), recursive=True) or build(root, args.copies)
    hours = sum(sf.info(f).duration for f in files) / 3600
    out = os.path.join(args.work, f"prep{args.copies}_{args.workers}")
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    prepare_pretraining(root, out, train_splits=["train-clean-100"], valid_splits=[], num_workers=args.workers)
    dt = time.time() - t
    print(json.dumps({"files": len(files), "hours": round(hours, 3), "workers": args.workers, "seconds": round(dt, 1),
                      "x_realtime": round(hours * 3600 / dt), "minutes_per_100h_extrapolated": round(dt / hours * 100 / 60, 1)}))


if __name__ == "__main__":
    main()
