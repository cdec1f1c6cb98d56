"""One objective per time scale, and the set the Brain sums.

- :class:`FrameObjective` - frame scale, generative (L1 on log-Mel) by default;
- :class:`PhonemeObjective` - phoneme scale, span InfoNCE against the teacher;
- :class:`UtteranceObjective` - utterance scale, NT-Xent between two views;
- :class:`WordObjective` - optional word scale (0.3-0.6 s spans), span InfoNCE.
"""

import torch

from mgf_sb.objectives.base import MaskedPrediction, ObjectiveInputs
from mgf_sb.objectives.frame import FrameObjective
from mgf_sb.objectives.phoneme import PhonemeObjective
from mgf_sb.objectives.utterance import UtteranceObjective
from mgf_sb.objectives.word import WordObjective

__all__ = [
    "FrameObjective",
    "PhonemeObjective",
    "UtteranceObjective",
    "WordObjective",
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
    """

    def __init__(self, objectives, enabled, weights):
        unknown = set(enabled) - set(objectives)
        if unknown:
            raise ValueError(f"enabled names unknown scales {sorted(unknown)}; known: {sorted(objectives)}")
        active = {k: m for k, m in objectives.items() if enabled.get(k, False) and float(weights.get(k, 0)) > 0}
        if not active:
            raise ValueError("every scale is disabled: enable at least one (use_frame / use_phoneme / use_word / "
                             "use_utterance)")
        super().__init__(active)
        self.weights = {k: float(weights[k]) for k in active}

    @property
    def needs_teacher(self):
        return any(getattr(m, "needs_teacher", False) for m in self.values())

    def forward(self, inputs):
        """Weighted sum. Returns ``(total, {name: loss}, {name/stat: value})``."""
        total, losses, stats = 0.0, {}, {}
        for name, objective in self.items():
            loss, st = objective(inputs)
            losses[name] = loss
            total = total + self.weights[name] * loss
            stats.update({f"{name}_{k}": v for k, v in st.items()})
        return total, losses, stats
