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
    sets = qc.draw_probe_sets(spec)
    assert len(jobs) == (len(pretrain) * (spec.pretrain_utts + 1) + len(probe) * spec.probe_utts
                         + len(sets["speaker"]) * spec.speaker_utts
                         + len(sets["emotion"]) * spec.emotion_utts * len(qc.EMOTIONS))
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
    pre_bases = {_base(j.speaker) for j in jobs if j.set == "pretrain"}
    probe_bases = {_base(j.speaker) for j in jobs if j.set != "pretrain"}  # phones, speakers, emotion
    assert not pre_bases & probe_bases
    assert not pre_bases & set(qc.SAME_BASE_VOICE.values())
    assert not {s.id for s in pretrain} & {s.id for s in probe}
    assert {j.set for j in jobs} == {"pretrain", "probe", "speaker", "emotion"}
    assert all(j.want_phones == (j.set == "probe") for j in jobs)


def test_speaker_probe_has_64_voices_of_8_base_voices_and_2000_test_utterances(plan):
    spec, jobs, _, _ = plan
    voices = {j.speaker.id: _base(j.speaker) for j in jobs if j.set == "speaker"}
    assert len(voices) >= 64 and len(set(voices.values())) >= 8
    per_voice = {v: sum(j.speaker.id == v for j in jobs) for v in voices}
    assert set(per_voice.values()) == {spec.speaker_utts}
    import quality  # the default budget's split of each voice's utterances: train / dev / test
    n_dev, n_test = quality.BUDGETS["default"].speaker_split
    assert len(voices) * n_test >= 2000 and spec.speaker_utts - n_dev - n_test >= 8
    # every base voice equally represented (voices dealt base by base)
    counts = np.bincount([sorted(set(voices.values())).index(b) for b in voices.values()])
    assert counts.max() - counts.min() <= 1
    emo = {j.speaker.id for j in jobs if j.set == "emotion"}
    assert not emo & set(voices) and len(emo) >= 32


@pytest.mark.parametrize("n_pretrain", [60, 200])
def test_held_out_espeak_voices_never_reach_pretraining(n_pretrain):
    """However many pretraining voices are asked for, the espeak-ng pool cycles without the held-out ones."""
    pretrain, _ = qc.draw_speakers(qc.CorpusSpec(n_pretrain_speakers=n_pretrain))
    used = {_base(s) for s in pretrain}
    assert not used & {f"espeak:{b}" for b in qc.ESPEAK_HELD_OUT}
    n_espeak = n_pretrain - len(range(0, n_pretrain, 3))  # a third are flite awb / rms
    assert len(used) == 2 + min(n_espeak, 72 - len(qc.ESPEAK_HELD_OUT))


def test_emotion_classes_are_prosody_only_and_balanced_per_voice(plan):
    spec, jobs, _, _ = plan
    emo = [j for j in jobs if j.set == "emotion"]
    by_voice = {}
    for j in emo:
        by_voice.setdefault(j.speaker.id, []).append(j.emotion)
    for classes in by_voice.values():  # every voice speaks every class equally often
        assert sorted(classes) == sorted(list(qc.EMOTIONS) * spec.emotion_utts)
    v = tts.Voice("espeak", "en-us+m7", rate=1.1, pitch=2.0, pitch_range=0.8)
    sad = qc.emotion_voice(v, "sad")
    assert sad.rate == pytest.approx(1.1 * 0.72) and sad.pitch == pytest.approx(-1.0)
    assert sad.pitch_range == pytest.approx(0.8 * 0.35) and sad.name == v.name
    assert qc.emotion_voice(v, "neu") == v


def test_emotion_class_says_nothing_of_level_snr_or_channel(plan):
    """Level, SNR and EQ are drawn independently of the class: per-class means within sampling noise
    (one-way ANOVA over the 4 classes, every channel feature), and the statistic sees a planted leak."""
    _, jobs, _, _ = plan
    emo = [j for j in jobs if j.set == "emotion"]
    feats = np.array([_channel_features(j) for j in emo])
    labels = np.array([list(qc.EMOTIONS).index(j.emotion) for j in emo])
    p = np.array([f_oneway(*[feats[labels == c, k] for c in range(4)]).pvalue for k in range(feats.shape[1])])
    assert np.all(p > 1e-3), p
    level = feats[:, 5] + 1.5 * (labels == 2)  # anger 1.5 dB louder: the kind of leak this must catch
    assert f_oneway(*[level[labels == c] for c in range(4)]).pvalue < 1e-3


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
    pre = [j for j in jobs if j.set == "pretrain"]
    probe = [j for j in jobs if j.set != "pretrain"]
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


@pytest.mark.parametrize("which", ["probe", "pretrain", "speaker", "emotion"])
def test_channels_are_drawn_per_utterance_and_carry_no_speaker(plan, which):
    _, jobs, _, _ = plan
    jobs = [j for j in jobs if j.set == which]
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
                                  j.channel.noise_color, j.channel.snr_db, j.channel.peak_db), j.seed, j.want_phones,
                       j.set, j.emotion)
                for j in jobs]
    assert _anova_p(coloured)[0] < 1e-3


def test_pretraining_and_probe_channels_come_from_one_distribution(plan):
    _, jobs, _, _ = plan
    pre = np.array([_channel_features(j) for j in jobs if j.set == "pretrain"])
    probe = np.array([_channel_features(j) for j in jobs if j.set != "pretrain"])
    se = np.sqrt(pre.var(0) / len(pre) + probe.var(0) / len(probe))
    assert np.all(np.abs(pre.mean(0) - probe.mean(0)) < 4 * se)


# ------------------------------------------------------------------------------- a real build
def test_build_writes_rows_with_pool_channel_and_base_voice(tmp_path):
    spec = qc.CorpusSpec(n_pretrain_speakers=1, pretrain_utts=1, n_probe_speakers=1, probe_utts=1,
                         n_speaker_voices=2, speaker_utts=1, n_emotion_voices=1, emotion_utts=1, two_sentence_prob=0.0)
    summary = qc.build_corpus(str(tmp_path), spec, procs=1, log=lambda m: None)
    folder = summary["folder"]
    with open(os.path.join(folder, "corpus.json")) as f:
        assert json.load(f) == summary
    jobs, _, _ = qc.plan_jobs(spec, folder)
    rows = {r["path"]: r for k in ("pretrain", "probe", "speaker", "emotion") for r in summary[k]}
    assert len(rows) == len(jobs) == 2 + 1 + 2 + 4
    assert sorted(r["emotion"] for r in summary["emotion"]) == sorted(qc.EMOTIONS)
    assert [s["base_voice"] for s in summary["speaker_voices"]] == ["festival:kal_diphone", "festival:ked_diphone"]
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
