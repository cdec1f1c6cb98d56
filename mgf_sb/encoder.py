"""The MGF encoder: SpeechBrain's TransformerEncoder over (masked) features.

It returns every layer, because the best layer for a downstream task is often
not the last (speaker and phone probes like early layers).
"""

import torch
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder
from speechbrain.nnet.attention import MultiheadAttention


class _NoWeightsMHA(MultiheadAttention):
    """SpeechBrain's MultiheadAttention without returning attention weights.

    Asking torch for the (heads, T, T) weights forces the slow path that
    materialises them; without them torch uses scaled_dot_product_attention
    (flash / memory-efficient kernels). Same parameters, same state_dict.
    """

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, return_attn_weights=False,
                pos_embs=None):
        out = super().forward(query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              return_attn_weights=False, pos_embs=pos_embs)
        return out, None


POS_NORMS = ("none", "weight")
# x-vector's first four frame layers, (kernel, dilation): the utterance branch's blocks; blocks past
# the fourth are (1, 1), frame-wise
BRANCH_KERNELS = ((5, 1), (3, 2), (3, 3), (1, 1))


BRANCH_NORMS = ("layer", "batch")
BRANCH_INPUTS = ("shared", "own", "branch_only")
TRUNK_ADAPTERS = ("linear", "mlp", "own_proj")


class ValidFramesBatchNorm(torch.nn.Module):
    """BatchNorm over the valid frames of a batch: statistics per channel from every frame of every
    sequence up to its length (the padding neither counts nor changes), all DDP processes together
    (:class:`~mgf_sb.distributed.GlobalBatchNorm1d`); running statistics in eval mode, so a frame's
    output does not depend on its batch at inference. Unlike LayerNorm it keeps each frame's level
    and spectral offset, where a speaker partly lives (the reference TDNN normalises the same way)."""

    def __init__(self, channels):
        super().__init__()
        from mgf_sb.distributed import GlobalBatchNorm1d

        self.bn = GlobalBatchNorm1d(channels)

    def forward(self, h, valid):
        """(B, T, C), (B, T, 1) bool -> (B, T, C), zero past each length."""
        flat = valid.squeeze(-1)
        out = h.new_zeros(h.shape)
        out[flat] = self.bn(h[flat]).to(h.dtype)
        return out


class TDNNBranch(torch.nn.Module):
    """The utterance scale's own path: x-vector-style TDNN blocks beside the Transformer.

    It reads the input projection of every frame (no mask, no positional term: the
    speaker is still there, RESULTS.md "Where the speaker goes") and shares nothing
    else with the trunk, so the utterance loss does not pull the masked scales'
    layers toward "which voice" (the trade measured in RESULTS.md v3.3). Each block
    is ``Conv1d`` (zero "same" padding) -> ReLU -> LayerNorm, and frames past a
    sequence's length are zeroed after every block, so a frame's output does not
    depend on its batch (SpeechBrain's ``TDNNBlock`` pads by reflection and
    normalises with batch statistics that would count the padding). At 50 Hz the
    four x-vector blocks see 15 frames (300 ms).

    Arguments
    ---------
    d_model : int
        Input and output channels of every block (the exposed layers all have one size).
    num_blocks : int
    norm : str
        ``layer`` (LayerNorm over each frame's channels) or ``batch``
        (:class:`ValidFramesBatchNorm`, x-vector's choice: keeps each frame's level).

    Example
    -------
    >>> branch = TDNNBranch(8, 2)
    >>> hs = branch(torch.randn(3, 20, 8), torch.tensor([20, 7, 1]))
    >>> len(hs), hs[-1].shape, float(hs[-1][1, 7:].abs().sum())
    (2, torch.Size([3, 20, 8]), 0.0)
    """

    def __init__(self, d_model, num_blocks=4, norm="layer"):
        super().__init__()
        if norm not in BRANCH_NORMS:
            raise ValueError(f"branch_norm must be one of {BRANCH_NORMS}, got {norm!r} (hparams/mgf.yaml)")
        kernels = [BRANCH_KERNELS[i] if i < len(BRANCH_KERNELS) else (1, 1) for i in range(num_blocks)]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv1d(d_model, d_model, k, dilation=d, padding=d * (k - 1) // 2) for k, d in kernels
        )
        self.batch_norm = norm == "batch"
        self.norms = torch.nn.ModuleList(
            ValidFramesBatchNorm(d_model) if self.batch_norm else torch.nn.LayerNorm(d_model) for _ in kernels)

    def forward(self, x, n_frames):
        """(B, T, D) embedding, (B,) valid frames -> list of ``num_blocks`` tensors (B, T, D)."""
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < n_frames.to(x.device)[:, None])[..., None]
        out = []
        h = x.masked_fill(~valid, 0.0)
        for conv, norm in zip(self.convs, self.norms):
            h = torch.relu(conv(h.transpose(1, 2)).transpose(1, 2))
            h = norm(h, valid) if self.batch_norm else norm(h).masked_fill(~valid, 0.0)
            out.append(h)
        return out


class ConvPositionalEncoding(torch.nn.Module):
    """wav2vec 2.0-style relative position: a grouped convolution over time.

    Unlike a sinusoidal table it has no maximum length, so a 10-minute file is
    no special case.

    Arguments
    ---------
    d_model : int
    kernel_size : int (odd)
    groups : int
    norm : str
        ``none`` (a plain convolution) or ``weight``: wav2vec 2.0's weight norm
        over the kernel dimension (``weight_norm(conv, dim=2)``: one learned
        magnitude per kernel position, each position's filter bank of unit
        direction). Same initial output; the magnitude is then a parameter of
        its own (``pos.conv.parametrizations.weight.original0``).
    scale_init : float, optional
        A learnable scalar gate ``s`` on the output (``s * GELU(conv(x))``),
        started at this value (e.g. 0.1: the positional term starts small
        beside the frame's own embedding). None: no gate (no parameter).
    """

    def __init__(self, d_model, kernel_size=65, groups=16, norm="none", scale_init=None):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_pos_kernel must be odd, got {kernel_size}")
        if norm not in POS_NORMS:
            raise ValueError(f"conv_pos_norm must be one of {POS_NORMS}, got {norm!r} (hparams/mgf.yaml)")
        self.conv = torch.nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=groups)
        if norm == "weight":
            self.conv = torch.nn.utils.parametrizations.weight_norm(self.conv, name="weight", dim=2)
        self.act = torch.nn.GELU()
        self.scale = None if scale_init is None else torch.nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x):
        """(B, T, D) -> (B, T, D) positional signal to add to ``x``."""
        out = self.act(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return out if self.scale is None else out * self.scale.to(out.dtype)


def scale_grad(x, scale):
    """``x`` unchanged forward; its gradient times ``scale`` backward (wav2vec 2.0's ``feature_grad_mult``)."""
    return x if scale == 1 else x.detach() + scale * (x - x.detach())


class MGFEncoder(torch.nn.Module):
    """Transformer encoder over features, with a learned mask embedding.

    Arguments
    ---------
    input_size : int
        Feature dimension (n_mels * frame_stack).
    d_model, num_layers, nhead, d_ffn : int
        Transformer size.
    dropout : float
    layerdrop_prob : float
    conv_pos_kernel, conv_pos_groups : int
        Convolutional positional encoding.
    conv_pos_norm : str
        ``none`` (default) or ``weight`` (wav2vec 2.0's weight norm over the
        kernel dimension), see :class:`ConvPositionalEncoding`.
    conv_pos_scale_init : float, optional
        Initial value of a learnable scalar gate on the positional term
        (None, default: no gate).
    branch_layers : int
        Blocks of the utterance scale's own :class:`TDNNBranch` (0, default: no
        branch). Its blocks are exposed after the Transformer's layers (see
        :meth:`forward`), so probes and weighted-sum heads see them as layers.
    branch_norm : str
        The branch's normalisation, ``layer`` (default) or ``batch``.
    branch_input : str
        ``shared`` (default): the branch reads the trunk's input projection (the one
        parameter the two paths share); ``own``: a projection of its own, so nothing the
        masked scales train reaches the branch, nor the utterance loss the trunk;
        ``branch_only``: the input projection is the utterance scale's alone (the trunk
        reads it through a linear adapter of its own, started as the identity, with the
        projection's gradient stopped): the lowest level is shaped for the speaker and the
        masked scales, losing no information (the projection has full rank), adapt to it.
    trunk_adapter : str
        How the trunk reads the projection with ``branch_input: branch_only``:
        ``linear`` (default, the adapter alone); ``mlp``: the adapter plus a residual
        MLP of the projection (LayerNorm, ``d_ffn``, GELU; its output layer started at
        zero), a non-linear reading; ``own_proj``: the adapter plus a projection of the
        features that the masked scales train (started at zero), so they again shape
        a path from the features of their own while the utterance scale keeps the
        projection. Both start as ``linear`` does.
    trunk_projection_grad : float
        With ``branch_input: branch_only``, the share of the masked scales' gradient that
        reaches the input projection through the adapter (0, default: none, the
        projection is the utterance scale's alone; 1: all of it, as ``shared`` does).

    Example
    -------
    >>> enc = MGFEncoder(input_size=80, d_model=32, num_layers=2, nhead=4, d_ffn=64)
    >>> hs = enc(torch.randn(3, 50, 80), torch.tensor([50, 40, 10]))
    >>> len(hs), hs[-1].shape
    (3, torch.Size([3, 50, 32]))
    >>> enc = MGFEncoder(input_size=80, d_model=32, num_layers=2, nhead=4, d_ffn=64, branch_layers=2)
    >>> len(enc(torch.randn(3, 50, 80), torch.tensor([50, 40, 10]))), enc.num_outputs
    (5, 5)
    """

    def __init__(
        self,
        input_size=80,
        d_model=256,
        num_layers=4,
        nhead=4,
        d_ffn=1024,
        dropout=0.1,
        layerdrop_prob=0.0,
        conv_pos_kernel=65,
        conv_pos_groups=16,
        conv_pos_norm="none",
        conv_pos_scale_init=None,
        branch_layers=0,
        branch_norm="layer",
        branch_input="shared",
        trunk_adapter="linear",
        trunk_projection_grad=0.0,
    ):
        super().__init__()
        # Kept verbatim so a checkpoint folder can rebuild this module (see pretrained_folder.py).
        self.config = dict(
            input_size=input_size,
            d_model=d_model,
            num_layers=num_layers,
            nhead=nhead,
            d_ffn=d_ffn,
            dropout=dropout,
            layerdrop_prob=layerdrop_prob,
            conv_pos_kernel=conv_pos_kernel,
            conv_pos_groups=conv_pos_groups,
        )
        # Only when switched on, so the config of a default encoder (and its folder) is as before.
        if conv_pos_norm != "none":
            self.config["conv_pos_norm"] = conv_pos_norm
        if conv_pos_scale_init is not None:
            self.config["conv_pos_scale_init"] = float(conv_pos_scale_init)
        if int(branch_layers) < 0:
            raise ValueError(f"branch_layers must be >= 0, got {branch_layers} (hparams/mgf.yaml)")
        if int(branch_layers) > 0:
            self.config["branch_layers"] = int(branch_layers)
            if branch_norm != "layer":
                self.config["branch_norm"] = branch_norm
            if branch_input != "shared":
                self.config["branch_input"] = branch_input
            if trunk_adapter != "linear":
                self.config["trunk_adapter"] = trunk_adapter
            if float(trunk_projection_grad) != 0.0:
                self.config["trunk_projection_grad"] = float(trunk_projection_grad)
        if branch_input not in BRANCH_INPUTS:
            raise ValueError(f"branch_input must be one of {BRANCH_INPUTS}, got {branch_input!r} (hparams/mgf.yaml)")
        if trunk_adapter not in TRUNK_ADAPTERS:
            raise ValueError(f"trunk_adapter must be one of {TRUNK_ADAPTERS}, got {trunk_adapter!r} (hparams/mgf.yaml)")
        branch_only = int(branch_layers) > 0 and branch_input == "branch_only"  # the trunk reads through an adapter
        if trunk_adapter != "linear" and not branch_only:
            raise ValueError(f"trunk_adapter={trunk_adapter} shapes how the trunk reads an input projection that the "
                             "utterance branch owns: set branch_layers (e.g. 4) and branch_input=branch_only, or "
                             "trunk_adapter=linear (hparams/mgf.yaml)")
        if not 0.0 <= float(trunk_projection_grad) <= 1.0:
            raise ValueError(f"trunk_projection_grad must be in [0, 1], got {trunk_projection_grad} (hparams/mgf.yaml)")
        if float(trunk_projection_grad) != 0.0 and not branch_only:
            raise ValueError(f"trunk_projection_grad={trunk_projection_grad} lets the masked scales' gradient back into "
                             "an input projection that the utterance branch owns: set branch_layers (e.g. 4) and "
                             "branch_input=branch_only, or trunk_projection_grad=0 (hparams/mgf.yaml)")
        self.input_proj = torch.nn.Linear(input_size, d_model)
        self.mask_emb = torch.nn.Parameter(torch.empty(d_model).uniform_(-0.1, 0.1))
        self.pos = ConvPositionalEncoding(d_model, conv_pos_kernel, conv_pos_groups, norm=conv_pos_norm,
                                          scale_init=conv_pos_scale_init)
        self.input_norm = torch.nn.LayerNorm(d_model)
        self.dropout = torch.nn.Dropout(dropout)
        self.transformer = TransformerEncoder(
            num_layers=num_layers,
            nhead=nhead,
            d_ffn=d_ffn,
            d_model=d_model,
            dropout=dropout,
            activation=torch.nn.GELU,
            normalize_before=True,
            layerdrop_prob=layerdrop_prob,
            output_hidden_states=True,
        )
        for layer in self.transformer.layers:
            if type(layer.self_att) is MultiheadAttention:
                layer.self_att.__class__ = _NoWeightsMHA
        # built last, so an encoder without it draws the same initial weights as before the switch
        self.branch = TDNNBranch(d_model, int(branch_layers), branch_norm) if int(branch_layers) > 0 else None
        own = self.branch is not None and branch_input == "own"
        self.branch_proj = torch.nn.Linear(input_size, d_model) if own else None
        self.trunk_adapter = None
        if branch_only:
            self.trunk_adapter = torch.nn.Linear(d_model, d_model)
            with torch.no_grad():  # the identity: at init the trunk sees what it sees without the switch
                self.trunk_adapter.weight.copy_(torch.eye(d_model))
                self.trunk_adapter.bias.zero_()
        # built after the adapter (a linear-adapter encoder draws the same weights as before the switch);
        # its output starts at zero, so at init the trunk reads what the linear adapter gives it
        self.trunk_residual = None
        if trunk_adapter == "mlp":
            self.trunk_residual = torch.nn.Sequential(torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, d_ffn),
                                                      torch.nn.GELU(), torch.nn.Linear(d_ffn, d_model))
        elif trunk_adapter == "own_proj":
            self.trunk_residual = torch.nn.Linear(input_size, d_model)
        if self.trunk_residual is not None:
            last = self.trunk_residual[-1] if trunk_adapter == "mlp" else self.trunk_residual
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()

    @property
    def num_layers(self):
        """Transformer layers (the trunk's outputs are these plus the input embedding)."""
        return self.config["num_layers"]

    @property
    def num_branch_layers(self):
        return self.config.get("branch_layers", 0)

    @property
    def num_outputs(self):
        """Tensors :meth:`forward` returns: input embedding, each layer, each branch block."""
        return self.num_layers + 1 + self.num_branch_layers

    @property
    def output_size(self):
        return self.config["d_model"]

    def _embed(self, feats, n_frames, mask=None, unmasked=False):
        """The input block before the positional term: (embedding x, padding mask), both (B, T, ...);
        with ``unmasked``, also the embedding before the mask: (x, pad, x_unmasked)."""
        T = feats.shape[1]
        pad = torch.arange(T, device=feats.device)[None, :] >= n_frames.to(feats.device)[:, None]
        clean = trunk = self.input_proj(feats)
        if self.trunk_adapter is not None:
            # branch_input: branch_only: the masked scales' gradient stops at the projection (or a share of it
            # passes: trunk_projection_grad); they read it through their adapter
            share = self.config.get("trunk_projection_grad", 0.0)
            read = clean.detach() if share == 0.0 else scale_grad(clean, share)
            trunk = self.trunk_adapter(read)
            if self.trunk_residual is not None:  # trunk_adapter: mlp reads the projection, own_proj the features
                own = self.config["trunk_adapter"] == "own_proj"
                trunk = trunk + self.trunk_residual(feats if own else read)
        x = trunk if mask is None else torch.where(mask[..., None], self.mask_emb.to(trunk.dtype), trunk)
        x = x.masked_fill(pad[..., None], 0.0)
        return (x, pad, clean) if unmasked else (x, pad)

    @torch.no_grad()
    def pos_ratio(self, feats, n_frames, mask=None):
        """Mean per-frame ``||pos(x)|| / ||x||`` of the input block (the ``encoder_pos_ratio`` diagnostic).

        ``x`` is the frame's own embedding (the input projection, the mask embedding
        on masked frames) and ``pos(x)`` the positional term added to it
        (:class:`ConvPositionalEncoding`, with its gate). Averaged over the valid
        frames of the batch; a large ratio means the positional convolution
        (a temporal smoother) drowns each frame.

        Arguments
        ---------
        feats : torch.Tensor
            (B, T, input_size) features.
        n_frames : torch.LongTensor
            (B,) valid frames.
        mask : torch.BoolTensor, optional
            (B, T) frames replaced by the mask embedding (as in :meth:`forward`).

        Returns
        -------
        float
            0 when no frame is valid.
        """
        x, pad = self._embed(feats, n_frames, mask)
        p = self.pos(x)
        ratio = p.float().norm(dim=-1) / x.float().norm(dim=-1).clamp(min=1e-8)
        valid = ~pad
        if not bool(valid.any()):
            return 0.0
        return float(ratio[valid].mean())

    def forward(self, feats, n_frames, mask=None, branch=True, views=None):
        """Encodes features.

        Arguments
        ---------
        feats : torch.Tensor
            (B, T, input_size) features.
        n_frames : torch.LongTensor
            (B,) valid frames per sequence.
        mask : torch.BoolTensor, optional
            (B, T) frames replaced by the mask embedding before encoding (the
            Transformer's input only: the branch reads every frame).
        branch : bool
            Also run the utterance branch, if the encoder has one (the target
            network reads the Transformer's layers only and passes False).
        views : tuple, optional
            ``(feats_u, n_u)``: (U, T, input_size) features and (U,) frames the
            branch reads instead of ``feats`` (pretraining passes each distinct
            view once, not each of its K mask copies: the branch sees no mask, so
            the copies would give it the same rows K times). Its blocks are then
            (U, T, d_model), one row per view.

        Returns
        -------
        list of torch.Tensor
            ``num_outputs`` tensors (B, T, d_model): the input embedding, then
            each layer, the last one after the final LayerNorm; then, with a
            branch, each of its blocks (``num_layers + 1`` tensors without it).
        """
        x, pad, clean = self._embed(feats, n_frames, mask, unmasked=True)
        x = x + self.pos(x)
        x = self.dropout(self.input_norm(x))
        out, _, hidden = self.transformer(x, src_key_padding_mask=pad)
        layers = list(hidden[:-1]) + [out]
        if branch and self.branch is not None:
            branch_feats, branch_frames = (feats, n_frames) if views is None else views
            proj = self.input_proj if self.branch_proj is None else self.branch_proj
            if views is not None or self.branch_proj is not None:
                clean = proj(branch_feats)
            layers += self.branch(clean, branch_frames)
        return layers
