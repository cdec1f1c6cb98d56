"""Issue 33 (parts 1, 2, 5): switches for the hierarchy in the network, defaults = the old behaviour.

- input block: ``conv_pos_norm`` (weight norm of the positional convolution), ``conv_pos_scale_init``
  (a learnable gate), and the ``encoder_pos_ratio`` diagnostic (mean per-frame ||pos(x)|| / ||x||);
- depth per scale: ``frame_layer`` / ``phoneme_layer`` (the student's output each scale reads) and
  ``<scale>_target_layers`` (the teacher's layers each scale's target averages);
- frame scale: frequency-band masking (``frame_freq_mask_bins`` / ``frame_freq_mask_count``) and
  magnitude alteration (``frame_noise_std``), with the band-interpolation baseline
  ``frame_band_interp_l1`` beside the student's ``frame_band_l1``.
"""

import os

import numpy as np
import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO
from mgf_sb.batch import MGFCollate
from mgf_sb.encoder import MGFEncoder
from mgf_sb.masking import FrameAlteration, alter_features, sample_band_mask, stack_band_mask
from mgf_sb.objectives import FrameObjective, ObjectiveInputs, PhonemeObjective, ScaleSet
from mgf_sb.objectives.frame import band_interpolation, band_interpolation_l1
from mgf_sb.target import TargetNetwork, instance_norm
from test_pretrain import parse_log, recipe, run, small_corpus  # noqa: F401  (fixtures of the pretraining tests)

TINY = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, proj_dim=32, conv_pos_kernel=9, conv_pos_groups=4)


def load_hparams(**overrides):
    with open(os.path.join(REPO, "hparams", "mgf.yaml")) as f:
        return load_hyperpyyaml(f, {**TINY, "output_folder": "unused", **overrides})


def tiny_encoder(**kw):
    return MGFEncoder(16, d_model=16, num_layers=2, nhead=2, d_ffn=32, conv_pos_kernel=5, conv_pos_groups=4,
                      dropout=0.0, **kw)


# ---- defaults: the old behaviour --------------------------------------------------------------


def test_yaml_defaults_keep_the_old_modules():
    hp = load_hparams()
    enc = hp["encoder"]
    # no new parameter, no new config key (a default encoder's folder is as before)
    assert enc.pos.scale is None
    assert sorted(k for k in enc.state_dict() if k.startswith("pos.")) == ["pos.conv.bias", "pos.conv.weight"]
    assert "conv_pos_norm" not in enc.config and "conv_pos_scale_init" not in enc.config
    objectives = hp["objectives"]
    assert objectives["frame"].layer == -1 and objectives["phoneme"].layer == -1
    assert objectives["frame"].alteration is None and objectives.input_alteration is None
    assert all(m.teacher_slots == (0, 1) for m in objectives.values() if hasattr(m, "teacher_slots"))
    assert hp["target"].n_slots == 1 and "target" not in dict(objectives.named_children())


def test_default_positional_term_is_the_old_one():
    """x + GELU(conv(x)) with a plain convolution: the computation before the switches."""
    torch.manual_seed(0)
    enc = tiny_encoder()
    x = torch.randn(2, 7, 16)
    old = torch.nn.functional.gelu(enc.pos.conv(x.transpose(1, 2))).transpose(1, 2)
    assert torch.equal(enc.pos(x), old)


def test_default_target_is_the_mean_of_the_top_layers():
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    feats, n = torch.randn(2, 9, 16), torch.tensor([9, 6])
    hidden = enc(feats, n)
    target = TargetNetwork("online", top_k_layers=2)
    want = torch.stack([instance_norm(h, n) for h in hidden[-2:]]).mean(0)
    want = want * (torch.arange(9)[None, :] < n[:, None])[..., None]
    assert torch.equal(target(enc, feats, n), want)


# ---- (5) the input block -----------------------------------------------------------------------


def test_weight_norm_keeps_the_initial_output_and_normalises_each_kernel_position():
    torch.manual_seed(0)
    plain = tiny_encoder()
    torch.manual_seed(0)
    normed = tiny_encoder(conv_pos_norm="weight")
    x = torch.randn(2, 7, 16)
    assert torch.allclose(plain.pos(x), normed.pos(x), atol=1e-6)  # same weights at init
    par = normed.pos.conv.parametrizations.weight
    g, v = par.original0, par.original1
    assert g.shape == (1, 1, 5)  # one magnitude per kernel position (wav2vec 2.0: dim=2)
    before = normed.pos(x)
    with torch.no_grad():
        v.mul_(3.0)  # the direction's scale no longer matters ...
    assert torch.allclose(normed.pos(x), before, atol=1e-5)
    with torch.no_grad():
        g.mul_(0.0)  # ... the magnitude does
    assert torch.allclose(normed.pos(x), torch.nn.functional.gelu(normed.pos.conv.bias)[None, None, :].expand(2, 7, 16))
    assert normed.config["conv_pos_norm"] == "weight"
    # a folder's config rebuilds it (same parameter names)
    assert set(MGFEncoder(**normed.config).state_dict()) == set(normed.state_dict())
    with pytest.raises(ValueError, match="conv_pos_norm"):
        tiny_encoder(conv_pos_norm="batch")


def test_positional_gate_scales_the_term_and_learns():
    torch.manual_seed(0)
    plain = tiny_encoder()
    torch.manual_seed(0)
    gated = tiny_encoder(conv_pos_scale_init=0.25)
    feats, n = torch.randn(2, 7, 16), torch.tensor([7, 5])
    assert gated.pos.scale.item() == 0.25
    assert gated.pos_ratio(feats, n) == pytest.approx(0.25 * plain.pos_ratio(feats, n), rel=1e-5)
    gated(feats, n)[-1].sum().backward()
    assert gated.pos.scale.grad is not None and float(gated.pos.scale.grad.abs()) > 0
    torch.manual_seed(0)
    closed = tiny_encoder(conv_pos_scale_init=0.0)
    assert closed.pos_ratio(feats, n) == 0.0


def test_pos_ratio_on_a_hand_made_input_block():
    """Identity projection, a convolution that outputs a constant: ratio = |GELU(c)| / |feats_t| per valid frame."""
    enc = MGFEncoder(4, d_model=4, num_layers=1, nhead=1, d_ffn=8, conv_pos_kernel=3, conv_pos_groups=1)
    c = torch.tensor([1.0, 2.0, 0.0, 2.0])
    with torch.no_grad():
        enc.input_proj.weight.copy_(torch.eye(4))
        enc.input_proj.bias.zero_()
        enc.pos.conv.weight.zero_()
        enc.pos.conv.bias.copy_(c)
        enc.mask_emb.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    feats = torch.zeros(1, 4, 4)
    feats[0, 0, 0], feats[0, 1, 1], feats[0, 2, 2] = 1.0, 2.0, 4.0  # norms 1, 2 (masked: 10), 4; frame 3 padding
    pos_norm = float(torch.nn.functional.gelu(c).norm())
    n = torch.tensor([3])
    assert enc.pos_ratio(feats, n) == pytest.approx(pos_norm * (1 + 1 / 2 + 1 / 4) / 3, rel=1e-6)
    mask = torch.tensor([[False, True, False, False]])  # the mask embedding is what the frame then is
    assert enc.pos_ratio(feats, n, mask=mask) == pytest.approx(pos_norm * (1 + 1 / 10 + 1 / 4) / 3, rel=1e-6)


def test_scale_set_reports_pos_ratio_on_diagnostic_batches_only():
    torch.manual_seed(0)
    batch = MGFCollate(crop_seconds=2.0, span_mask_ratio=0.0)([{"id": str(i), "sig": torch.randn(24000)}
                                                                 for i in range(2)])
    T = batch.frame_mask.shape[1]
    enc = MGFEncoder(80, d_model=16, num_layers=1, nhead=2, d_ffn=32, conv_pos_kernel=5, conv_pos_groups=4)
    feats = torch.randn(batch.frame_mask.shape[0], T, 80)
    scales = ScaleSet({"frame": FrameObjective(16, 80)}, {"frame": True}, {"frame": 1.0})
    inputs = ObjectiveInputs(enc(feats, batch.n_frames, mask=batch.input_mask), feats, None, batch, encoder=enc)
    assert "encoder_pos_ratio" not in scales(inputs)[2]
    inputs.diagnostics = True
    stats = scales(inputs)[2]
    assert stats["encoder_pos_ratio"] == pytest.approx(enc.pos_ratio(feats, batch.n_frames, mask=batch.input_mask))


# ---- (1) depth per scale -----------------------------------------------------------------------


def _frame_batch(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(crop_seconds=3.0, frame_mask_ratio=0.3, frame_span_min=4, frame_span_max=6, span_mask_ratio=0.0)
    return MGFCollate(**{**args, **kw})([{"id": str(i), "sig": torch.randn(32000)} for i in range(2)])


def test_each_scale_reads_its_own_layer():
    batch = _frame_batch(span_mask_ratio=0.3, span_min=3, span_max=5)
    M, T = batch.frame_mask.shape
    feats = torch.randn(M, T, 80)
    good = torch.randn(M, T, 16, requires_grad=True)
    nan = torch.full((M, T, 16), float("nan"))
    for layer, hidden in ((0, [good, nan, nan]), (1, [nan, good, nan]), (-1, [nan, nan, good])):
        for obj in (FrameObjective(16, 80, layer=layer),
                    PhonemeObjective(16, 80, loss="infonce", target="fbank", layer=layer)):
            loss, _ = obj(ObjectiveInputs(hidden, feats, None, batch))
            assert torch.isfinite(loss), (type(obj).__name__, layer)
    with pytest.raises(ValueError, match="out of range"):
        FrameObjective(16, 80, layer=3)(ObjectiveInputs([good, nan, nan], feats, None, batch))
    hp = load_hparams(frame_layer=1, phoneme_layer=0)
    assert hp["objectives"]["frame"].layer == 1 and hp["objectives"]["phoneme"].layer == 0


def test_per_scale_teacher_layers_give_each_scale_its_slot():
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    feats, n = torch.randn(2, 9, 16), torch.tensor([9, 6])
    hidden = enc(feats, n)
    shared = TargetNetwork("online", top_k_layers=2)(enc, feats, n)
    target = TargetNetwork("online", top_k_layers=2, scale_layers={"phoneme": [1], "frame": None,
                                                                   "utterance": [0, 2], "word": [1]})
    out = target(enc, feats, n)
    assert out.shape == (2, 9, 16 * 3) and target.n_slots == 3
    assert torch.equal(out[..., :16], shared)  # slot 0: the shared target, as before
    valid = (torch.arange(9)[None, :] < n[:, None])[..., None]
    assert torch.equal(out[..., 16 * target.slot("phoneme"):][..., :16], hidden[1] * valid)  # one layer: no norm
    two = torch.stack([instance_norm(hidden[0], n), instance_norm(hidden[2], n)]).mean(0) * valid
    assert torch.allclose(out[..., 16 * target.slot("utterance"):][..., :16], two)
    assert target.slot("word") == target.slot("phoneme") and target.slot("frame") == 0
    # the ScaleSet tells each objective its slot; the objective reads it (NaN elsewhere)
    phon = PhonemeObjective(16, 80, loss="infonce", target="teacher", target_projection="none")
    frame = FrameObjective(16, 80)
    ScaleSet({"phoneme": phon, "frame": frame}, {"phoneme": True, "frame": True},
             {"phoneme": 1.0, "frame": 1.0}, target=target)
    assert phon.teacher_slots == (target.slot("phoneme"), 3) and frame.teacher_slots == (0, 3)
    batch = MGFCollate(crop_seconds=3.0, span_mask_ratio=0.4, span_min=3, span_max=5, frame_mask_ratio=0.0)(
        [{"id": str(i), "sig": torch.randn(32000)} for i in range(2)])
    M, T = batch.frame_mask.shape
    teacher = torch.full((M, T, 48), float("nan"))
    s = target.slot("phoneme")
    teacher[..., 16 * s : 16 * (s + 1)] = torch.randn(M, T, 16)
    loss, _ = phon(ObjectiveInputs([torch.randn(M, T, 16)], torch.randn(M, T, 80), teacher, batch,
                                   teacher_masked=teacher))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="out of range"):
        TargetNetwork("online", scale_layers={"phoneme": [5]})(enc, feats, n)


# ---- (2) frame scale: band masking and noise ---------------------------------------------------


def test_band_masks_hide_every_bin_equally_often():
    g = torch.Generator().manual_seed(0)
    n_bins, W, count, N = 40, 8, 2, 40000
    m = sample_band_mask(N, n_bins, W, count, generator=g)
    p = np.mean([w / (n_bins + w - 1) for w in range(1, W + 1)])
    want = 1 - (1 - p) ** count
    rate = m.float().mean(0)
    se = (want * (1 - want) / N) ** 0.5
    assert (rate - want).abs().max() < 5 * se, rate  # every bin, edges included (no position bias)
    # edge bins as often as middle ones (a start uniform in [0, F - w] would hide the edges ~half as often)
    assert abs(float(rate[:4].mean() - rate[18:22].mean())) < 6 * se
    # one band: a single contiguous run of 1..W bins
    one = sample_band_mask(5000, n_bins, W, 1, generator=g).int()
    starts = (torch.diff(torch.nn.functional.pad(one, (1, 0)), dim=1) == 1).sum(1)
    assert (starts == 1).all() and (one.sum(1) >= 1).all() and (one.sum(1) <= W).all()
    # bands clear of both edges keep their drawn width (uniform in [1, W]); such a band of width w has
    # n_bins - w - 1 of its n_bins + w - 1 starts clear of the edges
    interior = one[(one[:, 0] == 0) & (one[:, -1] == 0)].sum(1).float()
    w = np.arange(1, W + 1)
    prior = (n_bins - w - 1) / (n_bins + w - 1)
    assert float(interior.mean()) == pytest.approx(float((w * prior).sum() / prior.sum()), abs=0.1)
    assert set(interior.long().tolist()) == set(range(1, W + 1))
    with pytest.raises(ValueError, match="frame_freq_mask_bins"):
        sample_band_mask(2, 10, 11)


def test_alteration_hides_the_band_on_every_frame_and_adds_noise_on_valid_frames_only():
    band_bins = torch.zeros(2, 8, dtype=torch.bool)
    band_bins[0, 2:5] = True
    band = stack_band_mask(band_bins, 2)
    assert band[0].tolist() == [False, False, True, True, True, False, False, False] * 2
    feats = torch.ones(2, 50, 16)
    feats[1, 30:] = 0.0  # padding of sequence 1
    n = torch.tensor([50, 30])
    torch.manual_seed(0)
    out = alter_features(feats, n, band, noise_std=0.5)
    assert (out[0][:, band[0]] == 0).all()
    noise = out - feats
    assert (noise[1, 30:] == 0).all()  # padding stays 0
    assert float(noise[0][:, ~band[0]].std()) == pytest.approx(0.5, rel=0.1)
    assert torch.equal(alter_features(feats, n), feats)  # nothing on: the features as they are
    alt = FrameAlteration(n_mels=8, frame_stack=2)
    assert not alt.active  # off by default: never called by the training step
    torch.manual_seed(1)
    x, b = FrameAlteration(n_mels=8, frame_stack=2, band_bins=3, band_count=1)(feats, n)
    assert b.shape == (2, 16) and torch.equal(b[:, :8], b[:, 8:]) and (b.sum(1) <= 6).all()


def test_band_interpolation_baseline_on_a_hand_made_example():
    # bins 0, 1, 4, 9, 16 (a parabola): hidden bins 1 and 2 lie between 0 and 9 -> 3 and 6, errors 2 and 2
    x = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0])
    feats = x.repeat(1, 4, 1)  # (1, T=4, 5)
    feats[0, 3] = 100.0  # a time-masked frame: scored whole by the frame loss, not by this baseline
    band = torch.tensor([[False, True, True, False, False]])
    assert band_interpolation(feats, band, 5)[0, 0].tolist() == [0.0, 3.0, 6.0, 9.0, 16.0]

    class B:  # the fields band_interpolation_l1 reads
        n_frames = torch.tensor([4])
        input_mask = torch.tensor([[False, False, False, True]])

    assert band_interpolation_l1(feats, band, B, 5) == pytest.approx(2.0)
    # stacked frames: the same bins hidden in each sub-frame, each interpolated within its own sub-frame
    stacked = torch.cat([feats, 2 * feats], -1)
    assert band_interpolation_l1(stacked, stack_band_mask(band, 2), B, 5) == pytest.approx((2.0 + 4.0) / 2)


def test_frame_loss_reconstructs_the_time_spans_and_the_hidden_bands():
    batch = _frame_batch()
    M, T = batch.frame_mask.shape
    torch.manual_seed(0)
    feats = torch.randn(M, T, 80)
    obj = FrameObjective(16, 80, n_mels=40, freq_mask_bins=6)
    torch.nn.init.zeros_(obj.head[-1].weight)
    torch.nn.init.zeros_(obj.head[-1].bias)  # predicts 0: the loss is the mean |target| over the scored elements
    band = stack_band_mask(sample_band_mask(M, 40, 6), 2)
    inputs = ObjectiveInputs([torch.randn(M, T, 16)], feats, None, batch, band_mask=band)
    loss, stats = obj(inputs)
    valid = torch.arange(T)[None, :] < batch.n_frames[:, None]
    time = batch.frame_mask
    visible = valid & ~batch.input_mask
    scored = time[..., None].expand(M, T, 80) | (visible[..., None] & band[:, None, :])
    assert torch.isclose(loss, feats.abs()[scored].mean(), rtol=1e-5)
    on_band = visible[..., None] & band[:, None, :]
    assert stats["band_l1"] == pytest.approx(float(feats.abs()[on_band].mean()), rel=1e-5)
    assert stats["band_interp_l1"] == pytest.approx(band_interpolation_l1(feats, band, batch, 40))
    assert "interp_l1" in stats  # the time-span baseline is still logged
    # without a band the loss is the old one (the time-masked frames only)
    old, _ = obj(ObjectiveInputs([inputs.hidden[0]], feats, None, batch))
    assert torch.isclose(old, feats[time].abs().mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="frame_freq_mask_bins"):
        FrameObjective(16, 80, loss="infonce", freq_mask_bins=4, n_mels=40)


def test_yaml_switches_build_and_disabled_frame_scale_alters_nothing():
    hp = load_hparams(frame_freq_mask_bins=10, frame_freq_mask_count=2, frame_noise_std=0.1,
                      conv_pos_norm="weight", conv_pos_scale_init=0.1, phoneme_target_layers=[1])
    alt = hp["objectives"].input_alteration
    assert alt is not None and (alt.n_mels, alt.frame_stack, alt.band_bins, alt.band_count, alt.noise_std) == (
        80, 2, 10, 2, 0.1)
    assert hp["objectives"]["phoneme"].teacher_slots == (1, 2)
    assert hp["encoder"].pos.scale.item() == pytest.approx(0.1)
    assert load_hparams(frame_freq_mask_bins=10, use_frame=False)["objectives"].input_alteration is None


def test_train_log_shows_the_new_diagnostics(recipe, small_corpus, tmp_path):
    """All switches on at once: the recipe runs and logs ||pos(x)|| / ||x|| and the band baseline."""
    out = str(tmp_path / "on")
    run(recipe, out, small_corpus, number_of_epochs=1, conv_pos_norm="weight", conv_pos_scale_init=0.1,
        frame_layer=1, phoneme_layer=2, phoneme_target_layers="[1]", frame_freq_mask_bins=8, frame_noise_std=0.1)
    line = open(os.path.join(out, "train_log.txt")).read()
    train = parse_log(os.path.join(out, "train_log.txt"))[0]["train"]
    for key in ("encoder_pos_ratio", "frame_band_l1", "frame_band_interp_l1", "frame_interp_l1"):
        assert key in train and np.isfinite(train[key]) and train[key] > 0, key
    assert "valid encoder_pos_ratio" in line and "valid frame_band_interp_l1" in line
