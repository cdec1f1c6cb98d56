"""VoxCeleb1 data preparation: identification split + verification trials.

Layout of the real corpus (both forms accepted)::

    <data_folder>/wav/<id1xxxx>/<youtube_id>/<nnnnn>.wav          # dev + test merged
    <data_folder>/vox1_dev_wav/wav/...  and  <data_folder>/vox1_test_wav/wav/...
    <data_folder>/iden_split.txt    "1|2|3 <id>/<video>/<file>.wav"  (train/dev/test)
    <data_folder>/veri_test2.txt    "<0|1> <enrol path> <test path>" (VoxCeleb1-O cleaned)

The meta files are at https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/ (or
give their paths with ``split_file`` / ``trial_file``).

Outputs in ``save_folder``: ``train.csv``, ``dev.csv``, ``test.csv`` (columns
``ID, duration, wav, spk_id``), ``veri_utts.csv`` (the audio the trials use),
``veri_trials.csv`` (``ID, label, enrol, test``), and skip reports
``voxceleb_skipped.tsv`` / ``voxceleb_trials_skipped.tsv``. Everything that
could fail mid-epoch is decided here: every file is decoded once; malformed
or non-UTF-8 lines, missing, unreadable (empty file, text named .wav, a
truncated FLAC stream), empty (zero samples), NaN/Inf, all-zero or too short
files and dev/test utterances of speakers without training data are skipped,
listed and counted; other sample rates and stereo files are converted to
16 kHz mono copies in ``<save_folder>/converted`` (listed in
``voxceleb_converted.tsv``); a truncated WAV keeps its readable part (its real
duration goes to the manifest).
"""

import logging
import os
import re

from mgf_sb.data.audio import check_many, file_identity
from mgf_sb.data.manifest import SkipReport, check_disjoint, mark_prep_done, prep_is_done, write_manifest

logger = logging.getLogger(__name__)

SPLITS = {"1": "train", "2": "dev", "3": "test"}
WAV_ROOTS = ("wav", "vox1_dev_wav/wav", "vox1_test_wav/wav", "dev/wav", "test/wav")
META_URL = "https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/"
_REL_PATH = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+\.wav$")


def find_wav_roots(data_folder, wav_folders=None):
    """The folders that hold ``<speaker>/<video>/<file>.wav``.

    Arguments
    ---------
    data_folder : str
    wav_folders : list of str, optional
        Explicit folders (absolute or relative to ``data_folder``); default:
        whichever of ``wav``, ``vox1_dev_wav/wav``, ``vox1_test_wav/wav``,
        ``dev/wav``, ``test/wav`` exist.

    Raises
    ------
    FileNotFoundError
        If none exists.
    """
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(f"data folder {data_folder!r} does not exist (check --data_folder)")
    candidates = wav_folders if wav_folders else WAV_ROOTS
    roots = [os.path.abspath(os.path.join(data_folder, c)) for c in candidates]
    found = [r for r in roots if os.path.isdir(r)]
    if not found:
        raise FileNotFoundError(
            f"no VoxCeleb1 audio folder in {data_folder!r}: expected one of "
            f"{', '.join(candidates)} holding <id1xxxx>/<youtube_id>/<nnnnn>.wav "
            f"(unpack vox1_dev_wav.zip and vox1_test_wav.zip there, or set --wav_folders)"
        )
    return found


def speaker_index(roots):
    """{speaker folder name: wav root} (a speaker found in two roots is an error)."""
    where = {}
    for root in roots:
        for spk in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, spk)):
                continue
            if spk in where:
                raise ValueError(
                    f"speaker {spk} is in both {where[spk]} and {root}: give one of them with --wav_folders"
                )
            where[spk] = root
    return where


def resolve(rel, where, roots):
    """Relative ``<spk>/<video>/<file>.wav`` -> absolute path, or None if missing."""
    root = where.get(rel.split("/", 1)[0])
    if root is not None:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
    return None


def _text_lines(path, skips):
    """Non-empty stripped lines of a meta file as (line number, text).

    A line that is not valid UTF-8 is listed in ``skips`` (with its bytes) and
    left out, instead of a UnicodeDecodeError or a silently mangled path.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                skips.add(f"{path}:{n}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} in {raw.strip()[:80]!r}); "
                                         "fix the file's encoding")
                continue
            if line:
                yield n, line


def read_split_file(path, skips):
    """Parses ``iden_split.txt``; malformed and duplicate lines go to ``skips``.

    Returns
    -------
    list of (split name, relative path)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"identification split file {path!r} not found: download iden_split.txt from {META_URL} "
            f"into the data folder (or pass --split_file=/path/to/iden_split.txt)"
        )
    entries, seen = [], set()
    for n, line in _text_lines(path, skips):
        fields = line.split()
        where = f"{path}:{n}"
        if len(fields) != 2 or fields[0] not in SPLITS or not _REL_PATH.match(fields[1]):
            skips.add(where, f"malformed split line ({line[:80]!r}; expected '1|2|3 <id>/<video>/<file>.wav')")
            continue
        if fields[1] in seen:
            skips.add(where, f"duplicate entry ({fields[1]} is listed earlier)")
            continue
        seen.add(fields[1])
        entries.append((SPLITS[fields[0]], fields[1]))
    if not entries:
        raise ValueError(f"{path}: no valid line (expected '1|2|3 <id>/<video>/<file>.wav' per line)")
    return entries


def read_trial_file(path, skips):
    """Parses ``veri_test2.txt``; returns [(label, enrol rel, test rel)]."""
    trials = []
    for n, line in _text_lines(path, skips):
        fields = line.split()
        if (len(fields) != 3 or fields[0] not in ("0", "1")
                or not _REL_PATH.match(fields[1]) or not _REL_PATH.match(fields[2])):
            skips.add(f"{path}:{n}", f"malformed trial line ({line[:80]!r}; expected '0|1 <enrol>.wav <test>.wav')")
            continue
        trials.append((int(fields[0]), fields[1], fields[2]))
    return trials


def utt_id(rel):
    """``id10001/1zcIwhmdeo4/00001.wav`` -> ``id10001/1zcIwhmdeo4/00001``."""
    return rel[: -len(".wav")]


def prepare_voxceleb(
    data_folder,
    save_folder,
    split_file=None,
    trial_file=None,
    wav_folders=None,
    exclude_trial_speakers=False,
    min_duration=0.5,
    max_duration=None,
    sample_rate=16000,
    num_workers=1,
    skip_prep=False,
):
    """Writes the SID manifests and the verification trial list.

    Arguments
    ---------
    data_folder : str
        VoxCeleb1 root (see the module docstring for the layouts).
    save_folder : str
        Where manifests and skip reports go.
    split_file : str, optional
        ``iden_split.txt`` (default: ``<data_folder>/iden_split.txt``).
    trial_file : str, optional
        ``veri_test2.txt`` (default: ``<data_folder>/veri_test2.txt`` if it
        exists; without it no trial list is written).
    wav_folders : list of str, optional
        Audio roots (see :func:`find_wav_roots`).
    exclude_trial_speakers : bool
        Drop the trial speakers from the identification manifests, so that a
        model trained on them can be verified on unseen speakers (the
        VoxCeleb1-O protocol trains on the 1,211 dev speakers only).
    min_duration, max_duration : float
        Seconds; files outside are skipped (listed).
    sample_rate : int
        Files at other rates are resampled into ``<save_folder>/converted``.
    num_workers : int
        Processes for decoding the files.
    skip_prep : bool

    Returns
    -------
    dict
        Counts (utterances per split, speakers, trials, skipped).
    """
    if skip_prep:
        return None
    split_file = split_file or os.path.join(data_folder, "iden_split.txt")
    if trial_file is None and os.path.isfile(os.path.join(data_folder, "veri_test2.txt")):
        trial_file = os.path.join(data_folder, "veri_test2.txt")
    if trial_file and not os.path.isfile(trial_file):
        raise FileNotFoundError(
            f"verification trial file {trial_file!r} not found: download veri_test2.txt from {META_URL} "
            f"(or set --trial_file=null to skip verification)"
        )
    options = dict(data_folder=os.path.abspath(data_folder), split_file=os.path.abspath(split_file),
                   trial_file=trial_file and os.path.abspath(trial_file), wav_folders=wav_folders,
                   exclude_trial_speakers=bool(exclude_trial_speakers), min_duration=min_duration,
                   max_duration=max_duration, sample_rate=sample_rate)
    if prep_is_done(save_folder, "voxceleb", options):
        logger.info(f"VoxCeleb1 manifests in {save_folder} are up to date; skipping preparation")
        return None

    roots = find_wav_roots(data_folder, wav_folders)
    where = speaker_index(roots)
    logger.info(f"VoxCeleb1 audio roots: {', '.join(roots)} ({len(where)} speakers)")
    skips = SkipReport("voxceleb")
    trial_skips = SkipReport("voxceleb_trials")
    entries = read_split_file(split_file, skips)
    trials = read_trial_file(trial_file, trial_skips) if trial_file else []
    trial_speakers = {r.split("/", 1)[0] for _, e, t in trials for r in (e, t)}

    # Resolve every path, then decode each file once (identification + trial audio).
    needed = {}  # relative path -> absolute path
    first = {}  # file identity -> the first relative path leading to it (symlinks, hard links)
    for split, rel in entries:
        path = resolve(rel, where, roots)
        if path is None:
            skips.add(os.path.join(data_folder, "wav", rel),
                      f"missing (listed in {os.path.basename(split_file)}, not found under {' or '.join(roots)})")
            continue
        key = file_identity(path)
        if first.setdefault(key, rel) != rel:  # one file, two entries: it would be in two splits
            skips.add(path, f"duplicate (the same file as {first[key]}: a symlink or hard link); kept once")
            continue
        needed[rel] = path
    for _, e, t in trials:
        for rel in (e, t):
            if rel not in needed:
                path = resolve(rel, where, roots)
                if path is not None:
                    needed[rel] = path
    rels = sorted(needed)
    checks = check_many([needed[r] for r in rels], num_workers=num_workers, desc="checking VoxCeleb1 audio",
                        sample_rate=sample_rate, min_duration=min_duration, max_duration=max_duration,
                        convert_dir=os.path.join(save_folder, "converted"))
    checked = dict(zip(rels, checks))
    usable = {}
    for rel, chk in checked.items():
        if chk.ok:
            usable[rel] = chk
            if chk.note:
                skips.note(chk.source, chk.note)

    # Identification manifests.
    rows = {s: [] for s in SPLITS.values()}
    for split, rel in entries:
        if rel not in needed:
            continue  # missing, already listed
        chk = checked[rel]
        if not chk.ok:
            skips.add(needed[rel], chk.reason)
            continue
        spk = rel.split("/", 1)[0]
        if exclude_trial_speakers and spk in trial_speakers:
            continue
        rows[split].append(dict(ID=utt_id(rel), duration=chk.duration, wav=chk.path, spk_id=spk))
    train_speakers = {r["spk_id"] for r in rows["train"]}
    if len(train_speakers) < 2:
        raise ValueError(
            f"{split_file}: {len(rows['train'])} usable training utterances from {len(train_speakers)} speakers "
            f"(need at least 2 speakers); see {os.path.join(save_folder, 'voxceleb_skipped.tsv')}"
        )
    for split in ("dev", "test"):
        kept = []
        for r in rows[split]:
            if r["spk_id"] in train_speakers:
                kept.append(r)
            else:
                skips.add(r["wav"], f"speaker not in the training split ({r['spk_id']} has no usable train utterance)")
        rows[split] = kept
    check_disjoint(rows)
    for split, split_rows in rows.items():
        write_manifest(split_rows, os.path.join(save_folder, f"{split}.csv"), extra_columns=["spk_id"])
    skips.write(save_folder)

    # Verification trials: both sides must be usable audio.
    counts = {s: len(r) for s, r in rows.items()}
    counts.update(speakers=len(train_speakers), skipped=len(skips))
    if trial_file:
        kept, utts = [], {}
        for n, (label, e, t) in enumerate(trials):
            bad = [r for r in (e, t) if r not in usable]
            if bad:
                why = checked[bad[0]].reason if bad[0] in checked else "missing"
                trial_skips.add(f"{label} {e} {t}", f"trial audio unusable ({bad[0]}: {why})")
                continue
            kept.append(dict(ID=f"trial{n:06d}", label=label, enrol=utt_id(e), test=utt_id(t)))
            for r in (e, t):
                utts[r] = dict(ID=utt_id(r), duration=usable[r].duration, wav=usable[r].path, spk_id=r.split("/")[0])
        trial_skips.write(save_folder)
        if not kept or len({k["label"] for k in kept}) < 2:
            raise ValueError(f"{trial_file}: need usable target and non-target trials, got {len(kept)} trials "
                             f"(see {os.path.join(save_folder, 'voxceleb_trials_skipped.tsv')})")
        write_manifest([utts[r] for r in sorted(utts)], os.path.join(save_folder, "veri_utts.csv"),
                       extra_columns=["spk_id"])
        _write_trials(kept, os.path.join(save_folder, "veri_trials.csv"))
        counts.update(trials=len(kept), trials_skipped=len(trial_skips))
    else:
        for name in ("veri_utts.csv", "veri_trials.csv"):
            if os.path.exists(os.path.join(save_folder, name)):
                os.remove(os.path.join(save_folder, name))
    logger.info(f"VoxCeleb1 prepared: {counts}")
    mark_prep_done(save_folder, "voxceleb", options)
    return counts


def _write_trials(trials, path):
    import csv

    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["ID", "label", "enrol", "test"])
        w.writeheader()
        w.writerows(trials)
    os.replace(tmp, path)
