"""Pretraining data prep: any folder of wav/flac, or a LibriSpeech root.

Writes ``train.csv`` / ``valid.csv`` (ID, duration, wav; + spk_id where every file's path names
its speaker the LibriSpeech way), the skip lists, and a
``converted/`` folder for files that had to be resampled or downmixed.
The LibriSpeech ASR recipe builds on :func:`collect_audio` (one prep, not two).
"""

import logging
import os
import random

from mgf_sb.data.audio import AUDIO_EXTENSIONS, check_many, scan_audio
from mgf_sb.data.manifest import SkipReport, check_disjoint, mark_prep_done, prep_is_done, write_manifest

logger = logging.getLogger(__name__)


def utterance_id(path, root):
    """Manifest ID: the path under ``root`` without extension (unique in any tree)."""
    rel = os.path.relpath(path, root)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def speaker_from_path(path):
    """The speaker a LibriSpeech-style path names, else None.

    LibriSpeech names a file ``<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac``: the file
    name's first ``-`` field is also one of its three parent folders (``<speaker>/<speaker>-<n>``
    too). Any other naming says nothing about the speaker.

    >>> speaker_from_path("train-clean-100/19/198/19-198-0001.flac"), speaker_from_path("a/b/take-1.wav")
    ('19', None)
    """
    parts = os.path.normpath(path).split(os.sep)
    name = os.path.splitext(parts[-1])[0]
    first = name.split("-")[0]
    return first if "-" in name and first and first in parts[-4:-1] else None


def collect_audio(data_folder, splits, save_folder, name, min_duration=0.0, max_duration=None,
                  sample_rate=16000, num_workers=1, extensions=AUDIO_EXTENSIONS, seen=None, log_skips=True):
    """Scans and checks the audio of some splits (subfolders) of ``data_folder``.

    Arguments
    ---------
    data_folder : str
        Corpus root.
    splits : list of str or None
        Subfolders to take (e.g. LibriSpeech's ``train-clean-100``); None or an
        empty list takes the whole folder.
    save_folder : str
        Where ``<name>_skipped.tsv`` and ``converted/`` go.
    name : str
        Manifest name (for the reports).
    seen : dict, optional
        Shared by the calls for several manifests (train, valid...): a file
        already taken by one of them is left out of this one and listed
        (see :func:`mgf_sb.data.audio.scan_audio`). Symlink loops and files
        reached twice are listed too, in ``<name>_skipped.tsv``.
    log_skips : bool
        Log the skip summary (False for a caller that adds its own skips to
        the list and logs the whole of it once).

    Returns
    -------
    list of dict
        Rows with ID, duration, wav (the file to read: original or converted),
        source (the original path).
    """
    roots = [data_folder] if not splits else [os.path.join(data_folder, s) for s in splits]
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        present = sorted(d for d in os.listdir(data_folder) if os.path.isdir(os.path.join(data_folder, d))) \
            if os.path.isdir(data_folder) else []
        raise FileNotFoundError(
            f"split folder(s) {missing} not found. Expected a LibriSpeech-style root "
            f"(<data_folder>/<split>/<speaker>/<chapter>/*.flac) with the splits named in the YAML; "
            f"{data_folder!r} contains {present or 'nothing (or does not exist)'}. "
            f"For a plain folder of audio set the splits to []"
        )
    report = SkipReport(name)
    seen = {} if seen is None else seen
    paths = [p for r in roots for p in scan_audio(r, extensions, report=report, seen=seen, split=name)]
    checks = check_many(
        paths, num_workers=num_workers, desc=f"checking {name} audio", sample_rate=sample_rate,
        min_duration=min_duration, max_duration=max_duration, convert_dir=os.path.join(save_folder, "converted"),
    )
    rows = []
    for c in checks:
        if not c.ok:
            report.add(c.source, c.reason)
            continue
        if c.note:
            report.note(c.source, c.note)
        rows.append({"ID": utterance_id(c.source, data_folder), "duration": c.duration, "wav": os.path.abspath(c.path),
                     "source": c.source})
    report.write(save_folder, log=log_skips)
    logger.info(f"{name}: {len(rows)} usable files, {len(report)} skipped, "
                f"{sum(r['duration'] for r in rows) / 3600:.2f} h")
    return rows


def prepare_pretraining(data_folder, save_folder, train_splits=None, valid_splits=None, valid_fraction=0.05,
                        min_duration=1.0, max_duration=None, sample_rate=16000, num_workers=1, seed=1234):
    """Builds the pretraining manifests (skipped when already built with the same options).

    Arguments
    ---------
    data_folder : str
        A LibriSpeech root or any folder of audio (searched recursively).
    save_folder : str
        Output folder for ``train.csv``, ``valid.csv`` and the reports.
    train_splits, valid_splits : list of str, optional
        Subfolders for training / validation. Without ``valid_splits`` a random
        ``valid_fraction`` of the training files is held out.
    min_duration : float
        Shorter files are skipped (the utterance scale cuts each crop in two).

    Raises
    ------
    ValueError
        When no usable audio is found: the message names the folder.
    """
    opts = dict(data_folder=os.path.abspath(data_folder), train_splits=train_splits, valid_splits=valid_splits,
                valid_fraction=valid_fraction, min_duration=min_duration, max_duration=max_duration,
                sample_rate=sample_rate, seed=seed)
    if prep_is_done(save_folder, "pretrain", opts):
        logger.info(f"pretraining manifests in {save_folder} are up to date; skipping preparation")
        return
    kw = dict(min_duration=min_duration, max_duration=max_duration, sample_rate=sample_rate,
              num_workers=num_workers)
    kw["seen"] = {}  # a file reached from both train and valid splits stays in train only
    train = collect_audio(data_folder, train_splits, save_folder, "train", **kw)
    if not train:
        raise ValueError(
            f"no usable audio in {data_folder!r} (splits {train_splits}): every file was missing, unreadable or "
            f"shorter than min_duration={min_duration} s; see {os.path.join(save_folder, 'train_skipped.tsv')}"
        )
    if valid_splits:
        valid = collect_audio(data_folder, valid_splits, save_folder, "valid", **kw)
    else:
        random.Random(seed).shuffle(train)
        n_valid = max(1, int(round(valid_fraction * len(train)))) if len(train) > 1 else 0
        valid, train = train[:n_valid], train[n_valid:]
    if not valid:
        raise ValueError(f"no usable validation audio in {data_folder!r} (splits {valid_splits})")
    check_disjoint({"train": train, "valid": valid}, key="source")
    # where the corpus names its speakers (LibriSpeech layout, every file): a spk_id column, which
    # the recipe only logs (utterance_same_speaker_negatives)
    speakers = [speaker_from_path(os.path.relpath(r["source"], data_folder)) for r in train + valid]
    extra = []
    if all(speakers):
        extra = ["spk_id"]
        for r, spk in zip(train + valid, speakers):
            r["spk_id"] = spk
    write_manifest(train, os.path.join(save_folder, "train.csv"), extra_columns=extra)
    write_manifest(valid, os.path.join(save_folder, "valid.csv"), extra_columns=extra)
    mark_prep_done(save_folder, "pretrain", opts)
