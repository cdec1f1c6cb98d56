"""Export + speechbrain.inference loading (mgf_sb.export, mgf_sb.inference).

The exported folders are loaded in a FRESH PROCESS whose network access is
disabled (socket connect, HuggingFace and URL downloads raise), and its outputs
are compared with the training-side modules run in this process.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from conftest import REPO, SAMPLES

LABELS = ["neu", "hap", "ang", "sad"]

# Runs in a fresh interpreter: every network path raises, then it loads and encodes.
LOADER = r'''
import json, os, socket, sys, traceback
import torch
torch.set_num_threads(1)

def _no_network(*args, **kwargs):
    raise RuntimeError("NETWORK ACCESS ATTEMPTED")
socket.socket.connect = _no_network
socket.create_connection = _no_network
import huggingface_hub
import speechbrain.utils.fetching as fetching
huggingface_hub.hf_hub_download = _no_network
fetching.download_file_hf = _no_network
fetching.download_file = _no_network

from mgf_sb.inference import MGFClassifier, MGFEmotionClassifier, MGFEncoder

cfg = json.load(open(sys.argv[1]))
out, errors = {}, {}

enc = MGFEncoder.from_hparams(source=cfg["encoder_model"], savedir=cfg["savedir"])
out["speech"] = enc.encode_file(cfg["audio"]["speech"])
out["speech_last"] = enc.encode_file(cfg["audio"]["speech"], layer=-1)
out["stereo16"] = enc.encode_file(cfg["audio"]["stereo16"])
out["stereo44"] = enc.encode_file(cfg["audio"]["stereo44"])
out["mono8k"] = enc.encode_file(cfg["audio"]["mono8k"])
batch = torch.load(cfg["batch"], weights_only=True)
out["batch"], out["batch_n"] = enc.encode_batch(batch["wavs"], batch["lens"], layer=None, return_lengths=True)
out["batch_layer1"] = enc.encode_batch(batch["wavs"], batch["lens"], layer=1)
out["mid_chunked"] = enc.encode_file(cfg["audio"]["mid20"], chunk_seconds=4, overlap_seconds=1)
out["mid_whole"] = enc.encode_file(cfg["audio"]["mid20"], chunk_seconds=60)
out["long_chunked"] = enc.encode_file(cfg["audio"]["long60"], layer=-1, chunk_seconds=10, overlap_seconds=2)
out["speech_onechunk"] = enc.encode_file(cfg["audio"]["speech"], chunk_seconds=60, overlap_seconds=2)

for name, model in (("mgf", cfg["mgf_classifier"]), ("fbank", cfg["fbank_classifier"])):
    clf = MGFEmotionClassifier.from_hparams(source=model)
    label, score, probs = clf.classify_file(cfg["audio"]["speech"])
    out[f"{name}_file_probs"] = torch.tensor([probs[l] for l in clf.labels])
    out[f"{name}_file_score"] = torch.tensor(score)
    p, s, i, labels = clf.classify_batch(batch["wavs"], batch["lens"])
    out[f"{name}_batch_probs"] = p
    errors[f"{name}_label"] = [label, labels, clf.labels]
    _, _, long_probs = clf.classify_file(cfg["audio"]["long60"], chunk_seconds=10, overlap_seconds=2)
    out[f"{name}_long_probs"] = torch.tensor(list(long_probs.values()))

def attempt(name, fn):
    try:
        fn()
        errors[name] = "NO ERROR"
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"

attempt("missing_source", lambda: MGFEncoder.from_hparams(source=cfg["missing"]))
attempt("hub_id", lambda: MGFEncoder.from_hparams(source="speechbrain/emotion-recognition-wav2vec2-IEMOCAP"))
attempt("url", lambda: MGFEncoder.from_hparams(source="https://example.com/model"))
attempt("not_exported", lambda: MGFEncoder.from_hparams(source=cfg["pretrained"]))
attempt("training_output", lambda: MGFEncoder.from_hparams(source=cfg["pretrain_run"]))
attempt("incomplete", lambda: MGFEncoder.from_hparams(source=cfg["incomplete"]))
attempt("wrong_class", lambda: MGFEmotionClassifier.from_hparams(source=cfg["encoder_model"]))
for bad in ("empty", "notaudio", "nosamples", "tooshort", "nofile"):
    attempt("audio_" + bad, lambda: enc.encode_file(cfg["audio"][bad]))

torch.save(out, cfg["out"])
json.dump(errors, open(cfg["errors"], "w"))
'''


def _run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="0")
    proc = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=600, **kwargs)
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _training_modules(folder):
    """What the training side runs: the Upstream a downstream recipe builds (frozen, eval)."""
    from mgf_sb.upstream import Upstream

    up = Upstream(folder, freeze=True)
    up.eval()
    return up


def _build_classifier_folder(root, upstream_src, layer, seed, pooling="mean+std", hidden_size=16):
    """A downstream ``<output_folder>/model`` folder exactly as the IEMOCAP recipe writes it."""
    from mgf_sb.heads import UtteranceClassifier
    from mgf_sb.upstream import LayerSelector, Upstream

    torch.manual_seed(seed)
    model = os.path.join(root, "model")
    os.makedirs(model)
    if upstream_src == "fbank":
        up = Upstream("fbank")
        wav = 0.1 * torch.randn(2, 16000)
        up(wav, torch.ones(2), update_stats=True)  # statistics from "training"
        os.makedirs(os.path.join(model, "upstream"))
        torch.save(up.features.state_dict(), os.path.join(model, "upstream", "features.ckpt"))
        with open(os.path.join(model, "upstream", "mgf_config.json"), "w") as f:
            json.dump({"format": "mgf-sb-pretrained", "format_version": 1, "features": up.features.config,
                       "encoder": None, "meta": {}}, f)
    else:
        shutil.copytree(upstream_src, os.path.join(model, "upstream"))
        up = Upstream(upstream_src)
    selector = LayerSelector(up.num_layers, layer)
    if selector.weights is not None:
        with torch.no_grad():
            selector.weights.normal_()
    clf = UtteranceClassifier(up.output_size, len(LABELS), pooling, hidden_size)
    torch.save({"layer_selector": selector.state_dict(), "classifier": clf.state_dict()},
               os.path.join(model, "head.ckpt"))
    with open(os.path.join(model, "head_config.json"), "w") as f:
        json.dump({"task": "emotion", "upstream_source": str(upstream_src), "layer": layer,
                   "num_layers": up.num_layers, "input_size": up.output_size, "pooling": pooling,
                   "hidden_size": hidden_size, "n_classes": len(LABELS)}, f)
    with open(os.path.join(model, "labels.txt"), "w") as f:
        f.write("\n".join(LABELS) + "\n")
    up.eval(), selector.eval(), clf.eval()
    return root, (up, selector, clf)


def _classify(modules, wavs, lens):
    up, selector, clf = modules
    with torch.no_grad():
        layers, n = up(wavs, lens)
        return torch.softmax(clf(selector(layers), n), -1)


@pytest.fixture(scope="module")
def setup(tiny_pretrained, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("inference"))
    torch.manual_seed(0)
    # The pretraining output folder as recipes/pretrain/train.py leaves it.
    run = os.path.join(tmp, "pretrain_run")
    shutil.copytree(tiny_pretrained, os.path.join(run, "pretrained"))
    os.makedirs(os.path.join(run, "save"))
    with open(os.path.join(run, "hyperparams.yaml"), "w") as f:  # the training config SpeechBrain copies there
        f.write("seed: 1986\noutput_folder: !ref results/mgf/<seed>\n")
    enc_model = os.path.join(tmp, "models", "mgf")
    _ok(_run(["-m", "mgf_sb.export", run, enc_model]))

    mgf_root, mgf_mods = _build_classifier_folder(os.path.join(tmp, "iemocap_mgf"), tiny_pretrained, None, 1)
    fb_root, fb_mods = _build_classifier_folder(os.path.join(tmp, "iemocap_fbank"), "fbank", 0, 2,
                                               pooling="attentive", hidden_size=0)
    mgf_clf_model = os.path.join(tmp, "models", "mgf_emotion")
    _ok(_run([os.path.join("recipes", "export.py"), mgf_root, mgf_clf_model]))
    from mgf_sb.export import export

    fb_clf_model = export(os.path.join(fb_root, "model"), os.path.join(tmp, "models", "fbank_emotion"))

    # Audio: a bundled sample file (16 kHz mono), re-encoded at other rates / channel counts.
    flac = sorted(glob.glob(os.path.join(SAMPLES, "LibriSpeech", "train-clean-100", "*", "*", "*.flac")))[0]
    speech, sr = sf.read(flac, dtype="float32")
    assert sr == 16000
    a = {k: os.path.join(tmp, "audio", v) for k, v in dict(
        speech="speech.wav", stereo16="stereo16.wav", stereo44="stereo44.flac", mono8k="mono8k.wav",
        mid20="mid20.wav", long60="long60.flac", empty="empty.wav", notaudio="notaudio.wav",
        nosamples="nosamples.wav", tooshort="tooshort.wav", nofile="does_not_exist.wav").items()}
    os.makedirs(os.path.join(tmp, "audio"))
    sf.write(a["speech"], speech, 16000, subtype="FLOAT")
    sf.write(a["stereo16"], torch.stack([torch.from_numpy(speech)] * 2, 1).numpy(), 16000, subtype="FLOAT")
    from speechbrain.augment.time_domain import Resample

    s = torch.from_numpy(speech)[None]
    s44 = Resample(16000, 44100)(s)[0]
    sf.write(a["stereo44"], torch.stack([s44, s44], 1).numpy(), 44100)
    sf.write(a["mono8k"], Resample(16000, 8000)(s)[0].numpy(), 8000)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(20 * 16000)
    # Modulated noise, never silent: SpeechBrain's Fbank clips at (max - 80 dB) per sequence,
    # which makes silent frames depend on the chunk; with no such frames layer 0 is local.
    sf.write(a["mid20"], (0.05 * torch.randn(t.shape[0], generator=g) * (1.5 + torch.sin(t / 3000.0))).numpy(),
             16000, subtype="FLOAT")
    sf.write(a["long60"], (0.05 * torch.randn(60 * 16000, generator=g)).numpy(), 16000)
    open(a["empty"], "w").close()
    with open(a["notaudio"], "w") as f:
        f.write("this is not audio\n" * 100)
    sf.write(a["nosamples"], torch.zeros(0).numpy(), 16000)
    sf.write(a["tooshort"], torch.zeros(50).numpy(), 8000)

    # A padded batch of two utterances.
    n2 = len(speech) // 2
    wavs = torch.zeros(2, len(speech))
    wavs[0], wavs[1, :n2] = torch.from_numpy(speech), torch.from_numpy(speech[:n2])
    lens = torch.tensor([1.0, n2 / len(speech)])
    torch.save({"wavs": wavs, "lens": lens}, os.path.join(tmp, "batch.pt"))

    incomplete = os.path.join(tmp, "models", "incomplete")
    shutil.copytree(enc_model, incomplete)
    os.remove(os.path.join(incomplete, "encoder.ckpt"))

    cfg = dict(encoder_model=enc_model, mgf_classifier=mgf_clf_model, fbank_classifier=fb_clf_model,
               savedir=os.path.join(tmp, "savedir"), audio=a, batch=os.path.join(tmp, "batch.pt"),
               missing=os.path.join(tmp, "no", "such", "model"), pretrained=tiny_pretrained, pretrain_run=run,
               incomplete=incomplete, out=os.path.join(tmp, "out.pt"), errors=os.path.join(tmp, "errors.json"))
    with open(os.path.join(tmp, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(tmp, "loader.py"), "w") as f:
        f.write(LOADER)
    _ok(_run([os.path.join(tmp, "loader.py"), os.path.join(tmp, "cfg.json")]))
    with open(cfg["errors"]) as f:
        errors = json.load(f)
    return dict(cfg=cfg, out=torch.load(cfg["out"], weights_only=True), errors=errors, speech=speech,
                wavs=wavs, lens=lens, up=_training_modules(tiny_pretrained), mgf_mods=mgf_mods, fbank_mods=fb_mods)


def test_export_writes_model_folder(setup):
    cfg = setup["cfg"]
    files = set(os.listdir(cfg["encoder_model"]))
    assert {"hyperparams.yaml", "mgf_config.json", "features.ckpt", "encoder.ckpt"} <= files
    clf_files = set(os.listdir(cfg["mgf_classifier"]))
    assert {"layer_selector.ckpt", "classifier.ckpt", "label_encoder.txt", "head_config.json"} <= clf_files
    assert "encoder.ckpt" not in os.listdir(cfg["fbank_classifier"])
    # An exported encoder folder is also a valid pretrained folder for the downstream recipes.
    from mgf_sb.pretrained_folder import load_pretrained

    load_pretrained(cfg["encoder_model"])
    # savedir: symlinks to the model files, as SpeechBrain does.
    assert os.path.islink(os.path.join(cfg["savedir"], "encoder.ckpt"))
    assert os.path.realpath(os.path.join(cfg["savedir"], "encoder.ckpt")) == os.path.join(
        cfg["encoder_model"], "encoder.ckpt")


def test_fresh_process_matches_training_model(setup):
    out, up = setup["out"], setup["up"]
    wav = torch.from_numpy(setup["speech"])[None]
    with torch.no_grad():
        ref, _ = up(wav, torch.ones(1))
        ref_batch, ref_n = up(setup["wavs"], setup["lens"])
    ref = torch.stack([h[0] for h in ref])
    assert out["speech"].shape == ref.shape == (3, ref.shape[1], 32)
    assert torch.allclose(out["speech"], ref, atol=1e-5)
    assert torch.allclose(out["speech_last"], ref[-1], atol=1e-5)
    assert torch.allclose(out["batch"], torch.stack(ref_batch), atol=1e-5)
    assert torch.allclose(out["batch_layer1"], ref_batch[1], atol=1e-5)
    assert out["batch_n"].tolist() == ref_n.tolist()
    # Stereo with identical channels = the mono file.
    assert torch.allclose(out["stereo16"], out["speech"], atol=1e-5)


def test_other_rates_and_channels(setup):
    out = setup["out"]
    frames = out["speech"].shape[1]
    for key in ("stereo44", "mono8k"):
        assert out[key].shape[0] == 3 and out[key].shape[2] == 32
        assert abs(out[key].shape[1] - frames) <= 1, (key, out[key].shape, frames)
        assert torch.isfinite(out[key]).all()
    # 16 kHz -> 44.1 kHz stereo -> (read back, mixed, resampled) 16 kHz: the same speech again.
    n = frames - 1
    cos = torch.nn.functional.cosine_similarity(out["stereo44"][:, :n], out["speech"][:, :n], -1)
    assert cos.mean() > 0.95, cos.mean(-1)


def test_chunked_encoding(setup):
    from mgf_sb.batch import n_encoder_frames

    out = setup["out"]
    # A file that fits in one chunk: chunked == whole.
    assert torch.equal(out["speech_onechunk"], out["speech"])
    # 20 s in 4 s chunks (1 s overlap): exact length, frame-exact stitching (layer 0 is local), upper
    # layers close (they attend to the chunk instead of the whole file).
    chunked, whole = out["mid_chunked"], out["mid_whole"]
    assert chunked.shape == whole.shape == (3, int(n_encoder_frames(20 * 16000, 160, 1)), 32)
    assert torch.allclose(chunked[0], whole[0], atol=1e-4)
    rel = ((chunked - whole).norm(dim=-1) / whole.norm(dim=-1)).mean(-1)
    assert rel.max() < 0.05, rel
    # 60 s in 10 s chunks: the whole-file frame count.
    assert out["long_chunked"].shape == (int(n_encoder_frames(60 * 16000, 160, 1)), 32)
    assert torch.isfinite(out["long_chunked"]).all()


@pytest.mark.parametrize("name", ["mgf", "fbank"])
def test_emotion_classifier(setup, name):
    out, mods = setup["out"], setup[f"{name}_mods"]
    wav = torch.from_numpy(setup["speech"])[None]
    ref = _classify(mods, wav, torch.ones(1))[0]
    assert torch.allclose(out[f"{name}_file_probs"], ref, atol=1e-5)
    assert abs(float(out[f"{name}_file_score"]) - float(ref.max())) < 1e-5
    label, batch_labels, labels = setup["errors"][f"{name}_label"]
    assert labels == LABELS and label == LABELS[int(ref.argmax())]
    ref_batch = _classify(mods, setup["wavs"], setup["lens"])
    assert torch.allclose(out[f"{name}_batch_probs"], ref_batch, atol=1e-5)
    assert batch_labels == [LABELS[i] for i in ref_batch.argmax(-1).tolist()]
    long_probs = out[f"{name}_long_probs"]
    assert long_probs.shape == (4,) and abs(float(long_probs.sum()) - 1) < 1e-4


def test_loading_errors_are_clear_and_offline(setup):
    e, cfg = setup["errors"], setup["cfg"]
    assert not any("NETWORK" in v for v in e.values() if isinstance(v, str)), e
    assert e["missing_source"].startswith("FileNotFoundError") and cfg["missing"] in e["missing_source"]
    assert "does not exist" in e["missing_source"] and "mgf_sb.export" in e["missing_source"]
    assert e["hub_id"].startswith("FileNotFoundError") and "local folders only" in e["hub_id"]
    assert e["url"].startswith("ValueError") and "local folders only" in e["url"]
    assert e["not_exported"].startswith("FileNotFoundError") and "hyperparams.yaml" in e["not_exported"]
    assert "mgf_sb.export" in e["not_exported"]
    assert e["training_output"].startswith("ValueError") and "training output folder" in e["training_output"]
    assert e["incomplete"].startswith("FileNotFoundError") and "missing encoder.ckpt" in e["incomplete"]
    assert e["wrong_class"].startswith("ValueError") and "classifier" in e["wrong_class"]


def test_audio_errors_are_clear(setup):
    e, a = setup["errors"], setup["cfg"]["audio"]
    assert e["audio_empty"].startswith("ValueError") and "empty" in e["audio_empty"] and a["empty"] in e["audio_empty"]
    assert e["audio_notaudio"].startswith("ValueError") and a["notaudio"] in e["audio_notaudio"]
    assert "cannot read" in e["audio_notaudio"]
    assert e["audio_nosamples"].startswith("ValueError") and "no samples" in e["audio_nosamples"]
    assert e["audio_tooshort"].startswith("ValueError") and "too short" in e["audio_tooshort"]
    assert e["audio_nofile"].startswith("FileNotFoundError") and a["nofile"] in e["audio_nofile"]


def test_export_errors(tmp_path, tiny_pretrained):
    from mgf_sb.export import export

    with pytest.raises(FileNotFoundError, match="neither a pretraining output"):
        export(str(tmp_path), str(tmp_path / "out"))
    broken = tmp_path / "run" / "model"
    os.makedirs(broken / "upstream")
    (broken / "head_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing head.ckpt, labels.txt"):
        export(str(tmp_path / "run"), str(tmp_path / "out"))
    # A non-model destination is never overwritten.
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an mgf-sb model folder"):
        export(tiny_pretrained, str(tmp_path / "keep"))
    # CLI: non-zero exit and the reason on stderr.
    proc = _run(["-m", "mgf_sb.export", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_weights_only_refuses_pickled_code(tmp_path, setup):
    """A checkpoint holding arbitrary objects is refused (weights_only=True), with the file named."""
    from mgf_sb.inference import MGFEncoder

    model = tmp_path / "model"
    shutil.copytree(setup["cfg"]["encoder_model"], model)
    torch.save({"x": torch.nn.Linear(2, 2)}, model / "encoder.ckpt")  # a pickled module, not a state_dict
    with pytest.raises(ValueError, match="cannot load weights from .*encoder.ckpt"):
        MGFEncoder.from_hparams(source=str(model))
