"""Schedules and data that stay true over a run's life (issue 24): one lr / EMA schedule
on resume with more epochs and on shards, shards checked before training, NaN weights
in ``hf:`` folders refused at load, evaluate.py's command line, a DDP exit that joins
the process group's threads.

Run as a script under ``torch.distributed.run`` this file is also the DDP exit check
(see ``test_ddp_exit_joins_the_process_group_threads``).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import REPO, SAMPLES, librispeech_subset, load_pretrain_recipe  # noqa: E402

TINY = {"d_model": 32, "nhead": 2, "num_layers": 1, "d_ffn": 64, "proj_dim": 16, "conv_pos_groups": 4,
        "dropout": 0.0, "crop_seconds": 3.0, "max_batch_length": 40, "num_buckets": 2, "ckpt_interval_minutes": 0,
        "use_sample_overrides": False}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


_recipe = load_pretrain_recipe


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """6 training and 2 validation files of the bundled LibriSpeech sample."""
    return librispeech_subset(tmp_path_factory.mktemp("ls"), 6, 2)


def _pretrain(out, **overrides):
    args = {**TINY, "output_folder": out, **overrides}
    _recipe().main([os.path.join(REPO, "hparams", "mgf.yaml")] + [f"--{k}={v}" for k, v in args.items()])
    rows = []
    for line in open(os.path.join(out, "train_log.txt")):
        rows.append({"epoch": int(re.search(r"epoch: (\d+)", line).group(1)),
                     "lr": float(re.search(r"lr: ([-\d.e+]+)", line).group(1)),
                     "step": int(re.search(r"step: (\d+)", line).group(1))})
    return rows


def _expected_lr(steps, total, lr=0.0005, warmup_fraction=0.08, decay=0.1):
    """The lr after ``steps`` optimiser steps of one warm-up + decay schedule of ``total`` steps."""
    from mgf_sb.lr_schedule import WarmAndExpDecay

    return WarmAndExpDecay(lr, round(warmup_fraction * total), total, decay).lr_at(steps - 1)


# ---- one schedule on resume ---------------------------------------------------------------


def test_resume_with_more_epochs_follows_one_schedule(small_corpus, tmp_path):
    """1 epoch, then the same command with --number_of_epochs=2: the lr at the end is the
    2-epoch schedule's end point (the restored scheduler takes the new total, as the EMA
    ramp does), and the log prints the counts in force."""
    out = str(tmp_path / "run")
    one = _pretrain(out, data_folder=small_corpus, number_of_epochs=1, lr=0.0005, max_batch_length=8)
    steps = one[-1]["step"]
    assert steps >= 3  # several steps per epoch: the two totals give different curves
    assert one[-1]["lr"] == pytest.approx(_expected_lr(steps, steps), rel=5e-3)  # the log keeps 3 digits
    two = _pretrain(out, data_folder=small_corpus, number_of_epochs=2, lr=0.0005, max_batch_length=8)
    assert [r["epoch"] for r in two] == [1, 2] and two[-1]["step"] == 2 * steps
    # the schedule of a 2-epoch run from the start; the old one would end far lower
    assert two[-1]["lr"] == pytest.approx(_expected_lr(2 * steps, 2 * steps), rel=5e-3)  # the log keeps 3 digits
    log = open(os.path.join(out, "log.txt")).read()
    assert f"lr_total_steps={2 * steps} (computed)" in log
    assert f"the checkpoint's schedule had {steps} steps, this run's has {2 * steps}" in log
    assert f"ema_steps={max(1, round(0.1 * 2 * steps))} (computed)" in log  # the EMA ramp: the same total


# ---- shards: the schedule follows the real count; shards checked at start -------------------


@pytest.fixture(scope="module")
def ls_shards(tmp_path_factory):
    """The bundled LibriSpeech sample in shards of ~0.5 MB (8 shards; the last one validates)."""
    from mgf_sb.data.shards import make_shards

    out = str(tmp_path_factory.mktemp("shards") / "ls")
    make_shards(os.path.join(SAMPLES, "LibriSpeech"), out, shard_size_mb=0.5)
    return out


def test_shards_lr_decay_completes_on_the_real_step_count(ls_shards, tmp_path):
    """Dynamic batches of short samples: the index's estimate (samples / (max_batch_length /
    crop_seconds)) is about twice the real count. After epoch 1 the schedule takes the real
    count, so the lr of the last epoch ends at the decay's end point, not half-way."""
    from mgf_sb.data.shards import shard_loaders

    collate = lambda items: items  # noqa: E731
    loader, _ = shard_loaders(ls_shards, collate, collate, crop_seconds=6.0, max_batch_length=30)
    estimate = len(loader)
    out = str(tmp_path / "run")
    rows = _pretrain(out, data_format="shards", shards=ls_shards, number_of_epochs=3, lr=0.001, crop_seconds=6.0,
                     max_batch_length=30, dynamic_batching=True)
    real = rows[0]["step"]
    assert estimate >= real + 2, (estimate, real)  # the case of the issue: the estimate is too high
    total = rows[-1]["step"]
    assert rows[-1]["lr"] == pytest.approx(_expected_lr(total, total, lr=0.001), rel=0.15)
    assert rows[-1]["lr"] < 0.001 * 0.1 ** 0.8  # the decay reached its end (today: 0.1 ** 0.6 at most)
    log = open(os.path.join(out, "log.txt")).read()
    assert re.search(rf"epoch 1 ran {real} optimiser steps per epoch \(estimated {estimate}\)", log)


def test_empty_shard_is_not_written_nor_held_out_for_validation(tmp_path):
    """Planned shards whose files are all bad audio: no tar, no index entry; the held-out
    validation shard is a real one."""
    import numpy as np
    import soundfile as sf

    from mgf_sb.data.shards import load_index, make_shards, shard_loaders

    rng = np.random.default_rng(0)
    rows = ["ID,duration,wav"]
    for i in range(3):  # good: 2 s of noise
        path = str(tmp_path / f"good{i}.wav")
        sf.write(path, (0.1 * rng.standard_normal(32000)).astype("float32"), 16000)
        rows.append(f"good{i},2.0,{path}")
    for i in range(2):  # bad: text files, planned as 30 s recordings (one shard each)
        path = str(tmp_path / f"zz_bad{i}.wav")
        open(path, "w").write("not audio")
        rows.append(f"zz_bad{i},30.0,{path}")
    manifest = tmp_path / "corpus.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "shards")
    make_shards(str(manifest), out, shard_size_mb=0.05)
    index = load_index(os.path.join(out, "shards.json"))
    plan = json.load(open(os.path.join(out, "plan.json")))["shards"]
    assert len(plan) > index["count"] == 3  # two planned shards held only bad files
    assert all(s["samples"] > 0 for s in index["shards"])
    assert sorted(glob.glob(os.path.join(out, "*.tar"))) == sorted(os.path.join(out, s["name"]) for s in index["shards"])
    assert len(open(os.path.join(out, "shards_skipped.tsv")).read().splitlines()) == 1 + 2
    make_shards(str(manifest), out, shard_size_mb=0.05)  # a rerun: every shard is done, empty ones too
    collate = lambda items: items  # noqa: E731
    _, valid = shard_loaders(out, collate, collate, crop_seconds=3.0, batch_size=2)
    assert sum(len(b) for b in valid) == 1  # the held-out shard has its sample


def test_missing_or_truncated_shard_is_reported_before_training(ls_shards, tmp_path):
    from mgf_sb.data.shards import shard_loaders

    shards = str(tmp_path / "copy")
    shutil.copytree(ls_shards, shards)
    collate = lambda items: items  # noqa: E731
    truncated = os.path.join(shards, "shard-000002.tar")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    os.remove(os.path.join(shards, "shard-000005.tar"))
    with pytest.raises(ValueError) as err:
        shard_loaders(shards, collate, collate, crop_seconds=3.0, batch_size=2)
    msg = str(err.value)
    assert "shard-000002.tar" in msg and "truncated" in msg and "shard-000005.tar: missing" in msg
    assert "make_shards.py" in msg  # the fix


# ---- hf: folders with NaN weights are refused at load ---------------------------------------


def test_hf_folder_with_nan_weights_is_refused_at_load_naming_the_tensor(tmp_path):
    import torch
    import transformers

    from mgf_sb.upstream import Upstream
    from test_upstream_hf import save_tiny_wav2vec2

    folder = save_tiny_wav2vec2(tmp_path / "w2v2")
    model = transformers.Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        model.encoder.layers[1].attention.k_proj.weight[0, :3] = float("nan")
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"hf:.*w2v2.*encoder\.layers\.1\.attention\.k_proj\.weight.* 3 NaN"):
        Upstream("hf:" + folder)


# ---- recipes/evaluate.py's command line -----------------------------------------------------


def _evaluate():
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import evaluate

    return evaluate


def _never_run(step, env, verbose=False):
    raise AssertionError(f"a step ran: {step.name}")


EVAL_YAML = os.path.join(REPO, "hparams", "evaluate.yaml")


def test_evaluate_empty_upstreams_is_refused_and_a_scalar_is_one_item(tmp_path):
    ev = _evaluate()
    out = f"--output_folder={tmp_path / 'ev'}"
    with pytest.raises(ValueError, match=r"upstreams=\[\]: nothing to evaluate \(an empty plan\).*--upstreams="):
        ev.main([EVAL_YAML, "--upstreams=[]", out], runner=_never_run, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"tasks=\[\]: nothing to evaluate"):
        ev.main([EVAL_YAML, "--tasks=[]", out], runner=_never_run, log=lambda *a: None)
    hp = ev.load_hparams([EVAL_YAML, "--upstreams=mgf", "--tasks=timit", out])
    assert hp["upstreams"] == ["mgf"] and hp["tasks"] == ["timit"]
    steps, rows, _ = ev.build_plan(hp)
    assert [s.name for s in steps] == ["pretrain mgf", "timit/linear / mgf", "timit/bilstm / mgf"]
    assert not os.path.exists(tmp_path / "ev")  # refused or planned: nothing written


def test_evaluate_help_lists_its_own_settings_one_line_each(capsys):
    ev = _evaluate()
    report, status = ev.main(["--help"], runner=_never_run)
    assert report is None and status == {}
    text = capsys.readouterr().out
    for key in ("report_only", "seeds", "run_ablations", "upstreams", "tasks", "dry_run", "heads", "on_change"):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"  --{key}=")]
        assert len(lines) == 1, (key, lines)
        assert len(lines[0].split("    ")) == 2 and len(lines[0].split("    ")[1]) > 10, lines[0]  # a description


def test_evaluate_dry_run_prints_the_plan_and_its_time_and_runs_nothing(tmp_path):
    ev = _evaluate()
    argv = [EVAL_YAML, "--dry_run=True", "--tasks=[timit, voxceleb]", "--upstreams=[mgf, fbank]",
            f"--output_folder={tmp_path / 'ev'}"]
    steps, _, _ = ev.build_plan(ev.load_hparams(argv))
    timed = steps[1]  # an earlier run of this step left its duration (under other settings, too)
    os.makedirs(timed.folder)
    with open(timed.mark_path, "w") as f:
        json.dump({"signature": "an older command", "seconds": 123.0}, f)
    lines = []
    report, status = ev.main(argv, runner=_never_run, log=lines.append)
    assert report is None and status == {}
    text = "\n".join(lines)
    assert f"dry run: {len(steps)} steps, 0 already done, {len(steps)} to run" in text
    assert f"[changed] {timed.name}: ~2.0 min (last run)" in text
    table = ev.load_hparams(argv)["dry_run_step_seconds"]
    expected = 123.0 + sum(table["pretrain"] if s.kind == "pretrain" else table[s.task] for s in steps if s is not timed)
    assert f"estimated time of the steps to run: ~{ev._fmt_s(expected)}" in text
    assert sorted(os.listdir(tmp_path / "ev")) == ["evaluate"]  # only the mark this test wrote


# ---- what a run prints and logs --------------------------------------------------------------


def test_timit_logs_a_computed_valid_loss_and_the_console_is_clean(tmp_path):
    """TIMIT's dev/test loss is the cross-entropy at the scored frames (was 0.0, never computed);
    the sample banner is printed once; SpeechBrain's "torchvision is not available" line is gone."""
    from conftest import run_recipe

    out = str(tmp_path / "timit")
    proc = run_recipe("recipes/TIMIT/train.py", "hparams/timit.yaml",
                      dict(output_folder=out, number_of_epochs=1, num_threads=1, upstream="fbank"))
    console = proc.stdout + proc.stderr
    assert console.count("USING THE BUNDLED SAMPLE CORPUS") == 1
    assert "torchvision is not available" not in console
    valid = [float(v) for v in re.findall(r"valid loss: ([-\d.e+]+)", open(os.path.join(out, "train_log.txt")).read())]
    assert valid and all(1.0 < v < 20.0 for v in valid), valid  # cross-entropy over 39 classes: ~log(39) untrained
    res = json.load(open(os.path.join(out, "results.json")))
    assert all(1.0 < res[split]["loss"] < 20.0 for split in ("dev", "test")), res


def test_voxceleb_prints_its_results_table_at_the_end(tmp_path):
    from conftest import run_recipe

    out = str(tmp_path / "vox")
    proc = run_recipe("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml",
                      dict(output_folder=out, number_of_epochs=1, num_threads=1, upstream="fbank"))
    table = open(os.path.join(out, "results.md")).read().strip()
    assert "| sid_test_acc |" in table and table in proc.stdout


# ---- DDP: the process group's threads end before the interpreter does ------------------------


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_exit_main(out):
    """Under torchrun: the recipes' prologue, a DDP step, then the exit hook; prints the gloo
    threads left (the ones that, alive into interpreter shutdown, aborted a finished run)."""
    import torch

    from mgf_sb.distributed import GLOO_THREAD_NAMES, os_threads
    from mgf_sb.recipe import start_experiment
    from mgf_sb.run_guard import leave_process_group

    yaml = os.path.join(out, "exit.yaml")
    if os.environ["RANK"] == "0":
        os.makedirs(out, exist_ok=True)
        with open(yaml, "w") as f:
            f.write(f"output_folder: {out}/run\n")
    else:
        import time

        while not os.path.isfile(yaml):
            time.sleep(0.05)
    start_experiment([yaml, "--distributed_backend=gloo"])
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    model(torch.ones(2, 3)).sum().backward()  # DDP's first use imports torch.distributed.nn
    before = [n for n in os_threads() if n in GLOO_THREAD_NAMES]
    del model
    leave_process_group()  # what atexit runs
    left = [n for n in os_threads() if n in GLOO_THREAD_NAMES]
    print(f"rank {os.environ['RANK']}: gloo threads before {len(before)}, after leaving {left}", flush=True)


def test_ddp_exit_joins_the_process_group_threads(tmp_path):
    """The root cause of the rare SIGABRT after the last epoch: torch.distributed.nn, imported by
    DDP after the group exists, kept the group in its functions' default arguments, so its gloo
    threads outlived destroy_process_group. Now they are joined at exit, on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", os.path.abspath(__file__), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        m = re.search(rf"rank {rank}: gloo threads before (\d+), after leaving (\[.*\])", proc.stdout)
        assert m, proc.stdout[-2000:]
        assert int(m.group(1)) >= 2 and m.group(2) == "[]", m.group(0)  # they ran, and they are gone
    assert "terminate called" not in proc.stderr


if __name__ == "__main__":
    _ddp_exit_main(sys.argv[1])
