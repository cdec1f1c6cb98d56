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

:func:`sample_masks` draws every scale's masks of a batch; :class:`MaskSampler`
holds its settings (spans in ms, the enabled scales). By default the frame
spans are drawn after the phoneme spans and lose the frames those cover, which
cuts them into runs as short as one frame; ``whole_frame_spans`` lays all
spans out together instead (:func:`sample_disjoint_spans`).

The frame scale's other alterations (TERA; off by default) hide bands of Mel
bins over a whole sequence (:func:`sample_band_mask`, every bin equally likely
to be hidden) and add noise (:func:`alter_features`); unlike the spans they act
on the features, so :class:`FrameAlteration` applies them in the training step
(:func:`mgf_sb.pretraining.mgf_forward`).
"""

import torch


def sample_spans(lengths, mask_ratio, span_min, span_max, max_spans=None, generator=None, whole=False):
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
      ``span_min``. ``whole=True`` moves such a span whole to the front instead
      (see :func:`layout_spans`).

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
    whole : bool
        Never cut a span (every span keeps its drawn length).

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
    lengths = lengths.long().cpu()
    length, valid = draw_span_lengths(lengths, mask_ratio, span_min, span_max, max_spans, generator)
    start, length, valid, _ = layout_spans(lengths, length, valid, generator=generator, whole=whole)
    return start, length, valid


def draw_span_lengths(lengths, mask_ratio, span_min, span_max, max_spans=None, generator=None, budget=None):
    """How many spans each row gets, and their lengths (not placed yet).

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) valid frames per sequence.
    mask_ratio, span_min, span_max, max_spans, generator :
        As :func:`sample_spans`.
    budget : torch.Tensor, optional
        (B,) frames the ratio applies to (default: ``lengths``); e.g. the frames
        left outside other scales' spans.

    Returns
    -------
    length : torch.LongTensor
        (B, S) span lengths, 0 where ``valid`` is False.
    valid : torch.BoolTensor
        (B, S) a prefix of each row: its ``round_stochastic(budget * ratio / mean length)`` spans.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 1 <= span_min <= span_max:
        raise ValueError(f"need 1 <= span_min <= span_max, got {span_min}, {span_max}")
    B = lengths.shape[0]
    budget = lengths if budget is None else budget
    mean_len = (span_min + span_max) / 2.0
    expected = budget.float().clamp(min=0) * mask_ratio / mean_len
    n_spans = expected.floor().long() + (torch.rand(B, generator=generator) < expected.frac()).long()
    if max_spans is not None:
        n_spans = n_spans.clamp(max=max_spans)
    S = int(n_spans.max().item()) if B > 0 else 0
    length = torch.randint(span_min, span_max + 1, (B, S), generator=generator)
    valid = torch.arange(S)[None, :] < n_spans[:, None]
    return length * valid, valid


def layout_spans(lengths, length, valid, kind=None, generator=None, whole=False):
    """Places drawn spans without overlap, every position equally likely to be masked.

    The spans (in the given order) and the free frames are laid out on a circle
    of ``L`` frames, the free frames split into gaps at each row's own sorted
    uniform cut points, then the circle is rotated by a uniform random offset.
    A span the rotation puts across the sequence end is cut in two (tail at the
    end, head at frame 0) or, with ``whole=True``, the cut moves to that span's
    start or end (chosen so that each end of the sequence keeps, on average,
    the masked frames the cut pieces gave it): the span sits whole at the front
    or at the back.

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) valid frames.
    length : torch.LongTensor
        (B, S) span lengths (0 where invalid).
    valid : torch.BoolTensor
        (B, S) a prefix of each row; spans that do not fit in ``L`` are dropped
        from the end of the row.
    kind : torch.LongTensor, optional
        (B, S) a label carried along with each span (e.g. which scale drew it).
    generator : torch.Generator, optional
    whole : bool

    Returns
    -------
    start, length, valid, kind :
        (B, S') spans sorted by start, invalid last (S' = S, or S + 1 when a
        cut span's head needs a column); ``kind`` is None when not given.
    """
    B, S = length.shape
    if kind is None:
        kind_in = torch.zeros(B, S, dtype=torch.long)
    else:
        kind_in = kind
    if S == 0:
        empty = torch.zeros(B, 0, dtype=torch.long)
        return empty, empty.clone(), empty.bool(), (None if kind is None else empty.clone())
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
    if whole:
        # Circle position that lands on frame 0. If it falls inside a span, o frames after its
        # start, move it to the span's start with probability (l - o) / l, else to its end: the
        # span goes whole to the front or to the back, and on average each end of the sequence
        # is masked as much as the cut pieces would have masked it.
        c = (L - shift) % L
        inside = valid & (start < c) & (c < start + length)
        s_in, l_in = (start * inside).sum(1, keepdim=True), (length * inside).sum(1, keepdim=True)
        to_start = torch.rand(B, 1, generator=generator) * l_in < (s_in + l_in - c)
        moved = torch.where(to_start, s_in, s_in + l_in)
        c = torch.where(inside.any(1, keepdim=True), moved, c)
        shift = (L - c) % L
    start = (start + shift) % L
    over = ((start + length) - L).clamp(min=0) * valid  # frames past the end (one span per row at most)
    head = over.sum(1, keepdim=True)  # (B, 1) the cut span's head, at frame 0
    head_kind = (kind_in * (over > 0)).sum(1, keepdim=True)
    start = torch.cat([start, torch.zeros_like(head)], 1)
    length = torch.cat([length - over, head], 1)
    valid = torch.cat([valid, head > 0], 1)
    kind_in = torch.cat([kind_in, head_kind], 1)
    # Ascending starts, invalid spans last; drop the extra column when no span was cut.
    key = torch.where(valid, start, torch.full_like(start, torch.iinfo(torch.long).max))
    order = key.argsort(dim=1)
    start, length, valid = start.gather(1, order), length.gather(1, order), valid.gather(1, order)
    kind_in = kind_in.gather(1, order)
    if not bool(valid[:, -1].any()):
        start, length, valid, kind_in = start[:, :-1], length[:, :-1], valid[:, :-1], kind_in[:, :-1]
    return start * valid, length * valid, valid, (None if kind is None else kind_in * valid)


def sample_disjoint_spans(lengths, scales, generator=None, whole=True):
    """Spans of several scales laid out together: no span of one scale cuts another's.

    Each scale draws its span lengths (:func:`draw_span_lengths`), the spans of
    all scales are shuffled together and placed by :func:`layout_spans`. With
    ``whole=True`` every span keeps its drawn length (no frame-scale run is
    shortened by a phoneme span or by the sequence end).

    Arguments
    ---------
    lengths : torch.LongTensor
        (B,) valid frames.
    scales : list of dict
        In drawing order, each ``{"mask_ratio", "span_min", "span_max"}`` (frames),
        optionally ``"max_spans"`` and ``"of_rest": True``: its ratio then applies to the
        frames left by the scales drawn before it (as the frame scale's
        ``frame_mask_ratio`` always has: a fraction of the frames outside
        phoneme spans).
    generator : torch.Generator, optional
    whole : bool

    Returns
    -------
    list of (start, length, valid)
        One triple of (B, S_k) tensors per scale, as :func:`sample_spans` returns them.
    """
    lengths = lengths.long().cpu()
    B = lengths.shape[0]
    lens, valids, kinds = [], [], []
    taken = torch.zeros(B, dtype=torch.long)
    for k, sc in enumerate(scales):
        budget = (lengths - taken) if sc.get("of_rest") else lengths
        ln, vd = draw_span_lengths(lengths, sc["mask_ratio"], sc["span_min"], sc["span_max"], sc.get("max_spans"),
                                   generator, budget=budget)
        taken = taken + ln.sum(1)
        lens.append(ln), valids.append(vd), kinds.append(torch.full_like(ln, k))
    length, valid, kind = torch.cat(lens, 1), torch.cat(valids, 1), torch.cat(kinds, 1)
    if length.shape[1] > 0:  # random order of the scales' spans along each row, valid ones first
        order = torch.rand(length.shape, generator=generator).masked_fill(~valid, 2.0).argsort(1)
        length, valid, kind = length.gather(1, order), valid.gather(1, order), kind.gather(1, order)
    start, length, valid, kind = layout_spans(lengths, length, valid, kind=kind, generator=generator, whole=whole)
    out = []
    for k in range(len(scales)):
        mine = valid & (kind == k)
        order = torch.sort((~mine).long(), dim=1, stable=True).indices  # this scale's spans first, still ascending
        n = int(mine.sum(1).max()) if B > 0 else 0
        st, ln, vd = (t.gather(1, order)[:, :n] for t in (start, length, mine))
        out.append((st * vd, ln * vd, vd))
    return out


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


def ms_to_frames(ms, frame_ms):
    """Span length in ms -> encoder frames, rounded up (70 ms at 20 ms frames: 4 frames).

    >>> ms_to_frames(70, 20), ms_to_frames(200, 20), ms_to_frames(60, 20)
    (4, 10, 3)
    """
    return max(1, int(-(-round(float(ms) * 1000) // round(float(frame_ms) * 1000))))


def sample_masks(n_frames, T, frame=(0.0, 1, 1), phoneme=(0.0, 1, 1), word=(0.0, 1, 1), max_spans=None,
                 whole_frame_spans=False, generator=None):
    """Every scale's masks for a batch of sequences (what ``compute_mask_indices`` is to fairseq).

    Arguments
    ---------
    n_frames : torch.LongTensor
        (B,) valid encoder frames per sequence.
    T : int
        Padded number of frames.
    frame, phoneme, word : tuple
        ``(mask_ratio, span_min, span_max)`` in encoder frames; a ratio of 0
        draws nothing. The phoneme and word ratios are fractions of the valid
        frames; the frame ratio is a fraction of the frames outside the
        phoneme and word spans.
    max_spans : int, optional
        Most phoneme spans per sequence.
    whole_frame_spans : bool
        False (the original draw): phoneme spans, then word spans (which may
        contain phoneme spans), then frame spans, from which the frames of the
        other spans are removed - which cuts frame spans into runs as short as
        one frame. True: all spans laid out together without overlap
        (:func:`sample_disjoint_spans`), so every frame-scale run is at least
        ``span_min`` frames long, and word spans no longer contain phoneme spans.
    generator : torch.Generator, optional

    Returns
    -------
    dict
        ``frame_mask`` (B, T); ``span_start``, ``span_len``, ``span_valid`` (B, S);
        and, when word spans are drawn, ``word_start``, ``word_len``, ``word_valid`` (B, W).
    """
    n_frames = n_frames.long().cpu()
    out = {}
    if whole_frame_spans:
        plan = [("phoneme", dict(zip(("mask_ratio", "span_min", "span_max"), phoneme), max_spans=max_spans))]
        if word[0] > 0:
            plan.append(("word", dict(zip(("mask_ratio", "span_min", "span_max"), word))))
        plan.append(("frame", dict(zip(("mask_ratio", "span_min", "span_max"), frame), of_rest=True)))
        drawn = dict(zip([n for n, _ in plan], sample_disjoint_spans(n_frames, [s for _, s in plan], generator)))
        frame_mask = spans_to_mask(drawn["frame"][0], drawn["frame"][1], T)
        out["span_start"], out["span_len"], out["span_valid"] = drawn["phoneme"]
        if "word" in drawn:
            out["word_start"], out["word_len"], out["word_valid"] = drawn["word"]
    else:
        start, length, valid = sample_spans(n_frames, *phoneme, max_spans=max_spans, generator=generator)
        out["span_start"], out["span_len"], out["span_valid"] = start, length, valid
        taken = spans_to_mask(start, length, T)
        if word[0] > 0:  # word spans are drawn on their own and may contain phoneme spans
            w = sample_spans(n_frames, *word, generator=generator)
            out["word_start"], out["word_len"], out["word_valid"] = w
            taken = taken | spans_to_mask(w[0], w[1], T)
        frame_mask = sample_frame_mask(n_frames, T, *frame, exclude=taken, generator=generator)
    pad = torch.arange(T)[None, :] >= n_frames[:, None]
    out["frame_mask"] = frame_mask & ~pad
    return out


class MaskSampler:
    """The collate's mask half: span lengths in ms, only the enabled scales' masks.

    Arguments
    ---------
    frame_ms : float
        One encoder frame (fbank hop x frame_stack); spans are rounded up to it.
    frame, phoneme, word : dict, optional
        ``{"mask_ratio": r, "span_ms": [min, max]}`` per scale (None or ratio 0: off).
    active_scales : iterable of str, optional
        The enabled scales (e.g. the ``ScaleSet``, whose keys they are). Only
        ``frame``, ``phoneme`` and ``word`` in it draw masks; None: every scale
        with a ratio > 0.
    shared_masks : bool
        Draw the frame and phoneme masks even for disabled scales (the same
        input distribution in every variant; word spans only when active).
    whole_frame_spans : bool
        Lay all spans out together so that no frame-scale span is cut
        (:func:`sample_masks`).
    max_spans : int, optional
        Most phoneme spans per sequence.

    Example
    -------
    >>> ms = MaskSampler(20.0, frame={"mask_ratio": 0.2, "span_ms": [70, 120]})
    >>> ms.frame
    (0.2, 4, 6)
    >>> sorted(ms(torch.tensor([50, 30]), 50))
    ['frame_mask', 'span_len', 'span_start', 'span_valid']
    """

    SCALES = ("frame", "phoneme", "word")

    def __init__(self, frame_ms, frame=None, phoneme=None, word=None, active_scales=None, shared_masks=False,
                 whole_frame_spans=False, max_spans=None):
        self.frame_ms = float(frame_ms)
        active = None if active_scales is None else {str(k) for k in active_scales}
        self.active_scales = active
        shared = {"frame": True, "phoneme": True, "word": False}
        for name, spec in zip(self.SCALES, (frame, phoneme, word)):
            draws = active is None or name in active or (shared[name] and bool(shared_masks))
            setattr(self, name, self._frames(name, spec) if draws else (0.0, 1, 1))
        self.whole_frame_spans = bool(whole_frame_spans)
        self.max_spans = max_spans

    def _frames(self, name, spec):
        """``{"mask_ratio", "span_ms"}`` -> ``(ratio, min_frames, max_frames)``, checked."""
        if not spec or not spec.get("mask_ratio"):
            return (0.0, 1, 1)
        ratio = float(spec["mask_ratio"])
        lo, hi = spec["span_ms"]
        if not 0.0 <= ratio < 1.0 or not 0 < float(lo) <= float(hi):
            raise ValueError(f"{name} mask: mask_ratio {ratio} must be in [0, 1) and span_ms {[lo, hi]} must be "
                             f"0 < min <= max ({name}_mask_ratio / {name}_span_min_ms / {name}_span_max_ms in "
                             f"hparams/mgf.yaml)")
        return (ratio, ms_to_frames(lo, self.frame_ms), ms_to_frames(hi, self.frame_ms))

    def __call__(self, n_frames, T, generator=None):
        """(B,) valid frames, padded length T -> the masks (see :func:`sample_masks`)."""
        return sample_masks(n_frames, T, self.frame, self.phoneme, self.word, max_spans=self.max_spans,
                            whole_frame_spans=self.whole_frame_spans, generator=generator)


# ---- Frame scale: frequency-band masking and magnitude alteration (TERA) ---------------------------


def sample_band_mask(n_seq, n_bins, max_width, count=1, generator=None, device=None):
    """Contiguous bands of Mel bins to hide, drawn independently for each sequence.

    Each of the ``count`` bands of a sequence has a width ``w`` uniform in
    ``[1, max_width]`` and a first bin uniform in ``[-(w - 1), n_bins - 1]``;
    the part that falls outside ``[0, n_bins)`` is dropped (as a span cut by
    the crop window). Unlike a start uniform in ``[0, n_bins - w]`` (TERA,
    SpecAugment), which hides the middle bins more often than the edges,
    every bin is then hidden by one band with the same probability,
    ``p = E[w / (n_bins + w - 1)]``, and by ``count`` independent bands (which may
    overlap) with probability ``1 - (1 - p) ** count``.

    Arguments
    ---------
    n_seq : int
        Sequences (M).
    n_bins : int
        Mel bins (F_mel).
    max_width : int
        Widest band, in [1, n_bins].
    count : int
        Bands per sequence (>= 1).
    generator : torch.Generator, optional
        CPU generator (the mask is then moved to ``device``).
    device : torch.device, optional

    Returns
    -------
    torch.BoolTensor
        (M, F_mel), True on hidden bins.

    Example
    -------
    >>> m = sample_band_mask(4, 80, 10, count=2)
    >>> m.shape, bool((m.sum(1) <= 20).all()), bool((m.sum(1) >= 1).all())
    (torch.Size([4, 80]), True, True)
    """
    if not 1 <= int(max_width) <= int(n_bins):
        raise ValueError(f"frame_freq_mask_bins must be in [1, n_mels = {n_bins}] (0: off), got {max_width}")
    if int(count) < 1:
        raise ValueError(f"frame_freq_mask_count must be >= 1, got {count}")
    on_cpu = generator is not None or device is None
    dev = torch.device("cpu") if on_cpu else device
    width = torch.randint(1, int(max_width) + 1, (n_seq, int(count)), generator=generator, device=dev)
    u = torch.rand(n_seq, int(count), generator=generator, device=dev)
    start = torch.floor(u * (n_bins + width - 1)).long() - (width - 1)  # uniform in [-(w - 1), n_bins - 1]
    b = torch.arange(n_bins, device=dev)[None, None, :]
    mask = ((b >= start[..., None]) & (b < (start + width)[..., None])).any(1)
    return mask if device is None else mask.to(device)


def stack_band_mask(band, frame_stack):
    """(M, F_mel) Mel-bin mask -> (M, F_mel * frame_stack) mask over stacked features.

    An encoder frame stacks ``frame_stack`` fbank frames side by side
    (:class:`mgf_sb.features.FeatureExtractor`: channel ``s * n_mels + b`` is bin
    ``b`` of sub-frame ``s``), so a hidden bin is hidden in every sub-frame.

    >>> stack_band_mask(torch.tensor([[True, False, False]]), 2).int().tolist()
    [[1, 0, 0, 1, 0, 0]]
    """
    return band.repeat(1, int(frame_stack))


def alter_features(feats, n_frames, band=None, noise_std=0.0):
    """The student's input under the frame scale's alterations (the targets stay ``feats``).

    Arguments
    ---------
    feats : torch.Tensor
        (M, T, F) normalised features.
    n_frames : torch.LongTensor
        (M,) valid frames.
    band : torch.BoolTensor, optional
        (M, F) channels hidden over the whole sequence: set to 0 (the mean of
        normalised features).
    noise_std : float
        Gaussian noise of this standard deviation (in normalised-feature units)
        added to every valid frame (TERA's magnitude alteration); 0: none.

    Returns
    -------
    torch.Tensor
        (M, T, F); padding stays 0, hidden channels are 0 (no noise on them).
    """
    out = feats
    if noise_std > 0:
        valid = (torch.arange(feats.shape[1], device=feats.device)[None, :] < n_frames.to(feats.device)[:, None])
        out = out + torch.randn_like(feats) * float(noise_std) * valid[..., None].to(feats.dtype)
    if band is not None:
        out = out.masked_fill(band.to(feats.device)[:, None, :], 0.0)
    return out


class FrameAlteration:
    """The frame scale's input alterations besides time spans (TERA): frequency bands and noise.

    Applied to the student's features in the training step
    (:func:`mgf_sb.pretraining.mgf_forward`, only while the frame scale is
    enabled and a switch is on); the frame loss then also reconstructs the
    hidden bands (:class:`mgf_sb.objectives.FrameObjective`). Off (the default)
    it draws no random number.

    Arguments
    ---------
    n_mels : int
    frame_stack : int
        Fbank frames per encoder frame (the feature vector is ``frame_stack`` Mel frames).
    band_bins : int
        Widest hidden band in Mel bins (``frame_freq_mask_bins``; 0: no band masking).
    band_count : int
        Bands per sequence (``frame_freq_mask_count``).
    noise_std : float
        ``frame_noise_std`` (0: no noise).

    Example
    -------
    >>> alt = FrameAlteration(n_mels=8, frame_stack=2, band_bins=3)
    >>> x, band = alt(torch.ones(2, 5, 16), torch.tensor([5, 3]))
    >>> band.shape, bool((x[band[:, None, :].expand_as(x)] == 0).all())
    (torch.Size([2, 16]), True)
    """

    def __init__(self, n_mels, frame_stack=1, band_bins=0, band_count=1, noise_std=0.0):
        self.n_mels, self.frame_stack = int(n_mels), int(frame_stack)
        self.band_bins, self.band_count = int(band_bins or 0), int(band_count)
        self.noise_std = float(noise_std or 0.0)
        if self.band_bins < 0 or self.band_bins > self.n_mels:
            raise ValueError(f"frame_freq_mask_bins must be in [0, n_mels = {self.n_mels}], got {band_bins}")
        if self.band_count < 1:
            raise ValueError(f"frame_freq_mask_count must be >= 1, got {band_count}")
        if self.noise_std < 0:
            raise ValueError(f"frame_noise_std must be >= 0, got {noise_std}")

    @property
    def active(self):
        return self.band_bins > 0 or self.noise_std > 0

    def __call__(self, feats, n_frames):
        """(M, T, F) features, (M,) valid frames -> (altered features, (M, F) band mask or None)."""
        band = None
        if self.band_bins > 0:
            if feats.shape[-1] != self.n_mels * self.frame_stack:
                raise ValueError(f"frame band masking: features of {feats.shape[-1]} channels, expected n_mels x "
                                 f"frame_stack = {self.n_mels * self.frame_stack}")
            bins = sample_band_mask(feats.shape[0], self.n_mels, self.band_bins, self.band_count,
                                    device=feats.device)
            band = stack_band_mask(bins, self.frame_stack)
        return alter_features(feats, n_frames, band, self.noise_std), band
