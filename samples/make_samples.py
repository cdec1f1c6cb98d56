#!/usr/bin/env python
"""Generate the small synthetic speech corpora bundled in ``samples/``.

    python samples/make_samples.py [librispeech|timit|voxceleb|iemocap|all] --out samples/

Each corpus is written in the real on-disk layout of LibriSpeech, TIMIT (LDC,
upper-case), VoxCeleb1 and IEMOCAP, from offline TTS (espeak-ng, festival,
flite + sox; see ``benchmarks/tts.py``).  Output is deterministic (seeded).
All labels (speakers, phones, emotions) are synthetic.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import string
import sys
from typing import Dict, List, Tuple

import numpy as np
import soundfile as sf

# the TTS front end is a benchmark tool, not part of the mgf_sb library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import tts  # noqa: E402

SR = 16000


def _job(args):
    text, voice = args
    return tts.synthesize_aligned(text, voice, SR)


def synth_many(jobs: List[Tuple[str, tts.Voice]], procs: int = 2):
    """Synthesize [(text, voice)] in parallel; same order as ``jobs``."""
    if procs <= 1:
        return [_job(j) for j in jobs]
    with mp.get_context("fork").Pool(procs) as pool:
        return pool.map(_job, jobs, chunksize=2)


def _fresh(path: str):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def _pcm16(wav: np.ndarray) -> np.ndarray:
    return np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------
# LibriSpeech
# ---------------------------------------------------------------------------

# (speaker id, chapter ids, voice speaker tag)
LIBRI_SPLITS = {
    "train-clean-100": [
        (103, (1240, 1241), "fest_slt"),
        (1034, (121119, 134284), "fest_kal"),
        (1040, (133433, 133434), "flite_awb"),
        (1069, (133699, 133709), "flite_slt"),
        (1081, (125237, 128618), "esp_us_m3"),
        (1088, (129236, 134315), "esp_us_f2"),
        (1098, (133695, 133702), "esp_gb_f3"),
        (118, (47824, 121721), "esp_gb_m5"),
    ],
    "dev-clean": [
        (1272, (128104,), "fest_ked"),
        (1462, (170138,), "esp_us_f4"),
    ],
    "test-clean": [
        (1089, (134686,), "flite_rms"),
        (1580, (141083,), "esp_sc_f1"),
    ],
}
LIBRI_UTTS = {"train-clean-100": 3, "dev-clean": 3, "test-clean": 3}  # per chapter


def make_librispeech(out: str, seed: int = 100, procs: int = 2) -> str:
    """Write ``<out>/LibriSpeech/<split>/<spk>/<chapter>/*.flac + .trans.txt``."""
    root = os.path.join(out, "LibriSpeech")
    _fresh(root)
    pool = {v.speaker: v for v in tts.voices()}
    rng = np.random.default_rng(seed)
    sents = iter(tts.make_sentences(2000, seed))
    plan = []  # (split, spk, chapter, voice, text)
    for split, spks in LIBRI_SPLITS.items():
        for spk, chapters, tag in spks:
            for ch in chapters:
                v = pool[tag].replace(rate=pool[tag].rate * float(rng.uniform(0.95, 1.05)))
                n = LIBRI_UTTS[split] + 2  # a few spares for the 2-6 s filter
                for _ in range(n):
                    text = next(sents)
                    if rng.random() < 0.2:
                        text = text + " " + next(sents)
                    plan.append((split, spk, ch, v, text))
    res = synth_many([(p[4], p[3]) for p in plan], procs)
    speakers, counts = {}, {}
    minutes: Dict[int, float] = {}
    for (split, spk, ch, v, text), (wav, _, _) in zip(plan, res):
        dur = len(wav) / SR
        key = (spk, ch)
        if not (2.0 <= dur <= 5.0) or counts.get(key, 0) >= LIBRI_UTTS[split]:
            continue
        i = counts.get(key, 0)
        counts[key] = i + 1
        d = os.path.join(root, split, str(spk), str(ch))
        os.makedirs(d, exist_ok=True)
        uid = f"{spk}-{ch}-{i:04d}"
        peak = -10.0 - 4.0 * ((spk * 7 + ch) % 5) / 4.0  # chapter-level level, -10..-14 dB
        sf.write(os.path.join(d, uid + ".flac"), _pcm16(tts.normalize_peak(wav, peak)), SR,
                 format="FLAC", subtype="PCM_16", compression_level=1.0)
        with open(os.path.join(d, f"{spk}-{ch}.trans.txt"), "a") as f:
            f.write(f"{uid} {tts.words_upper(text)}\n")
        speakers[spk] = (v.gender, split)
        minutes[spk] = minutes.get(spk, 0.0) + dur / 60.0
    with open(os.path.join(root, "SPEAKERS.TXT"), "w") as f:
        f.write("; Synthetic sample of LibriSpeech (TTS voices, not real readers).\n")
        f.write(";ID  |SEX| SUBSET           |MINUTES| NAME\n")
        for spk in sorted(speakers):
            g, split = speakers[spk]
            f.write(f"{spk:<5}| {g} | {split:<17}| {minutes[spk]:5.2f} | Synthetic Voice {spk}\n")
    return root


# ---------------------------------------------------------------------------
# TIMIT
# ---------------------------------------------------------------------------

TIMIT_SA = {
    "SA1": "She had your dark suit in greasy wash water all year.",
    "SA2": "Don't ask me to carry an oily rag like that.",
}
# (set, dialect region, speaker dir, voice tag from tts.festival_voices(), n SX, n SI)
TIMIT_SPEAKERS = [
    ("TRAIN", "DR1", "FCJF0", "slt_a", 2, 1),
    ("TRAIN", "DR2", "MAEB0", "kal_a", 2, 1),
    ("TRAIN", "DR7", "MADC0", "ked_a", 2, 1),
    ("TEST", "DR1", "MDAB0", "kal_b", 1, 1),   # core test set
    ("TEST", "DR8", "FMLD0", "slt_b", 1, 1),   # core test set
    ("TEST", "DR1", "FAKS0", "ked_f", 1, 0),   # standard 50-speaker dev set
    ("TEST", "DR1", "MGWT0", "ked_b", 1, 0),   # standard 50-speaker dev set
]


def write_sphere(path: str, pcm: np.ndarray, utt_id: str):
    """NIST SPHERE (TIMIT style): 1024-byte ASCII header + int16 LE PCM."""
    fields = [
        "database_id -s5 TIMIT", "database_version -s3 1.0", f"utterance_id -s{len(utt_id)} {utt_id}",
        "channel_count -i 1", f"sample_count -i {len(pcm)}", f"sample_rate -i {SR}",
        f"sample_min -i {int(pcm.min())}", f"sample_max -i {int(pcm.max())}",
        "sample_n_bytes -i 2", "sample_byte_format -s2 01", "sample_sig_bits -i 16",
        "sample_coding -s3 pcm", "end_head",
    ]
    head = ("NIST_1A\n   1024\n" + "\n".join(fields) + "\n").encode("ascii")
    assert len(head) <= 1024
    with open(path, "wb") as f:
        f.write(head + b" " * (1024 - len(head)))
        f.write(pcm.astype("<i2").tobytes())


def _to_samples(items, n: int):
    """[(start_s, end_s, sym)] -> contiguous [(start, end, sym)] in samples."""
    out = []
    for s, e, p in items:
        a, b = min(int(round(s * SR)), n), min(int(round(e * SR)), n)
        if b > a:
            out.append((a, b, p))
    return out


def trim_aligned(wav, phones, words, lead: float = 0.1, tail: float = 0.15):
    """Shorten festival's leading/trailing 'pau' to ``lead``/``tail`` seconds."""
    a = max(0.0, phones[0][1] - lead) if phones[0][2] == "pau" else 0.0
    b = min(len(wav) / SR, phones[-1][0] + tail) if phones[-1][2] == "pau" else len(wav) / SR
    wav = wav[int(round(a * SR)):int(round(b * SR))]
    dur = len(wav) / SR

    def shift(items):
        res = [(max(0.0, s - a), min(dur, e - a), n) for s, e, n in items]
        return [(s, e, n) for s, e, n in res if e > s]

    phones, words = shift(phones), shift(words)
    phones[0] = (0.0,) + phones[0][1:]
    phones[-1] = (phones[-1][0], dur, phones[-1][2])
    return wav, phones, words


def make_timit(out: str, seed: int = 200, procs: int = 2) -> str:
    """Write ``<out>/TIMIT/{TRAIN,TEST}/DRn/<SPK>/<SENT>.{WAV,PHN,WRD,TXT}``."""
    root = os.path.join(out, "TIMIT")
    _fresh(root)
    pool = {v.speaker: v for v in tts.festival_voices()}
    sents = iter([x for x in tts.make_sentences(500, seed) if len(x.split()) <= 7])
    rng = random.Random(seed)
    plan = []  # (set, dr, spk, sent_id, text, voice)
    used = set()
    for st, dr, spk, tag, nsx, nsi in TIMIT_SPEAKERS:
        ids = list(TIMIT_SA.items())
        for k in range(nsx + nsi):
            while True:
                num = rng.randrange(3, 452) if k < nsx else rng.randrange(453, 2342)
                if num not in used:
                    used.add(num)
                    break
            ids.append((("SX" if k < nsx else "SI") + str(num), next(sents)))
        for sid, text in ids:
            plan.append((st, dr, spk, sid, text, pool[tag]))
    res = synth_many([(p[4], p[5]) for p in plan], procs)
    for (st, dr, spk, sid, text, v), (wav, phones, words) in zip(plan, res):
        wav, phones, words = trim_aligned(wav, phones, words)
        d = os.path.join(root, st, dr, spk)
        os.makedirs(d, exist_ok=True)
        pcm = _pcm16(tts.normalize_peak(wav, -6.0))
        n = len(pcm)
        write_sphere(os.path.join(d, sid + ".WAV"), pcm, f"{spk[1:].lower()}_{sid.lower()}")
        ph = _to_samples(tts.to_timit_phones(phones), n)
        ph[0] = (0, ph[0][1], ph[0][2])
        ph[-1] = (ph[-1][0], n, ph[-1][2])
        with open(os.path.join(d, sid + ".PHN"), "w") as f:
            f.writelines(f"{a} {b} {p}\n" for a, b, p in ph)
        with open(os.path.join(d, sid + ".WRD"), "w") as f:
            f.writelines(f"{a} {b} {w}\n" for a, b, w in _to_samples(words, n))
        with open(os.path.join(d, sid + ".TXT"), "w") as f:
            f.write(f"0 {n} {text}\n")
    return root


# ---------------------------------------------------------------------------
# VoxCeleb1
# ---------------------------------------------------------------------------

# (speaker id, voice tag, n videos); id10270+ are the VoxCeleb1 test speakers
VOX_SPEAKERS = [
    ("id10001", "fest_kal", 2), ("id10002", "esp_us_f2", 2), ("id10003", "flite_awb", 2),
    ("id10004", "esp_gb_f3", 2), ("id10270", "flite_slt", 3), ("id10271", "esp_us_m3", 3),
]
VOX_UTTS_PER_VIDEO = 3


def _yt_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(11))


def random_channel(rng: np.random.Generator) -> dict:
    """A random recording channel (kwargs of :func:`tts.apply_channel`)."""
    eq = [("highpass", float(rng.uniform(80, 400)), 0.0, 0.707)]
    kind = rng.choice(["lowpass", "peak", "highshelf"])
    if kind == "lowpass":
        eq.append(("lowpass", float(rng.uniform(2800, 6500)), 0.0, 0.707))
    else:
        eq.append((str(kind), float(rng.uniform(800, 4000)), float(rng.uniform(-8, 8)), 1.0))
    return dict(noise_snr_db=float(rng.uniform(8, 30)), eq=eq, gain_db=float(rng.uniform(-6, 0)),
                noise_color=str(rng.choice(["white", "pink"])))


def make_voxceleb(out: str, seed: int = 300, procs: int = 2) -> str:
    """Write ``<out>/VoxCeleb1/wav/<id>/<yt>/<nnnnn>.wav``, iden_split.txt, veri_test2.txt."""
    root = os.path.join(out, "VoxCeleb1")
    _fresh(root)
    pool = {v.speaker: v for v in tts.voices()}
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    sents = iter(tts.make_sentences(500, seed))
    plan = []  # (spk, video, idx, voice, text, channel)
    n = 0
    for spk, tag, nvid in VOX_SPEAKERS:
        for _ in range(nvid):
            yt = _yt_id(prng)
            chan = random_channel(rng)
            v = pool[tag].replace(rate=pool[tag].rate * float(rng.uniform(0.9, 1.1)),
                                  pitch=pool[tag].pitch + float(rng.uniform(-1, 1)))
            for _ in range(VOX_UTTS_PER_VIDEO):
                n += 1
                plan.append((spk, yt, n, v, next(sents), chan))
    res = synth_many([(p[4], p[3]) for p in plan], procs)
    by_spk: Dict[str, List[Tuple[str, str]]] = {}
    for (spk, yt, idx, v, text, chan), (wav, _, _) in zip(plan, res):
        L = int(SR * rng.uniform(1.5, 1.9))
        if len(wav) > L:  # VoxCeleb segments are arbitrary cuts of speech
            a = int(rng.integers(0, len(wav) - L))
            wav = wav[a:a + L]
        wav = tts.apply_channel(tts.normalize_peak(wav, -3.0), SR, rng, **chan)
        rel = f"{spk}/{yt}/{idx:05d}.wav"
        os.makedirs(os.path.join(root, "wav", spk, yt), exist_ok=True)
        sf.write(os.path.join(root, "wav", rel), _pcm16(wav), SR, subtype="PCM_16")
        by_spk.setdefault(spk, []).append((yt, rel))
    # identification split: last video -> dev (first utt) / test (rest), others train
    with open(os.path.join(root, "iden_split.txt"), "w") as f:
        for spk, items in by_spk.items():
            last = items[-1][0]
            last_items = [r for y, r in items if y == last]
            for y, rel in items:
                s = 1 if y != last else (2 if rel == last_items[0] else 3)
                f.write(f"{s} {rel}\n")
    # verification trials among test speakers (id10270+): balanced 1/0
    test = {s: it for s, it in by_spk.items() if s >= "id10270"}
    trials = []
    for spk, items in test.items():
        for i, (y1, r1) in enumerate(items):
            for y2, r2 in items[i + 1:]:
                if y1 != y2:
                    trials.append((1, r1, r2))
    pos = prng.sample(trials, min(len(trials), 20))
    allr = [(s, r) for s, it in test.items() for _, r in it]
    neg = set()
    while len(neg) < len(pos):
        (s1, r1), (s2, r2) = prng.sample(allr, 2)
        if s1 != s2:
            neg.add((0, r1, r2))
    trials = pos + sorted(neg)
    prng.shuffle(trials)
    with open(os.path.join(root, "veri_test2.txt"), "w") as f:
        f.writelines(f"{t} {a} {b}\n" for t, a, b in trials)
    return root


# ---------------------------------------------------------------------------
# IEMOCAP
# ---------------------------------------------------------------------------

# emotion -> (rate multiplier, pitch shift in semitones, pitch-range multiplier)
EMO_PROSODY = {
    "neu": (1.00, 0.0, 1.0),
    "sad": (0.72, -3.0, 0.35),
    "ang": (1.30, 1.0, 2.2),
    "hap": (1.05, 4.0, 1.6),
    "exc": (1.15, 6.0, 2.4),
    "fru": (0.95, -1.0, 1.3),
    "sur": (1.00, 6.0, 2.6),
    "xxx": (1.05, 1.0, 1.5),
}
EMO_NAME = {"neu": "Neutral", "sad": "Sadness", "ang": "Anger", "hap": "Happiness",
            "exc": "Excited", "fru": "Frustration", "sur": "Surprise"}
EMO_VAD = {"neu": (2.5, 2.5, 2.5), "sad": (2.0, 2.0, 2.0), "ang": (1.5, 4.0, 4.0),
           "hap": (4.0, 3.0, 3.0), "exc": (4.0, 3.5, 3.5), "fru": (2.0, 3.5, 3.5),
           "sur": (3.5, 4.0, 2.5), "xxx": (2.5, 3.0, 3.0)}
# per session: (female voice tag, male voice tag); voices whose F0 range is controllable
IEMO_VOICES = [("esp_us_f2", "fest_kal"), ("flite_slt", "esp_us_m3"), ("esp_gb_f3", "flite_awb"),
               ("esp_us_f4", "fest_ked"), ("esp_sc_f1", "esp_gb_m5")]
IEMO_PER_CLASS = 2  # utterances per main class per session
IEMO_4 = ["neu", "ang", "sad"]  # + one 'hap' and one 'exc' per session (merged to happy)
IEMO_DROP = ["fru", "sur", "xxx"]


def _emo_block(start, end, uid, lab, rng: random.Random) -> str:
    v, a, d = EMO_VAD[lab]
    lines = [f"[{start:.4f} - {end:.4f}]\t{uid}\t{lab}\t[{v:.4f}, {a:.4f}, {d:.4f}]"]
    cats = [EMO_NAME.get(lab, "Neutral")] * 3
    if lab == "xxx":  # no majority among evaluators
        cats = ["Frustration", "Anger", "Neutral"]
    for ev, c in zip(("C-E1", "C-E2", "C-E4"), cats):
        lines.append(f"{ev}:\t{c};\t()")
    for ev in ("A-E1", "A-E2", "A-E4"):
        jit = [min(5, max(1, round(x + rng.choice([-1, 0, 0, 1])))) for x in (v, a, d)]
        lines.append(f"{ev}:\tval {jit[0]}; act {jit[1]}; dom  {jit[2]};\t()")
    return "\n".join(lines) + "\n"


def make_iemocap(out: str, seed: int = 400, procs: int = 2) -> str:
    """Write ``<out>/IEMOCAP/IEMOCAP_full_release/Session{1..5}/...``."""
    root = os.path.join(out, "IEMOCAP", "IEMOCAP_full_release")
    _fresh(os.path.dirname(root))
    pool = {v.speaker: v for v in tts.voices()}
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    sents = iter(tts.make_sentences(1000, seed))
    plan = []  # (session, dialog, speaker letter, label, voice, text)
    for s in range(1, 6):
        labels = ["hap", "exc"] + IEMO_4 * IEMO_PER_CLASS + [IEMO_DROP[(s - 1) % 3]]
        prng.shuffle(labels)
        mocap = "F" if s % 2 else "M"
        dialogs = [f"Ses{s:02d}{mocap}_impro0{prng.randint(1, 8)}",
                   f"Ses{s:02d}{mocap}_script0{prng.randint(1, 3)}_{prng.randint(1, 2)}"]
        for k, lab in enumerate(labels):
            who = "F" if k % 2 == 0 else "M"
            base = pool[IEMO_VOICES[s - 1][0 if who == "F" else 1]]
            r, p, pr = EMO_PROSODY[lab]
            v = base.replace(rate=base.rate * r * float(rng.uniform(0.95, 1.05)),
                             pitch=base.pitch + p + float(rng.uniform(-1, 1)),
                             pitch_range=base.pitch_range * pr * float(rng.uniform(0.85, 1.15)))
            plan.append((s, dialogs[(k // 2) % 2], who, lab, v, next(sents)))
    res = synth_many([(p[5], p[4]) for p in plan], procs)
    evals: Dict[Tuple[int, str], List[str]] = {}
    counters: Dict[Tuple[str, str], int] = {}
    clock: Dict[str, float] = {}
    for (s, dialog, who, lab, v, text), (wav, _, _) in zip(plan, res):
        L = int(SR * rng.uniform(1.5, 1.7))
        if len(wav) > L:
            a = int(rng.integers(0, min(len(wav) - L, int(0.3 * SR)) + 1))
            wav = wav[a:a + L]
        # level and noise are drawn independently of the label
        rms = float(np.sqrt(np.mean(wav ** 2))) + 1e-9
        wav = tts.apply_channel(wav * (10 ** (-24 / 20) / rms), SR, rng,
                                noise_snr_db=float(rng.uniform(20, 40)),
                                gain_db=float(rng.uniform(-5, 5)))
        i = counters.get((dialog, who), 0)
        counters[(dialog, who)] = i + 1
        uid = f"{dialog}_{who}{i:03d}"
        d = os.path.join(root, f"Session{s}", "sentences", "wav", dialog)
        os.makedirs(d, exist_ok=True)
        sf.write(os.path.join(d, uid + ".wav"), _pcm16(wav), SR, subtype="PCM_16")
        t0 = clock.get(dialog, float(rng.uniform(2, 7)))
        t1 = t0 + len(wav) / SR
        clock[dialog] = t1 + float(rng.uniform(0.3, 2.0))
        evals.setdefault((s, dialog), []).append(_emo_block(t0, t1, uid, lab, prng))
    for (s, dialog), blocks in evals.items():
        d = os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, dialog + ".txt"), "w") as f:
            f.write("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n")
            f.write("\n".join(blocks))
    return root


MAKERS = {"librispeech": make_librispeech, "timit": make_timit,
          "voxceleb": make_voxceleb, "iemocap": make_iemocap}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default="all", choices=list(MAKERS) + ["all"])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args(argv)
    for name in (MAKERS if a.corpus == "all" else [a.corpus]):
        print(name, "->", MAKERS[name](a.out, procs=a.procs), flush=True)


if __name__ == "__main__":
    main()
