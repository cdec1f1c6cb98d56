"""Phoneme scale (~50-200 ms spans): the masked "language model" made continuous.

Each masked span's pooled output must pick its own target - the same span of
the unmasked input, encoded by the stop-gradient target network - among
distractor spans drawn from the same utterance (same voice: the hard ones) and
from the batch, with InfoNCE (cosine similarity / temperature) instead of a
classification loss over a vocabulary.
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
