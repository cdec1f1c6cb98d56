"""Span masks for the frame and phoneme scales, vectorised.

All functions take the padded time axis ``T`` and per-sequence valid lengths,
and never mask padding. They are called in the collate function (see
:mod:`mgf_sb.batch`), so that an ablation that only changes loss weights sees
exactly the same masks for the same seed.

Spans are drawn *without overlap* (a random partition of the free frames), so
that each phoneme-scale span is a well-defined unit that can be told apart from
its distractors.
"""

import torch


def sample_spans(lengths, mask_ratio, span_min, span_max, max_spans=None, generator=None):
    """Draws non-overlapping spans covering about ``mask_ratio`` of each sequence.

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) number of valid frames of each sequence.
    mask_ratio : float
        Fraction of the valid frames to cover, in [0, 1).
    span_min, span_max : int
        Span length range in frames (inclusive), drawn uniformly per span.
    max_spans : int, optional
        Upper bound on the number of spans per sequence (S).
    generator : torch.Generator, optional
        Source of randomness (for reproducible masks).

    Returns
    -------
    start : torch.LongTensor
        (B, S) first frame of each span (0 where the span is invalid).
    length : torch.LongTensor
        (B, S) span lengths (0 where the span is invalid).
    valid : torch.BoolTensor
        (B, S) which spans exist; sequences too short for one span have none.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 1 <= span_min <= span_max:
        raise ValueError(f"need 1 <= span_min <= span_max, got {span_min}, {span_max}")
    lengths = lengths.long()
    B = lengths.shape[0]
    mean_len = (span_min + span_max) / 2.0
    # Number of spans per sequence: enough to reach the ratio on average.
    n_spans = torch.round(lengths.float() * mask_ratio / mean_len).long()
    if mask_ratio > 0:
        n_spans = n_spans.clamp(min=1)
    S = int(n_spans.max().item()) if B > 0 else 0
    if max_spans is not None:
        S = min(S, max_spans)
        n_spans = n_spans.clamp(max=max_spans)
    if S == 0:
        empty = torch.zeros(B, 0, dtype=torch.long)
        return empty, empty.clone(), empty.bool()

    length = torch.randint(span_min, span_max + 1, (B, S), generator=generator)
    valid = torch.arange(S)[None, :] < n_spans[:, None]
    length = length * valid
    # Drop trailing spans until the rest fit in the sequence.
    total = length.cumsum(1)
    valid = valid & (total <= lengths[:, None])
    length = length * valid
    free = lengths - length.sum(1)  # (B,) frames left unmasked

    # A random partition of the free frames into S+1 gaps: sorted uniform cut
    # points; span k starts after k cut points' worth of gap plus spans 0..k-1.
    cuts = torch.rand(B, S, generator=generator).sort(dim=1).values
    gaps = torch.floor(cuts * (free[:, None].float() + 1)).long().clamp(max=free[:, None])
    start = gaps + (length.cumsum(1) - length)
    start = start * valid
    return start, length, valid


def spans_to_mask(start, length, T):
    """Turns spans into a frame mask.

    Arguments
    ---------
    start, length : torch.LongTensor
        (B, S) spans (length 0 = no span).
    T : int
        Padded number of frames.

    Returns
    -------
    torch.BoolTensor
        (B, T), True on masked frames.
    """
    return span_membership(start, length, T).any(dim=1)


def span_membership(start, length, T):
    """(B, S, T) boolean: frame t belongs to span s."""
    t = torch.arange(T, device=start.device)[None, None, :]
    return (t >= start[..., None]) & (t < (start + length)[..., None])


def sample_frame_mask(lengths, T, mask_ratio, span_min, span_max, exclude=None, generator=None):
    """Frame-scale mask (wav2vec 2.0 / TERA style short spans).

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) valid frames per sequence.
    T : int
        Padded number of frames.
    mask_ratio : float
        Target fraction of masked valid frames.
    span_min, span_max : int
        Span length range in frames.
    exclude : torch.BoolTensor, optional
        (B, T) frames that must stay out of this mask (e.g. phoneme spans, so
        that the two scales' losses are computed on disjoint frames).
    generator : torch.Generator, optional

    Returns
    -------
    torch.BoolTensor
        (B, T) mask; never True on padding or on ``exclude``.
    """
    start, length, _ = sample_spans(lengths, mask_ratio, span_min, span_max, generator=generator)
    mask = spans_to_mask(start, length, T)
    if exclude is not None:
        mask = mask & ~exclude
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    return mask & ~pad
