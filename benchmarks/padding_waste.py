#!/usr/bin/env python3
"""Padding waste of SpeechBrain's DynamicBatchSampler, configured as the pretraining recipe does.

    python benchmarks/padding_waste.py [--n_utts=28539] [--seed=0]

Durations are drawn from a LibriSpeech-like mix (train-clean-100 has 28,539 utterances,
mostly 10 to 17 s, mode ~14-16 s, tails from ~1 s to ~35 s in the 960 h set):
70 % normal(14.8 s, 2.2 s), 20 % uniform(1, 14) s, 10 % uniform(16, 35) s, clipped to [1, 35].

For each setting the sampler (``speechbrain.dataio.sampler.DynamicBatchSampler``, with
``length_func = min(duration, crop_seconds)``, ``num_buckets``, ``max_batch_length``, random
batch order, as ``recipes/pretrain/train.py`` builds it) forms one epoch of batches; the waste is

    padded seconds / (batch size x longest item in the batch), summed over the epoch,

i.e. the share of the padded tensor that is zeros (what the encoder computes for nothing).
The pretraining collate cuts each crop into two views; their padding is the same fraction
(both views of every item are half its length). A benchmark (printed table), not a test.
"""

import argparse
import platform

import numpy as np
from speechbrain.dataio.sampler import DynamicBatchSampler

from mgf_sb.data.batching import quantile_boundaries  # what recipes/pretrain/train.py uses


def librispeech_like(n, seed=0):
    rng = np.random.RandomState(seed)
    kind = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    d = np.where(kind == 0, rng.normal(14.8, 2.2, n), np.where(kind == 1, rng.uniform(1, 14, n), rng.uniform(16, 35, n)))
    return np.clip(d, 1.0, 35.0)


class _Durations:
    """The minimum a DynamicBatchSampler needs: len() and items with a duration."""

    def __init__(self, durations):
        self.d = durations

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        return {"duration": float(self.d[i])}


def waste(durations, max_batch_length, num_buckets, crop_seconds, boundaries=False, seed=1986):
    """(padding waste, batches, mean utterances per batch, mean batch fill) of one epoch."""
    lengths = np.minimum(durations, crop_seconds) if crop_seconds else durations
    sampler = DynamicBatchSampler(
        _Durations(durations), max_batch_length=max_batch_length, num_buckets=num_buckets,
        length_func=lambda x: min(float(x["duration"]), crop_seconds) if crop_seconds else float(x["duration"]),
        shuffle=True, batch_ordering="random", seed=seed,
        lengths_list=[float(v) for v in lengths],
        bucket_boundaries=quantile_boundaries(lengths, num_buckets) if boundaries else [],
    )
    real = padded = 0.0
    sizes, fill = [], []
    for batch in sampler:
        lens = lengths[np.asarray(batch)]
        real += lens.sum()
        padded += len(lens) * lens.max()
        sizes.append(len(lens))
        fill.append(len(lens) * lens.max() / max_batch_length)
    return 1 - real / padded, len(sizes), float(np.mean(sizes)), float(np.mean(fill))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n_utts", type=int, default=28539)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = librispeech_like(args.n_utts, args.seed)
    q = np.percentile(d, [1, 10, 50, 90, 99])
    hist, edges = np.histogram(d, bins=np.arange(0, 36, 2))
    print(f"# padding waste of DynamicBatchSampler ({platform.node() or 'host'}; pure Python, no timing)")
    print(f"durations: {len(d)} utterances, {d.sum() / 3600:.1f} h, mean {d.mean():.1f} s, "
          f"percentiles 1/10/50/90/99: {' / '.join(f'{v:.1f}' for v in q)} s, "
          f"mode bin {edges[hist.argmax()]:.0f}-{edges[hist.argmax()] + 2:.0f} s")
    # (name, max_batch_length, num_buckets, crop, quantile bucket_boundaries?)
    settings = [
        ("pretraining recipe, sample config (hparams/mgf.yaml)", 30, 10, 6.0, True),
        ("pretraining recipe, LibriSpeech-960 command (README)", 1200, 10, 6.0, True),
        ("LibriSpeech-960 command, SpeechBrain's default buckets", 1200, 10, 6.0, False),
        ("pretraining, 16 s crops", 1200, 10, 16.0, False),
        ("16 s crops + quantile bucket_boundaries", 1200, 10, 16.0, True),
        ("no crop (whole utterances), 10 buckets", 1200, 10, None, False),
        ("no crop + quantile bucket_boundaries, 10", 1200, 10, None, True),
        ("no crop + quantile bucket_boundaries, 20", 1200, 20, None, True),
    ]
    print("\nbatch fill = mean over batches of (utterances x longest) / max_batch_length: how much of the "
          "requested batch the sampler actually fills.")
    print("\n| setting | max_batch_length (s) | num_buckets | crop (s) | batches | mean utts/batch | batch fill "
          "| padding waste |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mbl, nb, crop, qb in settings:
        w, nb_batches, mean_size, fill = waste(d, mbl, nb, crop, qb)
        print(f"| {name} | {mbl} | {nb} | {crop or '—'} | {nb_batches} | {mean_size:.1f} | {100 * fill:.0f} % "
              f"| {100 * w:.2f} % |")


if __name__ == "__main__":
    main()
