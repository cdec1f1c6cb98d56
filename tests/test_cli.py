"""A recipe's command line for a newcomer (issue 29): ``--help`` lists the recipe's own settings
(not SpeechBrain's 123 generic lines), and a settings error is the message alone, no traceback."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

RECIPES = [("recipes/TIMIT/train.py", "hparams/timit.yaml", ("--upstream=", "--head=", "--layer=")),
           ("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml", ("--upstream=", "--head=", "--verification=")),
           ("recipes/IEMOCAP/train.py", "hparams/emotion.yaml", ("--upstream=", "--head=", "--test_session=")),
           ("recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml", ("--upstream=", "--head=", "--beam_size=")),
           ("recipes/pretrain/train.py", "hparams/mgf.yaml", ("--use_phoneme=", "--d_model=", "--frame_stack="))]


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("script,yaml,keys", RECIPES, ids=[r[0].split("/")[1] for r in RECIPES])
def test_help_lists_the_recipes_own_settings(script, yaml, keys):
    proc = _run(script, yaml, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: python {script} {yaml}" in proc.stdout
    for key in keys + ("--number_of_epochs=", "--data_folder="):
        assert f"\n  {key}" in proc.stdout, key
    assert "--__" not in proc.stdout
    assert "--distributed_launch" not in proc.stdout  # not SpeechBrain's generic parser


def test_help_without_a_yaml_uses_the_recipes_own():
    proc = _run("recipes/TIMIT/train.py", "--help")
    assert proc.returncode == 0 and "hparams/timit.yaml" in proc.stdout and "\n  --head=" in proc.stdout


def test_settings_errors_are_the_message_alone(tmp_path):
    out = str(tmp_path / "o")
    proc = _run("recipes/TIMIT/train.py", "hparams/timit.yaml", "--numbr_of_epochs=3", f"--output_folder={out}")
    assert proc.returncode == 1
    assert "did you mean --number_of_epochs?" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("recipes/TIMIT/train.py", "hparams/timit.yaml", "--upstream=results/nope/pretrained",
                f"--output_folder={out}")
    assert proc.returncode == 1
    assert "pretrained MGF folder 'results/nope/pretrained' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    traced = subprocess.run([sys.executable, "recipes/TIMIT/train.py", "hparams/timit.yaml", "--numbr_of_epochs=3",
                             f"--output_folder={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MGF_TRACEBACK="1"))
    assert "Traceback" in traced.stderr


def test_no_import_circle_between_recipe_and_settings():
    code = ("import sys; import mgf_sb.settings as s; assert 'mgf_sb.recipe' not in sys.modules, 'circle'; "
            "import mgf_sb.recipe as r; assert r.read_utf8 is s.read_utf8")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
