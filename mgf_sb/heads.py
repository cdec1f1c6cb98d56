"""Downstream heads, two per task (MP3S-style: a linear probe and a light non-linear head).

Each recipe's YAML lists its heads by name (``heads:``, SpeechBrain ``!name:`` partials that
hold the head's sizes) and picks one with ``head: <name>`` (``--head=<name>``);
:func:`select_head` builds it with the sizes only known at run time (upstream feature
size, number of classes):

=========== ==================================== ==========================================
task        ``linear``                           non-linear head
=========== ==================================== ==========================================
TIMIT       :class:`FrameProbe`                  ``bilstm``: :class:`FrameBiLSTM`
VoxCeleb1   :class:`PooledLinearHead`            ``xvector``: :class:`XvectorHead` (AAM-softmax)
IEMOCAP     :class:`UtteranceClassifier`         ``attentive``: :class:`UtteranceClassifier`
            (mean+std, no hidden layer)          (attentive pooling, one hidden layer)
LibriSpeech :class:`CTCHead` (``lstm_layers=0``) ``bilstm``: :class:`CTCHead` (2-layer BiLSTM)
=========== ==================================== ==========================================
"""

import torch


def select_head(choices, name, **sizes):
    """Builds the head called ``name`` among ``choices``.

    Arguments
    ---------
    choices : dict
        Head name -> callable (a YAML ``!name:`` partial carrying the head's own sizes).
    name : str
        The chosen head (``head:`` in the YAML, ``--head=...`` on the command line).
    **sizes
        Keyword arguments known only at run time (``input_size``, ``n_classes``, ...).

    Example
    -------
    >>> import functools
    >>> heads = {"linear": FrameProbe, "bilstm": functools.partial(FrameBiLSTM, hidden_size=4)}
    >>> type(select_head(heads, "bilstm", input_size=3, n_classes=2)).__name__
    'FrameBiLSTM'
    """
    if name not in choices:
        raise ValueError(f"head must be one of {sorted(choices)}, got {name!r}")
    return choices[name](**sizes)


def count_parameters(module):
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def valid_mask(n_frames, T, device=None):
    """(B,) lengths -> (B, T) bool, True on valid frames."""
    return torch.arange(T, device=device)[None, :] < n_frames.to(device)[:, None]


class StatisticsPooling(torch.nn.Module):
    """Masked pooling over time: ``mean``, ``mean+std`` or ``attentive``.

    Arguments
    ---------
    input_size : int
    mode : str
        ``mean`` | ``mean+std`` | ``attentive`` (a learned softmax over frames,
        then weighted mean and std).
    """

    def __init__(self, input_size, mode="mean+std"):
        super().__init__()
        if mode not in ("mean", "mean+std", "attentive"):
            raise ValueError(f"pooling must be mean, mean+std or attentive, got {mode!r}")
        self.mode = mode
        self.attention = None
        if mode == "attentive":
            self.attention = torch.nn.Sequential(
                torch.nn.Linear(input_size, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1)
            )
        self.output_size = input_size if mode == "mean" else 2 * input_size

    def forward(self, x, n_frames):
        """(B, T, D), (B,) -> (B, output_size)."""
        mask = valid_mask(n_frames, x.shape[1], x.device)
        if self.attention is None:
            w = mask.to(x.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        else:
            scores = self.attention(x).squeeze(-1).masked_fill(~mask, float("-inf"))
            w = torch.softmax(scores, dim=1)
        mean = torch.einsum("bt,btd->bd", w, x)
        if self.mode == "mean":
            return mean
        var = torch.einsum("bt,btd->bd", w, (x - mean[:, None]) ** 2)
        return torch.cat([mean, var.clamp(min=1e-8).sqrt()], -1)


class Classifier(torch.nn.Module):
    """Linear (``hidden_size=0``) or one-hidden-layer MLP classifier.

    Returns logits (B, n_classes).
    """

    def __init__(self, input_size, n_classes, hidden_size=0, dropout=0.0):
        super().__init__()
        if hidden_size:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(input_size, hidden_size),
                torch.nn.ReLU(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden_size, n_classes),
            )
        else:
            self.net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(input_size, n_classes))

    def forward(self, x):
        return self.net(x)


class UtteranceClassifier(torch.nn.Module):
    """Pooling + classifier: (B, T, D), (B,) -> logits (B, n_classes).

    IEMOCAP's ``linear`` head is ``pooling="mean+std", hidden_size=0``; its
    ``attentive`` head is ``pooling="attentive"`` with one hidden layer.
    """

    def __init__(self, input_size, n_classes, pooling="mean+std", hidden_size=0, dropout=0.0):
        super().__init__()
        self.pooling, self.hidden_size = pooling, int(hidden_size)
        self.pool = StatisticsPooling(input_size, pooling)
        self.classifier = Classifier(self.pool.output_size, n_classes, hidden_size, dropout)

    def forward(self, x, n_frames):
        return self.classifier(self.pool(x, n_frames))


class FrameProbe(torch.nn.Module):
    """Frame-wise linear probe: (B, T, D) -> logits (B, T, n_classes)."""

    def __init__(self, input_size, n_classes):
        super().__init__()
        self.linear = torch.nn.Linear(input_size, n_classes)

    def forward(self, x, n_frames=None):
        return self.linear(x)


class BiLSTM(torch.nn.Module):
    """Bidirectional LSTM over the valid frames only (packed sequences).

    (B, T, D), (B,) valid frames -> (B, T, 2 * hidden_size); padding frames are zeros.
    """

    def __init__(self, input_size, hidden_size, num_layers, dropout=0.0):
        super().__init__()
        self.lstm = torch.nn.LSTM(
            input_size, hidden_size, num_layers=num_layers, batch_first=True,
            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0,
        )
        self.output_size = 2 * hidden_size

    def forward(self, x, n_frames=None):
        if n_frames is None:
            return self.lstm(x)[0]
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, n_frames.cpu().clamp(min=1, max=x.shape[1]), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        return torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class FrameBiLSTM(torch.nn.Module):
    """Small non-linear frame head: BiLSTM layers, then a linear layer (TIMIT ``bilstm``).

    (B, T, D), (B,) -> logits (B, T, n_classes). With ``input_size=192``,
    ``hidden_size=96``, two layers and 39 classes: about 0.46 M parameters.

    Example
    -------
    >>> head = FrameBiLSTM(8, 5, hidden_size=4)
    >>> head(torch.randn(2, 7, 8), torch.tensor([7, 3])).shape
    torch.Size([2, 7, 5])
    """

    def __init__(self, input_size, n_classes, hidden_size=96, num_layers=2, dropout=0.1):
        super().__init__()
        self.lstm = BiLSTM(input_size, hidden_size, num_layers, dropout)
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(self.lstm.output_size, n_classes)

    def forward(self, x, n_frames=None):
        return self.out(self.dropout(self.lstm(x, n_frames)))


class CTCHead(torch.nn.Module):
    """CTC head: optional BiLSTM layers (SUPERB's ASR head), then a linear layer.

    ``lstm_layers=0`` is the linear head. Returns log-probabilities (B, T, n_tokens)
    for ``speechbrain.nnet.losses.ctc_loss``.
    """

    def __init__(self, input_size, n_tokens, lstm_layers=2, lstm_hidden=256, dropout=0.1):
        super().__init__()
        self.lstm = None
        size = input_size
        if lstm_layers > 0:
            self.lstm = BiLSTM(input_size, lstm_hidden, lstm_layers, dropout)
            size = self.lstm.output_size
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(size, n_tokens)

    def forward(self, x, n_frames=None):
        if self.lstm is not None:
            x = self.lstm(x, n_frames)
        return torch.log_softmax(self.out(self.dropout(x)), dim=-1)


class PooledLinearHead(torch.nn.Module):
    """Speaker probe (VoxCeleb1 ``linear``): pooling -> standardisation -> linear classifier.

    The standardisation is a BatchNorm without affine part (running statistics of
    the pooled features), so the classifier stays a linear probe; the standardised
    pooled statistics are also the verification embedding (:meth:`embed`).

    Example
    -------
    >>> head = PooledLinearHead(8, 3)
    >>> x, n = torch.randn(2, 5, 8), torch.tensor([5, 3])
    >>> head(x, n).shape, head.embed(x, n).shape
    (torch.Size([2, 3]), torch.Size([2, 16]))
    """

    margin_loss = False  # logits for a plain (weighted) cross-entropy

    def __init__(self, input_size, n_classes, pooling="mean+std", dropout=0.0):
        super().__init__()
        self.pool = StatisticsPooling(input_size, pooling)
        self.norm = torch.nn.BatchNorm1d(self.pool.output_size, affine=False)
        self.classifier = Classifier(self.pool.output_size, n_classes, dropout=dropout)

    def embed(self, x, n_frames):
        """(B, T, D), (B,) -> (B, pooled size): the standardised pooled statistics."""
        return self.norm(self.pool(x, n_frames))

    def forward(self, x, n_frames):
        """Logits (B, n_classes)."""
        return self.classifier(self.embed(x, n_frames))


class XvectorHead(torch.nn.Module):
    """Small x-vector TDNN + cosine classifier for AAM-softmax (VoxCeleb1 ``xvector``).

    SpeechBrain's ``Xvector`` (TDNN blocks -> statistics pooling -> linear
    embedding) on the upstream features, and SpeechBrain's ECAPA ``Classifier``
    (cosine similarity to one learned vector per class); the recipe applies the
    additive angular margin (``speechbrain.nnet.losses.AdditiveAngularMargin``)
    to these cosines. :meth:`embed` gives the embedding used for verification.
    With ``input_size=192`` and the defaults: about 0.4 M parameters.

    Arguments
    ---------
    input_size : int
    n_classes : int
    channels, kernel_sizes, dilations : list of int
        One entry per TDNN block.
    emb_dim : int
        Embedding size.

    Example
    -------
    >>> head = XvectorHead(8, 3, channels=[16, 16], kernel_sizes=[3, 1], dilations=[1, 1], emb_dim=4)
    >>> cos = head(torch.randn(2, 9, 8), torch.tensor([9, 6]))
    >>> cos.shape, bool((cos.abs() <= 1 + 1e-5).all())
    (torch.Size([2, 3]), True)
    """

    margin_loss = True  # cosines, for AdditiveAngularMargin + cross-entropy

    def __init__(self, input_size, n_classes, channels=(128, 128, 128, 128, 384), kernel_sizes=(5, 3, 3, 1, 1),
                 dilations=(1, 2, 3, 1, 1), emb_dim=128):
        super().__init__()
        from speechbrain.lobes.models.ECAPA_TDNN import Classifier as CosineClassifier
        from speechbrain.lobes.models.Xvector import Xvector

        if not len(channels) == len(kernel_sizes) == len(dilations):
            raise ValueError("channels, kernel_sizes and dilations need one entry per TDNN block")
        self.xvector = Xvector(
            tdnn_blocks=len(channels), tdnn_channels=list(channels), tdnn_kernel_sizes=list(kernel_sizes),
            tdnn_dilations=list(dilations), lin_neurons=emb_dim, in_channels=input_size,
        )
        self.classifier = CosineClassifier(emb_dim, lin_blocks=0, out_neurons=n_classes)

    def embed(self, x, n_frames):
        """(B, T, D), (B,) -> (B, emb_dim) x-vectors.

        Padding frames are zeroed first (what they held never matters) and the
        statistics pooling covers the valid frames only; the TDNN's receptive
        field still sees a few zero frames past the end of a padded utterance.
        """
        mask = valid_mask(n_frames, x.shape[1], x.device)
        x = x.masked_fill(~mask[:, :, None], 0.0)
        rel = n_frames.to(x.dtype) / x.shape[1]
        return self.xvector(x, rel).squeeze(1)

    def forward(self, x, n_frames):
        """Cosine similarities (B, n_classes) in [-1, 1]."""
        return self.classifier(self.embed(x, n_frames).unsqueeze(1)).squeeze(1)
