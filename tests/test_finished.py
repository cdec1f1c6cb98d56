"""mgf_sb.finished (issue 29): what a rerun of a finished run does, decided from finished.json."""

import os
from types import SimpleNamespace

from mgf_sb.finished import FINISHED_FILE, finished_rerun, mark_finished, training_done


def _hp(tmp_path, **kw):
    return {"output_folder": str(tmp_path), "number_of_epochs": 30,
            "resumable_keys": ["number_of_epochs", "num_workers", "beam_size"], "num_workers": 0, "beam_size": 10,
            **kw}


def test_same_command_is_finished_and_says_how_training_ended(tmp_path):
    said = []
    counter = SimpleNamespace(current=12, should_stop=True, best_limit=7)
    mark_finished(_hp(tmp_path), counter, [str(tmp_path / "results.md")])
    assert os.path.isfile(tmp_path / FINISHED_FILE)
    rec = finished_rerun(_hp(tmp_path, num_workers=4), say=said.append)  # a run-time key may change
    assert rec is not None and said[0].startswith("finished: 12 epochs, early-stopped (best dev at epoch 7); "
                                                  "results in ")
    assert training_done(_hp(tmp_path))


def test_an_evaluation_setting_evaluates_again_without_training(tmp_path):
    said = []
    mark_finished(_hp(tmp_path), (30, "limit", 28), [])
    assert finished_rerun(_hp(tmp_path, beam_size=4), say=said.append) is None
    assert said[0].startswith("evaluating again (beam_size changed)")
    assert training_done(_hp(tmp_path, beam_size=4))  # DownstreamBrain.on_fit_start then trains nothing


def test_more_epochs_train_on_unless_early_stopped(tmp_path):
    said = []
    mark_finished(_hp(tmp_path), (30, "limit", 28), [])
    assert finished_rerun(_hp(tmp_path, number_of_epochs=40), say=said.append) is None
    assert said[0].startswith("continuing: 30 epochs were trained") and not os.path.exists(tmp_path / FINISHED_FILE)
    mark_finished(_hp(tmp_path), (12, "early", 7), [])
    assert finished_rerun(_hp(tmp_path, number_of_epochs=40), say=said.append) is not None  # stopping was early


def test_no_record_is_no_finished_run(tmp_path):
    assert finished_rerun(_hp(tmp_path), say=lambda m: None) is None and not training_done(_hp(tmp_path))
