"""Scale and reliability: kill-and-resume, DDP (gloo, 2 processes), bf16, safe loading."""

import glob
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SAMPLES
from test_pretrain import TINY, parse_log

PRETRAIN = os.path.join(REPO, "recipes", "pretrain", "train.py")
HPARAMS = os.path.join(REPO, "hparams", "mgf.yaml")


def _args(out, data, **extra):
    args = {**TINY, "data_folder": data, "output_folder": out, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled LibriSpeech sample, copied under a path with a space and non-ASCII characters."""
    root = tmp_path_factory.mktemp("corpus") / "my corpus é"
    shutil.copytree(os.path.join(SAMPLES, "LibriSpeech"), root)
    return str(root)


def _final_step(out):
    return parse_log(os.path.join(out, "train_log.txt"))[-1]["step"]


def test_sigkill_during_training_then_rerun_resumes(corpus, tmp_path):
    common = dict(number_of_epochs=2, max_batch_length=8, ckpt_interval_minutes=0, ckpt_interval_steps=3)
    # Reference: an uninterrupted run.
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, PRETRAIN, HPARAMS] + _args(ref, corpus, **common), check=True,
                   capture_output=True, env=_env(), timeout=600)
    total = _final_step(ref)

    out = str(tmp_path / "killed")
    cmd = [sys.executable, PRETRAIN, HPARAMS] + _args(out, corpus, **common)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    intra = []
    while time.time() < deadline and not intra:
        time.sleep(0.2)
        for meta in glob.glob(os.path.join(out, "save", "CKPT+*", "CKPT.yaml")):
            if "end-of-epoch: false" in open(meta).read() and os.path.exists(os.path.join(os.path.dirname(meta), "COMPLETE")):
                intra.append(meta)
    assert intra, "no intra-epoch checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "train_log.txt")) or len(parse_log(os.path.join(out, "train_log.txt"))) < 2

    # A checkpoint half-written when the kill landed: meta file, no parameters.
    broken = os.path.join(out, "save", "CKPT+2099-01-01+00-00-00+00")
    os.makedirs(broken)
    shutil.copy(intra[0], os.path.join(broken, "CKPT.yaml"))

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "ignoring incomplete checkpoint" in log
    loaded = re.findall(r"Loading a checkpoint from (\S+)", log)
    assert loaded and "2099" not in loaded[-1]
    # Step counter, optimiser/scheduler and sampler position came back: the
    # interrupted run did exactly the steps of the uninterrupted one.
    assert _final_step(out) == total
    rows = parse_log(os.path.join(out, "train_log.txt"))
    assert rows[-1]["epoch"] == 2


def _free_port():
    import socket

    with socket.socket() as sock:  # a free port, so parallel or stale runs cannot collide
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_batchnorm_and_contrastive_keys_are_exact():
    """GlobalBatchNorm1d and gathered NT-Xent keys under 2 gloo processes = one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", os.path.join(REPO, "tests", "ddp_exact_check.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "0 OK" in proc.stdout and "1 OK" in proc.stdout


def test_ddp_two_processes_match_one_process(corpus, tmp_path):
    """torchrun, 2 CPU processes (gloo), each with half the batch = 1 process with the whole batch."""
    common = dict(number_of_epochs=3, lr=0.002, lr_warmup_steps=2, lr_total_steps=50, dynamic_batching=False)
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, PRETRAIN, HPARAMS] + _args(one, corpus, batch_size=8, **common),
                   check=True, capture_output=True, env=_env(), timeout=600)
    two = str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "--master_addr=127.0.0.1"]
    proc = subprocess.run(torchrun + [PRETRAIN, HPARAMS, "--distributed_backend=gloo"]
                          + _args(two, corpus, batch_size=4, **common),
                          capture_output=True, text=True, env=_env(), timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a clean exit: the process group is left before interpreter shutdown (mgf_sb.recipe), no SIGABRT
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-4000:]
    assert not os.path.exists(os.path.join(two, ".mgf_lock"))  # the output-folder lock is released
    a, b = parse_log(os.path.join(one, "train_log.txt")), parse_log(os.path.join(two, "train_log.txt"))
    assert len(a) == len(b) == 3
    # Same number of optimiser steps (same global batch of 8 utterances)
    assert a[-1]["step"] == b[-1]["step"]
    # Not bit-identical (each process draws its own masks and crops), but close: the
    # utterance scale sees every process's negatives and global BatchNorm statistics.
    for scale in ("loss", "frame", "phoneme", "utterance"):
        la, lb = a[-1]["train"][scale], b[-1]["train"][scale]
        assert abs(la - lb) <= 0.12 * max(la, lb), (scale, la, lb)
    # one checkpoint folder, one pretrained export (written once, by rank 0)
    assert os.path.isfile(os.path.join(two, "pretrained", "encoder.ckpt"))


def test_bf16_autocast_keeps_losses_in_float32(tmp_path, corpus):
    from mgf_sb.batch import MGFCollate
    from mgf_sb.encoder import MGFEncoder
    from mgf_sb.features import FeatureExtractor
    from mgf_sb.objectives import FrameObjective, ObjectiveInputs, PhonemeObjective, ScaleSet, UtteranceObjective
    from mgf_sb.target import TargetNetwork

    batch = MGFCollate(crop_seconds=3.0)([{"id": str(i), "sig": torch.randn(24000)} for i in range(4)])
    fe, enc = FeatureExtractor(), MGFEncoder(80, d_model=32, num_layers=2, nhead=4, d_ffn=64, conv_pos_kernel=9,
                                             conv_pos_groups=4)
    target = TargetNetwork("ema").attach(enc)
    scales = ScaleSet({"frame": FrameObjective(32, 80), "phoneme": PhonemeObjective(32, 80, loss="infonce",
                       target="teacher"), "utterance": UtteranceObjective(32, 80)},
                      {"frame": True, "phoneme": True, "utterance": True},
                      {"frame": 1.0, "phoneme": 1.0, "utterance": 1.0})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, n = fe(batch.wavs, batch.wav_lens)
        hidden = enc(feats, n, mask=batch.input_mask)
        total, losses, _ = scales(ObjectiveInputs(hidden, feats, target(enc, feats, n), batch))
    assert feats.dtype == torch.float32  # the front end stays in float32
    assert hidden[-1].dtype == torch.bfloat16  # the encoder really ran in bf16
    assert all(l.dtype == torch.float32 and torch.isfinite(l) for l in losses.values())
    total.backward()

    # and the recipe trains with --precision=bf16
    out = str(tmp_path / "bf16")
    subprocess.run([sys.executable, PRETRAIN, HPARAMS] + _args(out, corpus, number_of_epochs=1, precision="bf16"),
                   check=True, capture_output=True, env=_env(), timeout=600)
    row = parse_log(os.path.join(out, "train_log.txt"))[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in row["train"].values())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mgf_pwned_by_pickle",))


def test_loading_never_executes_pickled_code(tiny_pretrained, tmp_path):
    from mgf_sb.pretrained_folder import load_pretrained

    evil = tmp_path / "evil"
    shutil.copytree(tiny_pretrained, evil)
    with open(evil / "encoder.ckpt", "wb") as f:
        pickle.dump({"weights": _Exploit()}, f)
    if os.path.exists("/tmp/mgf_pwned_by_pickle"):
        os.remove("/tmp/mgf_pwned_by_pickle")
    with pytest.raises(ValueError, match="cannot load .*encoder.ckpt"):
        load_pretrained(str(evil))
    assert not os.path.exists("/tmp/mgf_pwned_by_pickle")


def test_incomplete_pretrained_folder_names_what_is_missing(tiny_pretrained, tmp_path):
    from mgf_sb.pretrained_folder import load_pretrained

    partial = tmp_path / "partial"
    shutil.copytree(tiny_pretrained, partial)
    os.remove(partial / "features.ckpt")
    with pytest.raises(FileNotFoundError, match="missing features.ckpt"):
        load_pretrained(str(partial))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
