"""Discrete units for the phoneme scale: HuBERT's target form (``phoneme_units``).

With span-vs-span InfoNCE a masked span must pick its own target among other
spans, and the teacher's target of a span carries its neighbourhood: the
context the student sees around the mask tells the positive from the
distractors (the context-only baseline scores 0.91 against the student's
0.93). Scored against a codebook of K discrete units instead (HuBERT, Hsu et
al., 2021), the distractors are the other *units*, not other positions, so
position and neighbourhood stop being clues: the prediction must say which
unit the span's content is.

- :func:`assign`: nearest centroid of each row (the unit of a span-pooled target);
- :class:`OnlineKMeans`: centroids fitted online on the span-pooled targets
  (k-means++ on the first batch, then mini-batch EMA k-means every training
  step, dead centroids re-seeded), identical on every DDP process and kept in
  the checkpoints as buffers;
- :func:`unit_logits`: cosine(prediction, unit embedding) / temperature over
  the K learned unit embeddings (fairseq ``HubertModel.compute_logits``);
- :func:`unit_stats`: the batch's unit perplexity and the no-network floor
  (the share of its most frequent unit).
"""

import torch
import torch.nn.functional as F

from mgf_sb.distributed import rank
from mgf_sb.objectives.bestrq import code_perplexity


def _ddp():
    """Under DDP: the tensors to all-reduce / broadcast are K x D on the module's device (nccl: CUDA,
    gloo: either), so they go to torch.distributed as they are, not through the float lists of
    :func:`mgf_sb.distributed.ddp_sum`."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def assign(x, centroids, chunk=4096):
    """Index of the nearest centroid (Euclidean) of each row, in float32, no gradient.

    argmin ||x - c||^2 = argmax (2 x.c - ||c||^2): no (N, K, D) difference
    tensor. Ties go to the lowest index (``argmax`` returns the first maximum):
    a duplicated centroid is never assigned (:meth:`OnlineKMeans.initialise`).

    Arguments
    ---------
    x : torch.Tensor
        (N, D) rows.
    centroids : torch.Tensor
        (K, D).
    chunk : int
        Rows scored at a time (bounds the (chunk, K) score matrix).

    Returns
    -------
    torch.LongTensor
        (N,) unit indices.

    Example
    -------
    >>> assign(torch.tensor([[0.1, 0.0], [2.9, 3.2]]), torch.tensor([[0.0, 0.0], [3.0, 3.0]])).tolist()
    [0, 1]
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        c = centroids.float()
        bias = c.pow(2).sum(-1)
        return torch.cat([(2 * part.float() @ c.T - bias).argmax(-1) for part in x.split(chunk)])


def unit_logits(pred, unit_embedding, temperature):
    """HuBERT's logits: cosine of each prediction with every unit embedding, / temperature.

    Arguments
    ---------
    pred : torch.Tensor
        (N, P) predictions (the head's output).
    unit_embedding : torch.Tensor
        (K, P) learned embeddings of the K units.
    temperature : float

    Returns
    -------
    torch.Tensor
        (N, K) logits, float32 (a cross-entropy against the unit index is the loss).

    Example
    -------
    >>> unit_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]), 0.5).tolist()
    [[2.0, 0.0]]
    """
    return F.normalize(pred.float(), dim=-1) @ F.normalize(unit_embedding.float(), dim=-1).T / float(temperature)


def unit_stats(units, n_units):
    """``unit_ppl`` (exp entropy of the batch's units: how many are in use) and ``unit_prior``
    (share of the most frequent unit: the accuracy of always predicting it, the no-network floor).

    >>> unit_stats(torch.tensor([0, 0, 1, 2]), 4)
    {'unit_ppl': 2.8284, 'unit_prior': 0.5}
    """
    if units.numel() == 0:
        return {"unit_ppl": 0.0, "unit_prior": 0.0}
    prior = float(torch.bincount(units, minlength=n_units).max()) / units.numel()
    return {"unit_ppl": code_perplexity(units, n_units), "unit_prior": prior}


def kmeans_pp(x, k):
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``k`` rows of ``x`` (N, D), N >= k.

    Each next seed is drawn with probability proportional to its squared
    distance from the nearest seed so far, so well-separated clusters each get
    a seed. Uses torch's global generator. Returns (k, D).
    """
    x = x.float()
    first = int(torch.randint(x.shape[0], (1,)))
    seeds = [x[first]]
    d2 = (x - x[first]).pow(2).sum(-1)
    for _ in range(1, k):
        p = d2.clamp(min=0) + 1e-12  # all zero (duplicate rows): uniform over them
        i = int(torch.multinomial(p / p.sum(), 1))
        seeds.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(-1))
    return torch.stack(seeds)


class OnlineKMeans(torch.nn.Module):
    """K centroids fitted online by mini-batch EMA k-means, kept as buffers.

    - **Initialisation** (the first :meth:`update` call): k-means++ seeds from
      that batch, then ``init_iters`` Lloyd iterations on it. A first batch with
      fewer rows than K (N < K) gives its N rows as N centroids and fills the
      K - N others with copies of them: a copy is never assigned (ties go to the
      lower index, :func:`assign`), so it is dead from the start and re-seeded
      from the next batches' rows by the rule below.
    - **Update** (every later call; VQ-VAE's EMA form), after re-seeding the
      dead units (below) on the batch's rows: with the batch's
      assignments, per-unit counts n_k and sums s_k (all-reduced under DDP),
      ``count = decay * count + (1 - decay) * n_k``, ``total = decay * total
      + (1 - decay) * s_k``, ``centroid = total / count``. An unused unit keeps
      its centroid (count and total shrink together).
    - **Dead units**: a unit whose running count falls below ``dead_fraction``
      of the mean count (used 100x less than a uniform share by default) is
      re-seeded on a row of the batch drawn with probability proportional to
      its squared distance from the nearest centroid (k-means++'s rule, seed
      after seed: rows of the clusters no unit covers), with the mean count.
      An unused unit's count falls below 1 % of the mean after
      log(0.01) / log(decay) steps (459 at 0.99). The rule does not undo a
      local optimum in which two units share a cluster (both used) while
      another cluster has none, e.g. after two first-batch rows from one
      cluster; a first batch of at least K rows avoids most of those.

    Every process keeps identical centroids under DDP: the counts and sums are
    all-reduced, and the random parts (initialisation, re-seeding) are done on
    process 0 and broadcast. The buffers (``centroids``, ``count``, ``total``,
    ``initialised``) are in the state dict, so a resumed run continues with
    the same units. The owner calls :meth:`update` in training mode only.

    Arguments
    ---------
    n_units : int
        K.
    dim : int
        D, the size of the rows clustered.
    decay : float
        EMA decay per update, in [0, 1) (0.99: a unit's centroid is about the
        mean of its rows over the last ~100 steps).
    dead_fraction : float
        Re-seed threshold, as a fraction of the mean running count.
    init_iters : int
        Lloyd iterations on the first batch after the k-means++ seeds.

    Example
    -------
    >>> torch.manual_seed(0) is not None
    True
    >>> km = OnlineKMeans(2, 1)
    >>> _ = km.update(torch.tensor([[0.0], [0.1], [5.0], [5.1]]))
    >>> sorted(round(v, 2) for v in km.centroids[:, 0].tolist())
    [0.05, 5.05]
    """

    def __init__(self, n_units, dim, decay=0.99, dead_fraction=0.01, init_iters=10):
        super().__init__()
        if int(n_units) < 2:
            raise ValueError(f"OnlineKMeans: n_units must be >= 2, got {n_units} (phoneme_n_units in hparams/mgf.yaml)")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"OnlineKMeans: decay must be in [0, 1), got {decay} (phoneme_units_decay in "
                             f"hparams/mgf.yaml)")
        self.n_units, self.dim = int(n_units), int(dim)
        self.decay, self.dead_fraction, self.init_iters = float(decay), float(dead_fraction), int(init_iters)
        self.register_buffer("centroids", torch.zeros(self.n_units, self.dim))
        self.register_buffer("count", torch.zeros(self.n_units))
        self.register_buffer("total", torch.zeros(self.n_units, self.dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def ready(self):
        return bool(self.initialised)

    def forward(self, x):
        """(N, D) -> (N,) unit of each row (:func:`assign`); needs an initialised codebook."""
        if not self.ready:
            raise RuntimeError("OnlineKMeans: no centroids yet (update() in training mode initialises them)")
        return assign(x, self.centroids)

    def _stats(self, x, units):
        """Per-unit counts (K,) and sums (K, D) of the rows, summed over the DDP processes."""
        n = torch.bincount(units, minlength=self.n_units).to(self.count.dtype)
        s = torch.zeros_like(self.total).index_add_(0, units, x.to(self.total.dtype))
        if _ddp():
            torch.distributed.all_reduce(n)
            torch.distributed.all_reduce(s)
        return n, s

    def _broadcast(self):
        """Process 0's buffers to every process (after its random initialisation / re-seeding)."""
        if _ddp():
            for buf in (self.centroids, self.count, self.total, self.initialised):
                torch.distributed.broadcast(buf, src=0)

    @torch.no_grad()
    def initialise(self, x):
        """First centroids from the rows ``x`` (N, D), N >= 1 (see the class notes)."""
        x = x.float()
        k = self.n_units
        if x.shape[0] >= k:
            c = kmeans_pp(x, k)
        else:  # N < K: every row a centroid, the rest copies (dead until re-seeded)
            c = torch.cat([x, x[torch.randint(x.shape[0], (k - x.shape[0],), device=x.device)]])
        for _ in range(self.init_iters if x.shape[0] >= k else 0):
            units = assign(x, c)
            n = torch.bincount(units, minlength=k).float()
            s = torch.zeros_like(c).index_add_(0, units, x)
            c = torch.where(n[:, None] > 0, s / n.clamp(min=1)[:, None], c)  # an empty unit keeps its seed
        n = torch.bincount(assign(x, c), minlength=k).float()
        self.centroids.copy_(c)
        self.count.copy_(n)
        self.total.copy_(c * n[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def reseed(self, x, units):
        """Re-seeds the dead units on rows of ``x`` far from their centroids; returns how many."""
        mean = self.count.mean()
        dead = (self.count < self.dead_fraction * mean).nonzero()[:, 0]
        if dead.numel() == 0 or x.shape[0] == 0:
            return 0
        x = x.float()
        d2 = (x - self.centroids[units]).pow(2).sum(-1)
        dead = dead[torch.randperm(dead.numel(), device=dead.device)[: x.shape[0]]]
        for k in dead.tolist():
            # k-means++'s rule, one seed at a time: the next seed is far from the previous ones too, so
            # several dead units spread over several uncovered clusters instead of landing in one
            p = d2.clamp(min=0) + 1e-12
            i = int(torch.multinomial(p / p.sum(), 1))
            self.centroids[k] = x[i]
            self.count[k] = mean
            self.total[k] = x[i] * mean
            d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(-1))
        return dead.numel()

    @torch.no_grad()
    def update(self, x, units=None):
        """One online step on the rows ``x`` (N, D): initialise (first call) or EMA update + re-seed.

        Arguments
        ---------
        x : torch.Tensor
            (N, D) this process's rows (N may be 0, and may differ between processes).
        units : torch.LongTensor, optional
            (N,) their units with the current centroids, when the caller has them.

        Returns
        -------
        int
            Units re-seeded (on process 0; all of them on the first call).
        """
        with torch.autocast(device_type=self.centroids.device.type, enabled=False):
            x = x.detach().float()
            if not self.ready:
                # process 0 initialises when it has rows; every process must agree on whether it did
                have = torch.tensor(float(x.shape[0]), device=self.centroids.device)
                if _ddp():
                    torch.distributed.broadcast(have, src=0)
                if float(have) == 0:
                    return 0
                if rank() == 0:
                    self.initialise(x)
                self._broadcast()
                return self.n_units
            units = assign(x, self.centroids) if units is None else units
            reseeded = 0
            # dead units first, so that this batch's rows go to the re-seeded units (re-seeding after the
            # update would first drag the few live units onto the means of several clusters each).
            # The dead set comes from all-reduced counts: every process agrees on whether to re-seed.
            if bool((self.count < self.dead_fraction * self.count.mean()).any()):
                reseeded = self.reseed(x, units) if rank() == 0 else 0
                self._broadcast()
                units = assign(x, self.centroids)
            n, s = self._stats(x, units)
            self.count.mul_(self.decay).add_(n, alpha=1 - self.decay)
            self.total.mul_(self.decay).add_(s, alpha=1 - self.decay)
            used = self.count > 0
            self.centroids[used] = self.total[used] / self.count[used, None]
            return reseeded
