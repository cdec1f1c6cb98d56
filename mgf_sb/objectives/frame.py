"""Frame scale: by default, reconstruct masked log-Mel frames with L1.

The masked spans are long enough (TERA / Mockingjay: >= 70 ms, see
``frame_span_*_ms`` in hparams/mgf.yaml) that copying the visible neighbours
does not solve the task. The objective logs, beside its loss, the L1 of that
copying baseline on the same masked frames (``frame_interp_l1``), so a user
sees what the model adds over interpolation.

Besides time spans, two of TERA's alterations (off by default):
frequency-band masking (``frame_freq_mask_bins``: contiguous Mel bins hidden
over the whole sequence and reconstructed on every visible frame) and
magnitude alteration (``frame_noise_std``: Gaussian noise on the student's
input; the targets stay clean). With band masking the log shows the student's
L1 on the hidden bands (``frame_band_l1``) beside the band-interpolation
baseline (``frame_band_interp_l1``: each hidden bin filled by linear
interpolation between the visible bins of the same frame).
"""

import torch

from mgf_sb.masking import FrameAlteration, ms_to_frames
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


def band_interpolation(feats, band_bins, n_mels):
    """Fills hidden Mel bins by linear interpolation between the visible bins of the same frame.

    Arguments
    ---------
    feats : torch.Tensor
        (M, T, F) features, ``F = n_mels * frame_stack`` (each sub-frame's bins in turn).
    band_bins : torch.BoolTensor
        (M, n_mels) hidden bins of each sequence (every frame, every sub-frame).
    n_mels : int

    Returns
    -------
    torch.Tensor
        (M, T, F): visible bins as they are; a hidden bin between visible bins
        ``l < b < r`` is ``x[l] + (b - l) / (r - l) * (x[r] - x[l])``; at the edge
        of the spectrum the nearest visible bin; 0 when every bin is hidden.

    Example
    -------
    >>> x = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0]]])
    >>> band_interpolation(x, torch.tensor([[False, True, True, False, True]]), 5)[0, 0].tolist()
    [0.0, 1.0, 2.0, 3.0, 3.0]
    """
    M, T, F = feats.shape
    k = F // n_mels
    x = feats.reshape(M * T * k, n_mels, 1)
    visible = (~band_bins)[:, None, :].expand(M, T * k, n_mels).reshape(M * T * k, n_mels)
    return interpolate_from_neighbours(x, visible).reshape(M, T, F)


def band_scored_frames(batch, band, T):
    """(M, T) frames whose hidden bands the frame loss scores: valid, seen by the student, band-masked."""
    valid = torch.arange(T, device=band.device)[None, :] < batch.n_frames.to(band.device)[:, None]
    return valid & ~batch.input_mask[:, :T].to(band.device) & band.any(1)[:, None]


def band_interpolation_l1(feats, band, batch, n_mels):
    """L1 of the band-interpolation baseline on the hidden bins of the visible frames (``frame_band_interp_l1``).

    Arguments
    ---------
    feats : torch.Tensor
        (M, T, F) unaltered features (the targets).
    band : torch.BoolTensor
        (M, F) hidden channels (the same bins in every stacked sub-frame).
    batch : MGFBatch
        For the valid frames and the frames hidden by the time masks (those are
        scored whole, and not here).
    n_mels : int

    Returns
    -------
    float
        Mean absolute error over the hidden (frame, channel) elements; 0 when none.
    """
    T = feats.shape[1]
    frames = band_scored_frames(batch, band, T)
    sel = frames[..., None] & band[:, None, :]
    if not bool(sel.any()):
        return 0.0
    pred = band_interpolation(feats.float(), band[:, :n_mels], n_mels)
    return float((pred[sel] - feats.float()[sel]).abs().mean())


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

    def __init__(self, *args, span_min_ms=None, n_mels=None, freq_mask_bins=0, freq_mask_count=1, noise_std=0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        frame_ms = kwargs.get("frame_ms", 10.0)
        # runs shorter than the configured span are cut spans (frame_short_runs)
        self.short_run = None if span_min_ms is None else ms_to_frames(span_min_ms, frame_ms)
        self.alteration = None
        if freq_mask_bins or noise_std:
            feat_dim = args[1] if len(args) > 1 else kwargs["feat_dim"]
            n_mels = int(n_mels or feat_dim)
            if feat_dim % n_mels:
                raise ValueError(f"FrameObjective: feat_dim {feat_dim} is not a multiple of n_mels {n_mels}")
            if freq_mask_bins and (self.loss_type not in ("l1", "l2") or self.target != "fbank"):
                raise ValueError("frame_freq_mask_bins > 0 needs a reconstruction of the features "
                                 "(frame_loss: l1 or l2, frame_target: fbank): the hidden bins are the targets")
            self.alteration = FrameAlteration(n_mels, feat_dim // n_mels, freq_mask_bins, freq_mask_count, noise_std)

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
        if inputs.band_mask is not None:
            loss, stats = self._band_forward(inputs)
        else:
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

    def _band_forward(self, inputs):
        """Reconstruction of the time-masked frames (every channel) and of the hidden bands of the visible frames.

        The loss is the mean over every hidden (frame, channel) element, as TERA
        scores all altered positions: a time-masked frame counts F elements, a
        visible frame of a band-masked sequence its hidden channels.
        """
        batch, feats, band = inputs.batch, inputs.feats, inputs.band_mask.to(inputs.feats.device)
        h = self.layer_of(inputs.hidden)
        T = min(h.shape[1], feats.shape[1])
        time = batch.frame_mask[:, :T].to(feats.device)
        bands = band_scored_frames(batch, band, T)
        sel = time | bands
        if not bool(sel.any()):
            return h.sum() * 0.0, {"units": 0.0}
        row = torch.arange(feats.shape[0], device=feats.device)[:, None].expand_as(sel)[sel]
        pred = self.head(h[:, :T][sel]).float()
        tgt = feats[:, :T][sel].detach().float()
        weight = torch.where(time[sel][:, None], torch.ones_like(pred), band[row].to(pred.dtype))
        err = (pred - tgt).abs() if self.loss_type == "l1" else (pred - tgt) ** 2
        loss = (err * weight).sum() / weight.sum()
        stats = {"units": float(sel.sum())}
        on_band = ~time[sel][:, None] & band[row]
        if bool(on_band.any()):
            with torch.no_grad():
                stats["band_l1"] = float((pred - tgt).abs()[on_band].mean())
                stats["band_interp_l1"] = band_interpolation_l1(feats, band, batch, self.alteration.n_mels
                                                                if self.alteration is not None else feats.shape[-1])
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
