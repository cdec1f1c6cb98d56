"""Issue 13 (1-3): unbiased span placement, masks only for the enabled scales, frame spans
long enough that copying the visible neighbours does not solve the frame scale."""

import glob
import os

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO, SAMPLES
from mgf_sb.batch import MGFCollate
from mgf_sb.masking import sample_spans, span_membership, spans_to_mask
from mgf_sb.objectives.frame import interpolate_from_neighbours, neighbour_interpolation_l1

HPARAMS = os.path.join(REPO, "hparams", "mgf.yaml")


def load_hparams(**overrides):
    with open(HPARAMS, encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides)


def decile_rates(mask, n_frames):
    """(B, T) mask, (B,) lengths -> (10,) masked fraction per decile of each row's own length."""
    t = torch.arange(mask.shape[1])[None, :]
    valid = t < n_frames[:, None]
    dec = (t * 10 // n_frames[:, None]).clamp(max=9)
    hits = torch.zeros(10).index_add_(0, dec[valid], mask[valid].float())
    total = torch.zeros(10).index_add_(0, dec[valid], torch.ones(int(valid.sum())))
    return hits / total


@pytest.mark.parametrize("short,long_", [(41, 151), (76, 101)])
def test_span_mask_rate_is_flat_in_position_whatever_else_is_in_the_batch(short, long_):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([short, long_, long_, long_]).repeat(1500)
    start, length, valid = sample_spans(lengths, 0.35, 3, 10, generator=g)
    member = span_membership(start, length, long_)
    assert member.sum(1).max() <= 1  # no overlap
    assert ((start + length) * valid <= lengths[:, None]).all()  # never on padding
    mask = member.any(1)
    for n in (short, long_):
        rows = lengths == n
        rates = decile_rates(mask[rows], lengths[rows])
        # every decile of every length at the requested ratio (before the fix: 0.45-0.69 in the
        # first half of a 41-frame sequence among 151-frame ones, ~0 in its last deciles)
        assert (rates - 0.35).abs().max() < 0.03, (n, rates)
    # a sequence's masks do not depend on its batch: same rates alone as in the mixed batch
    alone = sample_spans(torch.full((1500,), short), 0.35, 3, 10, generator=g)
    rates_alone = decile_rates(spans_to_mask(alone[0], alone[1], short), torch.full((1500,), short))
    assert (rates_alone - 0.35).abs().max() < 0.03, rates_alone


def test_collate_mask_rate_is_flat_for_a_short_utterance_among_long_ones():
    """The default YAML: a 1.2 s utterance batched with 6 s ones (before: 0.00 in some deciles, 0.86 in others)."""
    hp = load_hparams()
    collate = MGFCollate(**hp["collate_args"])
    torch.manual_seed(0)
    items = ([{"id": f"s{i}", "sig": torch.randn(19200)} for i in range(4)]
             + [{"id": f"l{i}", "sig": torch.randn(96000)} for i in range(12)])
    masks, lens, rates_long = [], [], []
    for _ in range(60):
        b = collate(items)
        short = b.utt < 4
        masks.append(b.input_mask[short])
        lens.append(b.n_frames[short])
        rates_long.append(decile_rates(b.input_mask[~short], b.n_frames[~short]))
    T = max(m.shape[1] for m in masks)
    mask = torch.cat([torch.nn.functional.pad(m, (0, T - m.shape[1])) for m in masks])
    rates = decile_rates(mask, torch.cat(lens))
    rates_long = torch.stack(rates_long).mean(0)
    overall = rates_long.mean()
    assert 0.35 < overall < 0.5, overall  # phoneme 0.3 + frame 0.2 of the rest
    assert (rates - overall).abs().max() < 0.07, (rates, overall)
    assert (rates_long - overall).abs().max() < 0.03, rates_long


VARIANTS = [  # (overrides, scales whose masks hide the input)
    ({}, {"frame", "phoneme"}),
    ({"use_phoneme": False, "use_utterance": False}, {"frame"}),
    ({"use_frame": False, "use_utterance": False}, {"phoneme"}),
    ({"use_frame": False, "use_phoneme": False}, set()),
    ({"use_phoneme": False}, {"frame"}),
    ({"use_frame": False}, {"phoneme"}),
    ({"use_word": True}, {"frame", "phoneme", "word"}),
    ({"use_utterance": False, "phoneme_weight": 0.0}, {"frame"}),  # a weight of 0 disables a scale too
    ({"use_word": True, "use_frame": False}, {"phoneme", "word"}),
    ({"use_phoneme": False, "use_utterance": False, "shared_masks": True}, {"frame", "phoneme"}),
]


@pytest.mark.parametrize("overrides,masked", VARIANTS, ids=[str(sorted(v[0].items())) for v in VARIANTS])
def test_input_hides_exactly_what_the_enabled_losses_score(overrides, masked):
    hp = load_hparams(**overrides)
    torch.manual_seed(0)
    collate = MGFCollate(**hp["collate_args"])
    b = collate([{"id": f"u{i}", "sig": torch.randn(16000 * (3 + i))} for i in range(4)])
    per_scale = {"frame": b.frame_mask, "phoneme": b.span_mask, "word": b.word_mask}
    for scale, m in per_scale.items():
        assert bool(m.any()) == (scale in masked), (scale, overrides)
    scored = torch.zeros_like(b.input_mask)
    for scale in hp["objectives"].keys():  # what the enabled losses score
        if scale in per_scale:
            scored |= per_scale[scale]
    valid = torch.arange(b.input_mask.shape[1])[None] < b.n_frames[:, None]
    hidden = b.input_mask.sum() / valid.sum()
    if hp["shared_masks"]:  # the explicit switch: every variant hides frame + phoneme spans
        assert hidden > scored.sum() / valid.sum() + 0.1
    else:
        assert torch.equal(b.input_mask, scored)
    expected = {frozenset(): 0.0, frozenset({"frame"}): 0.2, frozenset({"phoneme"}): 0.3,
                frozenset({"frame", "phoneme"}): 0.3 + 0.2 * 0.7, frozenset({"phoneme", "word"}): 1 - 0.7 * 0.8,
                frozenset({"frame", "phoneme", "word"}): 1 - 0.7 * 0.8 * 0.8}
    assert abs(float(hidden) - expected[frozenset(masked)]) < 0.08, (overrides, float(hidden))


def test_frame_spans_default_to_tera_length_at_both_frame_rates():
    for stack in (1, 2):
        hp = load_hparams(frame_stack=stack)
        frame_ms = 10 * stack
        collate = MGFCollate(**hp["collate_args"])  # spans given in ms, rounded up to the encoder frame
        assert collate.masks.frame[1] * frame_ms >= 70  # >= 7 frames at 100 Hz
        assert collate.masks.frame[1] == -(-hp["frame_span_min_ms"] // frame_ms)
        assert collate.masks.phoneme[1:] == (-(-hp["phoneme_span_min_ms"] // frame_ms),
                                             -(-hp["phoneme_span_max_ms"] // frame_ms))


def test_neighbour_interpolation_hand_computed():
    x = torch.tensor([[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])[..., None]
    x = torch.cat([x, -x], -1)  # (2, 7, 2): every channel is interpolated alike
    visible = torch.tensor([[True, False, False, True, False, False, False],
                            [False, False, False, False, False, False, False]])
    pred = interpolate_from_neighbours(x, visible)
    # frames 1, 2 between visible 0 and 3: 10, 20; frames 4-6 after the last visible one copy it; no visible: 0
    assert pred[0, :, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 30.0, 30.0, 30.0]
    assert pred[0, :, 1].tolist() == [-0.0, -10.0, -20.0, -30.0, -30.0, -30.0, -30.0]
    assert pred[1].abs().sum() == 0
    # The logged stat: masked frames 1, 2, 4, 5 of sequence 0 (6 valid frames; frame 6 is padding)
    frame_mask = torch.tensor([[False, True, True, False, True, True, False]] * 2)
    frame_mask[1] = False
    l1 = neighbour_interpolation_l1(x, frame_mask, frame_mask, torch.tensor([6, 7]))
    assert abs(l1 - (0 + 0 + 10 + 20) / 4) < 1e-6


def test_default_frame_spans_are_not_solved_by_interpolation():
    """On speech, copying the neighbours of 10-30 ms spans is far better than of the default spans."""
    from mgf_sb.data.audio import read_audio
    from mgf_sb.features import FeatureExtractor

    files = sorted(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "train-clean-100", "*", "*", "*.flac")))[:4]
    wavs = [torch.from_numpy(read_audio(f)[0].mean(1)) for f in files]
    n = min(w.shape[0] for w in wavs + [torch.zeros(64000)])
    fe = FeatureExtractor(frame_stack=2).train()
    feats, n_frames = fe(torch.stack([w[:n] for w in wavs]), torch.ones(len(wavs)), epoch=1)
    hp = load_hparams(use_phoneme=False, use_utterance=False)
    _, span_min, span_max = MGFCollate(**hp["collate_args"]).masks.frame
    l1 = {}
    torch.manual_seed(0)
    for name, (lo, hi) in {"short": (1, 2), "default": (span_min, span_max)}.items():
        vals = []
        for _ in range(20):
            start, length, _ = sample_spans(n_frames, 0.2, lo, hi)
            mask = spans_to_mask(start, length, feats.shape[1])
            vals.append(neighbour_interpolation_l1(feats, mask, mask, n_frames))
        l1[name] = sum(vals) / len(vals)
    assert l1["default"] > 1.2 * l1["short"], l1


def test_whole_frame_spans_are_not_cut_by_phoneme_spans():
    """Issue 23 (5): by default phoneme spans cut ~35 % of frame-mask runs below the frame span
    length (interpolation territory); whole_frame_spans lays all spans out together instead."""
    from mgf_sb.objectives.frame import mask_run_lengths

    items = [{"id": f"u{i}", "sig": torch.randn(16000 * (2 + i % 4))} for i in range(12)]
    measured = {}
    for whole in (False, True):
        hp = load_hparams(whole_frame_spans=whole)
        collate = MGFCollate(**hp["collate_args"])
        span_min = collate.masks.frame[1]
        torch.manual_seed(0)
        runs, frame, phon, rates = [], [], [], []
        for _ in range(30):
            b = collate(items)
            assert not (b.frame_mask & b.span_mask).any()  # disjoint either way
            runs.append(mask_run_lengths(b.frame_mask))
            valid = torch.arange(b.frame_mask.shape[1])[None] < b.n_frames[:, None]
            frame.append(float(b.frame_mask.sum() / valid.sum()))
            phon.append(float(b.span_mask.sum() / valid.sum()))
            rates.append(decile_rates(b.input_mask, b.n_frames))
        runs = torch.cat(runs)
        measured[whole] = dict(short=float((runs < span_min).float().mean()), frame=sum(frame) / len(frame),
                               phon=sum(phon) / len(phon), rates=torch.stack(rates).mean(0))
        if whole:
            assert int(runs.min()) >= span_min, int(runs.min())  # no frame-mask run shorter than a frame span
    assert measured[False]["short"] > 0.25, measured[False]  # the cut runs the switch removes
    assert measured[True]["short"] == 0.0
    for whole in (False, True):  # the same amounts of masking: phoneme 0.3, frame 0.2 of the rest
        assert abs(measured[whole]["phon"] - 0.3) < 0.02 and abs(measured[whole]["frame"] - 0.14) < 0.02, measured
        rates = measured[whole]["rates"]
        assert (rates - rates.mean()).abs().max() < 0.04, (whole, rates)  # still flat in position


@pytest.mark.parametrize("overrides,masked", VARIANTS[:7], ids=[str(sorted(v[0].items())) for v in VARIANTS[:7]])
def test_whole_frame_spans_hide_what_the_enabled_losses_score(overrides, masked):
    hp = load_hparams(whole_frame_spans=True, **overrides)
    torch.manual_seed(0)
    b = MGFCollate(**hp["collate_args"])([{"id": f"u{i}", "sig": torch.randn(16000 * (3 + i))} for i in range(4)])
    per_scale = {"frame": b.frame_mask, "phoneme": b.span_mask, "word": b.word_mask}
    for scale, m in per_scale.items():
        assert bool(m.any()) == (scale in masked), (scale, overrides)
    assert not (b.frame_mask & (b.span_mask | b.word_mask)).any()
    assert not (b.span_mask & b.word_mask).any()  # whole: word spans no longer contain phoneme spans
