"""Scale and reliability of the downstream recipes (TIMIT, VoxCeleb1, IEMOCAP, LibriSpeech).

- hostile input at prep time, one test per case and recipe: each case has a
  documented outcome (converted, skipped and listed with its reason, or an
  error naming the file) and no good utterance is lost;
- DDP: torchrun with 2 CPU processes (gloo): TIMIT in full (sharded training
  statistics summed, whole dev/test sets, outputs written once), short runs of
  VoxCeleb1 (+ verification), IEMOCAP (fine-tuned upstream + export) and
  LibriSpeech (rank-0 prep and tokenizer); every recipe's main() calls
  ddp_init_group before anything else;
- resume after an interruption (IEMOCAP, a kill-safe checkpointer that ignores
  a half-written checkpoint) on a corpus full of hostile files under a path
  with spaces and non-ASCII characters;
- bf16 autocast from the command line (VoxCeleb1).

Every corpus is built under ``tmp_path / "my corpus é"``.
"""

import csv
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_recipe
from test_iemocap import DIALOG_LABELS, build_iemocap
from test_librispeech import shortest, write_chapter
from test_timit import build_timit
from test_voxceleb import build_corpus as build_voxceleb

sys.path.insert(0, os.path.join(REPO, "recipes", "TIMIT"))
sys.path.insert(0, os.path.join(REPO, "recipes", "VoxCeleb"))
sys.path.insert(0, os.path.join(REPO, "recipes", "IEMOCAP"))
import timit_prepare as tp  # noqa: E402
from iemocap_prepare import LABEL_MAP, prepare_iemocap  # noqa: E402
from test_librispeech import prep as librispeech_prep  # noqa: E402  (the recipe's prepare module)
from voxceleb_prepare import prepare_voxceleb  # noqa: E402

HOSTILE_DIR = "my corpus é"
AUDIO_CASES = ["empty_file", "zero_length", "truncated_wav", "truncated_flac", "text_as_wav", "sr_8k", "sr_44k",
               "stereo", "nan", "inf", "silence"]
LABEL_CASES = ["non_utf8_label", "malformed_label"]
CONVERTED = {"sr_8k": "resampled 8000->16000 Hz", "sr_44k": "resampled 44100->16000 Hz",
             "stereo": "downmixed 2->1 channels"}
# Outcome of each audio case where the file is skipped (VoxCeleb, IEMOCAP) or
# stops the preparation (TIMIT): the start of the reason / error message.
SKIP_REASON = {"empty_file": "unreadable audio", "zero_length": "empty (zero samples)",
               "truncated_flac": "unreadable audio", "text_as_wav": "unreadable audio",
               "nan": "NaN or Inf samples", "inf": "NaN or Inf samples", "silence": "silent (every sample is zero)"}
TIMIT_ERROR = dict(SKIP_REASON, zero_length="empty audio (zero samples)",
                   truncated_wav="beyond the end of the audio")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _tsv(path):
    from mgf_sb.data.manifest import read_skip_list  # fields are escaped (tab, newline, backslash)

    return dict(read_skip_list(path))


def _ids(folder, splits):
    ids = set()
    for s in splits:
        with open(os.path.join(folder, f"{s}.csv"), newline="", encoding="utf-8") as f:
            ids |= {r["ID"] for r in csv.DictReader(f)}
    return ids


def _rows(folder, splits):
    rows = {}
    for s in splits:
        with open(os.path.join(folder, f"{s}.csv"), newline="", encoding="utf-8") as f:
            rows.update({r["ID"]: r for r in csv.DictReader(f)})
    return rows


def make_hostile(path, case):
    """Replaces the audio file ``path`` by the hostile ``case`` (same duration where it has one)."""
    x, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and x.ndim == 1
    os.remove(path)
    if case == "empty_file":
        open(path, "wb").close()
    elif case == "zero_length":
        sf.write(path, np.zeros(0, "float32"), 16000, format="WAV", subtype="PCM_16")
    elif case == "truncated_wav":  # the header announces every sample, 3/4 of them are there
        sf.write(path, x, 16000, format="WAV", subtype="PCM_16")
        with open(path, "r+b") as f:
            f.truncate(44 + 2 * (3 * len(x) // 4))
    elif case == "truncated_flac":  # a FLAC stream cut in the middle (libsndfile reads by content)
        sf.write(path, x, 16000, format="FLAC", subtype="PCM_16")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif case == "text_as_wav":
        with open(path, "w") as f:
            f.write("this is a text file, not audio\n")
    elif case == "sr_8k":
        sf.write(path, x[::2], 8000, format="WAV", subtype="PCM_16")
    elif case == "sr_44k":
        t = np.arange(int(len(x) * 44100 / 16000)) * 16000 / 44100
        sf.write(path, np.interp(t, np.arange(len(x)), x).astype("float32"), 44100, format="WAV", subtype="PCM_16")
    elif case == "stereo":
        sf.write(path, np.stack([x, 0.5 * x], 1), 16000, format="WAV", subtype="PCM_16")
    elif case in ("nan", "inf"):
        x = x.copy()
        x[len(x) // 2] = np.nan if case == "nan" else np.inf
        sf.write(path, x, 16000, format="WAV", subtype="FLOAT")
    elif case == "silence":
        sf.write(path, np.zeros_like(x), 16000, format="WAV", subtype="PCM_16")
    else:
        raise ValueError(case)
    return len(x) / 16000


def _check_converted(wav, case, seconds):
    data, sr = sf.read(wav, dtype="float32", always_2d=True)
    assert sr == 16000 and data.shape[1] == 1 and np.isfinite(data).all()
    assert abs(data.shape[0] / 16000 - seconds) < 0.01, (case, data.shape, seconds)


# ---------------------------------------------------------------- TIMIT


TIMIT_TARGET = ("TRAIN", "DR2", "MAEB0", "SX31")


@pytest.fixture(scope="module")
def timit_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("timit") / HOSTILE_DIR / "TIMIT"
    build_timit(root)
    out = str(root.parent / "prep")
    tp.prepare_timit(str(root), out)
    return str(root), _rows(out, tp.SPLITS)


@pytest.mark.parametrize("case", AUDIO_CASES + LABEL_CASES)
def test_timit_hostile_input(case, timit_clean, tmp_path):
    clean_root, clean_rows = timit_clean
    root = str(tmp_path / HOSTILE_DIR / "TIMIT")
    shutil.copytree(clean_root, root)
    stem = os.path.join(root, *TIMIT_TARGET)
    if case == "non_utf8_label":
        with open(stem + ".PHN", "ab") as f:
            f.write(b"8000 8000 h\xe9\n")
        expected = (stem + ".PHN", "not ASCII text (byte 0xe9)")
    elif case == "malformed_label":
        with open(stem + ".PHN", "a") as f:
            f.write("8000 h#\n")
        expected = (stem + ".PHN", "malformed line")
    else:
        if case == "sr_8k":  # a consistently resampled copy: the PHN offsets in 8 kHz samples
            with open(stem + ".PHN") as f:
                phn = [line.split() for line in f]
            with open(stem + ".PHN", "w") as f:
                f.writelines(f"{int(a) // 2} {int(b) // 2} {p}\n" for a, b, p in phn)
        seconds = make_hostile(stem + ".WAV", case)  # (44.1 kHz keeps its PHN in 16 kHz samples)
        expected = None if case in CONVERTED else (stem, TIMIT_ERROR[case])
    out = str(tmp_path / "prep")
    if expected is not None:  # TIMIT is a fixed benchmark: an error naming the file, never a silent skip
        with pytest.raises(tp.TIMITError) as err:
            tp.prepare_timit(root, out)
        assert expected[0] in str(err.value) and expected[1] in str(err.value), str(err.value)
        return
    tp.prepare_timit(root, out)
    rows = _rows(out, tp.SPLITS)
    assert set(rows) == set(clean_rows)  # nothing lost
    utt = "_".join(TIMIT_TARGET[2:])
    assert os.path.dirname(rows[utt]["wav"]) == os.path.join(out, "converted")
    _check_converted(rows[utt]["wav"], case, seconds)
    assert rows[utt]["segments"] == clean_rows[utt]["segments"]  # PHN offsets rescaled to 16 kHz
    assert rows[utt]["frame_labels"] == clean_rows[utt]["frame_labels"]
    assert CONVERTED[case] in _tsv(os.path.join(out, "timit_converted.tsv"))[os.path.abspath(stem + ".WAV")]
    for other in set(rows) - {utt}:
        assert rows[other]["wav"] == clean_rows[other]["wav"].replace(clean_root, root)


# ---------------------------------------------------------------- VoxCeleb1


VOX_TARGET = "id10001/vidA1/00002.wav"  # a training file of a speaker with other training files


@pytest.fixture(scope="module")
def voxceleb_clean(tmp_path_factory):
    root = build_voxceleb(str(tmp_path_factory.mktemp("vox") / HOSTILE_DIR / "VoxCeleb1"), split_layout=False)
    out = str(tmp_path_factory.mktemp("vox_prep"))
    prepare_voxceleb(root, out)
    return root, _rows(out, ("train", "dev", "test")), len(_tsv(os.path.join(out, "voxceleb_skipped.tsv")))


@pytest.mark.parametrize("case", AUDIO_CASES + LABEL_CASES)
def test_voxceleb_hostile_input(case, voxceleb_clean, tmp_path):
    clean_root, clean_rows, clean_skipped = voxceleb_clean  # the fixture has bad lines of its own
    root = str(tmp_path / HOSTILE_DIR / "VoxCeleb1")
    shutil.copytree(clean_root, root)
    target = os.path.join(root, "wav", VOX_TARGET)
    split_file = os.path.join(root, "iden_split.txt")
    with open(split_file, "rb") as f:
        lines = f.read().split(b"\n")
    n = lines.index(b"1 " + VOX_TARGET.encode()) + 1
    if case in LABEL_CASES:
        bad = b"1 id10001/vidA1/00002\xe9.wav" if case == "non_utf8_label" else b"1|" + VOX_TARGET.encode()
        lines[n - 1] = bad
        with open(split_file, "wb") as f:
            f.write(b"\n".join(lines))
        listed, reason = f"{split_file}:{n}", ("not valid UTF-8 (byte 0xe9" if case == "non_utf8_label"
                                               else "malformed split line")
    else:
        seconds = make_hostile(target, case)
        listed, reason = target, SKIP_REASON.get(case)
    out = str(tmp_path / "prep")
    prepare_voxceleb(root, out)
    rows = _rows(out, ("train", "dev", "test"))
    utt = VOX_TARGET[:-4]
    skipped = _tsv(os.path.join(out, "voxceleb_skipped.tsv"))
    if reason is not None:  # skipped and listed with its reason; every other utterance kept
        assert skipped[listed].startswith(reason), skipped
        assert set(rows) == set(clean_rows) - {utt} and len(skipped) == clean_skipped + 1
        return
    assert set(rows) == set(clean_rows)
    assert len(skipped) == clean_skipped and target not in skipped
    if case == "truncated_wav":  # the readable part is kept with its real duration
        assert float(rows[utt]["duration"]) == pytest.approx(0.75 * seconds, abs=0.01)
        assert rows[utt]["wav"] == target
    else:
        _check_converted(rows[utt]["wav"], case, seconds)
        assert CONVERTED[case] in _tsv(os.path.join(out, "voxceleb_converted.tsv"))[target]


# ---------------------------------------------------------------- IEMOCAP


IEMOCAP_TARGET = ("Ses01F_impro01", "Ses01F_impro01_F000")  # a 'neu' utterance


@pytest.fixture(scope="module")
def iemocap_clean(tmp_path_factory):
    root = build_iemocap(str(tmp_path_factory.mktemp("iemocap") / HOSTILE_DIR / "IEMOCAP_full_release"))
    out = str(tmp_path_factory.mktemp("iemocap_prep"))
    prepare_iemocap(root, out, out + "/fold", test_session=5)
    return root, _rows(out + "/fold", ("train", "valid", "test"))


@pytest.mark.parametrize("case", AUDIO_CASES + LABEL_CASES)
def test_iemocap_hostile_input(case, iemocap_clean, tmp_path):
    clean_root, clean_rows = iemocap_clean
    root = str(tmp_path / HOSTILE_DIR / "IEMOCAP_full_release")
    shutil.copytree(clean_root, root)
    dialog, utt = IEMOCAP_TARGET
    target = os.path.join(root, "Session1", "sentences", "wav", dialog, utt + ".wav")
    emo = os.path.join(root, "Session1", "dialog", "EmoEvaluation", dialog + ".txt")
    if case in LABEL_CASES:
        with open(emo, "rb") as f:
            lines = f.read().split(b"\n")
        n = next(i for i, line in enumerate(lines, 1) if b"\t" + utt.encode() + b"\t" in line)
        if case == "non_utf8_label":
            lines[n - 1] = lines[n - 1].replace(b"\tneu\t", b"\tneu\xe9\t")
            reason = "not valid UTF-8 (byte 0xe9"
        else:
            lines[n - 1] = lines[n - 1].replace(b"\t", b" ")
            reason = "malformed annotation line"
        with open(emo, "wb") as f:
            f.write(b"\n".join(lines))
        listed = f"{emo}:{n}"
    else:
        seconds = make_hostile(target, case)
        listed, reason = target, SKIP_REASON.get(case)
    out = str(tmp_path / "prep")
    prepare_iemocap(root, out, out + "/fold", test_session=5)
    rows = _rows(out + "/fold", ("train", "valid", "test"))
    skipped = _tsv(os.path.join(out, "iemocap_skipped.tsv"))
    if reason is not None:
        assert skipped[listed].startswith(reason), skipped
        if case in LABEL_CASES:  # and its audio is listed as unlabelled, not used silently
            assert skipped[target].startswith("audio without a label")
        assert set(rows) == set(clean_rows) - {utt}
        return
    assert set(rows) == set(clean_rows) and not skipped
    if case == "truncated_wav":
        assert float(rows[utt]["duration"]) == pytest.approx(0.75 * seconds, abs=0.01)
    else:
        _check_converted(rows[utt]["wav"], case, seconds)
        assert CONVERTED[case] in _tsv(os.path.join(out, "iemocap_converted.tsv"))[target]


# ---------------------------------------------------------------- LibriSpeech


LS_SPLITS = ("train", "valid", "test-clean")


def _build_librispeech(root):
    utts = shortest(6)
    write_chapter(root, "train-clean-100", utts[:4])
    write_chapter(root, "dev-clean", utts[4:])
    write_chapter(root, "test-clean", utts[4:])
    return root, utts[0][0]  # a training utterance as the target


def _prepare_librispeech(root, out):
    return librispeech_prep.prepare_librispeech(root, out, ["train-clean-100"], ["dev-clean"], ["test-clean"])


@pytest.fixture(scope="module")
def librispeech_clean(tmp_path_factory):
    root, target = _build_librispeech(str(tmp_path_factory.mktemp("ls") / HOSTILE_DIR / "LibriSpeech"))
    out = str(tmp_path_factory.mktemp("ls_prep"))
    _prepare_librispeech(root, out)
    assert not _tsv(os.path.join(out, "train_skipped.tsv"))
    return root, _rows(out, LS_SPLITS), target


@pytest.mark.parametrize("case", AUDIO_CASES + LABEL_CASES)
def test_librispeech_hostile_input(case, librispeech_clean, tmp_path):
    clean_root, clean_rows, utt = librispeech_clean
    root = str(tmp_path / HOSTILE_DIR / "LibriSpeech")
    shutil.copytree(clean_root, root)
    spk, chap, _ = utt.split("-")
    folder = os.path.join(root, "train-clean-100", spk, chap)
    target = os.path.join(folder, utt + ".flac")
    trans = os.path.join(folder, f"{spk}-{chap}.trans.txt")
    if case in LABEL_CASES:
        with open(trans, "rb") as f:
            lines = f.read().split(b"\n")
        n = next(i for i, line in enumerate(lines, 1) if line.startswith(utt.encode() + b" "))
        if case == "non_utf8_label":
            lines[n - 1] = lines[n - 1] + b" CAF\xe9"
            reason = "not valid UTF-8 (byte 0xe9"
        else:
            lines[n - 1] = utt.encode()
            reason = "empty or malformed transcript line"
        with open(trans, "wb") as f:
            f.write(b"\n".join(lines))
        listed = f"{trans}:{n}"
    else:
        seconds = make_hostile(target, case)
        listed, reason = target, SKIP_REASON.get(case)
    out = str(tmp_path / "prep")
    _prepare_librispeech(root, out)
    rows = _rows(out, LS_SPLITS)
    skipped = _tsv(os.path.join(out, "train_skipped.tsv"))
    if reason is not None:
        assert skipped[listed].startswith(reason), skipped
        if case in LABEL_CASES:  # and its audio is listed as untranscribed, not used silently
            assert skipped[target].startswith("audio without a transcript")
        assert set(rows) == set(clean_rows) - {utt}
        return
    assert set(rows) == set(clean_rows) and not skipped
    assert rows[utt]["wrd"] == clean_rows[utt]["wrd"]
    if case == "truncated_wav":
        assert float(rows[utt]["duration"]) == pytest.approx(0.75 * seconds, abs=0.01)
    else:
        _check_converted(rows[utt]["wav"], case, seconds)
        assert CONVERTED[case] in _tsv(os.path.join(out, "train_converted.tsv"))[target]


# ---------------------------------------------------------------- inference


INFERENCE_ERROR = {"empty_file": "is empty (0 bytes)", "zero_length": "contains no samples",
                   "truncated_flac": "cannot read", "text_as_wav": "cannot read", "nan": "NaN or Inf samples",
                   "inf": "NaN or Inf samples"}


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_inference_reads_or_names_the_file(case, tmp_path, tiny_pretrained):
    """mgf_sb.inference (encode_file / classify_file read through read_audio_file): an error naming
    the file, or 16 kHz mono audio the model encodes to finite values."""
    import torch

    from mgf_sb.inference import read_audio_file
    from mgf_sb.upstream import Upstream

    path = str(tmp_path / HOSTILE_DIR / f"{case}.wav")
    os.makedirs(os.path.dirname(path))
    sf.write(path, (0.3 * np.sin(np.arange(16000) * 0.05)).astype("float32"), 16000)
    seconds = make_hostile(path, case)
    if case in INFERENCE_ERROR:
        with pytest.raises(ValueError) as err:
            read_audio_file(path)
        assert path in str(err.value) and INFERENCE_ERROR[case] in str(err.value)
        return
    wav = read_audio_file(path)
    assert wav.ndim == 1 and torch.isfinite(wav).all()
    expected = 0.75 * seconds if case == "truncated_wav" else seconds
    assert abs(wav.shape[0] / 16000 - expected) < 0.01
    layers, _ = Upstream(tiny_pretrained).eval()(wav[None], torch.ones(1))
    assert all(torch.isfinite(h).all() for h in layers)  # silence included


# ---------------------------------------------------------------- DDP


def _load_train(recipe):
    path = os.path.join(REPO, "recipes", recipe, "train.py")
    spec = importlib.util.spec_from_file_location(f"reliability_{recipe}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DDPInit(Exception):
    pass


@pytest.mark.parametrize("recipe,hparams", [("TIMIT", "timit.yaml"), ("VoxCeleb", "voxceleb.yaml"),
                                            ("IEMOCAP", "emotion.yaml"), ("LibriSpeech", "librispeech_ctc.yaml")])
def test_main_calls_ddp_init_group_first(recipe, hparams, tmp_path, monkeypatch):
    """torchrun support: main() initialises the process group right after parsing the arguments."""
    import speechbrain as sb

    seen = {}

    def fake_init(run_opts):
        seen["run_opts"] = run_opts
        raise _DDPInit

    monkeypatch.setattr(sb.utils.distributed, "ddp_init_group", fake_init)
    module = _load_train(recipe)
    out = str(tmp_path / "out")
    with pytest.raises(_DDPInit):
        module.main([os.path.join(REPO, "hparams", hparams), f"--output_folder={out}",
                     f"--experiment_folder={out}", "--distributed_backend=gloo"])
    assert seen["run_opts"]["distributed_backend"] == "gloo"
    assert not os.path.exists(out)  # before any output (and before data preparation)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _labelled_frames(manifest):
    with open(manifest, newline="", encoding="utf-8") as f:
        return sum(lab != tp.IGNORE for r in csv.DictReader(f) for lab in r["frame_labels"].split())


def test_timit_ddp_two_processes_gloo(tmp_path):
    """torchrun, 2 CPU processes: the training set is sharded and its statistics summed over both;
    dev/test are not sharded (each process scores the whole set); results and checkpoints written once."""
    out = str(tmp_path / "ddp out é")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(REPO, "recipes", "TIMIT", "train.py"),
           os.path.join(REPO, "hparams", "timit.yaml"), "--distributed_backend=gloo", f"--output_folder={out}",
           "--number_of_epochs=2", "--num_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    log = open(os.path.join(out, "train_log.txt")).read().splitlines()
    epochs = [line for line in log if line.startswith("epoch:")]
    assert len(epochs) == 2  # logged once (rank 0), not once per process
    # the training confusion matrix is the sum over both shards: every training frame is counted
    # (DistributedSampler pads an odd count with one repeated utterance)
    train_frames = int(re.search(r"train frames: (\d+)", epochs[-1]).group(1))
    total = _labelled_frames(os.path.join(out, "data", "train.csv"))
    assert total <= train_frames < 1.5 * total, (train_frames, total)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    for split in ("dev", "test"):  # the whole set, not a half
        assert res[split]["frames"] == _labelled_frames(os.path.join(out, "data", f"{split}.csv"))
        assert np.isfinite(res[split]["acc"]) and np.isfinite(res[split]["loss"])
    assert proc.stdout.count("| test |") == 1  # the table is printed by rank 0 only
    ckpts = [d for d in os.listdir(os.path.join(out, "save")) if d.startswith("CKPT")]
    assert len(ckpts) == 1 and os.path.isfile(os.path.join(out, "save", ckpts[0], "COMPLETE"))


def _torchrun(script, hparams, overrides, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(REPO, script), os.path.join(REPO, hparams),
           "--distributed_backend=gloo"] + [f"--{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def test_voxceleb_ddp_smoke(tmp_path):
    """2 processes: identification + verification (the DDP-wrapped head's embeddings), results once."""
    out = str(tmp_path / "vox")
    _torchrun("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml",
              dict(output_folder=out, number_of_epochs=2, num_threads=1, batch_size=4))
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["n_test"] == len(_ids(os.path.join(out, "data"), ["test"]))  # the whole test set
    assert np.isfinite(res["sid_test_acc"]) and 0.0 <= res["eer"] <= 1.0
    with open(os.path.join(out, "veri_scores.txt")) as f:
        assert len(f.read().splitlines()) == res["n_trials"]  # written once, every trial
    epochs = [line for line in open(os.path.join(out, "train_log.txt")) if line.startswith("epoch:")]
    assert len(epochs) == 2


def test_iemocap_ddp_finetuned_upstream_smoke(tmp_path, tiny_pretrained):
    """2 processes, the upstream fine-tuned (DDP-wrapped, with its own optimiser); export written once."""
    root = build_iemocap(str(tmp_path / HOSTILE_DIR / "IEMOCAP_full_release"))
    exp = str(tmp_path / "exp")
    _torchrun("recipes/IEMOCAP/train.py", "hparams/emotion.yaml",
              dict(data_folder=root, experiment_folder=exp, manifest_folder=str(tmp_path / "m"), batch_size=4,
                   num_threads=1, number_of_epochs=1, upstream=tiny_pretrained, freeze=False,
                   upstream_lr=0.001))
    out = os.path.join(exp, "session5")
    res = json.load(open(os.path.join(out, "test_results.json")))
    assert res["n_utterances"] == 12 and not res["freeze"]  # the whole test session
    ckpts = [d for d in os.listdir(os.path.join(out, "save")) if d.startswith("CKPT")]
    assert len(ckpts) == 1
    assert os.path.isfile(os.path.join(out, "save", ckpts[0], "upstream_optimizer.ckpt"))
    assert os.path.isfile(os.path.join(out, "model", "upstream", "encoder.ckpt"))


def test_librispeech_ddp_smoke(tmp_path):
    """2 processes: rank 0 prepares and trains the tokenizer, both train; every test utterance is decoded."""
    root, _ = _build_librispeech(str(tmp_path / HOSTILE_DIR / "LibriSpeech"))
    out = str(tmp_path / "asr")
    _torchrun("recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml",
              dict(data_folder=root, output_folder=out, test_splits="[test-clean]", number_of_epochs=2,
                   lstm_layers=1, lstm_hidden=32, batch_size=1, beam_size=2, num_threads=1))
    res = json.load(open(os.path.join(out, "results.json")))["splits"]["test-clean"]
    assert res["utterances"] == 2 and np.isfinite(res["greedy_WER"]) and np.isfinite(res["beam_WER"])
    assert os.path.isfile(os.path.join(out, "wer_test-clean.txt"))
    assert os.path.isfile(os.path.join(out, "tokenizer", "29_char.model"))
    epochs = [line for line in open(os.path.join(out, "train_log.txt")) if line.startswith("epoch:")]
    assert len(epochs) == 2


# ---------------------------------------------------------------- resume, bf16


def test_iemocap_hostile_corpus_trains_and_resumes_after_interruption(tmp_path):
    """Every hostile audio case at once (other utterances), a path with spaces and 'é'; training
    never meets them; a rerun resumes from the last complete checkpoint, ignoring a half-written one."""
    root = build_iemocap(str(tmp_path / HOSTILE_DIR / "IEMOCAP_full_release"))
    usable = [os.path.join(root, "Session1", "sentences", "wav", d, f"{d}_{'FM'[i % 2]}{i // 2:03d}.wav")
              for d in ("Ses01F_impro01", "Ses01F_script01_1") for i, lab in enumerate(DIALOG_LABELS)
              if lab in LABEL_MAP]  # (utterances with other labels are dropped before decoding)
    for case, path in zip(AUDIO_CASES, usable):
        make_hostile(path, case)
    exp = str(tmp_path / "exp é")
    ov = dict(data_folder=root, experiment_folder=exp, manifest_folder=str(tmp_path / "m"), batch_size=8,
              num_threads=1, test_session=5, number_of_epochs=1)
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", ov)
    out = os.path.join(exp, "session5")
    assert "epoch: 1" in open(os.path.join(out, "train_log.txt")).read()
    skipped = _tsv(os.path.join(str(tmp_path / "m"), "iemocap_skipped.tsv"))
    assert len(skipped) == len(SKIP_REASON)  # the unusable ones, listed; the others converted or kept
    assert len(_tsv(os.path.join(str(tmp_path / "m"), "iemocap_converted.tsv"))) == len(CONVERTED)

    # A kill while saving the next checkpoint left a folder with its meta file only.
    save = os.path.join(out, "save")
    (good,) = [d for d in os.listdir(save) if d.startswith("CKPT")]
    broken = os.path.join(save, "CKPT+2099-01-01+00-00-00+00")
    os.makedirs(broken)
    shutil.copy(os.path.join(save, good, "CKPT.yaml"), broken)
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", dict(ov, number_of_epochs=2))
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "ignoring incomplete checkpoint" in log
    assert os.path.isdir(os.path.join(save, "incomplete-" + os.path.basename(broken)))
    assert re.findall(r"Loading a checkpoint from (.+)$", log, re.M)[0].rstrip().endswith(good)
    epochs = [line for line in open(os.path.join(out, "train_log.txt")) if line.startswith("epoch:")]
    assert [line.split(",")[0] for line in epochs] == ["epoch: 1", "epoch: 2"]  # epoch 1 not trained again
    res = json.load(open(os.path.join(out, "test_results.json")))
    assert res["n_utterances"] == 12 and 0.0 <= res["UA"] <= 1.0


def test_voxceleb_bf16_from_the_command_line(tmp_path):
    out = str(tmp_path / "bf16")
    proc = run_recipe("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml",
                      dict(output_folder=out, number_of_epochs=2, num_threads=1, precision="bf16"))
    assert "--precision=bf16" in proc.stdout + proc.stderr
    res = json.load(open(os.path.join(out, "results.json")))
    for key in ("sid_test_acc", "sid_test_loss", "eer", "min_dcf"):
        assert np.isfinite(res[key]), (key, res)
    log = open(os.path.join(out, "train_log.txt")).read()
    losses = [float(v) for v in re.findall(r"train loss: ([0-9.e+-]+)", log)]
    assert len(losses) == 2 and all(np.isfinite(losses))
