"""Stop-gradient target network for the teacher-based targets (phoneme scale).

Two modes, chosen in YAML:
- ``ema``: a copy of the encoder whose weights follow the online encoder by an
  exponential moving average (data2vec / BYOL); the decay ramps from
  ``ema_start`` to ``ema_end`` over ``ema_steps`` optimiser steps.
- ``online``: the online encoder itself, run without gradient and in eval mode.
Either way the target sees the *unmasked* input, and no gradient reaches it.
"""

import copy

import torch
import torch.nn.functional as F


class TargetNetwork(torch.nn.Module):
    """Produces teacher representations of unmasked features.

    Arguments
    ---------
    mode : str
        ``"ema"`` or ``"online"``.
    top_k_layers : int
        The target is the mean of the top-k layers, each instance-normalised
        over time (data2vec); 1 = the last layer.
    ema_start, ema_end : float
        EMA decay at step 0 and after ``ema_steps`` steps.
    ema_steps : int
    """

    def __init__(self, mode="ema", top_k_layers=1, ema_start=0.999, ema_end=0.9999, ema_steps=10000):
        super().__init__()
        if mode not in ("ema", "online"):
            raise ValueError(f"target mode must be 'ema' or 'online', got {mode!r}")
        self.mode = mode
        self.top_k_layers = top_k_layers
        self.ema_start, self.ema_end, self.ema_steps = ema_start, ema_end, ema_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.teacher = None  # built lazily from the online encoder

    def attach(self, encoder):
        """Creates the EMA copy of ``encoder`` (no-op in online mode).

        Call once, before the checkpointer restores a saved teacher.
        """
        if self.mode == "ema" and self.teacher is None:
            self.teacher = copy.deepcopy(encoder)
            self.teacher.requires_grad_(False)
        return self

    def decay(self, step=None):
        """EMA decay used by the update after ``step`` optimiser steps (default: the current one).

        Linear ramp: ``ema_start`` at step 0, ``ema_end`` from step ``ema_steps`` on
        (data2vec anneals over tens of thousands of steps on 960 h; the
        recipe sets ``ema_steps`` to ``ema_anneal_fraction`` of the total steps).
        """
        if self.ema_steps is None:
            raise ValueError("TargetNetwork.ema_steps is not set (null in the YAML): the pretraining recipe "
                             "resolves it from the data (ema_anneal_fraction); give a count when used directly")
        step = float(self.step) if step is None else float(step)
        frac = min(step / max(self.ema_steps, 1), 1.0)
        return self.ema_start + frac * (self.ema_end - self.ema_start)

    @torch.no_grad()
    def update(self, encoder):
        """One EMA step toward ``encoder``'s weights (call after optimizer.step).

        The decay is read *before* the step counter moves, so the first update
        uses ``ema_start``.
        """
        if self.mode != "ema":
            self.step += 1
            return
        d = self.decay()
        self.step += 1
        t_params = list(self.teacher.parameters())
        o_params = [p.detach().to(t.dtype) for p, t in zip(encoder.parameters(), t_params)]
        torch._foreach_mul_(t_params, d)
        torch._foreach_add_(t_params, o_params, alpha=1.0 - d)

    @torch.no_grad()
    def forward(self, encoder, feats, n_frames):
        """Teacher targets for every frame.

        Arguments
        ---------
        encoder : MGFEncoder
            The online encoder (used in ``online`` mode).
        feats : torch.Tensor
            (B, T, F) unmasked features.
        n_frames : torch.LongTensor
            (B,) valid frames.

        Returns
        -------
        torch.Tensor
            (B, T, D) detached targets, zero on padding.
        """
        net = self.teacher if self.mode == "ema" else encoder
        was_training = net.training
        net.eval()
        try:
            hidden = net(feats, n_frames)
        finally:
            net.train(was_training)
        layers = hidden[-self.top_k_layers :]
        if self.top_k_layers > 1:
            layers = [instance_norm(h, n_frames) for h in layers]
        target = torch.stack(layers).mean(0)
        valid = torch.arange(target.shape[1], device=target.device)[None, :] < n_frames[:, None]
        return (target * valid[..., None]).detach()


def instance_norm(h, n_frames, eps=1e-5):
    """Normalises (B, T, D) per sequence and channel over its valid frames."""
    valid = (torch.arange(h.shape[1], device=h.device)[None, :] < n_frames[:, None])[..., None].float()
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (h * valid).sum(1, keepdim=True) / n
    var = (((h - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return (h - mean) / torch.sqrt(var + eps)


def layer_norm_target(h):
    """Parameter-free LayerNorm over features, for regression targets."""
    return F.layer_norm(h, h.shape[-1:])
