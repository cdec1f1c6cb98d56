"""What every scale's objective receives, and the shared masked-prediction core.

An objective knows nothing of the others: it gets the encoder's layers, the
batch and the targets, and returns ``(loss, stats)``. The Brain sums the
enabled ones with their YAML weights.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from mgf_sb.batch import MGFBatch
from mgf_sb.objectives.losses import contrast_accuracy, contrast_logits, info_nce, regression_loss, sample_negatives
from mgf_sb.target import layer_norm_target, teacher_slot

LOSSES = ("l1", "l2", "infonce")
TARGET_PROJECTIONS = ("learned", "fixed", "none")


@dataclass
class ObjectiveInputs:
    """Everything an objective may use.

    Attributes
    ----------
    hidden : list of torch.Tensor
        Online encoder layers, each (M, T, D), computed on the masked input.
    feats : torch.Tensor
        (M, T, F) unmasked normalised features (the generative targets).
    teacher : torch.Tensor or None
        (M, T, D) stop-gradient target-network output on the unmasked input;
        only computed when an enabled objective has ``target: teacher``.
        (M, T, D * n) when scales have their own target layers
        (``<scale>_target_layers``): each objective reads its slot
        (:func:`mgf_sb.target.teacher_slot`, set up by the ``ScaleSet``).
    batch : MGFBatch
    encoder : torch.nn.Module or None
        The online encoder (unwrapped from DDP), for objectives that embed the
        unmasked features themselves (the wav2vec 2.0 peer quantises
        ``encoder.input_proj(feats)``).
    teacher_masked : torch.Tensor or None
        (M, T, D) the same target network fed the student's *masked* input:
        the context-only baseline (``<scale>_context_acc``); computed on the
        diagnostic batches only (see :func:`mgf_sb.pretraining.mgf_forward`).
    student_masked : torch.Tensor or None
        (M, T, D) the *student's own* layers read as the target network reads
        its own (same layers, same normalisation), no prediction head: with
        ``teacher_masked`` beside it, the log shows how much of the context-only
        baseline is the student itself (``<scale>_self_context_acc``); the
        diagnostic batches only.
    input_feats : torch.Tensor or None
        (M, T, F) what the student was fed when it differs from ``feats`` (the
        frame scale's input alterations, :class:`mgf_sb.masking.FrameAlteration`);
        None: ``feats`` (before the frame and span masks, which the encoder applies).
    band_mask : torch.BoolTensor or None
        (M, F) feature channels hidden from the student over the whole sequence
        (frequency-band masking); None: none.
    diagnostics : bool
        A diagnostic batch (every validation batch, every ``diagnostics_every``
        training steps): the costlier statistics (``encoder_pos_ratio``) are
        measured on these only.
    branch : list of torch.Tensor or None
        The encoder's utterance branch (``branch_layers``), each block (M, T, D), computed
        on the unmasked input embedding; None: the encoder has none.
    """

    hidden: List[torch.Tensor]
    feats: torch.Tensor
    teacher: Optional[torch.Tensor]
    batch: MGFBatch
    encoder: Optional[torch.nn.Module] = None
    teacher_masked: Optional[torch.Tensor] = None
    student_masked: Optional[torch.Tensor] = None
    input_feats: Optional[torch.Tensor] = None
    band_mask: Optional[torch.Tensor] = None
    diagnostics: bool = False
    branch: Optional[List[torch.Tensor]] = None


class MaskedPrediction(torch.nn.Module):
    """Predict a target for each masked unit; units are defined by subclasses.

    Arguments
    ---------
    d_model : int
        Encoder width.
    feat_dim : int
        Feature dimension (target size for ``target: fbank``).
    loss : str
        ``l1`` / ``l2`` (generative: regress the target) or ``infonce``
        (contrastive: pick the own target among distractors, cosine/temperature).
    target : str
        ``fbank`` (the unmasked features) or ``teacher`` (the target network).
    layer : int
        Which encoder output makes the prediction (0: the input embedding,
        1..L: the layers, -1: the last; ``frame_layer`` / ``phoneme_layer``).
    n_negatives_same, n_negatives_batch : int
        Distractors from the same sequence / from the batch's other
        utterances (infonce).
    temperature : float
    proj_dim : int
        Shared space for infonce.
    negatives_within_ms : float, optional
        Same-sequence distractors only among the units whose centre is within
        this many ms of the unit's (they share its context; see
        :func:`~mgf_sb.objectives.losses.sample_negatives`). None: anywhere in
        the sequence.
    frame_ms : float
        One encoder frame in ms (for ``negatives_within_ms``).
    target_projection : str
        infonce only: ``learned`` (a trained linear map of the targets into
        ``proj_dim``), ``fixed`` (the same map, random and frozen: the targets
        cannot be reshaped to make the task easy) or ``none`` (cosine in the
        target space itself, the head predicts ``target_dim``).
    """

    def __init__(
        self,
        d_model,
        feat_dim,
        loss="l1",
        target="fbank",
        layer=-1,
        n_negatives_same=10,
        n_negatives_batch=10,
        temperature=0.1,
        proj_dim=256,
        negatives_within_ms=None,
        frame_ms=10.0,
        target_projection="learned",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"{type(self).__name__}: loss must be one of {LOSSES}, got {loss!r}")
        if target not in ("fbank", "teacher"):
            raise ValueError(f"{type(self).__name__}: target must be 'fbank' or 'teacher', got {target!r}")
        self.loss_type, self.target = loss, target
        self.layer = layer
        self.n_same, self.n_batch = n_negatives_same, n_negatives_batch
        self.temperature = temperature
        if target_projection not in TARGET_PROJECTIONS:
            raise ValueError(f"{type(self).__name__}: target_projection must be one of {TARGET_PROJECTIONS}, "
                             f"got {target_projection!r}")
        self.target_projection = target_projection
        self.radius = None if negatives_within_ms is None else float(negatives_within_ms) / float(frame_ms)
        target_dim = feat_dim if target == "fbank" else d_model
        if loss == "infonce" and target_projection == "none":
            self.head = torch.nn.Linear(d_model, target_dim)
            self.target_proj = torch.nn.Identity()
        elif loss == "infonce":
            self.head = torch.nn.Linear(d_model, proj_dim)
            self.target_proj = torch.nn.Linear(target_dim, proj_dim)
            self.target_proj.requires_grad_(target_projection == "learned")
        else:
            self.head = torch.nn.Sequential(
                torch.nn.Linear(d_model, d_model), torch.nn.GELU(), torch.nn.Linear(d_model, target_dim)
            )
            self.target_proj = None

    # This scale's target among the teacher's (slot, of n_slots): set by the ScaleSet when scales
    # have their own target layers (<scale>_target_layers); (0, 1): the teacher's one target.
    teacher_slots = (0, 1)

    @property
    def needs_teacher(self):
        return self.target == "teacher"

    def teacher_of(self, teacher):
        """This scale's target out of the teacher's output (:func:`mgf_sb.target.teacher_slot`)."""
        return teacher_slot(teacher, *self.teacher_slots)

    def layer_of(self, hidden):
        """The encoder output this scale predicts from (``layer``), with a clear error when out of range."""
        if not -len(hidden) <= self.layer < len(hidden):
            raise ValueError(f"{type(self).__name__}: layer {self.layer} out of range for an encoder with "
                             f"{len(hidden)} outputs (0: input embedding .. {len(hidden) - 1}: last layer, or "
                             f"negative from the end; <scale>_layer in hparams/mgf.yaml)")
        return hidden[self.layer]

    def units(self, x, batch):
        """Gathers units: (M, T, C) -> ((N, C), group (N,)). Subclasses define it."""
        raise NotImplementedError

    def unit_positions(self, batch, T):
        """(N,) centre of each unit in its sequence, in frames (for ``negatives_within_ms``)."""
        raise NotImplementedError

    def no_network_baseline(self, frames, batch):
        """((N, C) guess of each unit from the visible frames around it, (N,) bool where one exists),
        in :meth:`units`' order, or None where the scale has none (``<scale>_interp_acc``)."""
        return None

    def forward(self, inputs):
        """Returns ``(loss, stats)`` for one batch (see :class:`ObjectiveInputs`)."""
        if self.target == "teacher":
            if inputs.teacher is None:
                raise RuntimeError(f"{type(self).__name__} has target 'teacher' but no teacher output was given")
            tgt_frames = self.teacher_of(inputs.teacher)
        else:
            tgt_frames = inputs.feats
        pred, group = self.units(self.layer_of(inputs.hidden), inputs.batch)
        tgt, _ = self.units(tgt_frames, inputs.batch)
        tgt = tgt.detach()
        if pred.shape[0] == 0:  # nothing masked in this batch (e.g. all very short)
            zero = inputs.hidden[self.layer].sum() * 0.0
            return zero, {"units": 0.0}
        pred = self.head(pred)
        if self.loss_type == "infonce":
            # batch distractors never come from the same utterance (other copies / the other view)
            utt = inputs.batch.utt.to(group.device)[group]
            position = None
            if self.radius is not None:
                position = self.unit_positions(inputs.batch, tgt_frames.shape[1]).to(group.device)
            idx, valid = sample_negatives(group, self.n_same, self.n_batch, exclude_group=utt, position=position,
                                          radius=self.radius)
            loss, acc = info_nce(pred, self.target_proj(tgt), idx, valid, self.temperature)
            stats = {"acc": float(acc), "units": float(pred.shape[0])}
            if self.target == "teacher" and inputs.teacher_masked is not None:
                # Context-only baseline: the teacher itself, fed what the student sees, no projection.
                ctx, _ = self.units(self.teacher_of(inputs.teacher_masked), inputs.batch)
                stats["context_acc"] = contrast_accuracy(ctx.detach(), tgt, idx, valid)
                if inputs.student_masked is not None:
                    # the same read-out of the student's own layers: when it matches context_acc, the
                    # "context-only baseline" is the student minus its head, not what context gives away
                    own, _ = self.units(self.teacher_of(inputs.student_masked), inputs.batch)
                    stats["self_context_acc"] = contrast_accuracy(own.detach(), tgt, idx, valid)
            if inputs.diagnostics:
                interp = self.no_network_baseline(tgt_frames, inputs.batch)
                if interp is not None and bool(interp[1].any()):
                    # no network at all: the targets next to each unit (what smoothing gives away)
                    hit = contrast_logits(interp[0], tgt, idx, valid).argmax(1) == 0
                    stats["interp_acc"] = float(hit[interp[1]].float().mean())
            return loss, stats
        if self.target == "teacher":
            tgt = layer_norm_target(tgt)
        loss = regression_loss(pred, tgt, self.loss_type)
        return loss, {"units": float(pred.shape[0])}
