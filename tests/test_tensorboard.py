"""--use_tensorboard=True: SpeechBrain TensorboardLogger events next to train_log.txt (mgf_sb.live_curves)."""

import os
import sys
from types import SimpleNamespace

import pytest
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.train_logger import FileTrainLogger

from conftest import REPO, SAMPLES, run_recipe

from mgf_sb.live_curves import MISSING_MESSAGE, TeeTrainLogger, attach_tensorboard, layer_weight_scalars

RECIPE_YAMLS = ("mgf", "timit", "voxceleb", "librispeech_ctc", "emotion")


def scalars(folder):
    """tag -> [(step, value)] over every event file under ``folder`` (in file order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if "tfevents" not in f:
                continue
            acc = EventAccumulator(os.path.join(root, f))
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def fake_brain(tmp_path, use_tensorboard=True):
    hp = SimpleNamespace(train_logger=FileTrainLogger(str(tmp_path / "train_log.txt")), output_folder=str(tmp_path),
                         use_tensorboard=use_tensorboard, tensorboard_folder=str(tmp_path / "tb"))
    return SimpleNamespace(hparams=hp)


def test_off_by_default_changes_nothing(tmp_path):
    brain = fake_brain(tmp_path, use_tensorboard=False)
    file_logger = brain.hparams.train_logger
    assert attach_tensorboard(brain) is None and brain.hparams.train_logger is file_logger
    brain.hparams.train_logger.log_stats({"epoch": 1}, train_stats={"loss": 1.0})
    assert not os.path.exists(tmp_path / "tb")
    # a YAML without the switch (an older config) is "off" as well
    del brain.hparams.use_tensorboard
    assert attach_tensorboard(brain) is None


def test_events_per_epoch_and_file_log_unchanged(tmp_path):
    weights = {"w": [0.5, 0.5]}
    brain = fake_brain(tmp_path)
    attach_tensorboard(brain, lambda: layer_weight_scalars(weights["w"]))
    log = brain.hparams.train_logger
    assert isinstance(log, TeeTrainLogger) and log.save_file == str(tmp_path / "train_log.txt")
    log.log_stats({"epoch": 1, "lr": 0.1, "layer_weights": "0.50 0.50"}, train_stats={"loss": 2.0, "frame": 0.9},
                  valid_stats={"loss": 2.5, "acc": 0.3})
    weights["w"] = [0.2, 0.8]
    log.log_stats({"epoch": 2, "lr": 0.05, "layer_weights": "0.20 0.80"}, train_stats={"loss": 1.5, "frame": 0.7},
                  valid_stats={"loss": 2.0, "acc": 0.4})
    assert attach_tensorboard(brain) is log.tensorboard  # attaching twice does not tee twice
    # A resumed run (new process, same folder) continues at its epoch instead of restarting at 1.
    resumed = fake_brain(tmp_path)
    attach_tensorboard(resumed)
    resumed.hparams.train_logger.log_stats({"epoch": 3, "lr": 0.02}, train_stats={"loss": 1.0})
    resumed.hparams.train_logger.log_stats({"Epoch loaded": 3}, test_stats={"acc": 0.5})

    ev = scalars(tmp_path / "tb")
    assert ev["loss/train"] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert ev["frame/train"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.7))]
    assert ev["acc/valid"] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.4))]
    assert ev["acc/test"] == [(3, 0.5)]
    assert ev["lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.05)), (3, pytest.approx(0.02))]
    assert ev["layer_weight/01"] == [(1, 0.5), (2, pytest.approx(0.8))]
    assert "layer_weights" not in ev and "epoch" not in ev  # strings are skipped, the epoch is the x axis
    lines = (tmp_path / "train_log.txt").read_text().splitlines()  # the text log is written as before
    assert len(lines) == 4 and lines[1].startswith("epoch: 2, lr: 5.00e-02, layer_weights: 0.20 0.80 - train loss")


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError) as err:
        attach_tensorboard(fake_brain(tmp_path))
    assert str(err.value) == MISSING_MESSAGE and 'pip install -e ".[tensorboard]"' in MISSING_MESSAGE


@pytest.mark.parametrize("name", RECIPE_YAMLS)
def test_every_recipe_has_the_switch_off(name):
    with open(os.path.join(REPO, "hparams", f"{name}.yaml"), encoding="utf-8") as f:
        hp = load_hyperpyyaml(f)
    assert hp["use_tensorboard"] is False
    assert hp["tensorboard_folder"] == os.path.join(hp["output_folder"], "tensorboard")


TINY_PRETRAIN = {"d_model": 32, "num_layers": 2, "nhead": 4, "d_ffn": 64, "proj_dim": 32, "conv_pos_kernel": 9,
                 "conv_pos_groups": 4, "max_batch_length": 40, "crop_seconds": 3.0, "ckpt_interval_minutes": 0,
                 "number_of_epochs": 2, "num_threads": 1}


def test_pretraining_writes_scale_losses(tmp_path):
    out = tmp_path / "pre"
    run_recipe("recipes/pretrain/train.py", "hparams/mgf.yaml",
               dict(TINY_PRETRAIN, output_folder=out, data_folder=os.path.join(SAMPLES, "LibriSpeech"),
                    use_tensorboard=True))
    ev = scalars(out / "tensorboard")
    for tag in ("loss/train", "loss/valid", "frame/train", "phoneme/train", "utterance/train", "lr", "step"):
        assert [s for s, _ in ev[tag]] == [1, 2], tag
    assert ev["step"][1][1] > ev["step"][0][1] > 0
    # the same run without the switch writes no events
    run_recipe("recipes/pretrain/train.py", "hparams/mgf.yaml",
               dict(TINY_PRETRAIN, output_folder=tmp_path / "plain", number_of_epochs=1,
                    data_folder=os.path.join(SAMPLES, "LibriSpeech")))
    assert not os.path.exists(tmp_path / "plain" / "tensorboard")


def test_probe_writes_accuracy_and_layer_weights(tmp_path, tiny_pretrained):
    out = tmp_path / "timit"
    run_recipe("recipes/TIMIT/train.py", "hparams/timit.yaml",
               dict(output_folder=out, upstream=tiny_pretrained, number_of_epochs=2, num_threads=1,
                    use_tensorboard=True))
    ev = scalars(out / "tensorboard")
    assert [s for s, _ in ev["loss/train"]] == [1, 2] and "acc/valid" in ev and "lr" in ev
    n_layers = len([t for t in ev if t.startswith("layer_weight/")])
    assert n_layers == 3  # input embedding + 2 layers of the tiny encoder
    for epoch in (0, 1):  # a softmax over the layers at every epoch
        assert sum(ev[f"layer_weight/{i:02d}"][epoch][1] for i in range(n_layers)) == pytest.approx(1.0, abs=1e-5)
