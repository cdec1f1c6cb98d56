"""Word scale (~0.3-0.6 s spans): the phoneme-scale objective on longer spans.

An extension of the paper's three scales: each masked word-length span's
pooled output must pick its own target (the teacher's encoding of the same
unmasked span) among distractor spans, with InfoNCE by default. The spans are
drawn in the collate function (``word_*`` in hparams/mgf.yaml).
"""

from mgf_sb.objectives.base import MaskedPrediction
from mgf_sb.objectives.phoneme import pool_spans


class WordObjective(MaskedPrediction):
    """Span-level masked prediction on the batch's word spans (see PhonemeObjective)."""

    def units(self, x, batch):
        return pool_spans(x, batch.word_start, batch.word_len, batch.word_valid)
