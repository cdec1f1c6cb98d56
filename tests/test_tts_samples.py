"""Checks of the committed synthetic sample corpora (no TTS binaries needed)."""

import glob
import os
import re
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from conftest import use_benchmarks

use_benchmarks()
import tts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = os.path.join(REPO, "samples")
TIMIT_CORE_TEST = set(
    "MDAB0 MWBT0 FELC0 MTAS1 MWEW0 FPAS0 MJMP0 MLNT0 FPKT0 MLLL0 MTLS0 FJLM0 MBPM0 MKLT0 "
    "FNLP0 MCMJ0 MJDH0 FMGD0 MGRT0 MNJM0 FDHC0 MJLN0 MPAM0 FMLD0".split()
)


def _check_audio(path, fmt=None):
    info = sf.info(path)
    assert info.samplerate == 16000 and info.channels == 1, path
    assert info.subtype == "PCM_16", path
    if fmt:
        assert info.format == fmt, path
    x, _ = sf.read(path, dtype="float32")
    assert x.ndim == 1 and len(x) > 0.5 * 16000 and np.abs(x).max() > 1e-3, path
    return x


# ---------------------------------------------------------------- LibriSpeech


def test_librispeech_layout_and_transcripts():
    root = os.path.join(S, "LibriSpeech")
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        trans = glob.glob(os.path.join(root, split, "*", "*", "*.trans.txt"))
        assert trans, split
        for t in trans:
            spk, ch = os.path.basename(t)[: -len(".trans.txt")].split("-")
            assert t.split(os.sep)[-3:-1] == [spk, ch] and spk.isdigit() and ch.isdigit()
            lines = open(t).read().splitlines()
            flacs = sorted(glob.glob(os.path.join(os.path.dirname(t), "*.flac")))
            assert [ln.split(" ", 1)[0] for ln in lines] == [os.path.basename(f)[:-5] for f in flacs]
            for ln, f in zip(lines, flacs):
                uid, text = ln.split(" ", 1)
                assert re.fullmatch(rf"{spk}-{ch}-\d{{4}}", uid)
                assert re.fullmatch(r"[A-Z' ]+", text)
                x = _check_audio(f, "FLAC")
                assert 1.9 <= len(x) / 16000 <= 6.1
    spk = {s: set(os.listdir(os.path.join(root, s))) for s in ("train-clean-100", "dev-clean", "test-clean")}
    assert len(spk["train-clean-100"]) >= 8
    assert not (spk["train-clean-100"] & spk["dev-clean"]) and not (spk["train-clean-100"] & spk["test-clean"])
    assert os.path.isfile(os.path.join(root, "SPEAKERS.TXT"))


# ---------------------------------------------------------------------- TIMIT


def _timit_utts():
    return sorted(glob.glob(os.path.join(S, "TIMIT", "*", "DR[1-8]", "*", "*.WAV")))


def test_timit_layout_sphere_and_speakers():
    utts = _timit_utts()
    assert utts
    spk_sents = {}
    for w in utts:
        st, dr, spk, name = w.split(os.sep)[-4:]
        assert st in ("TRAIN", "TEST") and re.fullmatch(r"[FM][A-Z]{3}\d", spk)
        assert re.fullmatch(r"S[AXI]\d+\.WAV", name)
        with open(w, "rb") as f:
            head = f.read(1024)
        assert head.startswith(b"NIST_1A\n   1024\n") and b"end_head" in head
        _check_audio(w, "NIST")
        for ext in (".PHN", ".WRD", ".TXT"):
            assert os.path.isfile(w[:-4] + ext)
        spk_sents.setdefault((st, spk), set()).add(name[:-4])
    for sents in spk_sents.values():
        assert {"SA1", "SA2"} <= sents and any(s[:2] in ("SX", "SI") for s in sents)
    test = {s for st, s in spk_sents if st == "TEST"}
    assert test & TIMIT_CORE_TEST and test - TIMIT_CORE_TEST  # core test + dev speakers
    assert any(st == "TRAIN" for st, _ in spk_sents)


def test_timit_phn_wrd_txt_cover_file():
    for w in _timit_utts():
        n = sf.info(w).frames
        phn = [ln.split() for ln in open(w[:-4] + ".PHN")]
        assert phn[0][0] == "0" and phn[0][2] == "h#" and phn[-1][2] == "h#"
        assert int(phn[-1][1]) == n
        prev = 0
        for a, b, p in phn:
            assert p in tts.TIMIT61, p
            assert int(a) == prev and int(b) > int(a)
            prev = int(b)
        for a, b, word in (ln.split() for ln in open(w[:-4] + ".WRD")):
            assert 0 <= int(a) < int(b) <= n and word == word.lower()
        txt = open(w[:-4] + ".TXT").read().split(" ", 2)
        assert txt[0] == "0" and int(txt[1]) == n and txt[2].strip()
    assert len(tts.TIMIT61) == 61


# ------------------------------------------------------------------- VoxCeleb


def test_voxceleb_layout_and_lists():
    root = os.path.join(S, "VoxCeleb1")
    wavs = glob.glob(os.path.join(root, "wav", "id1????", "*", "*.wav"))
    assert wavs
    for w in wavs:
        spk, yt, name = w.split(os.sep)[-3:]
        assert re.fullmatch(r"id1\d{4}", spk) and re.fullmatch(r"[A-Za-z0-9_-]{11}", yt)
        assert re.fullmatch(r"\d{5}\.wav", name)
        x = _check_audio(w, "WAV")
        assert 1.4 <= len(x) / 16000 <= 3.1
    splits = {}
    for ln in open(os.path.join(root, "iden_split.txt")):
        s, rel = ln.split()
        assert os.path.isfile(os.path.join(root, "wav", rel))
        splits.setdefault(rel.split("/")[0], set()).add(s)
    assert len(splits) >= 6 and all(v == {"1", "2", "3"} for v in splits.values())
    trials = [ln.split() for ln in open(os.path.join(root, "veri_test2.txt"))]
    c = Counter(t[0] for t in trials)
    assert c["1"] == c["0"] > 0
    for lab, a, b in trials:
        assert os.path.isfile(os.path.join(root, "wav", a)) and os.path.isfile(os.path.join(root, "wav", b))
        assert (a.split("/")[0] == b.split("/")[0]) == (lab == "1")


# -------------------------------------------------------------------- IEMOCAP

_EMO_LINE = re.compile(r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(Ses\d{2}[FM]_\S+_[FM]\d{3})\t(\w{3})\t\[[\d., ]+\]$")


def test_iemocap_layout_and_emoevaluation():
    root = os.path.join(S, "IEMOCAP", "IEMOCAP_full_release")
    labels = {}
    for s in range(1, 6):
        files = glob.glob(os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation", "*.txt"))
        assert files
        for f in files:
            text = open(f).read()
            assert text.startswith("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n")
            for ln in text.splitlines():
                m = _EMO_LINE.match(ln)
                if m:
                    uid = m.group(3)
                    assert uid.startswith(os.path.basename(f)[:-4] + "_")
                    labels[uid] = (s, m.group(4))
                else:
                    assert ln == "" or ln.startswith(("%", "C-", "A-")), ln
    assert set(l for _, l in labels.values()) >= {"neu", "hap", "exc", "ang", "sad", "fru", "sur", "xxx"}
    wavs = glob.glob(os.path.join(root, "Session*", "sentences", "wav", "*", "*.wav"))
    assert {os.path.basename(w)[:-4] for w in wavs} == set(labels)
    for w in wavs:
        dialog = w.split(os.sep)[-2]
        assert os.path.basename(w).startswith(dialog + "_")
        assert w.split(os.sep)[-5] == f"Session{labels[os.path.basename(w)[:-4]][0]}"
        x = _check_audio(w, "WAV")
        assert 1.4 <= len(x) / 16000 <= 3.1
    per_sess = Counter((s, {"exc": "hap"}.get(l, l)) for s, l in labels.values())
    for s in range(1, 6):
        for lab in ("neu", "hap", "ang", "sad"):
            assert per_sess[(s, lab)] >= 2


def test_iemocap_level_independent_of_label():
    root = os.path.join(S, "IEMOCAP", "IEMOCAP_full_release")
    lab = {}
    for f in glob.glob(os.path.join(root, "Session*", "dialog", "EmoEvaluation", "*.txt")):
        for m in filter(None, map(_EMO_LINE.match, open(f).read().splitlines())):
            lab[m.group(3)] = m.group(4)
    lev = {}
    for w in glob.glob(os.path.join(root, "Session*", "sentences", "wav", "*", "*.wav")):
        x, _ = sf.read(w, dtype="float32")
        lev.setdefault(lab[os.path.basename(w)[:-4]], []).append(10 * np.log10(np.mean(x ** 2)))
    means = [np.mean(lev[k]) for k in ("neu", "hap", "exc", "ang", "sad")]
    assert max(means) - min(means) < 3.0  # within-class spread is +-5 dB


# ---------------------------------------------------------------- tts helpers


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
@pytest.mark.parametrize("color", ["white", "pink"])
def test_apply_channel_snr(snr, color):
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    clean = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    noisy = tts.apply_channel(clean, 16000, rng, noise_snr_db=snr, noise_color=color)
    noise = noisy.astype(np.float64) - clean
    achieved = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(achieved - snr) < 1.0
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape


def test_apply_channel_gain_and_eq():
    rng = np.random.default_rng(0)
    x = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)
    y = tts.apply_channel(x, 16000, rng, gain_db=-6.0)
    assert np.allclose(y, x * 10 ** (-6 / 20), atol=1e-6)
    lp = tts.apply_channel(x, 16000, rng, eq=("lowpass", 1000.0, 0.0, 0.707))
    hi = lambda s: np.sum(np.abs(np.fft.rfft(s)[4000:]) ** 2)  # > 4 kHz
    assert hi(lp) < 0.01 * hi(x)


def test_make_sentences_deterministic():
    a, b, c = tts.make_sentences(50, 3), tts.make_sentences(50, 3), tts.make_sentences(50, 4)
    assert a == b and a != c and len(set(a)) == 50
    assert all(re.fullmatch(r"[A-Z][A-Za-z ,']*[.?]", s) for s in a)
    assert tts.words_upper("Don't stop, Anna?") == "DON'T STOP ANNA"


def test_voice_pool_and_timit_mapping():
    vs = tts.voices()
    assert len(vs) >= 8 and len({(v.engine, v.name, v.pitch, v.rate) for v in vs}) == len(vs)
    assert {v.engine for v in vs} == {"espeak", "festival", "flite"} and {v.gender for v in vs} == {"M", "F"}
    ph = tts.to_timit_phones([(0, 0.2, "pau"), (0.2, 0.3, "k"), (0.3, 0.4, "ae"), (0.4, 0.5, "pau"),
                              (0.5, 0.6, "t"), (0.6, 0.8, "pau")])
    assert [p for _, _, p in ph] == ["h#", "kcl", "k", "ae", "pau", "tcl", "t", "h#"]
