"""Phoneme scale (~50-200 ms spans): the masked "language model" made continuous.

Each masked span's pooled output must pick its own target - the same span of
the unmasked input, encoded by the stop-gradient target network - among
distractor spans drawn from the same utterance (same voice: the hard ones) and
from the batch, with InfoNCE (cosine similarity / temperature) instead of a
classification loss over a vocabulary.

Context is a shortcut: the teacher's encoding of a span carries its
neighbourhood, which the student sees around the mask, so a span can be told
from far-away distractors without knowing what is inside it. The log shows
that shortcut beside the student's accuracy (``phoneme_context_acc``: the
teacher fed the student's masked input, scored against the same distractors),
and ``phoneme_negatives_within_ms`` draws the same-utterance distractors among
the spans that share the positive's context.

HuBERT's answer to that shortcut (``phoneme_units``, :mod:`mgf_sb.objectives.units`):
score each masked span against a codebook of K discrete units instead - the
unit of the span's pooled target (online k-means of the teacher's or the
fbank's span means, or BEST-RQ's frozen random-projection quantiser of the
fbank's), cosine / temperature over K learned unit embeddings, cross-entropy.
The distractors are then the other units, not other positions.
"""

import torch
import torch.nn.functional as F

from mgf_sb.masking import span_membership
from mgf_sb.objectives.base import MaskedPrediction
from mgf_sb.objectives.bestrq import RandomProjectionQuantizer, nearest_codes
from mgf_sb.objectives.units import OnlineKMeans, unit_logits, unit_stats

UNITS = ("none", "kmeans", "random_projection")
UNITS_SOURCES = ("teacher", "fbank")


def pool_spans(x, start, length, valid):
    """Mean of ``x`` over each span.

    Arguments
    ---------
    x : torch.Tensor
        (M, T, C) frames.
    start, length : torch.LongTensor
        (M, S) spans.
    valid : torch.BoolTensor
        (M, S) existing spans.

    Returns
    -------
    pooled : torch.Tensor
        (N, C) one row per valid span, in sequence order.
    group : torch.LongTensor
        (N,) sequence index of each span.
    """
    member = span_membership(start, length, x.shape[1]).to(x.dtype)  # (M, S, T)
    pooled = member @ x / length.clamp(min=1)[..., None].to(x.dtype)  # (M, S, C)
    group = valid.nonzero()[:, 0]
    return pooled[valid], group


class PhonemeObjective(MaskedPrediction):
    """Span-level masked prediction; contrastive against the teacher by default.

    Same arguments as :class:`~mgf_sb.objectives.base.MaskedPrediction`;
    ``loss='l1', target='fbank'`` is the generative ablation (reconstruct each
    span's mean log-Mel frame). And:

    Arguments
    ---------
    units : str
        ``none`` (span-vs-span InfoNCE, above) | ``kmeans`` | ``random_projection``:
        each span's target is a unit index, its prediction ``head(span mean)``
        scored by cosine / ``temperature`` against ``unit_embedding`` (K, proj_dim),
        cross-entropy. Needs ``loss='infonce'`` and ``target_projection='none'``;
        ``target``, the distractor counts and ``negatives_within_ms`` are not used.
    n_units : int
        K (HuBERT's first iteration: 100).
    units_source : str
        kmeans: the frames whose span means are clustered, ``teacher`` (this
        scale's teacher target) or ``fbank`` (the unmasked features).
        random_projection always quantises the fbank span means (BEST-RQ's).
    units_decay : float
        kmeans: EMA decay of the online k-means (:class:`~mgf_sb.objectives.units.OnlineKMeans`).
    units_cb_dim : int
        random_projection: projection size (BEST-RQ.yaml: 16).

    With units, the stats are ``acc`` (unit predicted), ``unit_ppl``,
    ``unit_prior`` (share of the batch's most frequent unit: the no-network
    floor), ``context_acc`` (kmeans of the teacher, diagnostic batches: the
    unit of the teacher's encoding of the student's masked input equals the
    true unit) and ``interp_acc`` (diagnostic batches: the unit of the mean of
    the source frames nearest the span on each side that the student sees).
    """

    def __init__(self, d_model, feat_dim, loss="l1", target="fbank", layer=-1, n_negatives_same=10,
                 n_negatives_batch=10, temperature=0.1, proj_dim=256, negatives_within_ms=None, frame_ms=10.0,
                 target_projection="learned", units="none", n_units=100, units_source="teacher", units_decay=0.99,
                 units_cb_dim=16):
        if units not in UNITS:
            raise ValueError(f"phoneme_units must be one of {UNITS}, got {units!r} (hparams/mgf.yaml)")
        if units != "none":
            if loss != "infonce":
                raise ValueError(f"phoneme_units: {units} scores spans against unit embeddings (cosine / "
                                 f"temperature, cross-entropy): it needs phoneme_loss: infonce, got {loss!r} "
                                 f"(or set phoneme_units: none)")
            if target_projection != "none":
                raise ValueError(f"phoneme_units: {units} has no target vectors to project: it needs "
                                 f"phoneme_target_projection: none, got {target_projection!r}")
            if units_source not in UNITS_SOURCES:
                raise ValueError(f"phoneme_units_source must be one of {UNITS_SOURCES}, got {units_source!r}")
            if int(n_units) < 2:
                raise ValueError(f"phoneme_n_units must be >= 2, got {n_units}")
        super().__init__(d_model, feat_dim, loss=loss, target=target, layer=layer, n_negatives_same=n_negatives_same,
                         n_negatives_batch=n_negatives_batch, temperature=temperature, proj_dim=proj_dim,
                         negatives_within_ms=negatives_within_ms, frame_ms=frame_ms,
                         target_projection=target_projection)
        self.units_kind = units
        if units == "none":  # nothing else built: today's modules, parameters and random draws
            return
        self.n_units = int(n_units)
        # random_projection reads the fbank (BEST-RQ's quantiser), kmeans its units_source
        self.units_source = "fbank" if units == "random_projection" else units_source
        # HuBERT: final_proj to final_dim, K label embeddings of final_dim (fairseq hubert.py)
        self.head = torch.nn.Linear(d_model, proj_dim)
        self.target_proj = None
        self.unit_embedding = torch.nn.Parameter(torch.randn(self.n_units, proj_dim))
        source_dim = d_model if self.units_source == "teacher" else feat_dim
        if units == "kmeans":
            self.kmeans = OnlineKMeans(self.n_units, source_dim, decay=units_decay)
        else:  # frozen, buffers only: saved with the checkpoints, never refit
            self.quantiser = RandomProjectionQuantizer(source_dim, int(units_cb_dim), self.n_units)

    @property
    def needs_teacher(self):
        if self.units_kind == "none":
            return self.target == "teacher"
        return self.units_source == "teacher"

    def forward(self, inputs):
        """Returns ``(loss, stats)`` (see :class:`~mgf_sb.objectives.base.ObjectiveInputs`)."""
        if self.units_kind == "none":
            return super().forward(inputs)
        return self.unit_forward(inputs)

    def source_frames(self, frames_teacher, feats):
        """The frames whose span means are quantised: this scale's teacher slot or the features."""
        if self.units_source == "teacher":
            if frames_teacher is None:
                raise RuntimeError("PhonemeObjective: phoneme_units_source teacher but no teacher output was given")
            return self.teacher_of(frames_teacher)
        return feats

    def quantise(self, x):
        """(N, C) span means -> (N,) unit indices (the current centroids / the frozen quantiser)."""
        if self.units_kind == "kmeans":
            return self.kmeans(x)
        return nearest_codes(self.quantiser, x)

    def unit_forward(self, inputs):
        """Unit targets: cross-entropy of cosine(head(span mean), unit embeddings) / temperature."""
        batch = inputs.batch
        hidden = self.layer_of(inputs.hidden)
        src = self.source_frames(inputs.teacher, inputs.feats)
        tgt, _ = self.units(src, batch)
        tgt = tgt.detach()
        if self.units_kind == "kmeans" and self.training and not self.kmeans.ready:
            self.kmeans.update(tgt)  # first training batch: the initial centroids (every DDP process calls it)
            targets = self.quantise(tgt) if self.kmeans.ready else None
        elif self.units_kind == "kmeans" and not self.kmeans.ready:
            targets = None  # evaluated before any training step: no units yet
        else:
            targets = self.quantise(tgt)
            if self.units_kind == "kmeans" and self.training:
                # targets come from the centroids before this step's update (never in eval mode)
                self.kmeans.update(tgt, targets)
        if targets is None or tgt.shape[0] == 0:
            # a zero that reaches every parameter (DDP expects a gradient for each)
            return hidden.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0, {"units": 0.0}
        pred, _ = self.units(hidden, batch)
        logits = unit_logits(self.head(pred), self.unit_embedding, self.temperature)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            stats = {"acc": float((logits.argmax(-1) == targets).float().mean()), "units": float(targets.numel()),
                     **unit_stats(targets, self.n_units)}
            if self.units_source == "teacher" and inputs.teacher_masked is not None:
                # context-only baseline: the unit of the teacher's encoding of what the student sees
                ctx, _ = self.units(self.teacher_of(inputs.teacher_masked), batch)
                stats["context_acc"] = float((self.quantise(ctx.float()) == targets).float().mean())
            if inputs.diagnostics:
                interp, known = neighbour_means(src, batch.span_start, batch.span_len, batch.span_valid,
                                                visible_frames(batch, src.shape[1]))
                if bool(known.any()):
                    stats["interp_acc"] = float((self.quantise(interp[known].float()) == targets[known]).float().mean())
        return loss, stats

    def units(self, x, batch):
        return pool_spans(x, batch.span_start, batch.span_len, batch.span_valid)

    def no_network_baseline(self, frames, batch):
        return neighbour_means(frames, batch.span_start, batch.span_len, batch.span_valid,
                               visible_frames(batch, frames.shape[1]))

    def unit_positions(self, batch, T):
        """(N,) each span's centre in frames, in the order of :meth:`units`."""
        return span_centres(batch.span_start, batch.span_len, batch.span_valid)


def span_centres(start, length, valid):
    """(M, S) spans -> (N,) centre (in frames) of each valid span, in sequence order."""
    return (start.float() + (length.float() - 1) / 2)[valid]


def visible_frames(batch, T):
    """(M, T) frames the student sees: inside the sequence and not hidden by any mask."""
    n = batch.n_frames.to(batch.input_mask.device)
    inside = torch.arange(T, device=n.device)[None, :] < n[:, None]
    return inside & ~batch.input_mask[:, :T]


def neighbour_means(x, start, length, valid, visible):
    """Mean of the nearest visible frame left and right of each span: the no-network interpolation.

    Arguments
    ---------
    x : torch.Tensor
        (M, T, C) frames.
    start, length : torch.LongTensor
        (M, S) spans.
    valid : torch.BoolTensor
        (M, S) existing spans.
    visible : torch.BoolTensor
        (M, T) frames the student sees.

    Returns
    -------
    means : torch.Tensor
        (N, C) one row per valid span (order of :func:`pool_spans`): the mean of
        the visible neighbours found (one side when the other has none).
    known : torch.BoolTensor
        (N,) spans with a visible frame on at least one side.
    """
    M, T = visible.shape
    pos = torch.arange(T, device=visible.device).expand(M, T)
    # last visible index <= t, and first visible index >= t (-1 / T: none)
    last = torch.where(visible, pos, torch.full_like(pos, -1)).cummax(1).values
    first = T - 1 - torch.where(visible.flip(1), pos, torch.full_like(pos, -1)).cummax(1).values.flip(1)
    first = torch.where(first >= T, torch.full_like(first, T), first)
    left_at = (start - 1).clamp(0, T - 1)
    right_at = (start + length).clamp(0, T - 1)
    left = torch.where(start >= 1, last.gather(1, left_at), torch.full_like(start, -1))
    right = torch.where(start + length <= T - 1, first.gather(1, right_at), torch.full_like(start, T))
    has_l, has_r = left >= 0, right < T
    rows = torch.arange(M, device=x.device)[:, None]
    xl = x[rows, left.clamp(0, T - 1)] * has_l[..., None]
    xr = x[rows, right.clamp(0, T - 1)] * has_r[..., None]
    n = (has_l.to(x.dtype) + has_r.to(x.dtype)).clamp(min=1)[..., None]
    return ((xl + xr) / n)[valid], (has_l | has_r)[valid]
