"""TIMIT recipe: preparation on a real-layout fixture, training runs per upstream."""

import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, SAMPLES, TINY_ENCODER, run_recipe

sys.path.insert(0, os.path.join(REPO, "recipes", "TIMIT"))
import timit_prepare as tp  # noqa: E402
from mgf_sb.batch import n_encoder_frames  # noqa: E402
from mgf_sb.data.manifest import read_manifest  # noqa: E402
from mgf_sb.features import FeatureExtractor  # noqa: E402

SCRIPT = "recipes/TIMIT/train.py"
HPARAMS = "hparams/timit.yaml"
N = 8000  # samples per fixture utterance (0.5 s)
# 61-phone segments of every fixture utterance: h#, q (deleted), ao (-> aa), tcl (-> sil), t, h#
PHN = [(0, 1000, "h#"), (1000, 1500, "q"), (1500, 4000, "ao"), (4000, 5000, "tcl"), (5000, 7000, "t"),
       (7000, N, "h#")]
# (set, region, speaker): 2 train speakers, a core-test, a dev and an unused test speaker
SPEAKERS = [("TRAIN", "DR1", "FCJF0"), ("TRAIN", "DR2", "MAEB0"), ("TEST", "DR1", "MDAB0"),
            ("TEST", "DR1", "FAKS0"), ("TEST", "DR2", "MZZZ0")]
SENTENCES = ["SA1", "SA2", "SX31", "SI1027"]


def write_sphere(path, pcm):
    """NIST_1A header padded to 1024 bytes + int16 little-endian PCM."""
    head = "\n".join([
        "NIST_1A", "   1024", "database_id -s5 TIMIT", "channel_count -i 1", f"sample_count -i {len(pcm)}",
        "sample_rate -i 16000", "sample_n_bytes -i 2", "sample_byte_format -s2 01", "sample_sig_bits -i 16",
        "sample_coding -s3 pcm", "end_head", "",
    ]).encode("ascii")
    with open(path, "wb") as f:
        f.write(head + b" " * (1024 - len(head)) + np.asarray(pcm, dtype="<i2").tobytes())


def build_timit(root, lower=False):
    """A TIMIT tree in the LDC layout (upper case, or lower case as some copies are)."""
    rng = np.random.default_rng(0)
    case = str.lower if lower else str
    for st, dr, spk in SPEAKERS:
        d = os.path.join(root, case(st), case(dr), case(spk))
        os.makedirs(d)
        for sent in SENTENCES:
            stem = os.path.join(d, case(sent))
            write_sphere(stem + case(".WAV"), rng.integers(-3000, 3000, N))
            with open(stem + case(".PHN"), "w") as f:
                f.writelines(f"{a} {b} {p}\n" for a, b, p in PHN)
            with open(stem + case(".WRD"), "w") as f:
                f.write(f"1500 {N - 1000} word\n")
            with open(stem + case(".TXT"), "w") as f:
                f.write(f"0 {N} Word.\n")
    return str(root)


@pytest.fixture
def timit_tree(tmp_path):
    return build_timit(tmp_path / "TIMIT")


def prepared(data_folder, save):
    tp.prepare_timit(data_folder, str(save))
    return {s: read_manifest(os.path.join(str(save), f"{s}.csv")) for s in tp.SPLITS}


def test_standard_lists_and_mapping():
    assert len(set(tp.CORE_TEST_SPEAKERS)) == 24 and len(set(tp.DEV_SPEAKERS)) == 50
    assert not set(tp.CORE_TEST_SPEAKERS) & set(tp.DEV_SPEAKERS)
    assert len(tp.PHONE_MAP_61_39) == 61 and len(tp.PHONES_39) == 39
    m = tp.PHONE_MAP_61_39
    assert {m[p] for p in ("bcl", "dcl", "gcl", "pcl", "tcl", "kcl", "h#", "pau", "epi")} == {"sil"}
    assert m["q"] is None
    assert (m["ao"], m["ax-h"], m["ix"], m["zh"], m["el"], m["en"], m["nx"], m["hv"], m["ux"], m["axr"]) == (
        "aa", "ah", "ih", "sh", "l", "n", "n", "hh", "uw", "er")


def test_prepare_splits(timit_tree, tmp_path):
    data = prepared(timit_tree, tmp_path / "prep")
    ids = {s: sorted(r["ID"] for r in rows) for s, rows in data.items()}
    assert ids["train"] == sorted(f"{spk}_{s}" for spk in ("FCJF0", "MAEB0") for s in ("SX31", "SI1027"))
    assert ids["dev"] == ["FAKS0_SI1027", "FAKS0_SX31"]  # dev speaker, SA excluded
    assert ids["test"] == ["MDAB0_SI1027", "MDAB0_SX31"]  # core-test speaker
    all_ids = sum(ids.values(), [])
    assert not any("_SA" in i for i in all_ids) and not any(i.startswith("MZZZ0") for i in all_ids)
    row = data["train"][0]
    assert int(row["n_samples"]) == N and abs(float(row["duration"]) - N / 16000) < 1e-3
    assert os.path.isfile(row["wav"])


def test_labels_folded_and_aligned(timit_tree, tmp_path):
    row = prepared(timit_tree, tmp_path / "prep")["train"][0]
    # q deleted, h# / closure -> sil, ao -> aa
    assert tp.decode_segments(row["segments"]) == [
        (0, 1000, "sil"), (1500, 4000, "aa"), (4000, 5000, "sil"), (5000, 7000, "t"), (7000, N, "sil")]
    labels = row["frame_labels"].split()
    assert len(labels) == N // 160 + 1 == 51  # 100 fps, centred frames
    assert set(labels) <= set(tp.PHONES_39) | {tp.IGNORE}
    # frame i is labelled by the segment holding sample 160*i
    for i, lab in enumerate(labels):
        s = min(160 * i, N - 1)
        expected = {0: "sil", 1: tp.IGNORE, 2: "aa", 3: "sil", 4: "t", 5: "sil"}[
            sum(s >= b for b in (1000, 1500, 4000, 5000, 7000))]
        assert lab == expected, (i, lab, expected)
    # the labels have exactly as many frames as the feature extractor
    wav = torch.from_numpy(sf.read(row["wav"], dtype="float32")[0])[None]
    for stack in (1, 2):
        feats, n = FeatureExtractor(n_mels=20, frame_stack=stack).train()(wav, torch.ones(1), epoch=0)
        assert len(tp.frame_labels(tp.decode_segments(row["segments"]), N, 160, stack)) == feats.shape[1] == n
        assert n == n_encoder_frames(N, 160, stack)


def test_frame_stack_uses_centre():
    # 50 Hz frame j stacks fbank frames 2j, 2j+1 (samples 320j, 320j+160): centre 320j+80
    segs = [(0, 60, "sil"), (60, 700, "aa"), (700, 1000, "s")]
    assert tp.frame_labels(segs, 1000, 160, 1) == ["sil", "aa", "aa", "aa", "aa", "s", "s"]
    assert tp.frame_labels(segs, 1000, 160, 2) == ["aa", "aa", "s", "s"]  # centres 80, 400, 720, 1040->999


@pytest.mark.parametrize("stack", [1, 2, 3])
def test_scoring_at_100fps_takes_the_nearest_upstream_frame(stack):
    """Each 10 ms frame is scored with the upstream frame that covers it (for stacked fbank,
    the frame whose stack contains it: what repeating each prediction ``stack`` times gives)."""
    from mgf_sb.features import FeatureExtractor

    fe = FeatureExtractor(n_mels=8, frame_stack=stack)
    for n in (400, 1599, 1600, 16000, 16161, 23999):
        centres = fe.frame_centres(n)
        n_100 = n // 160 + 1
        got = tp.nearest_frames(centres, np.arange(n_100) * 160)
        expected = np.minimum(np.arange(n_100) // stack, len(centres) - 1)
        assert got.tolist() == expected.tolist(), (stack, n)
        assert len(centres) == int(fe.n_frames(torch.zeros(1, n), torch.ones(1))[0])


def test_lower_case_tree(tmp_path):
    upper = prepared(build_timit(tmp_path / "U"), tmp_path / "pu")
    root = build_timit(tmp_path / "L" / "timit", lower=True)
    assert os.path.isfile(os.path.join(root, "train", "dr1", "fcjf0", "sx31.wav"))
    lower = prepared(str(tmp_path / "L"), tmp_path / "pl")  # the parent of timit/ works too
    for s in tp.SPLITS:
        strip = [{k: v for k, v in r.items() if k != "wav"} for r in upper[s]]
        assert strip == [{k: v for k, v in r.items() if k != "wav"} for r in lower[s]]


def _break(tree, what):
    d = os.path.join(tree, "TRAIN", "DR2", "MAEB0")
    if what == "offset":
        with open(os.path.join(d, "SX31.PHN"), "a") as f:
            f.write(f"{N} {N + 500} h#\n")
        return os.path.join(d, "SX31.PHN"), "beyond the end of the audio"
    if what == "phone":
        with open(os.path.join(d, "SX31.PHN"), "w") as f:
            f.write(f"0 4000 h#\n4000 {N} xx\n")
        return os.path.join(d, "SX31.PHN"), "unknown phone symbol 'xx'"
    if what == "no_phn":
        os.remove(os.path.join(d, "SI1027.PHN"))
        return os.path.join(d, "SI1027.WAV"), "no phone transcription"
    if what == "sphere":
        with open(os.path.join(d, "SX31.WAV"), "wb") as f:
            f.write(b"NIST_1A\n   1024\ngarbage" + b"\x00" * 100)
        return os.path.join(d, "SX31.WAV"), "unreadable audio"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["offset", "phone", "no_phn", "sphere"])
def test_bad_input_names_the_file(timit_tree, tmp_path, what):
    path, message = _break(timit_tree, what)
    with pytest.raises(tp.TIMITError) as err:
        tp.prepare_timit(timit_tree, str(tmp_path / "prep"))
    assert path in str(err.value) and message in str(err.value)


def test_not_a_timit_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(tp.TIMITError, match="no TRAIN/ and TEST/"):
        tp.prepare_timit(str(tmp_path / "x"), str(tmp_path / "prep"))


def majority_frequency(manifest):
    """Chance level: frequency of the most frequent labelled class in a split."""
    labels = [p for r in read_manifest(manifest) for p in r["frame_labels"].split() if p != tp.IGNORE]
    return max(labels.count(p) for p in set(labels)) / len(labels)


TINY = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_ENCODER.items()) + "}"  # as a YAML override


@pytest.mark.parametrize("upstream", ["fbank", "random", "tiny_pretrained"])
def test_training_beats_chance(upstream, tmp_path, request):
    assert os.path.isdir(os.path.join(SAMPLES, "TIMIT", "TRAIN")), "bundled TIMIT sample missing"
    out = str(tmp_path / "run")
    overrides = dict(output_folder=out, number_of_epochs=20, num_threads=1)
    if upstream == "random":  # 50 Hz encoder: labels at each encoder frame's centre
        overrides.update(upstream="random", encoder_config=TINY, frame_stack=2)
    elif upstream == "tiny_pretrained":
        overrides.update(upstream=request.getfixturevalue("tiny_pretrained"))
    proc = run_recipe(SCRIPT, HPARAMS, overrides)
    assert "USING THE BUNDLED SAMPLE" in proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    for split in ("dev", "test"):
        r = res[split]
        # dev/test are scored at 100 fps whatever the upstream's rate (50 Hz for random):
        # the scored frames are exactly the manifest's 100 fps labels
        chance = majority_frequency(os.path.join(out, "data", f"{split}.csv"))
        assert abs(r["majority_frequency"] - chance) < 1e-6
        n_labels = sum(p != tp.IGNORE for row in read_manifest(os.path.join(out, "data", f"{split}.csv"))
                       for p in row["frame_labels"].split())
        assert r["frames"] == n_labels
        assert r["acc"] > r["majority_frequency"] + 0.05, (split, r)
        with open(os.path.join(out, f"per_phone_{split}.txt")) as f:
            assert len(f.read().splitlines()) == 1 + 39
    assert os.path.isfile(os.path.join(out, "results.md"))
    if upstream == "fbank":  # rerunning resumes: no new epoch is trained
        with open(os.path.join(out, "train_log.txt")) as f:
            n_lines = len(f.read().splitlines())
        run_recipe(SCRIPT, HPARAMS, overrides)
        with open(os.path.join(out, "train_log.txt")) as f:
            assert sum("epoch: " in line for line in f.read().splitlines()[n_lines:]) == 0


def test_a_finished_early_stopped_probe_rerun_trains_nothing(tmp_path):
    """Issue 29: the checkpointer keeps only the best dev checkpoint, whose epoch counter predates
    early stopping, so the same command rerun trained the epochs after it again. With
    early_stop_patience=1 the run stops one epoch after its best: the kept checkpoint is never the
    last epoch's."""
    out = str(tmp_path / "run")
    overrides = dict(output_folder=out, number_of_epochs=30, early_stop_patience=1, num_threads=1)
    run_recipe(SCRIPT, HPARAMS, overrides)
    with open(os.path.join(out, "train_log.txt")) as f:
        log = f.read()
    n_epochs = sum("epoch: " in line for line in log.splitlines())
    assert n_epochs < 30  # early-stopped
    results_mtime = os.path.getmtime(os.path.join(out, "results.json"))
    proc = run_recipe(SCRIPT, HPARAMS, overrides)
    assert f"finished: {n_epochs} epoch" in proc.stdout and "early-stopped" in proc.stdout, proc.stdout[-2000:]
    assert os.path.join(out, "results.md") in proc.stdout or "results.md" in proc.stdout
    with open(os.path.join(out, "train_log.txt")) as f:
        assert f.read() == log  # no epoch trained, nothing evaluated
    assert os.path.getmtime(os.path.join(out, "results.json")) == results_mtime
    # an evaluation-only change of a resumable key is not needed here; more epochs after early
    # stopping train nothing either
    proc = run_recipe(SCRIPT, HPARAMS, dict(overrides, number_of_epochs=40))
    assert "finished:" in proc.stdout
    with open(os.path.join(out, "train_log.txt")) as f:
        assert f.read() == log
