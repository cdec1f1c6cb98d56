"""``--upstream=hf:<local folder>``: a Hugging Face wav2vec 2.0 through the same Upstream and recipes.

The model is a tiny, randomly initialised Wav2Vec2Model saved by the test itself: nothing is
downloaded (the network is cut while it loads).
"""

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch

from conftest import SAMPLES, run_recipe

import transformers  # noqa: E402  (the test extra installs it: setup.cfg)

from mgf_sb.upstream import LayerSelector, Upstream, run_folder, upstream_tag  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, LAYERS = 32, 2


def save_tiny_wav2vec2(folder, do_normalize=True, feat_extract_norm="group"):
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm=feat_extract_norm,
        do_stable_layer_norm=feat_extract_norm == "layer", hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("hf") / "tiny-w2v2")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_all_hidden_states_and_frame_rate(hf_folder, no_network):
    up = Upstream("hf:" + hf_folder)
    assert up.num_layers == LAYERS + 1 and up.output_size == HIDDEN
    assert up.frame_rate == 50.0  # 16 kHz / (5 * 2**6)
    torch.manual_seed(1)
    wavs = torch.randn(2, 16000) * 0.1
    wavs[1, 8000:] = 0.0
    layers, n = up(wavs, torch.tensor([1.0, 0.5]))
    assert len(layers) == LAYERS + 1 and all(h.shape == (2, 49, HIDDEN) for h in layers)
    assert n.tolist() == [49, 24]  # the conv front end's own arithmetic
    # The same numbers as the Hugging Face model itself on the normalised waveform
    ref = transformers.AutoModel.from_pretrained(hf_folder, local_files_only=True).eval()
    x = wavs[:1]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states
    for got, exp in zip(layers, expected):
        torch.testing.assert_close(got[:1], exp, atol=1e-5, rtol=1e-4)
    # Layers differ from each other (a real stack, not one tensor repeated)
    assert (layers[0] - layers[-1]).abs().mean() > 1e-3
    # do_normalize: a louder copy of the utterance gives the same representation
    louder, _ = up(wavs[:1] * 7.0, torch.ones(1))
    torch.testing.assert_close(louder[-1], layers[-1][:1], atol=1e-4, rtol=1e-3)
    # frozen by default: no gradient reaches the model
    assert not any(p.requires_grad for p in up.encoder.parameters())
    assert up.statistics_ready()


def test_padding_does_not_change_valid_frames_with_layer_norm_front_end(tmp_path, no_network):
    folder = save_tiny_wav2vec2(tmp_path / "ln", feat_extract_norm="layer")
    up = Upstream("hf:" + folder)
    torch.manual_seed(2)
    short = torch.randn(1, 8000)
    alone, n_alone = up(short, torch.ones(1))
    padded = torch.cat([short, torch.zeros(1, 8000)], 1)
    batch, n_batch = up(torch.cat([padded, torch.randn(1, 16000)]), torch.tensor([0.5, 1.0]))
    assert n_batch[0] == n_alone[0] == 24
    torch.testing.assert_close(batch[1][:1, :24], alone[1][:, :24], atol=1e-4, rtol=1e-3)


def test_fine_tuning_trains_the_transformer_not_the_conv_front_end(hf_folder):
    up = Upstream("hf:" + hf_folder, freeze=False)
    sel = LayerSelector(up.num_layers)
    layers, n = up(torch.randn(2, 8000), torch.ones(2))
    sel(layers).pow(2).mean().backward()
    grads = {k: p.grad for k, p in up.encoder.named_parameters() if p.requires_grad}
    assert grads and not any(k.startswith("feature_extractor.") for k in grads)
    assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.startswith("encoder.layers.1"))


def test_missing_or_non_model_folder_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Upstream("hf:" + str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Upstream("hf:" + str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Upstream("hf:facebook/wav2vec2-base")  # a hub name is not a local folder


def test_tags_and_output_folder():
    assert upstream_tag("hf:/models/wavlm-base-plus") == "hf-wavlm-base-plus"
    assert run_folder("results/VoxCeleb", "hf:/models/hubert base/", "linear", 7) == \
        "results/VoxCeleb/hf-hubert_base/linear/7"


def test_voxceleb_recipe_runs_on_a_hf_upstream(hf_folder, tmp_path):
    """One full (1-epoch) probe run: the recipe sees an hf: upstream like any other."""
    out = str(tmp_path / "vox")
    run_recipe(os.path.join(REPO, "recipes", "VoxCeleb", "train.py"), os.path.join(REPO, "hparams", "voxceleb.yaml"),
               dict(upstream="hf:" + hf_folder, data_folder=os.path.join(SAMPLES, "VoxCeleb1"), output_folder=out,
                    number_of_epochs=1, num_threads=1, batch_size=8))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["upstream"] == "hf:tiny-w2v2"
    assert 0.0 <= res["sid_test_acc"] <= 1.0 and 0.0 <= res["eer"] <= 1.0


def test_front_end_frame_centres_match_the_model(hf_folder):
    """Frame count and centres of the conv front end, as TIMIT's labels use them."""
    up = Upstream("hf:" + hf_folder)
    front = up.features
    assert front.receptive_field == 400 and front.hop == 320
    for n in (400, 719, 720, 8000, 16000, 16001):
        expected = int(up.encoder._get_feat_extract_output_lengths(torch.tensor(n)))
        centres = front.frame_centres(n)
        assert len(centres) == expected == front.n_frames_of(n), n
        # frame j sees samples [320 j, 320 j + 400): its centre is the middle of that window
        assert np.allclose(centres, np.arange(expected) * 320 + 199.5)


def test_timit_recipe_runs_on_a_hf_upstream(hf_folder, tmp_path):
    """Training labels at the model's 50 Hz frames; dev/test scored on every 100 fps label."""
    sys.path.insert(0, os.path.join(REPO, "recipes", "TIMIT"))
    import timit_prepare as tp
    from test_timit import majority_frequency, read_manifest

    out = str(tmp_path / "timit")
    run_recipe(os.path.join(REPO, "recipes", "TIMIT", "train.py"), os.path.join(REPO, "hparams", "timit.yaml"),
               dict(upstream="hf:" + hf_folder, data_folder=os.path.join(SAMPLES, "TIMIT"), output_folder=out,
                    number_of_epochs=2, num_threads=1))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["upstream"] == "hf:tiny-w2v2" and res["frame_rate"] == 50.0
    for split in ("dev", "test"):
        manifest = os.path.join(out, "data", f"{split}.csv")
        n_labels = sum(p != tp.IGNORE for row in read_manifest(manifest) for p in row["frame_labels"].split())
        assert res[split]["frames"] == n_labels
        assert abs(res[split]["majority_frequency"] - majority_frequency(manifest)) < 1e-6
        assert 0.0 <= res[split]["acc"] <= 1.0


def test_iemocap_fold_runs_on_a_hf_upstream_without_export(hf_folder, tmp_path):
    from test_iemocap import _check_results, _common, build_iemocap

    corpus = build_iemocap(str(tmp_path / "IEMOCAP_full_release"))
    proc = run_recipe("recipes/IEMOCAP/train.py", "hparams/emotion.yaml",
                      dict(_common(corpus, tmp_path, "hf"), upstream="hf:" + hf_folder, test_session=2))
    out = tmp_path / "hf" / "session2"
    res = _check_results(str(out))
    assert res["upstream_name"] == "hf:tiny-w2v2" and len(res["layer_weights"]) == LAYERS + 1
    assert not (out / "model").exists() and "no classifier export for an hf: upstream" in proc.stdout + proc.stderr


def test_evaluate_ranks_a_hf_anchor_beside_mgf_and_the_baselines(hf_folder, tmp_path):
    """evaluate.py takes hf:<folder> in upstreams: its own row, probed as it is (no pretraining
    dependency, no baseline reference), in the report's table and ranks."""
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import evaluate
    from test_evaluate import HPARAMS, fake_runner

    hp = evaluate.load_hparams([HPARAMS, f"--output_folder={tmp_path}/out", "--tasks=[timit, voxceleb]",
                                f"--upstreams=[mgf, fbank, 'hf:{hf_folder}']"])
    steps, rows, sources = evaluate.build_plan(hp)
    assert rows["main"] == ["mgf", "fbank", "hf-tiny-w2v2"]
    assert sources["hf-tiny-w2v2"] == "hf:" + os.path.abspath(hf_folder)
    hf_steps = [s for s in steps if s.row == "hf-tiny-w2v2"]
    assert len(hf_steps) == 2 * 2  # 2 tasks x 2 heads
    for s in hf_steps:
        assert f"--upstream=hf:{os.path.abspath(hf_folder)}" in s.command and not s.depends
        assert not any(a.startswith("--upstream_reference") for a in s.command)
        assert os.path.join("probes", "hf-tiny-w2v2") in s.folder
    calls = []
    report, status = evaluate.main([HPARAMS, f"--output_folder={tmp_path}/out", "--tasks=[timit, voxceleb]",
                                    f"--upstreams=[mgf, fbank, 'hf:{hf_folder}']"],
                                   runner=fake_runner(calls), log=lambda *a: None)
    assert "hf-tiny-w2v2" in report["main"]["results"]
    assert "| hf-tiny-w2v2 |" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        evaluate.build_plan(dict(hp, upstreams=["mgf", "hf:" + str(tmp_path / "missing")]))
