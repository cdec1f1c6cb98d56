"""One objective per time scale, and the set the Brain sums.

- :class:`FrameObjective` - frame scale, generative (L1 on log-Mel) by default;
- :class:`PhonemeObjective` - phoneme scale, span InfoNCE against the teacher (or, with
  ``phoneme_units``, HuBERT-style discrete unit targets: :mod:`mgf_sb.objectives.units`);
- :class:`UtteranceObjective` - utterance scale, NT-Xent between two views;
- :class:`WordObjective` - optional word scale (0.3-0.6 s spans), span InfoNCE.

Peers (baselines at the same budget, not scales of MGF): :class:`BestRQObjective`
(BEST-RQ's random-projection quantiser targets) and :class:`Wav2Vec2Objective`
(wav2vec 2.0's contrastive objective on the fbank front end).
"""

import torch

from mgf_sb.objectives.base import MaskedPrediction, ObjectiveInputs
from mgf_sb.objectives.bestrq import BestRQObjective
from mgf_sb.objectives.frame import FrameObjective
from mgf_sb.objectives.phoneme import PhonemeObjective
from mgf_sb.objectives.utterance import UtteranceObjective
from mgf_sb.objectives.wav2vec2 import Wav2Vec2Objective
from mgf_sb.objectives.word import WordObjective

__all__ = [
    "FrameObjective",
    "PhonemeObjective",
    "UtteranceObjective",
    "WordObjective",
    "BestRQObjective",
    "Wav2Vec2Objective",
    "MaskedPrediction",
    "ObjectiveInputs",
    "ScaleSet",
]


class ScaleSet(torch.nn.ModuleDict):
    """The enabled objectives and their weights.

    Disabled scales are not even registered, so their heads take no optimizer
    state and DDP sees no unused parameters.

    Arguments
    ---------
    objectives : dict
        name -> objective module.
    enabled : dict
        name -> bool.
    weights : dict
        name -> float loss weight (a weight of 0 also disables the scale).
    target : TargetNetwork, optional
        The teacher, when scales have their own target layers
        (``<scale>_target_layers``): each objective is told which slot of the
        teacher's output is its target (not registered as a submodule).
    encoder : MGFEncoder, optional
        Checked only (not registered): an utterance branch (``branch_layers``) must
        have its reader (``utterance_layer: branch``) and the reader its branch, so
        a wrong pairing stops here, not in the first step.

    Besides the scales' own statistics, :meth:`forward` reports
    ``encoder_pos_ratio`` on diagnostic batches: the mean per-frame
    ``||pos(x)|| / ||x||`` of the encoder's input block
    (:meth:`mgf_sb.encoder.MGFEncoder.pos_ratio`, on what the student sees).
    """

    def __init__(self, objectives, enabled, weights, target=None, encoder=None):
        unknown = set(enabled) - set(objectives)
        if unknown:
            raise ValueError(f"enabled names unknown scales {sorted(unknown)}; known: {sorted(objectives)}")
        active = {k: m for k, m in objectives.items() if enabled.get(k, False) and float(weights.get(k, 0)) > 0}
        if not active:
            raise ValueError("every scale is disabled: enable at least one (use_frame / use_phoneme / use_word / "
                             "use_utterance, or a peer: use_bestrq / use_wav2vec2)")
        super().__init__(active)
        self.weights = {k: float(weights[k]) for k in active}
        utt = active.get("utterance")
        reads_branch = getattr(utt, "layer", None) == "branch"
        has_branch = getattr(encoder, "num_branch_layers", 0) > 0
        if encoder is not None and reads_branch and not has_branch:
            raise ValueError("utterance_layer=branch reads the encoder's utterance branch, but the encoder has "
                             "none: set branch_layers (e.g. --branch_layers=4) in hparams/mgf.yaml")
        if has_branch and not reads_branch:
            # its weights would never train (and DDP stops on parameters that get no gradient)
            raise ValueError(f"branch_layers={encoder.num_branch_layers} gives the encoder an utterance branch that "
                             "no scale reads: set utterance_layer=branch (with use_utterance=True), or branch_layers=0")
        if (utt is not None and getattr(utt, "needs_teacher", False) and target is not None
                and hasattr(target, "normalised_over_time") and target.normalised_over_time("utterance")):
            # Its mean over time is 0 for every view: the loss would sit at its chance value for the whole run.
            raise ValueError(
                "utterance_target: teacher pools the teacher's frames over time, but that target is "
                "instance-normalised over time (target_top_k_layers > 1 with target_layer_norm auto/instance, or "
                "target_final_norm: instance), so every pooled target is 0 and the utterance loss cannot learn. "
                "Give the utterance scale its own single teacher layer: --utterance_target_layers=[-1] "
                "(with target_layer_norm auto or none and target_final_norm none or layer)")
        if target is not None and getattr(target, "n_slots", 1) > 1:
            for name, objective in active.items():
                if hasattr(objective, "teacher_slots"):
                    objective.teacher_slots = (target.slot(name), target.n_slots)

    @property
    def input_alteration(self):
        """The enabled frame scale's input alteration (band masking, noise), or None when off
        (then the student is fed the features as they are; :func:`mgf_sb.pretraining.mgf_forward`)."""
        frame = self["frame"] if "frame" in self else None
        alteration = getattr(frame, "alteration", None)
        return alteration if alteration is not None and alteration.active else None

    @property
    def needs_teacher(self):
        return any(getattr(m, "needs_teacher", False) for m in self.values())

    def forward(self, inputs, factors=None):
        """Weighted sum. Returns ``(total, {name: loss}, {name/stat: value})``.

        ``factors``: optional ``{name: float}`` multiplying each weight (the automatic
        balancing of :class:`mgf_sb.pretraining.ScaleBalancer`; 1 when absent).
        """
        total, losses, stats = 0.0, {}, {}
        for name, objective in self.items():
            loss, st = objective(inputs)
            losses[name] = loss
            total = total + self.weights[name] * (factors or {}).get(name, 1.0) * loss
            stats.update({f"{name}_{k}": v for k, v in st.items()})
        if getattr(inputs, "diagnostics", False) and hasattr(inputs.encoder, "pos_ratio"):
            seen = inputs.feats if inputs.input_feats is None else inputs.input_feats
            stats["encoder_pos_ratio"] = inputs.encoder.pos_ratio(seen, inputs.batch.n_frames.to(seen.device),
                                                                  mask=inputs.batch.input_mask[:, : seen.shape[1]])
        return total, losses, stats
