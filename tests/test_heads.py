"""Downstream heads (two per task, chosen in the YAML) and probe convergence (lr floor,
early stopping, class-balanced loss)."""

import json
import os
import sys
import types

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO, run_recipe
from mgf_sb.downstream import DownstreamBrain, balanced_class_weights
from mgf_sb.heads import (
    CTCHead,
    FrameBiLSTM,
    FrameProbe,
    PooledLinearHead,
    UtteranceClassifier,
    XvectorHead,
    count_parameters,
    select_head,
)

HP = {task: os.path.join(REPO, "hparams", f"{name}.yaml") for task, name in
      [("timit", "timit"), ("voxceleb", "voxceleb"), ("iemocap", "emotion"), ("librispeech", "librispeech_ctc")]}


def _load(task, **overrides):
    with open(HP[task]) as f:
        return load_hyperpyyaml(f, overrides)


# ---------------------------------------------------------------- the heads themselves


def _lstm_params(d_in, h, layers):
    """Parameters of a bidirectional torch LSTM (two bias vectors per gate set)."""
    total = 0
    for layer in range(layers):
        d = d_in if layer == 0 else 2 * h
        total += 2 * (4 * h * (d + h) + 8 * h)
    return total


def test_frame_heads_shapes_parameters_and_padding():
    torch.manual_seed(0)
    linear, bilstm = FrameProbe(192, 39), FrameBiLSTM(192, 39, hidden_size=96, num_layers=2)
    assert count_parameters(linear) == 192 * 39 + 39
    assert count_parameters(bilstm) == _lstm_params(192, 96, 2) + 192 * 39 + 39
    assert 2e5 < count_parameters(bilstm) < 1e6  # "a few hundred thousand"
    x, n = torch.randn(3, 11, 192), torch.tensor([11, 7, 2])
    for head in (linear, bilstm.eval()):
        assert head(x, n).shape == (3, 11, 39)
    # The BiLSTM reads valid frames only: padding (whatever it holds) changes nothing on them.
    y = bilstm(x, n)
    x2 = x.clone()
    x2[1, 7:] = 100.0
    assert torch.allclose(bilstm(x2, n)[1, :7], y[1, :7], atol=1e-6)
    assert torch.allclose(bilstm(x[1:2, :7], n[1:2]), y[1:2, :7], atol=1e-6)
    # ... and it is not frame-wise: a change at frame 0 reaches the last valid frame.
    x3 = x.clone()
    x3[0, 0] += 1.0
    assert not torch.allclose(bilstm(x3, n)[0, -1], y[0, -1])


def test_ctc_heads_linear_and_bilstm():
    linear, bilstm = CTCHead(64, 29, lstm_layers=0), CTCHead(64, 29, lstm_layers=2, lstm_hidden=32)
    assert count_parameters(linear) == 64 * 29 + 29
    assert count_parameters(bilstm) == _lstm_params(64, 32, 2) + 64 * 29 + 29
    x, n = torch.randn(2, 9, 64), torch.tensor([9, 4])
    for head in (linear.eval(), bilstm.eval()):
        lp = head(x, n)
        assert lp.shape == (2, 9, 29) and torch.allclose(lp.exp().sum(-1), torch.ones(2, 9), atol=1e-5)


def test_utterance_heads_shapes_parameters_and_padding():
    torch.manual_seed(0)
    linear = UtteranceClassifier(192, 4, "mean+std", hidden_size=0)
    attentive = UtteranceClassifier(192, 4, "attentive", hidden_size=128)
    assert count_parameters(linear) == 2 * 192 * 4 + 4
    assert count_parameters(attentive) == (192 * 128 + 128 + 128 + 1) + (2 * 192 * 128 + 128) + (128 * 4 + 4)
    x, n = torch.randn(3, 20, 192), torch.tensor([20, 12, 5])
    for head in (linear.eval(), attentive.eval()):
        out = head(x, n)
        assert out.shape == (3, 4)
        x2 = x.clone()
        x2[2, 5:] = -50.0  # padding is ignored by both poolings
        assert torch.allclose(head(x2, n), out, atol=1e-5)
    # attentive pooling weighs frames: it is not the plain mean+std
    pooled = attentive.pool(x, n)
    assert pooled.shape == (3, 2 * 192)
    assert not torch.allclose(pooled[0, :192], x[0].mean(0), atol=1e-4)


def test_speaker_heads_shapes_parameters_embeddings():
    torch.manual_seed(0)
    linear = PooledLinearHead(192, 1251)
    assert count_parameters(linear) == 2 * 192 * 1251 + 1251  # BatchNorm without affine part
    xv = XvectorHead(192, 1251)
    n_tdnn = (5 * 192 * 128 + 128) + 2 * (3 * 128 * 128 + 128) + (128 * 128 + 128) + (128 * 384 + 384)
    n_bn = 2 * (4 * 128 + 384)
    assert count_parameters(xv) == n_tdnn + n_bn + (2 * 384 * 128 + 128) + 1251 * 128
    assert 2e5 < count_parameters(xv) < 1e6
    x, n = torch.randn(4, 60, 192), torch.tensor([60, 45, 30, 60])
    linear.eval(), xv.eval()
    assert linear(x, n).shape == (4, 1251) and linear.embed(x, n).shape == (4, 384)
    cos = xv(x, n)
    assert cos.shape == (4, 1251) and cos.abs().max() <= 1 + 1e-5
    emb = xv.embed(x, n)
    assert emb.shape == (4, 128)
    # what the padding holds does not matter (up to the ~1e-5 jitter SpeechBrain's
    # statistics pooling adds to the mean); the valid frames do
    x2 = x.clone()
    x2[2, 30:] = 50.0
    assert (xv.embed(x2, n) - emb).abs().max() < 2e-4
    x2[2, 10] += 3.0
    assert (xv.embed(x2, n)[2] - emb[2]).abs().max() > 1e-3
    # padded or alone: close (the TDNN's edge sees zeros instead of its reflect padding)
    alone = xv.embed(x[2:3, :30], n[2:3])
    assert torch.nn.functional.cosine_similarity(alone, emb[2:3]).item() > 0.95
    assert linear.margin_loss is False and xv.margin_loss is True


# ---------------------------------------------------------------- chosen in the YAML


@pytest.mark.parametrize("task,name,kind", [
    ("timit", "linear", FrameProbe), ("timit", "bilstm", FrameBiLSTM),
    ("iemocap", "linear", UtteranceClassifier), ("iemocap", "attentive", UtteranceClassifier),
    ("librispeech", "linear", CTCHead), ("librispeech", "bilstm", CTCHead),
    ("voxceleb", "linear", PooledLinearHead), ("voxceleb", "xvector", XvectorHead),
])
def test_head_chosen_in_yaml(task, name, kind, tmp_path):
    hp = _load(task, head=name, output_folder=str(tmp_path))
    if task == "voxceleb":  # built by train.py once the speakers are counted
        head = select_head(hp["heads"], hp["head"], input_size=hp["upstream_model"].output_size, n_classes=5)
        assert hp["exclude_trial_speakers"] is (name == "xvector")  # VoxCeleb1-O with the x-vector head
        assert hp["lr"] == {"linear": 0.005, "xvector": 0.001}[name]
    else:
        head = {"timit": "probe", "iemocap": "head_model", "librispeech": "ctc_head"}[task]
        head = hp[head]
        assert hp["modules"][{"timit": "probe", "iemocap": "head", "librispeech": "ctc_head"}[task]] is head
    assert type(head) is kind
    if task == "iemocap":
        assert (head.pooling, head.hidden_size) == (("mean+std", 0) if name == "linear" else ("attentive", 128))
    if task == "librispeech":
        assert (head.lstm is None) == (name == "linear")
    with pytest.raises(ValueError, match="head must be one of"):
        select_head(hp["heads"], "nope", input_size=8, n_classes=2)


def test_default_output_folders_name_the_head():
    for task in HP:
        names = {"timit": ("linear", "bilstm"), "voxceleb": ("linear", "xvector"),
                 "iemocap": ("linear", "attentive"), "librispeech": ("linear", "bilstm")}[task]
        folders = [str(_load(task, head=n)["output_folder"]) for n in names]
        assert folders[0] != folders[1], task
        for n, f in zip(names, folders):
            assert n in f.split("/"), (task, f)


# ---------------------------------------------------------------- convergence: schedule, stopping, weights


def _fake_brain(hp, lr):
    """The attributes anneal_and_stop uses: an optimizer and the YAML's scheduler and counter."""
    param = torch.nn.Parameter(torch.zeros(1))
    return types.SimpleNamespace(optimizer=torch.optim.Adam([param], lr=lr), hparams=types.SimpleNamespace(
        lr_annealing=hp["lr_annealing"], epoch_counter=hp["epoch_counter"]))


@pytest.mark.parametrize("task", list(HP))
def test_lr_floor_and_early_stopping_from_yaml(task, tmp_path):
    """Dev error that never improves: the lr decays to lr * lr_floor and stays there; training stops."""
    hp = _load(task, output_folder=str(tmp_path), number_of_epochs=200, early_stop_patience=60, lr_patience=1)
    lr, floor = hp["lr"], hp["lr"] * hp["lr_floor"]
    assert 0 < hp["lr_floor"] < 1
    brain = _fake_brain(hp, lr)
    lrs, epochs = [], []
    for epoch in hp["epoch_counter"]:
        epochs.append(epoch)
        DownstreamBrain.anneal_and_stop(brain, 0.5 if epoch == 1 else 0.6)  # best at epoch 1, then worse
        lrs.append(brain.optimizer.param_groups[0]["lr"])
    assert min(lrs) >= floor * (1 - 1e-9)          # never below the floor...
    assert lrs[-1] == pytest.approx(floor)          # ...and it got there
    assert lrs[0] == lr and lrs[1] == lr            # lr_patience=1: one bad epoch tolerated
    assert lrs[2] == pytest.approx(lr * hp["lr_annealing_factor"])
    assert epochs[-1] == 61                         # best at 1, stopped 60 epochs later (not at 200)


def test_improvement_keeps_the_lr_and_number_of_epochs_counts(tmp_path):
    hp = _load("iemocap", output_folder=str(tmp_path), number_of_epochs=7)
    brain = _fake_brain(hp, hp["lr"])
    n = 0
    for epoch in hp["epoch_counter"]:
        n += 1
        DownstreamBrain.anneal_and_stop(brain, 1.0 / epoch)  # always improving
        assert brain.optimizer.param_groups[0]["lr"] == hp["lr"]
    assert n == 7


def test_class_balanced_weights():
    w = balanced_class_weights([0] * 6 + [1] * 3 + [2], 4)
    # N / (C_present * n_c): 10/18, 10/9, 10/3 and 0 for the absent class
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    assert float(w[labels].sum()) == pytest.approx(10)  # mean 1 over the utterances
    assert balanced_class_weights([0, 1], 2, balanced=False) is None


def test_class_weights_applied_in_the_emotion_loss(tmp_path):
    """EmotionBrain's loss is the class-weighted cross-entropy (minority errors cost more)."""
    sys.path.insert(0, os.path.join(REPO, "recipes", "IEMOCAP"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("iemocap_train_heads", os.path.join(REPO, "recipes", "IEMOCAP",
                                                                                        "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import speechbrain as sb

    brain = types.SimpleNamespace(class_stats=sb.utils.metric_stats.ClassificationStats())
    logits = torch.randn(6, 4)
    targets = torch.tensor([0, 0, 0, 0, 1, 2])
    batch = types.SimpleNamespace(emo_encoded=types.SimpleNamespace(data=targets[:, None]), id=list("abcdef"))
    brain.class_weights = balanced_class_weights(targets.tolist(), 4)
    weighted = mod.EmotionBrain.compute_objectives(brain, logits, batch, sb.Stage.TRAIN)
    brain.class_weights = None
    plain = mod.EmotionBrain.compute_objectives(brain, logits, batch, sb.Stage.TRAIN)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor([0.5] * 4 + [2.0, 2.0])  # 6 / (3 classes * count)
    assert float(weighted) == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-5)
    assert float(plain) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)


# ---------------------------------------------------------------- a head through its recipe


def test_timit_bilstm_head_through_the_recipe(tmp_path):
    """The non-linear TIMIT head trains through the recipe on the bundled sample (2 epochs)."""
    out = str(tmp_path / "bilstm")
    run_recipe("recipes/TIMIT/train.py", "hparams/timit.yaml",
               dict(output_folder=out, head="bilstm", bilstm_hidden=32, number_of_epochs=2, num_threads=1,
                    batch_size=4, lr=0.005))
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["head"] == "bilstm"
    assert res["dev"]["frames"] > 0 and 0.0 <= res["dev"]["acc"] <= 1.0
    ckpt = [d for d in os.listdir(os.path.join(out, "save")) if d.startswith("CKPT")][0]
    state = torch.load(os.path.join(out, "save", ckpt, "probe.ckpt"), weights_only=True)
    assert any(k.startswith("lstm.") for k in state)  # the BiLSTM was trained and checkpointed
    assert "head bilstm" in open(os.path.join(out, "results.md")).read()
    log = open(os.path.join(out, "train_log.txt")).read()
    assert "epoch: 2" in log and "lr: 5.00e-03" in log
