#!/usr/bin/env python3
"""Packs a corpus into WebDataset shards for ``--data_format=shards`` pretraining.

    python recipes/pretrain/make_shards.py <audio folder or manifest CSV> <out> \\
        [--shard_size_mb 200] [--max_segment_seconds 30] [--min_duration 1.0] [--workers 8]

Writes ``<out>/shard-000000.tar ...`` (16 kHz mono FLAC + JSON with id,
duration and origin per sample), ``<out>/shards.json`` (count, hours, samples
and seconds per shard), ``<out>/shards_skipped.tsv`` (files that failed the
audio check, with the reason) and, when a file was resampled or downmixed,
``<out>/shards_converted.tsv``. A planned shard whose files were all skipped is
not written (nor indexed). Rerunning the same command finishes an interrupted
run (finished shards are kept). Then:

    python recipes/pretrain/train.py hparams/mgf.yaml --data_format=shards --shards=<out>
"""

import argparse
import logging
import sys

from mgf_sb.data.shards import make_shards


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder of wav/flac (recursive) or a CSV manifest (ID, duration, wav)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--shard_size_mb", type=float, default=200.0, help="approximate shard size (default 200)")
    p.add_argument("--max_segment_seconds", type=float, default=30.0,
                   help="longer recordings are cut at low-energy points (0: never cut; default 30)")
    p.add_argument("--min_duration", type=float, default=1.0, help="shorter files/segments are skipped (default 1)")
    p.add_argument("--sample_rate", type=int, default=16000)
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--seed", type=int, default=0, help="seed of the recording order across shards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = make_shards(args.source, args.out, shard_size_mb=args.shard_size_mb,
                        max_segment_seconds=args.max_segment_seconds or None, min_duration=args.min_duration,
                        sample_rate=args.sample_rate, num_workers=args.workers, seed=args.seed)
    last = index["count"] - 1
    contiguous = [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(index["count"])]
    pattern = f" (or --shards='{args.out}/shard-{{000000..{last:06d}}}.tar')" if contiguous else ""
    print(f"{index['count']} shards, {index['samples']} samples, {index['hours']:.3f} h, "
          f"{index['skipped']} files skipped (shards_skipped.tsv), {index['converted']} converted"
          f"{' (listed in shards_converted.tsv)' if index['converted'] else ''}; "
          f"train with --data_format=shards --shards={args.out}{pattern}")


if __name__ == "__main__":
    main(sys.argv[1:])
