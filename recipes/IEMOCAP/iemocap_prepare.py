"""IEMOCAP data preparation: 4-class emotion, leave-one-session-out.

Reads the release as distributed (``IEMOCAP_full_release``)::

    <data_folder>/Session{1..5}/sentences/wav/<dialog>/<utt>.wav
    <data_folder>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt

where each evaluation file has one summary line per utterance::

    [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]

Classes (the usual 4-class protocol): neutral (``neu``), happy (``hap`` and
``exc`` merged), angry (``ang``), sad (``sad``); every other label (``fru``,
``sur``, ``fea``, ``dis``, ``oth``, ``xxx``) is dropped and counted.

Splits: the ``test_session`` is the test set; validation is one more held-out
session (``valid_session``, by default the next one, cyclically: test 5 ->
valid 1), or, with ``valid_session: none``, a fraction of the training
*dialogs* (so that no dialog is in both train and valid). Everything else
trains.

Bad input is decided here, before any training:

- a wrong ``data_folder`` (no ``Session1..5``): error saying which layout was expected;
- a dialog folder with no ``EmoEvaluation`` file (or the reverse): error naming the file;
- a malformed or non-UTF-8 summary line, a label without audio, audio without a
  label, an unreadable wav (empty file, text named .wav, truncated FLAC stream),
  one with zero samples, NaN/Inf samples or only zeros, a duplicated utterance
  ID: the utterance is skipped, listed in ``iemocap_skipped.tsv`` (path,
  reason) and counted in the log;
- other sample rates and stereo files are converted to 16 kHz mono copies
  (``<manifest_folder>/converted``, listed in ``iemocap_converted.tsv``); a
  truncated WAV keeps its readable part (its real duration in the manifest).

Decoding every file is the slow part; it is done once into
``<manifest_folder>/iemocap_all.csv`` and reused by every fold (re-done only
when the data options change). The per-fold ``train/valid/test.csv`` are cheap.
"""

import logging
import os
import random
import re
from collections import Counter, OrderedDict

from mgf_sb.data.audio import check_many, file_identity
from mgf_sb.data.manifest import (
    SkipReport,
    check_disjoint,
    mark_prep_done,
    prep_is_done,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

SESSIONS = (1, 2, 3, 4, 5)
# Class names in index order (labels.txt, confusion matrices, head outputs).
CLASSES = ("neutral", "happy", "angry", "sad")
LABEL_MAP = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
# Labels of the release that the 4-class protocol drops (counted, not errors).
DROPPED_LABELS = ("fru", "sur", "fea", "dis", "oth", "xxx")

EXPECTED_LAYOUT = (
    "expected the IEMOCAP release layout: <data_folder>/Session{1..5}/sentences/wav/<dialog>/<utt>.wav "
    "and <data_folder>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt (point --data_folder at the "
    "IEMOCAP_full_release folder)"
)
SUMMARY_LINE = re.compile(
    r"^\[\s*(?P<start>\d+(?:\.\d+)?)\s*-\s*(?P<end>\d+(?:\.\d+)?)\s*\]\t(?P<utt>\S+)\t(?P<label>\S+)\t\[(?P<vad>[^\]]*)\]\s*$"
)
COLUMNS = ["emo", "raw_label", "session", "speaker", "dialog", "improvised"]


class IEMOCAPLayoutError(FileNotFoundError):
    """The data folder is not an IEMOCAP release (message says what was expected)."""


def session_folder(data_folder, session):
    return os.path.join(data_folder, f"Session{session}")


def check_layout(data_folder):
    """Raises :class:`IEMOCAPLayoutError` unless all five sessions are there."""
    if not os.path.isdir(data_folder):
        raise IEMOCAPLayoutError(f"data folder {data_folder!r} does not exist; {EXPECTED_LAYOUT}")
    problems = []
    for s in SESSIONS:
        for sub in (("sentences", "wav"), ("dialog", "EmoEvaluation")):
            path = os.path.join(session_folder(data_folder, s), *sub)
            if not os.path.isdir(path):
                problems.append(path)
    if problems:
        shown = ", ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        raise IEMOCAPLayoutError(f"{data_folder!r} is not an IEMOCAP release: missing {shown}; {EXPECTED_LAYOUT}")


def parse_emo_evaluation(path, dialog, skipped):
    """Summary lines of one ``EmoEvaluation/<dialog>.txt``.

    Lines starting with ``[`` are summary lines; the per-evaluator lines
    (``C-E1:``, ``A-E2:``...) and the header are ignored. A summary line that
    does not parse, or whose utterance is not from ``dialog``, is listed in
    ``skipped`` and ignored.

    Returns
    -------
    OrderedDict
        utterance ID -> raw label (``neu``, ``exc``...).
    """
    labels = OrderedDict()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.startswith(b"["):
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.add(f"{path}:{n}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} in "
                                           f"{raw.strip()[:80]!r}); fix the file's encoding")
                continue
            m = SUMMARY_LINE.match(line.rstrip("\r\n"))
            if m is None:
                skipped.add(f"{path}:{n}", f"malformed annotation line ({line.strip()[:80]!r})")
                continue
            utt, label = m.group("utt"), m.group("label").lower()
            if not utt.startswith(dialog + "_"):
                skipped.add(f"{path}:{n}", f"malformed annotation line (utterance {utt} is not from dialog {dialog})")
                continue
            if utt in labels:
                skipped.add(f"{path}:{n}", f"duplicated utterance (second label for {utt})")
                continue
            labels[utt] = label
    return labels


def speaker_of(utt):
    """``Ses01F_impro01_M003`` -> ``Ses01M`` (the speaking actor)."""
    return utt[:5] + utt.rsplit("_", 1)[1][0]


def collect_utterances(data_folder, sessions=SESSIONS, improvised_only=False):
    """Pairs labels with audio for the given sessions (no decoding).

    Returns
    -------
    items : list of dict
        One per utterance with a 4-class label and audio: ID, wav, emo,
        raw_label, session, speaker, dialog, improvised.
    dropped : Counter
        Raw labels outside the 4 classes (``fru``: 1849, ...).
    skipped : SkipReport
        Malformed lines, labels without audio, audio without labels.
    """
    check_layout(data_folder)
    skipped = SkipReport("iemocap")
    dropped = Counter()
    items = []
    for s in sessions:
        wav_root = os.path.join(session_folder(data_folder, s), "sentences", "wav")
        emo_root = os.path.join(session_folder(data_folder, s), "dialog", "EmoEvaluation")
        wav_dialogs = sorted(d for d in os.listdir(wav_root) if os.path.isdir(os.path.join(wav_root, d))
                             and not d.startswith("."))
        emo_files = sorted(f[:-4] for f in os.listdir(emo_root) if f.endswith(".txt") and not f.startswith("."))
        for d in wav_dialogs:
            if d not in emo_files:
                raise FileNotFoundError(
                    f"missing annotation file {os.path.join(emo_root, d + '.txt')} for the audio in "
                    f"{os.path.join(wav_root, d)}: restore it from the IEMOCAP release (or remove that dialog folder)"
                )
        for d in emo_files:
            if d not in wav_dialogs:
                raise FileNotFoundError(
                    f"missing audio folder {os.path.join(wav_root, d)} for the labels in "
                    f"{os.path.join(emo_root, d + '.txt')}: restore it from the IEMOCAP release "
                    f"(or remove that annotation file)"
                )
        if not wav_dialogs:
            raise IEMOCAPLayoutError(f"no dialog folder in {wav_root}; {EXPECTED_LAYOUT}")
        for d in wav_dialogs:
            improvised = "_impro" in d
            if improvised_only and not improvised:
                continue
            labels = parse_emo_evaluation(os.path.join(emo_root, d + ".txt"), d, skipped)
            dialog_dir = os.path.join(wav_root, d)
            wavs = {}
            for f in sorted(os.listdir(dialog_dir)):
                if f.startswith("."):  # macOS "._x.wav" metadata files of some copies
                    continue
                if f.lower().endswith(".wav"):
                    wavs[f[:-4]] = os.path.join(dialog_dir, f)
            for utt in wavs:
                if utt not in labels:
                    skipped.add(wavs[utt], "audio without a label (no summary line in "
                                           f"{os.path.join(emo_root, d + '.txt')})")
            for utt, raw in labels.items():
                if utt not in wavs:
                    skipped.add(os.path.join(dialog_dir, utt + ".wav"),
                                f"label without audio ({raw} in {os.path.join(emo_root, d + '.txt')})")
                    continue
                if raw not in LABEL_MAP:
                    dropped[raw] += 1
                    continue
                items.append(dict(ID=utt, wav=wavs[utt], emo=LABEL_MAP[raw], raw_label=raw, session=s,
                                  speaker=speaker_of(utt), dialog=d, improvised=int(improvised)))
    unknown = sorted(set(dropped) - set(DROPPED_LABELS))
    if unknown:
        logger.warning(f"IEMOCAP: unexpected emotion labels {unknown} (dropped like the other non-4-class labels)")
    return items, dropped, skipped


def split_fold(items, test_session, valid_session="next", valid_fraction=0.2, seed=1986):
    """Leave-one-session-out split.

    Arguments
    ---------
    items : list of dict
        With ``session`` and ``dialog``.
    test_session : int
    valid_session : int, "next" or "none"
        A held-out training session (``next``: test_session + 1, cyclically),
        or ``none``: ``valid_fraction`` of the training dialogs (seeded).

    Returns
    -------
    dict
        ``train`` / ``valid`` / ``test`` lists.
    """
    test_session = int(test_session)
    if test_session not in SESSIONS:
        raise ValueError(f"test_session must be one of {SESSIONS}, got {test_session}")
    vs = str(valid_session).lower()
    split = {"train": [], "valid": [], "test": []}
    if vs in ("none", "null", "fraction"):
        dialogs = sorted({it["dialog"] for it in items if int(it["session"]) != test_session})
        rng = random.Random(seed)
        rng.shuffle(dialogs)
        n_valid = max(1, int(round(valid_fraction * len(dialogs)))) if dialogs else 0
        valid_dialogs = set(dialogs[:n_valid])
        for it in items:
            if int(it["session"]) == test_session:
                split["test"].append(it)
            else:
                split["valid" if it["dialog"] in valid_dialogs else "train"].append(it)
        return split
    v = test_session % 5 + 1 if vs == "next" else int(valid_session)
    if v not in SESSIONS or v == test_session:
        raise ValueError(f"valid_session must be a session other than the test session {test_session}, "
                         f"'next' or 'none'; got {valid_session}")
    for it in items:
        s = int(it["session"])
        split["test" if s == test_session else "valid" if s == v else "train"].append(it)
    return split


def prepare_iemocap(
    data_folder,
    manifest_folder,
    split_folder,
    test_session=5,
    valid_session="next",
    valid_fraction=0.2,
    improvised_only=False,
    min_duration=0.0,
    max_duration=None,
    sample_rate=16000,
    num_workers=1,
    seed=1986,
):
    """Writes ``<split_folder>/{train,valid,test}.csv`` for one fold.

    Arguments
    ---------
    data_folder : str
        ``IEMOCAP_full_release``.
    manifest_folder : str
        Where the checked list of every usable utterance (shared by the five
        folds), the skip report and the converted copies go.
    split_folder : str
        Where this fold's manifests go.
    test_session, valid_session, valid_fraction : see :func:`split_fold`.
    improvised_only : bool
        Keep only the improvised dialogs (``*_impro*``).
    min_duration, max_duration : float
        Seconds; utterances outside are skipped (listed). Utterances shorter than
        :data:`mgf_sb.data.audio.MIN_AUDIO_SECONDS` (25 ms, the shortest input
        inference accepts) are always skipped, whatever ``min_duration`` says
        (:func:`mgf_sb.data.audio.check_audio`).

    Returns
    -------
    dict
        Counts: per split and class, dropped labels, skipped utterances.
    """
    data_opts = dict(data_folder=os.path.abspath(data_folder), improvised_only=bool(improvised_only),
                     min_duration=min_duration, max_duration=max_duration, sample_rate=sample_rate)
    all_csv = os.path.join(manifest_folder, "iemocap_all.csv")
    report_path = os.path.join(manifest_folder, "iemocap_prep.json")
    if prep_is_done(manifest_folder, "iemocap_all", data_opts) and os.path.isfile(all_csv):
        logger.info(f"IEMOCAP: reusing the checked utterance list {all_csv}")
        items = read_manifest(all_csv)
        import json

        with open(report_path) as f:
            report = json.load(f)
    else:
        items, dropped, skipped = collect_utterances(data_folder, improvised_only=improvised_only)
        first, unique = {}, []
        for it in items:  # one audio file reached under two names (symlink, hard link): kept once
            key = file_identity(it["wav"])
            if first.setdefault(key, it["wav"]) != it["wav"]:
                skipped.add(it["wav"], f"duplicate (the same file as {first[key]}: a symlink or hard link); kept once")
                continue
            unique.append(it)
        items = unique
        checks = check_many([it["wav"] for it in items], num_workers=num_workers, desc="IEMOCAP: checking audio",
                            sample_rate=sample_rate, min_duration=min_duration, max_duration=max_duration,
                            convert_dir=os.path.join(manifest_folder, "converted"))
        kept = []
        for it, c in zip(items, checks):
            if not c.ok:
                skipped.add(it["wav"], c.reason)
                continue
            if c.note:
                skipped.note(it["wav"], c.note)
            kept.append(dict(it, wav=c.path, duration=c.duration))
        items = kept
        if not items:
            raise RuntimeError(f"IEMOCAP: no usable utterance in {data_folder} (see "
                               f"{os.path.join(manifest_folder, 'iemocap_skipped.tsv')}); {EXPECTED_LAYOUT}")
        skipped.write(manifest_folder)
        report = {
            "classes": list(CLASSES),
            "kept": len(items),
            "kept_per_class": dict(Counter(it["emo"] for it in items)),
            "dropped_labels": dict(dropped),
            "dropped": sum(dropped.values()),
            "skipped": len(skipped),
            "skipped_reasons": dict(skipped.counts()),
            "converted": len(skipped.notes),
        }
        logger.info(f"IEMOCAP: {report['kept']} utterances in 4 classes {report['kept_per_class']}; "
                    f"dropped {report['dropped']} with other labels {report['dropped_labels']}; "
                    f"skipped {report['skipped']} (listed in {os.path.join(manifest_folder, 'iemocap_skipped.tsv')})")
        write_manifest(items, all_csv, extra_columns=COLUMNS)
        import json

        with open(report_path, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        mark_prep_done(manifest_folder, "iemocap_all", data_opts)

    split = split_fold(items, test_session, valid_session, valid_fraction, seed)
    check_disjoint(split)
    for name, rows in split.items():
        if not rows:
            raise RuntimeError(
                f"IEMOCAP fold test_session={test_session}: the {name} set is empty "
                f"(valid_session={valid_session}, improvised_only={improvised_only}); check {data_folder}"
            )
        write_manifest(rows, os.path.join(split_folder, f"{name}.csv"), extra_columns=COLUMNS)
    counts = {name: dict(Counter(r["emo"] for r in rows)) for name, rows in split.items()}
    for name, c in counts.items():
        logger.info(f"IEMOCAP fold {test_session}: {name} {sum(c.values())} utterances {c}")
    return dict(report, splits=counts)
