"""Audio scanning and validation shared by every ``*_prepare.py``.

Decided at prep time, never mid-epoch: every file is decoded once; files that
cannot be used are skipped with a reason, files in another format are
converted (downmixed / resampled) into a cache folder, and the manifest points
at audio the training loop can read as 16 kHz mono without surprises.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import soundfile as sf
import torch

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac")
# The shortest audio any recipe keeps and inference accepts: one 25 ms analysis window
# (400 samples at 16 kHz). check_audio never keeps a shorter file, whatever min_duration says.
MIN_AUDIO_SECONDS = 0.025


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the fix."""


def file_identity(path):
    """(device, inode) of the file ``path`` leads to (symlinks followed; hard links alike)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if st.st_ino == 0:  # a filesystem without inode numbers: compare resolved paths
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def walk_unique(folder, report=None):
    """``os.walk(folder, followlinks=True)`` that enters each real folder once.

    A folder reached again through a symlink (a loop such as ``a/up -> ..``, or
    two links to one folder) is not scanned again; it is listed in ``report``
    (a :class:`mgf_sb.data.manifest.SkipReport`) if one is given. Yields
    ``(root, dirs, files)`` with ``dirs`` and ``files`` sorted.
    """
    seen = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        key = file_identity(root)
        if key in seen:
            dirs[:] = []
            if report is not None:
                report.add(root, f"symlink loop or repeated folder (the same folder as {seen[key]}); not scanned again")
            continue
        seen[key] = root
        dirs.sort()
        yield root, dirs, sorted(files)


def scan_audio(folder, extensions=AUDIO_EXTENSIONS, report=None, seen=None, split=None):
    """Sorted list of audio files under ``folder`` (recursive, case-insensitive), each real file once.

    Symlinks are followed, but every real folder is entered once (symlink loops
    end) and every real file is returned once (:func:`file_identity`); the
    loops and duplicates left out are listed in ``report`` if given.

    Arguments
    ---------
    folder : str
    extensions : tuple of str
    report : SkipReport, optional
    seen : dict, optional
        ``{file identity: (path, split)}`` shared by the scans of several splits,
        so that a file is never in two of them (the first split keeps it).
    split : str, optional
        This scan's split name (for ``seen`` and the messages).

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder!r} does not exist (check --data_folder)")
    exts = tuple(e.lower() for e in extensions)
    seen = {} if seen is None else seen
    found = []
    for root, dirs, files in walk_unique(folder, report):
        for f in files:
            if not f.lower().endswith(exts):
                continue
            path = os.path.join(root, f)
            key = file_identity(path)
            if key in seen:
                first, first_split = seen[key]
                if report is not None:
                    where = f" in the {first_split} split" if first_split and first_split != split else ""
                    report.add(path, f"duplicate (the same file as {first}{where}: a symlink or hard link); kept once")
                continue
            seen[key] = (path, split)
            found.append(path)
    return found


def read_audio(path):
    """Decodes a whole file with soundfile.

    Returns
    -------
    samples : np.ndarray
        (frames, channels) float32.
    sample_rate : int

    Raises
    ------
    AudioError
        Unreadable, truncated or not audio at all.
    """
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise AudioError(f"{path}: unreadable audio ({type(e).__name__}: {e})") from e
    return data, sr


def to_mono_16k(data, sr, sample_rate=16000):
    """(frames, channels) float array -> (samples,) float32 tensor at ``sample_rate``.

    Channels are averaged; other rates are resampled with torchaudio's
    band-limited sinc resampler.
    """
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != sample_rate:
        import torchaudio.functional as AF  # functional ops need no torchcodec

        wav = AF.resample(wav, sr, sample_rate)
    return wav.float()


def read_crop(path, duration, crop_seconds, sample_rate=16000, random_start=True):
    """Reads at most ``crop_seconds`` of a (checked, 16 kHz) file without decoding the rest.

    Arguments
    ---------
    path : str
    duration : float or str
        The file's duration from the manifest (seconds).
    crop_seconds : float
    sample_rate : int
    random_start : bool
        A random window (training) or the first one.

    Returns
    -------
    torch.Tensor
        (samples,) the whole file when it is no longer than the crop.
    """
    from speechbrain.dataio.dataio import read_audio

    n, want = int(float(duration) * sample_rate), int(crop_seconds * sample_rate)
    if n <= want:
        return read_audio(path)
    start = int(torch.randint(0, n - want + 1, (1,))) if random_start else 0
    return read_audio({"file": path, "start": start, "stop": start + want})


@dataclass
class AudioCheck:
    """Outcome of :func:`check_audio`.

    ``reason`` is None for a usable file; ``path`` is what the manifest should
    point at (the converted copy if one was written); ``note`` says what was
    done to it (e.g. "resampled 44100->16000 Hz, downmixed 2->1 channels").
    """

    source: str
    path: Optional[str]
    duration: float
    reason: Optional[str] = None
    note: Optional[str] = None
    audio: Optional[np.ndarray] = field(default=None, repr=False)  # (samples,) float32, with keep_audio

    @property
    def ok(self):
        return self.reason is None


def check_audio(path, sample_rate=16000, min_duration=0.0, max_duration=None, convert_dir=None, keep_audio=False):
    """Decodes one file and decides what to do with it.

    Arguments
    ---------
    path : str
    sample_rate : int
        Required rate; other rates are resampled into ``convert_dir``.
    min_duration, max_duration : float
        Seconds; outside this range the file is skipped.
    convert_dir : str, optional
        Where converted copies go; without it, files that need conversion are
        skipped with a reason instead.
    keep_audio : bool
        Return a usable file's audio as 16 kHz mono float32 in ``AudioCheck.audio``
        (converted in memory; no copy is written). The shard writer uses this.

    Returns
    -------
    AudioCheck
    """
    try:
        data, sr = read_audio(path)
    except AudioError as e:
        return AudioCheck(path, None, 0.0, reason=str(e).split(": ", 1)[1])
    if data.shape[0] == 0:
        return AudioCheck(path, None, 0.0, reason="empty (zero samples)")
    if not np.isfinite(data).all():
        return AudioCheck(path, None, 0.0, reason="NaN or Inf samples")
    duration = data.shape[0] / sr
    if not np.any(data):
        return AudioCheck(path, None, duration, reason="silent (every sample is zero)")
    if duration < max(min_duration or 0.0, MIN_AUDIO_SECONDS):
        limit = f"min_duration {min_duration} s" if (min_duration or 0.0) >= MIN_AUDIO_SECONDS else \
            f"{MIN_AUDIO_SECONDS} s, the shortest input the models accept"
        return AudioCheck(path, None, duration, reason=f"too short ({duration:.3f} s < {limit})")
    if max_duration is not None and duration > max_duration:
        return AudioCheck(path, None, duration, reason=f"too long ({duration:.1f} s > max_duration {max_duration} s)")
    notes = []
    if data.shape[1] > 1:
        notes.append(f"downmixed {data.shape[1]}->1 channels")
    if sr != sample_rate:
        notes.append(f"resampled {sr}->{sample_rate} Hz")
    if keep_audio:
        wav = to_mono_16k(data, sr, sample_rate).numpy() if notes else data[:, 0].copy()
        peak = np.abs(wav).max()
        if peak > 1.0:  # resampling overshoot; PCM_16 would clip
            wav = wav / peak
        return AudioCheck(path, path, wav.shape[0] / sample_rate, note=", ".join(notes) or None, audio=wav)
    if not notes:
        return AudioCheck(path, path, duration)
    if convert_dir is None:
        return AudioCheck(path, None, duration, reason="needs conversion (" + ", ".join(notes) + ") but no convert_dir")
    wav = to_mono_16k(data, sr, sample_rate).numpy()
    peak = np.abs(wav).max()
    if peak > 1.0:  # resampling overshoot; PCM_16 would clip
        wav = wav / peak
    os.makedirs(convert_dir, exist_ok=True)
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(convert_dir, f"{stem}-{digest}.wav")
    sf.write(out, wav, sample_rate, subtype="PCM_16")
    return AudioCheck(path, out, wav.shape[0] / sample_rate, note=", ".join(notes))


def _check_star(args):
    return check_audio(*args)


def check_many(paths, num_workers=1, desc="checking audio", **kwargs):
    """:func:`check_audio` over many files, with a progress bar (and processes)."""
    from tqdm import tqdm

    jobs = [(p, kwargs.get("sample_rate", 16000), kwargs.get("min_duration", 0.0),
             kwargs.get("max_duration"), kwargs.get("convert_dir")) for p in paths]
    if num_workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(num_workers) as pool:
            return list(tqdm(pool.imap(_check_star, jobs, chunksize=16), total=len(jobs), desc=desc))
    return [check_audio(*j) for j in tqdm(jobs, desc=desc)]
