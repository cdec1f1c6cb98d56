"""Masks: ratio, span lengths, no overlap, shapes, padding respected."""

import torch

from mgf_sb.batch import MGFCollate, n_encoder_frames
from mgf_sb.masking import sample_frame_mask, sample_spans, span_membership, spans_to_mask


def test_spans_lengths_ratio_and_no_overlap():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1000, 600, 300, 40])
    start, length, valid = sample_spans(lengths, 0.3, 5, 20, generator=g)
    assert start.shape == length.shape == valid.shape and start.shape[0] == 4
    # lengths within [5, 20] for valid spans, 0 otherwise; only the span cut in two
    # by the sequence end (its tail at the end, its head at frame 0) may be shorter
    assert ((length[valid] >= 1) & (length[valid] <= 20)).all()
    assert (length[~valid] == 0).all()
    short = valid & (length < 5)
    at_edge = (start == 0) | (start + length == lengths[:, None])
    assert (at_edge | ~short).all()
    member = span_membership(start, length, 1000)
    # no frame belongs to two spans; no span runs past the sequence end
    assert member.sum(1).max() <= 1
    assert ((start + length) * valid <= lengths[:, None]).all()
    # the expected ratio is exact for every length that fits the spans (mean over 300 draws)
    reps = lengths[:3].repeat_interleave(300)
    start, length, _ = sample_spans(reps, 0.3, 5, 20, generator=g)
    ratio = (spans_to_mask(start, length, 1000).sum(1).float() / reps).view(3, 300).mean(1)
    assert torch.allclose(ratio, torch.full((3,), 0.3), atol=0.015), ratio


def test_spans_cover_the_ratio_on_average():
    lengths = torch.full((200,), 500)
    start, length, valid = sample_spans(lengths, 0.4, 5, 20)
    covered = spans_to_mask(start, length, 500).float().mean()
    assert abs(covered.item() - 0.4) < 0.03


def test_too_short_sequence_gets_no_span():
    start, length, valid = sample_spans(torch.tensor([3, 100]), 0.3, 5, 20)
    assert not valid[0].any() and valid[1].any()


def test_frame_mask_respects_padding_and_exclusion():
    lengths = torch.tensor([100, 50, 10])
    exclude = torch.zeros(3, 100, dtype=torch.bool)
    exclude[:, :20] = True
    m = sample_frame_mask(lengths, 100, 0.5, 1, 3, exclude=exclude)
    assert m.shape == (3, 100)
    assert not m[:, :20].any()
    assert not m[1, 50:].any() and not m[2, 10:].any()
    assert m[0].float().mean() > 0.2


def test_collate_views_masks_and_partners():
    c = MGFCollate(crop_seconds=4.0, frame_mask_ratio=0.2, span_mask_ratio=0.3)
    items = [{"id": f"u{i}", "sig": torch.randn(16000 * (i + 2))} for i in range(3)]
    b = c(items)
    assert len(b) == 6 and b.id[0] == "u0/0" and b.id[1] == "u0/1"
    assert b.partner.tolist() == [1, 0, 3, 2, 5, 4]
    # each utterance (2, 3, 4 s; crop 4 s) is cut in two halves
    assert b.n_frames.tolist()[:2] == [int(n_encoder_frames(16000, 160, 1))] * 2
    T = b.frame_mask.shape[1]
    pad = torch.arange(T)[None] >= b.n_frames[:, None]
    assert not (b.input_mask & pad).any()
    assert not (b.frame_mask & b.span_mask).any()  # the two scales use disjoint frames
    assert b.span_valid.any(1).all()


def test_collate_frame_stack_halves_frames():
    c1 = MGFCollate(frame_stack=1, n_views=1)
    c2 = MGFCollate(frame_stack=2, n_views=1)
    items = [{"id": "a", "sig": torch.randn(32000)}]
    assert c2(items).n_frames.item() == (c1(items).n_frames.item() + 1) // 2


def test_mask_copies_share_audio_but_not_masks():
    c = MGFCollate(crop_seconds=4.0, mask_copies=3)
    b = c([{"id": f"u{i}", "sig": torch.randn(32000)} for i in range(2)])
    U, K = 4, 3
    assert b.wavs.shape[0] == U and len(b) == U * K
    assert b.source.tolist() == list(range(U)) * K
    assert b.utt.tolist() == [0, 0, 1, 1] * K
    # partner: the other view, same copy
    assert b.partner.tolist() == [m + 1 - 2 * (m % 2) for m in range(U * K)]
    assert not torch.equal(b.input_mask[0], b.input_mask[U])  # copies are masked independently


def test_word_spans_are_masked_and_kept_out_of_the_frame_mask():
    c = MGFCollate(crop_seconds=8.0, word_mask_ratio=0.2, word_span_min=30, word_span_max=60)
    b = c([{"id": "a", "sig": torch.randn(16000 * 8)}])
    assert b.word_valid.any()
    lengths = b.word_len[b.word_valid]
    assert ((lengths >= 1) & (lengths <= 60)).all()
    at_edge = (b.word_start == 0) | (b.word_start + b.word_len == b.n_frames[:, None])
    assert (b.word_len >= 30)[b.word_valid & ~at_edge].all()  # only a span cut by the sequence end is shorter
    assert (b.input_mask | ~b.word_mask).all()  # every word frame is hidden from the encoder
    assert not (b.frame_mask & b.word_mask).any()
    off = MGFCollate(crop_seconds=8.0)([{"id": "a", "sig": torch.randn(16000 * 8)}])
    assert off.word_start.shape[1] == 0 and not off.word_mask.any()


def test_whole_spans_are_never_cut_and_stay_flat_in_position():
    """sample_spans(whole=True): every span keeps its drawn length, the mask rate stays flat per decile."""
    from test_method_masks import decile_rates

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([41, 151, 97]).repeat(1500)
    start, length, valid = sample_spans(lengths, 0.35, 3, 10, generator=g, whole=True)
    assert ((length[valid] >= 3) & (length[valid] <= 10)).all()  # no cut piece, anywhere
    assert ((start + length) * valid <= lengths[:, None]).all()
    member = span_membership(start, length, 151)
    assert member.sum(1).max() <= 1
    mask = member.any(1)
    for n, tol in ((41, 0.07), (97, 0.04), (151, 0.04)):
        rows = lengths == n
        rates = decile_rates(mask[rows], lengths[rows])
        # whole spans cannot cover the two ends quite like the rest: a few points in a 4-span sequence
        assert (rates - 0.35).abs().max() < tol, (n, rates)
        assert abs(float(rates.mean()) - 0.35) < 0.01, (n, rates)
    # the default draw cuts the span crossing the sequence end (short pieces exist)
    start, length, valid = sample_spans(lengths, 0.35, 3, 10, generator=g)
    assert (length[valid] < 3).any()


def test_disjoint_spans_keep_each_scale_ratio_and_kind():
    from mgf_sb.masking import sample_disjoint_spans

    g = torch.Generator().manual_seed(1)
    lengths = torch.full((2000,), 150)
    (ps, pl, pv), (fs, fl, fv) = sample_disjoint_spans(
        lengths, [{"mask_ratio": 0.3, "span_min": 3, "span_max": 10},
                  {"mask_ratio": 0.2, "span_min": 4, "span_max": 6, "of_rest": True}], generator=g)
    assert ((pl[pv] >= 3) & (pl[pv] <= 10)).all() and ((fl[fv] >= 4) & (fl[fv] <= 6)).all()
    phon, frame = spans_to_mask(ps, pl, 150), spans_to_mask(fs, fl, 150)
    assert not (phon & frame).any()
    assert abs(float(phon.float().mean()) - 0.3) < 0.01
    assert abs(float(frame.float().mean()) - 0.2 * 0.7) < 0.01  # frame ratio: of the frames outside phoneme spans
    assert (ps[:, 1:] >= ps[:, :-1])[pv[:, 1:]].all()  # each scale's spans ascending, valid first


def test_mask_sampler_takes_ms_and_matches_the_frame_keywords():
    """Spans in ms (rounded up to the encoder frame) give the same masks as the old frame counts."""
    from mgf_sb.masking import MaskSampler, ms_to_frames

    assert [ms_to_frames(ms, 20) for ms in (50, 60, 61, 70, 120, 200)] == [3, 3, 4, 4, 6, 10]
    assert [ms_to_frames(ms, 10) for ms in (50, 70, 120)] == [5, 7, 12]
    spec = {"frame": {"mask_ratio": 0.2, "span_ms": [70, 120]}, "phoneme": {"mask_ratio": 0.3, "span_ms": [50, 200]}}
    items = [{"id": f"u{i}", "sig": torch.randn(16000 * (2 + i))} for i in range(3)]
    new = MGFCollate(frame_stack=2, crop_seconds=4.0, masks=spec)
    old = MGFCollate(frame_stack=2, crop_seconds=4.0, frame_mask_ratio=0.2, frame_span_min=4, frame_span_max=6,
                     span_mask_ratio=0.3, span_min=3, span_max=10)
    assert isinstance(new.masks, MaskSampler) and new.masks.frame == old.masks.frame == (0.2, 4, 6)
    torch.manual_seed(3)
    a = new(items)
    torch.manual_seed(3)
    b = old(items)
    assert torch.equal(a.frame_mask, b.frame_mask) and torch.equal(a.span_start, b.span_start)
    # a flat keyword overrides the matching entry of the dict (as benchmarks pass crop_seconds)
    assert MGFCollate(masks=spec, frame_stack=2, span_min=5).masks.phoneme == (0.3, 5, 10)
    try:
        MGFCollate(masks={"frame": {"mask_ratio": 0.2, "span_ms": [120, 70]}})
    except ValueError as e:
        assert "frame_span_min_ms" in str(e)
    else:
        raise AssertionError("a span range with min > max must be refused")
