"""Every benchmark script (except the quality benchmark's, tested in test_quality*.py) runs in its
smallest form, so that a moved default cannot break one unnoticed (issue 29: pretrain_throughput.py
failed with ``TargetNetwork.total_steps is not set`` once ``ema_schedule: half_life`` became the
default). Each is run as a user runs it (a subprocess from the repository root); the figures it
prints are not checked, only that it runs to its table."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

SMALLEST = {
    "pretrain_throughput": (["benchmarks/pretrain_throughput.py", "hparams/mgf.yaml", "--batch_utts=2",
                             "--utt_seconds=1", "--warmup=0", "--repeats=1", "--threads=1"],
                            "full / frame-only step time:"),
    "extraction_rtf": (["benchmarks/extraction_rtf.py", "--size=small", "--seconds=1", "--repeats=1", "--threads=1"],
                       "| MGF 50 Hz (frame_stack 2) |"),
    "extraction_memory": (["benchmarks/extraction_memory.py", "--lengths=1,2", "--threads=1"], "fit: a ="),
    "padding_waste": (["benchmarks/padding_waste.py", "--n_utts=200"], "| pretraining recipe,"),
    "prep_throughput": (["benchmarks/prep_throughput.py", "--copies=1", "--work={tmp}/prep"],
                        '"minutes_per_100h_extrapolated"'),
    "loader_throughput": (["benchmarks/loader_throughput.py", "hparams/mgf.yaml", "--minutes", "0.3", "--workers",
                           "0", "--repeats", "1", "--work_dir", "{tmp}/loader"], "| shards | 0 |"),
    "recipe_times": (["benchmarks/recipe_times.py", "--recipes", "timit", "--set", "number_of_epochs=1",
                      "--work", "{tmp}/times"], "| timit | `python recipes/TIMIT/train.py hparams/timit.yaml"),
}


def test_every_benchmark_script_is_listed_here():
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "benchmarks"))
               if f.endswith(".py") and not f.startswith(("quality", "tts"))}
    assert scripts == set(SMALLEST)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_benchmark_runs_in_its_smallest_form(name, tmp_path):
    args, expect = SMALLEST[name]
    cmd = [sys.executable] + [a.format(tmp=tmp_path) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert expect in proc.stdout, proc.stdout[-2000:]


def test_ddp_exit_stress_script_runs_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", LOGDIR=str(tmp_path / "logs"), TEST="tests/test_losses.py",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("VENV", None)
    proc = subprocess.run(["bash", "benchmarks/ddp_exit_stress.sh", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and "0 failures in 1 runs" in proc.stdout, proc.stdout + proc.stderr
