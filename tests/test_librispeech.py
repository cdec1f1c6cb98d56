"""LibriSpeech CTC recipe: prep on a real-layout fixture (bad cases included),
tokenizer round trip, a short overfit run, and beam search >= greedy."""

import glob
import importlib.util
import json
import math
import logging
import os
import shutil

import pytest
import soundfile as sf
import torch

from conftest import REPO, SAMPLES, run_recipe

RECIPE = os.path.join(REPO, "recipes", "LibriSpeech")
HPARAMS = os.path.join(REPO, "hparams", "librispeech_ctc.yaml")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"


def _load(name, filename):
    spec = importlib.util.spec_from_file_location(name, os.path.join(RECIPE, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _load("librispeech_prepare_under_test", "librispeech_prepare.py")
recipe = _load("librispeech_train_under_test", "train.py")


def bundled_train():
    """{utt: (flac path, transcript)} of the bundled train-clean-100 sample."""
    out = {}
    for trans in sorted(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "train-clean-100", "*", "*", "*.trans.txt"))):
        with open(trans, encoding="utf-8") as f:
            for line in f:
                utt, text = line.strip().split(" ", 1)
                out[utt] = (os.path.join(os.path.dirname(trans), utt + ".flac"), text)
    assert len(out) >= 8, "bundled LibriSpeech sample missing"
    return out


def shortest(n):
    items = bundled_train()
    return sorted(items.items(), key=lambda kv: (sf.info(kv[1][0]).duration, kv[0]))[:n]


def write_chapter(root, split, utts, extra_lines=()):
    """Copies utterances into <root>/<split>/<spk>/<chapter>/ with their .trans.txt."""
    chapters = {}
    for utt, (path, text) in utts:
        spk, chap, _ = utt.split("-")
        chapters.setdefault((spk, chap), []).append((utt, path, text))
    for (spk, chap), items in chapters.items():
        d = os.path.join(root, split, spk, chap)
        os.makedirs(d, exist_ok=True)
        lines = []
        for utt, path, text in items:
            if path is not None:
                shutil.copy(path, os.path.join(d, utt + ".flac"))
            if text is not None:
                lines.append(f"{utt} {text}")
        with open(os.path.join(d, f"{spk}-{chap}.trans.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines + list(extra_lines)) + "\n")
    return root


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """Real layout with every bad case: 4 good utterances + one of each problem."""
    root = str(tmp_path_factory.mktemp("LibriSpeech"))
    good = shortest(6)
    (u0, (p0, t0)), (u1, (p1, t1)) = good[4], good[5]
    spk, chap, _ = u0.split("-")
    train = [(u, v) for u, v in good[:4]]
    write_chapter(root, "train-clean-100", train)
    d = os.path.join(root, "train-clean-100", spk, chap)
    os.makedirs(d, exist_ok=True)
    # audio without a transcript; a transcript line without audio; characters outside the alphabet
    shutil.copy(p0, os.path.join(d, f"{spk}-{chap}-0901.flac"))
    shutil.copy(p1, os.path.join(d, f"{spk}-{chap}-0902.flac"))
    # too short for CTC: 0.15 s (15 frames at 100 Hz) with a long transcript
    wav, sr = sf.read(p0, dtype="float32")
    sf.write(os.path.join(d, f"{spk}-{chap}-0903.flac"), wav[: int(0.15 * sr)], sr)
    # an unreadable file
    with open(os.path.join(d, f"{spk}-{chap}-0904.flac"), "wb") as f:
        f.write(b"not a flac file at all")
    with open(os.path.join(d, f"{spk}-{chap}.trans.txt"), "a", encoding="utf-8") as f:
        f.write(f"{spk}-{chap}-0900 THIS LINE HAS NO AUDIO\n")
        f.write(f"{spk}-{chap}-0902 CAFÉ NUMBER 42\n")
        f.write(f"{spk}-{chap}-0903 {t0}\n")
        f.write(f"{spk}-{chap}-0904 UNREADABLE\n")
    write_chapter(root, "dev-clean", good[:2])
    write_chapter(root, "test-clean", good[2:4])
    return root, spk, chap


@pytest.fixture(scope="module")
def prepared(bad_corpus, tmp_path_factory):
    root, spk, chap = bad_corpus
    save = str(tmp_path_factory.mktemp("prep"))
    tests = prep.prepare_librispeech(root, save, ["train-clean-100"], ["dev-clean"], ["test-clean", "test-other"],
                                     alphabet=ALPHABET)
    return root, save, tests, spk, chap


def test_prep_real_layout_and_bad_cases(prepared):
    root, save, tests, spk, chap = prepared
    assert tests == ["test-clean"]  # test-other is absent: left out, not an error
    rows = {r["ID"]: r for r in prep.read_manifest(os.path.join(save, "train.csv"))}
    good_ids = [u for u, _ in shortest(4)]
    # the 4 good ones + the too-short one (the CTC check needs the tokenizer: filter_for_ctc)
    assert set(rows) == set(good_ids) | {f"{spk}-{chap}-0903"}
    assert rows[good_ids[0]]["wrd"] == bundled_train()[good_ids[0]][1]
    assert rows[good_ids[0]]["spk_id"] == good_ids[0].split("-")[0]
    assert len(prep.read_manifest(os.path.join(save, "valid.csv"))) == 2
    assert len(prep.read_manifest(os.path.join(save, "test-clean.csv"))) == 2

    skipped = prep.read_skip_list(save, "train")
    reasons = {os.path.basename(p): r for p, r in skipped}
    assert len(skipped) == 4, skipped
    assert "audio without a transcript" in reasons[f"{spk}-{chap}-0901.flac"]
    assert "characters outside the alphabet" in reasons[f"{spk}-{chap}-0902.flac"]
    assert "'É'" in reasons[f"{spk}-{chap}-0902.flac"] and "'4'" in reasons[f"{spk}-{chap}-0902.flac"]
    assert "unreadable" in reasons[f"{spk}-{chap}-0904.flac"]
    no_audio = [(p, r) for p, r in skipped if "transcript line without audio" in r]
    assert len(no_audio) == 1 and f"{spk}-{chap}-0900" in no_audio[0][1]
    trans = os.path.join(root, "train-clean-100", spk, chap, f"{spk}-{chap}.trans.txt")
    with open(trans, encoding="utf-8") as f:
        lineno = [i for i, line in enumerate(f, 1) if line.startswith(f"{spk}-{chap}-0900 ")][0]
    assert no_audio[0][0] == f"{trans}:{lineno}"  # names the file and line of the orphan transcript


def test_prep_logs_each_splits_skip_summary_once(bad_corpus, tmp_path, caplog):
    """The audio checks and the transcript checks share one skip list: one summary line per split."""
    root, _, _ = bad_corpus
    with caplog.at_level(logging.INFO):
        prep.prepare_librispeech(root, str(tmp_path), ["train-clean-100"], ["dev-clean"], ["test-clean"],
                                 alphabet=ALPHABET)
    lines = [r.getMessage() for r in caplog.records]
    for name in ("train", "valid", "test-clean"):
        summaries = [m for m in lines if m.startswith(f"{name}: skipped ") or m == f"{name}: no file skipped"]
        assert len(summaries) == 1, (name, summaries)
    assert any(m.startswith("train: skipped 4 files") for m in lines)


def test_prep_missing_split_names_it(bad_corpus, tmp_path):
    root, _, _ = bad_corpus
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        prep.prepare_librispeech(root, str(tmp_path), ["train-other-500"], ["dev-clean"], [], alphabet=ALPHABET)


def test_ctc_length_check_counts_repeats(tmp_path):
    assert prep.ctc_min_frames([1, 1, 2, 2, 3]) == (7, 2)
    assert prep.ctc_min_frames([]) == (0, 0)
    rows = [  # 0.05 s at 100 Hz = 5 frames
        {"ID": "rep", "duration": 0.05, "wav": "rep.flac", "wrd": "AABB"},  # 4 tokens + 2 repeats = 6 > 5
        {"ID": "alt", "duration": 0.05, "wav": "alt.flac", "wrd": "ABAB"},  # 4 tokens, no repeat: fits
        {"ID": "unk", "duration": 1.00, "wav": "unk.flac", "wrd": "AXB"},  # X unknown to the tokenizer
    ]
    prep.write_manifest(rows, str(tmp_path / "in.csv"), ["wrd"])
    vocab = {"A": 1, "B": 2}
    kept, skipped = prep.filter_for_ctc(str(tmp_path / "in.csv"), str(tmp_path / "out.csv"),
                                        lambda t: [vocab.get(c, 0) for c in t], frame_rate=100.0, unk_id=0)
    assert (kept, skipped) == (1, 2)
    assert [r["ID"] for r in prep.read_manifest(str(tmp_path / "out.csv"))] == ["alt"]
    reasons = dict(prep.read_skip_list(str(tmp_path), "out"))
    assert "too short for CTC" in reasons["rep.flac"] and "2 repeats" in reasons["rep.flac"]
    assert "outside the tokenizer's vocabulary" in reasons["unk.flac"]


def _tok_hparams(folder, manifest_folder, token_type="char", n=len(ALPHABET) + 2):
    return {"token_type": token_type, "alphabet": ALPHABET, "tokenizer_folder": folder,
            "output_neurons": n, "manifest_folder": manifest_folder, "character_coverage": 1.0, "blank_index": 0}


def test_tokenizer_round_trip_and_ctc_filter(prepared, tmp_path):
    root, save, _, spk, chap = prepared
    tok = recipe.train_tokenizer(_tok_hparams(str(tmp_path / "char"), save))
    assert os.path.isfile(os.path.join(str(tmp_path / "char"), f"{len(ALPHABET) + 2}_char.model"))
    texts = [r["wrd"] for r in prep.read_manifest(os.path.join(save, "train.csv"))]
    for text in texts + ["ZEBRA QUIZ'S BOX"]:  # letters never seen in training are still in the vocabulary
        ids = tok.sp.encode_as_ids(text)
        assert 0 not in ids
        assert tok.sp.decode_ids(ids) == text
    # the CTC filter drops the 0.15 s utterance with a long transcript
    kept, skipped = prep.filter_for_ctc(os.path.join(save, "train.csv"), os.path.join(save, "train_ctc.csv"),
                                        tok.sp.encode_as_ids, frame_rate=100.0)
    assert (kept, skipped) == (4, 1)
    (path, reason), = prep.read_skip_list(save, "train_ctc")
    assert path.endswith(f"{spk}-{chap}-0903.flac") and "too short for CTC" in reason
    # a mismatched output size is a clear error
    with pytest.raises(ValueError, match="--output_neurons=29"):
        recipe.train_tokenizer(_tok_hparams(str(tmp_path / "char"), save, n=31))


def test_unigram_tokenizer_round_trip(tmp_path):
    texts = [t for _, t in bundled_train().values()]
    prep.write_manifest([{"ID": str(i), "duration": 1.0, "wav": "x", "wrd": t} for i, t in enumerate(texts)],
                        str(tmp_path / "train.csv"), ["wrd"])
    tok = recipe.train_tokenizer(_tok_hparams(str(tmp_path / "uni"), str(tmp_path), "unigram", 60))
    assert tok.sp.vocab_size() == 60
    for text in texts:
        ids = tok.sp.encode_as_ids(text)
        assert tok.sp.decode_ids(ids) == text
    assert any(len(tok.sp.id_to_piece(i).strip("▁")) > 1 for i in range(60))  # real multi-character units


def _searcher(vocab):
    from hyperpyyaml import load_hyperpyyaml

    with open(HPARAMS, encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"output_folder": "/tmp/unused_ls_test"})
    return hp["test_searcher"](blank_index=hp["blank_index"], vocab_list=vocab)


def test_beam_search_not_worse_than_greedy():
    vocab = ["<unk>"] + list(ALPHABET) + ["▁"]
    searcher = _searcher(vocab)
    decode = lambda ids: "".join(vocab[i] for i in ids).replace("▁", " ")  # noqa: E731
    # Greedy's best path is all blanks, but "A" has more probability (0.64 vs 0.36).
    probs = torch.full((1, 2, len(vocab)), 1e-6)
    probs[0, :, 0], probs[0, :, 1] = 0.6, 0.4
    lp = torch.log(probs / probs.sum(-1, keepdim=True))
    n = torch.tensor([2])
    g_text, g_score = recipe.greedy_hypotheses(lp, n, 0, decode)
    b_text, b_score = recipe.beam_hypotheses(searcher, lp, n)
    assert g_text == [""] and b_text == ["A"]
    assert b_score[0] > g_score[0]
    assert math.isclose(b_score[0], math.log(0.64), abs_tol=1e-3)
    # Random peaky logits: the beam's best score is never below the greedy path's.
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(3, 40, len(vocab), generator=gen) * 3
        logits[:, :, 0] += 2.0
        lp = torch.log_softmax(logits, -1)
        n = torch.tensor([40, 31, 17])
        _, g = recipe.greedy_hypotheses(lp, n, 0, decode)
        _, b = recipe.beam_hypotheses(searcher, lp, n)
        assert all(bs >= gs - 1e-4 for bs, gs in zip(b, g)), (b, g)


def OVERFIT_OPTS(root, out):
    """A tiny head that memorises 4 utterances in under a minute of CPU."""
    return {"data_folder": root, "output_folder": out, "test_splits": "[test-clean]", "number_of_epochs": 50,
            "lstm_layers": 1, "lstm_hidden": 128, "dropout": 0.0, "lr": 0.01, "batch_size": 1, "sorting": "random",
            "beam_size": 4, "num_threads": int(os.environ.get("MGF_TEST_THREADS", "2"))}


def test_overfit_few_utterances(tmp_path):
    """fbank + small BiLSTM on 4 training utterances: WER on them falls well below 100%."""
    utts = shortest(4)
    root = str(tmp_path / "LibriSpeech")
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        write_chapter(root, split, utts)
    out = str(tmp_path / "run")
    run_recipe(
        os.path.join(RECIPE, "train.py"), HPARAMS,
        OVERFIT_OPTS(root, out),
    )
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["splits"]["test-clean"]
    assert res["utterances"] == 4
    assert res["greedy_WER"] < 60, res
    assert res["beam_WER"] < 60, res
    assert os.path.isfile(os.path.join(out, "wer_test-clean.txt"))
    with open(os.path.join(out, "wer_test-clean.txt")) as f:
        assert "%WER" in f.read()
    assert os.path.isfile(os.path.join(out, "tokenizer", "29_char.model"))
    # resuming: the same command finds the finished run and only re-tests
    proc = run_recipe(os.path.join(RECIPE, "train.py"), HPARAMS,
                      OVERFIT_OPTS(root, out))
    assert "Going into epoch" not in proc.stdout + proc.stderr
