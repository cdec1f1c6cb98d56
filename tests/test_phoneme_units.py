"""Issue 33 (part 3): a phoneme scale whose target context cannot give away - HuBERT-style unit targets.

``phoneme_units: none`` (default) keeps the span-vs-span InfoNCE bit for bit; ``kmeans`` (online
k-means of the span-pooled teacher / fbank targets) and ``random_projection`` (BEST-RQ's frozen
quantiser of the span-pooled fbank) score each masked span against K unit embeddings.
"""

import glob
import io
import os

import pytest
import torch
import torch.nn.functional as F
from hyperpyyaml import load_hyperpyyaml

from conftest import REPO
from mgf_sb.batch import MGFCollate
from mgf_sb.features import FeatureExtractor
from mgf_sb.objectives import ObjectiveInputs, PhonemeObjective
from mgf_sb.objectives.base import MaskedPrediction
from mgf_sb.objectives.bestrq import nearest_codes
from mgf_sb.objectives.phoneme import neighbour_means, pool_spans, span_centres, visible_frames
from mgf_sb.objectives.units import OnlineKMeans, assign, unit_logits
from test_pretrain import parse_log, recipe, run, small_corpus  # noqa: F401  (fixtures of the pretraining tests)

TINY = dict(d_model=32, num_layers=2, nhead=4, d_ffn=64, proj_dim=32, conv_pos_kernel=9, conv_pos_groups=4)


def load_hparams(**overrides):
    with open(os.path.join(REPO, "hparams", "mgf.yaml")) as f:
        return load_hyperpyyaml(f, {**TINY, "output_folder": "unused", **overrides})


def mixture(n, centres, std=1.0, generator=None):
    """n rows of a planted mixture: (rows (n, D), true cluster (n,))."""
    label = torch.randint(centres.shape[0], (n,), generator=generator)
    return centres[label] + std * torch.randn(n, centres.shape[1], generator=generator), label


def purity(units, label, k):
    """Share of rows whose unit's majority true cluster is their own."""
    hits = 0
    for u in units.unique():
        hits += int(torch.bincount(label[units == u], minlength=k).max())
    return hits / units.numel()


def span_batch(n_utts=4, seconds=4.0, seed=0):
    torch.manual_seed(seed)
    return MGFCollate(crop_seconds=seconds, frame_stack=2, span_mask_ratio=0.3, span_min=3, span_max=10,
                      frame_mask_ratio=0.0)([{"id": str(i), "sig": torch.randn(int(16000 * seconds))}
                                             for i in range(n_utts)])


# ---- online k-means --------------------------------------------------------------------------


def test_online_kmeans_recovers_a_planted_mixture():
    """8 well-separated Gaussian clusters streamed in batches: every cluster gets its own unit."""
    g = torch.Generator().manual_seed(0)
    centres = 8.0 * torch.randn(8, 16, generator=g)
    torch.manual_seed(0)
    km = OnlineKMeans(8, 16, decay=0.9)
    for _ in range(40):
        km.update(mixture(64, centres, generator=g)[0])
    x, label = mixture(2000, centres, generator=g)
    units = km(x)
    assert purity(units, label, 8) > 0.98
    assert units.unique().numel() == 8  # no cluster merged into another's unit
    # each centroid sits on its cluster's centre (the EMA of its rows' means)
    err = torch.cdist(km.centroids, centres).min(1).values
    assert float(err.max()) < 0.5, err


def test_first_batch_smaller_than_k_then_dead_units_are_reseeded():
    g = torch.Generator().manual_seed(1)
    centres = 8.0 * torch.randn(16, 8, generator=g)
    torch.manual_seed(1)
    km = OnlineKMeans(16, 8, decay=0.9)
    first = centres[:5] + torch.randn(5, 8, generator=g)  # 5 rows of 5 distinct clusters
    assert km.update(first) == 16 and km.ready
    # 5 rows, 16 units: the rows are the first 5 centroids, the 11 others copies that nothing is assigned to
    assert torch.equal(km.centroids[:5], first)
    assert set(assign(first, km.centroids).tolist()) == set(range(5))
    assert (km.count[5:] == 0).all()
    # later batches re-seed the dead copies on rows far from every centroid: all 16 clusters get a unit
    reseeded = sum(km.update(mixture(256, centres, generator=g)[0]) for _ in range(40))
    assert reseeded >= 11
    x, label = mixture(2000, centres, generator=g)
    units = km(x)
    assert units.unique().numel() == 16 and purity(units, label, 16) > 0.95
    assert (km.count > 0).all()
    # a unit that stops being used (moved far from the data) is dead and re-seeded onto the data
    km.centroids[3] = 1e3
    km.count[3] = 0.0
    km.total[3] = 0.0
    assert km.update(mixture(64, centres, generator=g)[0]) >= 1
    assert float(torch.cdist(km.centroids[3:4], centres).min()) < 5.0


def test_kmeans_never_updates_in_eval_mode_and_round_trips_through_a_checkpoint():
    batch = span_batch()
    feats, n = FeatureExtractor(frame_stack=2).train()(batch.wavs, batch.wav_lens, epoch=1)
    feats = feats[batch.source]
    teacher = torch.randn(feats.shape[0], feats.shape[1], 32)
    hidden = [torch.randn(feats.shape[0], feats.shape[1], 32)]
    inputs = ObjectiveInputs(hidden, feats, teacher, batch)
    torch.manual_seed(0)
    obj = PhonemeObjective(32, 160, loss="infonce", target="teacher", target_projection="none", proj_dim=16,
                           frame_ms=20, units="kmeans", n_units=8, units_decay=0.9)
    obj.eval()
    loss, stats = obj(inputs)  # no training step yet: no units, no loss, nothing fitted
    assert stats == {"units": 0.0} and float(loss.detach()) == 0.0 and not obj.kmeans.ready
    obj.train()
    obj(inputs)
    obj(inputs)
    assert obj.kmeans.ready
    obj.eval()
    before = {k: v.clone() for k, v in obj.kmeans.state_dict().items()}
    loss_eval, _ = obj(inputs)
    assert all(torch.equal(before[k], v) for k, v in obj.kmeans.state_dict().items())
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # another initialisation, then the checkpoint's state
    other = PhonemeObjective(32, 160, loss="infonce", target="teacher", target_projection="none", proj_dim=16,
                             frame_ms=20, units="kmeans", n_units=8, units_decay=0.9).eval()
    assert not torch.equal(other.unit_embedding, obj.unit_embedding)
    other.load_state_dict(torch.load(buf))
    for k, v in obj.kmeans.state_dict().items():
        assert torch.equal(other.kmeans.state_dict()[k], v), k
    assert torch.equal(other(inputs)[0], loss_eval)


def _ddp_worker(rank, world, init_file, steps, out):
    import torch.distributed as dist

    from mgf_sb.distributed import end_process_group, import_before_process_group

    import_before_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        centres = 8.0 * torch.randn(6, 4, generator=g)
        torch.manual_seed(100 + rank)  # each process its own random draws: initialisation must come from process 0
        km = OnlineKMeans(6, 4, decay=0.8)
        km.update(mixture(32, centres, generator=g)[0] + rank)  # different first batches too
        for x in steps:
            km.update(x[rank::world])  # each process half of the rows
        km.centroids[2] = 1e3  # a dead unit: re-seeded on process 0 and broadcast
        km.count[2] = 0.0
        km.total[2] = 0.0
        km.update(steps[-1][rank::world] + rank)
        torch.save({k: v.clone() for k, v in km.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        end_process_group()


def test_ddp_processes_keep_identical_centroids_equal_to_one_process_with_every_row(tmp_path):
    """2 gloo processes with half the rows each: the same centroids on both, and (before any re-seeding) the
    same as one process updating with all the rows (the counts and sums are all-reduced)."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    centres = 8.0 * torch.randn(6, 4, generator=g)
    first = mixture(32, centres, generator=g)[0]
    steps = [mixture(40, centres, generator=torch.Generator().manual_seed(10 + i))[0] for i in range(5)]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), steps, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # one process: process 0's first batch, then every row of each step (the live units: the dead one is
    # re-seeded on process 0's rows there, on all of them here)
    alive = torch.ones(6, dtype=torch.bool)
    alive[2] = False
    torch.manual_seed(100)
    one2 = OnlineKMeans(6, 4, decay=0.8)
    one2.update(first)
    for x in steps:
        one2.update(x)
    one2.centroids[2] = 1e3
    one2.count[2] = 0.0
    one2.total[2] = 0.0
    one2.update(torch.cat([steps[-1][0::2], steps[-1][1::2] + 1]))
    assert torch.allclose(r0["centroids"][alive], one2.centroids[alive], atol=1e-4)
    assert float(r0["centroids"][2].abs().max()) < 100  # the dead unit was re-seeded on data


# ---- the objective ---------------------------------------------------------------------------


class OldPhonemeObjective(MaskedPrediction):
    """The phoneme objective before the units switch: MaskedPrediction + span pooling, nothing else."""

    def units(self, x, batch):
        return pool_spans(x, batch.span_start, batch.span_len, batch.span_valid)

    def unit_positions(self, batch, T):
        return span_centres(batch.span_start, batch.span_len, batch.span_valid)


def test_units_none_is_bit_identical_to_the_old_code_path():
    batch = span_batch()
    feats, _ = FeatureExtractor(frame_stack=2).train()(batch.wavs, batch.wav_lens, epoch=1)
    feats = feats[batch.source]
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(feats.shape[0], feats.shape[1], 32, generator=g)
    hidden = [torch.randn(feats.shape[0], feats.shape[1], 32, generator=g, requires_grad=True)]
    kw = dict(loss="infonce", target="teacher", target_projection="none", frame_ms=20, negatives_within_ms=500)
    torch.manual_seed(0)
    new = PhonemeObjective(32, 160, **kw)
    after_new = torch.rand(3)
    torch.manual_seed(0)
    old = OldPhonemeObjective(32, 160, **kw)
    after_old = torch.rand(3)
    assert torch.equal(after_new, after_old)  # the same random draws at construction
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    inputs = ObjectiveInputs(hidden, feats, teacher, batch, teacher_masked=teacher + 0.5, diagnostics=True)
    torch.manual_seed(1)
    loss_new, stats_new = new(inputs)
    torch.manual_seed(1)
    loss_old, stats_old = old(inputs)
    # the same loss and statistics; the no-network baseline is a diagnostic added since (no random draw)
    assert torch.equal(loss_new, loss_old) and "interp_acc" in stats_new
    assert {k: v for k, v in stats_new.items() if k != "interp_acc"} == stats_old
    (g_new,) = torch.autograd.grad(loss_new, hidden)
    (g_old,) = torch.autograd.grad(loss_old, hidden)
    assert torch.equal(g_new, g_old)
    # the YAML default builds exactly that: no unit module, no new state in the checkpoints
    hp = load_hparams()
    phoneme = hp["objectives"]["phoneme"]
    assert phoneme.units_kind == "none"
    assert [k for k in hp["objectives"].state_dict() if k.startswith("phoneme.")] == \
        ["phoneme." + k for k in OldPhonemeObjective(32, 32, loss="infonce", target="teacher",
                                                     target_projection="none").state_dict()]


@pytest.mark.parametrize("override,key", [
    ({"phoneme_loss": "l1", "phoneme_target": "fbank"}, "phoneme_loss"),
    ({"phoneme_target_projection": "learned"}, "phoneme_target_projection"),
    ({"phoneme_units_source": "wav"}, "phoneme_units_source"),
    ({"phoneme_n_units": 1}, "phoneme_n_units"),
    ({"phoneme_units_decay": 1.0}, "phoneme_units_decay"),
])
def test_impossible_combinations_are_clear_errors_naming_the_keys(override, key):
    with pytest.raises(ValueError, match=key):
        load_hparams(phoneme_units="kmeans", **override)
    with pytest.raises(ValueError, match="phoneme_units"):
        load_hparams(phoneme_units="hubert")


def test_unit_logits_are_cosine_over_the_units_and_each_span_is_scored_alone():
    """HuBERT's form: logits = cos(head(pred), e_k) / T over all K units; the other spans of the batch are
    not distractors, so a span's loss does not change when the others do."""
    batch = span_batch()
    feats, _ = FeatureExtractor(frame_stack=2).train()(batch.wavs, batch.wav_lens, epoch=1)
    feats = feats[batch.source]
    torch.manual_seed(0)
    obj = PhonemeObjective(32, 160, loss="infonce", target="teacher", target_projection="none", proj_dim=16,
                           frame_ms=20, units="random_projection", n_units=12)
    assert not obj.needs_teacher and obj.units_source == "fbank"
    hidden = torch.randn(feats.shape[0], feats.shape[1], 32)
    loss, stats = obj.train()(ObjectiveInputs([hidden], feats, None, batch))
    pred, _ = pool_spans(hidden, batch.span_start, batch.span_len, batch.span_valid)
    tgt, _ = pool_spans(feats, batch.span_start, batch.span_len, batch.span_valid)
    codes = nearest_codes(obj.quantiser, tgt)  # BEST-RQ's frozen codes of the span-pooled fbank
    h, e = obj.head(pred), obj.unit_embedding
    manual = (h / h.norm(dim=-1, keepdim=True)) @ (e / e.norm(dim=-1, keepdim=True)).T / 0.1
    assert torch.allclose(unit_logits(h, e, 0.1), manual, atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(manual, codes), atol=1e-5)
    assert stats["units"] == codes.numel() and 0 < stats["unit_prior"] <= 1 and 1 <= stats["unit_ppl"] <= 12
    assert stats["acc"] == float((manual.argmax(-1) == codes).float().mean())
    # the span's logits depend on that span only: change every other span's frames, same row
    other = hidden.clone()
    member = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    s, n = int(batch.span_start[0, 0]), int(batch.span_len[0, 0])
    member[0, s: s + n] = True
    other[~member] = torch.randn(int((~member).sum()), 32)
    pred2, _ = pool_spans(other, batch.span_start, batch.span_len, batch.span_valid)
    assert torch.allclose(unit_logits(obj.head(pred2[:1]), e, 0.1), manual[:1], atol=1e-5)
    # random_projection never refits: its quantiser is buffers, unchanged by training steps
    assert [p for p in obj.quantiser.parameters()] == []


def test_context_cannot_tell_the_unit_where_the_span_content_is_independent_of_its_context():
    """Planted: each span's teacher frames are one of 6 well-separated 'phones', drawn independently of
    what surrounds it. A student that sees the span learns its unit; the teacher fed the masked input
    (the span hidden, its context kept) and the neighbours' interpolation stay near the floor."""
    batch = span_batch(n_utts=6, seed=3)
    M, T = batch.input_mask.shape[0], int(batch.n_frames.max())
    g = torch.Generator().manual_seed(0)
    phones = 6.0 * torch.randn(6, 32, generator=g)
    frame_phone = torch.randint(6, (M, T), generator=g)  # context: each frame its own random phone
    member = torch.zeros(M, T, dtype=torch.bool)
    for m in range(M):
        for s, n, v in zip(batch.span_start[m].tolist(), batch.span_len[m].tolist(), batch.span_valid[m].tolist()):
            if v:
                frame_phone[m, s: s + n] = int(torch.randint(6, (1,), generator=g))  # one phone per span
                member[m, s: s + n] = True
    teacher = phones[frame_phone] + 0.3 * torch.randn(M, T, 32, generator=g)
    masked = teacher.clone()
    masked[member] = 0.3 * torch.randn(int(member.sum()), 32, generator=g)  # what the masked input gives there
    feats = torch.randn(M, T, 160, generator=g)
    torch.manual_seed(0)
    obj = PhonemeObjective(32, 160, loss="infonce", target="teacher", target_projection="none", proj_dim=16,
                           frame_ms=20, units="kmeans", n_units=6, units_decay=0.9)
    inputs = ObjectiveInputs([teacher], feats, teacher, batch, teacher_masked=masked, diagnostics=True)
    opt = torch.optim.Adam(obj.parameters(), lr=0.02)
    for _ in range(60):
        loss, stats = obj.train()(inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, stats = obj.eval()(inputs)
    floor = stats["unit_prior"]
    assert 0 <= stats["context_acc"] <= 1 and 0 <= stats["interp_acc"] <= 1
    assert stats["acc"] > 0.95, stats
    assert stats["context_acc"] < floor + 0.15, stats
    assert stats["interp_acc"] < floor + 0.25, stats
    assert stats["acc"] > stats["context_acc"] + 0.5
    # a masked input that shows the span itself gives the true unit (the baseline's upper end)
    _, same = obj(ObjectiveInputs([teacher], feats, teacher, batch, teacher_masked=teacher))
    assert same["context_acc"] == 1.0


def test_neighbour_means_take_the_nearest_visible_frames():
    x = torch.arange(10.0)[None, :, None]  # frame t holds t
    visible = torch.ones(1, 10, dtype=torch.bool)
    visible[0, 2:5] = False  # a span at 3..4 (start 3, length 2) and another hidden frame at 2
    means, known = neighbour_means(x, torch.tensor([[3, 0, 8]]), torch.tensor([[2, 2, 2]]),
                                   torch.tensor([[True, True, True]]), visible)
    # span 3..4: left visible 1, right 5 -> 3; span 0..1 (visible, but scored as a span): only right 2 is
    # hidden -> next visible 5; span 8..9: only the left neighbour 7
    assert means[:, 0].tolist() == [3.0, 5.0, 7.0] and known.all()


# ---- the recipe ------------------------------------------------------------------------------


def test_pretraining_with_kmeans_units_logs_the_unit_diagnostics_and_resumes_with_the_same_centroids(
        recipe, small_corpus, tmp_path, monkeypatch):  # noqa: F811
    out = str(tmp_path / "kmeans")
    run(recipe, out, small_corpus, number_of_epochs=1, phoneme_units="kmeans", phoneme_n_units=16)
    text = open(os.path.join(out, "train_log.txt")).read()
    train = parse_log(os.path.join(out, "train_log.txt"))[0]["train"]
    for key in ("phoneme_acc", "phoneme_context_acc", "phoneme_unit_ppl", "phoneme_unit_prior", "phoneme_interp_acc"):
        assert key in train, key
        assert f"valid {key}" in text, key
    assert 0 <= train["phoneme_acc"] <= 1 and 0 <= train["phoneme_context_acc"] <= 1
    assert 1 <= train["phoneme_unit_ppl"] <= 16 and 0 < train["phoneme_unit_prior"] <= 1
    # the checkpoint holds the fitted centroids
    ckpts = sorted(glob.glob(os.path.join(out, "save", "CKPT+*")), key=os.path.getmtime)
    state = torch.load(os.path.join(ckpts[-1], "objectives.ckpt"))
    saved = state["phoneme.kmeans.centroids"]
    assert bool(state["phoneme.kmeans.initialised"]) and saved.abs().sum() > 0
    # the same command, one more epoch: resumes with those centroids (no new initialisation)
    seen = {"init": 0, "first": None}
    original_init, original_update = OnlineKMeans.initialise, OnlineKMeans.update

    def spy_init(self, x):
        seen["init"] += 1
        return original_init(self, x)

    def spy_update(self, x, units=None):
        if seen["first"] is None:
            seen["first"] = self.centroids.clone()
        return original_update(self, x, units)

    monkeypatch.setattr(OnlineKMeans, "initialise", spy_init)
    monkeypatch.setattr(OnlineKMeans, "update", spy_update)
    log = run(recipe, out, small_corpus, number_of_epochs=2, phoneme_units="kmeans", phoneme_n_units=16)
    assert [r["epoch"] for r in log] == [1, 2]
    assert seen["init"] == 0 and seen["first"] is not None
    assert torch.equal(seen["first"], saved)


def test_visible_frames_exclude_the_masks_and_the_padding():
    batch = span_batch()
    T = int(batch.n_frames.max())
    vis = visible_frames(batch, T)
    assert not (vis & batch.input_mask[:, :T]).any()
    assert (vis.sum(1) == batch.n_frames - batch.input_mask[:, :T].sum(1)).all()


def test_kmeans_of_the_fbank_needs_no_teacher():
    batch = span_batch()
    feats, _ = FeatureExtractor(frame_stack=2).train()(batch.wavs, batch.wav_lens, epoch=1)
    feats = feats[batch.source]
    hp = load_hparams(phoneme_units="kmeans", phoneme_units_source="fbank", phoneme_n_units=8, use_frame=False,
                      use_utterance=False)
    obj = hp["objectives"]["phoneme"]
    assert not hp["objectives"].needs_teacher and obj.kmeans.dim == feats.shape[-1]
    hidden = [torch.randn(feats.shape[0], feats.shape[1], 32)]
    loss, stats = obj.train()(ObjectiveInputs(hidden, feats, None, batch, diagnostics=True))
    assert torch.isfinite(loss) and "context_acc" not in stats and 0 <= stats["interp_acc"] <= 1
    tgt, _ = pool_spans(feats, batch.span_start, batch.span_len, batch.span_valid)
    assert stats["unit_ppl"] > 2 and obj.kmeans.ready and obj.kmeans(tgt).unique().numel() > 2


def test_old_run_folders_resume_with_the_units_off():
    """A run recorded before the switch (no phoneme_units* keys) is unchanged at the defaults, changed with units."""
    from mgf_sb.recipe import command_settings
    from mgf_sb.run_guard import settings_changes

    yaml = os.path.join(REPO, "hparams", "mgf.yaml")
    now = command_settings([yaml])
    old = {k: v for k, v in now.items() if not k.startswith(("phoneme_units", "phoneme_n_units"))}
    assert len(old) == len(now) - 4
    assert settings_changes(old, now) == {}
    assert "phoneme_units" in settings_changes(old, command_settings([yaml, "--phoneme_units=kmeans"]))
