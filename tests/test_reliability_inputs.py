"""Reliability against hostile input (issue 16): symlink loops and files reached twice (every
recipe's prep), TIMIT PHN overlaps and gaps, escaped skip lists, the shortest usable audio,
unsafe / non-UTF-8 / NaN model folders, chunk_seconds, and re-export next to user files."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO
from test_iemocap import build_iemocap
from test_librispeech import shortest, write_chapter
from test_timit import build_timit
from test_voxceleb import build_corpus as build_voxceleb

sys.path.insert(0, os.path.join(REPO, "recipes", "TIMIT"))
sys.path.insert(0, os.path.join(REPO, "recipes", "VoxCeleb"))
sys.path.insert(0, os.path.join(REPO, "recipes", "IEMOCAP"))
sys.path.insert(0, os.path.join(REPO, "recipes", "LibriSpeech"))
import librispeech_prepare as lp  # noqa: E402
import timit_prepare as tp  # noqa: E402
from iemocap_prepare import prepare_iemocap  # noqa: E402
from voxceleb_prepare import prepare_voxceleb  # noqa: E402

from mgf_sb.data.manifest import read_manifest, read_skip_list  # noqa: E402


def _ids(folder, splits):
    return {s: [r["ID"] for r in read_manifest(os.path.join(folder, f"{s}.csv"))] for s in splits}


def _real(path):
    return os.path.realpath(path)


def _speech(seconds, seed):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype("float32")


# ---------------------------------------------------------------- symlink loops, files reached twice


def test_pretraining_symlink_loop_two_files_two_rows(tmp_path):
    """The issue's case: a/up -> .. made 2 files into 82 rows, both in train and valid."""
    from mgf_sb.data.prepare_audio import prepare_pretraining

    root = tmp_path / "audio"
    for name, seed in (("a/x.wav", 0), ("b/y.wav", 1)):
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        sf.write(str(root / name), _speech(1.5, seed), 16000)
    os.symlink("..", root / "a" / "up")  # a loop
    os.symlink(os.path.join("..", "a", "x.wav"), root / "b" / "x_again.wav")  # one file under two names
    out = str(tmp_path / "prep")
    prepare_pretraining(str(root), out, train_splits=[], valid_splits=[], valid_fraction=0.5)
    train, valid = (read_manifest(os.path.join(out, f"{s}.csv")) for s in ("train", "valid"))
    assert len(train) == 1 and len(valid) == 1  # each real file once
    assert {_real(r["wav"]) for r in train}.isdisjoint({_real(r["wav"]) for r in valid})
    skipped = dict(read_skip_list(os.path.join(out, "train_skipped.tsv")))
    assert skipped[str(root / "a" / "up")].startswith("symlink loop or repeated folder")
    assert skipped[str(root / "b" / "x_again.wav")].startswith("duplicate (the same file as")


def test_pretraining_file_in_train_and_valid_splits_stays_in_train(tmp_path):
    from mgf_sb.data.prepare_audio import prepare_pretraining

    root = tmp_path / "ls"
    for split, name, seed in (("train", "t1.wav", 0), ("train", "t2.wav", 1), ("dev", "d1.wav", 2)):
        os.makedirs(root / split, exist_ok=True)
        sf.write(str(root / split / name), _speech(1.5, seed), 16000)
    os.symlink(str(root / "train" / "t1.wav"), root / "dev" / "leak.wav")
    out = str(tmp_path / "prep")
    prepare_pretraining(str(root), out, train_splits=["train"], valid_splits=["dev"])
    assert sorted(r["ID"] for r in read_manifest(os.path.join(out, "valid.csv"))) == ["dev/d1"]
    assert len(read_manifest(os.path.join(out, "train.csv"))) == 2
    reason = dict(read_skip_list(os.path.join(out, "valid_skipped.tsv")))[str(root / "dev" / "leak.wav")]
    assert "the same file as" in reason and "in the train split" in reason


def test_librispeech_symlinked_split_and_loop(tmp_path):
    utts = shortest(8)
    spk = utts[0][0].split("-")[0]
    train = [u for u in utts if u[0].startswith(spk + "-")] + [u for u in utts if not u[0].startswith(spk + "-")][:1]
    others = [u for u in utts if u not in train]
    assert len(others) >= 2, "the bundled sample needs two speakers"
    root = str(tmp_path / "LibriSpeech")
    write_chapter(root, "train-clean-100", train)
    write_chapter(root, "dev-clean", others[:1])
    write_chapter(root, "test-clean", others[1:2])
    os.symlink("..", os.path.join(root, "train-clean-100", spk, "up"))  # a loop
    # test-clean/<spk> is a link to a training speaker: its files are reachable from both splits
    os.symlink(os.path.join(root, "train-clean-100", spk), os.path.join(root, "test-clean", spk))
    out = str(tmp_path / "prep")
    lp.prepare_librispeech(root, out, ["train-clean-100"], ["dev-clean"], ["test-clean"])
    ids = _ids(out, ("train", "valid", "test-clean"))
    assert sorted(ids["train"]) == sorted(u for u, _ in train)  # once each, not once per loop turn
    assert ids["test-clean"] == [others[1][0]]  # the linked training files stay in train only
    skipped = dict(read_skip_list(os.path.join(out, "train_skipped.tsv")))
    assert skipped[os.path.join(root, "train-clean-100", spk, "up")].startswith("symlink loop")
    test_skipped = read_skip_list(os.path.join(out, "test-clean_skipped.tsv"))
    assert any("in the train split" in r for _, r in test_skipped)
    assert all("in the train split" in r or r.startswith("symlink loop") for _, r in test_skipped), test_skipped


def test_voxceleb_one_file_listed_twice_under_two_names(tmp_path):
    root = build_voxceleb(str(tmp_path / "VoxCeleb1"), split_layout=False)
    src = os.path.join(root, "wav", "id10001", "vidA1", "00001.wav")  # a training file
    link = os.path.join(root, "wav", "id10001", "vidA2", "00050.wav")
    os.symlink(src, link)
    with open(os.path.join(root, "iden_split.txt"), "a") as f:
        f.write("3 id10001/vidA2/00050.wav\n")  # ... listed for testing under another name
    out = str(tmp_path / "prep")
    prepare_voxceleb(root, out)
    ids = _ids(out, ("train", "dev", "test"))
    assert "id10001/vidA1/00001" in ids["train"] and "id10001/vidA2/00050" not in ids["test"]
    skipped = dict(read_skip_list(os.path.join(out, "voxceleb_skipped.tsv")))
    assert skipped[link].startswith("duplicate (the same file as id10001/vidA1/00001.wav")


def test_iemocap_one_file_in_two_sessions(tmp_path):
    root = build_iemocap(str(tmp_path / "IEMOCAP_full_release"))
    s1 = os.path.join(root, "Session1", "sentences", "wav", "Ses01F_impro01", "Ses01F_impro01_F000.wav")
    s5 = os.path.join(root, "Session5", "sentences", "wav", "Ses05F_impro05", "Ses05F_impro05_F000.wav")
    os.remove(s5)
    os.symlink(s1, s5)  # a training utterance's audio, labelled again in the test session
    out = str(tmp_path / "prep")
    prepare_iemocap(root, out, out + "/fold", test_session=5)
    ids = _ids(out + "/fold", ("train", "valid", "test"))
    assert "Ses01F_impro01_F000" in ids["valid"] and "Ses05F_impro05_F000" not in ids["test"]  # (valid: Session1)
    skipped = dict(read_skip_list(os.path.join(out, "iemocap_skipped.tsv")))
    assert skipped[s5].startswith("duplicate (the same file as")


def test_timit_one_file_in_two_splits_is_an_error(tmp_path):
    root = build_timit(tmp_path / "TIMIT")
    train_wav = os.path.join(root, "TRAIN", "DR1", "FCJF0", "SX31.WAV")
    dev_wav = os.path.join(root, "TEST", "DR1", "FAKS0", "SX31.WAV")  # FAKS0: a dev speaker
    os.remove(dev_wav)
    os.symlink(train_wav, dev_wav)
    with pytest.raises(tp.TIMITError, match="the same file as") as err:
        tp.prepare_timit(root, str(tmp_path / "prep"))
    assert dev_wav in str(err.value) or train_wav in str(err.value)


def test_check_disjoint_names_the_file(tmp_path):
    from mgf_sb.data.manifest import check_disjoint

    a = tmp_path / "a.wav"
    a.write_bytes(b"x")
    os.symlink(a, tmp_path / "b.wav")
    with pytest.raises(ValueError, match="in both the train split .* and the test split"):
        check_disjoint({"train": [{"wav": str(a)}], "test": [{"wav": str(tmp_path / "b.wav")}]})
    check_disjoint({"train": [{"wav": str(a)}], "test": []})


# ---------------------------------------------------------------- TIMIT PHN overlaps and gaps


@pytest.mark.parametrize("what", ["overlap", "gap"])
def test_timit_overlapping_or_gapped_phn_segments_name_file_and_line(tmp_path, what):
    root = build_timit(tmp_path / "TIMIT")
    phn = os.path.join(root, "TRAIN", "DR2", "MAEB0", "SX31.PHN")
    lines = open(phn).read().splitlines()
    if what == "overlap":  # the case: "0 <end> aa" prepended
        lines.insert(0, f"0 {lines[-1].split()[1]} aa")
        line, message = 2, "overlaps the previous segment (line 1 ends at"
    else:  # line 3 starts 100 samples after line 2 ends
        a, b, p = lines[2].split()
        lines[2] = f"{int(a) + 100} {b} {p}"
        line, message = 3, "leaves a gap after the previous segment (line 2 ends at"
    with open(phn, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(tp.TIMITError) as err:
        tp.prepare_timit(root, str(tmp_path / "prep"))
    assert f"{phn}:{line}: " in str(err.value) and message in str(err.value), str(err.value)


# ---------------------------------------------------------------- skip lists, shortest audio


def test_skip_list_escapes_tab_and_newline_in_paths(tmp_path):
    from mgf_sb.data.prepare_audio import prepare_pretraining

    root = tmp_path / "audio"
    root.mkdir()
    for name, seed in (("good1.wav", 0), ("good2.wav", 1)):
        sf.write(str(root / name), _speech(1.5, seed), 16000)
    bad = str(root / "bad\tname\nwith newline.wav")
    open(bad, "wb").close()  # empty: skipped
    out = str(tmp_path / "prep")
    prepare_pretraining(str(root), out, train_splits=[], valid_splits=[], valid_fraction=0.5)
    path = os.path.join(out, "train_skipped.tsv")
    raw = open(path, encoding="utf-8").read().split("\n")
    assert len([line for line in raw if line]) == 2 and all(line.count("\t") == 1 for line in raw if line)
    assert "bad\\tname\\nwith newline.wav" in raw[1]
    assert read_skip_list(path) == [(bad, read_skip_list(path)[0][1])]  # read back exactly


def test_iemocap_one_sample_file_is_skipped_as_inference_would_refuse_it(tmp_path):
    from mgf_sb.data.audio import MIN_AUDIO_SECONDS
    from mgf_sb.inference import read_audio_file

    root = build_iemocap(str(tmp_path / "IEMOCAP_full_release"))
    tiny = os.path.join(root, "Session5", "sentences", "wav", "Ses05F_impro05", "Ses05F_impro05_F000.wav")
    sf.write(tiny, np.array([0.3], dtype="float32"), 16000)
    out = str(tmp_path / "prep")
    prepare_iemocap(root, out, out + "/fold", test_session=5, min_duration=0.0)  # the YAML's default
    assert "Ses05F_impro05_F000" not in _ids(out + "/fold", ("test",))["test"]
    reason = dict(read_skip_list(os.path.join(out, "iemocap_skipped.tsv")))[tiny]
    assert reason.startswith("too short") and f"{MIN_AUDIO_SECONDS} s, the shortest input" in reason
    with pytest.raises(ValueError, match="too short"):
        read_audio_file(tiny)
    # one sample more than the minimum is kept by both
    ok = os.path.join(root, "Session5", "sentences", "wav", "Ses05F_impro05", "Ses05F_impro05_M000.wav")
    sf.write(ok, _speech(MIN_AUDIO_SECONDS + 1 / 16000, 3), 16000)
    out2 = str(tmp_path / "prep2")
    prepare_iemocap(root, out2, out2 + "/fold", test_session=5, min_duration=0.0)
    assert "Ses05F_impro05_M000" in _ids(out2 + "/fold", ("test",))["test"]
    assert read_audio_file(ok).numel() == int(MIN_AUDIO_SECONDS * 16000) + 1


# ---------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def model(tiny_pretrained, tmp_path_factory):
    from mgf_sb.export import export

    return export(tiny_pretrained, str(tmp_path_factory.mktemp("models") / "mgf"))


def _copy(model, tmp_path, name="m"):
    dest = str(tmp_path / name)
    shutil.copytree(model, dest)
    return dest


UNSAFE = {
    "apply": ("pwn: !apply:os.system [\"touch {flag}\"]", "!apply:os.system"),
    "name_os": ("pwn: !name:os.system", "!name:os.system"),
    "module": ("pwn: !module:os", "!module:os"),
    "python_tag": ("pwn: !!python/object/apply:os.system [\"touch {flag}\"]", "python/object/apply:os.system"),
    "sb_function": ("pwn: !name:speechbrain.utils.superpowers.run_shell", "run_shell"),
    "sb_alias": ("pwn: !new:speechbrain.utils.superpowers.subprocess.Popen [[touch, {flag}]]", "Popen"),
    "include": ("pwn: !include:/etc/passwd", "!include:/etc/passwd"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_model_folder_that_could_run_code_is_refused_with_the_line(model, tmp_path, case):
    from mgf_sb.inference import MGFEncoder, UnsafeModelFolder

    flag = tmp_path / "pwned"
    m = _copy(model, tmp_path)
    hp = os.path.join(m, "hyperparams.yaml")
    text = open(hp, encoding="utf-8").read()
    line, what = UNSAFE[case]
    n = text.count("\n") + 1
    with open(hp, "a", encoding="utf-8") as f:
        f.write(line.format(flag=flag) + "\n")
    with pytest.raises(UnsafeModelFolder) as err:
        MGFEncoder.from_hparams(source=m)
    assert f"{hp}:{n}:" in str(err.value) and what in str(err.value), str(err.value)
    assert not flag.exists()


def test_trust_code_loads_a_folder_as_speechbrain_would(model, tmp_path):
    from mgf_sb.inference import MGFEncoder

    flag = tmp_path / "ran"
    m = _copy(model, tmp_path)
    with open(os.path.join(m, "hyperparams.yaml"), "a", encoding="utf-8") as f:
        f.write(f"hook: !apply:os.system [\"touch {flag}\"]\n")
    enc = MGFEncoder.from_hparams(source=m, trust_code=True)  # the caller vouches for the folder
    assert flag.exists() and enc.num_layers == 3


def test_exported_folder_passes_the_check(model):
    from mgf_sb.inference import check_hparams_safe

    path = os.path.join(model, "hyperparams.yaml")
    check_hparams_safe(open(path, encoding="utf-8").read(), path)


def test_non_utf8_hyperparams_names_the_file(model, tmp_path):
    from mgf_sb.inference import MGFEncoder

    m = _copy(model, tmp_path)
    hp = os.path.join(m, "hyperparams.yaml")
    with open(hp, "ab") as f:
        f.write(b"note: caf\xe9\n")
    n = open(hp, "rb").read().count(b"\n")
    with pytest.raises(ValueError, match=f"{hp}:{n}: not valid UTF-8 \\(byte 0xe9\\)"):
        MGFEncoder.from_hparams(source=m)


def test_non_utf8_recipe_yaml_names_the_file(tmp_path):
    from mgf_sb.recipe import start_experiment

    yaml = tmp_path / "bad.yaml"
    yaml.write_bytes(b"seed: 1\n# r\xe9sum\xe9\noutput_folder: x\n")
    with pytest.raises(ValueError, match=f"{yaml}:2: not valid UTF-8"):
        start_experiment([str(yaml)])


@pytest.mark.parametrize("where", ["model_folder", "pretrained_folder", "export"])
def test_nan_weights_are_refused_naming_the_tensor(model, tiny_pretrained, tmp_path, where):
    from mgf_sb.pretrained_folder import load_pretrained
    from mgf_sb.export import export
    from mgf_sb.inference import MGFEncoder

    folder = _copy(model if where == "model_folder" else tiny_pretrained, tmp_path)
    path = os.path.join(folder, "encoder.ckpt")
    state = torch.load(path, weights_only=True)
    name = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[name].view(-1)[0] = float("nan")
    torch.save(state, path)
    load = {"model_folder": lambda: MGFEncoder.from_hparams(source=folder),
            "pretrained_folder": lambda: load_pretrained(folder),
            "export": lambda: export(folder, str(tmp_path / "out"))}[where]
    with pytest.raises(ValueError, match=f"encoder.ckpt: tensor '{name}' has 1 NaN or Inf value"):
        load()


@pytest.mark.parametrize("chunk", [float("nan"), float("inf"), 0.05, -1.0])
def test_chunk_seconds_must_be_finite_and_cover_the_receptive_field(model, tmp_path, chunk):
    from mgf_sb.inference import MGFEncoder

    with pytest.raises(ValueError, match="hyperparams.yaml: chunk_seconds"):
        MGFEncoder.from_hparams(source=model, overrides={"chunk_seconds": chunk})
    enc = MGFEncoder.from_hparams(source=model)
    assert enc.min_chunk_seconds == pytest.approx(9 * 0.01)  # conv_pos_kernel 9 frames at 100 Hz
    wav = str(tmp_path / "a.wav")
    sf.write(wav, _speech(1.0, 0), 16000)
    with pytest.raises(ValueError, match="chunk_seconds"):
        enc.encode_file(wav, chunk_seconds=chunk, overlap_seconds=0.0)
    assert enc.encode_file(wav, chunk_seconds=0.1, overlap_seconds=0.0).shape[1] == 101  # the minimum works


def test_export_cli_refuses_non_finite_chunk(tiny_pretrained, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mgf_sb.export", tiny_pretrained, str(tmp_path / "m"),
                           "--chunk_seconds", "nan"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "must be finite" in proc.stderr
    assert not os.path.exists(tmp_path / "m")


# ---------------------------------------------------------------- re-export


def test_reexport_keeps_user_files_and_replaces_its_own(tiny_pretrained, tmp_path):
    from mgf_sb.export import EXPORT_FILES, export
    from mgf_sb.inference import MGFEncoder

    dest = tmp_path / "models" / "mgf"
    export(tiny_pretrained, str(dest))
    (dest / "my_notes.txt").write_text("keep me")
    (dest / "eval_outputs").mkdir()
    (dest / "eval_outputs" / "scores.txt").write_text("0.5")
    (dest / "mgf_config.json").write_text("stale")  # export's own file: replaced
    export(tiny_pretrained, str(dest), chunk_seconds=12.0)
    assert (dest / "my_notes.txt").read_text() == "keep me"
    assert (dest / "eval_outputs" / "scores.txt").read_text() == "0.5"
    assert json.load(open(dest / "mgf_config.json"))["format"] == "mgf-sb-pretrained"
    assert sorted(os.listdir(dest)) == sorted(["eval_outputs", "my_notes.txt"] +
                                              [f for f in EXPORT_FILES if (dest / f).exists()])  # no temp folder
    assert MGFEncoder.from_hparams(source=str(dest)).hparams.chunk_seconds == 12.0
