"""Shared fixtures: tiny sizes so the whole suite runs in minutes on 2 cores."""

import glob
import os
import sys

import pytest
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "samples")
BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, REPO)


def use_benchmarks():
    """Puts ``benchmarks/`` on ``sys.path`` so that its tools (``tts``, ``quality_corpus``, ...)
    import as the benchmark scripts import them; they are not part of the ``mgf_sb`` library."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)


def load_pretrain_recipe():
    """``recipes/pretrain/train.py`` as a module (its ``main(argv)`` runs the recipe in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_train", os.path.join(REPO, "recipes", "pretrain", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def librispeech_subset(root, n_train, n_dev):
    """Copies the first ``n_train`` train-clean-100 and ``n_dev`` dev-clean files of the bundled
    LibriSpeech sample into ``root`` (same layout) -> ``str(root)``."""
    import shutil

    src = os.path.join(SAMPLES, "LibriSpeech")
    for split, n in (("train-clean-100", n_train), ("dev-clean", n_dev)):
        for f in sorted(glob.glob(os.path.join(src, split, "*", "*", "*.flac")))[:n]:
            rel = os.path.relpath(f, src)
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            shutil.copy(f, os.path.join(root, rel))
    return str(root)


torch.set_num_threads(int(os.environ.get("MGF_TEST_THREADS", "2")))

TINY_ENCODER = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, conv_pos_kernel=9, conv_pos_groups=4, dropout=0.0)


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A tiny pretrained-MGF folder (random weights, real normaliser statistics).

    Built directly with :func:`mgf_sb.pretrained_folder.save_pretrained` from a few
    bundled LibriSpeech-sample files, so downstream tests need no pretraining run.
    """
    from mgf_sb.pretrained_folder import save_pretrained
    from mgf_sb.encoder import MGFEncoder
    from mgf_sb.features import FeatureExtractor

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tiny_pretrained"))
    features = FeatureExtractor(n_mels=80)
    files = sorted(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "train-clean-100", "*", "*", "*.flac")))[:4]
    assert files, "bundled LibriSpeech sample missing"
    features.train()
    for f in files:
        wav, _ = sf.read(f, dtype="float32")
        features(torch.from_numpy(wav)[None], torch.ones(1), epoch=0)
    encoder = MGFEncoder(input_size=80, **TINY_ENCODER)
    save_pretrained(folder, features, encoder, meta={"step": 0, "note": "test fixture"})
    return folder


def run_recipe(script, hparams, overrides, cwd=REPO, timeout=900):
    """Runs a recipe as a user would (a subprocess); returns CompletedProcess.

    Test corpora are sample-sized, so a YAML's ``sample_overrides`` apply to them too
    (``--use_sample_overrides=True``) unless the test passes ``use_sample_overrides``.
    """
    import subprocess

    with open(os.path.join(cwd, hparams), encoding="utf-8") as f:
        if "\nuse_sample_overrides:" in f.read():
            overrides = {"use_sample_overrides": True, **overrides}
    cmd = [sys.executable, script, hparams] + [f"--{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_hostile_audio_folder(root):
    """A folder of 4 usable files (one 8 kHz stereo, one 44.1 kHz) and 6 bad ones.

    Shared by the pretraining prep test and the shard writer's test: both must
    keep ``good/a, good/b, x/hi, x/stereo 8k é`` (16 kHz mono) and skip and list
    ``short.wav, silent.wav, nan.wav, text.wav, empty.flac, truncated.flac``.
    """
    import numpy as np

    def write(path, data, sr=16000, subtype="PCM_16"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sf.write(path, data, sr, subtype=subtype)

    rng = np.random.default_rng(0)
    root = str(root)
    speech = lambda s, sr=16000: (0.1 * rng.standard_normal(int(s * sr))).astype("float32")  # noqa: E731
    write(os.path.join(root, "good", "a.wav"), speech(2.0))
    write(os.path.join(root, "good", "b.flac"), speech(1.5))
    write(os.path.join(root, "x", "stereo 8k é.wav"), np.stack([speech(2.0, 8000)] * 2, 1), sr=8000)
    write(os.path.join(root, "x", "hi.wav"), speech(2.0, 44100), sr=44100)
    write(os.path.join(root, "bad", "short.wav"), speech(0.3))
    write(os.path.join(root, "bad", "silent.wav"), np.zeros(32000, dtype="float32"))
    nan = speech(2.0)
    nan[100] = np.nan
    write(os.path.join(root, "bad", "nan.wav"), nan, subtype="FLOAT")
    with open(os.path.join(root, "bad", "text.wav"), "w") as f:
        f.write("this is not audio")
    open(os.path.join(root, "bad", "empty.flac"), "wb").close()
    with open(os.path.join(root, "good", "b.flac"), "rb") as f:
        flac = f.read()
    with open(os.path.join(root, "bad", "truncated.flac"), "wb") as f:
        f.write(flac[: len(flac) // 3])
    return root
