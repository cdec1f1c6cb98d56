"""Loss functions shared by the per-scale objectives.

Everything is vectorised over units (frames, spans or utterance views) and is
computed in float32 whatever the autocast dtype: similarities divided by a small
temperature and L1 sums overflow or lose precision in fp16/bf16.
"""

import torch
import torch.nn.functional as F


def regression_loss(pred, target, kind="l1"):
    """Generative loss between predictions and targets.

    Arguments
    ---------
    pred, target : torch.Tensor
        (N, D) predictions and (stop-gradient) targets.
    kind : str
        ``"l1"`` or ``"l2"``.

    Returns
    -------
    torch.Tensor
        Scalar, mean over units and dimensions.
    """
    pred, target = pred.float(), target.float()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown regression loss {kind!r}; use 'l1' or 'l2'")


def sample_negatives(group, n_same, n_any, generator=None, exclude_group=None, position=None, radius=None):
    """Draws distractor indices for each unit, without the unit itself.

    Units are flattened in group order (all units of sequence 0, then 1, ...),
    as ``tensor[mask]`` produces them.

    Arguments
    ---------
    group : torch.LongTensor
        (N,) sorted group (sequence) index of each unit.
    n_same : int
        Distractors drawn from the same group (the hard ones: same voice).
    n_any : int
        Distractors drawn from the units of the batch outside the unit's
        ``exclude_group``.
    generator : torch.Generator, optional
    exclude_group : torch.LongTensor, optional
        (N,) source utterance of each unit (any order): batch distractors never
        share it. The other mask copies and the other view of the same
        utterance hold spans of the same speech over the same teacher output,
        which may overlap the positive in time. None: only the unit itself
        is excluded.
    position, radius : torch.Tensor and float, optional
        (N,) position of each unit in its sequence (e.g. a span's centre, in
        frames) and a distance: the same-group distractors are then drawn only
        among the units of the same group within ``radius`` of the unit (they
        share its context, so the context alone does not tell them apart),
        uniformly and without repetition; when fewer than ``n_same`` exist the
        rest are invalid. None: uniformly from the whole group, with repetition.

    Returns
    -------
    idx : torch.LongTensor
        (N, n_same + n_any) indices into the N units.
    valid : torch.BoolTensor
        (N, n_same + n_any); False where no distractor exists (a group with a
        single unit has no same-group distractor; a batch of a single
        utterance has no batch distractor).
    """
    N = group.shape[0]
    device = group.device
    own = torch.arange(N, device=device)
    parts, valids = [], []
    if n_same > 0 and position is not None and radius is not None:
        idx, ok = _nearby_negatives(group, position, float(radius), n_same, generator)
        parts.append(idx)
        valids.append(ok)
    elif n_same > 0:
        counts = torch.bincount(group)
        offset = counts.cumsum(0) - counts  # first unit of each group
        n_grp = counts[group]  # (N,)
        local = own - offset[group]
        r = (torch.rand(N, n_same, generator=generator).to(device) * (n_grp[:, None] - 1).clamp(min=0)).long()
        r = r + (r >= local[:, None]).long()  # skip the unit itself
        parts.append(offset[group][:, None] + r.clamp(max=(n_grp[:, None] - 1)))
        valids.append((n_grp[:, None] > 1).expand(N, n_same))
    if n_any > 0:
        ex = own if exclude_group is None else exclude_group.to(device).long()
        # Units sorted by excluded group: the allowed units of unit i are the
        # sorted positions outside its own group's block [first, first + count).
        order = torch.sort(ex, stable=True).indices
        _, inverse, counts = torch.unique(ex, return_inverse=True, return_counts=True)
        first = (counts.cumsum(0) - counts)[inverse]  # (N,) block start of each unit's group
        blocked = counts[inverse]
        allowed = N - blocked  # (N,)
        r = (torch.rand(N, n_any, generator=generator).to(device) * allowed[:, None]).long()
        r = torch.minimum(r, (allowed[:, None] - 1).clamp(min=0))
        r = r + (r >= first[:, None]).long() * blocked[:, None]  # jump over the own block
        parts.append(order[r.clamp(max=max(N - 1, 0))])
        valids.append((allowed[:, None] > 0).expand(N, n_any))
    if not parts:
        raise ValueError("a contrastive loss needs at least one distractor (n_same + n_any > 0)")
    return torch.cat(parts, 1), torch.cat(valids, 1)


def _nearby_negatives(group, position, radius, n, generator=None):
    """Up to ``n`` distinct distractors per unit among its group's units within ``radius`` (uniform).

    Returns ``(idx, valid)``, each (N, n); see :func:`sample_negatives`.
    """
    N, device = group.shape[0], group.device
    pos = position.to(device).double()
    span = float(pos.max() - pos.min()) + 2 * radius + 1 if N > 0 else 1.0
    key = group.double() * span + (pos - (pos.min() if N > 0 else 0))  # groups far apart on one axis
    order = torch.sort(key, stable=True).indices
    skey = key[order]
    lo = torch.searchsorted(skey, skey - radius, side="left")
    hi = torch.searchsorted(skey, skey + radius, side="right")
    W = int((hi - lo).max()) if N > 0 else 0
    cand = lo[:, None] + torch.arange(W, device=device)[None, :]  # (N, W) sorted positions
    ok = (cand < hi[:, None]) & (cand != torch.arange(N, device=device)[:, None])
    score = torch.rand(N, W, generator=generator).to(device).masked_fill(~ok, -1.0)
    top = score.topk(min(n, W), dim=1)
    pick = cand.gather(1, top.indices).clamp(max=max(N - 1, 0))
    valid = top.values >= 0
    if pick.shape[1] < n:  # fewer candidates than asked anywhere in the batch
        fill = n - pick.shape[1]
        pick = torch.cat([pick, torch.zeros(N, fill, dtype=torch.long, device=device)], 1)
        valid = torch.cat([valid, torch.zeros(N, fill, dtype=torch.bool, device=device)], 1)
    # back from sorted positions to unit indices, rows in unit order
    idx = torch.empty_like(pick)
    idx[order] = order[pick]
    out_valid = torch.empty_like(valid)
    out_valid[order] = valid
    return idx * out_valid, out_valid


def contrast_logits(query, keys, negatives_idx, negatives_valid):
    """Cosine similarity of each query to its own key (column 0) and its distractors.

    Arguments
    ---------
    query, keys : torch.Tensor
        (N, D) each; key n is the positive of query n.
    negatives_idx, negatives_valid :
        (N, K) from :func:`sample_negatives`.

    Returns
    -------
    torch.Tensor
        (N, 1 + K) float32 similarities; -inf for missing distractors and for
        a distractor identical to the key (e.g. a repeated frame).
    """
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    pos = (q * k).sum(-1, keepdim=True)  # (N, 1)
    neg = torch.einsum("nd,nkd->nk", q, k[negatives_idx])  # (N, K)
    same = (k[negatives_idx] == k[:, None, :]).all(-1)
    neg = neg.masked_fill(~negatives_valid | same, float("-inf"))
    return torch.cat([pos, neg], 1)


def contrast_accuracy(query, keys, negatives_idx, negatives_valid):
    """Fraction of queries whose own key scores highest among the distractors (no projection).

    Used for the context-only baseline: the teacher's encoding of the masked
    input as the query, its encoding of the unmasked input as the keys.
    """
    if query.shape[0] == 0:
        return 0.0
    return float((contrast_logits(query, keys, negatives_idx, negatives_valid).argmax(1) == 0).float().mean())


def info_nce(query, positive, negatives_idx, negatives_valid, temperature):
    """InfoNCE with cosine similarity: pick the own target among distractors.

    Arguments
    ---------
    query : torch.Tensor
        (N, D) predictions.
    positive : torch.Tensor
        (N, D) targets; target n is the positive of query n and the
        distractors of query n are ``positive[negatives_idx[n]]``.
    negatives_idx : torch.LongTensor
        (N, K) distractor indices (from :func:`sample_negatives`).
    negatives_valid : torch.BoolTensor
        (N, K) which distractors exist.
    temperature : float

    Returns
    -------
    loss : torch.Tensor
        Scalar cross-entropy with the positive at index 0.
    accuracy : torch.Tensor
        Scalar fraction of units whose positive scores highest.
    """
    # A distractor identical to the target (e.g. a repeated frame) is no distractor.
    logits = contrast_logits(query, positive, negatives_idx, negatives_valid) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(1) == 0).float().mean()
    return loss, accuracy


def nt_xent(z, partner, temperature, group=None, keys=None, key_group=None, offset=0):
    """NT-Xent (SimCLR): each view must find its partner among all other views.

    Arguments
    ---------
    z : torch.Tensor
        (M, D) view embeddings (the queries).
    partner : torch.LongTensor
        (M,) index of the other view of the same utterance (-1: none, ignored).
    temperature : float
    group : torch.LongTensor, optional
        (M,) utterance of each view: other sequences of the same utterance
        (e.g. other mask copies) are neither positives nor negatives.
    keys : torch.Tensor, optional
        (Mk, D) the candidates, when they are more than ``z`` (under DDP: every
        process's views, ``z`` itself at rows ``offset:offset + M``).
    key_group : torch.LongTensor, optional
        (Mk,) utterance of each key (with ``keys`` and ``group``).
    offset : int
        Row of ``z[0]`` in ``keys``; ``partner`` indexes ``z``.

    Returns
    -------
    loss : torch.Tensor
        Scalar mean cross-entropy over views that have a partner.
    accuracy : torch.Tensor
        Scalar fraction of those views whose partner scores highest.
    """
    q = F.normalize(z.float(), dim=-1)
    k = q if keys is None else F.normalize(keys.float(), dim=-1)
    sim = q @ k.t() / temperature  # (M, Mk)
    M = q.shape[0]
    rows = torch.arange(M, device=q.device)
    has = partner >= 0
    if not bool(has.any()):
        raise ValueError("nt_xent needs at least one pair of views in the batch")
    target = partner.clamp(min=0) + offset
    exclude = torch.zeros_like(sim, dtype=torch.bool)
    exclude[rows, rows + offset] = True
    if group is not None:
        kg = group if keys is None else key_group
        exclude |= group[:, None] == kg[None, :]
    exclude[rows, target] = False
    sim = sim.masked_fill(exclude, float("-inf"))
    logits, labels = sim[has], target[has]
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(1) == labels).float().mean()
    return loss, accuracy
