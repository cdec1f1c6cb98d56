"""wav2vec 2.0's objective as a peer of MGF, on MGF's fbank front end and Transformer.

This is wav2vec 2.0's *objective* (Baevski et al., 2020; SpeechBrain's
``speechbrain.lobes.models.wav2vec`` pretraining), not its model: there is no
waveform CNN here. The encoder is MGF's Transformer over the normalised,
stacked log-Mel frames, and the latent that wav2vec 2.0 quantises (the CNN
output the Transformer sees) is the encoder's input projection of the
*unmasked* features, ``encoder.input_proj(feats)``: trainable, like the CNN.

For each masked frame (``batch.peer_mask``, drawn by the collate with wav2vec
2.0's statistics: SpeechBrain's ``mask_prob`` 0.65 of the frames in spans of
``mask_length`` 10 x 20 ms):

- target: SpeechBrain's :class:`~speechbrain.lobes.models.wav2vec.W2VTargetQuantiser`
  (Gumbel-softmax product quantiser, 2 groups of ``num_vars`` codes) of the
  unmasked input embedding at that frame;
- prediction: the encoder's last layer there, projected (``feat_proj``);
- loss: SpeechBrain's :class:`~speechbrain.nnet.losses.ContrastiveLoss`
  (cosine / ``logit_temp``) of the prediction against its target and
  ``num_negatives`` distractors: targets of other masked frames of the *same
  sequence*, drawn by SpeechBrain's
  :func:`~speechbrain.lobes.models.wav2vec.sample_negatives` one sequence at a
  time (see :func:`same_sequence_negatives`), plus ``diversity_weight`` x the
  quantiser's codebook diversity loss.

SpeechBrain's recipe back-propagates ``sum over masked frames +
diversity_weight x diversity x num_masked``; this objective returns that
divided by the number of masked frames (a mean, the scale of MGF's losses, so
that the recipe's gradient clipping acts alike; Adam's updates do not depend
on the scale). The Gumbel temperature decays per training batch as in
SpeechBrain (``temperature_decay``: start, floor, factor per step).
"""

import torch
from speechbrain.lobes.models.wav2vec import W2VTargetQuantiser, sample_negatives
from speechbrain.nnet.losses import ContrastiveLoss


def same_sequence_negatives(targets, counts, num_negatives):
    """Distractors for each target among the other targets of its own sequence.

    SpeechBrain's :func:`sample_negatives` is called on one sequence at a
    time: on a (B, T, C) batch it offsets row ``b``'s indices by ``b * (T - 1)``
    instead of ``b * T``, so for ``b > 0`` it draws from the previous row and
    can return the positive itself (tests/test_peers.py shows it).

    Arguments
    ---------
    targets : torch.Tensor
        (N, C) targets of the masked frames, grouped by sequence.
    counts : list of int
        Masked frames of each sequence, in order (each >= 2, summing to N).
    num_negatives : int
        Distractors per target (drawn uniformly with replacement among the
        sequence's other masked frames).

    Returns
    -------
    torch.Tensor
        (num_negatives, 1, N, C), as :class:`ContrastiveLoss` takes them.

    Example
    -------
    >>> y = torch.arange(5.0)[:, None]
    >>> negs = same_sequence_negatives(y, [2, 3], 4)
    >>> negs.shape, negs[:, 0, 0, 0].tolist()  # the first sequence's only distractor of frame 0 is frame 1
    (torch.Size([4, 1, 5, 1]), [1.0, 1.0, 1.0, 1.0])
    """
    if min(counts) < 2:
        raise ValueError(f"every sequence needs >= 2 masked frames to draw distractors, got counts {counts}")
    parts = [sample_negatives(y[None], num_negatives) for y in targets.split(list(counts))]
    return torch.cat(parts, dim=2)


class Wav2Vec2Objective(torch.nn.Module):
    """wav2vec 2.0's contrastive objective with quantised targets (see the module docstring).

    Arguments
    ---------
    d_model : int
        Encoder width (the quantiser's input: the input embedding).
    final_dim : int
        Size of the quantised targets and of the projected predictions
        (wav2vec2_base.yaml: 256 for a 768-wide encoder; hparams/mgf.yaml uses proj_dim).
    num_vars : int
        Codes per group (2 groups; W2VTargetQuantiser: 320).
    temperature_decay : sequence of 3 floats
        Gumbel temperature: start, floor, decay factor per training batch.
    num_negatives : int
        Distractors per masked frame (wav2vec2_base.yaml: 100).
    logit_temp : float
        ContrastiveLoss temperature (0.1).
    diversity_weight : float
        Weight of the codebook diversity loss (0.1).
    layer : int
        Encoder layer that predicts (-1: the last).

    Stats: ``acc`` (targets picked among their distractors), ``code_ppl`` and
    ``prob_ppl`` (codebook usage, summed over the groups: up to 2 x num_vars),
    ``diversity`` and ``units`` (masked frames scored).
    """

    def __init__(self, d_model, final_dim=256, num_vars=320, temperature_decay=(2.0, 0.25, 0.999995),
                 num_negatives=100, logit_temp=0.1, diversity_weight=0.1, layer=-1):
        super().__init__()
        self.quantiser = W2VTargetQuantiser(in_dim=d_model, out_dim=final_dim, num_vars=num_vars,
                                            temperature_decay=tuple(float(t) for t in temperature_decay))
        self.feat_proj = torch.nn.Linear(d_model, final_dim)
        self.loss = ContrastiveLoss(logit_temp=logit_temp)
        self.num_negatives = int(num_negatives)
        self.diversity_weight = float(diversity_weight)
        self.layer = layer
        # Training batches seen: sets the Gumbel temperature; checkpointed, so a resumed run continues it.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, inputs):
        """Returns ``(loss, stats)`` for one batch (see :class:`~mgf_sb.objectives.base.ObjectiveInputs`)."""
        if inputs.encoder is None:
            raise RuntimeError("Wav2Vec2Objective quantises the encoder's input embedding: ObjectiveInputs.encoder "
                               "is None (mgf_sb.pretraining.mgf_forward passes it)")
        hidden = inputs.hidden[self.layer]
        mask = inputs.batch.peer_mask[:, : hidden.shape[1]].to(hidden.device)
        counts = mask.sum(1)
        mask = mask & (counts >= 2)[:, None]  # a distractor needs a second masked frame in the sequence
        if not bool(mask.any()):
            return hidden.sum() * 0.0, {"units": 0.0}
        if self.training:
            self.quantiser.quantiser.update_temp(int(self.updates))
            self.updates += 1
        latents = inputs.encoder.input_proj(inputs.feats[mask])  # (N, D) unmasked input embedding
        targets, meta = self.quantiser(latents[None])  # (1, N, final_dim)
        pred = self.feat_proj(hidden[mask])[None]  # (1, N, final_dim)
        negs = same_sequence_negatives(targets[0], counts[counts >= 2].tolist(), self.num_negatives)
        loss_sum, acc = self.loss(pred, targets, negs)
        n = pred.shape[1]
        loss = loss_sum / n + self.diversity_weight * meta["diversity_loss"]
        stats = {"acc": float(acc), "code_ppl": float(meta["code_perplex"].detach()),
                 "prob_ppl": float(meta["prob_perplex"].detach()), "diversity": float(meta["diversity_loss"].detach()),
                 "units": float(n)}
        return loss, stats
