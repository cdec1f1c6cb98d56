"""One MGF pretraining forward pass, shared by the recipe and the benchmark, and the
run's diagnostics: per-scale encoder gradient norms, their automatic balancing,
and the order of the validation batches."""

import math

import numpy as np
import torch

from mgf_sb.distributed import unwrap
from mgf_sb.objectives.base import ObjectiveInputs


def view_channel_fn(n_knots=6, eq_db=3.0, gain_db=3.0, noise_floor_db=(30.0, 50.0), generator=None):
    """The ``view_channel`` switch's callable for :meth:`FeatureExtractor.forward`: each row of
    unnormalised log-Mel (each distinct view of the batch) through its own random channel
    (:func:`mgf_sb.view_channel.random_log_mel_channel`, the level measured on valid frames),
    so that two views of one utterance cannot be matched by their shared recording channel."""
    from mgf_sb.view_channel import random_log_mel_channel

    floor = None if noise_floor_db is None else tuple(float(v) for v in noise_floor_db)

    def channel(log_mel, n_fbank_frames):
        return random_log_mel_channel(log_mel, n_knots=int(n_knots), eq_db=float(eq_db), gain_db=float(gain_db),
                                      noise_floor_db=floor, generator=generator, n_frames=n_fbank_frames)

    return channel


def mgf_forward(features, encoder, target, batch, needs_teacher, epoch=None, context_baseline=False,
                alteration=None, channel=None):
    """Features -> masked student encoding (+ teacher encoding of the unmasked views).

    Features and the teacher run once per distinct view (U); the student runs on
    every masked copy (M = K * U), see :class:`~mgf_sb.batch.MGFBatch`. With
    ``target.input == "complement"`` the teacher runs on every copy instead,
    seeing only that copy's phoneme (and word) spans.

    Arguments
    ---------
    features : FeatureExtractor
    encoder : MGFEncoder (or its DDP wrapper)
    target : TargetNetwork
    batch : MGFBatch
    needs_teacher : bool
        Whether an enabled objective uses ``target: teacher``.
    epoch : int, optional
        For the normaliser's statistics schedule (training only).
    context_baseline : bool
        Also run the teacher on the student's *masked* input (``teacher_masked``,
        for the ``<scale>_context_acc`` diagnostic); costs one more no-grad
        teacher pass over every masked copy, so the recipe asks for it on its
        diagnostic batches only.
    alteration : mgf_sb.masking.FrameAlteration, optional
        The frame scale's band masking / noise on the student's input
        (``ScaleSet.input_alteration``; None: the features as they are).
    channel : callable, optional
        Each distinct view's own random channel on its unnormalised log-Mel (training with
        ``view_channel: True``; :func:`view_channel_fn`). Applied once per view (row of
        ``batch.wavs``), before the copies are taken: a view's mask copies, its teacher pass and
        the frame scale's reconstruction target all see that view's channel.

    Returns
    -------
    ObjectiveInputs
    """
    if channel is None:  # the call as before the switch (FeatureExtractor-like callables without it)
        feats_u, n_u = features(batch.wavs, batch.wav_lens, epoch=epoch)
    else:
        feats_u, n_u = features(batch.wavs, batch.wav_lens, epoch=epoch, channel=channel)
    feats, n_frames = feats_u[batch.source], n_u[batch.source]
    student, band = (feats, None) if alteration is None else alteration(feats, n_frames)
    # the utterance branch sees no mask: it reads each distinct view once, not each of its mask copies
    hidden = encoder(student, n_frames, mask=batch.input_mask, views=(feats_u, n_u))
    n_trunk = unwrap(encoder).num_layers + 1  # the utterance branch's blocks come after the trunk's layers
    hidden, branch = hidden[:n_trunk], [b[batch.source] for b in hidden[n_trunk:]] or None
    teacher = None
    if needs_teacher:
        if getattr(target, "input", "unmasked") == "complement":
            # the teacher sees only the scored spans, the student everything else: no shared frame
            valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < n_frames[:, None]
            hidden_from_student = (batch.span_mask | batch.word_mask)[:, : feats.shape[1]]
            teacher = target(unwrap(encoder), feats, n_frames, mask=valid & ~hidden_from_student)
        else:
            teacher = target(unwrap(encoder), feats_u, n_u)[batch.source]
    teacher_masked = student_masked = None
    if needs_teacher and context_baseline:
        teacher_masked = target(unwrap(encoder), student, n_frames, mask=batch.input_mask)
        student_masked = target.read([h.detach() for h in hidden], n_frames)
    return ObjectiveInputs(hidden=hidden, branch=branch, feats=feats, teacher=teacher, batch=batch, encoder=unwrap(encoder),
                          teacher_masked=teacher_masked, student_masked=student_masked,
                          input_feats=None if alteration is None else student,
                          band_mask=band, diagnostics=context_baseline)


def scale_grad_norms(losses, params):
    """Norm of each loss's gradient on ``params`` (the shared encoder), the graph kept for backward.

    Arguments
    ---------
    losses : dict
        name -> scalar loss tensor (weighted as it enters the total, for the gradient the encoder receives).
    params : list of torch.nn.Parameter

    Returns
    -------
    dict
        name -> float L2 norm over all of ``params`` (0 for a loss that does not reach them).
    """
    params = [p for p in params if p.requires_grad]
    out = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        out[name] = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
    return out


class ScaleBalancer(torch.nn.Module):
    """Loss-weight factors that give each scale a set share of the encoder's gradient.

    ``mode: none``: every factor is 1 (the YAML weights act alone).
    ``mode: grad_norm``: each scale's measured (unweighted) encoder gradient
    norm is averaged over the diagnostic steps (exponential running mean,
    ``momentum``), and its loss is multiplied by ``mean_s(G_s) / G_s``: every
    scale then reaches the encoder with a gradient norm of about
    ``weight_s x mean(G)``, so the YAML weights become the scales' *shares* of
    the gradient instead of multipliers of losses of unrelated sizes. (A
    GradNorm-like rule without its learned weights: Chen et al., 2018.)

    Arguments
    ---------
    scales : iterable of str
        The enabled scales (e.g. the ``ScaleSet``).
    mode : str
        ``none`` or ``grad_norm``.
    momentum : float
        Weight of the old running mean at each measurement.
    max_factor : float
        Factors are kept in ``[1 / max_factor, max_factor]`` (a scale whose
        gradient is near zero, e.g. nothing masked yet, is not blown up).
    """

    MODES = ("none", "grad_norm")

    def __init__(self, scales, mode="none", momentum=0.9, max_factor=100.0):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"scale_balance must be one of {self.MODES}, got {mode!r} (hparams/mgf.yaml)")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"scale_balance_momentum must be in [0, 1), got {momentum}")
        self.names = [str(k) for k in scales]
        if not float(max_factor) >= 1.0:
            raise ValueError(f"scale_balance_max_factor must be >= 1, got {max_factor}")
        self.mode, self.momentum, self.max_factor = mode, float(momentum), float(max_factor)
        self.register_buffer("running", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(len(self.names), dtype=torch.bool))

    def observe(self, norms):
        """Updates the running means with ``{name: unweighted encoder gradient norm}``."""
        for i, name in enumerate(self.names):
            if name not in norms or not math.isfinite(norms[name]):
                continue
            g = float(norms[name])
            self.running[i] = g if not bool(self.seen[i]) else self.momentum * self.running[i] + (1 - self.momentum) * g
            self.seen[i] = True

    def factors(self):
        """``{name: factor}`` to multiply each scale's weighted loss by (1 until measured)."""
        if self.mode == "none" or not bool(self.seen.all()) or len(self.names) < 2:
            return {n: 1.0 for n in self.names}
        g = self.running.clamp(min=1e-12)
        ref = float(g.mean())
        return {n: min(max(ref / float(g[i]), 1.0 / self.max_factor), self.max_factor)
                for i, n in enumerate(self.names)}


def mixed_valid_order(n_items, seed):
    """A fixed permutation of ``range(n_items)`` (seeded): validation batches mix speakers.

    Manifests list a speaker's files together, so batches of consecutive rows
    hold one voice and the utterance scale's validation accuracy is then below
    chance; a fixed shuffle makes valid batches look like training batches
    while every epoch still sees the same batches.

    >>> mixed_valid_order(5, 0) == mixed_valid_order(5, 0), sorted(mixed_valid_order(5, 0))
    (True, [0, 1, 2, 3, 4])
    """
    return np.random.default_rng(int(seed)).permutation(int(n_items)).tolist()


# Per-batch statistics the recipe logs per epoch (beside each scale's loss), by name ending.
LOGGED_STATS = ("_acc", "_interp_l1", "_ppl", "_short_runs", "_run_frames", "_negatives", "_grad_norm", "_band_l1",
                "_pos_ratio", "_prior")


class EpochStats:
    """Means of per-batch statistics over an epoch, each over the batches that reported it.

    Diagnostics computed every few steps (gradient norms, the context-only
    baseline) are averaged over their own batches, not diluted by the others.
    Under DDP the sums and counts of every process are added (the union of the
    names any process reported), so every process logs the same means.
    """

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name, value):
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + 1

    def reduced(self):
        """``{name: mean}`` over every process."""
        from mgf_sb.distributed import ddp_sum

        names = set(self.sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, sorted(names))
            names = set().union(*map(set, every))
        names = sorted(names)
        totals = ddp_sum([self.sums.get(k, 0.0) for k in names] + [float(self.counts.get(k, 0)) for k in names])
        sums, counts = totals[: len(names)], totals[len(names) :]
        return {k: s / c for k, s, c in zip(names, sums, counts) if c > 0}
