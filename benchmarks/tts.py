"""Tiny offline TTS front-end: builds the bundled sample corpora (``samples/make_samples.py``)
and the quality benchmark's corpus (``benchmarks/quality_corpus.py``).

A benchmark tool, not part of the ``mgf_sb`` library: scripts import it with ``benchmarks/`` on
``sys.path`` (``import tts``).

Importing this module needs only numpy; the TTS binaries (``espeak-ng``,
``festival``, ``flite``) and ``sox`` are needed only when :func:`synthesize`
is called.  Everything here is deterministic given its inputs / RNG.

Conventions: waveforms are 1-D ``np.float32`` arrays in [-1, 1] (shape
``[T]``), sample rates in Hz, times in seconds, levels in dB.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np

Phones = List[Tuple[float, float, str]]  # (start_s, end_s, symbol)

# --------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Voice:
    """A TTS voice plus prosody settings.

    engine: 'espeak' | 'festival' | 'flite'.
    name: engine voice name ('en-us+m3', 'kal_diphone', 'slt', ...).
    rate: speaking-rate multiplier (1.0 = engine default, 1.3 = 30% faster).
    pitch: mean-F0 shift in semitones relative to the voice default.
    pitch_range: multiplier of the intonation (F0 std) range, 1.0 = default (not applied to
        festival's HTS voice and flite's rms, whose F0 is shifted with sox instead).
    gender: 'M' or 'F' (metadata only).
    speaker: free speaker-id string (metadata only).
    """

    engine: str
    name: str
    rate: float = 1.0
    pitch: float = 0.0
    pitch_range: float = 1.0
    gender: str = "M"
    speaker: str = ""

    def replace(self, **kw) -> "Voice":
        return dataclasses.replace(self, **kw)


def voices() -> List[Voice]:
    """A pool of 12 perceptually distinct voices (6 M, 6 F)."""
    V = Voice
    return [
        V("festival", "kal_diphone", 1.00, 0.0, 1.0, "M", "fest_kal"),
        V("festival", "ked_diphone", 0.92, -2.0, 1.2, "M", "fest_ked"),
        V("festival", "cmu_us_slt_arctic_hts", 1.00, 0.0, 1.0, "F", "fest_slt"),
        V("flite", "awb", 1.05, 0.0, 1.0, "M", "flite_awb"),
        V("flite", "rms", 0.95, 0.0, 1.0, "M", "flite_rms"),
        V("flite", "slt", 1.10, 2.0, 1.3, "F", "flite_slt"),
        V("espeak", "en-us+m3", 1.00, 0.0, 1.0, "M", "esp_us_m3"),
        V("espeak", "en-gb+m5", 0.90, -2.0, 0.8, "M", "esp_gb_m5"),
        V("espeak", "en-us+f2", 1.00, 0.0, 1.0, "F", "esp_us_f2"),
        V("espeak", "en-gb+f3", 0.95, 5.0, 1.2, "F", "esp_gb_f3"),
        V("espeak", "en-us+f4", 1.10, -1.0, 1.4, "F", "esp_us_f4"),
        V("espeak", "en-gb-scotland+f1", 0.95, 2.0, 1.0, "F", "esp_sc_f1"),
    ]


def festival_voices() -> List[Voice]:
    """Voices that give phone timings (festival), varied to 8 speakers."""
    V = Voice
    return [
        V("festival", "kal_diphone", 1.00, 0.0, 1.0, "M", "kal_a"),
        V("festival", "kal_diphone", 0.85, -3.0, 0.7, "M", "kal_b"),
        V("festival", "ked_diphone", 1.00, 0.0, 1.0, "M", "ked_a"),
        V("festival", "ked_diphone", 1.15, 3.0, 1.5, "M", "ked_b"),
        V("festival", "cmu_us_slt_arctic_hts", 1.00, 0.0, 1.0, "F", "slt_a"),
        V("festival", "cmu_us_slt_arctic_hts", 0.88, -2.0, 1.0, "F", "slt_b"),
        V("festival", "kal_diphone", 1.05, 8.0, 1.6, "F", "kal_f"),
        V("festival", "ked_diphone", 0.95, 9.0, 1.4, "F", "ked_f"),
    ]


# --------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------

_FLITE_F0 = {"kal": 100.0, "kal16": 100.0, "awb": 140.0, "rms": 110.0, "slt": 170.0}
# flite voices that ignore the int_f0_target_* settings (measured): their pitch is shifted with sox
# afterwards, and their pitch range stays the voice's own
_FLITE_FIXED_F0 = {"rms"}


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    exe = cmd[0]
    if shutil.which(exe) is None:
        raise RuntimeError(f"'{exe}' is not installed; it is needed to synthesize speech")
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


def _read(path: str) -> np.ndarray:
    import soundfile as sf

    x, _ = sf.read(path, dtype="float32", always_2d=True)
    return x.mean(axis=1)


def _scm_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival(text: str, v: Voice, wav: str):
    scm = [f"(voice_{v.name})", f"(Parameter.set 'Duration_Stretch {1.0 / v.rate:.4f})"]
    if "diphone" in v.name:  # LR intonation model: set target F0 mean / std
        f0 = 105.0 * 2 ** (v.pitch / 12.0)
        std = 15.0 * v.pitch_range * 2 ** (v.pitch / 12.0)
        scm.append(
            f"(set! int_lr_params '((target_f0_mean {f0:.1f}) (target_f0_std {std:.1f})"
            " (model_f0_mean 170) (model_f0_std 34)))"
        )
    scm += [
        f"(set! utt (utt.synth (Utterance Text {_scm_str(text)})))",
        f"(utt.save.wave utt {_scm_str(wav)} 'riff)",
        "(mapcar (lambda (s) (format t \"S %s %f\\n\" (item.name s) (item.feat s \"end\")))"
        " (utt.relation.items utt 'Segment))",
        "(mapcar (lambda (w) (format t \"W %s %f %f\\n\" (item.name w)"
        " (item.feat w \"word_start\") (item.feat w \"word_end\")))"
        " (utt.relation.items utt 'Word))",
    ]
    scm_path = wav + ".scm"
    with open(scm_path, "w") as f:
        f.write("\n".join(scm) + "\n")
    out = _run(["festival", "-b", scm_path]).stdout
    phones, words, t = [], [], 0.0
    for line in out.splitlines():
        p = line.split()
        if len(p) == 3 and p[0] == "S":
            end = float(p[2])
            phones.append((t, end, p[1]))
            t = end
        elif len(p) == 4 and p[0] == "W":
            words.append((float(p[2]), float(p[3]), p[1].lower()))
    # HTS voices ignore int_lr_params: shift pitch afterwards with sox
    post_pitch = v.pitch if "diphone" not in v.name else 0.0
    return phones, words, post_pitch


def _espeak_cmd(text: str, v: Voice, wav: str) -> List[str]:
    p = int(np.clip(round(50 + 6 * v.pitch), 0, 99))
    ssml = (
        f'<speak><prosody range="{int(round(100 * v.pitch_range))}%">'
        + text.replace("&", "and").replace("<", " ").replace(">", " ")
        + "</prosody></speak>"
    )
    return ["espeak-ng", "-m", "-v", v.name, "-s", str(int(round(170 * v.rate))),
            "-p", str(p), "-w", wav, ssml]


def _flite_cmd(text: str, v: Voice, wav: str) -> List[str]:
    f0 = _FLITE_F0.get(v.name, 120.0) * 2 ** (v.pitch / 12.0)
    return ["flite", "-voice", v.name,
            "--setf", f"duration_stretch={1.0 / v.rate:.4f}",
            "--setf", f"int_f0_target_mean={f0:.1f}",
            "--setf", f"int_f0_target_stddev={0.15 * f0 * v.pitch_range:.1f}",
            "-t", text, "-o", wav]


def synthesize_aligned(text: str, voice: Voice, sample_rate: int = 16000):
    """Synthesize ``text``; returns (wav [T] float32, phones, words).

    phones / words are lists of (start_s, end_s, symbol) for festival voices
    (festival 'radio' phone set, 'pau' = silence; words lower-case), and
    ``None`` for the other engines.  Times are clipped to the audio length.
    """
    with tempfile.TemporaryDirectory(prefix="mgf_tts_") as td:
        raw, out = os.path.join(td, "raw.wav"), os.path.join(td, "out.wav")
        phones = words = None
        post_pitch = 0.0
        if voice.engine == "festival":
            phones, words, post_pitch = _festival(text, voice, raw)
        elif voice.engine == "espeak":
            _run(_espeak_cmd(text, voice, raw))
        elif voice.engine == "flite":
            _run(_flite_cmd(text, voice, raw))
            post_pitch = voice.pitch if voice.name in _FLITE_FIXED_F0 else 0.0
        else:
            raise ValueError(f"unknown engine {voice.engine!r}")
        cmd = ["sox", "-D", raw, "-r", str(sample_rate), "-c", "1", "-e", "floating-point", "-b", "32", out]
        if abs(post_pitch) > 1e-3:
            cmd += ["pitch", f"{100 * post_pitch:.0f}"]
        _run(cmd + ["rate", "-h", str(sample_rate)])
        wav = _read(out).astype(np.float32)
    dur = len(wav) / sample_rate

    def clip(items):
        if items is None:
            return None
        res = [(min(s, dur), min(e, dur), n) for s, e, n in items]
        return [(s, e, n) for s, e, n in res if e > s]

    phones, words = clip(phones), clip(words)
    if phones:  # make the last segment reach the end of the file
        s, _, n = phones[-1]
        phones[-1] = (s, dur, n)
    return wav, phones, words


def synthesize(text: str, voice: Voice, sample_rate: int = 16000, with_phones: bool = False):
    """Synthesize ``text`` -> (wav [T] float32 mono at ``sample_rate``, phones).

    phones: list of (start_s, end_s, phone) when ``with_phones`` (festival
    voices only; radio phone set, 'pau' = silence), else ``None``.
    """
    if with_phones and voice.engine != "festival":
        raise ValueError("phone timings are only available from festival voices")
    wav, phones, _ = synthesize_aligned(text, voice, sample_rate)
    return wav, (phones if with_phones else None)


# --------------------------------------------------------------------------
# Festival (radio) -> TIMIT-61 phones
# --------------------------------------------------------------------------

TIMIT61 = (
    "aa ae ah ao aw ax ax-h axr ay b bcl ch d dcl dh dx eh el em en eng epi er ey f g "
    "gcl h# hh hv ih ix iy jh k kcl l m n ng nx ow oy p pau pcl q r s sh t tcl th uh "
    "uw ux v w y z zh"
).split()
_CLOSURE = {"b": "bcl", "d": "dcl", "g": "gcl", "p": "pcl", "t": "tcl", "k": "kcl",
            "ch": "tcl", "jh": "dcl"}
_RADIO2TIMIT = {"pau": "pau", "h#": "h#", "brth": "pau", "#": "pau"}


def to_timit_phones(phones: Phones) -> Phones:
    """Map festival radio phones to TIMIT-61: stops/affricates get a closure
    (first 50% of the segment), leading/trailing 'pau' -> 'h#', inner -> 'pau'.
    """
    out: Phones = []
    n = len(phones)
    for i, (s, e, p) in enumerate(phones):
        p = _RADIO2TIMIT.get(p, p)
        if p == "pau" and (i == 0 or i == n - 1):
            p = "h#"
        if p not in TIMIT61:
            raise ValueError(f"no TIMIT mapping for festival phone {p!r}")
        if p in _CLOSURE:
            m = s + 0.5 * (e - s)
            out += [(s, m, _CLOSURE[p]), (m, e, p)]
        else:
            out.append((s, e, p))
    if out and out[0][2] != "h#":
        out.insert(0, (0.0, out[0][0], "h#"))
    if out and out[-1][2] != "h#":
        out.append((out[-1][1], out[-1][1], "h#"))
    return out


# --------------------------------------------------------------------------
# Channel / augmentation
# --------------------------------------------------------------------------


def _biquad_mag(kind: str, f0: float, gain_db: float, q: float, freqs: np.ndarray, sr: int):
    """|H(f)| of an RBJ-cookbook biquad at ``freqs`` (Hz)."""
    A = 10 ** (gain_db / 40.0)
    w0 = 2 * np.pi * f0 / sr
    alpha = np.sin(w0) / (2 * q)
    c = np.cos(w0)
    if kind == "lowpass":
        b = [(1 - c) / 2, 1 - c, (1 - c) / 2]; a = [1 + alpha, -2 * c, 1 - alpha]
    elif kind == "highpass":
        b = [(1 + c) / 2, -(1 + c), (1 + c) / 2]; a = [1 + alpha, -2 * c, 1 - alpha]
    elif kind == "peak":
        b = [1 + alpha * A, -2 * c, 1 - alpha * A]; a = [1 + alpha / A, -2 * c, 1 - alpha / A]
    elif kind in ("lowshelf", "highshelf"):
        sq = 2 * np.sqrt(A) * alpha
        sg = 1 if kind == "lowshelf" else -1
        b = [A * ((A + 1) - sg * (A - 1) * c + sq), sg * 2 * A * ((A - 1) - sg * (A + 1) * c),
             A * ((A + 1) - sg * (A - 1) * c - sq)]
        a = [(A + 1) + sg * (A - 1) * c + sq, -sg * 2 * ((A - 1) + sg * (A + 1) * c),
             (A + 1) + sg * (A - 1) * c - sq]
    else:
        raise ValueError(f"unknown EQ kind {kind!r}")
    z = np.exp(-1j * 2 * np.pi * freqs / sr)
    return np.abs(np.polyval(b[::-1], z) / np.polyval(a[::-1], z))


def apply_channel(wav: np.ndarray, sr: int, rng: np.random.Generator,
                  noise_snr_db: Optional[float] = None, eq=None,
                  gain_db: Optional[float] = None, noise_color: str = "white") -> np.ndarray:
    """Simulate a recording channel: EQ, then additive noise, then gain.

    wav: [T] float waveform; sr: Hz; rng: ``np.random.Generator``.
    eq: None, or one / a list of ``(kind, freq_hz, gain_db, q)`` biquads,
        kind in lowpass|highpass|peak|lowshelf|highshelf (zero-phase, FFT).
    noise_snr_db: SNR (dB) of added noise w.r.t. the (EQ'd) signal power.
    noise_color: 'white' or 'pink'.
    gain_db: output gain in dB.  Result is clipped to [-1, 1], float32 [T].
    """
    x = np.asarray(wav, dtype=np.float64)
    if eq:
        bands = [eq] if isinstance(eq[0], str) else list(eq)
        n = len(x)
        X = np.fft.rfft(x, n)
        freqs = np.fft.rfftfreq(n, 1.0 / sr)
        for kind, f0, g, q in bands:
            X = X * _biquad_mag(kind, f0, g, q, freqs, sr)
        x = np.fft.irfft(X, n)
    if noise_snr_db is not None:
        noise = rng.standard_normal(len(x))
        if noise_color == "pink":
            N = np.fft.rfft(noise)
            f = np.fft.rfftfreq(len(x), 1.0 / sr)
            N /= np.sqrt(np.maximum(f, 20.0))
            noise = np.fft.irfft(N, len(x))
        ps = np.mean(x ** 2) + 1e-12
        pn = np.mean(noise ** 2) + 1e-12
        x = x + noise * np.sqrt(ps / pn / 10 ** (noise_snr_db / 10.0))
    if gain_db is not None:
        x = x * 10 ** (gain_db / 20.0)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def normalize_peak(wav: np.ndarray, peak_db: float = -3.0) -> np.ndarray:
    """Scale [T] ``wav`` so that its peak is at ``peak_db`` dBFS."""
    m = float(np.max(np.abs(wav))) + 1e-9
    return (wav * (10 ** (peak_db / 20.0) / m)).astype(np.float32)


# --------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------

# The sentence grammar: word lists (slot -> words) and templates over the slots.
WORDS = {
    "name": "Anna Peter Lucy Martin Helen George Rose Daniel Clara Thomas Emma Victor "
            "Julia Oliver Grace Henry Nora Samuel Alice Edward".split(),
    "adj": "old small bright quiet heavy warm narrow green yellow broken clean dusty gentle "
           "tall shiny wooden silver empty crowded distant strange fresh careful simple".split(),
    "noun": "dog garden river kitchen window teacher letter bridge market horse village "
            "doctor basket painting station forest candle ladder engine carpet mountain "
            "harbor library blanket pencil ocean farmer museum meadow castle bottle "
            "kettle wagon tower island orchard violin lantern pocket pillow jacket".split(),
    "pnoun": "apples books stones flowers boxes coins papers shells birds boats chairs "
             "tickets cookies ribbons cups keys lamps tools maps songs".split(),
    "verb_t": "painted found carried opened cleaned watched fixed moved sold bought "
              "visited followed counted dropped pulled pushed washed brought packed held".split(),
    "verb_i": "waited laughed smiled slept worked listened walked talked arrived rested "
              "wandered shouted danced stayed".split(),
    "adv": "slowly quickly quietly carefully happily suddenly gently early later together "
           "again yesterday outside nearby calmly".split(),
    "prep": "near behind under beside across inside above along past through".split(),
    "time": "in the morning|at noon|after lunch|before dinner|on Monday|last winter|"
            "every evening|at night|during the storm|on the weekend".split("|"),
    "num": "two three four five six seven eight nine ten twelve".split(),
}
TEMPLATES = [
    "The {adj} {noun} {verb_i} {adv}.",
    "{name} {verb_t} the {adj} {noun} {time}.",
    "{name} and {name2} {verb_i} {prep} the {noun}.",
    "We {verb_t} {num} {pnoun} {prep} the {adj} {noun}.",
    "Did {name} see the {adj} {noun} {prep} the {noun2}?",
    "Why did the {noun} stay {prep} the {noun2} {time}?",
    "A {adj} {noun} stood {prep} the {adj2} {noun2}.",
    "{name} {verb_i} {adv} while the {noun} {verb_i2}.",
    "Please put the {pnoun} {prep} the {adj} {noun}.",
    "Where are the {num} {adj} {pnoun} that {name} {verb_t}?",
    "The {noun} was {adj} and the {noun2} was {adj2}.",
    "{time_cap}, {name} {verb_t} a {adj} {noun}.",
    "Nobody {verb_t} the {pnoun} {prep} the {noun} {adv}.",
    "How many {pnoun} did {name} find {prep} the {noun}?",
    "The {adj} {pnoun} were {prep} the {noun2} {time}.",
]


def make_sentences(n: int, seed: int = 0, words: Optional[dict] = None,
                   templates: Optional[Sequence[str]] = None) -> List[str]:
    """``n`` varied English sentences from a template grammar; same seed ->
    same list.  Only letters, spaces and . , ? punctuation (no digits).

    words / templates: a sub-grammar (default :data:`WORDS` / :data:`TEMPLATES`), e.g. one of
    two disjoint vocabularies; ``words`` needs every slot of :data:`WORDS`, and the slots
    ``name``, ``noun``, ``adj``, ``verb_i`` at least two words each.
    """
    words = WORDS if words is None else words
    templates = TEMPLATES if templates is None else templates
    rng = random.Random(seed)
    out: List[str] = []
    seen = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"make_sentences: this grammar gives fewer than n={n} distinct sentences")
        t = rng.choice(templates)
        f = {k: rng.choice(v) for k, v in words.items()}
        for k in ("name", "noun", "adj", "verb_i"):
            f[k + "2"] = rng.choice([w for w in words[k] if w != f[k]])
        f["time_cap"] = f["time"][0].upper() + f["time"][1:]
        s = t.format(**f)
        s = re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", s)
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def words_upper(sentence: str) -> str:
    """'Did Anna see it?' -> 'DID ANNA SEE IT' (LibriSpeech transcript style)."""
    keep = "".join(c if (c.isalpha() or c in " '") else " " for c in sentence.upper())
    return " ".join(keep.split())
