"""Run under torchrun (2 processes, gloo) by tests/test_reliability.py.

Checks that the DDP pieces of the utterance scale give exactly what one
process with the whole batch gives: GlobalBatchNorm1d (outputs, input
gradients, running statistics) and NT-Xent with keys gathered from every
process. Prints one line "rank OK" per process.
"""

import torch
import torch.distributed as dist

from mgf_sb.distributed import GlobalBatchNorm1d, gather_for_contrast
from mgf_sb.objectives.losses import nt_xent

dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)

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
print(f"{r} OK", flush=True)
dist.destroy_process_group()
