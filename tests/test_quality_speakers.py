"""The quality benchmark's speaker and emotion axes: zero-shot verification (EER, its trials and
its voice bootstrap), the emotion probe's level leak test, the optional real speaker encoder, and
the plan printed by --dry_run."""

import os

import numpy as np
import pytest
import torch

from conftest import use_benchmarks

use_benchmarks()

import quality  # noqa: E402
import quality_probe as qp  # noqa: E402
from test_quality_stats import _corpus  # noqa: E402


# ------------------------------------------------------------------------------------------ EER
def test_eer_of_separated_reversed_and_overlapping_scores():
    t = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    assert qp.eer([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], t) == 0.0
    assert qp.eer([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], t) == 100.0
    rng = np.random.default_rng(0)
    n = 20000
    t = np.arange(n) < n // 2
    assert qp.eer(rng.standard_normal(n), t) == pytest.approx(50.0, abs=1.5)
    # two unit Gaussians one std apart: EER = Phi(-0.5) = 30.85 %
    assert qp.eer(rng.standard_normal(n) + t, t) == pytest.approx(30.85, abs=1.2)


def test_eer_weights_act_as_repeated_trials():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal(200), rng.random(200) < 0.5
    w = rng.integers(0, 4, 200)
    assert qp.eer(s, t, w) == pytest.approx(qp.eer(np.repeat(s, w), np.repeat(t, w)))


def test_trials_are_half_targets_within_their_voices_and_never_repeated():
    voice = np.repeat(np.arange(10), 6)  # 10 voices x 6 utterances
    pairs, tgt = qp.make_trials(voice, [2, 3, 5, 7], 40, seed=0)
    assert tgt.sum() == 40 and (~tgt).sum() == 40
    va, vb = voice[pairs[:, 0]], voice[pairs[:, 1]]
    assert np.all((va == vb) == tgt) and np.all(pairs[:, 0] != pairs[:, 1])
    assert set(va) | set(vb) <= {2, 3, 5, 7}
    keys = {tuple(sorted(p)) for p in pairs.tolist()}
    assert len(keys) == len(pairs)
    again = qp.make_trials(voice, [2, 3, 5, 7], 40, seed=0)
    assert np.array_equal(again[0], pairs) and np.array_equal(again[1], tgt)
    # target voices drawn uniformly: each of the 4 voices gets about a quarter of the targets
    p2, t2 = qp.make_trials(np.repeat(np.arange(4), 40), [0, 1, 2, 3], 2000, seed=1)
    counts = np.bincount(np.repeat(np.arange(4), 40)[p2[t2, 0]], minlength=4)
    assert counts.min() > 400


def _trials(n_voices=40, per_voice=10, seed=0):
    voice = np.repeat(np.arange(n_voices), per_voice)
    pairs, tgt = qp.make_trials(voice, list(range(n_voices)), 600, seed=seed)
    return voice, pairs, tgt


def test_eer_bootstrap_resolves_a_real_difference_and_covers_zero_between_equals():
    voice, pairs, tgt = _trials()
    rng = np.random.default_rng(0)
    trials = {"voices": voice[pairs].tolist(), "target": tgt.astype(int).tolist()}
    base = rng.standard_normal(len(tgt))  # per-trial difficulty shared by both rows (paired)

    def scores(sep):
        return [base + sep * tgt + 0.5 * rng.standard_normal(len(tgt)) for _ in range(3)]

    better = qp.paired_bootstrap_eer(scores(2.0), scores(1.0), trials, n_boot=300)
    assert better["resolved"] and better["high"] < 0 and better["n_items"] == 40  # A's EER lower
    covered = 0
    for k in range(8):
        c = qp.paired_bootstrap_eer(scores(1.5), scores(1.5), trials, n_boot=200, rng_seed=k)
        covered += c["low"] <= 0 <= c["high"]
    assert covered >= 6


# ------------------------------------------------------------------------------- verification
def test_verification_chooses_the_layer_on_dev_trials_and_scores_other_voices(tmp_path):
    data = qp.ProbeData(_corpus(tmp_path, n_utts=8, n_spk=12), speaker_split=(2, 3), n_trials=(60, 120))
    sp = data.speakers
    g = torch.Generator().manual_seed(0)
    identity = torch.randn(len(sp.voices), 16, generator=g)[torch.from_numpy(sp.voice)]
    speaker_layer = identity + 0.3 * torch.randn(len(sp.voice), 16, generator=g)
    noise_layer = torch.randn(len(sp.voice), 16, generator=g)
    res = qp.verification([noise_layer, speaker_layer], sp)
    assert res["layer"] == 1 and res["test"] < 5 and res["dev"][0] > 30
    assert res["n_trials"] == 240 and len(res["test_scores"]) == 240
    test_voices = {i for i, v in enumerate(sp.voices) if sp.verify_role[v] == "test"}
    assert {v for pair in res["test_trials"]["voices"] for v in pair} <= test_voices


# ------------------------------------------------------------------------------ emotion leak test
def _emotion_with_levels(tmp_path, leak_db):
    """The emotion set with noise waveforms whose level is random, plus ``leak_db`` x class index."""
    data = qp.ProbeData(_corpus(tmp_path, n_emo=40), speaker_split=(2, 3), n_trials=(10, 20))
    em = data.emotion
    rng = np.random.default_rng(0)
    em.wavs = [(10 ** ((rng.uniform(-10, 0) + leak_db * lab) / 20) * rng.standard_normal(8000)).astype(np.float32)
               for lab in em.label]
    return em


@pytest.mark.parametrize("leak_db", [0.0, 12.0])
def test_the_level_probe_finds_a_planted_level_leak_and_nothing_without_one(tmp_path, leak_db):
    em = _emotion_with_levels(tmp_path, leak_db)
    rep = qp.Representation(None, "energy")
    res = qp.emotion_probe(qp.pool(rep, em.wavs), em, max_iter=100)
    assert res["n_test"] == 40 and res["chance"] == 25.0
    if leak_db:
        assert res["test"] >= 80
    else:
        assert res["test"] <= 50


def test_log_energy_reads_the_level_in_db():
    wav = torch.ones(1, 16000) * 0.1  # -20 dB
    (e,), n = qp.log_energy(wav, torch.ones(1))
    assert int(n[0]) == 101 and e.shape[2] == 1
    assert torch.allclose(e[0, : int(n[0]) - 3, 0], torch.full((98,), -20.0), atol=1e-3)


# -------------------------------------------------------------------------- the real encoder
def test_the_real_speaker_encoder_runs_offline_and_gives_one_embedding_per_utterance():
    assert qp.resemblyzer_available(), "pip install -e .[test] installs resemblyzer (the ceiling row)"
    rep = qp.Representation(None, "resemblyzer")
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 24000)]
    (pooled,) = qp.pool(rep, wavs)
    assert pooled.shape == (2, 256) and not rep.frames  # GE2E's d-vector, unit length
    assert torch.allclose(pooled.norm(dim=1), torch.ones(2), atol=1e-4)


# ---------------------------------------------------------------------------------- dry run
def test_dry_run_plans_without_building_anything(tmp_path, capsys, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    est = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run"])
    text = capsys.readouterr().out
    assert not cache.exists() and not out.exists()
    assert "corpus: to generate" in text and "2 variants x 2 seeds" in text
    assert est["runs_to_train"] == 4 and est["corpus_cpu"] > 0 and est["pretrain_cpu"] > 0
    # 2 final + 1 curve (full MGF, epoch 1) + 2 random + 4 fbank + level + the ceiling
    assert est["probes_to_run"] == 2 * 2 + 1 + 2 + 4 + 1 + 1
    # without the optional encoder the plan has no ceiling probe, and says nothing fails
    monkeypatch.setattr(qp, "resemblyzer_available", lambda: False)
    est = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run"])
    assert est["probes_to_run"] == 2 * 2 + 1 + 2 + 4 + 1
    # a finished run is counted as cached
    snap = out / "runs" / "full_MGF" / "seed0" / "snapshots" / "epoch2"
    os.makedirs(snap)
    (snap / "mgf_config.json").write_text("{}")
    est = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run"])
    assert est["runs_to_train"] == 3


def test_every_budget_meets_the_issue_sizes():
    d, long = quality.BUDGETS["default"], quality.BUDGETS["long"]
    assert len(d.seeds) >= 5 and set(quality.VARIANTS) <= set(d.variants)
    n_train_utts = d.corpus.n_pretrain_speakers * d.corpus.pretrain_utts
    steps = d.epochs * -(-n_train_utts // d.batch_size)
    long_steps = long.epochs * -(-n_train_utts // long.batch_size)
    assert long.corpus == d.corpus and long.encoder == d.encoder and long_steps >= 4 * steps >= 4 * 540
    assert {"full MGF", "BEST-RQ", "wav2vec 2.0"} <= set(long.variants) and len(long.seeds) >= 3
    assert d.n_trials[1] >= 1000  # >= 2,000 test trials, half of them targets


def test_the_long_budget_plots_the_default_budgets_curves_beside_its_own(tmp_path):
    """--budget=long reads results/quality/default/results.json beside its own folder: both budgets'
    curves in one time-to-quality plot, and the default's time to pass fbank +-5."""
    long = quality.BUDGETS["long"]
    assert long.compare_with == "default" and quality.curve_epochs(long) == [3, 6, 9]
    out = tmp_path / "long"
    assert quality.other_budget_curves(long, str(out)) == (None, None)  # not run yet: nothing beside
    curve = {"steps": [0, 540], "cpu_seconds": [0.0, 150.0], "phones": [55.0, 60.0], "speakers": [49.0, 42.0],
             "eer": [30.0, 25.0], "emotion": [56.0, 58.0]}
    os.makedirs(tmp_path / "default")
    (tmp_path / "default" / "results.json").write_text(
        '{"curves": {"full MGF": %s}, "cpu_seconds_to_pass_fbank_pm5_phones": null}' % str(curve).replace("'", '"'))
    curves, ttp = quality.other_budget_curves(long, str(out))
    assert curves == {"full MGF": curve} and ttp == "default budget: not crossed"
    mine = {k: [v[0], v[1], v[1] + 1] for k, v in curve.items()}
    png = quality.curve_png(str(tmp_path / "c.png"), {"full MGF": mine}, {"random": {"phones": 55.0}},
                            other=curves)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
