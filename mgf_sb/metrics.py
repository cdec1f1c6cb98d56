"""Speaker-verification metrics: EER and minDCF, vectorised (one sort).

SpeechBrain's ``speechbrain.utils.metric_stats.EER`` loops over every
threshold in Python and its ``minDCF`` builds an (n_scores x n_thresholds)
matrix, which is too slow / too large for the 37,611 VoxCeleb1-O trials. Both
functions here sort the scores once and read every operating point off
cumulative sums, so they cost O(n log n).

Convention: a trial is *accepted* when ``score >= threshold``; tied scores
always fall on the same side of a threshold.
"""

import torch


def _as_1d(x):
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if not torch.isfinite(x).all():
        raise ValueError("scores contain NaN or Inf")
    return x


def det_curve(positive_scores, negative_scores):
    """Every operating point (miss and false-alarm rates) of a score set.

    Arguments
    ---------
    positive_scores : array-like
        Scores of target (same-speaker) trials.
    negative_scores : array-like
        Scores of non-target (different-speaker) trials.

    Returns
    -------
    p_miss : torch.Tensor
        (K,) false-rejection rate at each threshold, increasing from 0 to 1.
    p_fa : torch.Tensor
        (K,) false-acceptance rate at each threshold, decreasing from 1 to 0.
    thresholds : torch.Tensor
        (K,) the thresholds (``-inf`` first: accept everything; ``+inf`` last).

    Example
    -------
    >>> p_miss, p_fa, t = det_curve([0.9, 0.4], [0.1, 0.5])
    >>> p_miss.tolist(), p_fa.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [1.0, 0.5, 0.5, 0.0, 0.0])
    """
    pos, neg = _as_1d(positive_scores), _as_1d(negative_scores)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(
            f"need at least one target and one non-target trial (got {pos.numel()} and {neg.numel()})"
        )
    scores = torch.cat([pos, neg])
    is_target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    scores, order = torch.sort(scores)
    is_target = is_target[order]
    # Thresholds between distinct scores only: rejecting the first k sorted trials.
    last_of_run = torch.ones_like(scores, dtype=torch.bool)
    last_of_run[:-1] = scores[1:] != scores[:-1]
    rejected_targets = torch.cumsum(is_target, 0)[last_of_run]
    rejected_nontargets = torch.cumsum(1 - is_target, 0)[last_of_run]
    zero = torch.zeros(1, dtype=torch.float64)
    p_miss = torch.cat([zero, rejected_targets / pos.numel()])
    p_fa = 1 - torch.cat([zero, rejected_nontargets / neg.numel()])
    uniq = scores[last_of_run]
    # Rejecting up to uniq[i] means accepting from the next distinct score on.
    thresholds = torch.cat([torch.tensor([-float("inf")], dtype=torch.float64), uniq[1:],
                            torch.tensor([float("inf")], dtype=torch.float64)])
    return p_miss, p_fa, thresholds


def compute_eer(positive_scores, negative_scores):
    """Equal error rate, interpolated linearly between operating points.

    The EER is where the miss rate equals the false-alarm rate on the DET
    curve drawn with straight segments between operating points (what
    ``scipy.optimize.brentq`` on sklearn's ``roc_curve`` gives).

    Returns
    -------
    eer : float
        In [0, 1].
    threshold : float
        The threshold of the operating point nearest the crossing.

    Example
    -------
    >>> compute_eer([0.6, 0.7, 0.8, 0.5], [0.4, 0.3, 0.2, 0.1])[0]
    0.0
    >>> round(compute_eer([2.0, 3.0, 4.0], [1.0, 2.5])[0], 4)  # 1 miss in 3, 1 false alarm in 2
    0.3333
    """
    p_miss, p_fa, thresholds = det_curve(positive_scores, negative_scores)
    diff = p_fa - p_miss  # decreasing from 1 to -1
    i = int(torch.nonzero(diff <= 0)[0])  # first point with miss >= false alarm (i >= 1)
    d0, d1 = diff[i - 1], diff[i]
    a = d0 / (d0 - d1)  # d0 > 0 >= d1
    eer = p_miss[i - 1] + a * (p_miss[i] - p_miss[i - 1])
    j = i if a >= 0.5 else i - 1
    return float(eer), float(thresholds[j])


def compute_min_dcf(positive_scores, negative_scores, p_target=0.01, c_miss=1.0, c_fa=1.0, normalize=True):
    """Minimum detection cost over all thresholds.

    ``C_det = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)``;
    with ``normalize`` (default, as in the VoxCeleb challenges and Kaldi's
    ``compute_min_dcf.py``) it is divided by ``min(c_miss * p_target,
    c_fa * (1 - p_target))``, the cost of the best trivial system, so 1.0
    means "no better than always accepting or always rejecting".

    Returns
    -------
    min_dcf : float
    threshold : float

    Example
    -------
    >>> compute_min_dcf([0.6, 0.7], [0.4, 0.3])[0]
    0.0
    >>> compute_min_dcf([1.0, 3.0], [2.0, 0.0], p_target=0.5)[0]
    0.5
    """
    p_miss, p_fa, thresholds = det_curve(positive_scores, negative_scores)
    c_det = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    if normalize:
        c_det = c_det / min(c_miss * p_target, c_fa * (1 - p_target))
    k = int(torch.argmin(c_det))
    return float(c_det[k]), float(thresholds[k])


def cosine_scores(enrol, test, center=None):
    """Cosine similarity of paired embeddings.

    Arguments
    ---------
    enrol, test : torch.Tensor
        (N, D) embeddings of each trial's two sides.
    center : torch.Tensor, optional
        (D,) vector subtracted from both first (e.g. the mean embedding).

    Returns
    -------
    torch.Tensor
        (N,) scores in [-1, 1].
    """
    if center is not None:
        enrol, test = enrol - center, test - center
    return torch.nn.functional.cosine_similarity(enrol, test, dim=-1)
