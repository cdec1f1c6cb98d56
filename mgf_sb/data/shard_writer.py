"""Writing WebDataset shards (:func:`make_shards`, ``recipes/pretrain/make_shards.py``).

Every input file goes through the same check as the manifest prep
(:func:`mgf_sb.data.audio.check_audio`: bad files skipped and listed, other rates resampled,
channels averaged); long recordings are cut at low-energy points into segments of at most
``max_segment_seconds``; 16 kHz mono 16-bit FLAC. Several processes, one shard per job; a rerun
skips finished shards. ``shards.json`` indexes them (samples and seconds per shard). Split out
of :mod:`mgf_sb.data.shards` (reading), which re-exports these names.
"""

import io
import json
import logging
import os
import random

import numpy as np
import soundfile as sf

logger = logging.getLogger("mgf_sb.data.shards")  # the messages keep their logger name

SHARD_NAME = "shard-%06d.tar"
INDEX_NAME = "shards.json"
INDEX_VERSION = 1
# 16-bit FLAC of speech at 16 kHz is ~60 % of PCM's 32 kB/s. Used only to plan
# how many recordings go into one shard; shards.json records the real sizes.
FLAC_BYTES_PER_SECOND = 20000


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def low_energy_segments(wav, sample_rate, max_seconds, frame_ms=20.0):
    """Cuts a recording into segments of at most ``max_seconds`` at quiet points.

    Each cut is the centre of the lowest-energy ``frame_ms`` frame in the
    second half of the window that starts at the previous cut, so every segment
    but the last lasts between ``max_seconds / 2`` and ``max_seconds``.

    Arguments
    ---------
    wav : np.ndarray
        (samples,) float.
    sample_rate : int
    max_seconds : float or None
        None: no cutting.

    Returns
    -------
    list of (start, end)
        Sample ranges that tile ``[0, samples)``.
    """
    n = int(wav.shape[0])
    if not max_seconds or n <= int(max_seconds * sample_rate):
        return [(0, n)]
    max_len = int(max_seconds * sample_rate)
    hop = max(1, int(sample_rate * frame_ms / 1000))
    n_frames = n // hop
    frames = np.asarray(wav[: n_frames * hop], dtype=np.float32).reshape(n_frames, hop)
    energy = np.einsum("ij,ij->i", frames, frames)  # (n_frames,) no copy of an hour of audio
    segments, start = [], 0
    while n - start > max_len:
        lo = -(-(start + max_len // 2 - hop // 2) // hop)  # ceil: first frame centre in the second half
        hi = min((start + max_len - hop // 2) // hop, n_frames - 1)  # last frame centre inside the window
        if lo > hi:
            cut = start + max_len
        else:
            cut = (lo + int(np.argmin(energy[lo : hi + 1]))) * hop + hop // 2
        segments.append((start, cut))
        start = cut
    segments.append((start, n))
    return segments


def to_int16(wav):
    """(samples,) float in [-1, 1] -> int16, the exact inverse of soundfile's int16 -> float32 read."""
    # float32 is exact here: soundfile's int16 reads are k / 32768
    return np.clip(np.rint(np.asarray(wav, dtype=np.float32) * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def encode_flac(pcm, sample_rate):
    """int16 samples -> FLAC bytes (lossless)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _probe_duration(path):
    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except Exception:  # unreadable: planned anyway, check_audio reports it
        return 0.0


def list_inputs(source, extensions=(".wav", ".flac"), num_workers=1):
    """(id, path, duration) of every input recording, sorted by id.

    Arguments
    ---------
    source : str
        A folder of audio (searched recursively; id = path under it without the
        extension) or a CSV manifest with ``ID, duration, wav`` columns (as the
        manifest prep writes).
    """
    from mgf_sb.data.audio import scan_audio
    from mgf_sb.data.manifest import read_manifest
    from mgf_sb.data.prepare_audio import utterance_id

    if os.path.isfile(source) and source.lower().endswith(".csv"):
        rows = read_manifest(source)
        items = [(r["ID"], r["wav"], float(r.get("duration") or 0.0)) for r in rows]
    else:
        paths = scan_audio(source, extensions)
        if num_workers > 1 and len(paths) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(num_workers) as pool:
                durations = pool.map(_probe_duration, paths, chunksize=64)
        else:
            durations = [_probe_duration(p) for p in paths]
        items = [(utterance_id(p, source), p, d) for p, d in zip(paths, durations)]
    return sorted(items)


def plan_shards(items, shard_size_mb, seed=0):
    """Groups recordings into shards of about ``shard_size_mb`` (from their durations).

    The recordings are shuffled first (seeded), so that a shard mixes speakers
    and books and a streamed shuffle buffer starts from a mixed order.

    Returns
    -------
    list of list of (id, path, duration)
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    target = shard_size_mb * 1e6
    shards, current, size = [], [], 0.0
    for item in items:
        est = item[2] * FLAC_BYTES_PER_SECOND
        if current and size + est > target:
            shards.append(current)
            current, size = [], 0.0
        current.append(item)
        size += est
    if current:
        shards.append(current)
    return shards


def _report_path(out, index):
    return os.path.join(out, "shard_reports", (SHARD_NAME % index).replace(".tar", ".json"))


def shard_is_done(out, index):
    """A shard is finished when its report exists and so does its tar (both renamed into place last),
    or when the report says it holds no sample (every planned file skipped: no tar is written)."""
    rpath = _report_path(out, index)
    if not os.path.isfile(rpath):
        return False
    if os.path.isfile(os.path.join(out, SHARD_NAME % index)):
        return True
    with open(rpath, encoding="utf-8", errors="surrogateescape") as f:
        return json.load(f)["samples"] == 0


def write_shard(index, items, out, sample_rate=16000, min_duration=1.0, max_segment_seconds=30.0):
    """Checks, converts, segments and writes one shard; returns its report.

    The tar is written to ``<name>.tmp`` and renamed when complete, after the
    shard's report (``shard_reports/shard-%06d.json``), so a killed job leaves
    no shard that looks finished. A shard whose planned files were all skipped
    is not written (its report says 0 samples; the index leaves it out, so it
    can never become the validation set).
    """
    import webdataset as wds

    from mgf_sb.data.audio import check_audio

    name = SHARD_NAME % index
    tmp = os.path.join(out, name + ".tmp")
    report = {"name": name, "samples": 0, "seconds": 0.0, "bytes": 0, "recordings": 0, "skipped": [],
              "converted": [], "dropped_seconds": 0.0}
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
        for uid, path, _ in items:
            check = check_audio(path, sample_rate=sample_rate, min_duration=min_duration, keep_audio=True)
            if not check.ok:
                report["skipped"].append([path, check.reason])
                continue
            if check.note:
                report["converted"].append([path, check.note])
            report["recordings"] += 1
            pcm = to_int16(check.audio)
            segments = low_energy_segments(check.audio, sample_rate, max_segment_seconds)
            for k, (s, e) in enumerate(segments):
                seconds = (e - s) / sample_rate
                if seconds < min_duration or not pcm[s:e].any():  # a short or silent tail
                    report["dropped_seconds"] += seconds
                    continue
                sid = uid if len(segments) == 1 else f"{uid}#{k:04d}"
                meta = {"id": sid, "duration": seconds, "sample_rate": sample_rate,
                        "origin": {"path": os.path.abspath(path), "start": s / sample_rate, "end": e / sample_rate}}
                tar.write({"__key__": f"{report['samples']:06d}", "flac": encode_flac(pcm[s:e], sample_rate),
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
                report["samples"] += 1
                report["seconds"] += seconds
    report["bytes"] = os.path.getsize(tmp)
    rpath = _report_path(out, index)
    os.makedirs(os.path.dirname(rpath), exist_ok=True)
    with open(rpath + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump(report, f, ensure_ascii=False)
    if report["samples"] == 0:  # nothing usable: no empty tar to train or validate on
        os.remove(tmp)
        logger.warning(f"{name}: every planned file was skipped (see shards_skipped.tsv); no shard written")
    os.replace(rpath + ".tmp", rpath)
    if report["samples"]:
        os.replace(tmp, os.path.join(out, name))
    return report


def _write_shard_star(args):
    return write_shard(*args[:3], **args[3])


def make_shards(source, out, shard_size_mb=200.0, max_segment_seconds=30.0, min_duration=1.0, sample_rate=16000,
                num_workers=1, seed=0):
    """Writes ``out/shard-%06d.tar`` + ``out/shards.json`` from a folder or a manifest.

    Resumable: the plan (which recordings go into which shard) is stored in
    ``out/plan.json`` with the options; a rerun with the same options writes
    only the shards that are not finished. Skipped files are listed with their
    reason in ``out/shards_skipped.tsv``, converted ones in
    ``out/shards_converted.tsv``.

    Arguments
    ---------
    source : str
        Folder of wav/flac (recursive) or CSV manifest (``ID, duration, wav``).
    out : str
        Output folder.
    shard_size_mb : float
        Approximate size of one shard (planned at ~20 kB per second of audio).
    max_segment_seconds : float
        Longer recordings are cut at low-energy points (None: never cut).
    min_duration : float
        Shorter recordings (and segment tails) are skipped.
    num_workers : int
        Processes writing shards in parallel.

    Returns
    -------
    dict
        The index (also written to ``out/shards.json``).

    Raises
    ------
    ValueError
        When no usable audio is found, or ``out`` holds shards made with other options.
    """
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    opts = dict(source=os.path.abspath(source), shard_size_mb=shard_size_mb, max_segment_seconds=max_segment_seconds,
                min_duration=min_duration, sample_rate=sample_rate, seed=seed)
    plan_path = os.path.join(out, "plan.json")
    if os.path.isfile(plan_path):
        with open(plan_path, encoding="utf-8", errors="surrogateescape") as f:
            saved = json.load(f)
        if saved["options"] != json.loads(json.dumps(opts)):
            raise ValueError(f"{out} holds shards made with other options ({saved['options']}); "
                             f"use another output folder or delete it")
        plan = saved["shards"]
        logger.info(f"resuming: {sum(shard_is_done(out, i) for i in range(len(plan)))} of {len(plan)} shards done")
    else:
        items = list_inputs(source, num_workers=num_workers)
        if not items:
            raise ValueError(f"no audio files in {source!r}")
        plan = plan_shards(items, shard_size_mb, seed)
        with open(plan_path + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump({"options": opts, "shards": plan}, f, ensure_ascii=False)
        os.replace(plan_path + ".tmp", plan_path)
    kw = dict(sample_rate=sample_rate, min_duration=min_duration, max_segment_seconds=max_segment_seconds)
    todo = [(i, plan[i], out, kw) for i in range(len(plan)) if not shard_is_done(out, i)]
    if num_workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(num_workers) as pool:
            for _ in tqdm(pool.imap_unordered(_write_shard_star, todo), total=len(todo), desc="writing shards"):
                pass
    else:
        for job in tqdm(todo, desc="writing shards"):
            _write_shard_star(job)
    return write_index(out, len(plan), opts)


def write_index(out, n_shards, options=None):
    """Collects the shard reports into ``shards.json`` and the skip lists."""
    from mgf_sb.data.manifest import SkipReport

    skips = SkipReport("shards")
    shards = []
    for i in range(n_shards):
        with open(_report_path(out, i), encoding="utf-8", errors="surrogateescape") as f:
            rep = json.load(f)
        for path, reason in rep["skipped"]:
            skips.add(path, reason)
        for path, note in rep["converted"]:
            skips.note(path, note)
        if rep["samples"]:  # an empty shard has no tar (write_shard) and no entry
            shards.append({k: rep[k] for k in ("name", "samples", "seconds", "bytes", "recordings", "dropped_seconds")})
    skips.write(out)
    samples = sum(s["samples"] for s in shards)
    if samples == 0:
        raise ValueError(f"no usable audio in {options and options.get('source')!r}: every file was unreadable or "
                         f"too short; see {os.path.join(out, 'shards_skipped.tsv')}")
    index = {"version": INDEX_VERSION, "count": len(shards), "samples": samples,
             "hours": sum(s["seconds"] for s in shards) / 3600, "skipped": len(skips), "converted": len(skips.notes),
             "options": options, "shards": shards}
    with open(os.path.join(out, INDEX_NAME + ".tmp"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(out, INDEX_NAME + ".tmp"), os.path.join(out, INDEX_NAME))
    empty = n_shards - len(shards)
    logger.info(f"{len(shards)} shards, {samples} samples, {index['hours']:.2f} h in {out} "
                f"({len(skips)} files skipped, {len(skips.notes)} converted"
                f"{f', {empty} planned shard(s) left empty and not written' if empty else ''})")
    return index
