"""The utterance scale's own branch (issue 33, "each scale at its own depth ... on its own branch").

``branch_layers`` gives the encoder x-vector TDNN blocks beside the Transformer, on the input
projection; ``utterance_layer: branch`` makes the utterance scale read them. What must hold: the
branch shares only the input projection with the trunk (so the utterance loss cannot pull the
masked scales' layers), sees every frame (no mask), does not depend on its batch, is exposed as
layers after the trunk's (probes, heads, inference, export see it), and a wrong pairing of the two
settings stops at start-up.
"""

import os

import numpy as np
import pytest
import torch

from conftest import REPO
from mgf_sb.encoder import MGFEncoder, TDNNBranch
from mgf_sb.objectives import FrameObjective, ObjectiveInputs, ScaleSet, UtteranceObjective
from mgf_sb.target import TargetNetwork
from test_pretrain import parse_log, recipe, run, small_corpus  # noqa: F401  (fixtures of the pretraining tests)


def encoder(branch_layers=3, seed=0, **kw):
    torch.manual_seed(seed)
    return MGFEncoder(16, d_model=16, num_layers=2, nhead=2, d_ffn=32, conv_pos_kernel=5, conv_pos_groups=4,
                      dropout=0.0, branch_layers=branch_layers, **kw).eval()


def test_default_encoder_is_unchanged_and_the_branch_is_built_last():
    """branch_layers=0: no new parameter or config key; with a branch, the trunk draws the same initial
    weights as without (the branch is built last), so a switch compares like with like."""
    plain, branched = encoder(0), encoder(3)
    assert plain.branch is None and "branch_layers" not in plain.config and plain.num_outputs == 3
    assert branched.config["branch_layers"] == 3 and branched.num_outputs == 6
    trunk = {k: v for k, v in branched.state_dict().items() if not k.startswith("branch.")}
    assert trunk.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in trunk.items())
    x, n = torch.randn(2, 30, 16), torch.tensor([30, 20])
    out_p, out_b = plain(x, n), branched(x, n)
    assert len(out_b) == 6 and all(torch.equal(a, b) for a, b in zip(out_p, out_b[:3]))
    assert len(branched(x, n, branch=False)) == 3


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_branch_sees_every_frame_and_not_its_batch(norm):
    enc = encoder(branch_norm=norm)
    x, n = torch.randn(3, 40, 16), torch.tensor([40, 25, 9])
    mask = torch.rand(3, 40) < 0.5
    masked, clean = enc(x, n, mask=mask), enc(x, n)
    assert not torch.allclose(masked[-4], clean[-4])  # the trunk sees the mask ...
    assert all(torch.equal(a, b) for a, b in zip(masked[3:], clean[3:]))  # ... the branch does not
    alone = enc(x[1:2, :25], n[1:2])
    for b_batch, b_alone in zip(clean[3:], alone[3:]):
        torch.testing.assert_close(b_batch[1, :25], b_alone[0], atol=1e-5, rtol=1e-5)
        b_batch = b_batch.detach()
        assert float(b_batch[1, 25:].abs().sum()) == 0.0 and float(b_batch[2, 9:].abs().sum()) == 0.0


def test_batch_norm_statistics_come_from_the_valid_frames_only():
    """Training mode: the padding neither enters the statistics nor leaves the zeros, so a batch with
    longer padding normalises its valid frames exactly as the same frames packed without padding."""
    enc = encoder(branch_norm="batch").train()
    x = torch.randn(2, 30, 16)
    short = enc(x, torch.tensor([30, 12]))[3]
    packed = enc(torch.cat([x[:1], torch.cat([x[1:, :12], torch.randn(1, 18, 16)], 1)]), torch.tensor([30, 12]))[3]
    torch.testing.assert_close(short, packed)
    valid = short[1, :12].detach()
    assert float(short[1, 12:].detach().abs().sum()) == 0.0
    # the statistics are the valid frames': every channel has mean 0 and variance 1 over them
    frames = torch.cat([short[0].detach(), valid])
    torch.testing.assert_close(frames.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(frames.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert "branch_norm" in enc.config and "branch_norm" not in encoder().config  # the default's folder as before


def test_tdnn_receptive_field_is_the_x_vector_one():
    """The four x-vector blocks see +-7 frames: a change at frame 20 moves frames 13..27 only."""
    torch.manual_seed(0)
    branch = TDNNBranch(8, 4).eval()
    x, n = torch.randn(1, 41, 8), torch.tensor([41])
    y = x.clone()
    y[0, 20] += 5.0
    moved = (branch(x, n)[-1] - branch(y, n)[-1]).abs().sum(-1)[0] > 1e-6
    assert torch.nonzero(moved).flatten().tolist() == list(range(13, 28))


def _batch(n_utts=4, frames=30):
    """A tiny batch of 2 views per utterance (rows 2u and 2u+1 partners)."""
    from types import SimpleNamespace

    partner = torch.tensor([i + 1 if i % 2 == 0 else i - 1 for i in range(2 * n_utts)])
    return SimpleNamespace(n_frames=torch.full((2 * n_utts,), frames), partner=partner,
                           utt=torch.arange(2 * n_utts) // 2, speaker=None,
                           input_mask=torch.zeros(2 * n_utts, frames, dtype=torch.bool))


def test_utterance_loss_on_the_branch_reaches_only_the_input_projection_and_the_branch():
    """The point of the design: the utterance scale's gradient does not enter the Transformer layers
    (nor the positional term), so it cannot trade the masked scales' phones for speakers there."""
    enc = encoder().train()
    utt = UtteranceObjective(16, 16, layer="branch", pool="mean_std", proj_dim=8)
    batch = _batch()
    feats = torch.randn(8, 30, 16)
    hidden = enc(feats, batch.n_frames)
    inputs = ObjectiveInputs(hidden=hidden[:3], branch=hidden[3:], feats=feats, teacher=None, batch=batch)
    loss, stats = utt(inputs)
    loss.backward()
    touched = {k.split(".")[0] for k, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"input_proj", "branch"}
    assert stats["pairs"] == 8.0


def test_an_own_input_projection_shares_nothing_with_the_trunk():
    """branch_input=own: the utterance loss reaches the branch and its own projection only, the trunk's
    outputs are those of the same encoder without a branch, and the trunk's initial weights are unchanged."""
    enc, plain = encoder(branch_input="own").train(), encoder(0)
    assert enc.config["branch_input"] == "own" and "branch_input" not in encoder().config
    x, n = torch.randn(8, 30, 16), torch.tensor([30] * 8)
    hidden = enc(x, n)
    assert all(torch.equal(a, b) for a, b in zip(plain.train()(x, n), hidden[:3]))
    utt = UtteranceObjective(16, 16, layer="branch", pool="mean_std", proj_dim=8)
    loss, _ = utt(ObjectiveInputs(hidden=hidden[:3], branch=hidden[3:], feats=x, teacher=None, batch=_batch()))
    loss.backward()
    touched = {k.split(".")[0] for k, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"branch_proj", "branch"}
    with pytest.raises(ValueError, match="branch_input"):
        encoder(2, branch_input="separate")


def test_branch_only_input_projection_is_the_utterance_scales_and_the_trunk_adapts_to_it():
    """branch_input=branch_only: the masked scales' gradient (any loss on the trunk's layers) stops at the
    adapter and never reaches the input projection; the utterance loss does; at init the adapter is the
    identity, so the trunk computes what an encoder without the switch computes."""
    enc, plain = encoder(branch_input="branch_only").train(), encoder(0).train()
    x, n = torch.randn(8, 30, 16), torch.tensor([30] * 8)
    mask = torch.rand(8, 30) < 0.3
    hidden = enc(x, n, mask=mask)
    for a, b in zip(plain(x, n, mask=mask), hidden[:3]):
        torch.testing.assert_close(a, b)
    grads = torch.autograd.grad(sum(h.sum() for h in hidden[:3]), [enc.input_proj.weight, enc.trunk_adapter.weight],
                                allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
    utt = UtteranceObjective(16, 16, layer="branch", pool="mean_std", proj_dim=8)
    loss, _ = utt(ObjectiveInputs(hidden=hidden[:3], branch=hidden[3:], feats=x, teacher=None, batch=_batch()))
    loss.backward()
    touched = {k.split(".")[0] for k, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"input_proj", "branch"}


@pytest.mark.parametrize("branch_input", ["shared", "own", "branch_only"])
def test_pretraining_runs_the_branch_once_per_view_not_per_mask_copy(branch_input):
    """mgf_forward hands the branch each distinct view once (U rows, not the K * U mask copies) and gives
    every copy its view's rows: the same blocks, and the same utterance-loss gradient, as running the
    branch on every copy."""
    from mgf_sb.batch import MGFCollate
    from mgf_sb.pretraining import mgf_forward
    from test_utterance_views import load_hparams

    hp = load_hparams(branch_layers=2, branch_input=branch_input, utterance_layer="branch")
    features, enc = hp["features"].train(), hp["encoder"].eval()  # eval encoder: no dropout, copies comparable
    target = hp["target"].attach(enc)
    torch.manual_seed(0)
    batch = MGFCollate(**hp["collate_args"])([{"id": str(i), "sig": torch.randn(32000)} for i in range(3)])
    U, M = batch.wavs.shape[0], batch.source.numel()
    assert M > U  # there are mask copies to save
    rows = []
    hook = enc.branch.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    x = mgf_forward(features, enc, target, batch, False, epoch=1)
    hook.remove()
    assert rows == [U]
    per_copy = enc(x.feats, batch.n_frames, mask=batch.input_mask)[enc.num_layers + 1 :]
    assert len(x.branch) == len(per_copy) == 2
    for once, every in zip(x.branch, per_copy):
        assert once.shape == every.shape == (M,) + once.shape[1:]
        torch.testing.assert_close(once, every)
    proj = enc.input_proj if enc.branch_proj is None else enc.branch_proj
    g_once = torch.autograd.grad(x.branch[-1].pow(2).sum(), proj.weight)[0]
    g_every = torch.autograd.grad(per_copy[-1].pow(2).sum(), proj.weight)[0]
    torch.testing.assert_close(g_once, g_every)


@pytest.mark.parametrize("kind", ["mlp", "own_proj"])
def test_a_stronger_trunk_adapter_starts_as_the_linear_one_and_leaves_the_projection_to_the_utterance_scale(kind):
    """trunk_adapter=mlp / own_proj: at init every output equals the linear adapter's (the residual starts
    at zero and is built last, so every other weight is drawn as before); the masked scales' gradient
    trains the residual and the adapter, never the input projection (the utterance scale's)."""
    lin, enc = encoder(branch_input="branch_only").train(), encoder(branch_input="branch_only",
                                                                       trunk_adapter=kind).train()
    assert enc.config["trunk_adapter"] == kind and "trunk_adapter" not in lin.config
    x, n = torch.randn(8, 30, 16), torch.tensor([30] * 8)
    mask = torch.rand(8, 30) < 0.3
    hidden = enc(x, n, mask=mask)
    for a, b in zip(lin(x, n, mask=mask), hidden):
        torch.testing.assert_close(a, b)
    params = [enc.input_proj.weight, enc.trunk_adapter.weight] + list(enc.trunk_residual.parameters())
    grads = torch.autograd.grad(sum(h.sum() for h in hidden[:3]), params, allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
    assert grads[-1].abs().sum() > 0 and grads[-2].abs().sum() > 0  # the residual's output layer learns
    # and it then changes what the trunk reads (a residual stuck at zero would be the linear adapter)
    with torch.no_grad():
        for p in enc.trunk_residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(enc(x, n, mask=mask)[1], lin(x, n, mask=mask)[1])


def test_a_stronger_trunk_adapter_needs_the_projection_given_to_the_branch():
    with pytest.raises(ValueError, match="branch_input=branch_only"):
        encoder(trunk_adapter="mlp")
    with pytest.raises(ValueError, match="branch_layers"):
        encoder(0, trunk_adapter="own_proj")
    with pytest.raises(ValueError, match="trunk_adapter must be one of"):
        encoder(branch_input="branch_only", trunk_adapter="deep")


def test_trunk_projection_grad_lets_that_share_of_the_masked_scales_gradient_into_the_projection():
    """trunk_projection_grad=s: the same outputs as branch_only's (s=0); a loss on the trunk's layers
    reaches the input projection with s times the gradient it has at s=1, none at s=0."""
    x, n = torch.randn(4, 30, 16), torch.tensor([30, 25, 20, 30])
    mask = torch.rand(4, 30) < 0.3
    grads = {}
    for share in (0.0, 0.1, 1.0):
        enc = encoder(branch_input="branch_only", trunk_projection_grad=share).train()
        hidden = enc(x, n, mask=mask)
        if share == 0.0:
            ref = [h.detach() for h in hidden]
            assert "trunk_projection_grad" not in enc.config
        for a, b in zip(ref, hidden):
            torch.testing.assert_close(a, b)
        g = torch.autograd.grad(sum(h.pow(2).sum() for h in hidden[:3]), enc.input_proj.weight, allow_unused=True)[0]
        grads[share] = torch.zeros_like(enc.input_proj.weight) if g is None else g
    assert float(grads[0.0].abs().sum()) == 0.0 and float(grads[1.0].abs().sum()) > 0
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0])
    with pytest.raises(ValueError, match="branch_input=branch_only"):
        encoder(trunk_projection_grad=0.1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        encoder(branch_input="branch_only", trunk_projection_grad=1.5)


def test_the_branch_pooling_is_mean_and_std():
    utt = UtteranceObjective(4, 4, layer="branch", pool="mean_std")
    h = torch.tensor([[[1.0, 0, 0, 0], [3.0, 0, 0, 0], [100.0, 0, 0, 0]]])
    pooled = utt.pooled(h, torch.tensor([2]))
    assert pooled.shape == (1, 8) and float(pooled[0, 0]) == 2.0 and abs(float(pooled[0, 4]) - 1.0) < 1e-6


def test_the_teacher_reads_the_trunk_only():
    enc = encoder()
    target = TargetNetwork(mode="online", top_k_layers=1)
    x, n = torch.randn(2, 30, 16), torch.tensor([30, 20])
    torch.testing.assert_close(target(enc, x, n), target.read(enc(x, n)[:3], n))


def test_wrong_pairings_stop_at_start_up_naming_the_fix():
    utt_branch = UtteranceObjective(16, 16, layer="branch")
    with pytest.raises(ValueError, match="branch_layers"):
        ScaleSet({"utterance": utt_branch}, {"utterance": True}, {"utterance": 1.0}, encoder=encoder(0))
    with pytest.raises(ValueError, match="utterance_layer=branch"):
        ScaleSet({"utterance": UtteranceObjective(16, 16)}, {"utterance": True}, {"utterance": 1.0},
                 encoder=encoder(3))
    with pytest.raises(ValueError, match="utterance_layer=branch"):  # the branch would never train
        ScaleSet({"utterance": utt_branch, "frame": FrameObjective(16, 16)}, {"utterance": False, "frame": True},
                 {"utterance": 1.0, "frame": 1.0}, encoder=encoder(3))
    ScaleSet({"utterance": utt_branch}, {"utterance": True}, {"utterance": 1.0}, encoder=encoder(3))
    with pytest.raises(ValueError, match="mean_std"):
        UtteranceObjective(16, 16, pool="max")
    with pytest.raises(ValueError, match="branch_layers must be >= 0"):
        encoder(-1)
    with pytest.raises(ValueError, match="branch_norm"):
        encoder(2, branch_norm="group")


def test_settings_accept_branch_and_refuse_a_typo():
    from mgf_sb.settings import RULES

    assert RULES["utterance_layer"].accepts("branch") and RULES["utterance_layer"].accepts(-1)
    assert not RULES["utterance_layer"].accepts("brunch") and not RULES["utterance_layer"].accepts(1.5)
    assert "or branch" in RULES["utterance_layer"].describe()


def test_new_keys_are_off_in_the_yaml_and_no_change_for_an_older_run():
    from mgf_sb.recipe import command_settings
    from mgf_sb.run_guard import ADDED_SETTINGS, settings_changes

    now = command_settings([os.path.join(REPO, "hparams", "mgf.yaml")])
    keys = ("branch_layers", "branch_norm", "branch_input", "trunk_adapter", "trunk_projection_grad", "utterance_pool")
    assert all(ADDED_SETTINGS[k] == now[k] for k in keys)
    assert settings_changes({k: v for k, v in now.items() if k not in keys}, now) == {}


def test_tiny_run_with_the_branch_trains_exports_and_loads_with_its_layers(recipe, small_corpus, tmp_path):  # noqa: F811
    """As a user runs it: pretraining with the branch, then the pretrained folder through
    speechbrain.inference (our interface) and the probes' Upstream: the branch's blocks are layers."""
    from mgf_sb.export import export
    from mgf_sb.inference import MGFEncoder as MGFEncoderInterface
    from mgf_sb.upstream import Upstream

    out = str(tmp_path / "branch")
    log = run(recipe, out, small_corpus, number_of_epochs=1, branch_layers=2, utterance_layer="branch",
              utterance_pool="mean_std", view_channel=True)
    assert np.isfinite(log[0]["train"]["utterance"]) and log[0]["train"]["utterance_grad_norm"] > 0
    folder = os.path.join(out, "pretrained")
    up = Upstream(folder)
    assert up.num_layers == 2 + 1 + 2
    wav = torch.randn(1, 16000)
    layers, n = up(wav, torch.ones(1))
    assert len(layers) == 5 and layers[-1].shape == layers[0].shape
    export(folder, str(tmp_path / "model"))
    enc = MGFEncoderInterface.from_hparams(source=str(tmp_path / "model"), savedir=str(tmp_path / "inf"))
    assert enc.num_layers == 5
    assert enc.encode_batch(wav, layer=None).shape[0] == 5
