"""recipes/evaluate.py: plan and skip logic, heads and seeds, tables and mean ranks, plots, one tiny real run."""

import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
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


def test_loss_curves_png(tmp_path):
    entries = rp.parse_train_log(str(_write(tmp_path / "log.txt", LOG)))
    panels = evaluate.loss_panels(entries)
    img = mpimg.imread(rp.loss_curves_png(str(tmp_path / "loss.png"), panels, title="loss"))
    assert img.shape[:2] == (rp.loss_curves_size(4)[1], rp.loss_curves_size(4)[0])
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in rp.PALETTE[:2]:  # train and valid markers are drawn in their colours
        want = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (abs(rgb - want).sum(1) <= 3).sum() > 20


def _write(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Plan, marks and skipping (a fake runner writes what each recipe would)
# ----------------------------------------------------------------------------------------------
METRICS = {"mgf": 0, "fbank": -10, "random": -20, "frame_only": 5, "phoneme_only": -5}
SECOND_HEAD = {"fbank": 5}  # under every task's second head fbank beats mgf: the ranking changes
SEED_JITTER = 6.0  # seed s adds +-6 points: std 6 over two seeds
FIRST_HEAD = {t: h[0] for t, h in evaluate.load_hparams([HPARAMS])["heads"].items()}


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
        if step.head != FIRST_HEAD[step.task]:
            d = SECOND_HEAD.get(step.row, d)
        if step.seed is not None:
            d += SEED_JITTER * (1 if step.seed % 2 else -1)
        lw = None if step.row == "fbank" else [0.2, 0.3, 0.5]
        res = {
            "timit": ("results.json", {"test": {"acc": (60 + d) / 100}, "layer_weights": lw, "head": step.head}),
            "voxceleb": ("results.json", {"sid_test_acc": (50 + d) / 100, "eer": (20 - d) / 100,
                                          "convex_reference": (55 + d) / 100, "layer_weights": lw}),
            "librispeech": ("results.json", {"splits": {"test-clean": {"greedy_WER": 80 - d, "beam_WER": None}},
                                             "layer_weights": lw}),
            "iemocap": ("folds_results.json", {
                "UA_mean": (40 + d) / 100, "UA_std": 0.01, "WA_mean": (45 + d) / 100, "WA_std": 0.02, "n_folds": 5,
                "folds": [{"test_session": k + 1, "UA": (40 + d + k - 2) / 100, "WA": (45 + d) / 100}
                          for k in range(5)]}),
        }[step.task]
        with open(os.path.join(step.folder, res[0]), "w") as f:
            json.dump(res[1], f)
        if step.task == "iemocap":
            for k in range(5):
                os.makedirs(os.path.join(step.folder, f"session{k + 1}"), exist_ok=True)
                with open(os.path.join(step.folder, f"session{k + 1}", "test_results.json"), "w") as f:
                    json.dump({"UA": (40 + d + k - 2) / 100, "convex_reference": (50 + d) / 100, "layer_weights": lw}, f)
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
    # 2 pretrainings, 3 upstreams x 4 tasks x 2 heads, frame_only x timit x its first head
    assert len(names) == 2 + 3 * 4 * 2 + 1
    assert rows["ablation"] == [("full", "mgf"), ("frame_only", "frame_only")]  # full reuses the mgf probes
    by = {s.name: s for s in steps}
    assert "timit/linear / frame_only" in by and "timit/bilstm / frame_only" not in by
    fr = " ".join(by["pretrain frame_only"].command)
    assert "--use_phoneme=False" in fr and "--use_utterance=False" in fr and "--number_of_epochs=4" in fr
    ran = " ".join(by["timit/linear / random"].command)
    assert "--upstream=random" in ran and f"--upstream_reference={sources['mgf']}" in ran and "--head=linear" in ran
    assert by["timit/linear / random"].depends == ["pretrain mgf"]
    for task, heads in hp["heads"].items():  # every head of every task runs, in its own folder
        assert len(heads) == 2
        folders = {by[f"{task}/{h} / mgf"].folder for h in heads}
        assert len(folders) == 2
        for h in heads:
            assert f"--head={h}" in by[f"{task}/{h} / mgf"].command
    assert "--head=xvector" in by["voxceleb/xvector / fbank"].command
    iem = " ".join(by["iemocap/attentive / fbank"].command)
    assert "run_folds.py" in iem and f"--experiment_folder={by['iemocap/attentive / fbank'].folder}" in iem
    assert "--num_threads=2" in iem and "--number_of_epochs=3" in iem  # common + sample overrides
    assert "--seed=" not in iem  # no seeds given: the recipe's own seed
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.build_plan(dict(hp, tasks=["timit", "nope"]))
    # seeds: one step per seed, each in its own folder with --seed
    steps, _, _ = evaluate.build_plan(dict(hp, run_ablations=False, tasks=["timit"], seeds=[3, 4]))
    probes = [s for s in steps if s.kind == "probe"]
    assert len(probes) == 3 * 2 * 2 and len({s.folder for s in probes}) == 12
    assert {s.seed for s in probes} == {3, 4} and all(f"--seed={s.seed}" in s.command for s in probes)
    with pytest.raises(ValueError, match="seeds must differ"):
        evaluate.build_plan(dict(hp, seeds=[3, 3]))


MGF_ROW = ("| mgf | **60.00** | 60.00 | **50.00** | 50.00 | 55.00 | **20.00** | 20.00 | **80.00** | 80.00 | "
           "**40.00 ± 1.41** | 40.00 ± 1.41 | 50.00 ± 0.00 | **45.00 ± 0.00** | 45.00 ± 0.00 | 1.50 |")


def test_plan_runs_once_then_skips(tmp_path):
    calls = []
    report, status = _main(tmp_path, calls, "--run_ablations=True", "--ablation_tasks=[timit, voxceleb]",
                           "--ablation_variants=[full, frame_only, phoneme_only]")
    assert len(calls) == 3 + 3 * 4 * 2 + 2 * 2 and set(status.values()) == {"ran"}
    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    # both heads side by side, convex references beside the utterance-level heads, IEMOCAP ± over folds
    assert ("| upstream | TIMIT frame acc (%) · linear ↑ | TIMIT frame acc (%) · bilstm ↑ | "
            "VoxCeleb1 SID acc (%) · linear ↑ | VoxCeleb1 SID acc (%) · xvector ↑ | "
            "VoxCeleb1 SID acc (%) · convex ref ↑ |") in md
    assert MGF_ROW in md
    assert "| random | 40.00 | 40.00 | 30.00 | 30.00 | 35.00 | 40.00 | 40.00 | 100.00 | 100.00 |" in md
    # the rank of each upstream under each head, and where it changes
    assert "| TIMIT frame acc (%) | linear | mgf (60.00) better than fbank (50.00) better than random (40.00) |" in md
    assert "| TIMIT frame acc (%) | bilstm | fbank (65.00) better than mgf (60.00) better than random (40.00) |" in md
    assert ("TIMIT frame acc (%): **the ranking changes**: mgf and fbank swap places between linear and bilstm "
            "(no spread measured (one seed))") in md
    assert "IEMOCAP UA (%): **the ranking changes**: mgf and fbank swap places between linear and attentive " \
           "(beyond the spread)" in md
    assert "- TIMIT: one seed (the recipe default): **no spread**" in md and "- IEMOCAP: ± std over 5 folds" in md
    # the report opens with the verdict: MGF against each baseline, per task, in words
    verdict = md.split("## Verdict: MGF against each baseline, per task")[1].split("\n## ")[0]
    assert md.index("## Verdict") < md.index("## Upstreams × tasks")
    assert ("- vs fbank: **better** on TIMIT frame acc (%) · linear (60.00 vs 50.00, +10.00; no spread: one seed); "
            "**worse** on TIMIT frame acc (%) · bilstm (60.00 vs 65.00, -5.00; no spread: one seed)") in verdict
    assert "**IEMOCAP**" in verdict and "- vs random: " in verdict and "spread ±" in verdict
    # ablation table: first head only; frame_only best (rank 1), full second, phoneme_only third
    assert "| frame_only | **65.00** | **55.00** | **15.00** | 1.00 |" in md
    assert "| full | 60.00 | 50.00 | 20.00 | 2.00 |" in md and "| phoneme_only | 55.00 | 45.00 | 25.00 | 3.00 |" in md
    js = json.loads((out / "report.json").read_text())
    res = js["main"]["results"]
    assert res["fbank"]["timit_acc"] == pytest.approx(50.0)  # the first head, under the pre-heads key
    assert res["fbank"]["timit_acc/bilstm"] == pytest.approx(65.0) and res["fbank"]["sid_acc/convex"] == 45.0
    assert res["mgf"]["ua/linear_std"] == pytest.approx(2 ** 0.5) and res["mgf"]["ua/linear_n"] == 5
    assert js["main"]["mean_rank"] == {"mgf": 1.5, "fbank": 1.5, "random": 3.0}
    assert js["main"]["mean_rank_by_head"] == {"head 1: linear": {"mgf": 1.0, "fbank": 2.0, "random": 3.0},
                                               "head 2: bilstm, xvector, attentive": {"mgf": 2.0, "fbank": 1.0,
                                                                                     "random": 3.0}}
    assert js["main"]["head_rankings"]["timit_acc"]["changed"] and js["heads"]["voxceleb"] == ["linear", "xvector"]
    assert js["ablation"]["mean_rank"] == {"full": 2.0, "frame_only": 1.0, "phoneme_only": 3.0}
    assert js["layer_weights"]["mgf"]["iemocap/attentive"] == pytest.approx([0.2, 0.3, 0.5])
    assert "fbank" not in js["layer_weights"]  # one layer: nothing learned
    for p in ("tasks_by_upstream.png", "tasks_by_variant.png", "pretrain_loss_mgf.png", "layer_weights_mgf.png",
              "layer_weights_random.png", "pretrain_loss_frame_only.png", "pretrain_loss_phoneme_only.png"):
        assert mpimg.imread(str(out / "plots" / p)).shape[2] == 4
    # 12 ranked columns (6 metrics x 2 heads), 3 upstreams; 8 probes x 3 layers
    assert mpimg.imread(str(out / "plots" / "tasks_by_upstream.png")).shape[:2] == rp.bar_chart_size(12, 3)[::-1]
    assert mpimg.imread(str(out / "plots" / "layer_weights_mgf.png")).shape[:2] == rp.layer_weights_size(8, 3)[::-1]
    marks = [json.loads(open(os.path.join(s["folder"], evaluate.MARK_FILE)).read()) for s in js["steps"].values()]
    assert all(m["seconds"] >= 0 and m["signature"]["command"] for m in marks)

    # A rerun skips everything; deleting one mark reruns that step only.
    calls.clear()
    _main(tmp_path, calls, "--run_ablations=True", "--ablation_tasks=[timit, voxceleb]",
          "--ablation_variants=[full, frame_only, phoneme_only]")
    assert calls == []
    os.remove(os.path.join(js["steps"]["voxceleb/xvector / fbank"]["folder"], evaluate.MARK_FILE))
    _, status = _main(tmp_path, calls)
    assert calls == ["voxceleb/xvector / fbank"] and status["voxceleb/xvector / fbank"] == "ran"
    assert status["timit/linear / mgf"] == "done"


def test_seeds_give_spreads_and_mark_small_differences(tmp_path):
    calls = []
    report, status = _main(tmp_path, calls, "--tasks=[timit, iemocap]", "--seeds=[1, 2]")
    assert len(calls) == 1 + 3 * 2 * 2 * 2
    md = (tmp_path / "out" / "report.md").read_text()
    res = report["main"]["results"]
    # mean and population std over the two seeds (+-6 points)
    assert res["mgf"]["timit_acc/linear"] == pytest.approx(60.0) and res["mgf"]["timit_acc/linear_std"] == 6.0
    assert res["mgf"]["timit_acc/linear_n"] == 2
    # IEMOCAP: over 5 folds x 2 seeds
    assert res["mgf"]["ua/linear_n"] == 10 and res["mgf"]["ua/linear_std"] == pytest.approx((2 + 36) ** 0.5)
    assert "- TIMIT: ± std over 2 seeds [1, 2]" in md and "- IEMOCAP: ± std over 5 folds × 2 seeds [1, 2]" in md
    # bilstm: fbank 65 vs mgf 60 is closer than the spread (6): marked, and the ranking change is not a real one
    assert "| mgf | **60.00 ± 6.00** | 60.00 ± 6.00 ≈ |" in md
    assert "| fbank | 50.00 ± 6.00 | **65.00 ± 6.00** |" in md
    assert "| TIMIT frame acc (%) | bilstm | fbank (65.00) ≈ mgf (60.00) better than random (40.00) |" in md
    assert ("mgf and fbank swap places between linear and bilstm (a difference smaller than the spread: "
            "not a real change)") in md
    swaps = report["main"]["head_rankings"]["timit_acc"]["swaps"]
    assert swaps == [{"rows": ["mgf", "fbank"], "columns": ["timit_acc/linear", "timit_acc/bilstm"],
                      "within_spread": True}]


def test_report_only_runs_nothing(tmp_path):
    calls = []
    evaluate.main([HPARAMS, f"--output_folder={tmp_path}/out", "--tasks=[timit]", "--upstreams=[fbank]",
                   "--baseline_reference=False"], runner=fake_runner(calls), log=lambda *a: None)
    assert calls == ["timit/linear / fbank", "timit/bilstm / fbank"]
    calls.clear()
    report, status = evaluate.main([HPARAMS, f"--output_folder={tmp_path}/out", "--tasks=[timit]",
                                    "--upstreams=[mgf, fbank]", "--baseline_reference=False", "--report_only=True"],
                                   runner=fake_runner(calls), log=lambda *a: None)
    assert calls == [] and status["timit/linear / fbank"] == "done" and status["pretrain mgf"] == "not run"
    assert report["main"]["results"]["fbank"]["timit_acc/bilstm"] == 65.0 and report["main"]["results"]["mgf"] == {}
    assert "| mgf | not run | not run |" in (tmp_path / "out" / "report.md").read_text()


def test_changed_settings_error_or_rerun(tmp_path):
    calls = []
    _main(tmp_path, calls, "--tasks=[timit]")
    calls.clear()
    with pytest.raises(RuntimeError, match="on_change=rerun"):
        _main(tmp_path, calls, "--tasks=[timit]", "--task_overrides={timit: {lr: 0.01}}")
    assert calls == []
    _, status = _main(tmp_path, calls, "--tasks=[timit]", "--task_overrides={timit: {lr: 0.01}}",
                      "--on_change=rerun")
    assert sorted(calls) == [f"timit/{h} / {r}" for h in ("bilstm", "linear") for r in ("fbank", "mgf", "random")]
    assert status["pretrain mgf"] == "done"


def test_failed_pretraining_blocks_dependents(tmp_path):
    calls = []
    report, status = _main(tmp_path, calls, "--tasks=[timit]", fail=("pretrain mgf",))
    # baselines use the MGF model as reference, so they wait for it too
    assert status == {"pretrain mgf": "failed", **{f"timit/{h} / {r}": "blocked" for h in ("linear", "bilstm")
                                                   for r in ("mgf", "fbank", "random")}}
    assert calls == ["pretrain mgf"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| mgf | blocked | blocked | — |" in md
    # without the reference the baselines do not depend on pretraining
    calls.clear()
    _, status = _main(tmp_path / "b", calls, "--tasks=[timit]", "--baseline_reference=False", fail=("pretrain mgf",))
    assert status["timit/bilstm / fbank"] == "ran" and status["timit/linear / mgf"] == "blocked"


def test_given_pretrained_folder(tmp_path, tiny_pretrained):
    calls = []
    report, status = _main(tmp_path, calls, "--tasks=[timit]", f"--pretrained={tiny_pretrained}")
    assert "pretrain mgf" not in status and len(calls) == 6
    assert report["main"]["sources"]["mgf"] == tiny_pretrained
    with pytest.raises(FileNotFoundError, match="not a pretrained MGF folder"):
        _main(tmp_path, calls, "--tasks=[timit]", f"--pretrained={tmp_path}")


# ----------------------------------------------------------------------------------------------
# One real run: tiny pretraining + TIMIT probes (both heads) for mgf and fbank on the bundled sample
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
    assert "step 1/5 pretrain mgf: running" in proc.stdout and "4 left after it" in proc.stdout
    js = json.loads((out / "report.json").read_text())
    for row in ("mgf", "fbank"):
        for head in ("linear", "bilstm"):
            assert 0 < js["main"]["results"][row][f"timit_acc/{head}"] <= 100
    assert js["main"]["sources"]["mgf"].endswith(os.path.join("pretrain", "mgf", "pretrained"))
    md = (out / "report.md").read_text()
    assert "| mgf |" in md and "| fbank |" in md and "Bundled sample corpora" in md
    assert "this invocation took" in md and "| TIMIT frame acc (%) | bilstm |" in md
    sizes = {"tasks_by_upstream.png": rp.bar_chart_size(2, 2),
             "layer_weights_mgf.png": rp.layer_weights_size(2, len(js["layer_weights"]["mgf"]["timit/linear"])),
             "pretrain_loss_mgf.png": rp.loss_curves_size(4)}
    for p, (w, h) in sizes.items():
        img = mpimg.imread(str(out / "plots" / p))
        assert img.shape == (h, w, 4) and img[..., :3].std() > 0.05  # a real drawing, not a blank canvas
    weights = js["layer_weights"]["mgf"]["timit/linear"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=1e-4)  # 2 layers + input embedding
    # The rerun skips every step and rebuilds the same table.
    proc2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc2.returncode == 0 and "5 already done, 0 to run" in proc2.stdout
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
