"""Frame scale (10-30 ms): by default, reconstruct masked log-Mel frames with L1."""

import torch

from mgf_sb.objectives.base import MaskedPrediction


class FrameObjective(MaskedPrediction):
    """Masked-frame prediction; units are the frames of ``batch.frame_mask``.

    Default ``loss='l1', target='fbank'`` is the generative objective;
    ``loss='infonce'`` turns it contrastive (distractors: other masked frames,
    same sequence and batch) for the paper's ablation.
    """

    def units(self, x, batch):
        """(M, T, C) -> masked frames (N, C) and their sequence index (N,)."""
        mask = batch.frame_mask[:, : x.shape[1]]
        group = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(mask)[mask]
        return x[mask], group
