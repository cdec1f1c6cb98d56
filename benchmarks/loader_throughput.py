#!/usr/bin/env python3
"""Samples per second delivered to the training loop: manifest loader vs shard loader.

    python benchmarks/loader_throughput.py hparams/mgf.yaml [--minutes 30] [--workers 0 2 4] [--repeats 2]

Builds a corpus of ``--minutes`` of audio from the bundled LibriSpeech sample
(copies with a different gain, speed and a little noise each), prepares it
once as the recipe does (CSV manifest) and packs the *same* files into shards
(``make_shards.py`` from that manifest). It then iterates whole training epochs
of both loaders exactly as ``recipes/pretrain/train.py`` builds them (crops,
dynamic batching, the masking collate), with 0, 2 and 4 data-loader workers,
interleaved (manifest, shards, manifest, ...), and prints samples/s and audio
seconds/s including the workers' start-up. Nothing is trained.

Then it projects one epoch of 60 k h on N processes from a per-step time
(``--step_seconds`` for ``--step_audio_seconds`` of audio; the defaults are the
measured full MGF step of benchmarks/RESULTS.md, "Pretraining throughput").
A benchmark, not a test.
"""

import argparse
import glob
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time

import numpy as np
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(folder, minutes, seed=0):
    """``minutes`` of audio: copies of the bundled LibriSpeech sample with gain, speed and noise."""
    files = sorted(glob.glob(os.path.join(REPO, "samples", "LibriSpeech", "*", "*", "*", "*.flac")))
    sources = [sf.read(f, dtype="float32")[0] for f in files]
    total = sum(len(s) for s in sources) / 16000
    rng = np.random.default_rng(seed)
    copies = int(np.ceil(minutes * 60 / total))
    for c in range(copies):
        speed, gain = float(rng.choice([0.9, 1.0, 1.1])), float(rng.uniform(0.5, 1.0))
        for f, wav in zip(files, sources):
            out = os.path.join(folder, f"copy{c:03d}", os.path.relpath(f, os.path.join(REPO, "samples", "LibriSpeech")))
            if os.path.exists(out):
                continue
            x = wav
            if speed != 1.0:  # linear-interpolation resampling played at 16 kHz: speed (and pitch) change
                x = np.interp(np.arange(0, len(wav) - 1, speed), np.arange(len(wav)), wav).astype("float32")
            x = gain * x + 0.003 * rng.standard_normal(x.shape[0]).astype("float32")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            sf.write(out, np.clip(x, -1, 1), 16000, subtype="PCM_16")
    return copies


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_train", os.path.join(REPO, "recipes", "pretrain", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count(batch, n_views):
    """(utterances, audio seconds) in an MGFBatch."""
    seconds = float((batch.wav_lens * batch.wavs.shape[1]).sum()) / 16000
    return batch.wavs.shape[0] // n_views, seconds


def one_epoch(loader, n_views):
    t0 = time.perf_counter()
    n = secs = 0
    for batch in loader:
        u, s = count(batch, n_views)
        n, secs = n + u, secs + s
    return n, secs, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hparams")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work_dir", default="/tmp/mgf_loader_bench")
    p.add_argument("--shard_size_mb", type=float, default=2.0)
    p.add_argument("--step_seconds", type=float, default=0.638,
                   help="measured seconds per training step (default: RESULTS.md, 50 Hz, --mask_copies=1, 2-core CPU)")
    p.add_argument("--step_audio_seconds", type=float, default=48.0, help="audio seconds in that step's batch")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    args, overrides = p.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    from hyperpyyaml import load_hyperpyyaml
    import speechbrain as sb

    from mgf_sb.batch import MGFCollate
    from mgf_sb.data.prepare_audio import prepare_pretraining
    from mgf_sb.data.shards import make_shards, shard_loaders

    corpus, manifests, shards = (os.path.join(args.work_dir, d) for d in ("corpus", "manifest", "shards"))
    copies = make_corpus(corpus, args.minutes)
    prepare_pretraining(corpus, manifests, train_splits=[], valid_splits=[], valid_fraction=0.02, min_duration=1.0)
    index = make_shards(os.path.join(manifests, "train.csv"), shards, shard_size_mb=args.shard_size_mb)
    ov = {"manifest_folder": manifests, "output_folder": os.path.join(args.work_dir, "out")}
    ov.update(dict(o.lstrip("-").split("=", 1) for o in overrides))
    recipe = load_recipe()
    results = {}
    for rep in range(args.repeats):
        for w in args.workers:
            for kind in ("manifest", "shards"):
                with open(args.hparams) as f:
                    hp = load_hyperpyyaml(f, {**ov, "num_workers": w})
                n_views = hp["n_views"]
                if kind == "manifest":
                    datasets, train_opts, _ = recipe.dataio_prepare(hp)
                    loader = sb.dataio.dataloader.make_dataloader(datasets["train"], **train_opts)
                else:
                    loader, _ = shard_loaders(
                        shards, MGFCollate(**hp["collate_args"]), MGFCollate(**hp["collate_args"], random_crop=False),
                        crop_seconds=hp["crop_seconds"], max_batch_length=hp["max_batch_length"],
                        valid_shards=shards, shuffle_buffer=hp["shuffle_buffer"], bucket_buffer=hp["bucket_buffer"],
                        max_padding_ratio=hp["max_padding_ratio"], num_workers=w, seed=hp["seed"])
                n, secs, dt = one_epoch(loader, n_views)
                results.setdefault((kind, w), []).append((n, secs, dt))
                print(f"  repeat {rep}: {kind:8s} {w} workers: {n} samples, {secs:.0f} s of crops in {dt:.2f} s",
                      flush=True)

    hp_crop = hp["crop_seconds"]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'n/a'}), "
          f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, Python {platform.python_version()}")
    print(f"corpus: {copies} augmented copies of the bundled LibriSpeech sample, {index['samples']} files, "
          f"{index['hours'] * 60:.1f} min, {len(index['shards'])} shards of ~{args.shard_size_mb} MB; "
          f"crop_seconds {hp_crop}, max_batch_length {hp['max_batch_length']} s; median of {args.repeats} epochs")
    print()
    print("| loader | workers | samples / s | audio s / s (crops) | epoch s | samples per epoch |")
    print("|---|---|---|---|---|---|")
    for w in args.workers:
        for kind in ("manifest", "shards"):
            runs = results[(kind, w)]
            rate = statistics.median(n / dt for n, _, dt in runs)
            audio = statistics.median(s / dt for _, s, dt in runs)
            print(f"| {kind} | {w} | {rate:.1f} | {audio:.0f} | {statistics.median(dt for *_, dt in runs):.2f} | "
                  f"{runs[0][0]} |")
    print()
    hours = 60000
    per_step_audio = args.step_audio_seconds / args.step_seconds
    need = per_step_audio / hp_crop
    print(f"projection (60 k h; step: {args.step_seconds} s for {args.step_audio_seconds} s of audio, "
          f"i.e. {per_step_audio:.1f} audio s/s = {need:.1f} samples/s of {hp_crop} s crops per process):")
    print("| processes | epoch wall-clock (projected) |")
    print("|---|---|")
    for n in args.gpus:
        t = hours * 3600 / (per_step_audio * n)
        print(f"| {n} | {t / 3600:.1f} h |")


if __name__ == "__main__":
    main()
