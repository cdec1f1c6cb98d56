"""Real-data defaults vs the bundled sample's settings, schedules that follow the data,
one readable output folder per upstream, and the README's real-data commands."""

import glob
import math
import os
import re
import shlex
import shutil

import pytest

from conftest import REPO, SAMPLES, run_recipe

from mgf_sb.recipe import apply_sample_overrides, is_bundled_sample, load_hparams, use_sample_settings

HP = os.path.join(REPO, "hparams")
RECIPE_YAMLS = ["mgf.yaml", "timit.yaml", "voxceleb.yaml", "librispeech_ctc.yaml", "emotion.yaml"]
TASK = {"timit.yaml": "TIMIT", "voxceleb.yaml": "VoxCeleb", "librispeech_ctc.yaml": "LibriSpeech",
        "emotion.yaml": "IEMOCAP"}


# ---------------------------------------------------------------------------------- sample overrides
def _resolved(name, argv_overrides, capsys=None):
    import speechbrain as sb

    _, _, overrides = sb.parse_arguments([os.path.join(HP, name)] + argv_overrides)
    merged = apply_sample_overrides(os.path.join(HP, name), overrides)
    hp = load_hparams(os.path.join(HP, name), merged)
    return hp, (capsys.readouterr().out if capsys else "")


def test_sample_override_switch(capsys):
    real = os.path.join(os.sep, "data", "TIMIT")
    # auto + the bundled sample: the sample's settings, and the run says so
    hp, out = _resolved("timit.yaml", [], capsys)
    assert (hp["batch_size"], hp["lr"]) == (4, 0.005)
    assert "sample_overrides (data_folder samples/TIMIT is the bundled sample)" in out
    # auto + a real corpus: the YAML's real-data defaults
    hp, out = _resolved("timit.yaml", [f"--data_folder={real}"], capsys)
    assert (hp["batch_size"], hp["lr"]) == (16, 0.001)
    assert "sample_overrides not applied" in out and real in out
    # forced on / off
    hp, out = _resolved("timit.yaml", [f"--data_folder={real}", "--use_sample_overrides=True"], capsys)
    assert (hp["batch_size"], hp["lr"]) == (4, 0.005) and "use_sample_overrides=True" in out
    hp, out = _resolved("timit.yaml", ["--use_sample_overrides=False"], capsys)
    assert (hp["batch_size"], hp["lr"]) == (16, 0.001) and "use_sample_overrides=False" in out
    # the command line beats the sample block, key by key
    hp, out = _resolved("timit.yaml", ["--lr=0.02"], capsys)
    assert (hp["batch_size"], hp["lr"]) == (4, 0.02)
    assert "batch_size=4" in out and "lr=" not in out.split("bundled sample)")[1].split(".")[0]
    with pytest.raises(ValueError, match="use_sample_overrides must be"):
        _resolved("timit.yaml", ["--use_sample_overrides=maybe"])


@pytest.mark.parametrize("name", ["librispeech_ctc.yaml", "mgf.yaml", "voxceleb.yaml"])
def test_real_defaults_differ_from_the_sample_block(name):
    """Each block changes something, and only keys the YAML has (a typo would be an error)."""
    real, _ = _resolved(name, ["--data_folder=/data/corpus"])
    sample, _ = _resolved(name, [])
    block = sample["sample_overrides"]
    assert block and all(k in real for k in block)
    assert all(sample[k] == v for k, v in block.items())
    assert any(real[k] != v for k, v in block.items())


def test_bundled_sample_detection(tmp_path):
    assert is_bundled_sample(os.path.join(SAMPLES, "TIMIT")) and is_bundled_sample("samples/LibriSpeech")
    assert not is_bundled_sample("/data/LibriSpeech") and not is_bundled_sample(str(tmp_path / "my_samples"))
    assert use_sample_settings("auto", "samples/TIMIT") and not use_sample_settings("auto", "/data/TIMIT")
    assert use_sample_settings(True, "/data/TIMIT") and not use_sample_settings("False", "samples/TIMIT")


# ---------------------------------------------------------------------------------- output folders
BAD = re.compile(r"[\[\]'\"{}]")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    pytest.importorskip("transformers", reason="the test extra installs transformers (setup.cfg)")
    from test_upstream_hf import save_tiny_wav2vec2

    return save_tiny_wav2vec2(tmp_path_factory.mktemp("models") / "wav2vec2-tiny")


@pytest.mark.parametrize("name", sorted(TASK))
def test_every_yaml_output_folder_is_plain(name, tiny_pretrained, hf_model):
    cases = {"fbank": "fbank", "random": "random", tiny_pretrained: "mgf-" + os.path.basename(tiny_pretrained),
             "hf:" + hf_model: "hf-wav2vec2-tiny"}
    for upstream, tag in cases.items():
        hp = load_hparams(os.path.join(HP, name), {"upstream": upstream})
        expected = f"results/{TASK[name]}/{tag}/{hp['head']}/1986"
        if name == "emotion.yaml":
            assert hp["experiment_folder"] == expected
            expected += "/session5"
        assert hp["output_folder"] == expected
        for key, value in hp.items():  # every derived path too: plain, one results/
            if isinstance(value, str) and (key.endswith(("folder", "log")) or "/" in value):
                assert not BAD.search(value), (name, key, value)
                assert value.count("results/") <= 1, (name, key, value)
        assert hp["save_folder"] == os.path.join(hp["output_folder"], "save")


def test_upstream_tags_the_readme_names():
    from mgf_sb.upstream import upstream_tag

    assert upstream_tag("results/mgf_ls960/pretrained") == "mgf-mgf_ls960"
    assert upstream_tag("results/mgf/1986/pretrained") == "mgf-mgf-1986"
    assert upstream_tag("models/mgf") == "mgf-mgf" and upstream_tag("hf:/models/wav2vec2-base") == "hf-wav2vec2-base"
    with open(os.path.join(REPO, "docs", "downstream.md"), encoding="utf-8") as f:  # moved there from the README
        text = " ".join(f.read().split())
    assert "`results/mgf_ls960/pretrained` → `mgf-mgf_ls960`" in text
    assert "`results/mgf/1986/pretrained` → `mgf-mgf-1986`" in text


def test_pretraining_output_folder():
    hp = load_hparams(os.path.join(HP, "mgf.yaml"))
    assert hp["output_folder"] == "results/mgf/1986"
    assert hp["pretrained_folder"] == "results/mgf/1986/pretrained"


# ---------------------------------------------------------------------------------- schedules
def test_schedule_is_resolved_from_the_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_train", os.path.join(REPO, "recipes", "pretrain", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Sampler:
        def __len__(self):
            return 11

    # dynamic batching: the sampler's batches, sharded over the processes (last shard padded)
    assert mod.batches_per_epoch(range(100), {"batch_sampler": Sampler()}, 1) == 11
    assert mod.batches_per_epoch(range(100), {"batch_sampler": Sampler()}, 2) == 6
    assert mod.batches_per_epoch(range(100), {"batch_sampler": Sampler()}, 8) == 2
    # fixed batches: utterances sharded first, then batched
    assert mod.batches_per_epoch(range(10), {"batch_size": 2}, 3) == 2
    hp = {"number_of_epochs": 100, "lr_total_steps": None, "lr_warmup_steps": None, "ema_steps": None,
          "lr_warmup_fraction": 0.08, "ema_anneal_fraction": 0.1}
    one = mod.resolve_schedule(hp, 1400)
    eight = mod.resolve_schedule(hp, mod.batches_per_epoch(range(10**5), {"batch_sampler": [0] * 1400}, 8))
    assert one["total_steps"] == 140000 and one["warmup_steps"] == 11200 and one["ema_steps"] == 14000
    assert eight["total_steps"] == 17500 and eight["warmup_steps"] == 1400 and eight["ema_steps"] == 1750
    acc = mod.resolve_schedule(hp, 1400, grad_accumulation_factor=3)
    assert acc["total_steps"] == (1400 // 3) * 100
    given = mod.resolve_schedule(dict(hp, lr_total_steps=400000, ema_steps=1000), 1400)
    assert (given["total_steps"], given["warmup_steps"], given["ema_steps"]) == (400000, 32000, 1000)
    assert given["lr_total_steps_source"] == "given" and given["lr_warmup_steps_source"] == "computed"
    with pytest.raises(ValueError, match="does not fit"):
        mod.resolve_schedule(dict(hp, number_of_epochs=1, lr_warmup_steps=50), 10)
    assert math.isclose(one["warmup_steps"] / one["total_steps"], 0.08)


# ---------------------------------------------------------------------------------- README commands
def _readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def _commands(text):
    """Shell commands of the indented code blocks, continuation lines joined."""
    cmds, cur = [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        cur = (cur + " " + line.rstrip("\\").strip()) if cur else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            if cur:
                cmds.append(cur)
            cur = ""
    return cmds


def _header_groups(path):
    """Each ``--data_folder=/...`` line of a YAML header with its continuation lines."""
    lines = [l for l in open(path, encoding="utf-8").read().split("\n\n")[0].splitlines() if l.startswith("#")]
    groups = []
    for i, l in enumerate(lines):
        if re.search(r"--data_(folder|root)=/", l):
            g = [l]
            for nxt in lines[i + 1:]:
                if not re.match(r"#\s{3,}\S", nxt) or "--data_" in nxt:
                    break
                g.append(nxt)
            groups.append(" ".join(g))
    return groups


def test_every_real_data_command_has_its_own_output_folder():
    real = [c for c in _commands(_readme()) if re.search(r"--(data_folder|data_root|timit_folder)=/", c)
            and re.search(r"(train|evaluate)\.py", c)]
    assert len(real) >= 4, real
    for c in real:
        assert re.search(r"--(output|experiment)_folder=", c), c
    for name in RECIPE_YAMLS + ["evaluate.yaml"]:
        groups = _header_groups(os.path.join(HP, name))
        assert groups, name
        for g in groups:
            assert re.search(r"--(output|experiment)_folder=", g), (name, g)


TINY = {"d_model": 32, "num_layers": 2, "nhead": 4, "d_ffn": 64, "proj_dim": 32, "conv_pos_kernel": 9,
        "conv_pos_groups": 4, "crop_seconds": 3.0, "num_buckets": 2, "ckpt_interval_minutes": 0,
        "number_of_epochs": 1, "num_threads": 1}


def _ls960_layout(root):
    """The bundled sample's files spread over the three 960 h training splits + dev-clean."""
    src = os.path.join(SAMPLES, "LibriSpeech")
    speakers = sorted(os.listdir(os.path.join(src, "train-clean-100")))
    for i, spk in enumerate(speakers):
        split = ("train-clean-100", "train-clean-360", "train-other-500")[i % 3]
        shutil.copytree(os.path.join(src, "train-clean-100", spk), os.path.join(root, split, spk))
    shutil.copytree(os.path.join(src, "dev-clean"), os.path.join(root, "dev-clean"))
    return root


def _train_log(folder):
    with open(os.path.join(folder, "train_log.txt"), encoding="utf-8") as f:
        return f.read()


def test_readme_real_data_command_starts_a_fresh_run(tmp_path):
    """Quick start first, then the README's 960 h command (data: the sample in the 960 h layout, tiny
    sizes, one epoch): a new run in its own folder, real-data settings, computed schedule."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    os.symlink(SAMPLES, cwd / "samples")
    script = os.path.join(REPO, "recipes", "pretrain", "train.py")
    hparams = os.path.join(HP, "mgf.yaml")
    # 1. the Quick start (bundled sample: sample_overrides apply)
    quick = run_recipe(script, hparams, dict(TINY, use_sample_overrides="auto"), cwd=str(cwd))
    assert "sample_overrides (data_folder samples/LibriSpeech is the bundled sample)" in quick.stdout
    quick_log = _train_log(cwd / "results" / "mgf" / "1986")
    # 2. the README's command, as written, with the corpus and the sizes swapped for tiny ones
    cmd = next(c for c in _commands(_readme()) if "--data_folder=/data/LibriSpeech" in c and "pretrain" in c)
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "recipes/pretrain/train.py", "hparams/mgf.yaml"], argv
    args = dict(a[2:].split("=", 1) for a in argv[3:])
    assert "lr_total_steps" not in args  # the schedule follows the data
    corpus = _ls960_layout(str(tmp_path / "LibriSpeech"))
    args["data_folder"] = corpus
    args.update(TINY, prep_workers=1, num_workers=0, max_batch_length=40, use_sample_overrides="auto")
    real = run_recipe(script, hparams, args, cwd=str(cwd))
    out = real.stdout + real.stderr
    assert "sample_overrides not applied" in out
    folder = cwd / args["output_folder"]
    assert folder != cwd / "results" / "mgf" / "1986" and (folder / "pretrained" / "encoder.ckpt").is_file()
    log = _train_log(folder)
    assert re.findall(r"epoch: (\d+)", log) == ["1"]  # a fresh run: its own first epoch
    assert _train_log(cwd / "results" / "mgf" / "1986") == quick_log  # the smoke test untouched
    with open(folder / "data" / "train.csv", encoding="utf-8") as f:
        n_train = sum(1 for _ in f) - 1
    assert n_train == len(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "train-clean-100", "*", "*", "*.flac")))
    m = re.search(r"schedule: (\d+) batches per epoch per process \(1 process\) / grad_accumulation_factor 1 "
                  r"x 1 epochs -> lr_total_steps=(\d+) \(computed\), lr_warmup_steps=(\d+) \(computed\), "
                  r"ema_steps=(\d+) \(computed\)", out)
    assert m, out[-3000:]
    batches, total, warm, ema = map(int, m.groups())
    assert total == batches and warm == round(0.08 * total) and ema == max(1, round(0.1 * total))
    assert int(re.search(r"step: (\d+)", log).group(1)) == total  # the optimiser steps it made
