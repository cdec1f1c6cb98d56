"""The peers at MGF's budget: BEST-RQ and wav2vec 2.0's objective through the same recipe.

Their targets, masks and distractors, and an end-to-end run of each that exports a folder
the probes load (mgf_sb/objectives/bestrq.py, wav2vec2.py; hparams/mgf.yaml use_bestrq /
use_wav2vec2).
"""

import math
import os
import re

import pytest
import torch
from speechbrain.lobes.models.wav2vec import sample_negatives

from conftest import REPO, librispeech_subset, load_pretrain_recipe
from mgf_sb.batch import MGFBatch, MGFCollate
from mgf_sb.encoder import MGFEncoder
from mgf_sb.masking import sample_spans, spans_to_mask
from mgf_sb.objectives import BestRQObjective, ObjectiveInputs, Wav2Vec2Objective
from mgf_sb.objectives.bestrq import nearest_codes
from mgf_sb.objectives.wav2vec2 import same_sequence_negatives
from mgf_sb.recipe import load_hparams
from mgf_sb.upstream import Upstream

MGF_YAML = os.path.join(REPO, "hparams", "mgf.yaml")
PEER_RUN = {"use_frame": False, "use_phoneme": False, "use_utterance": False}


def peer_batch(M=4, T=40, F=16, mask_ratio=0.6, span=4, seed=0):
    """A hand-made batch: M sequences of random features (the last one shorter), peer spans masked."""
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.tensor([T] * (M - 1) + [T // 2])
    feats = torch.randn(M, T, F, generator=g) * (torch.arange(T)[None, :, None] < n_frames[:, None, None])
    start, length, _ = sample_spans(n_frames, mask_ratio, span, span, generator=g)
    peer_mask = spans_to_mask(start, length, T)
    empty = torch.zeros(M, 0, dtype=torch.long)
    batch = MGFBatch(id=[str(i) for i in range(M)], wavs=torch.zeros(M, 1), wav_lens=torch.ones(M),
                     n_frames=n_frames, frame_mask=torch.zeros(M, T, dtype=torch.bool), span_start=empty,
                     span_len=empty, span_valid=empty.bool(), partner=torch.full((M,), -1), peer_mask=peer_mask)
    return feats, batch


def tiny_encoder(F=16):
    return MGFEncoder(input_size=F, d_model=32, num_layers=1, nhead=2, d_ffn=64, dropout=0.0, conv_pos_kernel=9,
                      conv_pos_groups=4)


def inputs_for(encoder, feats, batch):
    hidden = encoder(feats, batch.n_frames, mask=batch.input_mask)
    return ObjectiveInputs(hidden=hidden, feats=feats, teacher=None, batch=batch, encoder=encoder)


# ----------------------------------------------------------------------------------------------
# BEST-RQ
# ----------------------------------------------------------------------------------------------
def test_bestrq_targets_fixed_and_seeded():
    torch.manual_seed(3)
    a = BestRQObjective(d_model=32, feat_dim=16, cb_dim=8, cb_vocab=64)
    torch.manual_seed(3)
    b = BestRQObjective(d_model=32, feat_dim=16, cb_dim=8, cb_vocab=64)
    torch.manual_seed(4)
    c = BestRQObjective(d_model=32, feat_dim=16, cb_dim=8, cb_vocab=64)
    assert torch.equal(a.quantiser.P, b.quantiser.P) and torch.equal(a.quantiser.CB, b.quantiser.CB)
    assert not torch.equal(a.quantiser.P, c.quantiser.P)
    feats, batch = peer_batch()
    codes = a.targets(feats, batch.peer_mask)
    assert torch.equal(codes, b.targets(feats, batch.peer_mask))
    assert len(set(codes.tolist())) > 10  # random projections of random frames use many codes
    # The memory-light nearest code is SpeechBrain's quantiser's answer.
    assert torch.equal(codes, a.quantiser(feats)[batch.peer_mask])

    # Never trained: its P and CB are buffers (no parameter of the quantiser), unchanged by a step.
    assert list(a.quantiser.parameters()) == []
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in a.quantiser.state_dict().items()}
    opt = torch.optim.AdamW(list(enc.parameters()) + list(a.parameters()), lr=1e-2)
    loss, _ = a(inputs_for(enc, feats, batch))
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in a.quantiser.state_dict().items())
    assert torch.equal(codes, a.targets(feats, batch.peer_mask))


def test_bestrq_loss_starts_at_chance_and_drops():
    torch.manual_seed(0)
    vocab = 256
    enc, obj = tiny_encoder(), BestRQObjective(d_model=32, feat_dim=16, cb_dim=8, cb_vocab=vocab)
    feats, batch = peer_batch()
    opt = torch.optim.AdamW(list(enc.parameters()) + list(obj.parameters()), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, stats = obj(inputs_for(enc, feats, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - math.log(vocab)) < 0.5, losses[0]  # a fresh head guesses uniformly
    assert losses[-1] < 0.7 * losses[0], losses
    assert stats["units"] == float(batch.peer_mask.sum())
    assert 0.0 <= stats["acc"] <= 1.0 and 1.0 < stats["code_ppl"] <= vocab


def test_bestrq_nothing_masked_is_zero_loss_with_a_graph():
    enc, obj = tiny_encoder(), BestRQObjective(d_model=32, feat_dim=16, cb_dim=8, cb_vocab=32)
    feats, batch = peer_batch()
    batch.peer_mask[:] = False
    loss, stats = obj(inputs_for(enc, feats, batch))
    assert float(loss.detach()) == 0.0 and loss.requires_grad and stats["units"] == 0.0


# ----------------------------------------------------------------------------------------------
# The peers' masks (drawn in the collate, with each peer's own statistics)
# ----------------------------------------------------------------------------------------------
def _yaml_collate(**overrides):
    h = load_hparams(MGF_YAML, "\n".join(f"{k}: {v}" for k, v in {**PEER_RUN, **overrides}.items()))
    return h["collate_args"], h["objectives"]


@pytest.mark.parametrize("peer,ratio,span", [("bestrq", 0.15 * 4, 8), ("wav2vec2", 0.65, 10)])
def test_peer_mask_statistics(peer, ratio, span):
    args, scales = _yaml_collate(**{f"use_{peer}": True})
    # hparams/mgf.yaml: BEST-RQ 0.15 x 4 frames of 40 ms, wav2vec 2.0 0.65 in 10 x 20 ms, at 20 ms encoder frames
    assert args["peer_masks"][peer] == {"mask_ratio": pytest.approx(ratio), "span": span}
    assert list(scales) == [peer]
    collate = MGFCollate(**args)
    torch.manual_seed(0)
    masked = valid = 0
    lengths = []
    for _ in range(60):
        items = [{"id": str(i), "sig": torch.randn(int(16000 * (3 + 3 * torch.rand(())))) * 0.1} for i in range(4)]
        b = collate(items)
        T = b.peer_mask.shape[1]
        pad = torch.arange(T)[None, :] >= b.n_frames[:, None]
        assert not (b.peer_mask & pad).any()
        assert not (b.frame_mask.any() or b.span_valid.any())  # the scales are off: only the peer's masks
        assert torch.equal(b.input_mask, b.peer_mask)
        masked += int(b.peer_mask.sum())
        valid += int(b.n_frames.sum())
        # run lengths: whole spans (adjacent spans merge; a span cut at the end is shorter)
        for row in b.peer_mask.int():
            edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), row, torch.zeros(1, dtype=torch.int)]))
            starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
            lengths += (ends - starts).tolist()
    assert abs(masked / valid - ratio) < 0.02, masked / valid
    lengths = torch.tensor(lengths)
    assert (lengths % span == 0).float().mean() > 0.8  # most runs are whole spans
    assert (lengths == span).any()


def test_peer_masks_only_for_an_enabled_peer():
    args, scales = _yaml_collate(use_frame=True)  # frame scale alone: no peer
    b = MGFCollate(**args)([{"id": "a", "sig": torch.randn(48000) * 0.1}])
    assert not b.peer_mask.any() and b.frame_mask.any()
    with pytest.raises(ValueError, match="enable one"):
        MGFCollate(**_yaml_collate(use_bestrq=True, use_wav2vec2=True)[0])
    with pytest.raises(ValueError, match="bestrq_mask_prob x bestrq_mask_length"):
        MGFCollate(**_yaml_collate(use_bestrq=True, bestrq_mask_prob=0.3)[0])  # 0.3 x 4 > 1


# ----------------------------------------------------------------------------------------------
# wav2vec 2.0
# ----------------------------------------------------------------------------------------------
def test_wav2vec2_negatives_same_sequence_never_positive():
    counts = [2, 5, 9, 3]
    y = torch.arange(float(sum(counts)))[:, None]  # row i holds the value i
    torch.manual_seed(0)
    negs = same_sequence_negatives(y, counts, 200)[:, 0, :, 0].long()  # (K, N): which rows were drawn
    seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for i in range(len(seq)):
        drawn = negs[:, i]
        assert (seq[drawn] == seq[i]).all(), "a distractor from another sequence"
        assert (drawn != i).all(), "the positive drawn as its own distractor"
        others = set((seq == seq[i]).nonzero()[:, 0].tolist()) - {i}
        assert set(drawn.tolist()) == others  # every other frame of the sequence is drawn (200 draws)
    # Why one sequence at a time: SpeechBrain's sample_negatives on a (B, T, C) batch draws row
    # b > 0's distractors partly from row b - 1 and can return the positive itself.
    batched = sample_negatives(torch.arange(15.0).view(3, 5, 1), 200)[:, 1, :, 0].long()  # row 1: values 5..9
    assert (batched < 5).any() or (batched == torch.arange(5, 10)[None, :]).any()


def test_wav2vec2_objective_trains_its_targets_and_anneals():
    torch.manual_seed(0)
    enc = tiny_encoder()
    obj = Wav2Vec2Objective(d_model=32, final_dim=16, num_vars=8, temperature_decay=(2.0, 0.5, 0.5),
                            num_negatives=10)
    feats, batch = peer_batch(mask_ratio=0.6, span=4)
    batch.peer_mask[0] = False
    batch.peer_mask[0, 7] = True  # one masked frame: no distractor possible, so not scored
    opt = torch.optim.AdamW(list(enc.parameters()) + list(obj.parameters()), lr=3e-3)
    losses = []
    for step in range(20):
        loss, stats = obj(inputs_for(enc, feats, batch))
        assert obj.quantiser.quantiser.curr_temp == max(2.0 * 0.5 ** step, 0.5)  # decays per training batch
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the targets are learnt: the quantiser and the encoder's input projection get gradients
            assert obj.quantiser.quantiser.weight_proj.weight.grad.abs().sum() > 0
            assert enc.input_proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert stats["units"] == float(batch.peer_mask[1:].sum())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
    assert 0.0 <= stats["acc"] <= 1.0 and 0.0 < stats["diversity"] < 1.0
    assert int(obj.updates) == 20
    obj.eval()
    obj(inputs_for(enc, feats, batch))
    assert int(obj.updates) == 20  # validation does not advance the temperature


def test_wav2vec2_needs_the_encoder():
    obj = Wav2Vec2Objective(d_model=32, final_dim=16, num_vars=8)
    enc = tiny_encoder()
    feats, batch = peer_batch()
    inputs = inputs_for(enc, feats, batch)
    inputs.encoder = None
    with pytest.raises(RuntimeError, match="input embedding"):
        obj(inputs)


# ----------------------------------------------------------------------------------------------
# End to end: the recipe with each peer exports the folder every probe loads
# ----------------------------------------------------------------------------------------------
TINY = {"d_model": 32, "num_layers": 1, "nhead": 2, "d_ffn": 64, "proj_dim": 16, "conv_pos_kernel": 9,
        "conv_pos_groups": 4, "dropout": 0.0, "max_batch_length": 40, "crop_seconds": 3.0, "num_buckets": 2,
        "ckpt_interval_minutes": 0, "number_of_epochs": 1, "bestrq_cb_vocab": 64}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """4 training and 2 validation files of the bundled LibriSpeech sample."""
    return librispeech_subset(tmp_path_factory.mktemp("ls"), 4, 2)


@pytest.mark.parametrize("peer", ["bestrq", "wav2vec2"])
def test_peer_run_exports_a_folder_upstream_loads(small_corpus, tmp_path, peer):
    recipe = load_pretrain_recipe()
    out = str(tmp_path / peer)
    args = {**TINY, **PEER_RUN, f"use_{peer}": True, "data_folder": small_corpus, "output_folder": out}
    recipe.main([MGF_YAML] + [f"--{k}={v}" for k, v in args.items()])

    log = open(os.path.join(out, "train_log.txt")).read()
    train = dict((k, float(v)) for k, v in re.findall(r"train (\w+): ([-\d.e+]+)", log))
    assert {"frame", "phoneme", "utterance"}.isdisjoint(train) and math.isfinite(train[peer])
    assert f"{peer}_acc" in train and train[f"{peer}_code_ppl"] > 1.0
    up = Upstream(os.path.join(out, "pretrained"))
    layers, n = up(torch.randn(2, 16000) * 0.1, torch.tensor([1.0, 0.5]))
    assert len(layers) == 2 and layers[-1].shape[-1] == 32 and n.tolist() == [51, 26]
    assert all(torch.isfinite(x).all() for x in layers)


def test_peer_losses_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    enc = tiny_encoder()
    feats, batch = peer_batch()
    for obj in (BestRQObjective(32, 16, cb_dim=8, cb_vocab=64), Wav2Vec2Objective(32, final_dim=16, num_vars=8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs = inputs_for(enc, feats, batch)
            loss, _ = obj(inputs)
        assert inputs.hidden[-1].dtype == torch.bfloat16  # the encoder really ran in bf16
        assert loss.dtype == torch.float32 and torch.isfinite(loss), type(obj).__name__
        loss.backward()
