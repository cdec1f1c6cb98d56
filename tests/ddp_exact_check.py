"""Run under torchrun (2 processes, gloo) by tests/test_reliability.py.

Checks that the DDP pieces of pretraining give exactly what one process with
the whole batch gives:

1. GlobalBatchNorm1d (outputs, input gradients, running statistics);
2. NT-Xent with keys gathered from every process: the loss, and the gradient
   of every parameter of a DDP-wrapped model (an encoder stand-in + the real
   UtteranceObjective), which needs the keys gathered *with* gradient;
3. the global normaliser's statistics (FeatureExtractor in training mode);
4. the data stream: after ``seed_data_stream`` the two processes draw
   different masks for the same items (and each the same as a single process
   seeded with its seed + rank).

Prints one line "rank OK" per process.
"""

import types

import torch
import torch.distributed as dist

import mgf_sb.distributed
from mgf_sb.batch import MGFCollate
from mgf_sb.distributed import (
    GlobalBatchNorm1d,
    end_process_group,
    gather_for_contrast,
    import_before_process_group,
    seed_data_stream,
)
from mgf_sb.features import FeatureExtractor
from mgf_sb.objectives.losses import nt_xent
from mgf_sb.objectives.utterance import UtteranceObjective

# The recipes' own start and end of a process group: without them DDP's lazy
# import pins the group and its gloo threads die in interpreter shutdown
# (SIGABRT after "OK", seen under load; see mgf_sb.distributed).
import_before_process_group()
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)

# 1. GlobalBatchNorm1d
X = torch.randn(8, 3) * 3 + 1
bn, ref = GlobalBatchNorm1d(3), torch.nn.BatchNorm1d(3)
x = X[r * 4 : (r + 1) * 4].clone().requires_grad_(True)
y = bn(x)
(y[:, 0] * torch.arange(4.0)).sum().backward()
Xr = X.clone().requires_grad_(True)
yr = ref(Xr)
(yr[:, 0] * torch.arange(4.0).repeat(2)).sum().backward()
assert torch.allclose(y, yr[r * 4 : (r + 1) * 4], atol=1e-5)
assert torch.allclose(x.grad, Xr.grad[r * 4 : (r + 1) * 4], atol=1e-5)
assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-5)
assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)

# 2a. NT-Xent loss value with gathered keys
Z = torch.randn(32, 8)
utt = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2)
partner = torch.arange(16) + 1 - 2 * (torch.arange(16) % 2)
single, _ = nt_xent(Z, torch.cat([partner, partner + 16]), 0.1, group=torch.cat([utt, utt + 4]))
keys, key_group, offset = gather_for_contrast(Z[r * 16 : (r + 1) * 16], utt)
local, _ = nt_xent(Z[r * 16 : (r + 1) * 16], partner, 0.1, group=key_group[offset : offset + 16], keys=keys,
                   key_group=key_group, offset=offset)
total = torch.tensor([local.item()])
dist.all_reduce(total)
assert abs(total.item() / 2 - single.item()) < 1e-4, (total.item() / 2, single.item())


# 2b. Gradient: DDP(encoder stand-in + UtteranceObjective) on half the batch each
#     = one process on the whole batch (the test that fails with detached keys).
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(6, 16)
        self.utt = UtteranceObjective(16, 6, proj_dim=8, temperature=0.1)

    def forward(self, h, n_frames, partner, utt_idx):
        hidden = [torch.tanh(self.enc(h))]
        batch = types.SimpleNamespace(n_frames=n_frames, partner=partner, utt=utt_idx)
        inputs = types.SimpleNamespace(hidden=hidden, feats=h, teacher=None, batch=batch)
        return self.utt(inputs)[0]


torch.manual_seed(1)
H = torch.randn(16, 5, 6)  # 16 views (8 utterances x 2), 5 frames
N = torch.tensor([5, 4, 3, 5, 2, 5, 4, 4] * 2)
P8 = torch.arange(8) + 1 - 2 * (torch.arange(8) % 2)
U8 = torch.arange(8) // 2
torch.manual_seed(2)
one = Model()
torch.manual_seed(2)
ddp = torch.nn.parallel.DistributedDataParallel(Model())
world_size = mgf_sb.distributed.world_size
mgf_sb.distributed.world_size = lambda: 1  # the reference: one process, no collective
single_loss = one(H, N, torch.cat([P8, P8 + 8]), torch.cat([U8, U8 + 4]))
single_loss.backward()
mgf_sb.distributed.world_size = world_size
rows = slice(r * 8, (r + 1) * 8)
loss = ddp(H[rows], N[rows], P8, U8)
loss.backward()
grads = {k: p.grad for k, p in ddp.module.named_parameters()}
for k, p in one.named_parameters():
    assert torch.allclose(grads[k], p.grad, atol=1e-5, rtol=1e-4), (k, (grads[k] - p.grad).abs().max().item())

# 3. Normaliser statistics: 2 steps of a global batch of 4 utterances, 2 per process,
#    against the mean / std of every valid fbank frame of the 8 utterances (both processes')
torch.manual_seed(3)
W = [torch.randn(4, 16000) * (1 + torch.arange(4.0))[:, None] for _ in range(2)]
lens = [torch.tensor([1.0, 0.5, 0.8, 0.3]), torch.tensor([0.6, 1.0, 0.9, 0.7])]
fe = FeatureExtractor(n_mels=8).train()
frames = []
for w, ln in zip(W, lens):
    part = ln[2 * r : 2 * r + 2]
    n = int(torch.round(part.max() * 16000))
    wav = w[2 * r : 2 * r + 2, :n] * (torch.arange(n)[None] < torch.round(part * 16000)[:, None])
    fe(wav, part / part.max(), epoch=1)  # each process pads its own batch
    fb = fe.fbank(wav)
    frames += [fb[i, : int(torch.round(part[i] * 16000)) // 160 + 1] for i in range(2)]
everyone = [None, None]
dist.all_gather_object(everyone, torch.cat(frames))
frames = torch.cat(everyone).double()
state = fe.normalizer_state()
assert int(state["count"]) == frames.shape[0], (state["count"], frames.shape[0])
assert torch.allclose(state["glob_mean"].double(), frames.mean(0), atol=1e-4)
assert torch.allclose(state["glob_std"].double(), frames.std(0, unbiased=False), atol=1e-3, rtol=1e-4)

# 4. Data stream: a different random stream per process
items = [{"id": f"u{i}", "sig": torch.ones(32000)} for i in range(4)]
collate = MGFCollate(crop_seconds=2.0, frame_mask_ratio=0.2, span_mask_ratio=0.3)
seed_data_stream(1986)
mask = collate(items).input_mask
masks = [torch.zeros_like(mask) for _ in range(2)]
dist.all_gather(masks, mask)
assert not torch.equal(masks[0], masks[1]), "both processes drew the same masks"
torch.manual_seed(1986 + r)
assert torch.equal(collate(items).input_mask, mask)

print(f"{r} OK", flush=True)
del ddp, loss  # they hold the process group: end_process_group joins its threads only once it is free
assert end_process_group() == [], "gloo threads outlive the process group"
