"""Reruns and concurrent runs (issue 16): the run guard (run_config.json), the output-folder
lock, and a clean DDP exit when a run stops with an error. All through the shared prologue
``mgf_sb.recipe.start_experiment`` that every recipe's main() calls."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from test_pretrain import TINY, parse_log
from test_reliability import HPARAMS, PRETRAIN, _free_port

from mgf_sb.run_guard import LOCK_FILE, RUN_CONFIG, OutputFolderLocked, OutputLock


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 training and 2 validation files of the bundled LibriSpeech sample."""
    root = tmp_path_factory.mktemp("ls")
    src = os.path.join(REPO, "samples", "LibriSpeech")
    for split, n in (("train-clean-100", 4), ("dev-clean", 2)):
        for f in sorted(glob.glob(os.path.join(src, split, "*", "*", "*.flac")))[:n]:
            dest = root / os.path.relpath(f, src)
            os.makedirs(dest.parent, exist_ok=True)
            shutil.copy(f, dest)
    return str(root)


def _pretrain(out, corpus, wait=True, **extra):
    args = {**TINY, "data_folder": corpus, "output_folder": out, "number_of_epochs": 1, **extra}
    cmd = [sys.executable, PRETRAIN, HPARAMS] + [f"--{k}={v}" for k, v in args.items()]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


def _snapshot(out):
    """{relative path: (size, mtime_ns)} of every file under ``out``."""
    snap = {}
    for root, _, files in os.walk(out):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            snap[os.path.relpath(p, out)] = (st.st_size, st.st_mtime_ns)
    return snap


# ---------------------------------------------------------------- run guard


def test_pretraining_rerun_with_other_settings_stops_before_writing(corpus, tmp_path):
    out = str(tmp_path / "run")
    first = _pretrain(out, corpus)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.load(open(os.path.join(out, RUN_CONFIG)))["settings"]["lr"] == 0.002
    before = _snapshot(out)

    # --lr and --use_utterance changed: stops at once, naming each change and both ways out
    proc = _pretrain(out, corpus, lr=0.05, use_utterance=False)
    assert proc.returncode != 0
    assert "lr: 0.002 -> 0.05" in proc.stderr and "use_utterance: true -> false" in proc.stderr
    assert "--output_folder=<new folder>" in proc.stderr and "--on_change=restart" in proc.stderr
    assert "number_of_epochs" in proc.stderr.split("Settings that may change on resume:")[1]
    after = _snapshot(out)
    after.pop("log.txt", None), before.pop("log.txt", None)
    assert after == before  # nothing written: hyperparams.yaml, train_log, checkpoints, pretrained/

    # a resumable setting: the run resumes
    proc = _pretrain(out, corpus, number_of_epochs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in parse_log(os.path.join(out, "train_log.txt"))] == [1, 2]

    # --on_change=restart: a fresh run; the earlier one moved aside, not deleted
    proc = _pretrain(out, corpus, lr=0.05, on_change="restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--on_change=restart: settings changed (lr)" in proc.stdout
    (aside,) = glob.glob(os.path.join(out, "replaced-*"))
    assert [r["epoch"] for r in parse_log(os.path.join(aside, "train_log.txt"))] == [1, 2]
    assert glob.glob(os.path.join(aside, "save", "CKPT+*")) and os.path.isfile(
        os.path.join(aside, "pretrained", "encoder.ckpt"))
    assert "lr: 0.002" in open(os.path.join(aside, "hyperparams.yaml")).read()
    assert [r["epoch"] for r in parse_log(os.path.join(out, "train_log.txt"))] == [1]  # trained from scratch
    assert json.load(open(os.path.join(out, RUN_CONFIG)))["settings"]["lr"] == 0.05
    assert "lr: 0.05" in open(os.path.join(out, "hyperparams.yaml")).read()


def test_probe_rerun_with_changed_upstream_weights_stops(tiny_pretrained, tmp_path):
    """VoxCeleb: the upstream is identified by its weights' content, not its path."""
    from mgf_sb.pretrained_folder import load_pretrained, save_pretrained

    up = str(tmp_path / "upstream")
    shutil.copytree(tiny_pretrained, up)
    out = str(tmp_path / "vox")
    cmd = [sys.executable, os.path.join(REPO, "recipes", "VoxCeleb", "train.py"),
           os.path.join(REPO, "hparams", "voxceleb.yaml"), f"--output_folder={out}", "--number_of_epochs=1",
           "--num_threads=1"]
    run = lambda upstream: subprocess.run(cmd + [f"--upstream={upstream}"], capture_output=True, text=True,  # noqa
                                          env=_env(), cwd=REPO, timeout=600)
    proc = run(up)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = json.load(open(os.path.join(out, RUN_CONFIG)))["settings"]["upstream"]
    assert digest.startswith("sha256:")

    moved = str(tmp_path / "moved" / "upstream")  # same weights elsewhere: the same run
    shutil.copytree(up, moved)
    proc = run(moved)
    assert proc.returncode == 0, proc.stderr[-3000:]

    features, encoder, config = load_pretrained(up)  # "pretrain longer": new weights, same folder
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01)
    save_pretrained(up, features, encoder, meta=config["meta"])
    before = _snapshot(out)
    proc = run(up)
    assert proc.returncode != 0
    assert f"upstream: \"{digest}\" -> \"sha256:" in proc.stderr, proc.stderr[-3000:]
    after = _snapshot(out)
    after.pop("log.txt", None), before.pop("log.txt", None)
    assert after == before


# ---------------------------------------------------------------- output-folder lock


def test_second_run_on_the_same_folder_stops_at_once_then_takes_over_a_stale_lock(corpus, tmp_path):
    out = str(tmp_path / "run")
    first = _pretrain(out, corpus, wait=False, number_of_epochs=200)
    lock = os.path.join(out, LOCK_FILE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not os.path.exists(os.path.join(out, "train_log.txt")):
            time.sleep(0.5)
            assert first.poll() is None, "the first run ended early"
        info = json.load(open(lock))
        assert info["pid"] == first.pid and info["host"] == socket.gethostname()
        log_before = open(os.path.join(out, "train_log.txt")).read()
        start = time.time()
        second = _pretrain(out, corpus, number_of_epochs=200)
        took = time.time() - start
        assert second.returncode != 0
        assert f"in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert took < 120, took  # at once (interpreter start + YAML), not after training
        assert first.poll() is None  # the first run goes on, its log not mixed with another's
        assert open(os.path.join(out, "train_log.txt")).read().startswith(log_before)
    finally:
        first.send_signal(signal.SIGKILL)  # a killed run leaves its lock behind
        first.wait()
    assert json.load(open(lock))["pid"] == first.pid
    third = _pretrain(out, corpus, number_of_epochs=1)  # resumes (epoch 1 is done): ends at once
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lock" in third.stderr and f"process {first.pid} is gone" in third.stderr
    assert not os.path.exists(lock)  # released at exit


def test_lock_rules(tmp_path, monkeypatch):
    """Same host: dead pid -> stale. Another host: stale only when not refreshed for stale_s."""
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    lock = OutputLock(str(folder)).acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    assert not path.exists()

    path.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "now"}))
    with pytest.raises(OutputFolderLocked, match="pid 1 on host another-node"):
        OutputLock(str(folder), stale_s=600).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))  # a crashed node stopped refreshing it an hour ago
    lock = OutputLock(str(folder), stale_s=600).acquire()
    assert json.load(open(path))["host"] == socket.gethostname()
    lock.release()

    # only rank 0 of a job takes it: rank0_decides runs the function on rank 0 and shares the outcome
    from mgf_sb import run_guard as recipe

    calls = []
    assert recipe.rank0_decides(lambda: calls.append(1) or "ok") == "ok" and calls == [1]


def test_ddp_run_on_a_locked_folder_stops_every_rank_cleanly(corpus, tmp_path):
    """2 gloo processes, the folder held by a live process: both ranks stop with the message
    (rank 0 decides, rank 1 is told), leave the process group and exit with 1, not SIGABRT."""
    from mgf_sb.run_guard import _process_start

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "300"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "proc_start": _process_start(holder.pid), "started": "now"}))
        args = {**TINY, "data_folder": corpus, "output_folder": str(out), "number_of_epochs": 1}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", PRETRAIN, HPARAMS, "--distributed_backend=gloo"] + \
            [f"--{k}={v}" for k, v in args.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"is in use by another run: pid {holder.pid}") >= 2, text[-4000:]  # rank 0 and rank 1
    assert "terminate called" not in text and "SIGABRT" not in text and "Signal 6" not in text, text[-4000:]
    assert "exitcode  : 1" in text or "exitcode: 1" in text.replace("  ", " "), text[-3000:]
    assert not os.path.exists(out / "hyperparams.yaml")
