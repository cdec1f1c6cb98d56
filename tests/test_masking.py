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
