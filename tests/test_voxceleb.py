"""VoxCeleb1 recipe: prep on real-layout fixtures, EER/minDCF, short runs per upstream."""

import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, SAMPLES, TINY_ENCODER, run_recipe
from mgf_sb.metrics import compute_eer, compute_min_dcf, det_curve

sys.path.insert(0, os.path.join(REPO, "recipes", "VoxCeleb"))
from voxceleb_prepare import prepare_voxceleb  # noqa: E402

SCRIPT = os.path.join(REPO, "recipes", "VoxCeleb", "train.py")
VERIFY = os.path.join(REPO, "recipes", "VoxCeleb", "verify.py")
HPARAMS = os.path.join(REPO, "hparams", "voxceleb.yaml")
SAMPLE = os.path.join(SAMPLES, "VoxCeleb1")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def skipped(folder, name="voxceleb"):
    with open(os.path.join(folder, f"{name}_skipped.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


# ---------------------------------------------------------------- metrics


def brute_force_eer(pos, neg):
    """Reference: scan a dense threshold grid, EER where |FAR - FRR| is smallest."""
    grid = np.linspace(min(pos + neg) - 1, max(pos + neg) + 1, 200001)
    frr = (np.asarray(pos)[None] < grid[:, None]).mean(1)
    far = (np.asarray(neg)[None] >= grid[:, None]).mean(1)
    i = np.argmin(np.abs(far - frr))
    return (far[i] + frr[i]) / 2


def test_eer_hand_made():
    # Separable scores, and the reverse.
    assert compute_eer([0.9, 0.8, 0.7], [0.1, 0.2, 0.3])[0] == 0.0
    assert compute_eer([0.1, 0.2], [0.8, 0.9])[0] == 1.0
    # 10 targets, 10 non-targets, exactly 2 of each on the wrong side: EER = 20 %.
    pos = [0.1, 0.2] + [0.6 + 0.03 * i for i in range(8)]
    neg = [0.8, 0.9] + [0.05 * i for i in range(8)]
    eer, threshold = compute_eer(pos, neg)
    assert eer == pytest.approx(0.2)
    assert 0.35 <= threshold <= 0.8
    # Crossing inside a segment: 1 miss of 3 targets, 1 false alarm of 2 -> 1/3.
    assert compute_eer([2.0, 3.0, 4.0], [1.0, 2.5])[0] == pytest.approx(1 / 3)
    # Ties across classes count once, on the same side of every threshold.
    assert compute_eer([0.5, 0.5], [0.5, 0.5])[0] == pytest.approx(0.5)
    # Random score sets against a brute-force scan.
    gen = np.random.default_rng(0)
    for _ in range(3):
        pos = gen.normal(1.0, 1.0, 40).round(2).tolist()
        neg = gen.normal(0.0, 1.0, 60).round(2).tolist()
        assert compute_eer(pos, neg)[0] == pytest.approx(brute_force_eer(pos, neg), abs=0.02)


def test_min_dcf_known_cases():
    # Perfect separation costs nothing.
    assert compute_min_dcf([0.6, 0.7], [0.4, 0.3])[0] == 0.0
    # p_target 0.5, unit costs: normalised minDCF = min(p_miss + p_fa) = 0.5 here.
    assert compute_min_dcf([1.0, 3.0], [2.0, 0.0], p_target=0.5)[0] == pytest.approx(0.5)
    # p_target 0.01: rejecting everything costs 0.01 (normalised 1.0); a threshold
    # at 0.65 misses 1 target of 4 and accepts 0 of 100 non-targets:
    # 0.01 * 0.25 / 0.01 = 0.25; accepting one more non-target is worse.
    pos = [0.6, 0.7, 0.8, 0.9]
    neg = [0.65] + [0.5 * i / 99 for i in range(99)]
    value, threshold = compute_min_dcf(pos, neg, p_target=0.01)
    assert value == pytest.approx(0.25)
    assert 0.65 < threshold <= 0.7
    raw, _ = compute_min_dcf(pos, neg, p_target=0.01, normalize=False)
    assert raw == pytest.approx(0.0025)
    # det_curve is monotone and spans [0, 1].
    p_miss, p_fa, _ = det_curve(pos, neg)
    assert p_miss[0] == 0 and p_miss[-1] == 1 and p_fa[0] == 1 and p_fa[-1] == 0
    assert (p_miss.diff() >= 0).all() and (p_fa.diff() <= 0).all()
    with pytest.raises(ValueError):
        compute_eer([0.1], [])


# ---------------------------------------------------------------- prep fixtures

SPEAKERS = {"id10001": ["vidA1", "vidA2"], "id10002": ["vidB1", "vidB2"], "id10270": ["vidC1", "vidC2"]}


def build_corpus(root, split_layout):
    """A VoxCeleb1-layout corpus: 3 speakers x 2 videos x 2 files, + bad entries.

    ``split_layout``: False -> wav/ ; True -> vox1_dev_wav/wav + vox1_test_wav/wav
    (id10270 is a test speaker, as in the real corpus).
    """
    gen = np.random.default_rng(1)
    split_lines, n = [], 0
    for spk, videos in SPEAKERS.items():
        part = ("vox1_test_wav/wav" if spk >= "id10270" else "vox1_dev_wav/wav") if split_layout else "wav"
        for v, vid in enumerate(videos):
            for k in range(2):
                n += 1
                rel = f"{spk}/{vid}/{n:05d}.wav"
                path = os.path.join(root, part, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                sf.write(path, 0.1 * gen.standard_normal(16000).astype("float32"), 16000)
                split_lines.append(f"{1 if v == 0 else 2 + k} {rel}")  # video 1: train; video 2: dev, test
    dev_part = "vox1_dev_wav/wav" if split_layout else "wav"
    # An unreadable file and an empty one, both listed for training.
    with open(os.path.join(root, dev_part, "id10001/vidA1/00090.wav"), "wb") as f:
        f.write(b"RIFF\x00\x00 this is not audio")
    sf.write(os.path.join(root, dev_part, "id10002/vidB1/00091.wav"), np.zeros((0,), "float32"), 16000)
    # A speaker with dev/test files only.
    os.makedirs(os.path.join(root, dev_part, "id10009/vidZ"))
    sf.write(os.path.join(root, dev_part, "id10009/vidZ/00092.wav"), 0.1 * gen.standard_normal(16000), 16000)
    split_lines += [
        "1 id10001/vidA1/00090.wav",          # unreadable
        "1 id10002/vidB1/00091.wav",          # empty
        "1 id10001/vidA1/00099.wav",          # missing
        "3 id10009/vidZ/00092.wav",           # speaker without training data
        "1 id10001/vidA1/00001.wav",          # duplicate
        "7 id10001/vidA1/00002.wav",          # bad split number
        "this line is broken",                # malformed
        "",                                   # blank lines are ignored
        "1 id10002/00005.wav",                # path without the video folder
    ]
    with open(os.path.join(root, "iden_split.txt"), "w") as f:
        f.write("\n".join(split_lines) + "\n")
    trials = [
        "1 id10270/vidC1/00009.wav id10270/vidC2/00011.wav",
        "0 id10270/vidC1/00009.wav id10001/vidA2/00003.wav",
        "1 id10001/vidA1/00001.wav id10001/vidA2/00004.wav",
        "0 id10270/vidC1/00010.wav id10002/vidB1/00091.wav",   # empty test file
        "1 id10270/vidC1/00010.wav id10270/vidC9/00099.wav",   # missing
        "2 id10270/vidC1/00010.wav id10270/vidC2/00011.wav",   # bad label
        "1 id10270/vidC1/00010.wav",                           # missing field
    ]
    with open(os.path.join(root, "veri_test2.txt"), "w") as f:
        f.write("\n".join(trials) + "\n")
    return root


@pytest.mark.parametrize("split_layout", [False, True], ids=["wav", "vox1_dev_test"])
def test_prepare_real_layout(tmp_path, split_layout):
    data = build_corpus(str(tmp_path / "VoxCeleb1"), split_layout)
    out = str(tmp_path / "prep")
    counts = prepare_voxceleb(data, out)
    train, dev, test = (read_csv(os.path.join(out, f"{s}.csv")) for s in ("train", "dev", "test"))
    assert [r["ID"] for r in train] == [
        "id10001/vidA1/00001", "id10001/vidA1/00002", "id10002/vidB1/00005", "id10002/vidB1/00006",
        "id10270/vidC1/00009", "id10270/vidC1/00010",
    ]
    assert {r["spk_id"] for r in train} == set(SPEAKERS)
    assert [r["ID"] for r in dev] == ["id10001/vidA2/00003", "id10002/vidB2/00007", "id10270/vidC2/00011"]
    assert [r["ID"] for r in test] == ["id10001/vidA2/00004", "id10002/vidB2/00008", "id10270/vidC2/00012"]
    for r in train + dev + test:
        assert os.path.isabs(r["wav"]) and os.path.isfile(r["wav"])
        assert float(r["duration"]) == pytest.approx(1.0)
    part = "vox1_test_wav" if split_layout else "wav"
    assert f"{os.sep}{part}{os.sep}" in train[-1]["wav"]

    reasons = [r for _, r in skipped(out)]
    assert len(reasons) == 8 and counts["skipped"] == 8
    for what in ("unreadable", "empty", "missing", "speaker not in the training split", "duplicate entry"):
        assert sum(r.startswith(what) for r in reasons) == 1, what
    assert sum(r.startswith("malformed split line") for r in reasons) == 3
    listed = dict(skipped(out))
    assert any(p.endswith("id10001/vidA1/00099.wav") for p in listed)
    assert any(p.endswith("iden_split.txt:19") for p in listed)  # the 'this line is broken' line

    trials = read_csv(os.path.join(out, "veri_trials.csv"))
    assert [(t["label"], t["enrol"], t["test"]) for t in trials] == [
        ("1", "id10270/vidC1/00009", "id10270/vidC2/00011"),
        ("0", "id10270/vidC1/00009", "id10001/vidA2/00003"),
        ("1", "id10001/vidA1/00001", "id10001/vidA2/00004"),
    ]
    utts = {r["ID"] for r in read_csv(os.path.join(out, "veri_utts.csv"))}
    assert utts == {t[k] for t in trials for k in ("enrol", "test")}
    trial_reasons = [r for _, r in skipped(out, "voxceleb_trials")]
    assert len(trial_reasons) == 4 and counts["trials_skipped"] == 4
    assert sum(r.startswith("malformed trial line") for r in trial_reasons) == 2
    assert sum(r.startswith("trial audio unusable") and "missing" in r for r in trial_reasons) == 1
    assert sum(r.startswith("trial audio unusable") and "empty" in r for r in trial_reasons) == 1

    # Unchanged options: no re-prep; another option: re-prep (trial speakers left out).
    assert prepare_voxceleb(data, out) is None
    only_test_speaker = os.path.join(data, "trials_id10270.txt")
    with open(only_test_speaker, "w") as f:
        f.write("1 id10270/vidC1/00009.wav id10270/vidC2/00011.wav\n0 id10270/vidC1/00009.wav id10270/vidC1/00010.wav\n")
    counts = prepare_voxceleb(data, out, trial_file=only_test_speaker, exclude_trial_speakers=True)
    assert counts["speakers"] == 2 and counts["trials"] == 2
    for split in ("train", "dev", "test"):
        assert all(r["spk_id"] != "id10270" for r in read_csv(os.path.join(out, f"{split}.csv")))


def test_prepare_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_voxceleb(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="vox1_dev_wav/wav"):
        prepare_voxceleb(str(tmp_path / "empty"), str(tmp_path / "out"))
    data = build_corpus(str(tmp_path / "VoxCeleb1"), False)
    os.remove(os.path.join(data, "iden_split.txt"))
    with pytest.raises(FileNotFoundError, match="iden_split.txt"):
        prepare_voxceleb(data, str(tmp_path / "out"))
    with open(os.path.join(data, "iden_split.txt"), "w") as f:
        f.write("1 id10001/vidA1/00001.wav\n")  # one speaker cannot be classified
    with pytest.raises(ValueError, match="at least 2 speakers"):
        prepare_voxceleb(data, str(tmp_path / "out"), trial_file=os.path.join(data, "veri_test2.txt"))


# ---------------------------------------------------------------- short runs


def damaged_sample_copy(tmp_path):
    """The bundled sample in the split layout, with bad lines and a broken file."""
    data = str(tmp_path / "VoxCeleb1")
    for spk in sorted(os.listdir(os.path.join(SAMPLE, "wav"))):
        part = "vox1_test_wav" if spk >= "id10270" else "vox1_dev_wav"
        shutil.copytree(os.path.join(SAMPLE, "wav", spk), os.path.join(data, part, "wav", spk))
    shutil.copy(os.path.join(SAMPLE, "veri_test2.txt"), data)
    with open(os.path.join(SAMPLE, "iden_split.txt")) as f:
        lines = f.read().splitlines()
    broken = lines[0].split()[1]
    with open(os.path.join(data, "vox1_dev_wav", "wav", broken), "wb") as f:
        f.write(b"not a wav file")
    lines += ["1 id10001/nope/00999.wav", "1|id10001/bad"]
    with open(os.path.join(data, "iden_split.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return data, broken


COMMON = dict(number_of_epochs=15, num_threads=1, batch_size=8)


def check_results(out, n_speakers=6, margin=0.1):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["n_speakers"] == n_speakers
    assert res["sid_test_acc"] > 1.0 / n_speakers + margin, res  # above chance (1/6)
    assert 0.0 <= res["eer"] <= 1.0 and 0.0 <= res["min_dcf"] <= 1.0 + 1e-9
    assert res["n_trials"] > 0
    with open(os.path.join(out, "veri_scores.txt")) as f:
        assert len(f.read().splitlines()) == res["n_trials"]
    return res


def test_run_fbank_damaged_corpus_and_verify(tmp_path):
    data, broken = damaged_sample_copy(tmp_path)
    out = str(tmp_path / "fbank")
    proc = run_recipe(SCRIPT, HPARAMS, dict(COMMON, upstream="fbank", data_folder=data, output_folder=out))
    assert "USING THE BUNDLED SAMPLE" not in proc.stdout
    res = check_results(out)
    assert res["head"] == "linear" and res["trial_speakers_in_training"] is True
    assert res["embedding"] == "standardised pooled statistics"
    # the convex reference: logistic regression on the same pooled features, same test split
    assert 0.0 <= res["convex_reference"] <= 1.0
    assert res["convex_reference_info"]["n_train"] == len(read_csv(os.path.join(out, "data", "train.csv")))
    assert res["n_trials"] == 40 - sum(1 for line in open(os.path.join(SAMPLE, "veri_test2.txt"))
                                        if broken in line)
    reasons = dict(skipped(os.path.join(out, "data")))
    assert any(p.endswith(broken) and r.startswith("unreadable") for p, r in reasons.items())
    assert sum(r.startswith("malformed split line") for r in reasons.values()) == 1
    assert sum(r.startswith("missing") for r in reasons.values()) == 1
    # The verification entry reuses the best checkpoint and gives the same scores.
    run_recipe(VERIFY, HPARAMS, dict(COMMON, upstream="fbank", data_folder=data, output_folder=out))
    with open(os.path.join(out, "verification.json")) as f:
        assert json.load(f)["eer"] == pytest.approx(res["eer"])


def test_run_random_upstream(tmp_path):
    out = str(tmp_path / "random")
    tiny = {k: TINY_ENCODER[k] for k in ("d_model", "num_layers", "nhead", "d_ffn", "conv_pos_kernel",
                                         "conv_pos_groups")}
    proc = run_recipe(SCRIPT, HPARAMS, dict(COMMON, upstream="random", output_folder=out, **tiny))
    assert "USING THE BUNDLED SAMPLE" in proc.stdout
    res = check_results(out)
    assert len(res["layer_weights"]) == 3


def test_run_pretrained_upstream_xvector_head(tmp_path, tiny_pretrained):
    """The x-vector head (AAM-softmax): trial speakers left out of training, verification on its embedding."""
    out = str(tmp_path / "mgf")
    run_recipe(SCRIPT, HPARAMS, dict(COMMON, upstream=tiny_pretrained, output_folder=out, head="xvector",
                                     xvector_channels="[32, 32, 64]", xvector_kernel_sizes="[5, 3, 1]",
                                     xvector_dilations="[1, 2, 1]", xvector_emb_dim=32, lr=0.005))
    # the sample's trials are among id10270/id10271: 4 identification speakers remain
    res = check_results(out, n_speakers=4)
    assert res["head"] == "xvector" and res["trial_speakers_in_training"] is False
    assert res["embedding"] == "x-vector"
    assert res["upstream"].startswith("mgf")
    train_speakers = {r["spk_id"] for r in read_csv(os.path.join(out, "data", "train.csv"))}
    assert not train_speakers & {"id10270", "id10271"}
    assert 0.0 <= res["convex_reference"] <= 1.0 and res["convex_reference_info"]["n_train"] > 0
    # Frozen pretrained weights are not copied into the checkpoint.
    ckpt = [d for d in os.listdir(os.path.join(out, "save")) if d.startswith("CKPT")][0]
    state = torch.load(os.path.join(out, "save", ckpt, "upstream.ckpt"), weights_only=True)
    assert not any(k.startswith("encoder") for k in state)



def test_a_dev_set_too_small_to_select_on_is_reported(tmp_path):
    """Issue 29: on the sample the dev accuracy is 1 of 6 (chance) in every epoch, so the 'best'
    checkpoint and early stopping select nothing; the run says so."""
    out = str(tmp_path / "small_dev")
    proc = run_recipe(SCRIPT, HPARAMS, dict(COMMON, number_of_epochs=3, verification=False, convex_reference=False,
                                            output_folder=out))
    said = proc.stdout + proc.stderr
    assert "dev set too small to select on (6 items): its error was 0.8333 in all 3 epochs" in said


def test_dev_selection_note_only_for_a_constant_dev_metric():
    from mgf_sb.downstream import DownstreamBrain

    brain = DownstreamBrain.__new__(DownstreamBrain)  # the note needs only the dev history
    brain.n_dev = 40
    for errors, note in (([], False), ([0.5], False), ([0.5, 0.4, 0.4], False), ([0.5, 0.5, 0.5], True)):
        brain.dev_errors = errors
        assert (brain.dev_selection_note() is not None) == note, errors
