"""Issue 13 (4): the two utterance views are separate crops with a gap, independently
jittered lengths and independent random gain (optional EQ tilt and noise).
Issue 23 (4): each view's own channel by the configured amount, a minimum view length,
more negatives (a queue), an utterance branch, validation batches that mix speakers."""

import math
import os

import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO
from mgf_sb.batch import MGFCollate

SR = 16000


def _views(collate, sig):
    """The two views of one utterance as 1-D tensors."""
    b = collate([{"id": "u", "sig": sig}])
    n = torch.round(b.wav_lens * b.wavs.shape[1]).long()
    return [b.wavs[i, : n[i]] for i in range(2)]


def test_views_are_separated_by_the_gap_and_have_independent_gains():
    gap_s, gain_db, jitter = 0.5, 6.0, 0.2
    c = MGFCollate(crop_seconds=4.0, view_gap_seconds=gap_s, view_length_jitter=jitter, view_gain_db=gain_db)
    n = 4 * SR
    ramp = torch.arange(1, n + 1, dtype=torch.float64).float()  # value = 1 + source sample index
    torch.manual_seed(0)
    gains, lengths = [], []
    v = (n - int(gap_s * SR)) // 2
    for _ in range(300):
        a, b = _views(c, ramp)
        la = []
        for x in (a, b):
            f = float(x[-1] - x[0]) / (x.shape[0] - 1)  # the gain (consecutive samples differ by 1 before it)
            idx = torch.round(x / f).long() - 1  # source sample indices
            assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + x.shape[0]))  # one contiguous window
            la.append((int(idx[0]), int(idx[-1])))
            gains.append(20 * math.log10(f))
            lengths.append(x.shape[0])
            assert (1 - jitter) * v - 1 <= x.shape[0] <= v
        assert la[1][0] - la[0][1] - 1 >= gap_s * SR  # never touch, never overlap: at least the gap between
    gains = torch.tensor(gains).view(-1, 2)
    lengths = torch.tensor(lengths, dtype=torch.float).view(-1, 2)
    assert gains.abs().max() <= gain_db + 1e-3 and gains.std() > gain_db / 2.5  # uniform in +-6 dB: std 3.5
    # independent across the two views of an utterance (|corr| of 300 independent pairs < 0.2)
    assert abs(torch.corrcoef(gains.t())[0, 1]) < 0.2
    assert abs(torch.corrcoef(lengths.t())[0, 1]) < 0.2
    assert lengths.std() > 0.03 * v


def test_gap_shrinks_for_a_short_crop():
    c = MGFCollate(crop_seconds=4.0, view_gap_seconds=0.5, view_gap_max_fraction=0.34)
    a, b = _views(c, torch.arange(1, int(1.2 * SR) + 1).float())
    # 1.2 s: the gap is at most 34 % of it (0.408 s), each view keeps (1.2 - 0.408) / 2 s
    assert a.shape[0] == b.shape[0] == (int(1.2 * SR) - int(0.34 * 1.2 * SR)) // 2
    assert b[0] - a[-1] - 1 == int(0.34 * 1.2 * SR)


def test_switches_off_give_the_adjacent_halves():
    c = MGFCollate(crop_seconds=4.0, view_gap_seconds=0.0, view_length_jitter=0.0, view_gain_db=0.0)
    sig = torch.randn(3 * SR + 1)
    a, b = _views(c, sig)
    half = sig.shape[0] // 2
    assert torch.equal(a, sig[:half]) and torch.equal(b, sig[half : 2 * half])


def test_eq_tilt_and_noise_are_drawn_per_view():
    torch.manual_seed(0)
    white = torch.randn(2 * SR)
    eq = MGFCollate(crop_seconds=4.0, view_eq=0.5)
    coefs = []
    for _ in range(100):
        for x in _views(eq, white):
            r1 = float((x[1:] * x[:-1]).mean() / (x * x).mean())  # lag-1 autocorrelation = c / (1 + c^2)
            coefs.append(r1)
    coefs = torch.tensor(coefs).view(-1, 2)
    assert coefs.abs().max() <= 0.5 / 1.25 + 0.03 and coefs.std() > 0.1
    assert abs(torch.corrcoef(coefs.t())[0, 1]) < 0.3
    tone = torch.sin(2 * math.pi * 440 * torch.arange(2 * SR) / SR)
    noisy = MGFCollate(crop_seconds=4.0, view_noise_snr_db=[10, 10])
    half = (2 * SR) // 2
    for x, clean in zip(_views(noisy, tone), (tone[:half], tone[half : 2 * half])):  # no gap, no jitter: halves
        snr = 10 * math.log10(float((clean ** 2).mean() / ((x - clean) ** 2).mean()))
        assert abs(snr - 10) < 0.5, snr


def test_default_yaml_separates_and_perturbs_the_views():
    with open(os.path.join(REPO, "hparams", "mgf.yaml"), encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {})
    args = hp["collate_args"]
    assert hp["view_gap_seconds"] > 0 and hp["view_gain_db"] > 0 and hp["view_length_jitter"] > 0
    c = MGFCollate(**args)
    assert c.views.gap == int(hp["view_gap_seconds"] * SR) and c.views.gain_db == hp["view_gain_db"]
    torch.manual_seed(0)
    b = c([{"id": f"u{i}", "sig": torch.randn(6 * SR)} for i in range(8)])
    U = b.wavs.shape[0]
    n = torch.round(b.wav_lens * b.wavs.shape[1]).long()
    assert len(set(n.tolist())) > U // 2  # view lengths differ: length alone does not match partners
    # every view is shorter than half the crop: the gap is skipped
    assert (n <= (6 * SR - int(hp["view_gap_seconds"] * SR)) // 2).all()


def _partner_match_rate(collate, wavs, fe, reps):
    """How often a view's nearest other view by raw fbank mean/std is its partner (5-utterance batches)."""
    torch.manual_seed(0)
    hit = total = 0
    for _ in range(reps):
        perm = torch.randperm(len(wavs)).tolist()
        for i in range(0, len(wavs) - 4, 5):
            b = collate([{"id": str(j), "sig": wavs[j]} for j in perm[i : i + 5]])
            f, n = fe(b.wavs, b.wav_lens)
            valid = (torch.arange(f.shape[1])[None] < n[:, None]).float()[..., None]
            mean = (f * valid).sum(1) / valid.sum(1)
            std = (((f - mean[:, None]) ** 2 * valid).sum(1) / valid.sum(1)).sqrt()
            z = torch.cat([mean, std], 1)
            d = torch.cdist(z, z).fill_diagonal_(float("inf"))
            hit += int((d.argmin(1) == torch.arange(z.shape[0]) ^ 1).sum())
            total += z.shape[0]
    return hit / total


def test_default_views_are_harder_to_match_by_raw_fbank_statistics():
    """Issue 13: adjacent halves were matched by raw fbank mean/std 31 % of the time (chance 11 %)."""
    import glob

    from conftest import SAMPLES
    from mgf_sb.data.audio import read_audio
    from mgf_sb.features import FeatureExtractor

    files = sorted(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "*", "*", "*", "*.flac")))
    wavs = [torch.from_numpy(read_audio(f)[0].mean(1)) for f in files]
    fe = FeatureExtractor().train()
    for w in wavs[:20]:
        fe(w[None], torch.ones(1), epoch=1)
    fe.eval()
    with open(os.path.join(REPO, "hparams", "mgf.yaml"), encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"mask_copies": 1})
    halves = MGFCollate(crop_seconds=hp["crop_seconds"], mask_copies=1)  # every view switch off
    old = _partner_match_rate(halves, wavs, fe, reps=8)
    new = _partner_match_rate(MGFCollate(**hp["collate_args"]), wavs, fe, reps=8)
    assert new < old - 0.04, (old, new)


def _tilt_db(x):
    """Spectral tilt of a view of white noise: power of the top eighth of the band over the bottom eighth, in dB."""
    p = torch.fft.rfft(x.double()).abs() ** 2
    k = p.shape[0] // 8
    return 10 * math.log10(float(p[:k].mean() / p[-k:].mean()))


def test_channel_perturbation_tilts_and_noises_each_view_by_the_configured_amount():
    """view_eq c gives a tilt of 20 log10((1 + c) / (1 - c)) dB (eq 0.3: +-5.4 dB), uniform in c and drawn
    per view; view_noise_snr_db [10, 30] gives each view its own SNR in that range."""
    torch.manual_seed(0)
    eq = 0.3
    c = MGFCollate(crop_seconds=4.0, view_eq=eq)
    white = torch.randn(4 * SR)
    tilts = torch.tensor([[-_tilt_db(x) for x in _views(c, white)] for _ in range(150)])  # low minus high band
    bound = 20 * math.log10((1 + eq) / (1 - eq))
    # bands an eighth wide: the measured tilt is a little under the 0 Hz / Nyquist one
    assert tilts.abs().max() < bound + 0.6 and tilts.abs().max() > 0.75 * bound, (float(tilts.abs().max()), bound)
    assert tilts.std() > bound / 3  # spread over the range, not a fixed filter
    assert abs(torch.corrcoef(tilts.t())[0, 1]) < 0.25  # the two views of one utterance: independent
    assert (tilts[:, 0] - tilts[:, 1]).abs().mean() > bound / 3  # so the views differ in colour
    off = MGFCollate(crop_seconds=4.0)
    assert max(abs(_tilt_db(x)) for x in _views(off, white)) < 0.6  # view_eq 0: no tilt

    tone = torch.sin(2 * math.pi * 440 * torch.arange(4 * SR) / SR)
    noisy = MGFCollate(crop_seconds=4.0, view_noise_snr_db=[10, 30])
    half = (4 * SR) // 2
    snrs = []
    for _ in range(100):
        pair = []
        for x, clean in zip(_views(noisy, tone), (tone[:half], tone[half : 2 * half])):
            pair.append(10 * math.log10(float((clean ** 2).mean() / ((x - clean) ** 2).mean())))
        snrs.append(pair)
    snrs = torch.tensor(snrs)
    assert snrs.min() > 9.7 and snrs.max() < 30.3, (float(snrs.min()), float(snrs.max()))
    assert snrs.min() < 13 and snrs.max() > 27  # the whole range is used
    assert abs(torch.corrcoef(snrs.t())[0, 1]) < 0.25


def test_views_are_at_least_min_view_seconds():
    """view_min_seconds: every view >= 1 s; a crop too short for two gives one view without a partner."""
    c = MGFCollate(crop_seconds=6.0, view_gap_seconds=0.5, view_length_jitter=0.5, view_min_seconds=1.0)
    torch.manual_seed(0)
    for n_s in (2.2, 2.6, 4.0, 6.0, 9.0):
        for _ in range(20):
            b = c([{"id": "u", "sig": torch.randn(int(n_s * SR))}])
            n = torch.round(b.wav_lens * b.wavs.shape[1]).long()
            assert len(n) == 2 and (n >= SR).all(), (n_s, n.tolist())
            assert b.partner.tolist() == [1, 0]
    # 2.2 s: the 0.5 s gap gives way (2 x 1 s + 0.2 s); 1.5 s: one view, the whole crop, no pair
    b = c([{"id": "short", "sig": torch.randn(int(1.5 * SR))}, {"id": "long", "sig": torch.randn(4 * SR)}])
    assert b.id[:3] == ["short/0", "long/0", "long/1"] and b.partner.tolist() == [-1, 2, 1]
    assert b.utt.tolist() == [0, 1, 1] and int(round(float(b.wav_lens[0] * b.wavs.shape[1]))) == int(1.5 * SR)
    # without the minimum (the default), a 2.2 s crop gives views under 1 s
    short = MGFCollate(crop_seconds=6.0, view_gap_seconds=0.5)([{"id": "u", "sig": torch.randn(int(2.2 * SR))}])
    assert (torch.round(short.wav_lens * short.wavs.shape[1]) < SR).all()


def _view_batch(n_utts, dim=8):
    """An MGFBatch-like set of ObjectiveInputs with one layer of random frames."""
    from mgf_sb.objectives import ObjectiveInputs

    batch = MGFCollate(crop_seconds=2.0, n_views=2)([{"id": str(i), "sig": torch.randn(2 * SR)}
                                                     for i in range(n_utts)])
    M, T = batch.frame_mask.shape
    return ObjectiveInputs([torch.randn(M, T, dim)], torch.randn(M, T, 80), None, batch)


def test_utterance_queue_adds_negatives_from_earlier_batches():
    from mgf_sb.objectives import UtteranceObjective

    torch.manual_seed(0)
    plain = UtteranceObjective(8, 80, proj_dim=4)
    queued = UtteranceObjective(8, 80, proj_dim=4, queue_size=20)
    queued.load_state_dict(plain.state_dict())  # the queue is not saved: same keys as without it
    x = _view_batch(3)
    _, st = plain(x)
    assert st["negatives"] == 4  # 3 utterances x 2 views: the 4 views of the other 2
    seen = []
    for _ in range(5):
        _, st = queued(x)
        seen.append(st["negatives"])
    assert seen == [4, 10, 16, 18 + 4, 20 + 4], seen  # 6 views per batch enter the queue, at most 20 kept
    queued.eval()
    before = queued.queue.clone()
    queued(x)
    assert torch.equal(before, queued.queue)  # validation reads the queue, never fills it


def test_utterance_branch_is_its_own_parameters_and_a_crop_without_pair_gives_no_loss():
    from mgf_sb.objectives import ObjectiveInputs, UtteranceObjective

    torch.manual_seed(0)
    obj = UtteranceObjective(8, 80, proj_dim=4, branch="attentive")
    x = _view_batch(3)
    x.hidden[0].requires_grad_(True)
    loss, st = obj(x)
    loss.backward()
    assert obj.pool.score.weight.grad is not None and obj.pool.frame[1].weight.grad.abs().sum() > 0
    assert st["pairs"] == 6
    single = MGFCollate(crop_seconds=2.0, view_min_seconds=1.0)([{"id": "a", "sig": torch.randn(SR + 100)}])
    M, T = single.frame_mask.shape
    h = torch.randn(M, T, 8, requires_grad=True)
    loss, st = obj(ObjectiveInputs([h], torch.randn(M, T, 80), None, single))
    assert float(loss.detach()) == 0.0 and st == {"pairs": 0.0}
    loss.backward()  # still part of the graph (DDP sees every parameter used)
    two = MGFCollate(crop_seconds=2.0, view_min_seconds=1.0)([{"id": i, "sig": torch.randn(SR + 100)} for i in "ab"])
    M, T = two.frame_mask.shape
    loss, st = obj(ObjectiveInputs([torch.randn(M, T, 8)], torch.randn(M, T, 80), None, two))
    assert M == 2 and float(loss.detach()) == 0.0 and st == {"pairs": 0.0}


def test_validation_batches_mix_speakers(tmp_path):
    """Issue 23 (4): valid batches were 8 consecutive manifest rows (one speaker); the recipe's valid
    loader now reads a fixed seeded shuffle (valid_shuffle_seed, valid_batch_size in the YAML)."""
    import csv

    import soundfile as sf
    from torch.utils.data import DataLoader

    from test_pretrain import _load_recipe

    rows = []
    for spk in range(6):  # a manifest lists each speaker's files together
        for u in range(8):
            path = tmp_path / f"{spk}-{u}.wav"
            sf.write(str(path), 0.1 * torch.randn(int(1.2 * SR)).numpy(), SR)
            rows.append({"ID": f"spk{spk}/{spk}-{u}", "duration": 1.2, "wav": str(path)})
    for split in ("train", "valid"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["ID", "duration", "wav"])
            w.writeheader()
            w.writerows(rows)
    recipe = _load_recipe()
    with open(os.path.join(REPO, "hparams", "mgf.yaml"), encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"manifest_folder": str(tmp_path), "crop_seconds": 1.0})

    def speakers_per_batch(hparams):
        _, _, valid_opts = recipe.dataio_prepare(hparams)
        datasets, _, _ = recipe.dataio_prepare(hparams)
        counts, order = [], []
        for batch in DataLoader(datasets["valid"], **valid_opts):
            spk = [i.split("/")[0] for i in batch.id]
            counts.append(len(set(spk)))
            order += [i.rsplit("/", 1)[0] for i in batch.id[: len(batch.id) // 2]]  # views 0 and 1: first half
        return sum(counts) / len(counts), order

    mixed, order = speakers_per_batch(hp)
    again, order2 = speakers_per_batch(hp)
    assert order == order2  # the same batches every epoch
    assert hp["valid_batch_size"] == 8 and mixed > 4.0, mixed  # random: 6 (1 - C(40,8)/C(48,8)) = 4.7 speakers
    consecutive, _ = speakers_per_batch({**hp, "valid_shuffle_seed": None})
    assert consecutive == 1.0  # manifest order: one voice per batch
