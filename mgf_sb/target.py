"""Stop-gradient target network for the teacher-based targets (phoneme scale).

Two modes, chosen in YAML:
- ``ema``: a copy of the encoder whose weights follow the online encoder by an
  exponential moving average (data2vec / BYOL), with one of two decay schedules
  (``schedule``): ``ramp`` - the decay rises linearly from ``ema_start`` to
  ``ema_end`` over ``ema_steps`` optimiser steps, then stays (data2vec's
  schedule; in a run of a few thousand steps the teacher then keeps most of
  its random initial weights) - or ``half_life``: a constant decay
  ``tau = 0.5 ** (1 / (half_life_fraction * total_steps))``, so the initial
  weights' share of the teacher halves every ``half_life_fraction`` of the run,
  whatever its length (0.05: 25 % left after a tenth of the run, 1e-6 at its end).
- ``online``: the online encoder itself, run without gradient and in eval mode.
Either way the target sees the *unmasked* input, and no gradient reaches it.

Which weights are averaged (``scope``): ``encoder`` averages every encoder
parameter; ``layers`` follows data2vec (fairseq ``data2vec_audio.py``,
``ema_transformer_only`` and ``ema_layers_only`` both True by default): its EMA
model is the Transformer encoder alone - the teacher reads the *student's*
feature extractor and input projection (``post_extract_proj``), and the
positional convolution is in ``skip_keys``, i.e. copied from the student at
every step, not averaged - while the Transformer layers and the encoder's
LayerNorm are averaged. Here: ``input_proj`` (and the unused ``mask_emb``) and
the positional convolution ``pos`` are copied, ``input_norm`` and the
Transformer layers averaged. The feature normaliser is never part of the
teacher (both read the same normalised features).

The run's log shows how far the teacher is from its start:
``teacher_init_share`` (the product of the decays so far: the share of the
initial weights still in the averaged parameters), ``teacher_init_dist``
(``||teacher - initial|| / ||initial||`` over all its parameters) and
``teacher_half_life`` (the current decay's half-life in optimiser steps).
"""

import copy
import math

import torch
import torch.nn.functional as F

SCHEDULES = ("ramp", "half_life")
SCOPES = ("encoder", "layers")
LAYER_NORMS = ("auto", "instance", "none")
FINAL_NORMS = ("none", "instance", "layer")
INPUTS = ("unmasked", "complement")
COPIED_IN_LAYERS_SCOPE = ("input_proj.", "mask_emb", "pos.")  # data2vec: the student's, not averaged


class TargetNetwork(torch.nn.Module):
    """Produces teacher representations of unmasked features.

    Arguments
    ---------
    mode : str
        ``"ema"`` or ``"online"``.
    top_k_layers : int
        The target is the mean of the top-k layers; 1 = the last layer.
    ema_start, ema_end : float
        ``ramp`` schedule: EMA decay at step 0 and after ``ema_steps`` steps.
    ema_steps : int
    schedule : str
        ``ramp`` or ``half_life`` (see the module docstring).
    half_life_fraction : float
        ``half_life`` schedule: the initial weights' half-life as a fraction of ``total_steps``.
    total_steps : int
        Optimiser steps of the run (the recipe resolves it from the data).
    scope : str
        ``encoder`` (average every parameter) or ``layers`` (data2vec: average the
        Transformer and its input LayerNorm, copy the input projection and the
        positional convolution from the student).
    layer_norm : str
        Per-layer normalisation before averaging the top-k layers: ``instance``
        (over time, per sequence and channel, data2vec), ``none``, or ``auto``
        (instance when ``top_k_layers > 1``, none for one layer).
    final_norm : str
        Normalisation of the averaged target: ``none``, ``instance`` (data2vec's
        ``instance_norm_targets``: removes each sequence's per-channel offset, so
        a constant channel or voice colour cannot identify its spans) or ``layer``.
    input : str
        What the teacher sees for its targets: ``unmasked`` (the whole view,
        data2vec; a span's target then carries the context the student sees
        around the mask) or ``complement`` (only the frames of the spans the
        teacher-target scales score, every other frame masked: the targets hold
        nothing the student sees, so context alone cannot pick them; the teacher
        then runs on every masked copy, not once per view). See
        :func:`mgf_sb.pretraining.mgf_forward`.
    scale_layers : dict, optional
        ``{scale: layers}``: a scale's own target layers instead of the shared
        target (the mean of the top ``top_k_layers``). ``layers`` is a list of
        indices into the teacher's outputs (0: the input embedding, 1..L: the
        layers, -1: the last), averaged with the same per-layer and final
        normalisation; None: the shared target. When any scale has its own
        layers, :meth:`forward` returns the shared target and each distinct
        layer set side by side on the last axis (``slots`` of ``D`` channels,
        the shared one first); each objective reads its slot (:meth:`slot`,
        :func:`teacher_slot`). None or all None (default): one target, as before.
    """

    def __init__(self, mode="ema", top_k_layers=1, ema_start=0.999, ema_end=0.9999, ema_steps=10000,
                 schedule="ramp", half_life_fraction=0.05, total_steps=None, scope="encoder", layer_norm="auto",
                 final_norm="none", input="unmasked", scale_layers=None):
        super().__init__()
        if mode not in ("ema", "online"):
            raise ValueError(f"target mode must be 'ema' or 'online', got {mode!r}")
        for key, value, allowed in (("ema_schedule", schedule, SCHEDULES), ("ema_scope", scope, SCOPES),
                                    ("target_layer_norm", layer_norm, LAYER_NORMS),
                                    ("target_final_norm", final_norm, FINAL_NORMS), ("target_input", input, INPUTS)):
            if value not in allowed:
                raise ValueError(f"{key}: {value!r} is not one of {allowed} (hparams/mgf.yaml)")
        if schedule == "half_life" and not 0 < float(half_life_fraction):
            raise ValueError(f"ema_half_life_fraction must be > 0, got {half_life_fraction}")
        self.mode = mode
        self.top_k_layers = top_k_layers
        self.ema_start, self.ema_end, self.ema_steps = ema_start, ema_end, ema_steps
        self.schedule, self.half_life_fraction, self.total_steps = schedule, float(half_life_fraction), total_steps
        self.scope, self.layer_norm, self.final_norm, self.input = scope, layer_norm, final_norm, input
        # Per-scale target layers: the distinct layer sets, in order of first use (sorted scale names).
        self.scale_layers = {}
        self.layer_sets = []
        for name, layers in sorted((scale_layers or {}).items()):
            if layers is None:
                continue
            if isinstance(layers, int):
                layers = [layers]
            layers = tuple(int(i) for i in layers)
            if not layers:
                raise ValueError(f"{name}_target_layers: give at least one layer index, or null (the shared target)")
            if layers not in self.layer_sets:
                self.layer_sets.append(layers)
            self.scale_layers[str(name)] = layers
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # log of the product of the decays applied so far (the initial weights' share of the teacher)
        self.register_buffer("log_init_share", torch.zeros((), dtype=torch.float64))
        self.teacher = None  # built lazily from the online encoder

    def attach(self, encoder):
        """Creates the EMA copy of ``encoder`` (no-op in online mode) and keeps its initial weights.

        Call once, before the checkpointer restores a saved teacher.
        """
        if self.mode == "ema" and self.teacher is None:
            self.teacher = copy.deepcopy(encoder)
            self.teacher.requires_grad_(False)
        if not hasattr(self, "init_params"):  # for teacher_init_dist
            flat = torch.cat([p.detach().float().reshape(-1) for p in encoder.parameters()])
            self.register_buffer("init_params", flat.clone())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints written before the distance diagnostic have no initial weights / share:
        # keep loading them (the diagnostics then read NaN).
        for key in ("init_params", "log_init_share"):
            if prefix + key not in state_dict and hasattr(self, key):
                getattr(self, key).fill_(float("nan"))
                state_dict[prefix + key] = getattr(self, key).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def decay(self, step=None):
        """EMA decay used by the update after ``step`` optimiser steps (default: the current one).

        ``ramp``: ``ema_start`` at step 0, linear to ``ema_end`` at step ``ema_steps``,
        then constant (data2vec anneals over tens of thousands of steps on 960 h; the
        recipe sets ``ema_steps`` to ``ema_anneal_fraction`` of the total steps).
        ``half_life``: ``0.5 ** (1 / (half_life_fraction * total_steps))`` at every step.
        """
        if self.schedule == "half_life":
            if not self.total_steps:
                raise ValueError("TargetNetwork.total_steps is not set: the pretraining recipe resolves it from the "
                                 "data; give a count when used directly (ema_schedule: half_life)")
            return 0.5 ** (1.0 / max(self.half_life_fraction * float(self.total_steps), 1e-9))
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
        self.log_init_share += math.log(d) if d > 0 else float("-inf")
        averaged, copied = [], []
        for (name, t), o in zip(self.teacher.named_parameters(), encoder.parameters()):
            if self.scope == "layers" and name.startswith(COPIED_IN_LAYERS_SCOPE):
                copied.append((t, o.detach().to(t.dtype)))
            else:
                averaged.append((t, o.detach().to(t.dtype)))
        if averaged:
            t_params, o_params = [t for t, _ in averaged], [o for _, o in averaged]
            torch._foreach_mul_(t_params, d)
            torch._foreach_add_(t_params, o_params, alpha=1.0 - d)
        for t, o in copied:
            t.copy_(o)

    @torch.no_grad()
    def init_stats(self, encoder):
        """How far the teacher is from its initial weights (``teacher_*``), and the student (``encoder_init_dist``).

        ``teacher_init_share``: product of the decays so far (the initial weights' share
        of the averaged parameters; 0 in online mode, where the teacher is the
        student); ``teacher_init_dist``: ``||theta - theta_0|| / ||theta_0||`` over the
        teacher's parameters (the student's in online mode), ``encoder_init_dist`` the same
        for the student (the teacher cannot be much further); ``teacher_half_life``: the
        half-life in optimiser steps of the decay the next update uses
        (``log 0.5 / log tau``: how many steps the teacher lags behind).
        """
        out = {"teacher_init_share": math.exp(float(self.log_init_share)) if self.mode == "ema" else 0.0}
        if hasattr(self, "init_params"):
            nets = {"teacher": self.teacher if self.mode == "ema" else encoder, "encoder": encoder}
            for name, net in nets.items():
                flat = torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])
                if flat.shape == self.init_params.shape:
                    dist = (flat.to(self.init_params.device) - self.init_params).norm()
                    out[f"{name}_init_dist"] = float(dist / self.init_params.norm().clamp(min=1e-12))
        if self.mode == "ema":
            try:
                tau = float(self.decay())
                out["teacher_half_life"] = math.log(0.5) / math.log(tau) if 0 < tau < 1 else float("inf")
            except ValueError:  # schedule not resolved (used outside the recipe)
                pass
        return out

    @property
    def n_slots(self):
        """Targets side by side in :meth:`forward`'s output: the shared one + each distinct per-scale layer set."""
        return 1 + len(self.layer_sets)

    def slot(self, scale):
        """Which slot of :meth:`forward`'s output is ``scale``'s target (0: the shared target)."""
        layers = self.scale_layers.get(str(scale))
        return 0 if layers is None else 1 + self.layer_sets.index(layers)

    def normalised_over_time(self, scale):
        """True when ``scale``'s target is instance-normalised over time (each channel's mean over a
        sequence removed): then its mean over a sequence is 0 for every sequence, which a scale that
        pools the target over time (the utterance scale's ``teacher`` target) cannot learn from."""
        layers = self.scale_layers.get(str(scale))
        k = self.top_k_layers if layers is None else len(layers)
        per_layer = self.layer_norm if self.layer_norm != "auto" else ("instance" if k > 1 else "none")
        return per_layer == "instance" or self.final_norm == "instance"

    def combine(self, hidden, n_frames, layers=None):
        """Teacher outputs -> one target: the chosen layers normalised and averaged.

        Arguments
        ---------
        hidden : list of torch.Tensor
            The encoder's outputs, each (B, T, D).
        n_frames : torch.LongTensor
            (B,) valid frames.
        layers : tuple of int, optional
            Indices into ``hidden``; None: the top ``top_k_layers``.

        Returns
        -------
        torch.Tensor
            (B, T, D) target, zero on padding.
        """
        if layers is None:
            chosen = hidden[-self.top_k_layers :]
        else:
            bad = [i for i in layers if not -len(hidden) <= i < len(hidden)]
            if bad:
                raise ValueError(f"target layers {list(layers)}: {bad} out of range for an encoder with "
                                 f"{len(hidden)} outputs (0: input embedding .. {len(hidden) - 1}: last layer, "
                                 f"or negative from the end; <scale>_target_layers in hparams/mgf.yaml)")
            chosen = [hidden[i] for i in layers]
        k = len(chosen)
        per_layer = self.layer_norm if self.layer_norm != "auto" else ("instance" if k > 1 else "none")
        if per_layer == "instance":
            chosen = [instance_norm(h, n_frames) for h in chosen]
        target = torch.stack(chosen).mean(0)
        if self.final_norm == "instance":
            target = instance_norm(target, n_frames)
        elif self.final_norm == "layer":
            target = layer_norm_target(target)
        valid = torch.arange(target.shape[1], device=target.device)[None, :] < n_frames[:, None]
        return target * valid[..., None]

    @torch.no_grad()
    def forward(self, encoder, feats, n_frames, mask=None):
        """Teacher targets for every frame.

        Arguments
        ---------
        encoder : MGFEncoder
            The online encoder (used in ``online`` mode).
        feats : torch.Tensor
            (B, T, F) unmasked features.
        n_frames : torch.LongTensor
            (B,) valid frames.
        mask : torch.BoolTensor, optional
            (B, T) frames replaced by the mask embedding: the teacher then sees
            what the student sees (the context-only baseline), not the targets.

        Returns
        -------
        torch.Tensor
            (B, T, D) detached targets, zero on padding; (B, T, D * n_slots)
            with per-scale target layers (``scale_layers``): the shared target,
            then each distinct layer set (see :func:`teacher_slot`).
        """
        net = self.teacher if self.mode == "ema" else encoder
        was_training = net.training
        net.eval()
        try:
            hidden = net(feats, n_frames, mask=mask, branch=False)  # targets come from the trunk
        finally:
            net.train(was_training)
        return self.read(hidden, n_frames)

    @torch.no_grad()
    def read(self, hidden, n_frames):
        """Any encoder's outputs read as the targets are (the shared target, then each scale's own
        layer set): :meth:`forward` on the teacher's; on the student's, the ``self_context_acc``
        diagnostic. (B, T, D * n_slots), detached."""
        target = self.combine(hidden, n_frames)
        if self.layer_sets:
            target = torch.cat([target] + [self.combine(hidden, n_frames, layers) for layers in self.layer_sets], -1)
        return target.detach()


def teacher_slot(teacher, slot=0, n_slots=1):
    """One scale's target out of :meth:`TargetNetwork.forward`'s output.

    Arguments
    ---------
    teacher : torch.Tensor
        (..., D * n_slots) the targets side by side (or None).
    slot, n_slots : int
        Which one, of how many (one: ``teacher`` itself).

    Returns
    -------
    torch.Tensor
        (..., D).

    >>> teacher_slot(torch.arange(6.0).reshape(1, 6), 1, 3).tolist()
    [[2.0, 3.0]]
    """
    if teacher is None or n_slots == 1:
        return teacher
    d = teacher.shape[-1] // n_slots
    return teacher[..., slot * d : (slot + 1) * d]


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
