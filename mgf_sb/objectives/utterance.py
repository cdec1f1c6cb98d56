"""Utterance scale (1 s and longer): two views of one utterance must agree.

The views are the two disjoint halves of each crop, already in the batch as
separate sequences (see :mod:`mgf_sb.batch`), so this objective costs a pooling
and a small MLP. The projection needs BatchNorm, or NT-Xent sits at chance.
"""

import torch

from mgf_sb.distributed import GlobalBatchNorm1d, gather_for_contrast
from mgf_sb.objectives.losses import nt_xent, regression_loss
from mgf_sb.target import layer_norm_target, teacher_slot


def masked_mean(x, n_frames):
    """(M, T, C) -> (M, C) mean over each sequence's valid frames."""
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < n_frames[:, None]).to(x.dtype)
    return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def masked_mean_std(x, n_frames):
    """(M, T, C) -> (M, 2C) mean and standard deviation over valid frames."""
    mean = masked_mean(x, n_frames)
    var = masked_mean((x - mean[:, None]) ** 2, n_frames)
    return torch.cat([mean, var.clamp(min=1e-8).sqrt()], -1)


class AttentivePool(torch.nn.Module):
    """The utterance scale's own small branch: a frame-wise projection, then attention pooling.

    It gives the utterance loss parameters of its own between the shared layer
    and the pooled vector, so "which recording is this" can be read out by the
    branch instead of being written into the shared layer's every frame.

    Arguments
    ---------
    d_model : int

    Example
    -------
    >>> pool = AttentivePool(8)
    >>> pool(torch.randn(3, 5, 8), torch.tensor([5, 2, 1])).shape
    torch.Size([3, 8])
    """

    def __init__(self, d_model):
        super().__init__()
        self.frame = torch.nn.Sequential(torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, d_model),
                                         torch.nn.GELU())
        self.score = torch.nn.Linear(d_model, 1)

    def forward(self, x, n_frames):
        """(M, T, D), (M,) valid frames -> (M, D) attention-weighted mean of the projected frames."""
        h = self.frame(x)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < n_frames[:, None]
        w = self.score(h).squeeze(-1).float().masked_fill(~valid, float("-inf"))
        w = torch.softmax(w, dim=1).nan_to_num(0.0).to(h.dtype)  # a sequence with no frame pools to 0
        return (w[..., None] * h).sum(1)


def byol_loss(pred, target):
    """BYOL's loss (Grill et al., 2020): the normalised MSE ``||p/|p| - t/|t| ||^2 = 2 - 2 cos(p, t)``,
    mean over rows; ``target`` is detached here (the stop-gradient side).

    >>> x = torch.randn(3, 4)
    >>> float(byol_loss(x, 2 * x)) < 1e-6, round(float(byol_loss(x, -x)), 4)
    (True, 4.0)
    """
    p = torch.nn.functional.normalize(pred.float(), dim=-1)
    t = torch.nn.functional.normalize(target.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p * t).sum(-1)).mean()


def same_speaker_share(speaker, negative):
    """Share of the negative pairs whose two utterances have the same known speaker.

    Arguments
    ---------
    speaker : torch.LongTensor
        (M,) speaker of each row, -1 unknown.
    negative : torch.BoolTensor
        (M, M) ``[i, j]``: row ``j`` is a negative of query ``i``.

    Returns
    -------
    float or None
        Over the negative pairs whose two speakers are known; None when there is none.

    >>> neg = ~torch.eye(3, dtype=torch.bool)
    >>> same_speaker_share(torch.tensor([0, 0, 1]), neg), same_speaker_share(torch.tensor([-1, -1, 2]), neg)
    (0.3333333333333333, None)
    """
    known = (speaker[:, None] >= 0) & (speaker[None, :] >= 0) & negative
    n = int(known.sum())
    if n == 0:
        return None
    return int((known & (speaker[:, None] == speaker[None, :])).sum()) / n


class UtteranceObjective(torch.nn.Module):
    """Discriminative (default) or generative utterance-level objective.

    Arguments
    ---------
    d_model, feat_dim : int
    loss : str
        ``infonce`` (NT-Xent between the two views, negatives = the other
        utterances' views) or ``l1`` / ``l2`` (generative: predict a statistic
        of the *other* view) or ``cosine`` (with ``teacher``: BYOL's normalised MSE,
        :func:`byol_loss`). With the ``teacher`` target the form is BYOL's, no negatives:
        the online predictor (the projection MLP on the student's pooled view) predicts the
        stop-gradient EMA teacher's pooled output of the *other* view (both directions), so
        utterances of one speaker in a batch are never pushed apart.
    target : str
        ``other_view`` (with infonce), ``fbank`` (the other view's log-Mel mean
        and std) or ``teacher`` (the other view's pooled target-network output),
        the last two with l1/l2.
    layer : int or str
        Encoder layer pooled (-1: last), or ``branch``: the last block of the
        encoder's own utterance branch (``branch_layers``; :class:`~mgf_sb.encoder.TDNNBranch`),
        which shares only the input projection with the masked scales' layers.
    proj_dim : int
    temperature : float
    branch : str
        ``none`` (mean of the layer's frames, then the projection MLP) or
        ``attentive`` (its own :class:`AttentivePool` branch on the layer first).
    queue_size : int
        infonce: also contrast against the last ``queue_size`` view embeddings
        of earlier training batches (a MoCo-style queue of detached negatives;
        0: the batch's own views only, gathered over DDP processes).
    pool : str
        ``mean`` (the frames' mean) or ``mean_std`` (mean and standard deviation, as
        x-vectors pool: a speaker's spread over time is part of the voice); the
        ``attentive`` branch pools its own way and takes ``mean`` only.
    """

    def __init__(self, d_model, feat_dim, loss="infonce", target="other_view", layer=-1, proj_dim=256, temperature=0.1,
                 branch="none", queue_size=0, pool="mean"):
        super().__init__()
        ok = {("infonce", "other_view"), ("l1", "fbank"), ("l2", "fbank"), ("l1", "teacher"), ("l2", "teacher"),
              ("cosine", "teacher")}
        if (loss, target) not in ok:
            raise ValueError(
                f"utterance_loss={loss!r} with utterance_target={target!r} is not supported (hparams/mgf.yaml); "
                f"use one of " + ", ".join(f"utterance_loss={a} utterance_target={b}" for a, b in sorted(ok))
            )
        if branch not in ("none", "attentive"):
            raise ValueError(f"utterance_branch must be 'none' or 'attentive', got {branch!r}")
        if pool not in ("mean", "mean_std") or (pool == "mean_std" and branch == "attentive"):
            raise ValueError(f"utterance_pool must be 'mean' or 'mean_std' ('mean' with utterance_branch=attentive), "
                             f"got {pool!r} (hparams/mgf.yaml)")
        if not (layer == "branch" or isinstance(layer, int)):
            raise ValueError(f"utterance_layer must be an encoder output index or 'branch', got {layer!r} "
                             f"(hparams/mgf.yaml)")
        if int(queue_size) < 0:
            raise ValueError(f"utterance_queue_size must be >= 0, got {queue_size}")
        self.loss_type, self.target, self.layer = loss, target, layer
        self.temperature = temperature
        self.pool = AttentivePool(d_model) if branch == "attentive" else None
        self.pool_std = pool == "mean_std"
        out_dim = {"other_view": proj_dim, "fbank": 2 * feat_dim, "teacher": d_model}[target]
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(2 * d_model if self.pool_std else d_model, d_model),
            GlobalBatchNorm1d(d_model),  # global batch statistics under DDP
            torch.nn.ReLU(),
            torch.nn.Linear(d_model, out_dim),
        )
        self.queue_size = int(queue_size) if loss == "infonce" else 0
        # Not saved: a resumed run refills it within queue_size / batch views steps.
        self.register_buffer("queue", torch.zeros(self.queue_size, out_dim), persistent=False)
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long), persistent=False)

    teacher_slots = (0, 1)  # this scale's target among the teacher's (see MaskedPrediction)

    @property
    def needs_teacher(self):
        return self.target == "teacher"

    def pooled(self, hidden, n_frames):
        """(M, T, D) encoder layer -> (M, D) pooled view (before the projection MLP)."""
        if self.pool is not None:
            return self.pool(hidden, n_frames)
        return masked_mean_std(hidden, n_frames) if self.pool_std else masked_mean(hidden, n_frames)

    def layer_of(self, inputs):
        """The (M, T, D) encoder output this scale pools (``layer``)."""
        if self.layer != "branch":
            return inputs.hidden[self.layer]
        if not inputs.branch:
            raise ValueError("utterance_layer=branch reads the encoder's utterance branch, but the encoder has "
                             "none: set branch_layers (e.g. --branch_layers=4) in hparams/mgf.yaml")
        return inputs.branch[-1]

    @torch.no_grad()
    def _enqueue(self, keys):
        """Pushes (Mk, D) detached keys into the queue, oldest out."""
        k = keys.detach().to(self.queue.dtype)[-self.queue_size :]
        self.queue.copy_(torch.cat([k, self.queue])[: self.queue_size])
        self.queue_len.fill_(min(int(self.queue_len) + k.shape[0], self.queue_size))

    def forward(self, inputs):
        """Returns ``(loss, stats)``; see :class:`~mgf_sb.objectives.base.ObjectiveInputs`."""
        batch = inputs.batch
        n = batch.n_frames.to(inputs.feats.device)
        hidden = self.layer_of(inputs)
        partner = batch.partner.to(hidden.device)
        has = partner >= 0
        if hidden.shape[0] < 2 and not bool(has.any()):  # one view alone (BatchNorm needs two): no loss
            zero = hidden.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.parameters())
            return zero, {"pairs": 0.0}
        z = self.proj(self.pooled(hidden, n))  # (M, out_dim)
        if self.loss_type == "infonce":
            # Negatives from every DDP process, so the loss does not depend on their number.
            keys, key_group, offset = gather_for_contrast(z, batch.utt)
            own_group = key_group[offset : offset + z.shape[0]]  # made unique across processes
            all_keys, all_group = keys, key_group
            n_queue = int(self.queue_len)
            if n_queue > 0:  # earlier batches' views: never the partner, never the same utterance
                q_group = key_group.max() + 1 + torch.arange(n_queue, device=key_group.device)
                all_keys = torch.cat([keys, self.queue[:n_queue].to(keys.dtype)])
                all_group = torch.cat([key_group, q_group])
            if self.queue_size > 0 and self.training:
                self._enqueue(keys)
            if not bool(has.any()):  # no view has a partner here (e.g. every crop shorter than two views)
                return z.sum() * 0.0, {"pairs": 0.0}
            loss, acc = nt_xent(z, partner, self.temperature, group=own_group, keys=all_keys, key_group=all_group,
                                offset=offset)
            negatives = float((all_group[None, :] != own_group[has][:, None]).sum(1).float().mean())
            stats = {"acc": float(acc), "pairs": float(has.sum()), "negatives": negatives}
            return loss, self._speaker_stats(batch, has, stats)
        if not bool(has.any()):
            return z.sum() * 0.0, {"pairs": 0.0}
        if self.target == "fbank":
            tgt = masked_mean_std(inputs.feats, n)
        else:
            tgt = layer_norm_target(masked_mean(teacher_slot(inputs.teacher, *self.teacher_slots), n))
        if self.loss_type == "cosine":
            loss = byol_loss(z[has], tgt[partner[has]])
        else:
            loss = regression_loss(z[has], tgt[partner[has]].detach(), self.loss_type)
        return loss, self._speaker_stats(batch, has, {"pairs": float(has.sum())})

    @staticmethod
    def _speaker_stats(batch, has, stats):
        """Adds ``same_speaker_negatives``: the share of this process's in-batch negative pairs
        (a view with a partner against another utterance's row) whose two utterances have the same
        known speaker: NT-Xent pushes those apart; the non-contrastive forms have no negatives and
        log what the contrastive form would face on the same batches. The queue's and the other
        processes' rows carry no speaker here. Absent when no speaker is known."""
        speaker = getattr(batch, "speaker", None)
        if speaker is None:
            return stats
        utt = batch.utt.to(has.device)
        share = same_speaker_share(speaker.to(has.device), has[:, None] & (utt[:, None] != utt[None, :]))
        if share is not None:
            stats["same_speaker_negatives"] = share
        return stats
