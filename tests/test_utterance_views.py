"""Issue 33 (4): an utterance scale that can learn the speaker, not the recording.

- ``view_gap_strict``: views always at least ``view_gap_seconds`` apart (the measured gap's
  distribution is the documented one), and what the cap does without it;
- ``view_channel``: each view its own random log-Mel channel, shared by its mask copies, its teacher
  pass and its frame target, independent of the other view's; off = the features as before;
- ``utterance_loss: cosine`` with the teacher target: BYOL's 2 - 2 cos, gradient to the student only;
- ``utterance_same_speaker_negatives``: the share of in-batch negatives of the same known speaker
  (a hand count on a planted batch), from a manifest's ``spk_id``;
- a tiny pretraining run with all of it on.
"""

import os

import numpy as np
import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO
from mgf_sb.batch import MGFCollate, ViewSampler
from mgf_sb.features import FeatureExtractor
from mgf_sb.objectives import ObjectiveInputs, UtteranceObjective
from mgf_sb.objectives.utterance import byol_loss, same_speaker_share
from mgf_sb.pretraining import mgf_forward, view_channel_fn
from test_pretrain import parse_log, recipe, run, small_corpus  # noqa: F401  (fixtures of the pretraining tests)

SR = 16000
TINY = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, proj_dim=32, conv_pos_kernel=9, conv_pos_groups=4)


def load_hparams(**overrides):
    with open(os.path.join(REPO, "hparams", "mgf.yaml")) as f:
        return load_hyperpyyaml(f, {**TINY, "output_folder": "unused", **overrides})


def _view_windows(batch):
    """``[(start, stop)]`` in source samples of each distinct view, for a ramp signal (value = index)."""
    n = torch.round(batch.wav_lens * batch.wavs.shape[1]).long()
    return [(int(batch.wavs[u, 0]), int(batch.wavs[u, n[u] - 1]) + 1) for u in range(batch.wavs.shape[0])]


def _measured_gaps(collate, seconds, n_utts, reps):
    """Gaps (samples) between the two views' audio over ``reps`` collates of ``n_utts`` ramps, and the
    number of crops that gave one view."""
    ramp = torch.arange(int(seconds * SR), dtype=torch.float64).float()  # exact integers up to 2^24
    gaps, singles = [], 0
    for _ in range(reps):
        b = collate([{"id": str(i), "sig": ramp} for i in range(n_utts)])
        w = _view_windows(b)
        src = b.source[: b.wavs.shape[0]]
        for u in range(b.wavs.shape[0]):
            p = int(b.partner[u])
            if p < 0:
                singles += 1
            elif p > u:
                assert int(src[p]) == p  # copy 0: partner index = view index
                gaps.append(w[p][0] - w[u][1])
    return np.array(gaps), singles


# ---- views >= N s apart ------------------------------------------------------------------------


def test_strict_gap_is_never_shorter_and_follows_the_documented_distribution():
    """gap = g + (v - len_0 - start_0) + start_1, len uniform in [lo, v], start uniform in its half:
    >= g always, mean g + (v - lo) / 2, at most g + 2 (v - lo) (sample_view_windows' docstring)."""
    torch.manual_seed(0)
    gap_s, jitter, crop = 1.0, 0.2, 6.0
    c = MGFCollate(crop_seconds=crop, view_gap_seconds=gap_s, view_length_jitter=jitter, view_gain_db=0.0,
                   view_gap_strict=True, mask_copies=2)
    gaps, singles = _measured_gaps(c, 8.0, n_utts=8, reps=150)  # 1,200 pairs from 150 collates
    g = int(gap_s * SR)
    v = (int(crop * SR) - g) // 2
    d = v - (1 - jitter) * v
    assert singles == 0 and len(gaps) == 1200
    assert gaps.min() >= g and gaps.max() <= g + 2 * d
    # mean: g + d / 2; std of the excess: d * sqrt(14 / 144) (two independent D * U terms, D ~ U(0, d))
    se = d * np.sqrt(14 / 144) / np.sqrt(len(gaps))
    assert abs(gaps.mean() - (g + d / 2)) < 5 * se
    # the whole distribution: two-sample KS against the documented formula drawn with numpy
    rng = np.random.default_rng(0)
    ref = g + rng.uniform(0, d, 20000) * rng.uniform(0, 1, 20000) + rng.uniform(0, d, 20000) * rng.uniform(0, 1, 20000)
    grid = np.linspace(g, g + 2 * d, 200)
    ks = np.abs(np.searchsorted(np.sort(gaps), grid, "right") / len(gaps)
                - np.searchsorted(np.sort(ref), grid, "right") / len(ref)).max()
    assert ks < 1.95 * np.sqrt(1 / len(gaps) + 1 / len(ref)) * 1.2, ks  # well inside alpha = 0.001


def test_gap_of_one_second_on_the_benchmarks_and_the_yamls_crops():
    """The cap is view_gap_max_fraction (0.34) of the crop: 1.02 s on 3 s crops, 2.04 s on 6 s ones, so
    1 s is kept on full crops without the strict switch; a 2 s file shrinks it (logged), strict keeps it."""
    torch.manual_seed(1)
    for crop in (3.0, 6.0):
        c = MGFCollate(crop_seconds=crop, view_gap_seconds=1.0, view_length_jitter=0.2, view_gain_db=0.0)
        gaps, singles = _measured_gaps(c, crop + 1.0, n_utts=4, reps=25)
        assert singles == 0 and gaps.min() >= SR
    loose = MGFCollate(crop_seconds=3.0, view_gap_seconds=1.0, view_gain_db=0.0)
    gaps, _ = _measured_gaps(loose, 2.0, n_utts=2, reps=3)
    assert (gaps == int(0.34 * 2 * SR)).all()  # silently 0.68 s before the note; the note says it now
    assert "shrinks on crops shorter than 2.94 s" in loose.views.gap_note()
    strict = MGFCollate(crop_seconds=3.0, view_gap_seconds=1.0, view_gain_db=0.0, view_gap_strict=True)
    gaps, singles = _measured_gaps(strict, 2.0, n_utts=2, reps=3)
    assert singles == 0 and (gaps == SR).all()
    # too short for two views of view_min_seconds with the whole gap: one view, no pair
    short = MGFCollate(crop_seconds=3.0, view_gap_seconds=1.0, view_min_seconds=0.6, view_gap_strict=True)
    gaps, singles = _measured_gaps(short, 2.0, n_utts=2, reps=2)
    assert len(gaps) == 0 and singles == 4
    assert "gives one view" in short.views.gap_note()
    assert "every crop" in ViewSampler(crop_seconds=2.0, gap_seconds=1.0).gap_note()  # 0.34 x 2 s < 1 s
    assert ViewSampler(crop_seconds=2.0).gap_note() is None


def test_default_views_are_as_before():
    """view_gap_strict off: the windows of the old rule, draw for draw."""
    from mgf_sb.batch import sample_view_windows

    for n in (8000, 20000, 50000, 200000):
        torch.manual_seed(n)
        a = sample_view_windows(n, 96000, 2, 8000, 0.34, 0.2, 0)
        torch.manual_seed(n)
        b = sample_view_windows(n, 96000, 2, 8000, 0.34, 0.2, 0, True, False)
        assert a == b
    assert load_hparams()["collate_args"]["views"]["gap_strict"] is False


# ---- each view its own channel -----------------------------------------------------------------


def _frozen_features(n_mels=40):
    """A FeatureExtractor with fixed statistics (eval: the normalisation is one affine map)."""
    torch.manual_seed(0)
    fe = FeatureExtractor(n_mels=n_mels, frame_stack=1)
    fe(torch.randn(4, SR), torch.ones(4), epoch=1)  # statistics from one batch
    return fe.eval()


def test_channel_off_gives_the_same_features_and_draws_nothing():
    fe = _frozen_features()
    wavs, lens = torch.randn(3, SR), torch.tensor([1.0, 0.7, 0.5])
    ref, n_ref = fe(wavs, lens)
    assert load_hparams()["view_channel"] is False  # (loading the YAML seeds the generator)
    state = torch.get_rng_state()
    feats, n = fe(wavs, lens, channel=None)
    assert torch.equal(feats, ref) and torch.equal(n, n_ref) and torch.equal(torch.get_rng_state(), state)
    on, _ = fe(wavs, lens, channel=view_channel_fn())
    assert not torch.equal(on, ref)


def test_each_view_has_its_own_channel_shared_by_its_copies_teacher_and_target():
    """Without the noise floor the channel is an additive dB curve per view: after the (affine) global
    normalisation, (on - off) x std is that view's EQ + gain, the same on every frame. The two views of
    an utterance get independent curves; a view's mask copies, its teacher pass and its frame target
    (inputs.feats) are all that view's channelled features."""
    fe = _frozen_features()
    std = fe.normalizer.glob_std.reshape(-1)
    collate = MGFCollate(crop_seconds=2.0, view_gap_seconds=0.2, view_gain_db=0.0, mask_copies=2,
                         frame_mask_ratio=0.0, span_mask_ratio=0.0)
    curves = []
    torch.manual_seed(0)
    for _ in range(25):
        batch = collate([{"id": str(i), "sig": torch.randn(2 * SR)} for i in range(8)])
        off, n = fe(batch.wavs, batch.wav_lens)
        on, _ = fe(batch.wavs, batch.wav_lens, channel=view_channel_fn(noise_floor_db=None))
        for u in range(batch.wavs.shape[0]):
            d = (on[u, : n[u]] - off[u, : n[u]]) * std  # dB offsets of view u, per frame and bin
            assert torch.allclose(d, d[:1].expand_as(d), atol=1e-3)  # one curve for the whole view
            assert d.abs().max() <= 6.0 + 1e-3  # +-3 dB EQ + +-3 dB gain
            curves.append(d[0])
    curves = torch.stack(curves).view(-1, 2, std.numel())  # (pairs, view, bin): views u, u+1 are partners
    gain_like = curves.mean(-1)  # each view's mean offset
    assert abs(float(torch.corrcoef(gain_like.t())[0, 1])) < 0.2  # independent across the two views
    assert float(gain_like.std()) > 1.0  # and not constant (uniform +-3 dB gain: std 1.7, + the EQ's mean)
    assert (curves[:, 0] - curves[:, 1]).abs().amax(-1).min() > 0.05  # never the same channel

    # through the training forward: copies, teacher and frame target share the view's channel
    hp = load_hparams(ema_steps=10, crop_seconds=2.0)
    features, encoder = hp["features"].train(), hp["encoder"].eval()
    target = hp["target"].attach(encoder)
    batch = MGFCollate(**hp["collate_args"])([{"id": str(i), "sig": torch.randn(2 * SR)} for i in range(3)])
    with torch.no_grad():
        x = mgf_forward(features, encoder, target, batch, True, epoch=1, channel=view_channel_fn())
        features.eval()
        U = batch.wavs.shape[0]
        assert torch.equal(x.feats[:U], x.feats[U:])  # copy 1 of each view = copy 0
        plain, _ = features(batch.wavs, batch.wav_lens)
        assert not torch.allclose(x.feats[:U], plain)  # the channel is there
        n = batch.n_frames
        assert torch.allclose(x.teacher, target(encoder, x.feats, n), atol=1e-5)  # teacher saw the same
        assert x.input_feats is None  # the frame scale's target is x.feats: the view's channelled features


def test_recipe_applies_the_channel_in_training_only():
    """compute_forward builds the channel for the TRAIN stage only, and only when the switch is on."""
    import inspect

    from test_pretrain import _load_recipe

    src = inspect.getsource(_load_recipe().MGFBrain.compute_forward)
    assert "stage == sb.Stage.TRAIN" in src and "view_channel" in src


# ---- BYOL form -----------------------------------------------------------------------------------


def _inputs(n_utts, dim=8, speakers=None):
    items = [{"id": str(i), "sig": torch.randn(2 * SR)} for i in range(n_utts)]
    if speakers is not None:
        for it, s in zip(items, speakers):
            if s is not None:
                it["speaker"] = s
    batch = MGFCollate(crop_seconds=2.0, mask_copies=2)(items)
    M, T = batch.frame_mask.shape
    return ObjectiveInputs([torch.randn(M, T, dim, requires_grad=True)], torch.randn(M, T, 80),
                           torch.randn(M, T, dim, requires_grad=True), batch)


def test_byol_loss_is_zero_for_identical_embeddings_and_two_for_orthogonal_ones():
    x = torch.randn(5, 16)
    assert float(byol_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    e = torch.eye(4)
    assert float(byol_loss(e, e.roll(1, 0))) == pytest.approx(2.0)


def test_cosine_teacher_form_predicts_the_other_views_teacher_with_gradient_to_the_student_only():
    torch.manual_seed(0)
    obj = UtteranceObjective(8, 80, loss="cosine", target="teacher")
    x = _inputs(3)
    loss, stats = obj(x)
    loss.backward()
    assert x.teacher.grad is None  # stop-gradient target
    assert x.hidden[0].grad is not None and x.hidden[0].grad.abs().sum() > 0
    assert "acc" not in stats and "negatives" not in stats  # no negatives
    # the same number by hand: predictor(student view m) vs layer-normed pooled teacher of partner(m)
    from mgf_sb.objectives.utterance import masked_mean
    from mgf_sb.target import layer_norm_target

    with torch.no_grad():
        n = x.batch.n_frames
        z = obj.proj(masked_mean(x.hidden[0], n))
        t = layer_norm_target(masked_mean(x.teacher, n))
        p = x.batch.partner
        want = byol_loss(z, t[p])
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert (p >= 0).all() and (x.batch.utt[p] == x.batch.utt).all() and (x.batch.source[p] != x.batch.source).all()


def test_unsupported_combinations_name_the_keys():
    for loss, target in (("cosine", "fbank"), ("cosine", "other_view"), ("infonce", "teacher")):
        with pytest.raises(ValueError, match="utterance_loss=.* with utterance_target="):
            UtteranceObjective(8, 80, loss=loss, target=target)


# ---- same-speaker negatives ----------------------------------------------------------------------


def test_same_speaker_share_equals_a_hand_count_on_a_planted_batch():
    torch.manual_seed(0)
    speakers = [7, 7, 3, None, 7, 3]  # None: the manifest does not say
    x = _inputs(6, speakers=speakers)
    b = x.batch
    assert b.speaker.tolist() == [speakers[int(u)] if speakers[int(u)] is not None else -1 for u in b.utt]
    same = known = 0
    for i in range(len(b)):  # every sequence has a partner; negatives: the other utterances' rows
        for j in range(len(b)):
            si, sj = speakers[int(b.utt[i])], speakers[int(b.utt[j])]
            if b.utt[i] != b.utt[j] and si is not None and sj is not None:
                known += 1
                same += si == sj
    for form in ({}, {"loss": "cosine", "target": "teacher"}):
        _, stats = UtteranceObjective(8, 80, proj_dim=4, **form)(x)
        assert stats["same_speaker_negatives"] == pytest.approx(same / known)
    # hand count: 5 known utterances, 2 views x 2 copies each (4 rows): 20 x 16 pairs of rows,
    # same speaker: 7-7 (3 utts: 6 ordered pairs) and 3-3 (1 ordered pair x2) -> 8 of 20 utterance pairs
    assert same / known == pytest.approx(8 / 20)
    # no speaker known: absent
    _, stats = UtteranceObjective(8, 80, proj_dim=4)(_inputs(3))
    assert "same_speaker_negatives" not in stats and "acc" in stats
    assert same_speaker_share(torch.tensor([-1, -1]), torch.ones(2, 2, dtype=torch.bool)) is None


def test_librispeech_layout_writes_the_speaker_column(small_corpus, tmp_path):
    from mgf_sb.data.manifest import read_manifest
    from mgf_sb.data.prepare_audio import prepare_pretraining

    out = str(tmp_path / "m")
    prepare_pretraining(small_corpus, out, train_splits=["train-clean-100"], valid_splits=["dev-clean"])
    for split in ("train", "valid"):
        rows = read_manifest(os.path.join(out, f"{split}.csv"))
        assert all(r["spk_id"] == os.path.basename(r["wav"]).split("-")[0] for r in rows)


# ---- a tiny run with everything on ---------------------------------------------------------------


def test_tiny_run_with_view_channel_and_byol_trains_and_logs_the_share(recipe, small_corpus, tmp_path):  # noqa: F811
    out = str(tmp_path / "byol")
    log = run(recipe, out, small_corpus, number_of_epochs=1, view_channel=True, utterance_loss="cosine",
              utterance_target="teacher", utterance_target_layers=[-1], view_gap_seconds=1.0, view_gap_strict=True)
    for row in log:
        assert np.isfinite(row["train"]["utterance"]) and row["train"]["utterance"] >= 0
    share = log[0]["train"]["utterance_same_speaker_negatives"]
    assert 0.0 <= share <= 1.0
    text = open(os.path.join(out, "train_log.txt")).read()
    assert "valid utterance_same_speaker_negatives" in text


def test_new_keys_are_off_in_the_yaml_and_no_change_for_an_older_run():
    """Each new key is in run_guard.ADDED_SETTINGS at the YAML's default (an older run folder resumes)."""
    from mgf_sb.recipe import command_settings
    from mgf_sb.run_guard import ADDED_SETTINGS, settings_changes

    keys = ("view_channel", "view_channel_knots", "view_channel_eq_db", "view_channel_gain_db",
            "view_channel_noise_floor_db", "view_gap_strict")
    now = command_settings([os.path.join(REPO, "hparams", "mgf.yaml")])
    assert all(k in ADDED_SETTINGS and ADDED_SETTINGS[k] == now[k] for k in keys)
    before = {k: v for k, v in now.items() if k not in keys}
    assert settings_changes(before, now) == {}
    assert set(settings_changes(before, {**now, "view_channel": True})) == {"view_channel"}


def test_the_shared_instance_normalised_teacher_pools_to_zero_and_is_refused_for_the_utterance_scale():
    """The default teacher target (top 2 layers, each instance-normalised over time) has mean 0 over
    every sequence: pooled, as the utterance scale's teacher target, it is 0 for every view and the
    BYOL loss sits at 2 for a whole run. The ScaleSet refuses that setting at start-up, naming the
    fix; the utterance scale's own single layer is not normalised and carries the utterance."""
    from mgf_sb.objectives import ScaleSet
    from mgf_sb.objectives.utterance import masked_mean
    from mgf_sb.target import TargetNetwork

    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(4, 30, 8, generator=g) + torch.randn(4, 1, 8, generator=g) * 3 for _ in range(3)]
    n = torch.tensor([30, 25, 20, 30])
    shared = TargetNetwork(top_k_layers=2)
    assert shared.normalised_over_time("utterance")
    assert masked_mean(shared.combine(hidden, n), n).abs().max() < 1e-5  # every pooled target is 0
    own = TargetNetwork(top_k_layers=2, scale_layers={"utterance": [-1]})
    assert not own.normalised_over_time("utterance")
    pooled = masked_mean(own.combine(hidden, n, layers=(-1,)), n)
    assert pooled.norm(dim=1).min() > 1.0  # each utterance's own offset survives
    assert TargetNetwork(top_k_layers=1, final_norm="instance").normalised_over_time("utterance")

    def scales(target):
        return ScaleSet({"utterance": UtteranceObjective(8, 80, loss="cosine", target="teacher")},
                        {"utterance": True}, {"utterance": 1.0}, target=target)

    with pytest.raises(ValueError, match=r"utterance_target_layers=\[-1\]"):
        scales(shared)
    scales(own)  # accepted
    ScaleSet({"utterance": UtteranceObjective(8, 80)}, {"utterance": True}, {"utterance": 1.0}, target=shared)
