"""Synthetic corpus for the quality benchmark (``benchmarks/quality.py``), generated on demand.

Two sets of voices from the offline TTS front end ``benchmarks/tts.py``, held out from each other
in voice *and* text:

- **probe** voices: festival only (``kal_diphone``, ``ked_diphone``, ``cmu_us_slt_arctic_hts``),
  because only festival gives the phone timings of what it synthesises; each voice a random draw
  of base voice, speaking rate, mean pitch and pitch range. Single-sentence utterances (festival's
  leading / trailing pause trimmed), sentences from text pool **B**. Written as
  ``probe/<speaker>/<utt>.flac``; each ``corpus.json`` ``probe`` row holds the speaker, the phone
  segments (festival's own timings, radio phone set, ``pau`` = silence) and the duration.
- **pretraining** voices: espeak-ng (accents x voice variants) and flite ``awb`` / ``rms`` only,
  so that no pretraining voice uses a base voice of the probes (:data:`SAME_BASE_VOICE`: flite's
  ``kal`` / ``kal16`` are festival's Kal diphone set, flite's ``slt`` the SLT speaker of festival's
  HTS voice). Utterances of one or two sentences from text pool **A**, written as
  ``pretrain/{train,valid}/<speaker>/<utt>.flac`` (the pretraining recipe's LibriSpeech-style
  layout; one utterance per voice in ``valid``).
- **text pools** (:func:`text_pools`): every content-word list of ``tts.WORDS`` and the sentence
  templates split in half by a seeded permutation; only prepositions and the templates' function
  words (:data:`FUNCTION_WORDS`) occur in both pools.
- **channel** (:func:`draw_channel`): every utterance, pretraining and probe, draws its own EQ
  (tilt and resonance), noise colour, SNR and level from one distribution shared by all speakers,
  so the channel says nothing about the speaker.

Every utterance's row (``corpus.json``: ``pretrain`` and ``probe``) records its text pool and
channel; ``pretrain_speakers`` / ``probe_speakers`` record each voice's engine and base voice.
Everything is deterministic given the :class:`CorpusSpec` (seeded), so a cache folder named
after the spec's hash is reused by later runs. Generation runs in ``procs`` processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from typing import List, Optional

import numpy as np

import tts

SR = 16000

PROBE_BASES = [("festival", "kal_diphone"), ("festival", "ked_diphone"), ("festival", "cmu_us_slt_arctic_hts")]
FLITE_PRETRAIN_BASES = ["awb", "rms"]
ESPEAK_LANGS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
# espeak-ng base voices (accent + variant) held out of pretraining for the speaker and emotion
# probes, which need no phone timings: one per accent, male and female variants.
ESPEAK_HELD_OUT = ["en-us+m7", "en-gb+f5", "en-gb-scotland+m6", "en-gb-x-rp+f4", "en-029+m2", "en-gb-x-gbclan+f1"]
# base voices of the speaker- and emotion-probe voices: the festival voices of the phone probe and
# the held-out espeak-ng voices (9 base voices; none is used in pretraining)
SPEAKER_BASES = PROBE_BASES + [("espeak", b) for b in ESPEAK_HELD_OUT]
# emotion class -> (rate multiplier, pitch shift in semitones, pitch-range multiplier), as
# samples/make_samples.py renders IEMOCAP's; applied on top of each voice's own prosody
EMOTIONS = {"neu": (1.00, 0.0, 1.0), "sad": (0.72, -3.0, 0.35), "ang": (1.30, 1.0, 2.2), "hap": (1.05, 4.0, 1.6)}

# "engine:voice" names that are the same base voice (diphone set / recorded speaker) as another
# engine's voice: such a pair must never be split between pretraining and probes.
SAME_BASE_VOICE = {
    "flite:kal": "festival:kal_diphone",
    "flite:kal16": "festival:kal_diphone",
    "flite:slt": "festival:cmu_us_slt_arctic_hts",
}

# Word lists of tts.WORDS that both text pools keep whole (function words), and the function
# words of the templates and time phrases: the only words a probe and a pretraining sentence share.
SHARED_WORD_LISTS = ("prep",)
FUNCTION_WORDS = frozenset(
    "a an the and that while we did was were are in at on after before during every last".split()
    + [w for k in SHARED_WORD_LISTS for w in tts.WORDS[k]]
)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What to generate (every field enters the cache folder's hash).

    n_pretrain_speakers / pretrain_utts: pretraining voices and training utterances per voice
    (one more per voice goes to the ``valid`` split). n_probe_speakers / probe_utts: held-out
    festival voices for the phone probe and single-sentence utterances per voice.
    n_speaker_voices / speaker_utts: held-out voices of :data:`SPEAKER_BASES` for the speaker
    probes (identification and zero-shot verification) and utterances per voice.
    n_emotion_voices / emotion_utts: held-out voices for the emotion probe and utterances per
    voice *and class* of :data:`EMOTIONS`.
    two_sentence_prob: chance that a pretraining utterance holds two sentences (~3 s for one,
    ~6 s for two).
    """

    n_pretrain_speakers: int = 60
    pretrain_utts: int = 24
    n_probe_speakers: int = 32
    probe_utts: int = 36
    n_speaker_voices: int = 72
    speaker_utts: int = 44
    n_emotion_voices: int = 48
    emotion_utts: int = 5
    two_sentence_prob: float = 0.3
    seed: int = 0

    def key(self):
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|v4"
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: a TTS voice (engine, base voice, rate, pitch, pitch range); no channel."""

    id: str
    voice: tts.Voice


@dataclasses.dataclass(frozen=True)
class Channel:
    """One utterance's recording channel.

    eq: ``(kind, freq_hz, gain_db, q)`` biquads for :func:`tts.apply_channel`: spectral tilt
    (low shelf, high shelf) and one resonance (peak); noise_color: 'white' | 'pink'; snr_db:
    noise SNR; peak_db: output peak level in dBFS.
    """

    eq: tuple
    noise_color: str
    snr_db: float
    peak_db: float

    def row(self):
        return {"eq": [[k, round(f), round(g, 2), round(q, 2)] for k, f, g, q in self.eq],
                "noise": self.noise_color, "snr_db": round(self.snr_db, 2), "peak_db": round(self.peak_db, 2)}


@dataclasses.dataclass(frozen=True)
class Job:
    """One utterance to synthesise: output path, text and its pool ('A' | 'B'), speaker, channel,
    seed of its noise, whether festival's phone timings are kept (phone-probe utterances), the
    set it belongs to ('pretrain' | 'probe' | 'speaker' | 'emotion') and its emotion class."""

    path: str
    text: str
    text_pool: str
    speaker: Speaker
    channel: Channel
    seed: int
    want_phones: bool
    set: str = "probe"
    emotion: Optional[str] = None


def base_voice(engine: str, name: str) -> str:
    """The base voice (synthesiser voice / diphone set / recorded speaker) of an engine's voice,
    as "engine:voice" with :data:`SAME_BASE_VOICE`'s aliases resolved; espeak-ng's is the
    language + variant."""
    key = f"{engine}:{name}"
    return SAME_BASE_VOICE.get(key, key)


def _female(base):
    return "slt" in base or bool(re.search(r"\+f\d$", base))


def draw_speaker(sid, engine, base, rng):
    """One random speaker of ``engine``/``base`` from numpy Generator ``rng``."""
    female = _female(base)
    pitch = float(rng.uniform(-4, 4))
    if engine in ("festival", "flite") and not female and rng.random() < 0.3:
        pitch += 7.0  # a higher-pitched speaker from a male voice
    voice = tts.Voice(engine, base, rate=float(rng.uniform(0.82, 1.2)), pitch=pitch,
                      pitch_range=float(rng.uniform(0.6, 1.6)), gender="F" if female else "M", speaker=sid)
    return Speaker(sid, voice)


def draw_channel(rng) -> Channel:
    """One utterance's channel from the distribution shared by every speaker (numpy ``rng``)."""
    eq = (
        ("lowshelf", float(rng.uniform(150, 500)), float(rng.uniform(-6, 4)), 0.7),
        ("highshelf", float(rng.uniform(1500, 5000)), float(rng.uniform(-8, 4)), 0.7),
        ("peak", float(np.exp(rng.uniform(np.log(300), np.log(4000)))), float(rng.uniform(-6, 6)),
         float(rng.uniform(0.7, 2.0))),
    )
    return Channel(eq, str(rng.choice(["white", "pink"])), float(rng.uniform(15, 40)), float(rng.uniform(-14, -2)))


def draw_speakers(spec: CorpusSpec):
    """(pretraining speakers, phone-probe speakers): espeak-ng (but :data:`ESPEAK_HELD_OUT`) +
    flite awb/rms vs festival, disjoint streams."""
    rng = np.random.default_rng([spec.seed, 1])
    espeak = [f"{lang}+{var}" for lang in ESPEAK_LANGS for var in ESPEAK_VARIANTS
              if f"{lang}+{var}" not in ESPEAK_HELD_OUT]
    order = rng.permutation(len(espeak))
    pretrain = []
    for i in range(spec.n_pretrain_speakers):
        if i % 3 == 0:  # a third flite, alternating its two voices
            engine, base = "flite", FLITE_PRETRAIN_BASES[(i // 3) % len(FLITE_PRETRAIN_BASES)]
        else:  # the rest distinct espeak-ng accent + variant pairs (cycled if more are asked for)
            engine, base = "espeak", espeak[order[(i - i // 3 - 1) % len(order)]]
        pretrain.append(draw_speaker(f"p{i:03d}", engine, base, rng))
    rng_probe = np.random.default_rng([spec.seed, 2])
    probe = [draw_speaker(f"h{i:03d}", *PROBE_BASES[i % len(PROBE_BASES)], rng_probe)
             for i in range(spec.n_probe_speakers)]
    check_held_out(pretrain, probe + [s for v in draw_probe_sets(spec).values() for s in v])
    return pretrain, probe


def draw_probe_sets(spec: CorpusSpec):
    """{"speaker": voices, "emotion": voices} of :data:`SPEAKER_BASES`, dealt base by base (voice
    ``i`` has base ``i mod 9``), each from its own stream; ids ``s###`` / ``e###``."""
    out = {}
    for name, n, tag, stream in (("speaker", spec.n_speaker_voices, "s", 6), ("emotion", spec.n_emotion_voices, "e", 7)):
        rng = np.random.default_rng([spec.seed, stream])
        out[name] = [draw_speaker(f"{tag}{i:03d}", *SPEAKER_BASES[i % len(SPEAKER_BASES)], rng) for i in range(n)]
    return out


def emotion_voice(voice: tts.Voice, emotion: str) -> tts.Voice:
    """``voice`` speaking with the prosody of ``emotion`` (:data:`EMOTIONS`: rate and pitch range
    multiply the voice's own, the pitch shift adds to it)."""
    rate, pitch, rng_ = EMOTIONS[emotion]
    return voice.replace(rate=voice.rate * rate, pitch=voice.pitch + pitch, pitch_range=voice.pitch_range * rng_)


def check_held_out(pretrain, probe):
    """Raises ValueError if a pretraining and a probe speaker share a base voice."""
    shared = ({base_voice(s.voice.engine, s.voice.name) for s in pretrain}
              & {base_voice(s.voice.engine, s.voice.name) for s in probe})
    if shared:
        raise ValueError(f"pretraining and probe voices share base voices {sorted(shared)}: "
                         "drop them from one side (see quality_corpus.SAME_BASE_VOICE)")


def text_pools(seed: int):
    """Two disjoint sub-grammars of ``tts``: ``{"A": (words, templates), "B": (words, templates)}``.

    Each word list of ``tts.WORDS`` (but :data:`SHARED_WORD_LISTS`) and the template list is split
    in half by a permutation drawn with ``seed``; A gets the first half, B the second.
    """
    rng = np.random.default_rng([seed, 5])
    halves = {"A": ({}, []), "B": ({}, [])}
    for k, words in tts.WORDS.items():
        if k in SHARED_WORD_LISTS:
            halves["A"][0][k] = halves["B"][0][k] = list(words)
            continue
        perm = rng.permutation(len(words))
        halves["A"][0][k] = [words[i] for i in perm[: len(words) // 2]]
        halves["B"][0][k] = [words[i] for i in perm[len(words) // 2:]]
    perm = rng.permutation(len(tts.TEMPLATES))
    halves["A"][1].extend(tts.TEMPLATES[i] for i in perm[: len(perm) // 2])
    halves["B"][1].extend(tts.TEMPLATES[i] for i in perm[len(perm) // 2:])
    return halves


def sentence_words(text: str):
    """Lower-case words of ``text`` (punctuation dropped)."""
    return set(re.findall(r"[a-z']+", text.lower()))


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


def _synth_job(job: Job):
    """Synthesises, applies the utterance's channel, writes FLAC; returns the manifest row."""
    import soundfile as sf

    voice = job.speaker.voice if job.emotion is None else emotion_voice(job.speaker.voice, job.emotion)
    wav, phones, _ = tts.synthesize_aligned(job.text, voice, SR)
    if phones:  # festival: its long leading / trailing pauses shortened (every probe set alike)
        wav, phones = _trim(wav, phones)
    ch = job.channel
    wav = tts.apply_channel(wav, SR, np.random.default_rng(job.seed), noise_snr_db=ch.snr_db, eq=ch.eq,
                            noise_color=ch.noise_color)
    wav = tts.normalize_peak(wav, ch.peak_db)
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    tmp = job.path + ".tmp.flac"
    sf.write(tmp, np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16), SR,
             format="FLAC", subtype="PCM_16")
    os.replace(tmp, job.path)
    row = {"path": job.path, "speaker": job.speaker.id, "text": job.text, "text_pool": job.text_pool,
           "duration": len(wav) / SR, "channel": ch.row(), "set": job.set}
    if job.emotion is not None:
        row["emotion"] = job.emotion
    if job.want_phones:
        row["phones"] = [[round(s, 4), round(e, 4), p] for s, e, p in phones]
    return row


def plan_jobs(spec: CorpusSpec, folder: str):
    """Every utterance to synthesise: (list of :class:`Job`, pretraining speakers, probe speakers).

    Pretraining texts come from pool A, probe texts (phones, speakers, emotion) from pool B
    (:func:`text_pools`); channels are drawn per utterance, in plan order, from one stream, so
    an utterance's level, SNR and EQ are independent of its speaker and emotion class.
    """
    pretrain, probe = draw_speakers(spec)
    sets = draw_probe_sets(spec)
    pools = text_pools(spec.seed)
    n_pre = len(pretrain) * (spec.pretrain_utts + 1)
    n_b = (len(probe) * spec.probe_utts + len(sets["speaker"]) * spec.speaker_utts
           + len(sets["emotion"]) * spec.emotion_utts * len(EMOTIONS))
    sents = {"A": iter(tts.make_sentences(2 * n_pre, spec.seed, *pools["A"])),
             "B": iter(tts.make_sentences(n_b, spec.seed, *pools["B"]))}
    rng = np.random.default_rng([spec.seed, 3])  # sentences per utterance, noise seeds
    rng_channel = np.random.default_rng([spec.seed, 4])
    jobs = []
    for spk in pretrain:
        for i in range(spec.pretrain_utts + 1):
            split = "valid" if i == spec.pretrain_utts else "train"
            text = next(sents["A"])
            if rng.random() < spec.two_sentence_prob:
                text += " " + next(sents["A"])
            jobs.append(Job(os.path.join(folder, "pretrain", split, spk.id, f"{spk.id}-{i:03d}.flac"), text, "A",
                            spk, draw_channel(rng_channel), int(rng.integers(2**31)), False, "pretrain"))
    for spk in probe:
        for i in range(spec.probe_utts):
            jobs.append(Job(os.path.join(folder, "probe", spk.id, f"{spk.id}-{i:03d}.flac"), next(sents["B"]), "B",
                            spk, draw_channel(rng_channel), int(rng.integers(2**31)), True))
    for spk in sets["speaker"]:
        for i in range(spec.speaker_utts):
            jobs.append(Job(os.path.join(folder, "speaker", spk.id, f"{spk.id}-{i:03d}.flac"), next(sents["B"]), "B",
                            spk, draw_channel(rng_channel), int(rng.integers(2**31)), False, "speaker"))
    for spk in sets["emotion"]:
        for emo in EMOTIONS:
            for i in range(spec.emotion_utts):
                jobs.append(Job(os.path.join(folder, "emotion", spk.id, f"{spk.id}-{emo}-{i:03d}.flac"),
                                next(sents["B"]), "B", spk, draw_channel(rng_channel), int(rng.integers(2**31)),
                                False, "emotion", emo))
    return jobs, pretrain, probe


def corpus_folder(cache, spec: CorpusSpec):
    """``<cache>/corpus-<hash of spec>``."""
    return os.path.join(os.path.expanduser(cache), f"corpus-{spec.key()}")


def build_corpus(cache, spec: CorpusSpec, procs=2, log=print):
    """Generates the corpus into ``corpus_folder(cache, spec)`` unless it is already complete.

    Returns the summary dict written to ``corpus.json`` (folders, speakers, hours, text pools,
    generation seconds; ``pretrain`` and ``probe`` rows, paths relative to ``folder``, the
    ``probe`` rows with phone segments).
    """
    folder = corpus_folder(cache, spec)
    done = os.path.join(folder, "corpus.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    jobs, pretrain, probe = plan_jobs(spec, folder)
    sets = draw_probe_sets(spec)
    log(f"generating the quality corpus in {folder}: {len(jobs)} utterances, "
        f"{len(pretrain)} pretraining + {len(probe)} phone-probe + {len(sets['speaker'])} speaker-probe + "
        f"{len(sets['emotion'])} emotion-probe voices (all held out), {procs} processes")
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
    rows = [{**r, "path": os.path.relpath(r["path"], folder)} for r in rows]
    pre = [r for r in rows if r["set"] == "pretrain"]
    summary = {
        "spec": dataclasses.asdict(spec),
        "folder": folder,
        "pretrain_folder": os.path.join(folder, "pretrain"),
        "generation_seconds": round(seconds, 1),
        "procs": procs,
        "pretrain_hours": round(sum(r["duration"] for r in pre) / 3600, 3),
        "pretrain_train_hours": round(sum(r["duration"] for r in pre if r["path"].startswith("pretrain/train/"))
                                      / 3600, 3),
        "probe_hours": round(sum(r["duration"] for r in rows if r["set"] == "probe") / 3600, 3),
        "speaker_hours": round(sum(r["duration"] for r in rows if r["set"] == "speaker") / 3600, 3),
        "emotion_hours": round(sum(r["duration"] for r in rows if r["set"] == "emotion") / 3600, 3),
        "n_utterances": len(rows),
        "bytes": sum(os.path.getsize(os.path.join(folder, r["path"])) for r in rows),
        "pretrain_speakers": [_speaker_row(s) for s in pretrain],
        "probe_speakers": [_speaker_row(s) for s in probe],
        "speaker_voices": [_speaker_row(s) for s in sets["speaker"]],
        "emotion_voices": [_speaker_row(s) for s in sets["emotion"]],
        "emotions": {k: list(v) for k, v in EMOTIONS.items()},
        "text_pools": {k: {"words": w, "templates": t} for k, (w, t) in text_pools(spec.seed).items()},
        "pretrain": pre,
        "probe": [r for r in rows if r["set"] == "probe"],
        "speaker": [r for r in rows if r["set"] == "speaker"],
        "emotion": [r for r in rows if r["set"] == "emotion"],
    }
    with open(done + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(done + ".tmp", done)
    log(f"corpus ready: {summary['pretrain_hours']:.2f} h pretraining, {summary['probe_hours']:.2f} h phone probe, "
        f"{summary['speaker_hours']:.2f} h speaker probe, {summary['emotion_hours']:.2f} h emotion probe, "
        f"{summary['bytes'] / 1e6:.0f} MB, generated in {seconds:.0f} s")
    return summary


def _speaker_row(s: Speaker):
    v = s.voice
    return {"id": s.id, "engine": v.engine, "voice": v.name, "base_voice": base_voice(v.engine, v.name),
            "gender": v.gender, "rate": round(v.rate, 3), "pitch": round(v.pitch, 2),
            "pitch_range": round(v.pitch_range, 2)}


def phone_inventory(rows) -> List[str]:
    """Sorted phone symbols over probe rows."""
    return sorted({p for r in rows for _, _, p in r["phones"]})


def frame_labels(phones, centres_s, inventory: Optional[dict] = None):
    """Phone label of each frame: the phone whose [start, end) covers the frame's centre.

    phones: [(start_s, end_s, symbol)], contiguous and in time order; centres_s: (n_frames,) frame
    centre times in seconds, e.g. ``mgf_sb.batch.encoder_frame_centres(n_samples, hop, stack) / sr``
    (the representation's own frame rate); inventory: symbol -> index.
    Returns np.int64 (n_frames,): phone indices into ``phones`` (``inventory`` None) or class
    indices; centres at or past the last end get the last phone.
    """
    ends = np.array([e for _, e, _ in phones], dtype=np.float64)
    if len(ends) == 0 or np.any(np.diff(ends) < 0):
        raise ValueError(f"frame_labels: phones must be a non-empty list in time order, got {phones!r:.200}")
    t = np.asarray(centres_s, dtype=np.float64)
    # first phone whose end is after t: its [start, end) covers t (phones are contiguous)
    idx = np.minimum(np.searchsorted(ends, t, side="right"), len(phones) - 1)
    if inventory is None:
        return idx.astype(np.int64)
    return np.array([inventory[phones[i][2]] for i in idx], dtype=np.int64)
