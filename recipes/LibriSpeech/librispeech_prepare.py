"""LibriSpeech data preparation for the CTC recipe.

Layout (the real corpus and the bundled sample alike)::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

The audio is scanned, checked and (if needed) converted by the pretraining
prep's :func:`mgf_sb.data.prepare_audio.collect_audio` (one prep, not two);
this module adds the transcripts. Everything that cannot be used is decided
here, at prep time, skipped, listed in ``<name>_skipped.tsv`` and counted in
the log:

- audio that cannot be used (:func:`mgf_sb.data.audio.check_audio`): an empty
  file, a text file named .flac/.wav, a truncated FLAC stream (unreadable),
  zero samples, NaN/Inf samples, only zeros; other sample rates and stereo
  files are converted to 16 kHz mono copies (``converted/``, listed in
  ``<name>_converted.tsv``); a truncated WAV keeps its readable part;
- audio without a transcript line, transcript lines without audio, malformed,
  non-UTF-8 or duplicated transcript lines, empty transcripts;
- transcripts with characters outside ``alphabet`` (the message names them);
- once the tokenizer exists (:func:`filter_for_ctc`): transcripts the tokenizer
  maps to ``<unk>``, and utterances too short for their label sequence under
  CTC at the upstream's frame rate (listed in ``<name>_ctc_skipped.tsv``).

Outputs (in ``save_folder``): ``train.csv``, ``valid.csv`` and one
``<test split>.csv`` per test split (columns ID, duration, wav, spk_id, wrd).
"""

import csv
import logging
import math
import os

from mgf_sb.data.audio import scan_audio, walk_unique
from mgf_sb.data.manifest import (
    SkipReport,
    check_disjoint,
    mark_prep_done,
    prep_is_done,
    read_manifest,
    read_skip_list as _read_skip_list,
    write_manifest,
)
from mgf_sb.data.prepare_audio import collect_audio

logger = logging.getLogger(__name__)

COLUMNS = ["spk_id", "wrd"]
TRANSCRIPT_SUFFIX = ".trans.txt"


def normalize_text(text, uppercase=True):
    """Collapses whitespace (and upper-cases, as LibriSpeech's transcripts are)."""
    text = " ".join(text.split())
    return text.upper() if uppercase else text


def outside_alphabet(text, alphabet):
    """Sorted characters of ``text`` (spaces excepted) that are not in ``alphabet``."""
    allowed = set(alphabet) | {" "}
    return sorted(set(c for c in text if c not in allowed))


def read_transcripts(roots, report, uppercase=True):
    """Reads every ``*.trans.txt`` under ``roots``.

    Returns
    -------
    dict
        utterance ID -> (text, transcript file, line number). Malformed and
        duplicated lines are added to ``report`` (as ``file:line``).
    """
    entries = {}
    for root in roots:
        for dirpath, dirs, files in walk_unique(root):  # symlink loops end, each folder read once
            for name in files:
                if not name.endswith(TRANSCRIPT_SUFFIX):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    for lineno, raw in enumerate(f, 1):
                        where = f"{path}:{lineno}"
                        try:
                            line = raw.decode("utf-8")
                        except UnicodeDecodeError as e:  # listed; its audio is then 'without a transcript'
                            report.add(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} in "
                                              f"{raw.strip()[:60]!r}); fix the file's encoding")
                            continue
                        if not line.strip():
                            continue
                        parts = line.strip().split(None, 1)
                        if len(parts) < 2:
                            report.add(where, f"empty or malformed transcript line ({line.strip()[:60]!r})")
                            continue
                        utt, text = parts
                        if utt in entries:
                            report.add(where, f"duplicate transcript line (first at {entries[utt][1]}:{entries[utt][2]})")
                            continue
                        entries[utt] = (normalize_text(text, uppercase), path, lineno)
    return entries


def prepare_split(data_folder, splits, save_folder, name, alphabet, uppercase=True, **audio_kwargs):
    """Audio + transcripts of some splits -> ``<name>.csv`` rows.

    The audio checks come from :func:`collect_audio`; its skip list and the
    transcript problems found here end up together in ``<name>_skipped.tsv``.

    Returns
    -------
    list of dict
        Rows with ID, duration, wav, spk_id, wrd.
    """
    roots = [os.path.join(data_folder, s) for s in splits]
    # the audio checks' skips are logged once, with the transcript checks', by report.write below
    audio_rows = collect_audio(data_folder, splits, save_folder, name, log_skips=False, **audio_kwargs)
    report = SkipReport(name)
    for path, reason in _read_skip_list(os.path.join(save_folder, f"{name}_skipped.tsv")):
        report.add(path, reason)  # the audio checks' own skips (unreadable, empty, ...)

    transcripts = read_transcripts(roots, report, uppercase)
    all_audio = {os.path.splitext(os.path.basename(p))[0] for r in roots for p in scan_audio(r, seen={})}
    rows = []
    for row in audio_rows:
        utt = os.path.splitext(os.path.basename(row["source"]))[0]
        if utt not in transcripts:
            chapter = "-".join(utt.split("-")[:2])
            report.add(row["source"], f"audio without a transcript (no line '{utt} ...' in "
                                      f"{os.path.join(os.path.dirname(row['source']), chapter + TRANSCRIPT_SUFFIX)})")
            continue
        text, tpath, lineno = transcripts[utt]
        bad = outside_alphabet(text, alphabet)
        if bad:
            report.add(row["source"], f"characters outside the alphabet ({' '.join(repr(c) for c in bad)} in "
                                      f"{tpath}:{lineno}; add them to `alphabet` in the YAML or fix the transcript)")
            continue
        rows.append({"ID": utt, "duration": row["duration"], "wav": row["wav"], "spk_id": utt.split("-")[0],
                     "wrd": text, "source": row["source"]})
    for utt, (text, tpath, lineno) in sorted(transcripts.items()):
        if utt not in all_audio:
            report.add(f"{tpath}:{lineno}", f"transcript line without audio (no {utt}.flac or .wav next to it)")
    report.write(save_folder)
    logger.info(f"{name}: {len(rows)} transcribed utterances, {len(report)} skipped (see {name}_skipped.tsv)")
    return rows


def prepare_librispeech(data_folder, save_folder, train_splits=("train-clean-100",), valid_splits=("dev-clean",),
                        test_splits=("test-clean", "test-other"), alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ'",
                        uppercase=True, min_duration=0.0, max_duration=None, sample_rate=16000, num_workers=1):
    """Writes ``train.csv``, ``valid.csv`` and ``<test split>.csv`` (skipped when up to date).

    Arguments
    ---------
    data_folder : str
        The LibriSpeech root (holding the split folders).
    save_folder : str
        Where the manifests and the skip lists go.
    train_splits, valid_splits : list of str
        Split folders concatenated into ``train.csv`` / ``valid.csv``; a missing
        one is an error.
    test_splits : list of str
        Each present one gets its own manifest; missing ones are left out with
        a warning (``test-other`` is optional).
    alphabet : str
        Allowed transcript characters besides the space.

    Returns
    -------
    list of str
        The test splits that were prepared.

    Raises
    ------
    FileNotFoundError
        A train/valid split folder is missing (the message lists what is there).
    ValueError
        A train/valid/test split has no usable utterance (names the skip list).
    """
    present_tests = [s for s in test_splits if os.path.isdir(os.path.join(data_folder, s))]
    for s in test_splits:
        if s not in present_tests:
            logger.warning(f"test split {s!r} not found in {data_folder}; it is left out")
    opts = dict(data_folder=os.path.abspath(data_folder), train_splits=list(train_splits),
                valid_splits=list(valid_splits), test_splits=present_tests, alphabet=alphabet, uppercase=uppercase,
                min_duration=min_duration, max_duration=max_duration, sample_rate=sample_rate)
    if prep_is_done(save_folder, "librispeech", opts):
        logger.info(f"LibriSpeech manifests in {save_folder} are up to date; skipping preparation")
        return present_tests
    # seen: a file reached from two manifests (a symlink, a split listed twice) stays in the first only
    kw = dict(alphabet=alphabet, uppercase=uppercase, min_duration=min_duration, max_duration=max_duration,
              sample_rate=sample_rate, num_workers=num_workers, seen={})
    jobs = [("train", list(train_splits)), ("valid", list(valid_splits))] + [(s, [s]) for s in present_tests]
    manifests = {}
    for name, splits in jobs:
        rows = prepare_split(data_folder, splits, save_folder, name, **kw)
        if not rows:
            raise ValueError(f"no usable utterance in {data_folder!r} for {name} (splits {splits}); see "
                             f"{os.path.join(save_folder, name + '_skipped.tsv')}")
        manifests[name] = rows
    check_disjoint(manifests, key="source")
    for name, rows in manifests.items():
        write_manifest(rows, os.path.join(save_folder, f"{name}.csv"), COLUMNS)
    mark_prep_done(save_folder, "librispeech", opts)
    return present_tests


def ctc_min_frames(token_ids):
    """Frames CTC needs for a label sequence: one per token, plus a blank
    between each pair of equal consecutive tokens."""
    repeats = sum(1 for a, b in zip(token_ids, token_ids[1:]) if a == b)
    return len(token_ids) + repeats, repeats


def filter_for_ctc(csv_path, out_path, encode, frame_rate, unk_id=0, report_folder=None, name=None):
    """Keeps the utterances CTC can learn from with this tokenizer and upstream.

    Skipped (listed in ``<name>_ctc_skipped.tsv`` and counted): transcripts
    with tokens the tokenizer does not know (``unk_id``), and utterances with
    fewer upstream frames than their label sequence needs
    (:func:`ctc_min_frames`). Frames are counted conservatively as
    ``floor(duration * frame_rate)`` (the upstream yields at least that many).

    Arguments
    ---------
    csv_path, out_path : str
        Manifest in, filtered manifest out.
    encode : callable
        text -> list of token ids.
    frame_rate : float
        Upstream frames per second.

    Returns
    -------
    (int, int)
        Kept and skipped counts.
    """
    name = name or os.path.splitext(os.path.basename(out_path))[0]
    report = SkipReport(name)
    kept = []
    rows = read_manifest(csv_path)
    for row in rows:
        ids = list(encode(row["wrd"]))
        if unk_id is not None and unk_id in ids:
            report.add(row["wav"], f"tokens outside the tokenizer's vocabulary ({row['ID']}: {row['wrd']!r}; "
                                   f"the training transcripts never use some of its characters)")
            continue
        needed, repeats = ctc_min_frames(ids)
        frames = int(math.floor(float(row["duration"]) * frame_rate + 1e-6))
        if frames < needed:
            report.add(row["wav"], f"too short for CTC ({row['ID']}: {frames} frames at {frame_rate:g} Hz < "
                                   f"{len(ids)} tokens + {repeats} repeats)")
            continue
        kept.append(row)
    extra = [c for c in (list(rows[0].keys()) if rows else COLUMNS) if c not in ("ID", "duration", "wav")]
    write_manifest(kept, out_path, extra)
    report.write(report_folder or os.path.dirname(os.path.abspath(out_path)))
    return len(kept), len(report)


def read_skip_list(folder, name):
    """The ``(path, reason)`` pairs of ``<name>_skipped.tsv`` (for tests and summaries)."""
    return _read_skip_list(os.path.join(folder, f"{name}_skipped.tsv"))


if __name__ == "__main__":  # a quick look: python librispeech_prepare.py <data_folder> <save_folder>
    import sys

    logging.basicConfig(level=logging.INFO)
    prepare_librispeech(sys.argv[1], sys.argv[2])
    for p in sorted(os.listdir(sys.argv[2])):
        if p.endswith(".csv"):
            with open(os.path.join(sys.argv[2], p), newline="", encoding="utf-8") as f:
                print(p, sum(1 for _ in csv.reader(f)) - 1, "rows")
