"""Span masks for the frame and phoneme scales, vectorised.

All functions take the padded time axis ``T`` and per-sequence valid lengths,
and never mask padding. They are called in the collate function (see
:mod:`mgf_sb.batch`, which draws masks only for the enabled scales), so the
training step stays free of sampling code.

Spans are drawn *without overlap* (a random partition of the free frames), so
that each phoneme-scale span is a well-defined unit that can be told apart from
its distractors, and *without position bias*: every frame of every sequence has
the same probability of being masked, whatever else is in the batch
(tests/test_method_masks.py measures the mask rate per decile of position).
"""

import torch


def sample_spans(lengths, mask_ratio, span_min, span_max, max_spans=None, generator=None):
    """Draws non-overlapping spans covering ``mask_ratio`` of each sequence on average.

    Every row is drawn from its own random numbers only, so the mask of a
    sequence does not depend on what else is in the batch, and every frame of
    a sequence has the same probability of being masked (``mask_ratio`` when
    the spans fit). How:

    - the number of spans is ``L * mask_ratio / mean span length`` rounded up
      or down at random (stochastic rounding, so its mean is exact; spans that
      no longer fit in ``L`` are dropped);
    - the spans and the free frames are laid out on a circle of ``L`` frames
      (a random partition of the free frames into gaps), then rotated by a
      uniform random offset. The rotation makes every position equally likely
      to be masked; a span that crosses the end of the sequence is cut in two
      (its tail at the end, its head at frame 0), like a span cut by the crop
      window of a longer recording. Only such cut pieces may be shorter than
      ``span_min``.

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) number of valid frames of each sequence.
    mask_ratio : float
        Expected fraction of the valid frames to cover, in [0, 1).
    span_min, span_max : int
        Span length range in frames (inclusive), drawn uniformly per span.
    max_spans : int, optional
        Upper bound on the number of spans drawn per sequence.
    generator : torch.Generator, optional
        Source of randomness (for reproducible masks).

    Returns
    -------
    start : torch.LongTensor
        (B, S) first frame of each span, ascending within a row (0 where the
        span is invalid).
    length : torch.LongTensor
        (B, S) span lengths (0 where the span is invalid).
    valid : torch.BoolTensor
        (B, S) which spans exist (valid spans first in each row).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 1 <= span_min <= span_max:
        raise ValueError(f"need 1 <= span_min <= span_max, got {span_min}, {span_max}")
    lengths = lengths.long().cpu()
    B = lengths.shape[0]
    mean_len = (span_min + span_max) / 2.0
    expected = lengths.float() * mask_ratio / mean_len
    n_spans = expected.floor().long() + (torch.rand(B, generator=generator) < expected.frac()).long()
    if max_spans is not None:
        n_spans = n_spans.clamp(max=max_spans)
    S = int(n_spans.max().item()) if B > 0 else 0
    if S == 0:
        empty = torch.zeros(B, 0, dtype=torch.long)
        return empty, empty.clone(), empty.bool()

    length = torch.randint(span_min, span_max + 1, (B, S), generator=generator)
    valid = torch.arange(S)[None, :] < n_spans[:, None]
    length = length * valid
    # Drop trailing spans until the rest fit in the sequence (valid stays a prefix).
    valid = valid & (length.cumsum(1) <= lengths[:, None])
    length = length * valid
    free = lengths - length.sum(1)  # (B,) frames left unmasked

    # Gaps: each row's own n sorted uniform cut points (invalid entries sort
    # last, so a row never uses the cut points of a longer row's extra spans).
    cuts = torch.rand(B, S, generator=generator).masked_fill(~valid, 2.0).sort(dim=1).values
    gaps = torch.floor(cuts * (free[:, None].float() + 1)).long().clamp(max=free[:, None])
    start = gaps + (length.cumsum(1) - length)
    # Uniform rotation on the circle of L frames, then cut the span crossing the end.
    L = lengths.clamp(min=1)[:, None]
    shift = torch.floor(torch.rand(B, 1, generator=generator) * L).long()
    start = (start + shift) % L
    over = ((start + length) - L).clamp(min=0) * valid  # frames past the end (one span per row at most)
    head = over.sum(1, keepdim=True)  # (B, 1) the cut span's head, at frame 0
    start = torch.cat([start, torch.zeros_like(head)], 1)
    length = torch.cat([length - over, head], 1)
    valid = torch.cat([valid, head > 0], 1)
    # Ascending starts, invalid spans last; drop the extra column when no span was cut.
    key = torch.where(valid, start, torch.full_like(start, torch.iinfo(torch.long).max))
    order = key.argsort(dim=1)
    start, length, valid = start.gather(1, order), length.gather(1, order), valid.gather(1, order)
    if not bool(valid[:, -1].any()):
        start, length, valid = start[:, :-1], length[:, :-1], valid[:, :-1]
    return start * valid, length * valid, valid


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
    """Frame-scale mask (TERA / Mockingjay style spans of consecutive frames).

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
