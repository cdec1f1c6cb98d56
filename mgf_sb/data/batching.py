"""Dynamic batching with bucket edges at the data's length quantiles.

Without explicit ``bucket_boundaries`` SpeechBrain's DynamicBatchSampler
spreads its bucket edges over (0, max_batch_length]; with a large
``max_batch_length`` (1200 s) every 6 s crop then lands in a bucket sized for
far longer items and batches hold a small fraction of the requested audio
(benchmarks/RESULTS.md, padding waste). Quantile edges fill the batches.
"""

import numpy as np
from speechbrain.dataio.sampler import DynamicBatchSampler


def quantile_boundaries(lengths, num_buckets):
    """Ascending, unique upper bucket edges at the quantiles of ``lengths``."""
    lengths = np.asarray(lengths, dtype=float)
    qs = np.quantile(lengths, np.linspace(0, 1, num_buckets + 1)[1:])
    return sorted({round(float(q), 4) for q in qs if q > 0})


def dynamic_batch_sampler(dataset, max_batch_length, num_buckets, length_func, seed=42, shuffle=True):
    """SpeechBrain's DynamicBatchSampler with quantile bucket edges.

    Arguments
    ---------
    dataset : DynamicItemDataset
    max_batch_length : float
        Total length (seconds, in ``length_func`` units) per batch.
    num_buckets : int
    length_func : callable
        Manifest row -> length.
    """
    lengths = [length_func(dataset.data[i]) for i in dataset.data_ids]
    return DynamicBatchSampler(
        dataset,
        max_batch_length=max_batch_length,
        length_func=length_func,
        bucket_boundaries=quantile_boundaries(lengths, num_buckets),
        shuffle=shuffle,
        batch_ordering="random",
        seed=seed,
    )
