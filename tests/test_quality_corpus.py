"""The quality benchmark's synthetic corpus (benchmarks/quality_corpus.py): frame labels, held-out
voices and texts, per-utterance channels. Planning needs no TTS; one test synthesises 3 utterances."""

import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
from scipy.stats import f_oneway

from conftest import use_benchmarks
from mgf_sb.batch import encoder_frame_centres

use_benchmarks()
import quality_corpus as qc  # noqa: E402
import tts  # noqa: E402

SR = 16000


# ------------------------------------------------------------------------------- frame labels
# 60 ms utterance (960 samples); boundaries at 20, 25 and 50 ms, i.e. on frame centres
PHONES = [(0.0, 0.02, "pau"), (0.02, 0.025, "m"), (0.025, 0.05, "aa"), (0.05, 0.06, "s")]
INV = {"pau": 0, "m": 1, "aa": 2, "s": 3}


def test_frame_labels_at_100_hz_read_the_phone_at_each_fbank_centre():
    centres = encoder_frame_centres(960, 160, 1) / SR  # 0, 10, ..., 60 ms (centred STFT)
    # 0, 10 ms: pau; 20 ms (m starts): m; 30, 40 ms: aa; 50 ms (s starts): s; 60 ms (the end): last phone s
    assert qc.frame_labels(PHONES, centres, inventory=INV).tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert qc.frame_labels(PHONES, centres).tolist() == [0, 0, 1, 2, 2, 3, 3]  # indices into PHONES


def test_frame_labels_at_50_hz_read_the_phone_at_each_stacked_frame_centre():
    centres = encoder_frame_centres(960, 160, 2) / SR  # 5, 25, 45, 65 ms (7 fbank frames padded to 8)
    # 5 ms: pau; 25 ms (aa starts, m ends): aa; 45 ms: aa; 65 ms (past the 60 ms end): last phone s
    assert qc.frame_labels(PHONES, centres, inventory=INV).tolist() == [0, 2, 2, 3]


def test_frame_labels_reject_phones_out_of_order():
    with pytest.raises(ValueError, match="time order"):
        qc.frame_labels([(0.0, 0.05, "a"), (0.05, 0.03, "b")], [0.0])


# ------------------------------------------------------------------------------ held-out voices
@pytest.fixture(scope="module")
def plan():
    spec = qc.CorpusSpec()
    jobs, pretrain, probe = qc.plan_jobs(spec, "/corpus")
    return spec, jobs, pretrain, probe


def _base(s):
    return qc.base_voice(s.voice.engine, s.voice.name)


def test_default_spec_sizes(plan):
    spec, jobs, pretrain, probe = plan
    assert len(probe) >= 32 and spec.probe_utts >= 36 and len(probe) * 20 >= 625  # speaker-probe test utts
    assert len(pretrain) >= 48
    assert len(jobs) == len(pretrain) * (spec.pretrain_utts + 1) + len(probe) * spec.probe_utts
    valid = [j for j in jobs if "/valid/" in j.path]
    assert sorted(j.speaker.id for j in valid) == sorted(s.id for s in pretrain)  # one per voice
    assert {_base(s) for s in probe} == {f"{e}:{n}" for e, n in qc.PROBE_BASES}  # every festival voice
    assert np.std([s.voice.pitch for s in probe]) > 1.5 and np.std([s.voice.rate for s in probe]) > 0.05
    assert qc.plan_jobs(spec, "/corpus") == (jobs, pretrain, probe)  # deterministic
    assert qc.CorpusSpec(seed=1).key() != spec.key()


def test_aliases_make_flite_kal_and_slt_the_festival_base_voices():
    assert qc.base_voice("flite", "kal16") == qc.base_voice("flite", "kal") == qc.base_voice("festival", "kal_diphone")
    assert qc.base_voice("flite", "slt") == qc.base_voice("festival", "cmu_us_slt_arctic_hts")
    assert qc.base_voice("flite", "awb") != qc.base_voice("flite", "rms")
    probe = [qc.Speaker("h0", tts.Voice("festival", "cmu_us_slt_arctic_hts"))]
    with pytest.raises(ValueError, match="cmu_us_slt_arctic_hts"):
        qc.check_held_out([qc.Speaker("p0", tts.Voice("flite", "slt"))], probe)


def test_pretraining_and_probe_voices_share_no_base_voice(plan):
    _, jobs, pretrain, probe = plan
    assert {s.voice.engine for s in probe} == {"festival"}  # the only engine with phone timings
    assert {s.voice.engine for s in pretrain} == {"espeak", "flite"}
    pre_bases = {_base(j.speaker) for j in jobs if not j.want_phones}
    probe_bases = {_base(j.speaker) for j in jobs if j.want_phones}
    assert not pre_bases & probe_bases
    assert not pre_bases & set(qc.SAME_BASE_VOICE.values())
    assert not {s.id for s in pretrain} & {s.id for s in probe}


def test_text_pools_split_every_content_list_in_half():
    pools = qc.text_pools(0)
    (wa, ta), (wb, tb) = pools["A"], pools["B"]
    for k, words in tts.WORDS.items():
        if k in qc.SHARED_WORD_LISTS:
            assert wa[k] == wb[k] == words
        else:
            assert not set(wa[k]) & set(wb[k]) and sorted(wa[k] + wb[k]) == sorted(words)
            assert abs(len(wa[k]) - len(wb[k])) <= 1
    assert not set(ta) & set(tb) and sorted(ta + tb) == sorted(tts.TEMPLATES)
    assert qc.text_pools(1) != pools
    # the shared function words are no content words
    content = {w for k, ws in tts.WORDS.items() if k not in qc.SHARED_WORD_LISTS + ("time",)
               for w in qc.sentence_words(" ".join(ws))}
    assert not content & qc.FUNCTION_WORDS


def test_probe_and_pretraining_texts_share_no_sentence_and_no_content_word(plan):
    _, jobs, _, _ = plan
    pre = [j for j in jobs if not j.want_phones]
    probe = [j for j in jobs if j.want_phones]
    assert {j.text_pool for j in pre} == {"A"} and {j.text_pool for j in probe} == {"B"}
    pre_sents = {s for j in pre for s in re.split(r"(?<=[.?]) ", j.text)}
    assert any(len(re.split(r"(?<=[.?]) ", j.text)) == 2 for j in pre)  # the split sees 2-sentence utts
    assert all(len(re.split(r"(?<=[.?]) ", j.text)) == 1 for j in probe)  # single-sentence probe utts
    assert not pre_sents & {j.text for j in probe}
    assert len({j.text for j in probe}) == len(probe)
    pre_words = set().union(*(qc.sentence_words(j.text) for j in pre))
    probe_words = set().union(*(qc.sentence_words(j.text) for j in probe))
    assert pre_words & probe_words <= qc.FUNCTION_WORDS
    assert len(probe_words - qc.FUNCTION_WORDS) > 80  # not vacuous: most of pool B is used


# ----------------------------------------------------------------------------------- channels
def _channel_features(job):
    """(lowshelf gain, highshelf gain, peak gain, log peak freq, snr, level, pink) of a job."""
    (_, _, g_lo, _), (_, _, g_hi, _), (_, f_pk, g_pk, _) = job.channel.eq
    c = job.channel
    return [g_lo, g_hi, g_pk, np.log(f_pk), c.snr_db, c.peak_db, float(c.noise_color == "pink")]


def _anova_p(jobs):
    """p-value of a one-way ANOVA over speakers, per channel feature: (n_features,)."""
    by_spk = {}
    for j in jobs:
        by_spk.setdefault(j.speaker.id, []).append(_channel_features(j))
    groups = [np.array(v) for v in by_spk.values()]
    return np.array([f_oneway(*[g[:, k] for g in groups]).pvalue for k in range(groups[0].shape[1])])


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "pretraining"])
def test_channels_are_drawn_per_utterance_and_carry_no_speaker(plan, probe):
    _, jobs, _, _ = plan
    jobs = [j for j in jobs if j.want_phones == probe]
    by_spk = {}
    for j in jobs:
        by_spk.setdefault(j.speaker.id, []).append(j.channel)
    for chans in by_spk.values():  # every utterance its own channel
        assert len(set(chans)) == len(chans)
        assert len({c.noise_color for c in chans}) == 2
    # per-speaker means of every channel parameter within sampling noise of each other
    p = _anova_p(jobs)
    assert np.all(p > 1e-3), p
    # ... and the statistic does see a speaker colour of half a within-speaker std (the old design's)
    ids = sorted(by_spk)
    coloured = [qc.Job(j.path, j.text, j.text_pool, j.speaker,
                       qc.Channel(((*j.channel.eq[0][:2], j.channel.eq[0][2] + 1.5 * (ids.index(j.speaker.id) % 2),
                                    j.channel.eq[0][3]), *j.channel.eq[1:]),
                                  j.channel.noise_color, j.channel.snr_db, j.channel.peak_db), j.seed, j.want_phones)
                for j in jobs]
    assert _anova_p(coloured)[0] < 1e-3


def test_pretraining_and_probe_channels_come_from_one_distribution(plan):
    _, jobs, _, _ = plan
    pre = np.array([_channel_features(j) for j in jobs if not j.want_phones])
    probe = np.array([_channel_features(j) for j in jobs if j.want_phones])
    se = np.sqrt(pre.var(0) / len(pre) + probe.var(0) / len(probe))
    assert np.all(np.abs(pre.mean(0) - probe.mean(0)) < 4 * se)


# ------------------------------------------------------------------------------- a real build
def test_build_writes_rows_with_pool_channel_and_base_voice(tmp_path):
    spec = qc.CorpusSpec(n_pretrain_speakers=1, pretrain_utts=1, n_probe_speakers=1, probe_utts=1,
                         two_sentence_prob=0.0)
    summary = qc.build_corpus(str(tmp_path), spec, procs=1, log=lambda m: None)
    folder = summary["folder"]
    with open(os.path.join(folder, "corpus.json")) as f:
        assert json.load(f) == summary
    jobs, _, _ = qc.plan_jobs(spec, folder)
    rows = {r["path"]: r for r in summary["pretrain"] + summary["probe"]}
    assert len(rows) == len(jobs) == 3
    for j in jobs:
        r = rows[os.path.relpath(j.path, folder)]
        assert r["channel"] == j.channel.row() and r["text_pool"] == j.text_pool and r["text"] == j.text
        wav, sr = sf.read(j.path, dtype="float32")
        assert sr == SR and abs(20 * np.log10(np.abs(wav).max()) - j.channel.peak_db) < 0.05
        assert r["duration"] == pytest.approx(len(wav) / SR)
    (probe_row,) = summary["probe"]
    phones = probe_row["phones"]
    assert phones[0][0] == 0.0 and phones[-1][1] == pytest.approx(probe_row["duration"], abs=1e-4)
    assert phones[0][1] <= 0.1 + 1e-4  # festival's leading pause trimmed to <= 100 ms
    assert [s["base_voice"] for s in summary["probe_speakers"]] == ["festival:kal_diphone"]
    assert summary["pretrain_speakers"][0]["base_voice"] == "flite:awb"


def _median_f0(wav):
    """Median autocorrelation F0 (Hz) of the voiced 64 ms frames of a [T] waveform."""
    f0 = []
    for a in range(0, len(wav) - 1024, 400):
        x = wav[a:a + 1024] - wav[a:a + 1024].mean()
        ac = np.correlate(x, x, "full")[1023:]
        k = SR // 400 + int(np.argmax(ac[SR // 400:SR // 60]))
        if np.sqrt(np.mean(x ** 2)) > 0.02 and ac[k] > 0.3 * ac[0]:
            f0.append(SR / k)
    return float(np.median(f0))


@pytest.mark.parametrize("engine,name", [("flite", "awb"), ("flite", "rms"), ("espeak", "en-us+m3"),
                                         *qc.PROBE_BASES])
def test_every_base_voice_follows_the_speaker_pitch_draw(engine, name):
    """Speakers of one base voice differ by pitch (flite rms ignores flite's F0 targets: sox shifts it)."""
    text = "Victor pulled the heavy blanket on Monday."
    lo, hi = (_median_f0(tts.synthesize_aligned(text, tts.Voice(engine, name, pitch=p), SR)[0]) for p in (-4.0, 7.0))
    assert 1.5 < hi / lo < 2.3  # 11 semitones = x1.89
