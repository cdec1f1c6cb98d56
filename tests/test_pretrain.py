"""The pretraining recipe as a user runs it: prep, ablations, overfitting, resume."""

import os
import re

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, librispeech_subset, load_pretrain_recipe, write_hostile_audio_folder

TINY = {
    "d_model": 32, "num_layers": 2, "nhead": 4, "d_ffn": 64, "proj_dim": 32, "conv_pos_kernel": 9,
    "conv_pos_groups": 4, "dropout": 0.0, "max_batch_length": 40, "crop_seconds": 3.0, "num_buckets": 2,
    "ckpt_interval_minutes": 0,
}

# Every ablation the README documents: (name, overrides, scales expected in the log)
ABLATIONS = [
    ("full", {}, {"frame", "phoneme", "utterance"}),
    ("frame_only", {"use_phoneme": False, "use_utterance": False}, {"frame"}),
    ("phoneme_only", {"use_frame": False, "use_utterance": False}, {"phoneme"}),
    ("utterance_only", {"use_frame": False, "use_phoneme": False}, {"utterance"}),
    ("frame_contrastive", {"frame_loss": "infonce"}, {"frame", "phoneme", "utterance"}),
    ("phoneme_generative", {"phoneme_loss": "l1", "phoneme_target": "fbank"}, {"frame", "phoneme", "utterance"}),
    ("phoneme_l2_teacher", {"phoneme_loss": "l2"}, {"frame", "phoneme", "utterance"}),
    ("utterance_generative", {"utterance_loss": "l1", "utterance_target": "fbank"}, {"frame", "phoneme", "utterance"}),
    ("online_teacher", {"target_mode": "online"}, {"frame", "phoneme", "utterance"}),
    ("frame_stack2", {"frame_stack": 2}, {"frame", "phoneme", "utterance"}),
    ("weight_zero", {"utterance_weight": 0.0}, {"frame", "phoneme"}),
    ("mask_copies2", {"mask_copies": 2, "frame_stack": 2}, {"frame", "phoneme", "utterance"}),
    ("frame_stack1", {"frame_stack": 1}, {"frame", "phoneme", "utterance"}),
    ("mask_copies1", {"mask_copies": 1}, {"frame", "phoneme", "utterance"}),
    ("utterance_layer1", {"utterance_layer": 1}, {"frame", "phoneme", "utterance"}),
    ("utterance_weight02", {"utterance_weight": 0.2}, {"frame", "phoneme", "utterance"}),
    ("with_word_scale", {"use_word": True}, {"frame", "phoneme", "word", "utterance"}),
    ("word_only", {"use_word": True, "use_frame": False, "use_phoneme": False, "use_utterance": False}, {"word"}),
]


_load_recipe = load_pretrain_recipe


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """6 training and 2 validation files in LibriSpeech layout."""
    return librispeech_subset(tmp_path_factory.mktemp("ls"), 6, 2)


def run(recipe, out, data, **overrides):
    args = {**TINY, "data_folder": data, "output_folder": out, **overrides}
    recipe.main([os.path.join(REPO, "hparams", "mgf.yaml")] + [f"--{k}={v}" for k, v in args.items()])
    return parse_log(os.path.join(out, "train_log.txt"))


def parse_log(path):
    """train_log.txt -> list of {epoch, step, train {scale: loss}}."""
    rows = []
    for line in open(path):
        epoch = int(re.search(r"epoch: (\d+)", line).group(1))
        step = int(re.search(r"step: (\d+)", line).group(1))
        train = dict((k, float(v)) for k, v in re.findall(r"train (\w+): ([-\d.e+]+)", line))
        rows.append({"epoch": epoch, "step": step, "train": train})
    return rows


@pytest.mark.parametrize("name,overrides,scales", ABLATIONS, ids=[a[0] for a in ABLATIONS])
def test_ablation_builds_and_trains(recipe, small_corpus, tmp_path, name, overrides, scales):
    log = run(recipe, str(tmp_path / name), small_corpus, number_of_epochs=1, **overrides)
    logged = {k for k in log[0]["train"] if k in ("frame", "phoneme", "word", "utterance")}
    assert logged == scales
    assert log[0]["step"] > 0 and np.isfinite(log[0]["train"]["loss"])
    assert os.path.isfile(tmp_path / name / "pretrained" / "encoder.ckpt")


def test_overfit_every_scale_loss_drops(recipe, small_corpus, tmp_path):
    log = run(recipe, str(tmp_path / "overfit"), small_corpus, number_of_epochs=30, lr=0.003, lr_warmup_steps=3,
              lr_total_steps=120, crop_seconds=4.0, max_batch_length=60)
    # Means of the first and last 3 epochs (2 batches each): single epochs are noisy.
    first = {k: sum(r["train"][k] for r in log[:3]) / 3 for k in ("frame", "phoneme", "utterance")}
    last = {k: sum(r["train"][k] for r in log[-3:]) / 3 for k in ("frame", "phoneme", "utterance")}
    # L1 on normalised log-Mel starts near 0.8 (predicting the mean); the
    # contrastive losses start near log(1 + distractors).
    for scale, factor in (("frame", 0.85), ("phoneme", 0.7), ("utterance", 0.7)):
        assert last[scale] < factor * first[scale], (scale, first[scale], last[scale])


def test_resume_continues_from_checkpoint(recipe, small_corpus, tmp_path):
    out = str(tmp_path / "resume")
    log1 = run(recipe, out, small_corpus, number_of_epochs=1)
    log2 = run(recipe, out, small_corpus, number_of_epochs=2)  # same command, one more epoch
    assert [r["epoch"] for r in log2] == [1, 2]
    assert log2[1]["step"] == 2 * log1[0]["step"]  # the step counter came back from the checkpoint
    assert "Loading a checkpoint" in open(os.path.join(out, "log.txt")).read()


def test_prep_handles_bad_files(tmp_path):
    from mgf_sb.data.manifest import read_manifest
    from mgf_sb.data.prepare_audio import prepare_pretraining

    root = tmp_path / "audio"
    write_hostile_audio_folder(root)
    out = tmp_path / "prep"
    prepare_pretraining(str(root), str(out), train_splits=[], valid_splits=[], valid_fraction=0.25, min_duration=1.0)
    rows = read_manifest(str(out / "train.csv")) + read_manifest(str(out / "valid.csv"))
    ids = sorted(r["ID"] for r in rows)
    assert ids == ["good/a", "good/b", "x/hi", "x/stereo 8k é"]
    for r in rows:  # everything in the manifest is 16 kHz mono now
        info = sf.info(r["wav"])
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(float(r["duration"]) - 2.0) < 0.01 or r["ID"] == "good/b"
    skipped = dict(line.rstrip("\n").split("\t") for line in open(out / "train_skipped.tsv", encoding="utf-8"))
    reasons = {os.path.basename(p): r for p, r in skipped.items() if p != "path"}
    assert reasons["short.wav"].startswith("too short")
    assert reasons["silent.wav"].startswith("silent")
    assert reasons["nan.wav"].startswith("NaN")
    assert reasons["text.wav"].startswith("unreadable")
    assert reasons["empty.flac"].startswith("unreadable") or reasons["empty.flac"].startswith("empty")
    assert "truncated.flac" in reasons
    converted = open(out / "train_converted.tsv", encoding="utf-8").read()
    assert "resampled 8000->16000 Hz" in converted and "downmixed 2->1" in converted and "44100" in converted


def test_prep_empty_folder_is_a_clear_error(tmp_path):
    from mgf_sb.data.prepare_audio import prepare_pretraining

    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no usable audio in .*nothing"):
        prepare_pretraining(str(tmp_path / "nothing"), str(tmp_path / "o"), train_splits=[], valid_splits=[])
    with pytest.raises(FileNotFoundError, match="train-clean-100.*not found"):
        prepare_pretraining(str(tmp_path / "nothing"), str(tmp_path / "o"), train_splits=["train-clean-100"])

def test_a_finished_run_rerun_says_finished_and_does_nothing(recipe, small_corpus, tmp_path, capsys):
    """Issue 29: the same command on a finished run reloaded everything and exited silently."""
    out = str(tmp_path / "done")
    run(recipe, out, small_corpus, number_of_epochs=1)
    ckpt_mtime = os.path.getmtime(os.path.join(out, "pretrained", "encoder.ckpt"))
    capsys.readouterr()
    log = run(recipe, out, small_corpus, number_of_epochs=1)
    said = capsys.readouterr().out
    assert "finished: 1 epoch (the epoch limit); results in " in said
    assert "pretrained" in said.split("finished: ")[1]
    assert len(log) == 1  # no epoch line added
    assert os.path.getmtime(os.path.join(out, "pretrained", "encoder.ckpt")) == ckpt_mtime


def test_console_gets_a_short_epoch_line_and_train_log_the_full_one(recipe, small_corpus, tmp_path):
    """Issue 29: an epoch line was ~1,500 characters of 30+ keys in e-notation, on the console too.
    What the console gets, SpeechBrain's logging also writes to log.txt."""
    out = str(tmp_path / "lines")
    log = run(recipe, out, small_corpus, number_of_epochs=1)
    logged = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    short = re.findall(r"epoch 1/1: train loss .*", logged)
    assert len(short) == 1 and len(short[0]) < 300, short
    assert "frame " in short[0] and "phoneme acc" in short[0] and "context baseline" in short[0] and "lr " in short[0]
    full = open(os.path.join(out, "train_log.txt")).read().splitlines()[0]
    assert len(full) > 3 * len(short[0]) and "train phoneme_context_acc: " in full
    assert full not in logged and "phoneme_context_acc" not in logged  # the full line stays in train_log.txt
    assert log[0]["train"]["frame"] > 0
    # readable numbers: plain decimals from 0.01 to 1e5 (SpeechBrain wrote 0.5 as 5.00e-01, 100 as 1.00e+02)
    for key, value in re.findall(r"(\w+): ([-\d.e+]+)", full):
        if "e" in value:
            assert abs(float(value)) < 0.01 or abs(float(value)) >= 1e5 or float(value) == 0, (key, value)


def test_plain_numbers():
    from mgf_sb.train_log import plain_number

    assert [plain_number(v) for v in (100.0, 1.6667, 0.16667, 0.025, 0.002, 123456.0, 0.0)] == \
        ["100.0", "1.67", "0.167", "0.0250", "2.00e-03", "1.23e+05", "0"]
