"""WebDataset shards: pretraining on corpora larger than one machine's disk.

Reading a CSV manifest of millions of small files means millions of random
reads (slow on a shared filesystem), and the manifest prep decodes every file
before training. Here the audio is packed once into ``shard-%06d.tar`` files
(WebDataset's format: one ``<key>.flac`` + ``<key>.json`` per sample) that
training streams sequentially, as SpeechBrain's "data loading for big datasets
and shared filesystems" tutorial does.

Writing (:func:`make_shards`, ``recipes/pretrain/make_shards.py``; in :mod:`mgf_sb.data.shard_writer`)
    every input file goes through the same check as the manifest prep
    (:func:`mgf_sb.data.audio.check_audio`: bad files skipped and listed,
    other rates resampled, channels averaged); long recordings are cut at
    low-energy points into segments of at most ``max_segment_seconds``; 16 kHz
    mono 16-bit FLAC. Several processes, one shard per job; a rerun skips
    finished shards. ``shards.json`` indexes them (samples and seconds per shard).

Reading (:class:`ShardStream`, :class:`ShardLoader`)
    each epoch the shards are shuffled and dealt to the DDP processes, then to
    each process's data-loader workers, balancing sample counts; a worker
    streams its shards through a shuffle buffer into SpeechBrain's
    ``dynamic_bucketed_batch`` (dynamic batching on a stream) and the masking
    collate. One epoch is one pass over the index. The loader is a
    Checkpointer recoverable: it saves, per process and worker, which shards
    were opened and which of their samples are still in the buffers, so a
    resumed run continues from that shard position.
"""

import io
import json
import logging
import math
import os
import random
import re

import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from speechbrain.dataio.iterators import dynamic_bucketed_batch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

logger = logging.getLogger(__name__)

# Writing lives in mgf_sb.data.shard_writer; its names are re-exported here for callers.
from mgf_sb.data.shard_writer import (FLAC_BYTES_PER_SECOND, INDEX_NAME, INDEX_VERSION, SHARD_NAME,  # noqa: E402,F401
                                      encode_flac, list_inputs, low_energy_segments, make_shards, plan_shards,
                                      shard_is_done, to_int16, write_index, write_shard)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def shard_urls(shards, index=None):
    """The list of shard URLs: a shards folder (every shard of its index), a
    brace pattern (``/data/shards/shard-{000000..000123}.tar``, ``pipe:...``)
    or a list."""
    import braceexpand

    if isinstance(shards, (list, tuple)):
        return [u for s in shards for u in shard_urls(s, index)]
    if os.path.isdir(shards):
        index = index or load_index(os.path.join(shards, INDEX_NAME))
        return [os.path.join(shards, s["name"]) for s in index["shards"]]
    return list(braceexpand.braceexpand(shards))


def load_index(path):
    """Reads a ``shards.json``; names the file when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard index {path!r} not found: make shards with recipes/pretrain/make_shards.py, "
                                f"or give --shards_index=<path to shards.json> (needed for pipe: URLs)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def default_index_path(shards):
    """``shards.json`` next to the shards (a folder, or the folder of the first local shard)."""
    first = shards if isinstance(shards, str) else shards[0]
    if os.path.isdir(first):
        return os.path.join(first, INDEX_NAME)
    return os.path.join(os.path.dirname(shard_urls(first)[0]), INDEX_NAME)


def shard_stats(urls, index):
    """(samples, seconds) of each URL, looked up by shard name in the index."""
    by_name = {s["name"]: s for s in index["shards"]}
    counts, seconds = [], []
    for url in urls:
        m = re.search(r"shard-\d+\.tar", url)
        if m is None or m.group(0) not in by_name:
            raise ValueError(f"shard {url!r} is not in the index ({len(by_name)} shards); pass --shards_index")
        counts.append(int(by_name[m.group(0)]["samples"]))
        seconds.append(float(by_name[m.group(0)]["seconds"]))
    return counts, seconds


def check_shards(urls, index):
    """Every local shard against the index, before training: it exists, has the size
    the index recorded, and its tar headers hold the index's samples (one ``.flac`` and
    one ``.json`` each). Reads the headers only (a seek per member), not the audio.
    ``pipe:`` / remote URLs cannot be checked here; a bad one fails when it is read.

    Raises
    ------
    ValueError
        Naming each missing, truncated or miscounted shard, and the fix.
    """
    import tarfile

    by_name = {s["name"]: s for s in index["shards"]}
    problems = []
    for url in urls:
        if "://" in url or url.startswith("pipe:") or url.startswith("file:"):
            continue
        entry = by_name.get(os.path.basename(url))
        if not os.path.isfile(url):
            problems.append(f"{url}: missing")
            continue
        size = os.path.getsize(url)
        if entry is not None and entry.get("bytes") and size != int(entry["bytes"]):
            problems.append(f"{url}: {size} bytes, the index says {entry['bytes']} (truncated or rewritten)")
            continue
        try:
            with tarfile.open(url, "r:") as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{url}: unreadable tar ({e})")
            continue
        flac = sum(n.endswith(".flac") for n in names)
        meta = sum(n.endswith(".json") for n in names)
        if entry is not None and not flac == meta == int(entry["samples"]):
            problems.append(f"{url}: {flac} audio and {meta} metadata entries, the index says {entry['samples']} samples")
    if problems:
        raise ValueError(f"{len(problems)} of {len(urls)} shards do not match the index:\n  " + "\n  ".join(problems)
                         + "\nRewrite them: delete each listed shard and its shard_reports/<name>.json, then rerun "
                           "recipes/pretrain/make_shards.py with the same arguments (it writes only the missing shards)")
    return len(urls)


def read_shard(url):
    """Samples of one shard in order: dicts with ``__key__``, ``flac`` and ``json`` bytes.

    ``url`` is a path or anything WebDataset opens (``pipe:aws s3 cp s3://b/shard-000001.tar -``).
    """
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}])


def _balanced(items, weights, n_bins):
    """Deals ``items`` in order, each to the bin with the least total weight so far.

    The bins' totals then differ by at most the largest weight.
    """
    bins, loads = [[] for _ in range(n_bins)], [0] * n_bins
    for item in items:
        b = min(range(n_bins), key=lambda i: (loads[i], i))
        bins[b].append(item)
        loads[b] += weights[item]
    return bins


def assign_shards(counts, world_size, num_workers, seed, epoch):
    """Which shards each process and each of its data-loader workers reads in an epoch.

    The shards are shuffled (seed, epoch), dealt to the processes balancing
    their sample counts, then each process's shards to its workers the same
    way. Every shard goes to exactly one worker of one process.

    Returns
    -------
    list (process) of list (worker) of list of shard indices.
    """
    if len(counts) < world_size:
        raise ValueError(f"{len(counts)} shards for {world_size} processes: every process needs at least one shard; "
                         f"make smaller shards (--shard_size_mb) or use fewer processes")
    order = list(range(len(counts)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return [_balanced(r, counts, max(1, num_workers)) for r in _balanced(order, counts, world_size)]


def _shuffled(stream, size, rng):
    """WebDataset-style shuffle buffer of ``size`` items."""
    buf = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        out, buf[i] = buf[i], item
        yield out
    rng.shuffle(buf)
    yield from buf


class _Position:
    """Where one worker is in its shard list, in a form that survives a restart.

    ``cursor`` shards of the list were opened, ``pulled`` samples read from the
    last one; ``pending`` maps shard index -> keys read but not yet in a
    delivered batch (in the shuffle or bucketing buffer). On resume the pending
    samples and the rest of the last shard are read again, then the next shards.
    """

    def __init__(self, shard_ids, urls, state=None):
        state = state or {}
        self.shard_ids, self.urls = shard_ids, urls
        self.cursor, self.pulled = int(state.get("cursor", 0)), int(state.get("pulled", 0))
        self.samples = int(state.get("samples", 0))
        self.pending = {int(k): set(v) for k, v in state.get("pending", {}).items()}

    def _read(self, sid):
        for raw in read_shard(self.urls[sid]):
            yield sid, raw

    def source(self):
        """(shard index, raw sample) for every sample this worker has left."""
        resumed = {k: set(v) for k, v in self.pending.items()}
        current = self.shard_ids[self.cursor - 1] if self.cursor > 0 else None
        for sid in self.shard_ids[: max(self.cursor - 1, 0)]:
            if sid in resumed:
                yield from ((s, r) for s, r in self._read(sid) if r["__key__"] in resumed[sid])
        if current is not None:
            skip = self.pulled
            for j, (sid, raw) in enumerate(self._read(current)):
                if j >= skip:
                    self.pulled = j + 1
                    self.pending.setdefault(sid, set()).add(raw["__key__"])
                    yield sid, raw
                elif raw["__key__"] in resumed.get(sid, ()):
                    yield sid, raw
        for i in range(self.cursor, len(self.shard_ids)):
            self.cursor, self.pulled = i + 1, 0
            for j, (sid, raw) in enumerate(self._read(self.shard_ids[i])):
                self.pulled = j + 1
                self.pending.setdefault(sid, set()).add(raw["__key__"])
                yield sid, raw

    def delivered(self, sid, key):
        keys = self.pending.get(sid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.pending[sid]
        self.samples += 1

    def state(self):
        return {"cursor": self.cursor, "pulled": self.pulled, "samples": self.samples,
                "pending": {str(k): sorted(v) for k, v in self.pending.items()}}


def decode_crop(flac, crop_samples, rng=None):
    """FLAC bytes -> (samples,) float32 tensor, at most ``crop_samples`` long.

    Only the crop is decoded (a random window when ``rng`` is given, else the start).
    """
    with sf.SoundFile(io.BytesIO(flac)) as f:
        n = f.frames
        if n > crop_samples:
            f.seek(rng.randrange(n - crop_samples + 1) if rng is not None else 0)
            n = crop_samples
        return torch.from_numpy(f.read(n, dtype="float32"))


class ShardStream(IterableDataset):
    """Batches streamed from shards, for one process; see :class:`ShardLoader`.

    Each data-loader worker yields ``(worker, batch, position)`` tuples.

    Arguments
    ---------
    urls : list of str
        Every shard of the training set (all processes).
    counts : list of int
        Samples per shard (from the index); balances the split.
    collate : callable
        List of ``{"id", "sig"}`` -> batch (:class:`mgf_sb.batch.MGFCollate`).
    crop_seconds : float
        Audio per sample (a random window of longer samples; only it is decoded).
    max_batch_length : float
        Seconds per batch (sum over the batch of the longest crop, as SpeechBrain's
        ``dynamic_bucketed_batch`` counts), or None with ``batch_size``.
    batch_size : int
        Samples per batch when ``max_batch_length`` is None.
    shuffle_buffer : int
        Samples in the shuffle buffer (per worker).
    bucket_buffer : int
        Samples kept sorted by length to build batches (per worker).
    max_padding_ratio : float
        Largest padding fraction of a dynamic batch.
    seed, rank, world_size : int
    """

    def __init__(self, urls, counts, collate, crop_seconds, max_batch_length=None, batch_size=8, sample_rate=16000,
                 shuffle_buffer=1000, bucket_buffer=256, max_padding_ratio=0.2, seed=0, rank=0, world_size=1):
        super().__init__()
        self.urls, self.counts, self.collate = list(urls), list(counts), collate
        self.crop = int(crop_seconds * sample_rate)
        self.crop_seconds = crop_seconds
        if max_batch_length:
            self.sampler_kwargs = dict(target_batch_numel=int(max_batch_length * 100),
                                       max_batch_numel=int(max_batch_length * 100), max_padding_ratio=max_padding_ratio)
        else:
            self.sampler_kwargs = dict(target_batch_numel=float("inf"), max_batch_size=int(batch_size),
                                       max_padding_ratio=None)
        self.shuffle_buffer, self.bucket_buffer = int(shuffle_buffer), int(bucket_buffer)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.num_workers, self.resume = 1, 1, None

    def plan(self, epoch=None):
        """Shard indices per worker of this process in ``epoch``."""
        return assign_shards(self.counts, self.world_size, self.num_workers, self.seed,
                             self.epoch if epoch is None else epoch)[self.rank]

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        state = (self.resume or {}).get(worker)
        # str seeds are hashed with SHA-512: the same stream in every run
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{json.dumps(state, sort_keys=True)}")
        position = _Position(self.plan()[worker], self.urls, state)

        def samples():
            for sid, raw in position.source():
                meta = json.loads(raw["json"])
                yield {"sid": sid, "key": raw["__key__"], "id": meta["id"], "flac": raw["flac"],
                       "len": int(round(100 * min(float(meta["duration"]), self.crop_seconds)))}

        def collate(items):
            for it in items:
                position.delivered(it["sid"], it["key"])
            batch = self.collate([{"id": it["id"], "sig": decode_crop(it["flac"], self.crop, rng)} for it in items])
            return worker, batch, position.state()

        sampler = dict(self.sampler_kwargs, randint_generator=rng.randint)
        yield from dynamic_bucketed_batch(_shuffled(samples(), self.shuffle_buffer, rng), len_key="len", len_fn=None,
                                          buffersize=self.bucket_buffer, collate_fn=collate, sampler_kwargs=sampler)


def _identity(x):
    return x


def _dist():
    """(rank, world size) of the DDP group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(value, op):
    """An int reduced over the DDP processes (itself without DDP)."""
    if _dist()[1] == 1:
        return int(value)
    nccl = torch.distributed.get_backend() == "nccl"
    t = torch.tensor([int(value)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(t, op=op)
    return int(t.item())


def _every_process_has(flag):
    """True when ``flag`` is true on every DDP process (one tiny all-reduce)."""
    return bool(_all_reduce(flag, torch.distributed.ReduceOp.MIN))


class ShardLoader(DataLoader):
    """The training loader on shards: a DataLoader over a :class:`ShardStream`.

    One epoch is one pass over the shards. Under DDP the epoch ends for every
    process when the first one has no batch left (one all-reduce of a flag per
    step), so every process makes the same number of steps; the samples the
    others still hold are the epoch's remainder (at most about one shard per
    process, since the split balances sample counts; the shards are dealt
    differently each epoch). Without DDP nothing is left over.

    Register it with the Checkpointer: each save stores every process's and
    worker's :class:`_Position` (gathered to one file); recovering an
    intra-epoch checkpoint continues the epoch from there.
    """

    def __init__(self, stream, num_workers=0, **kwargs):
        super().__init__(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                         persistent_workers=False, **kwargs)
        stream.num_workers = max(1, num_workers)
        self.stream = stream
        self.epoch, self.in_epoch, self.positions, self._resume = 0, False, {}, None
        self.remainder = None  # samples left over on all processes in the last finished epoch

    def assigned(self, epoch=None):
        """Samples this process's shards hold in ``epoch``."""
        return sum(self.stream.counts[s] for w in self.stream.plan(epoch) for s in w)

    def __len__(self):
        """Batches per epoch, estimated from the index: this process's samples / samples per batch
        (``max_batch_length / crop_seconds``, or ``batch_size``). The progress bar and the recipe's
        schedule (``lr_total_steps`` ...) use it; the epoch itself ends when the shards do."""
        kw = self.stream.sampler_kwargs
        per_batch = kw["max_batch_numel"] / 100 / self.stream.crop_seconds if "max_batch_numel" in kw \
            else kw["max_batch_size"]
        return max(1, math.ceil(self.assigned() / max(1.0, per_batch)))

    def __iter__(self):
        if self._resume is not None:
            self.epoch, positions = self._resume
            self.positions = {int(k): v for k, v in positions.items()}  # JSON keys are str
            done = sum(p["samples"] for p in self.positions.values())
            logger.info(f"shard stream: resuming epoch {self.epoch} after {done} samples (shard positions restored)")
        else:
            self.epoch, self.positions = self.epoch + 1, {}
        self._resume = None
        self.stream.epoch = self.epoch
        self.stream.resume = dict(self.positions)
        self.in_epoch = True
        return self._batches(super().__iter__())

    def _batches(self, iterator):
        while True:
            item = next(iterator, None)
            if not _every_process_has(item is not None):
                break
            worker, batch, position = item
            self.positions[worker] = position
            yield batch
        done = sum(p["samples"] for p in self.positions.values())
        # every process gets here at the same step: sum what they could not deliver
        left = self.remainder = _all_reduce(self.assigned() - done, torch.distributed.ReduceOp.SUM)
        logger.info(f"shard stream: epoch {self.epoch} done, {done} samples on process {_dist()[0]}, "
                    f"{left} left over on all processes (the remainder)")
        self.in_epoch = False

    @mark_as_saver
    def _save(self, path):
        rank, world = _dist()
        mine = {"epoch": self.epoch, "in_epoch": self.in_epoch, "positions": {str(k): v for k, v in self.positions.items()}}
        states = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        if rank == 0:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"world_size": world, "num_workers": self.stream.num_workers, "shards": len(self.stream.urls),
                           "processes": states}, f)

    @mark_as_loader
    def _load(self, path, end_of_epoch):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        rank, world = _dist()
        same = (saved["world_size"], saved["num_workers"], saved["shards"]) == (
            world, self.stream.num_workers, len(self.stream.urls))
        mine = saved["processes"][rank] if rank < len(saved["processes"]) else saved["processes"][0]
        self.epoch, self._resume = int(mine["epoch"]), None
        if mine["in_epoch"] and not end_of_epoch:
            if not same:
                logger.warning("shard stream: the checkpoint was saved with another number of processes, workers or "
                               f"shards ({saved['world_size']}, {saved['num_workers']}, {saved['shards']}); "
                               f"epoch {self.epoch} restarts from its beginning")
                self._resume = (self.epoch, {})
            else:
                self._resume = (self.epoch, mine["positions"])


register_checkpoint_hooks(ShardLoader, save_on_main_only=False)


class ShardSamples(IterableDataset):
    """Validation on shards: every sample, its first crop, no shuffling.

    Every process reads every shard (as the manifest loader's validation does);
    the shards are split over data-loader workers only.
    """

    def __init__(self, urls, crop_seconds, sample_rate=16000):
        super().__init__()
        self.urls, self.crop = list(urls), int(crop_seconds * sample_rate)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[w::n]:
            for raw in read_shard(url):
                yield {"id": json.loads(raw["json"])["id"], "sig": decode_crop(raw["flac"], self.crop)}


def shard_loaders(shards, train_collate, valid_collate, crop_seconds, max_batch_length=None, batch_size=8,
                  shards_index=None, valid_shards=None, shuffle_buffer=1000, bucket_buffer=256,
                  max_padding_ratio=0.2, num_workers=0, seed=0, sample_rate=16000, valid_batch_size=8):
    """Training and validation loaders for ``--data_format=shards``.

    Arguments
    ---------
    shards : str or list
        A shards folder, a brace pattern or a list of URLs (see :func:`shard_urls`).
    shards_index : str, optional
        ``shards.json`` (default: next to the shards; required for ``pipe:`` URLs).
    valid_shards : str or list, optional
        Validation shards; None holds out the last training shard.

    Returns
    -------
    (ShardLoader, DataLoader)
    """
    index = load_index(shards_index or default_index_path(shards))
    urls = shard_urls(shards, index)
    empty = {s["name"] for s in index["shards"] if not int(s["samples"])}  # an index written before they were left out
    if empty:
        logger.warning(f"shards without samples left out: {sorted(empty)}")
        urls = [u for u in urls if os.path.basename(u) not in empty]
    if valid_shards:
        valid_urls = shard_urls(valid_shards)
    else:
        if len(urls) < 2:
            raise ValueError("one shard only: give --valid_shards, or make smaller shards (--shard_size_mb) so that "
                             "one can be held out for validation")
        urls, valid_urls = urls[:-1], urls[-1:]
        logger.info(f"validation: the last shard ({valid_urls[0]}) is held out of training")
    counts, seconds = shard_stats(urls, index)
    # at start, not when reached; separate validation shards have their own index: checked for existence only
    check_shards(urls + ([] if valid_shards else valid_urls), index)
    if valid_shards:
        check_shards(valid_urls, {"shards": []})
    rank, world = _dist()
    stream = ShardStream(urls, counts, train_collate, crop_seconds, max_batch_length=max_batch_length,
                         batch_size=batch_size, sample_rate=sample_rate, shuffle_buffer=shuffle_buffer,
                         bucket_buffer=bucket_buffer, max_padding_ratio=max_padding_ratio, seed=seed, rank=rank,
                         world_size=world)
    train = ShardLoader(stream, num_workers=num_workers)
    logger.info(f"training on {len(urls)} shards, {sum(counts)} samples, {sum(seconds) / 3600:.2f} h "
                f"({world} process(es) x {max(1, num_workers)} worker(s))")
    valid = DataLoader(ShardSamples(valid_urls, crop_seconds, sample_rate), batch_size=valid_batch_size,
                       num_workers=min(num_workers, len(valid_urls)), collate_fn=valid_collate)
    return train, valid
