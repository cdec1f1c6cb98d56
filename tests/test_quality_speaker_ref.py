"""The speaker reference row of the quality benchmark (benchmarks/quality_speaker_ref.py): it learns
on a planted case, resumes bit for bit, reuses a finished run, refuses or redoes a changed one,
gives the probes per-layer frames and pooled vectors of the right shapes, runs as a grid step, and
--dry_run lists it."""

import dataclasses
import glob
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import use_benchmarks

use_benchmarks()

import quality  # noqa: E402
import quality_probe as qp  # noqa: E402
import quality_speaker_ref as ref  # noqa: E402
from mgf_sb import grid  # noqa: E402
from mgf_sb.batch import encoder_frame_centres  # noqa: E402

SR = 16000
TINY = ref.RefSettings(steps=6, batch_size=6, channels=(24, 24, 24, 24), emb_dim=12, proj_dim=12, crop_seconds=0.5,
                       lr=3e-3)


def voice(rng, seconds):
    """One synthetic "voice": a harmonic tone (its own f0 and harmonic weights) with a syllable-rate
    envelope and a little noise; every utterance a different voice."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(90.0, 400.0)
    weights = rng.uniform(0.1, 1.0, 6) * rng.choice([0.0, 1.0], 6, p=[0.3, 0.7])
    weights[0] = 1.0
    x = sum(w * np.sin(2 * np.pi * f0 * (k + 1) * t * (1 + 0.01 * np.sin(2 * np.pi * 3 * t)))
            for k, w in enumerate(weights))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(2.0, 6.0) * t + rng.uniform(0, 6.3))
    x = x * env + 0.01 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def make_corpus(root, n_utts=12, seconds=1.2, seed=0):
    """``<root>/pretrain/train/<speaker>/<utt>.flac`` as the benchmark corpus lays it out -> the
    pretraining folder."""
    rng = np.random.default_rng(seed)
    for i in range(n_utts):
        d = os.path.join(root, "pretrain", "train", f"p{i:03d}")
        os.makedirs(d, exist_ok=True)
        sf.write(os.path.join(d, f"p{i:03d}_0.flac"), voice(rng, seconds * rng.uniform(0.8, 1.3)), SR)
    return os.path.join(root, "pretrain")


def quiet(*_):
    pass


def test_nt_xent_partner_and_chance():
    z = torch.randn(8, 4)
    z2 = torch.repeat_interleave(z, 2, dim=0)  # partners identical: the loss is low, the accuracy 1
    loss, acc = ref.nt_xent(z2 + 1e-3 * torch.randn_like(z2), 0.1)
    assert acc == 1.0 and loss.item() < 1.0
    loss_r, _ = ref.nt_xent(torch.randn(16, 4), 0.1)
    assert loss_r.item() > loss.item()


def test_learns_the_planted_voices(tmp_path):
    """Utterances of different synthetic voices, two crops each through different channels: the loss
    falls and the partner crop is found far above chance."""
    folder = make_corpus(str(tmp_path), n_utts=16, seconds=1.5)
    s = dataclasses.replace(TINY, steps=40, batch_size=8)
    res = ref.train(folder, str(tmp_path / "run"), s, threads=1, log=quiet, log_every=5)
    hist = np.array(res["history"])  # (steps, [loss, acc])
    assert res["steps"] == 40 and hist.shape == (40, 2)
    chance = 1.0 / (2 * 8 - 1)
    assert hist[-10:, 0].mean() < hist[:5, 0].mean() - 0.3, hist[:, 0]
    assert hist[-10:, 1].mean() > 4 * chance, hist[:, 1]
    assert res["n_parameters"] == ref.n_parameters(ref.TDNN(80, (24, 24, 24, 24), 12, 12))
    # the log has the step, loss, accuracy and CPU seconds
    lines = (tmp_path / "run" / ref.LOG_FILE).read_text().splitlines()
    assert len(lines) == 8 and '"cpu_seconds_per_step"' in lines[-1]


def test_resume_is_exact_a_finished_run_is_reused_and_a_change_refused_or_redone(tmp_path):
    folder = make_corpus(str(tmp_path))
    whole = ref.train(folder, str(tmp_path / "whole"), TINY, threads=1, log=quiet)
    # killed after 4 steps (checkpoint every 2), then resumed: the same model, bit for bit
    run = str(tmp_path / "run")
    assert ref.train(folder, run, TINY, threads=1, log=quiet, ckpt_every=2, max_steps_this_call=4) is None
    assert os.path.isfile(os.path.join(run, ref.CHECKPOINT_FILE))
    with pytest.raises(FileNotFoundError):
        ref.finished_model(run)
    resumed = ref.train(folder, run, TINY, threads=1, log=quiet, ckpt_every=2)
    assert resumed["steps"] == 6 and not os.path.isfile(os.path.join(run, ref.CHECKPOINT_FILE))
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert whole["history"] == resumed["history"]
    # a rerun with the same settings trains nothing
    again = ref.train(folder, run, TINY, threads=1, log=quiet)
    assert again["reused"] and again["finished"] == resumed["finished"]
    # another setting: refused (the library and the command line), or the folder moved aside and redone
    changed = dataclasses.replace(TINY, lr=1e-3)
    with pytest.raises(ref.SettingsChanged, match="lr"):
        ref.train(folder, run, changed, log=quiet)
    assert ref.main(["--pretrain_folder", folder, "--out", run, *ref.settings_args(changed)]) == 2
    redone = ref.train(folder, run, changed, threads=1, log=quiet, on_change="rerun")
    assert not redone["reused"] and redone["settings"]["lr"] == 1e-3
    assert len(glob.glob(run + ".replaced-*")) == 1
    # other audio is another setting too
    sf.write(os.path.join(folder, "train", "p000", "extra.flac"), np.zeros(8000, np.float32), SR)
    with pytest.raises(ref.SettingsChanged, match="data"):
        ref.train(folder, run, changed, log=quiet)


def test_representation_layers_and_pooled_shapes(tmp_path):
    folder = make_corpus(str(tmp_path))
    run = str(tmp_path / "run")
    ref.train(folder, run, TINY, threads=1, log=quiet)
    rep = qp.Representation(None, "speaker_ref", source=run)
    assert rep.frames and rep.stack == 1
    rng = np.random.default_rng(1)
    wavs = [voice(rng, s) for s in (0.7, 1.3, 0.45)]
    pooled = qp.pool(rep, wavs, batch_size=3)
    # 4 TDNN blocks (mean + std of 24 channels), then the embedding (mean = the embedding, std a constant)
    assert [tuple(p.shape) for p in pooled] == [(3, 48)] * 4 + [(3, 24)]
    assert torch.allclose(pooled[-1][:, 12:], torch.full((3, 12), 1e-4))
    # an utterance gets the same features alone or padded in a batch
    alone = qp.pool(rep, wavs, batch_size=1)
    for a, b in zip(pooled, alone):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # frames at 100 frames/s, as many as the phone labels' frame centres
    w = torch.zeros(2, len(wavs[1]))
    w[0, : len(wavs[0])], w[1] = torch.from_numpy(wavs[0]), torch.from_numpy(wavs[1])
    layers, n = rep(w, torch.tensor([len(wavs[0]) / w.shape[1], 1.0]))
    assert len(layers) == 5 and [h.shape[2] for h in layers] == [24] * 4 + [12]
    assert n.tolist() == [len(encoder_frame_centres(len(x), 160, 1)) for x in wavs[:2]]
    assert all((h[0, n[0]:] == 0).all() for h in layers)  # zero past the valid frames
    # the embedding layer is the model's embedding of the utterance
    model = rep.ref.model
    feats = rep.ref.fbank(torch.from_numpy(wavs[2])[None])
    with torch.no_grad():
        _, emb = model(feats)
    assert torch.allclose(pooled[-1][2, :12], emb[0], atol=1e-4)


def test_grid_step_trains_reuses_and_flags_a_changed_setting(tmp_path):
    """The benchmark's grid step runs the script; a second plan finds it done; another setting is a
    changed step (the grid refuses it unless --on_change=rerun)."""
    folder = make_corpus(str(tmp_path))
    budget = dataclasses.replace(quality.BUDGETS["tiny"], speaker_ref={
        "steps": 3, "batch_size": 4, "seeds": [0], "channels": (8, 8, 8, 8), "emb_dim": 8, "proj_dim": 8,
        "crop_seconds": 0.5})
    corpus = {"pretrain_folder": folder}
    run_dir = str(tmp_path / "out" / "runs" / quality.REF_KEY / "seed0")
    step = quality.ref_step(budget, corpus, 0, run_dir, "cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([quality.REPO, os.environ.get("PYTHONPATH", "")]))
    status = grid.execute([step], quality.ref_output, env=env, log=quiet)
    assert status[step.name] == "ran", grid.tail(step.log_path)
    rec = quality.ref_record(step)
    assert rec["steps"] == 3 and rec["cpu_seconds"] > 0 and rec["variant"] == quality.REF_ROW
    assert ref.finished_model(run_dir)["settings"]["channels"] == [8, 8, 8, 8]
    assert grid.step_status(quality.ref_step(budget, corpus, 0, run_dir, "cpu"), quality.ref_output) == "done"
    budget.speaker_ref["steps"] = 4
    changed = quality.ref_step(budget, corpus, 0, run_dir, "cpu")
    assert grid.step_status(changed, quality.ref_output) == "changed"
    with pytest.raises(RuntimeError, match="other settings"):
        grid.execute([changed], quality.ref_output, env=env, log=quiet)


def test_dry_run_lists_the_reference_row(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    est = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run", "--speaker_ref"])
    text = capsys.readouterr().out
    assert not cache.exists() and not out.exists()
    assert quality.REF_ROW in text and "speaker reference" in text.split("estimate:")[1]
    tiny = quality.BUDGETS["tiny"].speaker_ref
    assert est["ref_runs_to_train"] == len(tiny["seeds"]) == est["ref_probes_to_run"] == 2
    assert est["ref_cpu"] > 0
    # a finished run is counted as done
    d = out / "runs" / quality.REF_KEY / "seed0"
    os.makedirs(d)
    (d / ref.MODEL_FILE).write_bytes(b"")
    est2 = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run", "--speaker_ref"])
    assert est2["ref_runs_to_train"] == 1 and est2["ref_cpu"] < est["ref_cpu"]
    # without --speaker_ref nothing of it is trained (the default invocation's time); the finished one is kept
    est3 = quality.main(["--budget=tiny", f"--cache={cache}", f"--out={out}", "--dry_run"])
    assert est3["ref_runs_to_train"] == 0 and est3["ref_probes_to_run"] == 1
    assert est3["ref_cpu"] == quality.EST_PROBE_CPU["speaker_ref"]  # its probe only
    # the default budget states the reference's cost: 64-utterance batches, its steps, its seeds
    d = quality.BUDGETS["default"].speaker_ref
    assert d["batch_size"] == 64 and d["steps"] >= 300 and len(quality.ref_seeds(quality.BUDGETS["default"])) >= 3


def test_a_folder_with_baselines_from_never_trains_the_reference(tmp_path):
    """quality_switches' folders (--baselines_from) reuse the reference where it finished there and
    plan no training of their own for it; the shared baselines' probes count as cached."""
    budget = dataclasses.replace(quality.BUDGETS["tiny"], variants=["full MGF"])
    base, out = tmp_path / "base", tmp_path / "switch"
    (base / "runs" / quality.REF_KEY / "seed0").mkdir(parents=True)
    (base / "runs" / quality.REF_KEY / "seed0" / ref.MODEL_FILE).write_bytes(b"finished")
    pl = quality.plan(budget, str(out), True, False, baselines_from=str(base))
    assert pl["ref_runs"] == []  # seed 0 reused from base, seed 1 not finished there: left out
    assert [k for k, _, _ in pl["ref_probes"]] == [f"{quality.REF_KEY}/seed0"]
    own = quality.plan(budget, str(out), True, False)
    assert [s for _, s, _, done in own["ref_runs"] if not done] == budget.speaker_ref["seeds"]


def test_random_init_is_the_training_start_with_calibrated_batch_norm(tmp_path):
    """The reference's own random-init row: the weights its training starts from (same seed), the
    BatchNorm statistics fitted to the corpus (not the 0 / 1 of a fresh layer), readable by the probes."""
    folder = make_corpus(str(tmp_path))
    res = ref.random_init(folder, str(tmp_path / "random"), TINY, calibration_batches=3, log=quiet)
    assert res["steps"] == 0 and res["random_init"]
    torch.manual_seed(TINY.seed)
    start = ref.TDNN(TINY.n_mels, TINY.channels, TINY.emb_dim, TINY.proj_dim).state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k, v in start.items():
        if not k.endswith(stats):
            assert torch.equal(res["model"][k], v), k
    mean = res["model"]["input_norm.running_mean"]
    assert float(mean.abs().mean()) > 1.0  # log-Mel in dB: far from a fresh layer's 0
    rep = qp.Representation(None, "speaker_ref", source=str(tmp_path / "random"))
    pooled = qp.pool(rep, [voice(np.random.default_rng(2), 0.8)], batch_size=1)
    assert len(pooled) == 5 and all(torch.isfinite(p).all() for p in pooled)
