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
"""

from mgf_sb.masking import span_membership
from mgf_sb.objectives.base import MaskedPrediction


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
    span's mean log-Mel frame).
    """

    def units(self, x, batch):
        return pool_spans(x, batch.span_start, batch.span_len, batch.span_valid)

    def unit_positions(self, batch, T):
        """(N,) each span's centre in frames, in the order of :meth:`units`."""
        return span_centres(batch.span_start, batch.span_len, batch.span_valid)


def span_centres(start, length, valid):
    """(M, S) spans -> (N,) centre (in frames) of each valid span, in sequence order."""
    return (start.float() + (length.float() - 1) / 2)[valid]
