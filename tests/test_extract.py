"""``python -m mgf_sb.extract <model> <wav folder or list> <out>``: one .npy per file, skip report."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, SAMPLES


@pytest.fixture(scope="module")
def model(tiny_pretrained, tmp_path_factory):
    from mgf_sb.export import export

    return export(tiny_pretrained, str(tmp_path_factory.mktemp("models") / "mgf"))


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Two good files in a nested folder (one 44.1 kHz stereo), plus bad ones."""
    root = tmp_path_factory.mktemp("my audio é")
    src = sorted(os.path.join(SAMPLES, "VoxCeleb1", "wav", "id10001", v, f)
                 for v in os.listdir(os.path.join(SAMPLES, "VoxCeleb1", "wav", "id10001"))
                 for f in os.listdir(os.path.join(SAMPLES, "VoxCeleb1", "wav", "id10001", v)))[:2]
    os.makedirs(root / "a" / "b")
    shutil.copy(src[0], root / "a" / "b" / "one.wav")
    wav, sr = sf.read(src[1], dtype="float32")
    up = torch.nn.functional.interpolate(torch.from_numpy(wav)[None, None], scale_factor=44100 / sr,
                                         mode="linear")[0, 0].numpy()
    sf.write(root / "two.flac", np.stack([up, up], 1), 44100)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("not audio")
    sf.write(root / "short.wav", np.zeros(100, dtype="float32"), 16000)
    return str(root)


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "mgf_sb.extract", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc


def test_extract_folder_writes_one_npy_per_file_and_a_skip_report(model, audio, tmp_path):
    from mgf_sb.inference import MGFEncoder

    out = str(tmp_path / "feats")
    proc = _run(model, audio, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 files encoded" in proc.stdout and "3 skipped" in proc.stdout
    assert "extracting" in proc.stderr  # the progress bar
    enc = MGFEncoder.from_hparams(source=model)
    for rel, src in (("a/b/one.npy", "a/b/one.wav"), ("two.npy", "two.flac")):
        got = np.load(os.path.join(out, rel))
        ref = enc.encode_file(os.path.join(audio, src), layer=None).numpy()
        assert got.shape == ref.shape and got.shape[0] == enc.num_layers
        np.testing.assert_allclose(got, ref, atol=1e-5)
        seconds = sf.info(os.path.join(audio, src)).duration
        assert abs(got.shape[1] / enc.frame_rate - seconds) < 2 / enc.frame_rate  # T at frame_rate
    with open(os.path.join(out, "extract_skipped.tsv"), encoding="utf-8") as f:
        rows = dict(line.rstrip("\n").split("\t") for line in f.readlines()[1:])
    assert {os.path.basename(p) for p in rows} == {"empty.wav", "notes.wav", "short.wav"}
    reasons = {os.path.basename(p): r for p, r in rows.items()}
    assert "empty" in reasons["empty.wav"] and "cannot read" in reasons["notes.wav"]
    assert "too short" in reasons["short.wav"]
    info = json.load(open(os.path.join(out, "extract_info.json")))
    assert info["frame_rate"] == enc.frame_rate and info["skipped"] == 3 and len(info["files"]) == 2
    # a rerun keeps what is there; one layer from a list file
    again = _run(model, audio, out)
    assert again.returncode == 0 and "2 already there" in again.stdout
    info = json.load(open(os.path.join(out, "extract_info.json")))
    assert info["layer"] is None and len(info["files"]) == 2  # what is on disk, still described


def test_a_rerun_with_another_layer_is_refused_or_recomputes_with_overwrite(model, audio, tmp_path):
    """Issue 29: the rerun with another --layer kept the (L, T, D) arrays and rewrote
    extract_info.json as ``layer: -1, (T, D), files: []``: what is on disk was misdescribed."""
    out = str(tmp_path / "feats")
    assert _run(model, audio, out).returncode == 0
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("two.npy", "extract_info.json")}
    proc = _run(model, audio, out, "--layer=-1")
    assert proc.returncode != 0
    assert "other settings" in proc.stderr and "layer: null -> -1" in proc.stderr and "Traceback" not in proc.stderr
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in before} == before  # nothing written
    proc = _run(model, audio, out, "--layer=-1", "--overwrite")
    assert proc.returncode == 0 and "2 files encoded ((T, D)" in proc.stdout
    info = json.load(open(os.path.join(out, "extract_info.json")))
    assert info["layer"] == -1 and info["shape"] == "(T, D)" and len(info["files"]) == 2
    assert np.load(os.path.join(out, "two.npy")).ndim == 2


def test_extract_list_file_one_layer_pt(model, audio, tmp_path):
    lst = tmp_path / "files.txt"
    lst.write_text(f"{os.path.join(audio, 'a', 'b', 'one.wav')}\n\n{os.path.join(audio, 'missing.wav')}\n",
                   encoding="utf-8")
    out = str(tmp_path / "last")
    proc = _run(model, str(lst), out, "--layer=-1", "--format=pt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    feats = torch.load(os.path.join(out, "a", "b", "one.pt"))  # relative to the files' common folder
    assert feats.ndim == 2 and feats.shape[1] == 32  # (T, D): the last layer only
    assert "1 skipped" in proc.stdout and "does not exist" in proc.stdout


def test_extract_errors_are_clear(model, audio, tmp_path):
    proc = _run(model, str(tmp_path / "nothing_here"), str(tmp_path / "o"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    (tmp_path / "empty_dir").mkdir()
    proc = _run(model, str(tmp_path / "empty_dir"), str(tmp_path / "o"))
    assert proc.returncode != 0 and "no audio files" in proc.stderr
    proc = _run(str(tmp_path / "no_model"), audio, str(tmp_path / "o"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "mgf_sb.export" in proc.stderr


def test_readme_inference_snippet(model, audio):
    """docs/inference.md's encoder snippet runs as written (model and file names swapped for local ones)."""
    import re

    with open(os.path.join(REPO, "docs", "inference.md"), encoding="utf-8") as f:
        section = f.read()
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert "MGFEncoder" in code and "wavs, wav_lens =" in code
    code = (code.replace('"models/mgf"', repr(model)).replace('"speech.wav"', repr(os.path.join(audio, "a", "b", "one.wav")))
            .replace('"other.flac"', repr(os.path.join(audio, "two.flac"))))
    env = {}
    exec(compile(code, "docs/inference.md", "exec"), env)
    enc, last, times = env["enc"], env["last"], env["times"]
    seconds = sf.info(os.path.join(audio, "a", "b", "one.wav")).duration
    assert env["layers"].shape[0] == enc.num_layers and last.shape[0] == times.shape[0]
    assert abs(float(times[-1]) - seconds) < 2 / enc.frame_rate
    assert env["batch"].shape[0] == 2 and env["n_frames"].tolist()[0] == last.shape[0]
    assert env["wav_lens"].tolist()[1] == 1.0 or env["wav_lens"].tolist()[0] == 1.0
