"""Losses: perfect prediction is optimal, shuffled targets are worse, no gradient reaches the teacher."""

import torch

from mgf_sb.batch import MGFCollate
from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor
from mgf_sb.objectives import FrameObjective, ObjectiveInputs, PhonemeObjective, ScaleSet, UtteranceObjective
from mgf_sb.objectives.losses import info_nce, nt_xent, regression_loss, sample_negatives
from mgf_sb.target import TargetNetwork


def test_regression_perfect_is_zero_and_shuffled_is_worse():
    t = torch.randn(50, 8)
    assert regression_loss(t, t, "l1") == 0 and regression_loss(t, t, "l2") == 0
    assert regression_loss(t[torch.randperm(50)], t, "l1") > 0.5


def test_sample_negatives_excludes_self_and_stays_in_group():
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    idx, valid = sample_negatives(group, n_same=5, n_any=5)
    own = torch.arange(6)[:, None]
    assert not ((idx == own) & valid).any()
    same, anyb = idx[:, :5], idx[:, 5:]
    assert (group[same][valid[:, :5]] == group[:, None].expand(6, 5)[valid[:, :5]]).all()
    assert not valid[5, :5].any()  # group 2 has a single unit: no same-group distractor
    assert valid[:, 5:].all() and (anyb < 6).all()


def test_info_nce_perfect_beats_shuffled():
    torch.manual_seed(0)
    k = torch.randn(64, 16)
    group = torch.arange(64) // 8
    idx, valid = sample_negatives(group, 4, 4)
    perfect, acc = info_nce(k * 3.0, k, idx, valid, 0.1)
    shuffled, _ = info_nce(k[torch.randperm(64)], k, idx, valid, 0.1)
    assert acc == 1.0 and perfect < 0.05 and shuffled > perfect + 1.0


def test_nt_xent_perfect_beats_shuffled():
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    z = base.repeat_interleave(2, 0)  # views 2i and 2i+1 identical
    partner = torch.arange(16) ^ 1
    perfect, acc = nt_xent(z, partner, 0.1)
    shuffled, _ = nt_xent(torch.randn(16, 16), partner, 0.1)
    assert acc == 1.0 and perfect < 0.1 and shuffled > perfect + 1.0


def _inputs(teacher_mode="ema"):
    torch.manual_seed(0)
    batch = MGFCollate(crop_seconds=3.0)([{"id": str(i), "sig": torch.randn(24000)} for i in range(4)])
    fe = FeatureExtractor()
    feats, n = fe(batch.wavs, batch.wav_lens)
    enc = MGFEncoder(80, d_model=32, num_layers=2, nhead=4, d_ffn=64, conv_pos_kernel=9, conv_pos_groups=4)
    target = TargetNetwork(teacher_mode, top_k_layers=2).attach(enc)
    hidden = enc(feats, n, mask=batch.input_mask)
    return enc, target, ObjectiveInputs(hidden, feats, target(enc, feats, n), batch)


def test_no_gradient_reaches_the_teacher_and_all_scales_backprop():
    enc, target, inputs = _inputs("ema")
    scales = ScaleSet(
        {"frame": FrameObjective(32, 80), "phoneme": PhonemeObjective(32, 80, loss="infonce", target="teacher"),
         "utterance": UtteranceObjective(32, 80)},
        {"frame": True, "phoneme": True, "utterance": True},
        {"frame": 1.0, "phoneme": 1.0, "utterance": 0.2},
    )
    assert scales.needs_teacher
    total, losses, _ = scales(inputs)
    assert set(losses) == {"frame", "phoneme", "utterance"}
    total.backward()
    assert all(p.grad is None for p in target.teacher.parameters())
    assert not inputs.teacher.requires_grad
    assert enc.input_proj.weight.grad is not None and enc.input_proj.weight.grad.abs().sum() > 0


def test_online_teacher_gives_no_gradient():
    enc, target, inputs = _inputs("online")
    assert target.teacher is None and not inputs.teacher.requires_grad


def test_ema_update_moves_teacher_toward_encoder():
    enc = MGFEncoder(80, d_model=32, num_layers=1, nhead=4, d_ffn=64, conv_pos_kernel=9, conv_pos_groups=4)
    target = TargetNetwork("ema", ema_start=0.5, ema_end=0.5).attach(enc)
    with torch.no_grad():
        enc.input_proj.weight.add_(1.0)
    before = (target.teacher.input_proj.weight - enc.input_proj.weight).abs().mean()
    target.update(enc)
    after = (target.teacher.input_proj.weight - enc.input_proj.weight).abs().mean()
    assert torch.isclose(after, before * 0.5, rtol=1e-4)


def test_disabled_scale_is_not_registered_and_all_disabled_fails():
    objs = {"frame": FrameObjective(32, 80), "utterance": UtteranceObjective(32, 80)}
    s = ScaleSet(objs, {"frame": True, "utterance": False}, {"frame": 1.0, "utterance": 1.0})
    assert list(s.keys()) == ["frame"] and not s.needs_teacher
    try:
        ScaleSet(objs, {"frame": False, "utterance": False}, {"frame": 1.0, "utterance": 1.0})
    except ValueError as e:
        assert "disabled" in str(e)
    else:
        raise AssertionError("all-disabled ScaleSet must fail")


def test_unsupported_combinations_fail_clearly():
    for kwargs in ({"loss": "ce"}, {"target": "words"}):
        try:
            FrameObjective(32, 80, **kwargs)
        except ValueError as e:
            assert "FrameObjective" in str(e)
        else:
            raise AssertionError(kwargs)
    try:
        UtteranceObjective(32, 80, loss="l1", target="other_view")
    except ValueError as e:
        assert "not supported" in str(e)
    else:
        raise AssertionError("l1 to the other view would collapse; must be refused")


def test_nt_xent_group_excludes_other_copies_of_the_same_utterance():
    torch.manual_seed(0)
    base = torch.randn(4, 16)
    # 2 copies x (2 utterances x 2 views); copies of one utterance are identical vectors
    z = base[[0, 1, 2, 3, 0, 1, 2, 3]]
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    group = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    with_group, _ = nt_xent(z + 0.01 * torch.randn_like(z), partner, 0.1, group=group)
    without, _ = nt_xent(z + 0.01 * torch.randn_like(z), partner, 0.1)
    # without the group, a view's own copy (near-identical) is a negative: the loss is much larger
    assert with_group < without - 0.5
