"""Utterance scale (1 s and longer): two views of one utterance must agree.

The views are the two disjoint halves of each crop, already in the batch as
separate sequences (see :mod:`mgf_sb.batch`), so this objective costs a pooling
and a small MLP. The projection needs BatchNorm, or NT-Xent sits at chance.
"""

import torch

from mgf_sb.distributed import GlobalBatchNorm1d, gather_for_contrast
from mgf_sb.objectives.losses import nt_xent, regression_loss
from mgf_sb.target import layer_norm_target


def masked_mean(x, n_frames):
    """(M, T, C) -> (M, C) mean over each sequence's valid frames."""
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < n_frames[:, None]).to(x.dtype)
    return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def masked_mean_std(x, n_frames):
    """(M, T, C) -> (M, 2C) mean and standard deviation over valid frames."""
    mean = masked_mean(x, n_frames)
    var = masked_mean((x - mean[:, None]) ** 2, n_frames)
    return torch.cat([mean, var.clamp(min=1e-8).sqrt()], -1)


class UtteranceObjective(torch.nn.Module):
    """Discriminative (default) or generative utterance-level objective.

    Arguments
    ---------
    d_model, feat_dim : int
    loss : str
        ``infonce`` (NT-Xent between the two views, negatives = the other
        utterances' views) or ``l1`` / ``l2`` (generative: predict a statistic
        of the *other* view).
    target : str
        ``other_view`` (with infonce), ``fbank`` (the other view's log-Mel mean
        and std) or ``teacher`` (the other view's pooled target-network output),
        the last two with l1/l2.
    layer : int
        Encoder layer pooled (-1: last).
    proj_dim : int
    temperature : float
    """

    def __init__(self, d_model, feat_dim, loss="infonce", target="other_view", layer=-1, proj_dim=256, temperature=0.1):
        super().__init__()
        ok = {("infonce", "other_view"), ("l1", "fbank"), ("l2", "fbank"), ("l1", "teacher"), ("l2", "teacher")}
        if (loss, target) not in ok:
            raise ValueError(
                f"UtteranceObjective: loss={loss!r} with target={target!r} is not supported; "
                f"use one of {sorted(ok)}"
            )
        self.loss_type, self.target, self.layer = loss, target, layer
        self.temperature = temperature
        out_dim = {"other_view": proj_dim, "fbank": 2 * feat_dim, "teacher": d_model}[target]
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(d_model, d_model),
            GlobalBatchNorm1d(d_model),  # global batch statistics under DDP
            torch.nn.ReLU(),
            torch.nn.Linear(d_model, out_dim),
        )

    @property
    def needs_teacher(self):
        return self.target == "teacher"

    def forward(self, inputs):
        """Returns ``(loss, stats)``; see :class:`~mgf_sb.objectives.base.ObjectiveInputs`."""
        batch = inputs.batch
        n = batch.n_frames.to(inputs.feats.device)
        z = self.proj(masked_mean(inputs.hidden[self.layer], n))  # (M, out_dim)
        partner = batch.partner
        if self.loss_type == "infonce":
            # Negatives from every DDP process, so the loss does not depend on their number.
            keys, key_group, offset = gather_for_contrast(z, batch.utt)
            own_group = key_group[offset : offset + z.shape[0]]  # made unique across processes
            loss, acc = nt_xent(z, partner, self.temperature, group=own_group, keys=keys, key_group=key_group,
                                offset=offset)
            return loss, {"acc": float(acc)}
        has = partner >= 0
        if self.target == "fbank":
            tgt = masked_mean_std(inputs.feats, n)
        else:
            tgt = layer_norm_target(masked_mean(inputs.teacher, n))
        loss = regression_loss(z[has], tgt[partner[has]].detach(), self.loss_type)
        return loss, {}
