"""Synthetic corpus for the quality benchmark (``benchmarks/quality.py``), generated on demand.

Two disjoint sets of voices, both from the repo's offline TTS front end (:mod:`mgf_sb.data.tts`):

- **pretraining** voices: every engine (festival, flite, espeak-ng with its accents and voice
  variants), each speaker a random draw of base voice, speaking rate, mean pitch, pitch range
  and a recording channel (EQ tilt and resonance, pink or white noise at a given SNR, level);
  written as ``pretrain/{train,valid}/<speaker>/<utt>.flac`` (the pretraining recipe's
  LibriSpeech-style layout, splits ``train`` and ``valid``);
- **probe** voices (held out from pretraining): festival voices only, because festival gives
  the phone timings of what it synthesises; the same kinds of per-speaker draws, from a
  different random stream, so no probe speaker occurs in pretraining. Every utterance also gets
  a random session channel (EQ, SNR, level) on top of its speaker's, as recordings do. Written as
  ``probe/<speaker>/<utt>.flac`` with ``probe.json`` holding each utterance's speaker, phone
  segments (festival's own timings, radio phone set, ``pau`` = silence) and duration.

Everything is deterministic given the :class:`CorpusSpec` (seeded), so a cache folder named
after the spec's hash is reused by later runs. Generation runs in ``procs`` processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from typing import List, Optional

import numpy as np

from mgf_sb.data import tts

SR = 16000

FESTIVAL_BASES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]
FLITE_BASES = ["awb", "rms", "slt", "kal16"]
ESPEAK_LANGS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What to generate (every field enters the cache folder's hash).

    n_pretrain_speakers / pretrain_utts: pretraining voices and utterances per voice (one more
    per voice goes to the ``valid`` split). n_probe_speakers / probe_utts: held-out festival
    voices for the probes and utterances per voice. two_sentence_prob: chance that an
    utterance holds two sentences (durations ~2-3.5 s for one, ~4-7 s for two).
    """

    n_pretrain_speakers: int = 48
    pretrain_utts: int = 30
    n_probe_speakers: int = 24
    probe_utts: int = 16
    two_sentence_prob: float = 0.5
    seed: int = 0

    def key(self):
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|v2"
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: a TTS voice plus the speaker's own channel colouring.

    eq: tuple of ``(kind, freq_hz, gain_db, q)`` biquads (see :func:`tts.apply_channel`);
    snr_db / noise_color: the speaker's typical noise. Each utterance adds a session of its own
    on top (:func:`session_channel`: EQ tilt and resonance, SNR ± 8 dB, a level drawn
    independently of the speaker), so a speaker is not identified by its channel alone.
    """

    id: str
    voice: tts.Voice
    eq: tuple
    snr_db: float
    noise_color: str


def draw_speaker(sid, engine, base, rng):
    """One random speaker of ``engine``/``base`` from numpy Generator ``rng``."""
    female = ("slt" in base) or base.endswith(tuple(f"f{i}" for i in range(1, 6)))
    pitch = float(rng.uniform(-4, 4))
    if engine == "festival" and not female and rng.random() < 0.3:
        pitch += 7.0  # a higher-pitched speaker from a male diphone voice
    voice = tts.Voice(engine, base, rate=float(rng.uniform(0.82, 1.2)), pitch=pitch,
                      pitch_range=float(rng.uniform(0.6, 1.6)), gender="F" if female else "M", speaker=sid)
    eq = (
        ("lowshelf", float(rng.uniform(150, 500)), float(rng.uniform(-5, 4)), 0.7),
        ("highshelf", float(rng.uniform(2000, 5000)), float(rng.uniform(-6, 3)), 0.7),
        ("peak", float(rng.uniform(400, 3000)), float(rng.uniform(-5, 5)), float(rng.uniform(0.7, 2.0))),
    )
    return Speaker(sid, voice, eq, float(rng.uniform(22, 38)), str(rng.choice(["white", "pink"])))


def session_channel(spk: Speaker, rng):
    """One utterance's channel: the speaker's EQ plus a random session EQ, SNR and level.

    Returns ``(eq list, snr_db, noise_color, peak_db)``; the level is independent of the speaker.
    """
    eq = list(spk.eq) + [
        ("highshelf", float(rng.uniform(1500, 4000)), float(rng.uniform(-4, 4)), 0.7),
        ("peak", float(rng.uniform(300, 4000)), float(rng.uniform(-4, 4)), float(rng.uniform(0.7, 2.0))),
    ]
    snr = spk.snr_db + float(rng.uniform(-8, 8))
    color = spk.noise_color if rng.random() < 0.7 else str(rng.choice(["white", "pink"]))
    return eq, snr, color, float(rng.uniform(-14, -2))


def draw_speakers(spec: CorpusSpec):
    """(pretraining speakers, probe speakers): all engines vs festival only, disjoint streams."""
    rng = np.random.default_rng([spec.seed, 1])
    bases = ([("festival", b) for b in FESTIVAL_BASES] + [("flite", b) for b in FLITE_BASES]
             + [("espeak", f"{lang}+{var}") for lang in ESPEAK_LANGS for var in ESPEAK_VARIANTS])
    order = rng.permutation(len(bases))
    pretrain = []
    for i in range(spec.n_pretrain_speakers):
        # cycle through the pool so that every engine appears; festival gets a third of the voices
        if i % 3 == 0:
            engine, base = "festival", FESTIVAL_BASES[(i // 3) % len(FESTIVAL_BASES)]
        else:
            engine, base = bases[order[i % len(order)]]
        pretrain.append(draw_speaker(f"p{i:03d}", engine, base, rng))
    rng_probe = np.random.default_rng([spec.seed, 2])
    probe = [draw_speaker(f"h{i:03d}", "festival", FESTIVAL_BASES[i % len(FESTIVAL_BASES)], rng_probe)
             for i in range(spec.n_probe_speakers)]
    return pretrain, probe


def _trim(wav, phones, lead=0.1, tail=0.15):
    """Shortens festival's leading / trailing pause to ``lead`` / ``tail`` seconds."""
    dur = len(wav) / SR
    a = max(0.0, phones[0][1] - lead) if phones[0][2] == "pau" else 0.0
    b = min(dur, phones[-1][0] + tail) if phones[-1][2] == "pau" else dur
    wav = wav[int(round(a * SR)):int(round(b * SR))]
    dur = len(wav) / SR
    out = [(max(0.0, s - a), min(dur, e - a), p) for s, e, p in phones]
    out = [(s, e, p) for s, e, p in out if e > s]
    out[0] = (0.0, out[0][1], out[0][2])
    out[-1] = (out[-1][0], dur, out[-1][2])
    return wav, out


def _synth_job(job):
    """Synthesises, applies the speaker's channel, writes FLAC; returns the manifest row."""
    import soundfile as sf

    path, text, spk, seed, want_phones = job
    wav, phones, _ = tts.synthesize_aligned(text, spk.voice, SR)
    if want_phones:
        wav, phones = _trim(wav, phones)
    rng = np.random.default_rng(seed)
    eq, snr, color, peak = session_channel(spk, rng)
    wav = tts.apply_channel(wav, SR, rng, noise_snr_db=snr, eq=eq, noise_color=color)
    wav = tts.normalize_peak(wav, peak)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.flac"
    sf.write(tmp, np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16), SR,
             format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)
    row = {"path": path, "speaker": spk.id, "text": text, "duration": len(wav) / SR}
    if want_phones:
        row["phones"] = [[round(s, 4), round(e, 4), p] for s, e, p in phones]
    return row


def plan_jobs(spec: CorpusSpec, folder: str):
    """Every utterance to synthesise: list of (path, text, Speaker, seed, want_phones)."""
    pretrain, probe = draw_speakers(spec)
    rng = np.random.default_rng([spec.seed, 3])
    n_sent = 2 * (len(pretrain) * (spec.pretrain_utts + 1) + len(probe) * spec.probe_utts) + 10
    sents = tts.make_sentences(n_sent, seed=spec.seed)
    k = 0
    jobs = []

    def text():
        nonlocal k
        t = sents[k]
        k += 1
        if rng.random() < spec.two_sentence_prob:
            t += " " + sents[k]
            k += 1
        return t

    for spk in pretrain:
        for i in range(spec.pretrain_utts + 1):
            split = "valid" if i == spec.pretrain_utts else "train"
            path = os.path.join(folder, "pretrain", split, spk.id, f"{spk.id}-{i:03d}.flac")
            jobs.append((path, text(), spk, int(rng.integers(2**31)), False))
    for spk in probe:
        for i in range(spec.probe_utts):
            path = os.path.join(folder, "probe", spk.id, f"{spk.id}-{i:03d}.flac")
            jobs.append((path, text(), spk, int(rng.integers(2**31)), True))
    return jobs, pretrain, probe


def corpus_folder(cache, spec: CorpusSpec):
    """``<cache>/corpus-<hash of spec>``."""
    return os.path.join(os.path.expanduser(cache), f"corpus-{spec.key()}")


def build_corpus(cache, spec: CorpusSpec, procs=2, log=print):
    """Generates the corpus into ``corpus_folder(cache, spec)`` unless it is already complete.

    Returns the summary dict written to ``corpus.json`` (folders, speakers, hours, number of
    utterances, generation seconds; ``probe`` rows with phone segments).
    """
    folder = corpus_folder(cache, spec)
    done = os.path.join(folder, "corpus.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    jobs, pretrain, probe = plan_jobs(spec, folder)
    log(f"generating the quality corpus in {folder}: {len(jobs)} utterances, "
        f"{len(pretrain)} pretraining + {len(probe)} held-out probe voices, {procs} processes")
    t0 = time.time()
    if procs <= 1:
        rows = [_synth_job(j) for j in jobs]
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            rows = []
            for i, row in enumerate(pool.imap(_synth_job, jobs, chunksize=4)):
                rows.append(row)
                if (i + 1) % 200 == 0:
                    log(f"  {i + 1}/{len(jobs)} utterances ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    pre = [r for r in rows if "phones" not in r]
    summary = {
        "spec": dataclasses.asdict(spec),
        "folder": folder,
        "pretrain_folder": os.path.join(folder, "pretrain"),
        "generation_seconds": round(seconds, 1),
        "procs": procs,
        "pretrain_hours": round(sum(r["duration"] for r in pre) / 3600, 3),
        "pretrain_train_hours": round(sum(r["duration"] for r in pre if "/train/" in r["path"]) / 3600, 3),
        "probe_hours": round(sum(r["duration"] for r in rows if "phones" in r) / 3600, 3),
        "pretrain_speakers": [_speaker_row(s) for s in pretrain],
        "probe_speakers": [_speaker_row(s) for s in probe],
        "probe": [{**r, "path": os.path.relpath(r["path"], folder)} for r in rows if "phones" in r],
    }
    with open(done + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(done + ".tmp", done)
    log(f"corpus ready: {summary['pretrain_hours']:.2f} h pretraining, {summary['probe_hours']:.2f} h probe, "
        f"generated in {seconds:.0f} s")
    return summary


def _speaker_row(s: Speaker):
    v = s.voice
    return {"id": s.id, "engine": v.engine, "voice": v.name, "rate": round(v.rate, 3), "pitch": round(v.pitch, 2),
            "pitch_range": round(v.pitch_range, 2), "snr_db": round(s.snr_db, 1), "noise": s.noise_color,
            "eq": [[k, round(f), round(g, 1), round(q, 2)] for k, f, g, q in s.eq]}


def phone_inventory(rows) -> List[str]:
    """Sorted phone symbols over probe rows."""
    return sorted({p for r in rows for _, _, p in r["phones"]})


def frame_labels(phones, n_frames, hop_s=0.01, offset_s=0.0125, inventory: Optional[dict] = None):
    """Phone label of each 10 ms frame (the phone that covers the frame's centre).

    phones: [(start_s, end_s, symbol)]; n_frames: number of fbank frames; centre of frame i is
    ``offset_s + i * hop_s`` (25 ms window, 10 ms hop); inventory: symbol -> index.
    Returns np.int64 (n_frames,), the last phone for centres past the end.
    """
    ends = np.array([e for _, e, _ in phones])
    syms = [p for _, _, p in phones]
    t = offset_s + hop_s * np.arange(n_frames)
    idx = np.minimum(np.searchsorted(ends, t, side="right"), len(phones) - 1)
    if inventory is None:
        return idx
    return np.array([inventory[syms[i]] for i in idx], dtype=np.int64)
