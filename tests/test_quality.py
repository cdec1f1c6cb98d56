"""The quality benchmark: its corpus, its probes, and the whole pipeline on the tiny budget."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import quality  # noqa: E402
from quality_probe import ProbeData, phone_probe, speaker_probe  # noqa: E402

from mgf_sb.data.quality_corpus import CorpusSpec, draw_speakers, frame_labels, plan_jobs  # noqa: E402


def test_frame_labels_take_the_phone_at_each_frame_centre():
    phones = [(0.0, 0.1, "pau"), (0.1, 0.15, "m"), (0.15, 0.3, "aa")]
    inv = {"pau": 0, "m": 1, "aa": 2}
    lab = frame_labels(phones, 32, inventory=inv)
    centres = 0.0125 + 0.01 * np.arange(32)
    expect = np.where(centres < 0.1, 0, np.where(centres < 0.15, 1, 2))
    assert lab.tolist() == expect.tolist()  # frames past the end keep the last phone


def test_default_corpus_plan_has_enough_disjoint_voices():
    spec = CorpusSpec()
    pre, probe = draw_speakers(spec)
    assert len(pre) + len(probe) >= 40 and len(pre) >= 40
    assert {s.voice.engine for s in pre} == {"festival", "flite", "espeak"}
    assert {s.voice.engine for s in probe} == {"festival"}  # phone timings
    assert not {s.id for s in pre} & {s.id for s in probe}
    # held-out voices are new draws, not copies of pretraining voices
    key = lambda s: (s.voice.name, round(s.voice.pitch, 3), round(s.voice.rate, 3))  # noqa: E731
    assert not {key(s) for s in pre} & {key(s) for s in probe}
    # per-speaker variation really varies
    assert np.std([s.voice.pitch for s in pre]) > 1.5 and np.std([s.voice.rate for s in pre]) > 0.05
    jobs, _, _ = plan_jobs(spec, "/x")
    assert len(jobs) == 48 * 31 + 24 * 16
    assert draw_speakers(spec) == (pre, probe)  # deterministic
    assert CorpusSpec(seed=1).key() != spec.key()


def test_time_to_pass_interpolates_and_reports_never():
    pts = [(100, 50.0), (200, 60.0), (300, 70.0)]
    assert quality.time_to_pass(pts, 65.0) == pytest.approx(250.0)
    assert quality.time_to_pass(pts, 40.0) == 100.0
    assert quality.time_to_pass(pts, 75.0) is None


def _fake_corpus(tmp_path, n_voices=8, n_utts=6, seed=0):
    """Voices whose utterances are noise; phones are random; used to test the probe splits."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_voices):
        for u in range(n_utts):
            path = f"probe/h{v:03d}/h{v:03d}-{u:03d}.flac"
            os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
            sf.write(tmp_path / path, (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
            cuts = np.sort(rng.uniform(0, 1, 5))
            bounds = [0.0, *cuts, 1.0]
            phones = [[bounds[i], bounds[i + 1], str(rng.choice(["a", "b", "c"]))] for i in range(6)]
            rows.append({"path": path, "speaker": f"h{v:03d}", "phones": phones, "duration": 1.0})
    return {"probe": rows, "folder": str(tmp_path)}


def test_probe_splits_hold_out_voices_for_phones_and_utterances_for_speakers(tmp_path):
    data = ProbeData(_fake_corpus(tmp_path))
    voices = {r: set(data.speaker[data.phone_role == r]) for r in ("train", "dev", "test")}
    assert all(voices.values())
    assert not voices["train"] & voices["dev"] and not voices["train"] & voices["test"]
    assert not voices["dev"] & voices["test"]
    for s in range(data.n_speakers):  # every voice has train, dev and test utterances
        assert set(data.speaker_role[data.speaker == s]) == {"train", "dev", "test"}
    assert len(data.labels[0]) == 16000 // 160 + 1


def test_phone_probe_chooses_the_informative_layer_on_dev(tmp_path):
    data = ProbeData(_fake_corpus(tmp_path))
    g = torch.Generator().manual_seed(0)
    n_cls = len(data.phones)
    noise = [torch.randn(len(lab), 8, generator=g) for lab in data.labels]
    informative = [torch.nn.functional.one_hot(torch.from_numpy(lab), n_cls).float() * 3
                   + 0.5 * torch.randn(len(lab), n_cls, generator=g) for lab in data.labels]
    res = phone_probe([noise, informative, noise], data, max_iter=50)
    assert res["layer"] == 1
    assert res["test"] > 95 and max(res["dev"][0], res["dev"][2]) < 60

    # speaker probe: layer 0 pooled statistics carry the speaker, layer 1 is noise
    y = torch.from_numpy(data.speaker)
    spk = torch.nn.functional.one_hot(y, data.n_speakers).float() * 2 + 0.3 * torch.randn(len(y), data.n_speakers)
    res = speaker_probe([spk, torch.randn(len(y), data.n_speakers)], data)
    assert res["layer"] == 0 and res["test"] == 100.0


def test_benchmark_pipeline_end_to_end_on_the_tiny_budget(tmp_path):
    """Corpus (TTS) -> 2 pretraining runs (the recipe) -> probes -> report, table, plots."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality.py"), "--budget=tiny", f"--cache={cache}",
           f"--out={out}", "--threads=2"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.load(open(out / "results.json"))
    assert set(res["table"]) == {"full MGF", "frame", "fbank", "fbank+-5", "random"}
    for row in res["table"].values():
        assert 0 <= row["phones"] <= 100 and 0 <= row["speakers"] <= 100
    # fbank +-5 frames sees strictly more than one frame: never much worse on phones
    assert res["table"]["fbank+-5"]["phones"] > res["table"]["fbank"]["phones"] - 5
    assert res["steps"] == res["epochs"] * res["steps_per_epoch"] > 0
    assert res["curves"]["full MGF"]["steps"] == [res["steps_per_epoch"], res["steps"]]
    assert set(res["curves"]) == {"full MGF"}
    assert set(res["mean_ranks"]) == set(res["table"]) and res["best_single_scale"] == "frame"
    for png in ("quality_bars.png", "quality_curve.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "| full MGF |" in text and "mean rank" in text and "optimiser steps" in text
    # a rerun reuses every finished step
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "already done" in proc.stdout and "generating" not in proc.stdout
