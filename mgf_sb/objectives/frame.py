"""Frame scale: by default, reconstruct masked log-Mel frames with L1.

The masked spans are long enough (TERA / Mockingjay: >= 70 ms, see
``frame_span_*_ms`` in hparams/mgf.yaml) that copying the visible neighbours
does not solve the task. The objective logs, beside its loss, the L1 of that
copying baseline on the same masked frames (``frame_interp_l1``), so a user
sees what the model adds over interpolation.
"""

import torch

from mgf_sb.masking import ms_to_frames
from mgf_sb.objectives.base import MaskedPrediction


def interpolate_from_neighbours(x, visible):
    """Predicts every frame by linear interpolation between the nearest visible frames.

    Arguments
    ---------
    x : torch.Tensor
        (M, T, C) frames.
    visible : torch.BoolTensor
        (M, T) frames the predictor may look at (not masked, not padding).

    Returns
    -------
    torch.Tensor
        (M, T, C): a visible frame is itself; a hidden frame between visible
        frames ``l < t < r`` is ``x[l] + (t - l) / (r - l) * (x[r] - x[l])``;
        a hidden frame with visible frames on one side only copies the nearest
        one; a sequence with no visible frame predicts 0 (the mean of
        normalised features).

    Example
    -------
    >>> x = torch.tensor([[0.0, 10.0, 20.0, 30.0, 40.0]])[..., None]
    >>> visible = torch.tensor([[True, False, False, True, False]])
    >>> interpolate_from_neighbours(x, visible)[0, :, 0].tolist()
    [0.0, 10.0, 20.0, 30.0, 30.0]
    """
    M, T, C = x.shape
    t = torch.arange(T, device=x.device)[None, :].expand(M, T)
    left = torch.where(visible, t, torch.full_like(t, -1)).cummax(1).values  # last visible <= t
    right = torch.where(visible, t, torch.full_like(t, T)).flip(1).cummin(1).values.flip(1)  # first visible >= t
    has_l, has_r = left >= 0, right < T
    x_l = x.gather(1, left.clamp(min=0)[..., None].expand(M, T, C))
    x_r = x.gather(1, right.clamp(max=T - 1)[..., None].expand(M, T, C))
    w = ((t - left).float() / (right - left).clamp(min=1).float()).to(x.dtype)[..., None]
    both = (has_l & has_r)[..., None]
    pred = torch.where(both, x_l + w * (x_r - x_l), torch.where(has_l[..., None], x_l, x_r))
    return pred * (has_l | has_r)[..., None]


def neighbour_interpolation_l1(feats, frame_mask, input_mask, n_frames):
    """L1 of predicting each frame-scale masked frame from its visible neighbours.

    Arguments
    ---------
    feats : torch.Tensor
        (M, T, F) unmasked normalised features (the frame-scale targets).
    frame_mask : torch.BoolTensor
        (M, T) frames the frame loss scores.
    input_mask : torch.BoolTensor
        (M, T) every frame hidden from the encoder (all scales' masks).
    n_frames : torch.LongTensor
        (M,) valid frames.

    Returns
    -------
    float
        Mean absolute error over the masked frames and feature dimensions
        (as the frame loss with ``loss: l1, target: fbank``); 0 when nothing
        is masked (as the loss then).
    """
    T = feats.shape[1]
    frame_mask, input_mask = frame_mask[:, :T], input_mask[:, :T]
    valid = torch.arange(T, device=feats.device)[None, :] < n_frames.to(feats.device)[:, None]
    pred = interpolate_from_neighbours(feats.float(), valid & ~input_mask)
    if not bool(frame_mask.any()):
        return 0.0
    return float((pred[frame_mask] - feats.float()[frame_mask]).abs().mean())


class FrameObjective(MaskedPrediction):
    """Masked-frame prediction; units are the frames of ``batch.frame_mask``.

    Default ``loss='l1', target='fbank'`` is the generative objective;
    ``loss='infonce'`` turns it contrastive (distractors: other masked frames,
    same sequence and batch) for the paper's ablation. Its stats include
    ``interp_l1``, the L1 of the neighbour-interpolation baseline on the same
    masked frames of the unmasked features, ``run_frames`` (mean length of the
    frame mask's runs, in frames) and ``short_runs`` (share of those runs
    shorter than ``span_min_ms``: frame spans cut by phoneme spans or by the
    sequence end, which interpolation solves; 0 with ``whole_frame_spans``).
    """

    def __init__(self, *args, span_min_ms=None, **kwargs):
        super().__init__(*args, **kwargs)
        frame_ms = kwargs.get("frame_ms", 10.0)
        # runs shorter than the configured span are cut spans (frame_short_runs)
        self.short_run = None if span_min_ms is None else ms_to_frames(span_min_ms, frame_ms)

    def units(self, x, batch):
        """(M, T, C) -> masked frames (N, C) and their sequence index (N,)."""
        mask = batch.frame_mask[:, : x.shape[1]]
        group = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(mask)[mask]
        return x[mask], group

    def unit_positions(self, batch, T):
        """(N,) frame index of each masked frame, in the order of :meth:`units`."""
        mask = batch.frame_mask[:, :T]
        return torch.arange(mask.shape[1], device=mask.device)[None, :].expand_as(mask)[mask].float()

    def forward(self, inputs):
        loss, stats = super().forward(inputs)
        batch = inputs.batch
        with torch.no_grad():
            stats["interp_l1"] = neighbour_interpolation_l1(inputs.feats, batch.frame_mask, batch.input_mask,
                                                            batch.n_frames)
            runs = mask_run_lengths(batch.frame_mask)
            if runs.numel() > 0:
                stats["run_frames"] = float(runs.float().mean())
                if self.short_run is not None:
                    stats["short_runs"] = float((runs < self.short_run).float().mean())
        return loss, stats


def mask_run_lengths(mask):
    """(M, T) boolean mask -> (R,) length of every run of consecutive True frames.

    >>> mask_run_lengths(torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]]).bool()).tolist()
    [2, 1, 3]
    """
    m = torch.nn.functional.pad(mask.long(), (1, 1))
    d = m[:, 1:] - m[:, :-1]  # +1 at a run's first frame, -1 after its last
    starts, ends = (d == 1).nonzero(), (d == -1).nonzero()
    return ends[:, 1] - starts[:, 1]
