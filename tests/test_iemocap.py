"""IEMOCAP emotion recipe: prep (real layout), metrics, training, freezing, export, 5 folds."""

import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, run_recipe

RECIPE = os.path.join(REPO, "recipes", "IEMOCAP")
HPARAMS = os.path.join(REPO, "hparams", "emotion.yaml")
sys.path.insert(0, RECIPE)

from iemocap_prepare import (  # noqa: E402
    CLASSES,
    IEMOCAPLayoutError,
    collect_utterances,
    prepare_iemocap,
    split_fold,
)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"iemocap_{name}", os.path.join(RECIPE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_mod = _load("train")
folds_mod = _load("run_folds")

# Per dialog: raw labels of its utterances (speaker alternates F, M).
DIALOG_LABELS = ["neu", "hap", "exc", "ang", "sad", "neu", "fru", "xxx"]
PITCH = {"neu": 140.0, "hap": 260.0, "exc": 250.0, "ang": 200.0, "sad": 100.0, "fru": 180.0, "xxx": 150.0}
LONG_LABEL = {"neu": "Neutral state", "hap": "Happiness", "exc": "Excited", "ang": "Anger", "sad": "Sadness",
              "fru": "Frustration", "xxx": "Other"}


def _wav(path, label, rng, seconds=0.4, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    f0 = PITCH[label] * (1 + 0.05 * rng.standard_normal())
    x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.15 * np.sin(4 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")


def build_iemocap(root, labels=DIALOG_LABELS, seed=0):
    """A tiny corpus in the real release layout: 5 sessions x (1 improvised + 1 scripted dialog)."""
    rng = np.random.default_rng(seed)
    for s in range(1, 6):
        actor = "F" if s % 2 else "M"
        wav_root = os.path.join(root, f"Session{s}", "sentences", "wav")
        emo_root = os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation")
        os.makedirs(os.path.join(emo_root, "Categorical"), exist_ok=True)  # real releases have subfolders
        for dialog in (f"Ses0{s}{actor}_impro0{s}", f"Ses0{s}{actor}_script0{s}_1"):
            os.makedirs(os.path.join(wav_root, dialog), exist_ok=True)
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for i, lab in enumerate(labels):
                utt = f"{dialog}_{'FM'[i % 2]}{i // 2:03d}"
                _wav(os.path.join(wav_root, dialog, utt + ".wav"), lab, rng)
                lines += [f"[{i * 2.0:.4f} - {i * 2.0 + 0.4:.4f}]\t{utt}\t{lab}\t[2.5000, 2.5000, 2.5000]",
                          f"C-E1:\t{LONG_LABEL[lab]};\t()", "A-E1:\tval 2; act 2; dom  2;\t()", ""]
            with open(os.path.join(emo_root, dialog + ".txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    return root


@pytest.fixture
def corpus(tmp_path):
    return build_iemocap(str(tmp_path / "IEMOCAP_full_release"))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- preparation


def test_prep_classes_drops_and_session_split(corpus, tmp_path):
    out = str(tmp_path / "prep")
    report = prepare_iemocap(corpus, out, out + "/fold5", test_session=5)
    # 8 lines per dialog, 2 dialogs, 5 sessions; fru and xxx dropped and counted.
    assert report["kept"] == 60
    assert report["dropped_labels"] == {"fru": 10, "xxx": 10} and report["dropped"] == 20
    assert report["skipped"] == 0
    # hap + exc merged into happy.
    assert report["kept_per_class"] == {"neutral": 20, "happy": 20, "angry": 10, "sad": 10}
    train, valid, test = (_rows(f"{out}/fold5/{s}.csv") for s in ("train", "valid", "test"))
    assert {r["session"] for r in test} == {"5"}
    assert {r["session"] for r in valid} == {"1"}  # valid_session: next (5 -> 1)
    assert {r["session"] for r in train} == {"2", "3", "4"}
    assert len(train) + len(valid) + len(test) == 60
    assert {r["emo"] for r in train} == set(CLASSES)
    exc = [r for r in train if r["raw_label"] == "exc"]
    assert exc and all(r["emo"] == "happy" for r in exc)
    assert all(r["speaker"][:5] == r["ID"][:5] and r["speaker"][5] == r["ID"].rsplit("_", 1)[1][0] for r in train)
    assert list(train[0])[:3] == ["ID", "duration", "wav"]

    # Another fold reuses the checked list; valid is the next session.
    prepare_iemocap(corpus, out, out + "/fold2", test_session=2)
    assert {r["session"] for r in _rows(f"{out}/fold2/valid.csv")} == {"3"}
    assert {r["session"] for r in _rows(f"{out}/fold2/test.csv")} == {"2"}

    # Improvised only; valid from a fraction of the training dialogs (no dialog in both).
    report = prepare_iemocap(corpus, out, out + "/impro", test_session=1, improvised_only=True,
                             valid_session="none", valid_fraction=0.25)
    assert report["kept"] == 30
    train, valid = _rows(f"{out}/impro/train.csv"), _rows(f"{out}/impro/valid.csv")
    assert all("_impro" in r["ID"] for r in train + valid)
    assert valid and not {r["dialog"] for r in train} & {r["dialog"] for r in valid}
    assert "1" not in {r["session"] for r in train + valid}


def test_split_fold_rejects_bad_sessions():
    items = [{"session": s, "dialog": f"d{s}"} for s in range(1, 6)]
    with pytest.raises(ValueError, match="test_session"):
        split_fold(items, 6)
    with pytest.raises(ValueError, match="valid_session"):
        split_fold(items, 3, valid_session=3)
    assert [it["session"] for it in split_fold(items, 3, valid_session=1)["valid"]] == [1]


def test_prep_bad_utterances_are_skipped_and_listed(corpus, tmp_path):
    emo = os.path.join(corpus, "Session2", "dialog", "EmoEvaluation", "Ses02M_impro02.txt")
    wav_dir = os.path.join(corpus, "Session2", "sentences", "wav", "Ses02M_impro02")
    text = open(emo).read()
    # A malformed summary line (missing the V/A/D field) for utterance F000 (neu).
    text = text.replace("\tSes02M_impro02_F000\tneu\t[2.5000, 2.5000, 2.5000]", "\tSes02M_impro02_F000\tneu")
    # A label without audio.
    text += "[30.0000 - 31.0000]\tSes02M_impro02_F009\tsad\t[2.0000, 2.0000, 2.0000]\n"
    # A duplicated utterance line.
    text += "[32.0000 - 33.0000]\tSes02M_impro02_M000\tang\t[2.0000, 2.0000, 2.0000]\n"
    open(emo, "w").write(text)
    # Audio without a label; an unreadable wav; a macOS metadata file (ignored).
    _wav(os.path.join(wav_dir, "Ses02M_impro02_M009.wav"), "neu", np.random.default_rng(1))
    with open(os.path.join(wav_dir, "Ses02M_impro02_M001.wav"), "wb") as f:  # was ang
        f.write(b"RIFF\x00\x00garbage, not a wav")
    with open(os.path.join(wav_dir, "._Ses02M_impro02_M001.wav"), "wb") as f:
        f.write(b"\x00\x05\x16\x07")

    out = str(tmp_path / "prep")
    report = prepare_iemocap(corpus, out, out + "/fold", test_session=5)
    skipped = open(os.path.join(out, "iemocap_skipped.tsv")).read()
    assert report["skipped"] == 6, skipped
    assert f"{emo}:" in skipped and "malformed annotation line" in skipped
    assert "Ses02M_impro02_F009.wav\tlabel without audio" in skipped
    assert "Ses02M_impro02_M009.wav\taudio without a label" in skipped
    assert "Ses02M_impro02_F000.wav\taudio without a label" in skipped  # its line was the malformed one
    assert "duplicated utterance" in skipped
    assert "Ses02M_impro02_M001.wav\tunreadable audio" in skipped
    assert "._Ses02M" not in skipped
    ids = {r["ID"] for s in ("train", "valid", "test") for r in _rows(f"{out}/fold/{s}.csv")}
    assert len(ids) == 58
    assert not ids & {"Ses02M_impro02_F000", "Ses02M_impro02_M001", "Ses02M_impro02_M009", "Ses02M_impro02_F009"}
    assert "Ses02M_impro02_M000" in ids  # the first of the duplicated lines is kept


def test_prep_missing_files_and_wrong_folder(corpus, tmp_path):
    with pytest.raises(IEMOCAPLayoutError, match=r"Session\{1\.\.5\}/sentences/wav"):
        collect_utterances(str(tmp_path / "nowhere"))
    with pytest.raises(IEMOCAPLayoutError, match="Session1"):
        collect_utterances(str(tmp_path))  # the parent of the release folder
    emo = os.path.join(corpus, "Session3", "dialog", "EmoEvaluation", "Ses03F_script03_1.txt")
    os.remove(emo)
    with pytest.raises(FileNotFoundError, match="Ses03F_script03_1.txt"):
        prepare_iemocap(corpus, str(tmp_path / "p"), str(tmp_path / "p/f"))
    open(emo, "w").write("")
    os.rename(os.path.join(corpus, "Session3", "sentences", "wav", "Ses03F_script03_1"), str(tmp_path / "moved"))
    with pytest.raises(FileNotFoundError, match="missing audio folder .*Ses03F_script03_1"):
        prepare_iemocap(corpus, str(tmp_path / "p"), str(tmp_path / "p/f"))


# ---------------------------------------------------------------- metrics


def test_emotion_metrics_and_fold_aggregation():
    conf = np.array([[5, 1, 0, 0], [2, 2, 0, 0], [0, 0, 3, 1], [0, 0, 0, 0]])  # no sad in the test set
    m = train_mod.emotion_metrics(conf)
    assert m["WA"] == pytest.approx(10 / 14)
    assert m["UA"] == pytest.approx((5 / 6 + 2 / 4 + 3 / 4) / 3)
    assert m["recall"]["sad"] is None and m["support"]["neutral"] == 6

    folds = [{"test_session": s, "UA": ua, "WA": wa, "confusion": np.eye(4, dtype=int).tolist(), "n_utterances": 4}
             for s, ua, wa in zip(range(1, 6), [0.5, 0.6, 0.7, 0.4, 0.8], [0.55, 0.65, 0.6, 0.5, 0.7])]
    agg = folds_mod.aggregate_folds(folds)
    assert agg["n_folds"] == 5
    assert agg["UA_mean"] == pytest.approx(0.6) and agg["UA_std"] == pytest.approx(np.sqrt(0.02))
    assert agg["WA_mean"] == pytest.approx(0.6) and agg["WA_std"] == pytest.approx(np.std([0.55, 0.65, 0.6, 0.5, 0.7]))
    assert agg["confusion_sum"] == (5 * np.eye(4, dtype=int)).tolist()
    md = folds_mod.folds_markdown(agg)
    assert "**60.00 ± 14.14**" in md and "| 3 | 70.00 | 60.00 | 4 |" in md


# ---------------------------------------------------------------- brain in-process


def _brain(corpus, tmp_path, **overrides):
    from hyperpyyaml import load_hyperpyyaml

    out = str(tmp_path / f"run_{len(os.listdir(tmp_path))}")
    ov = dict(data_folder=corpus, output_folder=out, manifest_folder=str(tmp_path / "manifests"), batch_size=4,
              dropout=0.0, **overrides)
    with open(HPARAMS) as f:
        hparams = load_hyperpyyaml(f, ov)
    prepare_iemocap(corpus, hparams["manifest_folder"], hparams["split_folder"], test_session=5)
    datasets, _, _ = train_mod.dataio_prepare(hparams)
    brain = train_mod.EmotionBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                                   run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    brain.class_weights = None
    brain.on_fit_start()
    from speechbrain.dataio.batch import PaddedBatch

    loader = torch.utils.data.DataLoader(datasets["train"], batch_size=4, collate_fn=PaddedBatch)
    return brain, hparams, next(iter(loader))


def test_layer_weights_get_gradients(corpus, tmp_path, tiny_pretrained):
    import speechbrain as sb

    brain, hparams, batch = _brain(corpus, tmp_path, upstream=tiny_pretrained)
    assert hparams["upstream_model"].num_layers == 3
    brain.modules.train()
    loss = brain.compute_objectives(brain.compute_forward(batch, sb.Stage.TRAIN), batch, sb.Stage.TRAIN)
    loss.backward()
    g = hparams["layer_selector"].weights.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    before = hparams["layer_selector"].weights.detach().clone()
    brain.optimizer.step()
    assert not torch.equal(before, hparams["layer_selector"].weights.detach())


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vs_finetune(corpus, tmp_path, tiny_pretrained, freeze):
    brain, hparams, batch = _brain(corpus, tmp_path, upstream=tiny_pretrained, freeze=freeze, upstream_lr=0.001)
    up = hparams["upstream_model"]
    up_before = {k: v.detach().clone() for k, v in up.state_dict().items() if torch.is_tensor(v)}
    head_before = {k: v.detach().clone() for k, v in hparams["head_model"].state_dict().items()}
    brain.modules.train()
    for _ in range(2):
        brain.fit_batch(batch)
    changed = [k for k, v in up.state_dict().items() if torch.is_tensor(v) and not torch.equal(v, up_before[k])]
    enc_changed = [k for k in changed if k.startswith("encoder.")]
    if freeze:
        assert changed == [] and "upstream" not in brain.optimizers_dict
    else:
        assert len(enc_changed) > 10 and "upstream" in brain.optimizers_dict
        assert not [k for k in changed if k.startswith("features.")]  # pretrained statistics stay fixed
    assert any(not torch.equal(v, head_before[k]) for k, v in hparams["head_model"].state_dict().items())


# ---------------------------------------------------------------- recipe runs (subprocesses)


def _common(corpus, tmp_path, name):
    return dict(data_folder=corpus, experiment_folder=str(tmp_path / name), manifest_folder=str(tmp_path / "m"),
                number_of_epochs=1, batch_size=8, num_threads=1)


def _check_results(folder):
    res = json.load(open(os.path.join(folder, "test_results.json")))
    assert 0.0 <= res["UA"] <= 1.0 and 0.0 <= res["WA"] <= 1.0
    assert res["n_utterances"] == 12 and np.asarray(res["confusion"]).sum() == 12
    header = open(os.path.join(folder, "confusion_matrix.tsv")).readline().rstrip("\n").split("\t")
    assert header[1:] == list(CLASSES)
    assert "UA" in open(os.path.join(folder, "test_results.md")).read()
    assert "test UA" in open(os.path.join(folder, "train_log.txt")).read()
    return res


def test_recipe_tiny_mgf_export_contract(corpus, tmp_path, tiny_pretrained):
    from mgf_sb.pretrained_folder import load_pretrained
    from mgf_sb.heads import UtteranceClassifier
    from mgf_sb.upstream import LayerSelector, Upstream

    ov = dict(_common(corpus, tmp_path, "mgf"), upstream=tiny_pretrained, number_of_epochs=2, test_session=3)
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", ov)
    out = str(tmp_path / "mgf" / "session3")
    res = _check_results(out)
    assert len(res["layer_weights"]) == 3 and res["test_session"] == 3 and res["head"] == "linear"

    model = os.path.join(out, "model")
    assert open(os.path.join(model, "labels.txt")).read().split("\n") == list(CLASSES) + [""]
    cfg = json.load(open(os.path.join(model, "head_config.json")))
    assert cfg == {"task": "emotion", "upstream_source": tiny_pretrained, "layer": None, "num_layers": 3,
                   "input_size": 32, "pooling": "mean+std", "hidden_size": 0, "n_classes": 4}
    head_state = torch.load(os.path.join(model, "head.ckpt"), weights_only=True)
    assert set(head_state) == {"layer_selector", "classifier"}
    load_pretrained(os.path.join(model, "upstream"))  # a valid pretrained folder

    # The exported folder reproduces the test accuracy.
    import speechbrain as sb

    up = Upstream(os.path.join(model, "upstream")).eval()
    sel = LayerSelector(cfg["num_layers"], cfg["layer"])
    sel.load_state_dict(head_state["layer_selector"])
    head = UtteranceClassifier(cfg["input_size"], cfg["n_classes"], cfg["pooling"], cfg["hidden_size"]).eval()
    head.load_state_dict(head_state["classifier"])
    rows = _rows(os.path.join(out, "data", "test.csv"))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            chunk = rows[i:i + 8]
            wavs, lens = sb.utils.data_utils.batch_pad_right([sb.dataio.dataio.read_audio(r["wav"]) for r in chunk])
            layers, n = up(wavs, lens)
            pred = head(sel(layers), n).argmax(-1).tolist()
            correct += sum(CLASSES[p] == r["emo"] for p, r in zip(pred, chunk))
    assert correct / len(rows) == pytest.approx(res["WA"])


def test_recipe_random_with_reference(corpus, tmp_path, tiny_pretrained):
    ov = dict(_common(corpus, tmp_path, "random"), upstream="random", upstream_reference=tiny_pretrained,
              layer=-1, head="attentive", attentive_hidden_size=16)
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", ov)
    out = str(tmp_path / "random" / "session5")
    res = _check_results(out)
    assert res["head"] == "attentive"
    assert res["layer_weights"] is None and res["layer"] == -1
    cfg = json.load(open(os.path.join(out, "model", "head_config.json")))
    assert cfg["layer"] == -1 and cfg["pooling"] == "attentive" and cfg["num_layers"] == 3
    assert cfg["hidden_size"] == 16
    assert os.path.isfile(os.path.join(out, "model", "upstream", "encoder.ckpt"))
    # Resuming that folder with another upstream is refused, naming the difference.
    # (the one run guard of every recipe: mgf_sb.run_guard.check_run_config)
    from mgf_sb.run_guard import RunConfigChanged, check_run_config

    saved = json.load(open(os.path.join(out, "run_config.json")))
    hp = dict(saved["settings"], output_folder=out, resumable_keys=saved["resumable_keys"])
    assert check_run_config(hp)["changed"] == {}  # same settings: fine
    with pytest.raises(RunConfigChanged, match="(?s)holds a run with other settings.*upstream: "):
        check_run_config(dict(hp, upstream="fbank"))


def test_fold_runner_fbank(corpus, tmp_path):
    """fbank upstream through the fold runner (two folds to keep it short)."""
    import subprocess

    ov = _common(corpus, tmp_path, "fbank")
    cmd = [sys.executable, "recipes/IEMOCAP/run_folds.py", "hparams/emotion.yaml", "--sessions=4,5"] + \
        [f"--{k}={v}" for k, v in ov.items()]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    folds = [_check_results(str(tmp_path / "fbank" / f"session{s}")) for s in (4, 5)]
    agg = json.load(open(tmp_path / "fbank" / "folds_results.json"))
    assert agg["n_folds"] == 2 and [f["test_session"] for f in agg["folds"]] == [4, 5]
    assert agg["UA_mean"] == pytest.approx(np.mean([f["UA"] for f in folds]))
    assert agg["WA_std"] == pytest.approx(np.std([f["WA"] for f in folds]))
    assert "mean ± std" in open(tmp_path / "fbank" / "folds_results.md").read()
    model = tmp_path / "fbank" / "session5" / "model" / "upstream"
    assert json.load(open(model / "mgf_config.json"))["encoder"] is None
    assert sorted(os.listdir(model)) == ["features.ckpt", "mgf_config.json"]

    # The head and the convex reference travel to the fold table.
    assert agg["head"] == "linear"
    assert [f["convex_reference"] for f in agg["folds"]] == [f["convex_reference"] for f in folds]
    assert agg["convex_reference_mean"] == pytest.approx(np.mean([f["convex_reference"] for f in folds]))
    assert "convex reference UA" in open(tmp_path / "fbank" / "folds_results.md").read()
    # The convex reference is a logistic regression on the mean+std pooled fbank features of the
    # training sessions, scored on the test session: recompute it from the exported normaliser.
    import speechbrain as sb

    from mgf_sb.features import FeatureExtractor
    from mgf_sb.probing import fit_logistic_regression, pooled_statistics, unweighted_accuracy

    fbank = FeatureExtractor(**json.load(open(model / "mgf_config.json"))["features"]).eval()
    fbank.load_state_dict(torch.load(model / "features.ckpt", weights_only=True))

    def pooled(split):
        rows = _rows(str(tmp_path / "fbank" / "session5" / "data" / f"{split}.csv"))
        x = []
        with torch.no_grad():
            for r in rows:
                feats, n = fbank(sb.dataio.dataio.read_audio(r["wav"])[None], torch.ones(1), epoch=10**9)
                x.append(pooled_statistics(feats, n))
        return torch.cat(x), torch.tensor([CLASSES.index(r["emo"]) for r in rows])

    x_tr, y_tr = pooled("train")
    x_te, y_te = pooled("test")
    probe = fit_logistic_regression(x_tr, y_tr, len(CLASSES), l2=1e-4)
    ua = unweighted_accuracy(probe.predict(x_te), y_te, len(CLASSES))
    res5 = folds[1]
    assert res5["convex_reference"] == pytest.approx(ua, abs=1e-6)
    assert res5["convex_reference_info"]["n_train"] == len(y_tr)
    assert ua > 0.5  # the pitch-coded classes are linearly separable from pooled fbank


def test_lr_floor_class_weights_and_number_of_epochs(corpus, tmp_path):
    """One fold, fbank: the lr never goes below lr * lr_floor, the loss is class-weighted, and a
    rerun with a larger --number_of_epochs trains on from the checkpoint (scheduler state included)."""
    ov = dict(_common(corpus, tmp_path, "floor"), number_of_epochs=5, lr=0.004, lr_patience=0, lr_floor=0.25,
              early_stop_patience=100, convex_reference=False)
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", ov)
    out = tmp_path / "floor" / "session5"

    def lrs():
        lines = [line for line in open(out / "train_log.txt") if line.startswith("epoch:")]
        return [float(line.split("lr: ")[1].split(",")[0]) for line in lines]

    assert len(lrs()) == 5
    # 60 kept utterances, 36 for training (12 neutral, 12 happy, 6 angry, 6 sad): weights N / (4 n_c)
    log = open(out / "log.txt").read()
    assert "class-balanced cross-entropy, weights: neutral 0.750, happy 0.750, angry 1.500, sad 1.500" in log
    res = json.load(open(out / "test_results.json"))
    assert res["convex_reference"] is None
    run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", dict(ov, number_of_epochs=12))
    seen = lrs()
    assert len(seen) == 12  # epochs 6..12 trained on top of the first run's 5
    assert min(seen) >= 0.004 * 0.25 - 1e-12 and seen[0] == 0.004
    assert all(b <= a for a, b in zip(seen, seen[1:]))  # only ever annealed, never reset by the rerun
