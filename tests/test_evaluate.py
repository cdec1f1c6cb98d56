"""recipes/evaluate.py: plan and skip logic, tables and mean ranks, PNG plots, one tiny real run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "recipes"))
import evaluate  # noqa: E402

from mgf_sb import report as rp  # noqa: E402

HPARAMS = os.path.join(REPO, "hparams", "evaluate.yaml")


# ----------------------------------------------------------------------------------------------
# Tables and ranks on known numbers
# ----------------------------------------------------------------------------------------------
COLS = [rp.Column("acc", "Acc (%)"), rp.Column("eer", "EER (%)", higher_better=False),
        rp.Column("ua", "UA (%)")]
RESULTS = {
    "mgf": {"acc": 70.0, "eer": 10.0, "ua": 60.0, "ua_std": 1.5},
    "fbank": {"acc": 60.0, "eer": 10.0, "ua": 50.0},
    "random": {"acc": 50.0, "eer": 30.0},  # no UA: ranked on two columns only
}


def test_column_ranks_ties_and_missing():
    ranks = rp.column_ranks(RESULTS, COLS)
    assert ranks["acc"] == {"mgf": 1, "fbank": 2, "random": 3}
    assert ranks["eer"] == {"mgf": 1.5, "fbank": 1.5, "random": 3}  # lower is better, tie shares 1.5
    assert ranks["ua"] == {"mgf": 1, "fbank": 2}


def test_mean_ranks_known_numbers():
    mr = rp.mean_ranks(RESULTS, COLS)
    assert mr["mgf"] == pytest.approx((1 + 1.5 + 1) / 3)
    assert mr["fbank"] == pytest.approx((2 + 1.5 + 2) / 3)
    assert mr["random"] == pytest.approx((3 + 3) / 2)
    assert rp.mean_ranks({"a": {}, "b": {"acc": 1.0}}, COLS) == {"a": None, "b": 1.0}
    # a row subset is ranked among itself only
    assert rp.mean_ranks(RESULTS, COLS[:1], rows=["fbank", "random"]) == {"fbank": 1.0, "random": 2.0}


def test_markdown_table():
    md = rp.markdown_table(RESULTS, COLS, ["mgf", "fbank", "random"], "upstream", rp.mean_ranks(RESULTS, COLS),
                           notes={"random": "failed"})
    lines = md.splitlines()
    assert lines[0] == "| upstream | Acc (%) ↑ | EER (%) ↓ | UA (%) ↑ | mean rank ↓ |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| mgf | **70.00** | **10.00** | **60.00 ± 1.50** | 1.17 |"
    assert lines[3] == "| fbank | 60.00 | **10.00** | 50.00 | 1.83 |"
    assert lines[4] == "| random | 50.00 | 30.00 | failed | 3.00 |"


# ----------------------------------------------------------------------------------------------
# Train log and plots
# ----------------------------------------------------------------------------------------------
LOG = """epoch: 1, lr: 7.50e-05, step: 4 - train loss: 4.76, train frame: 7.98e-01, train phoneme: 3.26, \
train phoneme_acc: 7.45e-02, train utterance: 3.52 - valid loss: 4.37, valid frame: 8.15e-01
epoch: 2, lr: 1.75e-04, step: 8 - train loss: 4.50, train frame: 7.77e-01, train phoneme: 2.96, train utterance: 2.84 \
- valid loss: 4.23, valid frame: 8.09e-01
epoch: 2, lr: 1.75e-04, step: 8 - train loss: 4.31, train frame: 7.77e-01, train phoneme: 2.96, train utterance: 2.84 \
- valid loss: 4.23, valid frame: 8.09e-01
epoch: 3, lr: 2.00e-04, step: 12 - train loss: 4.00, train frame: 7.00e-01, train phoneme: 2.50, \
train utterance: 2.00 - valid loss: 4.00, valid frame: 8.00e-01
Epoch loaded: 3 - test loss: 1.29
"""


def test_parse_train_log_and_panels(tmp_path):
    path = tmp_path / "train_log.txt"
    path.write_text(LOG)
    entries = rp.parse_train_log(str(path))
    assert [e["epoch"] for e in entries] == [1, 2, 3]
    assert entries[1]["train"]["loss"] == 4.31  # a re-logged (resumed) epoch keeps the last line
    assert entries[0]["train"]["phoneme_acc"] == pytest.approx(0.0745)
    assert entries[0]["meta"]["step"] == 4
    panels = evaluate.loss_panels(entries)
    assert list(panels) == ["frame", "phoneme", "utterance", "total"]
    assert panels["frame"]["valid"] == ([1, 2, 3], [0.815, 0.809, 0.8])
    assert "valid" not in panels["phoneme"] and panels["total"]["train"][1] == [4.76, 4.31, 4.0]


def test_png_writer_roundtrip(tmp_path):
    img = np.random.RandomState(0).randint(0, 256, size=(7, 11, 3)).astype(np.uint8)
    path = rp.write_png(str(tmp_path / "x.png"), img)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    assert np.array_equal(rp.read_png(path), img)


def _colours(img):
    return {tuple(c) for c in img.reshape(-1, 3)}


def test_plots_are_drawn(tmp_path):
    bar = rp.bar_chart_png(str(tmp_path / "bar.png"), ["ACC", "EER"],
                           {"mgf": [70.0, 10.0], "fbank": [60.0, None]}, title="TASKS")
    img = rp.read_png(bar)
    assert img.shape[0] == 320 and img.shape[1] >= 360
    cols = _colours(img)
    assert rp.PALETTE[0] in cols and rp.PALETTE[1] in cols  # both series have bars
    # the taller bar (70) has more of its colour than the 60 one of the other series
    n0 = (img == rp.PALETTE[0]).all(-1).sum()
    n1 = (img == rp.PALETTE[1]).all(-1).sum()
    assert n0 > n1 > 0
    entries = rp.parse_train_log(str(_write(tmp_path / "log.txt", LOG)))
    curves = rp.loss_curves_png(str(tmp_path / "loss.png"), evaluate.loss_panels(entries), title="LOSS")
    img = rp.read_png(curves)
    assert img.shape == (260 + 54, 300 * 4 + 20, 3)
    assert rp.PALETTE[0] in _colours(img) and rp.PALETTE[1] in _colours(img)  # train and valid lines


def _write(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Plan, marks and skipping (a fake runner writes what each recipe would)
# ----------------------------------------------------------------------------------------------
METRICS = {"mgf": 0, "fbank": -10, "random": -20, "frame_only": 5, "phoneme_only": -5}


def fake_runner(calls, fail=()):
    def run(step, env, verbose):
        calls.append(step.name)
        if step.name in fail:
            return 1
        os.makedirs(step.folder, exist_ok=True)
        if step.kind == "pretrain":
            os.makedirs(step.result_path, exist_ok=True)
            for f in ("mgf_config.json", "features.ckpt", "encoder.ckpt"):
                open(os.path.join(step.result_path, f), "w").close()
            _write(__import__("pathlib").Path(step.folder) / "train_log.txt", LOG)
            return 0
        d = METRICS.get(step.row, 0)
        res = {
            "timit": ("results.json", {"test": {"acc": (60 + d) / 100}}),
            "voxceleb": ("results.json", {"sid_test_acc": (50 + d) / 100, "eer": (20 - d) / 100}),
            "librispeech": ("results.json", {"splits": {"test-clean": {"greedy_WER": 80 - d, "beam_WER": None}}}),
            "iemocap": ("folds_results.json", {"UA_mean": (40 + d) / 100, "UA_std": 0.01, "WA_mean": (45 + d) / 100,
                                               "WA_std": 0.02, "n_folds": 5}),
        }[step.task]
        with open(os.path.join(step.folder, res[0]), "w") as f:
            json.dump(res[1], f)
        return 0

    return run


def _main(tmp_path, calls, *extra, fail=()):
    argv = [HPARAMS, f"--output_folder={tmp_path}/out", "--upstreams=[mgf, fbank, random]"] + list(extra)
    return evaluate.main(argv, runner=fake_runner(calls, fail), log=lambda *a: None)


def test_plan_commands():
    hp = evaluate.load_hparams([HPARAMS, "--output_folder=/tmp/x", "--run_ablations=True",
                                "--ablation_variants=[full, frame_only]",
                                "--ablation_tasks=[timit]"])
    steps, rows, sources = evaluate.build_plan(hp)
    names = [s.name for s in steps]
    assert names[:2] == ["pretrain mgf", "pretrain frame_only"]
    assert len(names) == 2 + 3 * 4 + 1  # 2 pretrainings, 3 upstreams x 4 tasks, frame_only x timit
    assert rows["ablation"] == [("full", "mgf"), ("frame_only", "frame_only")]  # full reuses the mgf probes
    by = {s.name: s for s in steps}
    fr = " ".join(by["pretrain frame_only"].command)
    assert "--use_phoneme=False" in fr and "--use_utterance=False" in fr and "--number_of_epochs=4" in fr
    ran = " ".join(by["timit / random"].command)
    assert "--upstream=random" in ran and f"--upstream_reference={sources['mgf']}" in ran
    assert by["timit / random"].depends == ["pretrain mgf"]
    iem = " ".join(by["iemocap / fbank"].command)
    assert "run_folds.py" in iem and f"--experiment_folder={by['iemocap / fbank'].folder}" in iem
    assert "--num_threads=2" in iem and "--number_of_epochs=4" in iem  # common + sample overrides
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.build_plan(dict(hp, tasks=["timit", "nope"]))


def test_plan_runs_once_then_skips(tmp_path):
    calls = []
    report, status = _main(tmp_path, calls, "--run_ablations=True", "--ablation_tasks=[timit, voxceleb]",
                           "--ablation_variants=[full, frame_only, phoneme_only]")
    assert len(calls) == 3 + 12 + 2 * 2 and set(status.values()) == {"ran"}
    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "| mgf | **60.00** | **50.00** | **20.00** | **80.00** | **40.00 ± 1.00** | **45.00 ± 2.00** | 1.00 |" in md
    assert "| random | 40.00 | 30.00 | 40.00 | 100.00 | 20.00 ± 1.00 | 25.00 ± 2.00 | 3.00 |" in md
    # ablation table: frame_only best (rank 1), full second, phoneme_only third
    assert "| frame_only | **65.00** | **55.00** | **15.00** | 1.00 |" in md
    assert "| full | 60.00 | 50.00 | 20.00 | 2.00 |" in md and "| phoneme_only | 55.00 | 45.00 | 25.00 | 3.00 |" in md
    js = json.loads((out / "report.json").read_text())
    assert js["main"]["results"]["fbank"]["timit_acc"] == pytest.approx(50.0)
    assert js["ablation"]["mean_rank"] == {"full": 2.0, "frame_only": 1.0, "phoneme_only": 3.0}
    for p in ("tasks_by_upstream.png", "tasks_by_variant.png", "pretrain_loss_mgf.png",
              "pretrain_loss_frame_only.png", "pretrain_loss_phoneme_only.png"):
        assert rp.read_png(str(out / "plots" / p)).shape[2] == 3
    marks = [json.loads(open(os.path.join(s["folder"], evaluate.MARK_FILE)).read()) for s in js["steps"].values()]
    assert all(m["seconds"] >= 0 and m["signature"]["command"] for m in marks)

    # A rerun skips everything; deleting one mark reruns that step only.
    calls.clear()
    _main(tmp_path, calls, "--run_ablations=True", "--ablation_tasks=[timit, voxceleb]",
          "--ablation_variants=[full, frame_only, phoneme_only]")
    assert calls == []
    os.remove(os.path.join(js["steps"]["voxceleb / fbank"]["folder"], evaluate.MARK_FILE))
    _, status = _main(tmp_path, calls)
    assert calls == ["voxceleb / fbank"] and status["voxceleb / fbank"] == "ran"
    assert status["timit / mgf"] == "done"


def test_changed_settings_error_or_rerun(tmp_path):
    calls = []
    _main(tmp_path, calls, "--tasks=[timit]")
    calls.clear()
    with pytest.raises(RuntimeError, match="on_change=rerun"):
        _main(tmp_path, calls, "--tasks=[timit]", "--task_overrides={timit: {lr: 0.01}}")
    assert calls == []
    _, status = _main(tmp_path, calls, "--tasks=[timit]", "--task_overrides={timit: {lr: 0.01}}",
                      "--on_change=rerun")
    assert sorted(calls) == ["timit / fbank", "timit / mgf", "timit / random"]
    assert status["pretrain mgf"] == "done"


def test_failed_pretraining_blocks_dependents(tmp_path):
    calls = []
    report, status = _main(tmp_path, calls, "--tasks=[timit]", fail=("pretrain mgf",))
    # baselines use the MGF model as reference, so they wait for it too
    assert status == {"pretrain mgf": "failed", "timit / mgf": "blocked", "timit / fbank": "blocked",
                      "timit / random": "blocked"}
    assert calls == ["pretrain mgf"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| mgf | blocked | — |" in md
    # without the reference the baselines do not depend on pretraining
    calls.clear()
    _, status = _main(tmp_path / "b", calls, "--tasks=[timit]", "--baseline_reference=False", fail=("pretrain mgf",))
    assert status["timit / fbank"] == "ran" and status["timit / mgf"] == "blocked"


def test_given_pretrained_folder(tmp_path, tiny_pretrained):
    calls = []
    report, status = _main(tmp_path, calls, "--tasks=[timit]", f"--pretrained={tiny_pretrained}")
    assert "pretrain mgf" not in status and len(calls) == 3
    assert report["main"]["sources"]["mgf"] == tiny_pretrained
    with pytest.raises(FileNotFoundError, match="not a pretrained MGF folder"):
        _main(tmp_path, calls, "--tasks=[timit]", f"--pretrained={tmp_path}")


# ----------------------------------------------------------------------------------------------
# One real run: tiny pretraining + TIMIT probes for mgf and fbank on the bundled sample
# ----------------------------------------------------------------------------------------------
def test_end_to_end_tiny(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "recipes/evaluate.py", HPARAMS, f"--output_folder={out}", "--tasks=[timit]",
           "--upstreams=[mgf, fbank]", "--num_threads=1",
           "--task_overrides={pretrain: {number_of_epochs: 1, d_model: 32, d_ffn: 64, proj_dim: 32, "
           "conv_pos_kernel: 9}, timit: {number_of_epochs: 2}}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 1/3 pretrain mgf: running" in proc.stdout and "2 left after it" in proc.stdout
    js = json.loads((out / "report.json").read_text())
    for row in ("mgf", "fbank"):
        assert 0 < js["main"]["results"][row]["timit_acc"] <= 100
    assert js["main"]["sources"]["mgf"].endswith(os.path.join("pretrain", "mgf", "pretrained"))
    md = (out / "report.md").read_text()
    assert "| mgf |" in md and "| fbank |" in md and "Bundled sample corpora" in md
    assert "this invocation took" in md
    for p in ("tasks_by_upstream.png", "pretrain_loss_mgf.png"):
        assert rp.read_png(str(out / "plots" / p)).size > 0
    # The rerun skips every step and rebuilds the same table.
    proc2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc2.returncode == 0 and "3 already done, 0 to run" in proc2.stdout
    assert json.loads((out / "report.json").read_text())["main"]["results"] == js["main"]["results"]


def test_default_ablation_grid():
    """The YAML grid holds the paper's ablations: full, each scale alone, each pair, three loss swaps."""
    hp = evaluate.load_hparams([HPARAMS, "--output_folder=/tmp/x", "--run_ablations=True", "--tasks=[timit]"])
    grid = hp["ablations"]
    assert grid["full"] == {} and grid["frame_contrastive"] == {"frame_loss": "infonce"}
    assert grid["phoneme_generative"] == {"phoneme_loss": "l1", "phoneme_target": "fbank"}
    assert grid["utterance_generative"] == {"utterance_loss": "l1", "utterance_target": "fbank"}
    on = {v: tuple(s for s in ("frame", "phoneme", "utterance") if grid[v].get(f"use_{s}", True)) for v in grid}
    assert sorted(on[v] for v in grid if "_" not in v or v.endswith("_only") or "+" in v) == sorted(
        [("frame", "phoneme", "utterance"), ("frame",), ("phoneme",), ("utterance",), ("frame", "phoneme"),
         ("frame", "utterance"), ("phoneme", "utterance")])
    steps, rows, _ = evaluate.build_plan(hp)
    assert sum(s.kind == "pretrain" for s in steps) == len(grid)  # full shares the mgf pretraining
    assert [v for v, _ in rows["ablation"]] == list(grid)
