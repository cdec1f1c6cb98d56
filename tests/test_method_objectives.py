"""Issue 13 (3, 6, 7): batch distractors from other utterances only, the EMA decay
schedule, and the neighbour-interpolation baseline logged beside the frame loss."""

import numpy as np
import pytest
import torch

import mgf_sb.objectives.base as base
from mgf_sb.batch import MGFCollate
from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor
from mgf_sb.objectives import FrameObjective, ObjectiveInputs, PhonemeObjective
from mgf_sb.objectives.frame import neighbour_interpolation_l1
from mgf_sb.objectives.losses import sample_negatives
from mgf_sb.target import TargetNetwork
from test_pretrain import recipe, run, small_corpus  # noqa: F401  (fixtures of the pretraining tests)


def test_batch_distractors_never_share_the_source_utterance():
    torch.manual_seed(0)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5])  # sequences (sorted)
    utt = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 2, 3])  # their utterances (copies / views interleaved)
    idx, valid = sample_negatives(group, n_same=3, n_any=3000, exclude_group=utt)
    batch_idx = idx[:, 3:]
    assert valid[:, 3:].all()
    assert not (utt[batch_idx] == utt[:, None]).any()
    # every unit of another utterance is drawn, about uniformly (no unit starved or favoured)
    for i in range(10):
        counts = torch.bincount(batch_idx[i], minlength=10).float()
        allowed = utt != utt[i]
        assert (counts[~allowed] == 0).all()
        expected = 3000 / int(allowed.sum())
        assert ((counts[allowed] - expected).abs() < 0.25 * expected).all(), (i, counts)
    # same-sequence distractors are unchanged: same group, never the unit itself
    same = idx[:, :3]
    ok = valid[:, :3]
    assert (group[same][ok] == group[:, None].expand(10, 3)[ok]).all()
    assert not ((same == torch.arange(10)[:, None]) & ok).any()
    # a batch of one utterance has no batch distractor
    _, v = sample_negatives(torch.tensor([0, 0, 1]), 0, 2, exclude_group=torch.tensor([0, 0, 0]))
    assert not v.any()


def test_phoneme_objective_takes_batch_distractors_from_other_utterances(monkeypatch):
    """Other mask copies and the other view of the same utterance are never batch distractors."""
    torch.manual_seed(0)
    batch = MGFCollate(crop_seconds=3.0, mask_copies=2, span_mask_ratio=0.4, span_min=3, span_max=6)(
        [{"id": str(i), "sig": torch.randn(48000)} for i in range(3)])
    feats, n = FeatureExtractor().train()(batch.wavs, batch.wav_lens, epoch=1)
    feats, n = feats[batch.source], n[batch.source]
    enc = MGFEncoder(80, d_model=32, num_layers=1, nhead=4, d_ffn=64, conv_pos_kernel=9, conv_pos_groups=4)
    hidden = enc(feats, n, mask=batch.input_mask)
    obj = PhonemeObjective(32, 80, loss="infonce", target="fbank", n_negatives_same=0, n_negatives_batch=50)
    seen = {}
    original = base.info_nce

    def spy(query, positive, idx, valid, temperature):
        seen.update(idx=idx, valid=valid)
        return original(query, positive, idx, valid, temperature)

    monkeypatch.setattr(base, "info_nce", spy)
    loss, _ = obj(ObjectiveInputs(hidden, feats, None, batch))
    assert torch.isfinite(loss)
    _, group = obj.units(feats, batch)
    unit_utt = batch.utt[group]
    assert seen["valid"].all()
    assert not (unit_utt[seen["idx"]] == unit_utt[:, None]).any()


def test_ema_decay_schedule_starts_at_ema_start():
    enc = MGFEncoder(8, d_model=8, num_layers=1, nhead=2, d_ffn=16, conv_pos_kernel=3, conv_pos_groups=2)
    target = TargetNetwork("ema", ema_start=0.9, ema_end=0.99, ema_steps=10).attach(enc)
    # the schedule: linear from ema_start at step 0 to ema_end at ema_steps, then constant
    expected = [0.9 + 0.009 * min(s, 10) for s in range(15)]
    used = []
    p_t, p_o = target.teacher.input_proj.weight, enc.input_proj.weight
    for step in range(12):
        with torch.no_grad():
            p_t.zero_()
            p_o.fill_(1.0)
        target.update(enc)  # teacher = d * 0 + (1 - d) * 1
        used.append(1.0 - float(p_t.mean()))
        assert int(target.step) == step + 1
    assert np.allclose(used, expected[:12], atol=1e-6), used  # the first update uses ema_start
    assert np.allclose([target.decay(s) for s in range(15)], expected)


def test_frame_objective_reports_the_interpolation_baseline():
    torch.manual_seed(0)
    batch = MGFCollate(crop_seconds=3.0, frame_mask_ratio=0.3, frame_span_min=4, frame_span_max=6,
                       span_mask_ratio=0.0)([{"id": str(i), "sig": torch.randn(32000)} for i in range(2)])
    feats, n = FeatureExtractor().train()(batch.wavs, batch.wav_lens, epoch=1)
    hidden = [torch.zeros(feats.shape[0], feats.shape[1], 16)]
    obj = FrameObjective(16, 80)
    torch.nn.init.zeros_(obj.head[-1].weight)
    torch.nn.init.zeros_(obj.head[-1].bias)
    loss, stats = obj(ObjectiveInputs(hidden, feats, None, batch))
    masked = feats[batch.frame_mask[:, : feats.shape[1]]]
    assert torch.isclose(loss, masked.abs().mean(), rtol=1e-5)  # the zero head predicts 0
    # the stat: interpolation between the visible neighbours of the same masked frames
    assert stats["interp_l1"] == pytest.approx(
        neighbour_interpolation_l1(feats, batch.frame_mask, batch.input_mask, batch.n_frames))
    assert stats["interp_l1"] > 0


def test_train_log_shows_the_interpolation_baseline_beside_the_frame_loss(recipe, small_corpus, tmp_path):
    log = run(recipe, str(tmp_path / "frame"), small_corpus, number_of_epochs=1)
    train = log[0]["train"]
    assert "frame" in train and "frame_interp_l1" in train
    assert np.isfinite(train["frame_interp_l1"]) and train["frame_interp_l1"] > 0
    line = open(tmp_path / "frame" / "train_log.txt").read()
    assert "valid frame_interp_l1" in line
