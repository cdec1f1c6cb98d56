"""A run's whole life (issue 24): a mistake can be corrected, bad values are refused by name at
start, and a restart leaves nothing stale. Through the shared prologue every recipe's main() calls
(``mgf_sb.recipe.start_experiment``: settings check, then the run guard), in this process: the
YAMLs are loaded with their real modules, and what a finished run leaves behind (a checkpoint,
results, scores) is written by the test, so no training is needed."""

import glob
import json
import os
import shutil
import sys

import pytest
import speechbrain as sb

from conftest import REPO, SAMPLES

from mgf_sb.recipe import start_experiment
from mgf_sb.run_guard import RUN_CONFIG, RunConfigChanged, check_run_config, release_locks
from mgf_sb.settings import BadSetting, UnknownSetting, check_settings

HP = os.path.join(REPO, "hparams")
TINY = dict(d_model=32, nhead=2, num_layers=1, d_ffn=64, proj_dim=16, conv_pos_groups=4, number_of_epochs=1)


@pytest.fixture(autouse=True)
def prologue_only(monkeypatch):
    """The prologue without SpeechBrain's logging set-up (it would reconfigure this test process's
    logging): the experiment folder gets its copy of the YAML, as create_experiment_directory does."""

    def create(experiment_directory, hyperparams_to_save=None, overrides=None, **_):
        os.makedirs(experiment_directory, exist_ok=True)
        shutil.copy(hyperparams_to_save, os.path.join(experiment_directory, "hyperparams.yaml"))

    monkeypatch.setattr(sb, "create_experiment_directory", create)
    monkeypatch.chdir(REPO)
    yield
    release_locks()


def _start(yaml, **overrides):
    argv = [os.path.join(HP, yaml)] + [f"--{k}={v}" for k, v in overrides.items()]
    return start_experiment(argv)[0]


def _record(out):
    return json.load(open(os.path.join(out, RUN_CONFIG)))["settings"]


def _finish(hp, files=("results.json", "results.md")):
    """What a finished run leaves: a checkpoint in its save folder, a train-log line, results."""
    os.makedirs(os.path.join(hp["save_folder"], "CKPT+2024-01-01+00-00-00+00"), exist_ok=True)
    with open(hp["train_log"], "a") as f:
        f.write("epoch: 1, lr: 1.00e-03 - train loss: 1.00\n")
    for name in files:
        with open(os.path.join(hp["output_folder"], name), "w") as f:
            f.write("{}\n" if name.endswith(".json") else "old run\n")


# ------------------------------------------------------------------ a mistake must be correctable
def test_misspelt_data_folder_is_reported_before_the_guard_records_anything(tmp_path):
    out = str(tmp_path / "run")
    wrong = os.path.join(SAMPLES, "LibriSpeeh")
    with pytest.raises(FileNotFoundError, match=r"(?s)--data_folder=.*LibriSpeeh: the data folder does not exist "
                                                r"\(did you mean .*samples/LibriSpeech\?\)"):
        _start("mgf.yaml", data_folder=wrong, output_folder=out, **TINY)
    assert not os.path.exists(os.path.join(out, RUN_CONFIG))
    hp = _start("mgf.yaml", data_folder=os.path.join(SAMPLES, "LibriSpeech"), output_folder=out, **TINY)
    assert _record(out)["data_folder"] == os.path.join(SAMPLES, "LibriSpeech")

    # after a finished run, a misspelt folder is still "does not exist", not "settings changed"
    _finish(hp)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _start("mgf.yaml", data_folder=wrong, output_folder=out, **TINY)
    # ... and a real change of a finished run still stops
    with pytest.raises(RunConfigChanged, match="lr: 0.002 -> 0.05"):
        _start("mgf.yaml", data_folder=os.path.join(SAMPLES, "LibriSpeech"), output_folder=out, lr=0.05, **TINY)


@pytest.mark.parametrize("yaml,first,corrected", [
    ("emotion.yaml", {"use_tensorboard": True}, {"use_tensorboard": False}),  # "or run without --use_tensorboard"
    ("timit.yaml", {"lr": 0.5}, {"lr": 0.002}),
    ("mgf.yaml", {"data_folder": os.path.join(SAMPLES, "TIMIT")},  # a wrong folder that exists
     {"data_folder": os.path.join(SAMPLES, "LibriSpeech")}),
])
def test_a_start_that_failed_before_training_does_not_block_the_corrected_command(tmp_path, capsys, yaml, first,
                                                                                    corrected):
    out = str(tmp_path / "run")
    extra = TINY if yaml == "mgf.yaml" else {"number_of_epochs": 1}
    hp = _start(yaml, output_folder=out, **extra, **first)  # recorded; then the run fails before training
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write("ImportError: ... or run without --use_tensorboard\n")
    (key, value), = corrected.items()
    hp = _start(yaml, output_folder=out, **extra, **corrected)  # the corrected command proceeds
    said = capsys.readouterr().out
    assert "never trained" in said and key in said
    assert _record(out)[key] == (os.path.abspath(value) if key == "data_folder" else value)
    (aside,) = glob.glob(os.path.join(out, "replaced-*"))  # the failed attempt's files, kept
    assert os.path.isfile(os.path.join(aside, "log.txt")) and os.path.isdir(hp["save_folder"])
    # once it has trained, the record binds
    _finish(hp, files=())
    with pytest.raises(RunConfigChanged, match=f"{key}: "):
        _start(yaml, output_folder=out, **extra, **first)


# ------------------------------------------------------------------ bad values refused by name
@pytest.mark.parametrize("yaml,key,value,wants", [
    ("mgf.yaml", "use_phoneme", "maybe", "True or False"),
    ("mgf.yaml", "number_of_epochs", "1.5", "a whole number >= 1"),
    ("mgf.yaml", "number_of_epochs", "abc", "a whole number >= 1"),
    ("mgf.yaml", "max_batch_length", "-1", "a number > 0"),
    ("mgf.yaml", "crop_seconds", "0", "a number > 0"),
    ("mgf.yaml", "lr", "abc", "a number > 0"),
    ("timit.yaml", "lr", "abc", "a number > 0"),
    ("timit.yaml", "freeze", "nope", "True or False"),
    ("voxceleb.yaml", "crop_seconds", "0", "a number > 0"),
    ("voxceleb.yaml", "lr", "-0.1", "a number > 0"),  # the YAML's lr is chosen by head (!apply)
    ("emotion.yaml", "test_session", "7", "a whole number >= 1 and <= 5"),
    ("emotion.yaml", "use_tensorboard", "yes", "True or False"),
    ("librispeech_ctc.yaml", "batch_size", "0", "a whole number >= 1"),
    ("librispeech_ctc.yaml", "token_type", "word", "one of char, unigram, bpe"),
])
def test_bad_values_are_refused_by_name_before_anything_is_built(tmp_path, yaml, key, value, wants):
    out = str(tmp_path / "run")
    with pytest.raises(BadSetting) as e:
        _start(yaml, output_folder=out, **{key: value})
    msg = str(e.value)
    assert f"--{key}={value}: {key} must be {wants}" in msg and yaml in msg, msg
    if key != "lr" or yaml != "voxceleb.yaml":  # the fix: an example, the YAML's own default
        assert f", e.g. --{key}=" in msg
    assert not os.path.exists(out)  # nothing was run: no folder, no lock, no record


def test_a_misspelt_key_gets_did_you_mean_in_every_recipe(tmp_path):
    for yaml in ("mgf.yaml", "timit.yaml", "voxceleb.yaml", "emotion.yaml", "librispeech_ctc.yaml"):
        with pytest.raises(UnknownSetting) as e:
            _start(yaml, output_folder=str(tmp_path / "run"), numbr_of_epochs=3)
        msg = str(e.value)
        assert "--numbr_of_epochs=3: did you mean --number_of_epochs?" in msg, msg
        assert len(msg) < 400  # one line per unknown key, not every key of the YAML
    with pytest.raises(UnknownSetting, match="no setting of that name"):
        _start("timit.yaml", xyzzy=1)


def test_evaluate_checks_its_settings_by_name(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import evaluate

    yaml = os.path.join(HP, "evaluate.yaml")
    with pytest.raises(BadSetting, match=r"--seeds=\[1986, x\]: seeds must be a non-empty list of whole numbers"):
        evaluate.load_hparams([yaml, "--seeds=[1986, x]"])
    with pytest.raises(BadSetting, match="--report_only=maybe: report_only must be True or False"):
        evaluate.load_hparams([yaml, "--report_only=maybe"])
    with pytest.raises(UnknownSetting, match="did you mean --run_ablations"):
        evaluate.load_hparams([yaml, "--run_ablation=True"])
    assert evaluate.load_hparams([yaml, "--seeds=[1, 2]"])["seeds"] == [1, 2]


def test_every_yaml_default_and_sample_block_passes_its_own_checks():
    """The table never refuses a recipe's own defaults (nor its bundled-sample settings)."""
    for yaml in ("mgf.yaml", "timit.yaml", "voxceleb.yaml", "emotion.yaml", "librispeech_ctc.yaml",
                 "evaluate.yaml"):
        values = check_settings(os.path.join(HP, yaml), "")
        assert values["seed" if yaml != "evaluate.yaml" else "num_threads"] is not None
        sample = values.get("sample_overrides") or {}
        if yaml != "evaluate.yaml" and sample:
            check_settings(os.path.join(HP, yaml), json.dumps(sample))


# ------------------------------------------------------------------ a restart leaves nothing stale
def test_restart_moves_every_output_of_the_earlier_run_and_keeps_user_files(tmp_path, capsys):
    out = str(tmp_path / "vox")
    os.makedirs(out)
    with open(os.path.join(out, "my_notes.txt"), "w") as f:  # the user's, there before the first run
        f.write("keep me\n")
    hp = _start("voxceleb.yaml", output_folder=out, number_of_epochs=1)
    _finish(hp, files=("results.json", "results.md", "veri_scores.txt", "per_phone_dev.txt"))
    os.makedirs(os.path.join(out, "data"))  # the manifests: preparation redoes them when their options change
    with open(os.path.join(out, "data", "train.csv"), "w") as f:
        f.write("ID,duration,wav,spk_id\n")

    hp = _start("voxceleb.yaml", output_folder=out, number_of_epochs=1, lr=0.05, on_change="restart")
    assert "--on_change=restart: settings changed (lr)" in capsys.readouterr().out
    (aside,) = glob.glob(os.path.join(out, "replaced-*"))
    for name in ("results.json", "results.md", "veri_scores.txt", "per_phone_dev.txt", "train_log.txt",
                 "hyperparams.yaml", RUN_CONFIG):
        assert not os.path.exists(os.path.join(out, name)) or name in ("hyperparams.yaml", RUN_CONFIG), name
        assert os.path.isfile(os.path.join(aside, name)), name
    assert glob.glob(os.path.join(aside, "save", "CKPT+*")) and os.listdir(hp["save_folder"]) == []
    assert open(os.path.join(out, "my_notes.txt")).read() == "keep me\n"
    assert os.path.isfile(os.path.join(out, "data", "train.csv"))
    assert _record(out)["lr"] == 0.05


def test_a_restart_with_a_save_folder_outside_the_output_folder_leaves_no_old_checkpoint(tmp_path):
    save = str(tmp_path / "scratch" / "ckpt")
    first = str(tmp_path / "run1")
    hp = _start("mgf.yaml", output_folder=first, save_folder=save, **TINY)
    _finish(hp, files=())
    _start("mgf.yaml", output_folder=first, save_folder=save, lr=0.05, on_change="restart", **TINY)
    assert not glob.glob(os.path.join(save, "CKPT+*"))  # nothing left to resume
    (aside,) = glob.glob(os.path.join(save, "replaced-*"))
    assert glob.glob(os.path.join(aside, "CKPT+*"))
    assert json.load(open(os.path.join(save, RUN_CONFIG)))["settings"]["lr"] == 0.05


def test_a_save_folder_outside_the_output_folder_belongs_to_one_run(tmp_path):
    save = str(tmp_path / "scratch" / "ckpt")
    first = str(tmp_path / "run1")
    hp = _start("mgf.yaml", output_folder=first, save_folder=save, lr=0.05, **TINY)
    _finish(hp, files=())
    # another output folder with the same save folder: refused, naming the run it belongs to
    second = str(tmp_path / "run2")
    with pytest.raises(RunConfigChanged) as e:
        _start("mgf.yaml", output_folder=second, save_folder=save, lr=0.05, **TINY)
    msg = str(e.value)
    assert f"save_folder {save} holds the checkpoints of another run: the one in {first}" in msg
    assert "--save_folder=<new folder>" in msg and f"--output_folder={first}" in msg
    assert not os.path.exists(os.path.join(second, RUN_CONFIG))
    # ... or handled explicitly: --on_change=restart moves them aside and binds the folder to the new run
    _start("mgf.yaml", output_folder=second, save_folder=save, lr=0.05, on_change="restart", **TINY)
    assert not glob.glob(os.path.join(save, "CKPT+*")) and len(glob.glob(os.path.join(save, "replaced-*"))) == 1
    assert json.load(open(os.path.join(save, RUN_CONFIG)))["output_folder"] == second


def test_a_relative_save_folder_is_recorded_as_one_location(tmp_path, monkeypatch):
    """A location that does not exist yet at the first run is recorded absolute, as on the rerun."""
    monkeypatch.chdir(tmp_path)
    hp = {"output_folder": str(tmp_path / "run"), "save_folder": "ckpts/save", "lr": 0.1, "resumable_keys": []}
    check_run_config(hp)
    os.makedirs("ckpts/save", exist_ok=True)
    assert check_run_config(hp)["changed"] == {}
