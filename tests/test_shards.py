"""WebDataset shards: writing (round trip, bad files, resumable), the rank/worker split,
resuming mid-shard, and the pretraining recipe on shards (kill and resume).

Run as a script under ``torch.distributed.run`` this file is also the DDP check
of the split (see ``test_ddp_split_two_processes_two_workers``).
"""

import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgf_sb.data.shards import (  # noqa: E402
    ShardLoader, ShardStream, encode_flac, load_index, low_energy_segments, make_shards, read_shard, shard_urls,
)
from conftest import write_hostile_audio_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _write(path, data, sr=SR, subtype="PCM_16"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)


def _read_back(out):
    """Every sample of every shard listed in the index: (meta, int16 audio)."""
    samples = []
    for url in shard_urls(str(out)):
        for raw in read_shard(url):
            meta = json.loads(raw["json"])
            pcm, sr = sf.read(io.BytesIO(raw["flac"]), dtype="int16")
            assert sr == SR and pcm.ndim == 1
            samples.append((meta, pcm))
    return samples


def test_round_trip_every_sample_bit_exact_and_cut_in_pauses(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    noise = lambda s: rng.integers(-8000, 8000, int(s * SR)).astype(np.int16)  # noqa: E731
    _write(str(root / "a.wav"), noise(3.0))
    _write(str(root / "b.flac"), noise(2.5))
    _write(str(root / "nested" / "dir with space é" / "c.wav"), noise(2.0))
    # 49 s: 6.5 s of speech-loud noise, then 0.5 s of near silence, seven times
    loud, quiet = int(6.5 * SR), int(0.5 * SR)
    pieces = []
    for _ in range(7):
        pieces += [noise(6.5), rng.integers(-2, 3, quiet).astype(np.int16)]
    _write(str(root / "long.wav"), np.concatenate(pieces))
    out = tmp_path / "shards"
    index = make_shards(str(root), str(out), shard_size_mb=0.05, max_segment_seconds=15.0, min_duration=1.0)

    samples = _read_back(out)
    assert index["count"] == len(glob.glob(str(out / "shard-*.tar"))) >= 3
    assert index["samples"] == len(samples)
    assert abs(index["hours"] * 3600 - sum(m["duration"] for m, _ in samples)) < 1e-6
    by_origin = {}
    for meta, pcm in samples:  # bit-exact: the FLAC holds exactly the source's samples
        src, _ = sf.read(meta["origin"]["path"], dtype="int16")
        s, e = round(meta["origin"]["start"] * SR), round(meta["origin"]["end"] * SR)
        assert np.array_equal(pcm, src[s:e]), meta["id"]
        assert abs(meta["duration"] - len(pcm) / SR) < 1e-9
        by_origin.setdefault(os.path.basename(meta["origin"]["path"]), []).append((s, e, meta["id"]))
    assert sorted(m["id"] for m, _ in samples if "#" not in m["id"]) == ["a", "b", "nested/dir with space é/c"]
    # every recording comes back whole: the segments of the long one tile it
    segs = sorted(by_origin["long.wav"])
    assert segs[0][0] == 0 and segs[-1][1] == 49 * SR
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
    assert all(e - s <= 15 * SR for s, e, _ in segs) and len(segs) == 4
    assert sorted(i for _, _, i in segs) == [f"long#{k:04d}" for k in range(4)]
    # and it was cut inside the pauses, not in the middle of the loud parts
    period = loud + quiet
    for _, cut, _ in segs[:-1]:
        assert loud <= cut % period < period, cut / SR


def test_low_energy_segments_bounds():
    wav = np.random.default_rng(1).standard_normal(SR * 100).astype(np.float32)
    segs = low_energy_segments(wav, SR, 12.0)
    assert segs[0][0] == 0 and segs[-1][1] == len(wav)
    assert all(6 * SR <= e - s <= 12 * SR for s, e in segs[:-1]) and segs[-1][1] - segs[-1][0] <= 12 * SR
    assert low_energy_segments(wav[: 5 * SR], SR, 12.0) == [(0, 5 * SR)]


def test_bad_files_are_skipped_listed_and_rerun_resumes(tmp_path):
    root = tmp_path / "audio"
    write_hostile_audio_folder(root)
    out = tmp_path / "shards"
    index = make_shards(str(root), str(out), shard_size_mb=0.03, num_workers=2)

    samples = _read_back(out)
    assert sorted(m["id"] for m, _ in samples) == ["good/a", "good/b", "x/hi", "x/stereo 8k é"]
    for meta, pcm in samples:  # resampled / downmixed to 16 kHz mono (checked in _read_back)
        assert abs(meta["duration"] - (1.5 if meta["id"] == "good/b" else 2.0)) < 0.01
    lines = open(out / "shards_skipped.tsv", encoding="utf-8").read().splitlines()[1:]
    reasons = {os.path.basename(p): r for p, r in (line.split("\t") for line in lines)}
    assert set(reasons) == {"short.wav", "silent.wav", "nan.wav", "text.wav", "empty.flac", "truncated.flac"}
    assert reasons["short.wav"].startswith("too short") and reasons["silent.wav"].startswith("silent")
    assert reasons["nan.wav"].startswith("NaN") and reasons["text.wav"].startswith("unreadable")
    converted = open(out / "shards_converted.tsv", encoding="utf-8").read()
    assert "resampled 8000->16000 Hz" in converted and "downmixed 2->1" in converted and "44100" in converted
    assert index["skipped"] == 6 and index["converted"] == 2

    # Resumable: a shard lost mid-write (no tar, a stale .tmp) is written again, identical;
    # finished shards are not touched.
    tars = sorted(glob.glob(str(out / "shard-*.tar")))
    assert len(tars) >= 3
    before = {t: (open(t, "rb").read(), os.stat(t).st_mtime_ns) for t in tars}
    os.replace(tars[1], tars[1] + ".tmp")
    os.remove(str(out / "shard_reports" / os.path.basename(tars[1]).replace(".tar", ".json")))
    index2 = make_shards(str(root), str(out), shard_size_mb=0.03)
    assert open(tars[1], "rb").read() == before[tars[1]][0]
    assert all(os.stat(t).st_mtime_ns == before[t][1] for t in tars if t != tars[1])
    assert not os.path.exists(tars[1] + ".tmp") and index2["shards"] == index["shards"]
    try:
        make_shards(str(root), str(out), shard_size_mb=1.0)
    except ValueError as e:
        assert "other options" in str(e)
    else:
        raise AssertionError("changed options must not reuse the shards")


# ---- the stream ------------------------------------------------------------------


def _fake_shards(folder, counts, seconds=0.2):
    """Shards of short noise samples with ids s<shard>_<n>, and their shards.json."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, n in enumerate(counts):
        name = f"shard-{i:06d}.tar"
        with open(os.path.join(folder, name), "wb") as f, wds.TarWriter(f, encoder=False) as tar:
            for j in range(n):
                dur = seconds * (1 + j % 3)
                meta = {"id": f"s{i}_{j}", "duration": dur, "sample_rate": SR}
                pcm = rng.integers(-3000, 3000, int(dur * SR)).astype(np.int16)
                tar.write({"__key__": f"{j:06d}", "flac": encode_flac(pcm, SR), "json": json.dumps(meta).encode()})
        entries.append({"name": name, "samples": n, "seconds": n * seconds})
    with open(os.path.join(folder, "shards.json"), "w") as f:
        json.dump({"version": 1, "count": len(counts), "samples": sum(counts), "shards": entries}, f)
    return [os.path.join(folder, e["name"]) for e in entries]


def ids_collate(items):
    """A collate that returns the sample ids (module level: picklable for workers)."""
    return [it["id"] for it in items]


def _loader(urls, counts, num_workers, rank=0, world_size=1, **kw):
    kw = {"batch_size": 3, "shuffle_buffer": 4, "bucket_buffer": 4, "seed": 3, **kw}
    stream = ShardStream(urls, counts, ids_collate, crop_seconds=1.0, rank=rank, world_size=world_size, **kw)
    return ShardLoader(stream, num_workers=num_workers)


def test_single_process_workers_see_every_sample_once_and_shuffle(tmp_path):
    counts = [7, 5, 9, 4, 6]
    urls = _fake_shards(str(tmp_path / "sh"), counts)
    everything = {f"s{i}_{j}" for i, n in enumerate(counts) for j in range(n)}
    loader = _loader(urls, counts, num_workers=2, max_batch_length=1.0)
    orders = []
    for _ in range(2):  # two epochs: each sees every sample exactly once, in another order
        seen = [i for batch in loader for i in batch]
        assert len(seen) == len(set(seen)) and set(seen) == everything
        orders.append(seen)
    assert orders[0] != orders[1]
    # object-store style URLs: WebDataset's pipe: (any command writing the tar to stdout)
    piped = shard_urls(f"pipe:cat {tmp_path}/sh/shard-{{000000..000004}}.tar")
    assert piped[0] == f"pipe:cat {tmp_path}/sh/shard-000000.tar" and len(piped) == 5
    seen = [i for batch in _loader(piped, counts, num_workers=2) for i in batch]
    assert sorted(seen) == sorted(everything)
    # dynamic batching: at most 1 s of (longest crop x batch size) per batch
    lengths = {f"s{i}_{j}": 0.2 * (1 + j % 3) for i, n in enumerate(counts) for j in range(n)}
    assert all(len(b) * max(lengths[i] for i in b) <= 1.0 + 1e-9 for b in _loader(urls, counts, 0, max_batch_length=1.0))


def test_resume_mid_shard_continues_where_it_stopped(tmp_path):
    from speechbrain.utils.checkpoints import Checkpointer

    counts = [8, 6, 9, 7]
    urls = _fake_shards(str(tmp_path / "sh"), counts)
    everything = {f"s{i}_{j}" for i, n in enumerate(counts) for j in range(n)}
    loader = _loader(urls, counts, num_workers=2)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), {"loader": loader})
    before = []
    for k, batch in enumerate(loader):
        before += batch
        if k == 4:
            ckpt.save_checkpoint(end_of_epoch=False)
            break
    saved = json.load(open(glob.glob(str(tmp_path / "ckpt" / "*" / "loader.ckpt"))[0]))
    positions = saved["processes"][0]["positions"]
    assert any(p["pending"] for p in positions.values())  # samples waiting in the buffers
    assert any(0 < p["pulled"] for p in positions.values())  # inside a shard

    resumed = _loader(urls, counts, num_workers=2)  # a new process after a kill
    Checkpointer(str(tmp_path / "ckpt"), {"loader": resumed}).recover_if_possible()
    after = [i for batch in resumed for i in batch]
    assert len(before) + len(after) == len(everything) and resumed.remainder == 0  # no sample twice ...
    assert set(before) | set(after) == everything  # ... and none lost
    assert resumed.epoch == 1
    assert sum(p["samples"] for p in resumed.positions.values()) == len(everything)  # counted once
    nxt = [i for batch in resumed for i in batch]  # the next epoch is a whole one again
    assert sorted(nxt) == sorted(everything)


def test_ddp_split_two_processes_two_workers(tmp_path):
    """2 gloo processes x 2 workers: the union of the samples seen is the set, no duplicates."""
    import socket

    counts = [5, 8, 3, 6, 7, 4, 6]
    urls = _fake_shards(str(tmp_path / "sh"), counts)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", os.path.abspath(__file__), str(tmp_path / "sh"), str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    everything = {f"s{i}_{j}" for i, n in enumerate(counts) for j in range(n)}
    for epoch in (1, 2):
        ranks = [json.load(open(tmp_path / "res" / f"{epoch}-{r}.json")) for r in (0, 1)]
        seen = [i for r in ranks for b in r["batches"] for i in b]
        assert len(seen) == len(set(seen))  # no sample twice in the epoch
        assert set(seen) <= everything
        assert len(ranks[0]["batches"]) == len(ranks[1]["batches"])  # same number of steps
        # the shards of the two processes are disjoint and cover the set
        assert sorted(ranks[0]["shards"] + ranks[1]["shards"]) == list(range(len(counts)))
        for r in ranks:
            mine = {f"s{s}_{j}" for s in r["shards"] for j in range(counts[s])}
            assert {i for b in r["batches"] for i in b} <= mine
        # the stated remainder: what the process that did not run out first still held
        # (its share is at most one shard larger, plus the workers' partial last batches)
        assert len(everything) - len(seen) <= max(counts) + 2 * 3, (epoch, len(seen))
        assert ranks[0]["remainder"] == ranks[1]["remainder"] == len(everything) - len(seen)  # as logged
    assert "0 OK" in proc.stdout and "1 OK" in proc.stdout


def _ddp_main(folder, res):
    """Run by torch.distributed.run: each rank streams its share for 2 epochs, writes what it saw."""
    import torch.distributed as dist

    from mgf_sb.distributed import end_process_group, import_before_process_group

    import_before_process_group()  # the recipes' start and end of a group (see mgf_sb.distributed)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        index = load_index(os.path.join(folder, "shards.json"))
        urls = shard_urls(folder, index)
        counts = [s["samples"] for s in index["shards"]]
        loader = _loader(urls, counts, num_workers=2, rank=rank, world_size=world)
        os.makedirs(res, exist_ok=True)
        for epoch in (1, 2):
            batches = [list(b) for b in loader]
            shards = sorted(s for w in loader.stream.plan(epoch) for s in w)
            with open(os.path.join(res, f"{epoch}-{rank}.json"), "w") as f:
                json.dump({"batches": batches, "shards": shards, "remainder": loader.remainder}, f)
        dist.barrier()
        print(f"{rank} OK", flush=True)
    finally:
        end_process_group()


# ---- the recipe ------------------------------------------------------------------

TINY = {"d_model": 32, "num_layers": 2, "nhead": 4, "d_ffn": 64, "proj_dim": 32, "conv_pos_kernel": 9,
        "conv_pos_groups": 4, "dropout": 0.0, "crop_seconds": 3.0, "ckpt_interval_minutes": 0}


def _steps(out):
    return [int(m) for m in re.findall(r"step: (\d+)", open(os.path.join(out, "train_log.txt")).read())]


def test_train_py_on_shards_of_the_bundled_sample_kill_and_resume(tmp_path):
    """`train.py hparams/mgf.yaml --data_format=shards`, SIGKILLed after an intra-epoch
    checkpoint, then rerun: it continues from the shard position and makes the steps
    of an uninterrupted run (one pass over the samples per epoch)."""
    shards = str(tmp_path / "shards")
    make_shards(os.path.join(REPO, "samples", "LibriSpeech"), shards, shard_size_mb=0.5)
    n_train = sum(s["samples"] for s in load_index(os.path.join(shards, "shards.json"))["shards"][:-1])
    train = [sys.executable, os.path.join(REPO, "recipes", "pretrain", "train.py"), os.path.join(REPO, "hparams", "mgf.yaml")]
    common = {**TINY, "data_format": "shards", "shards": shards, "number_of_epochs": 2, "dynamic_batching": False,
              "batch_size": 4, "ckpt_interval_steps": 3, "shuffle_buffer": 8, "bucket_buffer": 8}
    args = lambda out: [f"--{k}={v}" for k, v in {**common, "output_folder": out}.items()]  # noqa: E731

    out = str(tmp_path / "killed")
    proc = subprocess.Popen(train + args(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline, intra = time.time() + 300, None
    while time.time() < deadline and intra is None and proc.poll() is None:
        time.sleep(0.2)
        for meta in glob.glob(os.path.join(out, "save", "CKPT+*", "CKPT.yaml")):
            done = os.path.exists(os.path.join(os.path.dirname(meta), "COMPLETE"))
            if done and "end-of-epoch: false" in open(meta).read():
                intra = meta
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert intra is not None, "no intra-epoch checkpoint appeared"
    assert not os.path.exists(os.path.join(out, "train_log.txt"))  # killed inside epoch 1
    rerun = subprocess.run(train + args(out), capture_output=True, text=True, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    resumed = [int(n) for n in re.findall(r"resuming epoch 1 after (\d+) samples", log)]
    assert resumed and 0 < resumed[-1] < n_train  # from the shard position, not the epoch start
    assert f"epoch 1 done, {n_train} samples" in log and f"epoch 2 done, {n_train} samples" in log
    # the steps of an uninterrupted run: batches of 4, every sample once per epoch
    assert _steps(out) == [-(-n_train // 4), 2 * -(-n_train // 4)]
    assert os.path.isfile(os.path.join(out, "pretrained", "encoder.ckpt"))


if __name__ == "__main__":
    _ddp_main(sys.argv[1], sys.argv[2])
