"""TIMIT (LDC93S1) preparation for frame-wise phoneme classification.

    from timit_prepare import prepare_timit
    prepare_timit("/data/TIMIT", "results/timit/data")

Reads the LDC layout ``TRAIN|TEST/DR1..DR8/<SPEAKER>/<SENTENCE>.WAV`` (NIST
SPHERE, 16 kHz 16-bit PCM) with its ``.PHN`` (``start end phone`` in samples,
61 phones), ``.WRD`` and ``.TXT``. Upper- and lower-case trees
(``train/dr1/fcjf0/sa1.wav``) are both accepted, as distributed copies differ;
the folder may also be the parent of the ``TIMIT`` (or ``data``) folder.

Standard protocol (the one Kaldi's ``egs/timit/s5`` and SpeechBrain use):

- ``train``: every TRAIN speaker, SA1/SA2 excluded (3,696 utterances);
- ``dev``: the 50-speaker development set (:data:`DEV_SPEAKERS`, from TEST; 400 utt.);
- ``test``: the 24-speaker core test set (:data:`CORE_TEST_SPEAKERS`, from TEST; 192 utt.).
  The other TEST speakers are not used.

Phones: 61 -> 39 (Lee & Hon 1989, as in Kaldi's ``phones.60-48-39.map``):
closures (bcl dcl gcl pcl tcl kcl), pauses (pau, epi) and ``h#`` all fold into
``sil`` (kept as one of the 39 classes, so the frames at the start and end of
each utterance are scored as ``sil``); ``q`` (glottal stop) is deleted: its
frames carry no label (:data:`IGNORE`) and count neither in training nor in
accuracy. The probe is trained directly on the 39 classes.

Frame labels: one label per 10 ms frame (100 fps), the label of the PHN
segment containing the frame's centre sample ``i * 160`` (SpeechBrain's Fbank
uses a centred STFT, so fbank frame ``i`` is centred there); frames in no
segment (``q``, gaps) are :data:`IGNORE`. The manifest keeps the folded
segments too, so the recipe derives labels for any upstream frame rate with
:func:`frame_labels` (label at each encoder frame's centre: with
``frame_stack: 2`` frame ``j`` stacks fbank frames ``2j`` and ``2j+1``, centre
sample ``(2j + 0.5) * 160``).

TIMIT is a fixed benchmark (a smaller test set gives incomparable numbers),
so a file that cannot be used stops the preparation with an error naming the
file and the fix, never a silent skip: a WAV without PHN; an empty, truncated
(header only), unreadable or non-audio file (text named .WAV); audio with no
samples, NaN/Inf samples or only zeros; PHN offsets beyond the audio (a
truncated WAV); an unknown phone symbol, a malformed or non-ASCII PHN line.
Audio in another format is converted instead (16 kHz mono copies in
``<save_folder>/converted``, listed in ``timit_converted.tsv``): other sample
rates are resampled (the PHN offsets are rescaled; they are read in the
file's own rate, or in 16 kHz samples when that is what matches the audio's
length) and stereo is downmixed. Paths with spaces or non-ASCII characters
are fine.

Outputs in ``save_folder``: ``train.csv``, ``dev.csv``, ``test.csv`` (columns
ID, duration, wav, spk_id, n_samples, segments, frame_labels) and
``timit_prep_opts.json`` (re-preparation is skipped when the options match).
"""

import logging
import os
import re

import numpy as np
import soundfile as sf

from mgf_sb.batch import encoder_frame_centres, nearest_frames  # noqa: F401  (nearest_frames: used by train.py)
from mgf_sb.data.audio import AudioError, check_audio, file_identity, read_audio
from mgf_sb.data.manifest import SkipReport, check_disjoint, mark_prep_done, prep_is_done, write_manifest

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
IGNORE = "-"  # frame label for frames in no segment (q, gaps)

# The 24-speaker core test set (2 male + 1 female per dialect region).
CORE_TEST_SPEAKERS = (
    "MDAB0 MWBT0 FELC0 "  # DR1
    "MTAS1 MWEW0 FPAS0 "  # DR2
    "MJMP0 MLNT0 FPKT0 "  # DR3
    "MLLL0 MTLS0 FJLM0 "  # DR4
    "MBPM0 MKLT0 FNLP0 "  # DR5
    "MCMJ0 MJDH0 FMGD0 "  # DR6
    "MGRT0 MNJM0 FDHC0 "  # DR7
    "MJLN0 MPAM0 FMLD0"  # DR8
).split()

# The 50-speaker development set (Kaldi egs/timit/s5/conf/dev_spk.list).
DEV_SPEAKERS = (
    "FAKS0 FDAC1 FJEM0 MGWT0 MJAR0 MMDB1 MMDM2 MPDF0 FCMH0 FKMS0 "
    "MBDG0 MBWM0 MCSH0 FADG0 FDMS0 FEDW0 MGJF0 MGLB0 MRTK0 MTAA0 "
    "MTDT0 MTHC0 MWJG0 FNMR0 FREW0 FSEM0 MBNS0 MMJR0 MDLS0 MDLF0 "
    "MDVC0 MERS0 FMAH0 FDRW0 MRCS0 MRJM4 FCAL1 MMWH0 FJSJ0 MAJC0 "
    "MJSW0 MREB0 FGJD0 FJMG0 MROA0 MTEB0 MJFC0 MRJR0 FMML0 MRWS1"
).split()

# 61 TIMIT phones -> 39 (Lee & Hon); None = deleted.
PHONE_MAP_61_39 = {
    "aa": "aa", "ae": "ae", "ah": "ah", "ao": "aa", "aw": "aw", "ax": "ah", "ax-h": "ah", "axr": "er",
    "ay": "ay", "b": "b", "bcl": "sil", "ch": "ch", "d": "d", "dcl": "sil", "dh": "dh", "dx": "dx",
    "eh": "eh", "el": "l", "em": "m", "en": "n", "eng": "ng", "epi": "sil", "er": "er", "ey": "ey",
    "f": "f", "g": "g", "gcl": "sil", "h#": "sil", "hh": "hh", "hv": "hh", "ih": "ih", "ix": "ih",
    "iy": "iy", "jh": "jh", "k": "k", "kcl": "sil", "l": "l", "m": "m", "n": "n", "ng": "ng", "nx": "n",
    "ow": "ow", "oy": "oy", "p": "p", "pau": "sil", "pcl": "sil", "q": None, "r": "r", "s": "s",
    "sh": "sh", "t": "t", "tcl": "sil", "th": "th", "uh": "uh", "uw": "uw", "ux": "uw", "v": "v",
    "w": "w", "y": "y", "z": "z", "zh": "sh",
}
PHONES_39 = tuple(sorted({p for p in PHONE_MAP_61_39.values() if p is not None}))
assert len(PHONE_MAP_61_39) == 61 and len(PHONES_39) == 39

_SENTENCE = re.compile(r"^s[aix]\d+\.wav$", re.IGNORECASE)  # SA1.WAV, si1027.wav (not SA1.WAV.wav)


class TIMITError(ValueError):
    """Unusable TIMIT input; the message names the file and the fix."""


def find_timit_root(data_folder):
    """The folder holding TRAIN/ and TEST/ (either case) in or just below ``data_folder``.

    Returns
    -------
    root : str
    sets : dict
        ``{"train": path, "test": path}``.
    """
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(f"TIMIT data folder {data_folder!r} does not exist (check --data_folder)")
    candidates = [data_folder] + [
        os.path.join(data_folder, d) for d in sorted(os.listdir(data_folder))
        if d.lower() in ("timit", "data") and os.path.isdir(os.path.join(data_folder, d))
    ]
    for root in candidates:
        sets = {}
        for entry in sorted(os.listdir(root)):
            name = entry.lower()
            if name in ("train", "test") and os.path.isdir(os.path.join(root, entry)):
                if name in sets:
                    raise TIMITError(
                        f"{root}: both {os.path.basename(sets[name])}/ and {entry}/ exist; keep one copy of the corpus"
                    )
                sets[name] = os.path.join(root, entry)
        if len(sets) == 2:
            return root, sets
    raise TIMITError(
        f"{data_folder}: no TRAIN/ and TEST/ folders found (expected the LDC layout "
        "TRAIN|TEST/DR1..DR8/<SPEAKER>/<SENTENCE>.WAV + .PHN, upper or lower case); check --data_folder"
    )


def list_utterances(set_folder):
    """Sorted ``(speaker, sentence, wav_path)`` under ``set_folder/DR*/<SPEAKER>/``."""
    found = []
    for dr in sorted(os.listdir(set_folder)):
        dr_path = os.path.join(set_folder, dr)
        if not (os.path.isdir(dr_path) and re.fullmatch(r"dr[1-8]", dr.lower())):
            continue
        for spk in sorted(os.listdir(dr_path)):
            spk_path = os.path.join(dr_path, spk)
            if not os.path.isdir(spk_path):
                continue
            for f in sorted(os.listdir(spk_path)):
                if _SENTENCE.match(f):
                    found.append((spk.upper(), os.path.splitext(f)[0].upper(), os.path.join(spk_path, f)))
    return found


def find_phn(wav_path):
    """The ``.PHN``/``.phn`` next to ``wav_path``; a :class:`TIMITError` if there is none."""
    folder, name = os.path.split(wav_path)
    stem = os.path.splitext(name)[0]
    for f in os.listdir(folder):
        if os.path.splitext(f)[0] == stem and os.path.splitext(f)[1].lower() == ".phn":
            return os.path.join(folder, f)
    raise TIMITError(
        f"{wav_path}: no phone transcription {os.path.join(folder, stem)}.PHN next to it; "
        "restore it from the corpus or remove the WAV"
    )


def read_phn(phn_path, n_samples):
    """Reads a PHN file and folds it to 39 phones.

    Arguments
    ---------
    phn_path : str
    n_samples : int
        Length of the audio; offsets beyond it are an error.

    Returns
    -------
    list of (start, end, phone39)
        Sample offsets, sorted; ``q`` segments and empty segments removed.

    Raises
    ------
    TIMITError
        Naming ``file:line``: not ASCII, a malformed line, an unknown phone, an
        offset beyond the audio, a segment ending before it starts, or one that
        overlaps the previous segment or leaves a gap after it (TIMIT's PHN
        segments tile the utterance: each starts where the previous one ends).
    """
    segments = []
    prev = None  # (line number, end) of the previous segment
    with open(phn_path, "rb") as f:
        raw = f.read().splitlines()
    lines = []
    for k, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("ascii"))
        except UnicodeDecodeError as e:
            raise TIMITError(
                f"{phn_path}:{k}: not ASCII text (byte 0x{line[e.start]:02x}); TIMIT's PHN files are plain "
                "ASCII 'start end phone' lines: restore the file from the corpus"
            ) from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise TIMITError(f"{phn_path}:{k}: malformed line {line!r} (expected 'start end phone' in samples)")
        start, end, phone = int(parts[0]), int(parts[1]), parts[2].lower()
        if phone not in PHONE_MAP_61_39:
            raise TIMITError(
                f"{phn_path}:{k}: unknown phone symbol {parts[2]!r}; TIMIT's 61 phones are "
                f"{' '.join(sorted(PHONE_MAP_61_39))} (fix or remove the file)"
            )
        if end > n_samples:
            raise TIMITError(
                f"{phn_path}:{k}: offset {end} is beyond the end of the audio ({n_samples} samples); "
                "the PHN file does not belong to this WAV or the WAV is truncated"
            )
        if start > end:
            raise TIMITError(f"{phn_path}:{k}: start {start} after end {end}")
        if prev is not None and start != prev[1]:
            what = "overlaps the previous segment" if start < prev[1] else "leaves a gap after the previous segment"
            raise TIMITError(
                f"{phn_path}:{k}: segment {start}-{end} {what} (line {prev[0]} ends at {prev[1]}); TIMIT's "
                f"segments follow each other without gaps or overlaps: fix the line or restore the file from the corpus"
            )
        prev = (k, end)
        if PHONE_MAP_61_39[phone] is not None and end > start:
            segments.append((start, end, PHONE_MAP_61_39[phone]))
    if not segments:
        raise TIMITError(f"{phn_path}: no phone segment")
    return sorted(segments)


def frame_labels(segments, n_samples, hop_length=160, frame_stack=1):
    """Label of each (encoder) frame: the segment containing the frame's centre.

    Fbank frame ``i`` is centred at sample ``i * hop_length`` (centred STFT,
    ``n_samples // hop_length + 1`` frames); an encoder frame stacking
    ``frame_stack`` fbank frames is centred in the middle of them.

    Arguments
    ---------
    segments : list of (start, end, phone)
        Sorted, non-overlapping (as TIMIT's).
    n_samples : int
    hop_length, frame_stack : int

    Returns
    -------
    list of str
        One phone (or :data:`IGNORE`) per encoder frame.

    Example
    -------
    >>> segs = [(0, 200, "sil"), (200, 500, "aa")]
    >>> frame_labels(segs, 500)
    ['sil', 'sil', 'aa', 'aa']
    >>> frame_labels(segs, 500, frame_stack=2)
    ['sil', 'aa']
    """
    return labels_at(segments, encoder_frame_centres(n_samples, hop_length, frame_stack), n_samples)


def labels_at(segments, centres, n_samples):
    """Label of the segment containing each position of ``centres`` (samples; clipped to the audio).

    Any upstream's frames: pass its front end's ``frame_centres(n_samples)``.

    >>> labels_at([(0, 200, "sil"), (200, 500, "aa")], [199.5, 519.5], 500)
    ['sil', 'aa']
    """
    centres = np.clip(np.asarray(centres, dtype=np.float64), 0, max(n_samples - 1, 0))
    starts = np.array([s for s, _, _ in segments])
    idx = np.searchsorted(starts, centres, side="right") - 1
    out = []
    for c, i in zip(centres, idx):
        out.append(segments[i][2] if i >= 0 and c < segments[i][1] else IGNORE)
    return out


def encode_segments(segments):
    """[(start, end, phone)] -> 'start,end,phone start,end,phone ...' (a manifest cell)."""
    return " ".join(f"{s},{e},{p}" for s, e, p in segments)


def decode_segments(text):
    """Inverse of :func:`encode_segments`."""
    out = []
    for item in text.split():
        s, e, p = item.split(",")
        out.append((int(s), int(e), p))
    return out


def read_utterance(wav_path, sample_rate=16000, hop_length=160, convert_dir=None):
    """Decodes one utterance and its PHN; errors name the file.

    Arguments
    ---------
    wav_path : str
    sample_rate, hop_length : int
    convert_dir : str, optional
        Where 16 kHz mono copies of other rates / stereo files go; without it
        such files are an error.

    Returns
    -------
    dict
        wav (the converted copy if one was written), note (what was
        converted, or None), n_samples, duration, segments, frame_labels (100 fps).
    """
    phn_path = find_phn(wav_path)
    try:
        data, sr = read_audio(wav_path)
    except AudioError as e:
        raise TIMITError(
            f"{e}; TIMIT's .WAV must be NIST SPHERE with uncompressed 16-bit PCM (convert it with "
            "sph2pipe -f wav, keeping the name, or restore it from the corpus)"
        ) from e
    n_orig = data.shape[0]
    restore = "restore it from the corpus (or remove the WAV and its PHN)"
    if n_orig == 0:
        raise TIMITError(f"{wav_path}: empty audio (zero samples); {restore}")
    if not np.isfinite(data).all():
        raise TIMITError(f"{wav_path}: NaN or Inf samples; {restore}")
    if not np.any(data):
        raise TIMITError(f"{wav_path}: silent (every sample is zero); {restore}")
    path, note, n_samples = wav_path, None, n_orig
    if sr != sample_rate or data.shape[1] != 1:
        if convert_dir is None:
            raise TIMITError(f"{wav_path}: {sr} Hz, {data.shape[1]} channels; TIMIT is {sample_rate} Hz mono")
        check = check_audio(wav_path, sample_rate, convert_dir=convert_dir)
        if not check.ok:
            raise TIMITError(f"{wav_path}: {check.reason}; {restore}")
        path, note, n_samples = check.path, check.note, sf.info(check.path).frames
    if sr == sample_rate:
        segments = read_phn(phn_path, n_samples)
    else:
        # Offsets in the file's own samples (a consistently resampled copy) or
        # still in 16 kHz samples (only the audio was resampled): the unit whose
        # last offset is nearest the audio's length.
        n_target = int(round(n_orig * sample_rate / sr))
        segments = read_phn(phn_path, max(n_orig, n_target))
        last = max(e for _, e, _ in segments)
        if abs(last - n_orig) <= abs(last - n_target):
            segments = read_phn(phn_path, n_orig)
            ratio = sample_rate / sr
            segments = [(int(round(a * ratio)), min(int(round(b * ratio)), n_samples), p) for a, b, p in segments]
            segments = [(a, b, p) for a, b, p in segments if b > a]
            note += f"; PHN offsets rescaled from {sr} Hz"
        else:
            segments = [(a, min(b, n_samples), p) for a, b, p in read_phn(phn_path, n_target) if a < n_samples]
            note += f"; PHN offsets already in {sample_rate} Hz samples"
    return dict(
        wav=path,
        note=note,
        n_samples=n_samples,
        duration=n_samples / sample_rate,
        segments=segments,
        frame_labels=frame_labels(segments, n_samples, hop_length, 1),
    )


def assign_split(set_name, speaker, sentence, exclude_sa=True):
    """``train`` / ``dev`` / ``test`` / None (not used) for one utterance."""
    if exclude_sa and sentence.startswith("SA"):
        return None
    if set_name == "train":
        return "train"
    if speaker in DEV_SPEAKERS:
        return "dev"
    if speaker in CORE_TEST_SPEAKERS:
        return "test"
    return None


def prepare_timit(data_folder, save_folder, splits=SPLITS, exclude_sa=True, sample_rate=16000, hop_length=160):
    """Writes ``<split>.csv`` for the standard TIMIT protocol (see module doc).

    Arguments
    ---------
    data_folder : str
        TIMIT root (holding TRAIN/ and TEST/, either case) or its parent.
    save_folder : str
    splits : sequence of str
        Subset of train, dev, test.
    exclude_sa : bool
        Drop the SA1/SA2 dialect sentences (standard: True).
    sample_rate, hop_length : int
        16 kHz; 10 ms frames.
    """
    splits = list(splits)
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown TIMIT split {s!r}; choose from {SPLITS}")
    options = dict(
        data_folder=os.path.abspath(data_folder), splits=splits, exclude_sa=exclude_sa,
        sample_rate=sample_rate, hop_length=hop_length, version=3,
    )
    outputs = [os.path.join(save_folder, f"{s}.csv") for s in splits]
    if prep_is_done(save_folder, "timit_prep", options) and all(os.path.isfile(p) for p in outputs):
        logger.info(f"TIMIT already prepared in {save_folder}; skipping")
        return

    root, sets = find_timit_root(data_folder)
    report = SkipReport("timit")  # nothing is skipped (errors instead); converted files are listed
    rows = {s: [] for s in splits}
    unused = {"SA sentences": 0, "TEST speakers outside dev/core": 0}
    speakers = {s: set() for s in splits}
    first = {}  # file identity -> first path: an utterance reached twice (symlink, copy link) is an error
    for set_name in ("train", "test"):
        for speaker, sentence, wav in list_utterances(sets[set_name]):
            split = assign_split(set_name, speaker, sentence, exclude_sa)
            if split is None:
                unused["SA sentences" if sentence.startswith("SA") else "TEST speakers outside dev/core"] += 1
                continue
            if split not in rows:
                continue
            if first.setdefault(file_identity(wav), wav) != wav:
                raise TIMITError(
                    f"{wav}: the same file as {first[file_identity(wav)]} (a symlink or hard link); each TIMIT "
                    f"utterance must be in the corpus once, or it would be in two splits. Remove the link"
                )
            utt = read_utterance(wav, sample_rate, hop_length, convert_dir=os.path.join(save_folder, "converted"))
            if utt["note"]:
                report.note(os.path.abspath(wav), utt["note"])
            speakers[split].add(speaker)
            rows[split].append(dict(
                ID=f"{speaker}_{sentence}",
                duration=utt["duration"],
                wav=os.path.abspath(utt["wav"]),
                spk_id=speaker,
                n_samples=utt["n_samples"],
                segments=encode_segments(utt["segments"]),
                frame_labels=" ".join(utt["frame_labels"]),
            ))
    check_disjoint(rows)
    expected = {"dev": len(DEV_SPEAKERS), "test": len(CORE_TEST_SPEAKERS)}
    for split in splits:
        if not rows[split]:
            raise TIMITError(f"{root}: no utterance for the {split} split (check the corpus layout)")
        n_spk = len(speakers[split])
        if split in expected and n_spk != expected[split]:
            logger.warning(f"TIMIT {split}: {n_spk} speakers found, the standard set has {expected[split]}")
        write_manifest(rows[split], os.path.join(save_folder, f"{split}.csv"),
                       ["spk_id", "n_samples", "segments", "frame_labels"])
        logger.info(f"TIMIT {split}: {len(rows[split])} utterances, {n_spk} speakers")
    logger.info("TIMIT: not used: " + ", ".join(f"{n} {k}" for k, n in unused.items()))
    report.write(save_folder)
    mark_prep_done(save_folder, "timit_prep", options)
